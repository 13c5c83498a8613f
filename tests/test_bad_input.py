"""Broken recipes, overrides and data files, generated case by case: every one ends with
exit code 2, no traceback, and a message naming the file (or the command line) and the
dotted path, line or row; none takes more than 10 s or 1 GB (docs/faults.md)."""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import RECIPES

SFT = RECIPES / "sft.yaml"
LIMIT_S = 30  # a bound against pathological slowness on hostile input, with room for a loaded machine
LIMIT_BYTES = 2**30


def _laughs(kind: str) -> str:
    """A "billion laughs": 30 levels of anchors, each three aliases of the one before."""
    first = "a: &a {x: 1, y: 1}" if kind == "mapping" else "a: &a [1, 1]"
    lines, previous = [first], "a"
    for i in range(1, 30):
        lines.append(f"l{i}: &l{i} " + ("{p: *%s, q: *%s, r: *%s}" if kind == "mapping" else "[*%s, *%s, *%s]")
                     % (previous, previous, previous))
        previous = f"l{i}"
    return "\n".join(lines) + "\nrun: {name: x}\nstages: {s: {algorithm: sft}}\n"


SFT_STAGE = f"extends: {SFT}\n"
# (id, recipe text or bytes, overrides, what the message must name besides the file)
RECIPE_CASES = [
    ("laughs-mapping", _laughs("mapping"), [], "expands to more than"),
    ("laughs-sequence", _laughs("sequence"), [], "expands to more than"),
    ("deep-flow", "run: " + "[" * 20000 + "]" * 20000 + "\n", [], "nested more than"),
    ("deep-block", "".join("  " * i + f"k{i}:\n" for i in range(200)) + "  " * 200 + "v: 1\n", [], "nested more than"),
    ("duplicate-key", "run: {name: x}\nrun: {name: y}\nstages: {}\n", [], "line 2"),
    ("duplicate-nested-key", SFT_STAGE + "stages:\n  sft:\n    trainer: {max_steps: 1, max_steps: 2}\n", [],
     "duplicate key 'max_steps'"),
    ("latin-1", b"run: {name: x}\n# caf\xe9\n", [], "line 2"),
    ("utf-16", "run: {name: x}\n".encode("utf-16"), [], "line 1"),
    ("nul-bytes", b"run: {name: x}\x00\n", [], "not valid YAML"),
    ("huge-int", "run: {name: x, seed: " + "9" * 5000 + "}\n", [], "line 1"),
    ("lone-surrogate", 'run: {name: "\\ud800"}\nstages: {}\n', [], "run.name"),
    ("tabs", "run:\n\tname: x\n", [], "line 2"),
    ("top-level-list", "- run\n- stages\n", [], "a recipe is a mapping"),
    ("empty-stage-name", SFT_STAGE + "stages:\n  '': {algorithm: sft}\n", [], "cannot be empty"),
    ("dotdot-stage", SFT_STAGE + "stages:\n  ../../x: {algorithm: sft}\n", [], "stages.../../x"),
    ("absolute-stage", SFT_STAGE + "stages:\n  /tmp/x: {algorithm: sft}\n", [], "stages./tmp/x"),
    ("integer-stage", SFT_STAGE + "stages:\n  7: {algorithm: sft}\n", [], "stages.7"),
    ("slash-run-name", SFT_STAGE + "run: {name: a/b}\n", [], "run.name"),
    ("seed-too-big", SFT_STAGE + f"run: {{name: x, seed: {2**40}}}\n", [], "run.seed"),
    ("seed-negative", SFT_STAGE + "run: {name: x, seed: -1}\n", [], "run.seed"),
    ("accelerator", SFT_STAGE + "stages: {sft: {trainer: {accelerator: tpx}}}\n", [], "stages.sft.trainer.accelerator"),
    ("strategy", SFT_STAGE + "stages: {sft: {trainer: {strategy: ddpp}}}\n", [], "stages.sft.trainer.strategy"),
    ("precision", SFT_STAGE + "stages: {sft: {trainer: {precision: fp8}}}\n", [], "stages.sft.trainer.precision"),
    ("epochs-1e30", SFT_STAGE + "stages: {sft: {trainer: {max_epochs: 1.0e+30}}}\n", [],
     "stages.sft.trainer.max_epochs"),
    ("steps-huge", SFT_STAGE + f"stages: {{sft: {{trainer: {{max_steps: {10**12}}}}}}}\n", [],
     "stages.sft.trainer.max_steps"),
    ("rm-objective-in-dpo", f"extends: {RECIPES / 'dpo.yaml'}\nstages: {{dpo: {{objective: pairwise}}}}\n", [],
     "stages.dpo.objective"),
    ("dpo-objective-in-ppo", f"extends: {RECIPES / 'ppo.yaml'}\nstages: {{ppo: {{objective: dpo}}}}\n", [],
     "stages.ppo.objective"),
    ("policy-loss-in-rm", f"extends: {RECIPES / 'reward-model.yaml'}\nstages: {{rm: {{objective: ppo-clip}}}}\n",
     [], "stages.rm.objective"),
    ("regularizer-as-objective",
     f"extends: {RECIPES / 'reward-model.yaml'}\nstages: {{rm: {{objective: centering}}}}\n", [], "stages.rm.objective"),
    ("missing-extends", "extends: [missing.yaml]\nrun: {name: x}\n", [], "extends[0]"),
    ("extends-not-text", "extends: [{a: 1}]\nrun: {name: x}\n", [], "extends[0]"),
    ("extends-cycle", "extends: [RECIPE]\nrun: {name: x}\n", [], "cycle"),
    ("unknown-top-level", SFT_STAGE + "stagez: {}\n", [], "stagez"),
    ("stage-not-mapping", SFT_STAGE + "stages: {sft: 3}\n", [], "stages.sft"),
]
OVERRIDE_CASES = [
    ("override-bad-int", ["stages.sft.trainer.max_steps=abc"], "stages.sft.trainer.max_steps"),
    ("override-mapping", ["stages.sft.trainer={max_steps: x}"], "stages.sft.trainer.max_steps"),
    ("override-bad-yaml", ["stages.sft.trainer.max_steps=[1"], "stages.sft.trainer.max_steps"),
    ("override-no-equals", ["stages.sft.trainer.max_steps"], "stages.sft.trainer.max_steps"),
    ("override-empty-key", ["=3"], "empty key"),
    ("override-bad-index", ["stages.sft.policy.0=3"], "stages.sft.policy"),
    ("override-dup-key", ["stages.sft.trainer={a: 1, a: 2}"], "duplicate key"),
    ("override-laughs", ["run.x=" + _laughs("mapping").replace("\n", ", ").join("{}")], "run.x"),
    ("override-seed", ["run.seed=99999999999"], "run.seed"),
    ("override-stage-name", ["stages.a/b={algorithm: sft}"], "stages.a/b"),
]


