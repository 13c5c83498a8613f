"""Faults never cost a run (docs/faults.md): kill -9 at random moments of every stage,
finalisation and export included, resumes to the run an uninterrupted process gives; NaN
stops before anything non-finite is saved (or skips the update); a second run into the
same directory is refused; a corrupt checkpoint falls back to the previous one; a full
disk fails cleanly and resumes once space is freed; corrupt run files are recovered."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import RECIPES, TINY_SFT, cli, popen, read_metrics
from safetensors.torch import load_file

SFT = str(RECIPES / "sft.yaml")
REWARD_MODEL = str(RECIPES / "reward-model.yaml")
DPO = str(RECIPES / "dpo.yaml")

SFT_RM = ["run", REWARD_MODEL, *TINY_SFT, "stages.sft.trainer.max_steps=40", "stages.rm.trainer.max_steps=12",
          "stages.rm.trainer.batch_size=16", "stages.rm.trainer.micro_batch_size=16",
          "stages.rm.eval_data.limit=32", "stages.rm.reference_data.limit=32",
          "stages.sft.trainer.checkpoint_every_n_steps=4", "stages.rm.trainer.checkpoint_every_n_steps=2"]

NOT_COMPARED = ("wall_time_s", "export")  # a duration, and the run directory's own path


def _tiny_dpo(sft_export: Path) -> list[str]:
    return [
        "run", DPO, "stages.sft=null",
        f"stages.dpo.policy={{name: transformers, path: {sft_export}, dropout: 0.0}}",
        "stages.dpo.trainer.max_steps=16", "stages.dpo.trainer.batch_size=8", "stages.dpo.trainer.micro_batch_size=4",
        "stages.dpo.trainer.log_every_n_steps=1", "stages.dpo.trainer.checkpoint_every_n_steps=2",
        "stages.dpo.algorithm.lr=1e-3", "stages.dpo.algorithm.max_new_tokens=8", "stages.dpo.algorithm.sample_prompts=2",
        "stages.dpo.eval_data.limit=16", "stages.dpo.eval_prompts.limit=8",
    ]


# ---------------------------------------------------------------- kill -9


def _stage_state(stage_dir: Path) -> str:
    if (stage_dir / "DONE.json").exists():
        return "done"
    if any(p.name.startswith(".export.tmp-") for p in stage_dir.glob(".export.*")):
        return "exporting"
    checkpoints = sorted(stage_dir.glob("checkpoints/step-*.ckpt"))
    if not checkpoints:
        return "training (no checkpoint yet)" if (stage_dir / "metrics.csv").exists() else "not started"
    return f"training or finalising (checkpoint {checkpoints[-1].stem})"


def _final_checkpoint(stage_dir: Path, total: int) -> bool:
    return (stage_dir / "checkpoints" / f"step-{total:08d}.ckpt").exists()


def _kill_run(args: list[str], cwd: Path, run_dir: Path, stages: dict[str, int], kills: int, seed: int
              ) -> list[str]:
    """Run ``args`` again and again, each time killed (SIGKILL to the whole process group)
    at the next moment of this list, per stage: alternately just after a new checkpoint and
    at a random moment of training, until the stage's last checkpoint is written (at most
    ``kills`` times); then once the last checkpoint is written (finalisation), while the
    export is being written, and just after the stage is marked done. Moments a run has
    already passed are skipped. Then once more to completion. Returns where each kill
    landed."""
    rng = random.Random(seed)
    plan = [(kind, stage) for stage in stages
            for kind in (*("checkpoint", "random") * (kills // 2 + 1), "finalise", "export", "done")]
    landed: list[str] = []
    for kind, stage in plan:
        stage_dir = run_dir / stage
        if _stage_state(stage_dir) == "done" or (kind in ("checkpoint", "random")
                                                   and _final_checkpoint(stage_dir, stages[stage])):
            continue  # already past this moment
        known = set(stage_dir.glob("checkpoints/step-*.ckpt"))
        process = popen(*args, cwd=cwd)
        started, delay = time.time(), rng.uniform(0.0, 0.25)
        seen_at = None
        while process.poll() is None and time.time() - started < 240:
            state = _stage_state(stage_dir)
            if kind in ("checkpoint", "random") and _final_checkpoint(stage_dir, stages[stage]) \
                    and state != "done":
                kind = "finalise"  # the stage got past its training: this kill lands in finalisation
            if kind == "checkpoint":
                hit = bool(set(stage_dir.glob("checkpoints/step-*.ckpt")) - known)
            elif kind == "random":
                hit = state.startswith("training")
            elif kind == "finalise":
                hit = _final_checkpoint(stage_dir, stages[stage]) and state != "done"
            elif kind == "export":
                hit = state == "exporting"
            else:
                hit = state == "done"
            if hit and seen_at is None:
                seen_at = time.time()
            wait = {"random": delay}.get(kind, 0.0)
            if seen_at is not None and time.time() - seen_at >= wait:
                break
            time.sleep(0.001)
        if process.poll() is not None:  # it finished (or failed) before the moment came
            output = process.stdout.read() if process.stdout else ""
            assert process.returncode == 0, output
            landed.append(f"{kind} {stage}: finished first")
            continue
        where = {s: _stage_state(run_dir / s) for s in stages}
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        landed.append(f"{kind} {stage}: killed with " + ", ".join(f"{s} {w}" for s, w in where.items()))
    final = cli(*args, cwd=cwd)
    assert final.returncode == 0, final.stdout + final.stderr + "\n".join(landed)
    assert "Traceback" not in final.stderr
    return landed


def _assert_same_run(clean: Path, killed: Path, stages: list[str]) -> None:
    for stage in stages:
        a, b = clean / stage, killed / stage
        tensors_a = load_file(a / "export" / "model.safetensors")
        tensors_b = load_file(b / "export" / "model.safetensors")
        assert tensors_a.keys() == tensors_b.keys(), stage
        for name in tensors_a:  # the last bits may differ between processes (tests/test_sft.py)
            torch.testing.assert_close(tensors_a[name], tensors_b[name], rtol=0, atol=1e-6, msg=f"{stage} {name}")
        config_a = json.loads((a / "export" / "config.json").read_text())
        config_b = json.loads((b / "export" / "config.json").read_text())
        assert config_a == config_b, stage  # the reward model's normalisation included
        summary_a = json.loads((a / "summary.json").read_text())
        summary_b = json.loads((b / "summary.json").read_text())
        assert summary_a.keys() == summary_b.keys(), stage
        for key, value in summary_a.items():
            if key not in NOT_COMPARED:
                assert summary_b[key] == (pytest.approx(value, rel=1e-5, abs=1e-6)
                                          if isinstance(value, float) else value), f"{stage} {key}"
        rows_a, rows_b = read_metrics(a / "metrics.csv"), read_metrics(b / "metrics.csv")
        assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b], stage
        for row_a, row_b in zip(rows_a, rows_b, strict=True):
            for key, value in row_a.items():
                if key.startswith("speed/") or key.endswith("_per_s") or value == "":
                    continue
                assert float(row_b[key]) == pytest.approx(float(value), rel=1e-5, abs=1e-6), \
                    f"{stage} step {row_a['step']} {key}"
        if (a / "samples.jsonl").exists():
            assert (a / "samples.jsonl").read_text() == (b / "samples.jsonl").read_text(), stage
        assert not list(b.glob(".*.tmp-*")) and not list(b.glob("checkpoints/.*.tmp-*")), stage


def _assert_kills_covered(landed: list[str], stages: list[str]) -> None:
    text = "\n".join(landed)
    for stage in stages:
        assert sum(line.split(":")[0].endswith(f" {stage}") and ": killed" in line for line in landed) >= 10, text
        assert f"finalise {stage}: killed" in text, text  # a kill between the last checkpoint and DONE.json


@pytest.mark.slow
def test_kill_at_random_moments_sft_and_reward_model(tmp_path):
    """SFT then the reward model, each killed at least 10 times (in training, after
    checkpoints, in finalisation, during export, after the stage is done), then re-run: the same exports
    (the reward model's normalisation included), summaries, metrics rows and samples as the
    uninterrupted run of the same command."""
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    result = cli(*SFT_RM, f"run.dir={clean}", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    landed = _kill_run([*SFT_RM, f"run.dir={killed}"], tmp_path, killed, {"sft": 40, "rm": 12}, kills=10, seed=0)
    _assert_same_run(clean, killed, ["sft", "rm"])
    _assert_kills_covered(landed, ["sft", "rm"])


@pytest.mark.slow
def test_kill_at_random_moments_dpo(tmp_path, exports):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    args = _tiny_dpo(exports["sft"])
    result = cli(*args, f"run.dir={clean}", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    landed = _kill_run([*args, f"run.dir={killed}"], tmp_path, killed, {"dpo": 16}, kills=10, seed=1)
    _assert_same_run(clean, killed, ["dpo"])
    _assert_kills_covered(landed, ["dpo"])


@pytest.mark.slow
def test_kill_at_random_moments_ppo(tmp_path, exports):
    from test_ppo import KL_ONLY, write_recipe

    recipe = write_recipe(tmp_path, exports, KL_ONLY)
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    args = ["run", recipe, "stages.ppo.trainer.checkpoint_every_n_steps=1"]
    result = cli(*args, f"run.dir={clean}", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    landed = _kill_run([*args, f"run.dir={killed}"], tmp_path, killed, {"ppo": 12}, kills=10, seed=2)
    _assert_same_run(clean, killed, ["ppo"])
    _assert_kills_covered(landed, ["ppo"])


# ---------------------------------------------------------------- NaN


def _all_finite(path: Path) -> bool:
    if path.suffix == ".safetensors":
        tensors = load_file(path).values()
    else:
        state = torch.load(path, weights_only=True)
        tensors = [t for t in _tensors(state) if t.is_floating_point()]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item)


NAN_CASES = {
    "sft": (lambda e: ["run", SFT, *TINY_SFT, "stages.sft.algorithm.lr=1e6", "stages.sft.trainer.max_steps=20",
                       "stages.sft.trainer.checkpoint_every_n_steps=2"]),
    "rm": (lambda e: ["run", REWARD_MODEL, "stages.sft=null", "stages.rm.algorithm.lr=1e6",
                      f"stages.rm.backbone={{name: transformers, path: {e['sft']}, dropout: 0.0}}",
                      "stages.rm.trainer.max_steps=20", "stages.rm.trainer.batch_size=16",
                      "stages.rm.trainer.micro_batch_size=16", "stages.rm.trainer.checkpoint_every_n_steps=2",
                      "stages.rm.eval_data.limit=16", "stages.rm.reference_data.limit=16"]),
    "dpo": (lambda e: [*_tiny_dpo(e["sft"]), "stages.dpo.algorithm.lr=1e6", "stages.dpo.trainer.max_steps=20"]),
}


@pytest.mark.parametrize("stage", sorted(NAN_CASES))
def test_learning_rate_1e6_stops_with_a_message_and_saves_nothing_non_finite(tmp_path, exports, stage):
    out = tmp_path / "run"
    result = cli(*NAN_CASES[stage](exports), f"run.dir={out}", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    message = " ".join(result.stderr.split())
    assert f"stage {stage!r} stopped:" in message and "NaN/Inf at step" in message, message
    assert ("is intact" in message) or ("No checkpoint of this stage was written yet" in message), message
    assert "trainer.on_nan: skip" in message
    assert not (out / stage / "DONE.json").exists()
    saved = list((out / stage).glob("checkpoints/*.ckpt")) + list((out / stage).glob("export/*.safetensors"))
    for path in saved:
        assert _all_finite(path), path


@pytest.mark.parametrize("stage", sorted(NAN_CASES))
def test_on_nan_skip_completes_with_finite_weights(tmp_path, exports, stage):
    out = tmp_path / "run"
    result = cli(*NAN_CASES[stage](exports), f"stages.{stage}.trainer.on_nan=skip", f"run.dir={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "update skipped" in result.stderr
    assert (out / stage / "DONE.json").exists()
    for path in [*(out / stage).glob("checkpoints/*.ckpt"), out / stage / "export" / "model.safetensors"]:
        assert _all_finite(path), path


def test_a_nan_weight_never_reaches_a_checkpoint_or_an_export(tmp_path):
    """The checkpoint writer and the end of a stage check the weights themselves, so a
    non-finite weight from any source (not only a bad gradient) stops the run."""
    from lightning.pytorch.demos.boring_classes import BoringModel

    from rlhfkit.training import NonFiniteError, ResumableCheckpoint

    module = BoringModel()
    with torch.no_grad():
        module.layer.weight[0, 0] = float("nan")
    saver = ResumableCheckpoint(tmp_path / "checkpoints", 1, lambda *a: None)

    class Trainer:  # just what _save reads
        global_step = 3
        lightning_module = module
        is_global_zero = True

        def save_checkpoint(self, *args, **kwargs):
            raise AssertionError("a checkpoint with a NaN weight was written")

    with pytest.raises(NonFiniteError, match="a weight .*layer.weight.* step 3"):
        saver._save(Trainer())


# ---------------------------------------------------------------- one writer


def test_a_second_run_into_the_same_directory_is_refused(tmp_path):
    out = tmp_path / "run"
    args = ["run", SFT, *TINY_SFT, "stages.sft.trainer.max_steps=400", f"run.dir={out}"]
    first = popen(*args, cwd=tmp_path)
    try:
        deadline = time.time() + 120
        while not (out / "sft" / "metrics.csv").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        second = cli(*args, cwd=tmp_path)
        assert second.returncode == 2, second.stdout + second.stderr
        message = " ".join(second.stderr.split())
        assert f"is in use by process {first.pid}" in message and "run.dir=" in message, message
        assert "Traceback" not in second.stderr
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # the lock died with its holder: the next run resumes
    resumed = cli(*args, cwd=tmp_path, timeout=900)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr


# ---------------------------------------------------------------- corrupt files


def _tiny_sft_run(tmp_path: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return cli("run", SFT, *TINY_SFT, "stages.sft.trainer.max_steps=12", "stages.sft.trainer.checkpoint_every_n_steps=4",
               f"run.dir={out}", *extra, cwd=tmp_path)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    clean = tmp_path / "clean"
    assert _tiny_sft_run(tmp_path, clean).returncode == 0
    out = tmp_path / "run"
    # as if killed after step 8: a stage with checkpoints 4 and 8, the newest cut short
    partial = _tiny_sft_run(tmp_path, out, "stages.sft.trainer.max_steps=8")
    assert partial.returncode == 0
    checkpoints = out / "sft" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000004.ckpt", "step-00000008.ckpt"]
    for name in ("DONE.json", "summary.json"):
        (out / "sft" / name).unlink()
    shutil.rmtree(out / "sft" / "export")
    newest = checkpoints / "step-00000008.ckpt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    state = json.loads((out / "sft" / "stage.json").read_text())
    assert state  # the fingerprint of max_steps=8 differs from 12: reuse the 12-step one
    shutil.copy(clean / "sft" / "stage.json", out / "sft" / "stage.json")
    resumed = _tiny_sft_run(tmp_path, out)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    text = " ".join(resumed.stdout.split())
    assert "step-00000008.ckpt does not load; resuming from the previous one" in text, text
    assert "resuming from" in text and "step-00000004.ckpt" in text
    a = load_file(clean / "sft" / "export" / "model.safetensors")
    b = load_file(out / "sft" / "export" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    # only the newest keep_checkpoints (2) are kept
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-00000008.ckpt", "step-00000012.ckpt"]


def test_no_loadable_checkpoint_is_one_paragraph(tmp_path):
    out = tmp_path / "run"
    assert _tiny_sft_run(tmp_path, out, "stages.sft.trainer.max_steps=8").returncode == 0
    (out / "sft" / "DONE.json").unlink()
    for path in (out / "sft" / "checkpoints").iterdir():
        path.write_bytes(os.urandom(100))
    result = _tiny_sft_run(tmp_path, out, "stages.sft.trainer.max_steps=8")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = " ".join(result.stderr.split())
    assert "no checkpoint in" in message and "step-00000008.ckpt" in message and "step-00000004.ckpt" in message


@pytest.fixture(scope="module")
def finished_sft(tmp_path_factory) -> Path:
    """A finished 12-step SFT run, for tests that damage a copy of it."""
    root = tmp_path_factory.mktemp("finished")
    assert _tiny_sft_run(root, root / "run").returncode == 0
    return root / "run"


@pytest.mark.parametrize("damage", ["empty-done", "binary-done", "missing-export", "cut-export", "bad-stage-json",
                                    "binary-metrics", "nan-step-metrics", "emptied-metrics"])
def test_damaged_run_files_are_recovered(tmp_path, finished_sft, damage):
    """Each damage to a finished stage's files: the re-run either skips a stage that is
    whole or finishes it again from its checkpoint, and ends with the same export, summary
    and metrics as before, with no traceback."""
    out = tmp_path / "run"
    shutil.copytree(finished_sft, out, symlinks=True)
    stage = out / "sft"
    before_rows = read_metrics(stage / "metrics.csv")
    before_summary = json.loads((stage / "summary.json").read_text())
    # copied: load_file maps the file, and the damage below rewrites it in place
    before_weights = {k: v.clone() for k, v in load_file(stage / "export" / "model.safetensors").items()}
    if damage == "empty-done":
        (stage / "DONE.json").write_text("{}")
    elif damage == "binary-done":
        (stage / "DONE.json").write_bytes(b"\xff\xfe\x00garbage")
    elif damage == "missing-export":
        shutil.rmtree(stage / "export")
    elif damage == "cut-export":
        weights = stage / "export" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "bad-stage-json":
        (stage / "DONE.json").unlink()
        (stage / "stage.json").write_bytes(b"\xc3\x28")
    elif damage == "binary-metrics":
        (stage / "DONE.json").unlink()
        (stage / "metrics.csv").write_bytes(b"\x00\xff\xfe" * 100)
    elif damage == "nan-step-metrics":
        (stage / "DONE.json").unlink()
        with open(stage / "metrics.csv", "a") as handle:
            handle.write("nan," + "," * (len(before_rows[0]) - 2) + "\n")
    elif damage == "emptied-metrics":
        (stage / "DONE.json").unlink()
        (stage / "metrics.csv").write_text("")
    result = _tiny_sft_run(tmp_path, out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    after_summary = json.loads((stage / "summary.json").read_text())
    assert {k: v for k, v in after_summary.items() if k not in NOT_COMPARED} == \
        {k: v for k, v in before_summary.items() if k not in NOT_COMPARED}
    after_rows = read_metrics(stage / "metrics.csv")
    assert [r["step"] for r in after_rows] == [r["step"] for r in before_rows]
    for a, b in zip(before_rows, after_rows, strict=True):
        assert {k: v for k, v in a.items() if "_per_s" not in k} == {k: v for k, v in b.items() if "_per_s" not in k}
    after_weights = load_file(stage / "export" / "model.safetensors")
    for name, value in before_weights.items():
        torch.testing.assert_close(value, after_weights[name], rtol=0, atol=1e-6)
    assert json.loads((stage / "DONE.json").read_text())["summary"] == after_summary


def test_stale_temporary_files_are_removed_on_start(tmp_path):
    out = tmp_path / "run"
    assert _tiny_sft_run(tmp_path, out, "stages.sft.trainer.max_steps=4").returncode == 0
    leftovers = [out / "sft" / ".metrics.csv.tmp-abc", out / "sft" / "checkpoints" / ".step-00000008.ckpt.tmp-1-ab",
                 out / "sft" / ".export.old-1234"]
    for path in leftovers[:2]:
        path.write_text("half")
    leftovers[2].mkdir()
    result = _tiny_sft_run(tmp_path, out, "stages.sft.trainer.max_steps=4")
    assert result.returncode == 0
    assert not any(p.exists() for p in leftovers)
    assert "left by an interrupted write" in result.stdout


# ---------------------------------------------------------------- full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 12 MiB tmpfs (needs root, as CI and the development machines run); skipped where
    mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)], capture_output=True,
                          check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_fails_cleanly_and_resumes_once_space_is_freed(tmp_path, small_disk):
    """The run directory on a small filesystem that a filler file fills up: exit 2 with
    a paragraph (what was being written, free space, how to resume), no temporary file
    left, the last checkpoint intact; freed, the same command resumes and finishes."""
    out = small_disk / "run"
    args = ["stages.sft.trainer.max_steps=40", "stages.sft.trainer.checkpoint_every_n_steps=4"]
    # room for the first checkpoint and half of the second: the second write fails
    probe = tmp_path / "probe"
    assert _tiny_sft_run(tmp_path, probe, "stages.sft.trainer.max_steps=4").returncode == 0
    size = next((probe / "sft" / "checkpoints").glob("step-*.ckpt")).stat().st_size
    filler = small_disk / "filler"
    stats = os.statvfs(small_disk)
    filler.write_bytes(b"\0" * (stats.f_bavail * stats.f_frsize - int(1.5 * size) - 64 * 1024))
    result = cli("run", SFT, *TINY_SFT, *args, f"run.dir={out}", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    message = " ".join(result.stderr.split())
    assert "is full" in message and "MiB free" in message and "re-run the same command to resume" in message, message
    leftovers = [p for p in out.rglob(".*") if ".tmp-" in p.name]
    assert not leftovers, leftovers
    checkpoints = sorted((out / "sft" / "checkpoints").glob("step-*.ckpt"))
    assert checkpoints, "no checkpoint was written before the disk filled"
    assert torch.load(checkpoints[-1], weights_only=True)["global_step"] > 0
    filler.unlink()
    resumed = cli("run", SFT, *TINY_SFT, *args, f"run.dir={out}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming from" in resumed.stdout
    assert (out / "sft" / "DONE.json").exists()
    rows = read_metrics(out / "sft" / "metrics.csv")
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert steps == list(range(1, 41))


# ---------------------------------------------------------------- environment


def test_stale_rank_variables_do_not_change_a_one_device_run(tmp_path):
    clean, stale = tmp_path / "clean", tmp_path / "stale"
    assert _tiny_sft_run(tmp_path, clean, "stages.sft.trainer.max_steps=4").returncode == 0
    result = cli("run", SFT, *TINY_SFT, "stages.sft.trainer.max_steps=4",
                 "stages.sft.trainer.checkpoint_every_n_steps=4", f"run.dir={stale}", cwd=tmp_path,
                 env={"RANK": "3", "LOCAL_RANK": "1", "NODE_RANK": "2", "WORLD_SIZE": "8"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ignoring RANK=3" in " ".join(result.stdout.split())
    a = load_file(clean / "sft" / "export" / "model.safetensors")
    b = load_file(stale / "sft" / "export" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_rank_variables_that_do_not_fit_a_multi_device_recipe_are_an_error(tmp_path):
    result = cli("run", SFT, *TINY_SFT, "stages.sft.trainer.devices=2", "stages.sft.trainer.strategy=ddp",
                 f"run.dir={tmp_path / 'run'}", cwd=tmp_path, env={"LOCAL_RANK": "5"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "LOCAL_RANK='5'" in result.stderr and "Unset LOCAL_RANK" in result.stderr



# ---------------------------------------------------------------- Ctrl-C


def test_ctrl_c_is_one_line_and_exit_130_and_the_resume_does_not_warn(tmp_path):
    out = tmp_path / "run"
    # long enough that the interrupt lands in training: 400 tiny steps take about 2 s
    args = ["run", SFT, *TINY_SFT, "stages.sft.trainer.max_steps=3000", "stages.sft.trainer.checkpoint_every_n_steps=20",
            f"run.dir={out}"]
    # a shell's background job (a CI script run with `&`) ignores SIGINT and its children inherit that, while a
    # terminal's Ctrl-C reaches a process whose SIGINT is at its default: handled here, so it is default after exec
    ignored = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen([sys.executable, "-m", "rlhfkit", *args], cwd=tmp_path, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True, start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, ignored)
    deadline = time.time() + 120
    while not list(out.glob("sft/checkpoints/step-*.ckpt")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted at step ") and "of stage 'sft'" in lines[0], err
    assert "re-run the same command to resume from" in lines[0] and "step-" in lines[0]
    resumed = cli(*args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming from" in resumed.stdout
    assert "not resumable" not in resumed.stdout + resumed.stderr  # the step-indexed loader is exact on resume
