"""The command line: user errors are one paragraph with exit code 2 and no traceback."""

from __future__ import annotations

import json

from helpers import RECIPES, cli


def test_validate_ok():
    result = cli("validate", str(RECIPES / "sft.yaml"))
    assert result.returncode == 0, result.stderr
    assert "is valid" in result.stdout


def test_three_mistakes_are_all_reported(tmp_path):
    recipe = tmp_path / "broken.yaml"
    text = (RECIPES / "sft.yaml").read_text()
    text = text.replace("lr: 2.0e-3", "lr: -1")  # 1. out of range
    text = text.replace("family: gpt2,", "family: gpt3,")  # 2. not a family
    text = text.replace("\n    data: {name: builtin,", "\n    data: {name: bulitin,")  # 3. unknown component
    recipe.write_text(text)
    result = cli("validate", str(recipe))
    assert result.returncode == 2
    err = result.stderr
    assert "Traceback" not in err and "Traceback" not in result.stdout
    assert "3 problems" in err
    for path in ("stages.sft.algorithm.lr", "stages.sft.policy.architecture.family", "stages.sft.data.name"):
        assert f"{recipe}: {path}: " in err
    assert "available dataset components:" in err and "builtin" in err and "file" in err


def test_unknown_algorithm_lists_available(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("run: {name: x}\nstages:\n  a:\n    algorithm: ppo-maxx\n")
    result = cli("validate", str(recipe))
    assert result.returncode == 2
    assert "unknown algorithm 'ppo-maxx'" in result.stderr
    assert "sft" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_override_and_missing_file(tmp_path):
    result = cli("validate", str(RECIPES / "sft.yaml"), "stages.sft.trainer.max_steps=many")
    assert result.returncode == 2 and "command line" in result.stderr
    result = cli("run", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_schema_and_plugins():
    result = cli("schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    stage = schema["properties"]["stages"]["additionalProperties"]
    assert "sft" in stage["properties"]["algorithm"]["anyOf"][0]["enum"]
    result = cli("plugins", "algorithm")
    assert result.returncode == 0 and "sft" in result.stdout and "lr" in result.stdout


def test_broken_data_row_and_missing_model_are_one_paragraph(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "review the printer :", "completion": "the printer is great ."}\n'
                    '{"prompt": "review the printer :"}\n')
    result = cli("run", str(RECIPES / "sft.yaml"), f"run.dir={tmp_path / 'run'}",
                 f"stages.sft.data={{name: file, path: {data}, schema: prompt-completion}}")
    assert result.returncode == 2
    assert "bad.jsonl line 2: field 'completion' is missing" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    result = cli("run", str(RECIPES / "sft.yaml"), f"run.dir={tmp_path / 'run2'}",
                 f"stages.sft.policy={{name: transformers, path: {tmp_path / 'no-model'}}}")
    assert result.returncode == 2
    assert "is not a directory" in result.stderr and "Traceback" not in result.stderr