def _run(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "rlhfkit", *args], cwd=cwd, capture_output=True, text=True,
                            timeout=60, check=False, errors="replace")
    return result, time.perf_counter() - started


def _assert_clean_error(result: subprocess.CompletedProcess, elapsed: float, where: str, what: str) -> None:
    message = " ".join(result.stderr.split())
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert message.startswith("error:"), message
    assert where in message, (where, message)
    assert what in message, (what, message)
    assert elapsed < LIMIT_S, elapsed
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the largest child so far
    assert peak < LIMIT_BYTES, peak


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize(("case", "text", "overrides", "what"), RECIPE_CASES, ids=[c[0] for c in RECIPE_CASES])
def test_broken_recipes(tmp_path, command, case, text, overrides, what):
    path = tmp_path / f"{case}.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text.replace("RECIPE", str(path)))
    result, elapsed = _run([command, str(path), *overrides], tmp_path)
    _assert_clean_error(result, elapsed, str(path.name), what)
    assert not (tmp_path / "runs").exists()  # nothing was written


@pytest.mark.parametrize(("case", "overrides", "what"), OVERRIDE_CASES, ids=[c[0] for c in OVERRIDE_CASES])
def test_broken_overrides_are_attributed_to_the_command_line(tmp_path, case, overrides, what):
    result, elapsed = _run(["validate", str(SFT), *overrides], tmp_path)
    _assert_clean_error(result, elapsed, "command line", what)
    assert str(SFT) not in " ".join(result.stderr.split()).split(what)[0][-60:]


def test_problems_in_several_fields_are_reported_together(tmp_path):
    """A layout error in one field (a non-integer max_steps) hides neither an unknown
    algorithm nor an unknown policy."""
    path = tmp_path / "three.yaml"
    path.write_text(f"extends: {SFT}\nstages:\n  sft:\n    algorithm: nope\n    trainer: {{max_steps: 1.5}}\n")
    result, elapsed = _run(["validate", str(path), "stages.sft.policy.name=nopolicy"], tmp_path)
    _assert_clean_error(result, elapsed, "three.yaml", "3 problems")
    message = " ".join(result.stderr.split())
    assert "three.yaml: stages.sft.algorithm.name: unknown algorithm 'nope'" in message
    assert "three.yaml: stages.sft.trainer.max_steps" in message
    assert "command line: stages.sft.policy" in message and "nopolicy" in message


def test_a_symlink_loop_and_a_directory_as_recipe(tmp_path):
    (tmp_path / "a.yaml").symlink_to(tmp_path / "b.yaml")
    (tmp_path / "b.yaml").symlink_to(tmp_path / "a.yaml")
    result, elapsed = _run(["validate", "a.yaml"], tmp_path)
    _assert_clean_error(result, elapsed, "a.yaml", "symbolic link")
    (tmp_path / "folder.yaml").mkdir()
    result, elapsed = _run(["validate", "folder.yaml"], tmp_path)
    _assert_clean_error(result, elapsed, "folder.yaml", "not a file")


def test_a_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + f"extends: {SFT}\n".encode())
    result, _ = _run(["validate", str(path)], tmp_path)
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------- data files

DATA_CASES = [
    ("latin-1", "data.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n',
     "line 2"),
    ("huge-int", "data.jsonl", b'{"prompt": "a", "completion": ' + b"9" * 5000 + b"}\n", "line 1"),
    ("lone-surrogate", "data.jsonl", b'{"prompt": "\\ud800", "completion": "b"}\n', "line 1"),
    ("duplicate-key", "data.jsonl", b'{"prompt": "a", "prompt": "b", "completion": "c"}\n', "line 1"),
    ("duplicate-key-array", "data.json", b'[{"prompt": "a", "prompt": "b", "completion": "c"}]\n', "twice"),
    ("every-line-invalid", "data.jsonl", b"{not json\n[1, 2\n", "line 1"),
    ("deep-nesting", "data.jsonl", b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b', "completion": "b"}\n',
     "line 1"),
    ("duplicate-csv-column", "data.csv", b"prompt,completion,prompt\na,b,c\n", "more than once"),
    ("csv-not-utf8", "data.csv", b"prompt,completion\ncaf\xe9,b\n", "line 2"),
    ("number-not-text", "data.jsonl", b'{"prompt": 5, "completion": "b"}\n', "line 1"),
    ("empty-file", "data.jsonl", b"", "empty"),
]


@pytest.mark.parametrize(("case", "name", "content", "what"), DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_broken_data_files(tmp_path, case, name, content, what):
    data = tmp_path / name
    data.write_bytes(content)
    result, elapsed = _run(["run", str(SFT), f"stages.sft.data={{name: file, path: {data}, schema: prompt-completion}}",
                            "stages.sft.trainer.max_steps=1", f"run.dir={tmp_path / 'run'}"], tmp_path)
    _assert_clean_error(result, elapsed, name, what)
    if case == "every-line-invalid":
        assert "empty" not in result.stderr


def test_a_bom_in_a_jsonl_file_is_accepted(tmp_path):
    from rlhfkit import StageContext, load_plugins, ref

    data = tmp_path / "bom.jsonl"
    data.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "completion": "b"}\n')
    context = StageContext(load_plugins().registry)
    rows = context.build(ref("dataset")(name="file", path=str(data), schema="prompt-completion")).rows()
    assert [(r.prompt, r.completion) for r in rows] == [("a", "b")]


def test_a_symlink_loop_as_data_path(tmp_path):
    (tmp_path / "a.jsonl").symlink_to(tmp_path / "b.jsonl")
    (tmp_path / "b.jsonl").symlink_to(tmp_path / "a.jsonl")
    data = f"stages.sft.data={{name: file, path: {tmp_path / 'a.jsonl'}, schema: prompt-completion}}"
    result, elapsed = _run(["run", str(SFT), data, f"run.dir={tmp_path / 'run'}"], tmp_path)
    _assert_clean_error(result, elapsed, "a.jsonl", "not found")



@pytest.mark.parametrize(("recipe", "override", "what"), [
    ("dpo.yaml", "stages.dpo.data={name: file, path: x.jsonl, schema: ranking}", ("stages.dpo.data: dataset 'file' "
     "gives K-wise rankings (Ranking), but the dpo algorithm's 'data' takes preference pairs")),
    ("dpo.yaml", "stages.dpo.eval_data={name: file, path: x.jsonl, schema: unpaired}", "stages.dpo.eval_data:"),
    ("reward-model.yaml", "stages.rm.data={name: file, path: x.jsonl, schema: prompt}", "stages.rm.data:"),
    ("reward-model.yaml", "stages.rm.eval_data={name: file, path: x.jsonl, schema: ranking}", "stages.rm.eval_data:"),
    # rankings of K > 2 for an objective that takes pairs
    ("reward-model.yaml", "stages.rm.data.split=ranking", "the reward-model algorithm's 'data' takes preference pairs"),
])
def test_data_a_stage_cannot_use_is_refused_by_validate(tmp_path, recipe, override, what):
    (tmp_path / "x.jsonl").write_text("{}\n")
    result, elapsed = _run(["validate", str(RECIPES / recipe), override], tmp_path)
    _assert_clean_error(result, elapsed, "command line" if "file" in override else "stages.rm.data", what)


@pytest.mark.parametrize(("objective", "split", "what"), [
    ("margin", "preference", "needs a margin per pair"),
])
def test_an_objective_that_cannot_train_on_the_data_stops_before_the_first_step(tmp_path, exports, objective,
                                                                                 split, what):
    out = tmp_path / "run"
    result, elapsed = _run(["run", str(RECIPES / "reward-model.yaml"), "stages.sft=null",
                            f"stages.rm.backbone={{name: transformers, path: {exports['sft']}}}",
                            f"stages.rm.objective={objective}", f"stages.rm.data.split={split}",
                            f"run.dir={out}"], tmp_path)
    _assert_clean_error(result, elapsed, "stage 'rm'", what)
    assert not list((out / "rm").glob("checkpoints/*"))
