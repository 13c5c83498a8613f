"""SFT end to end: learning, export, samples, skip on re-run, exact resume after kill -9,
and DDP with two CPU processes against one process at the same global batch."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch
from helpers import RECIPES, TINY_SFT, cli, column, popen, read_metrics
from safetensors.torch import load_file

QUICKSTART = str(RECIPES / "sft.yaml")


def run_dir_of(tmp_path, name):
    return tmp_path / "runs" / name


def test_sft_learns_exports_and_skips_when_done(tmp_path):
    out = run_dir_of(tmp_path, "learn")
    args = ["run", QUICKSTART, *TINY_SFT, f"run.dir={out}", "stages.sft.trainer.max_steps=40"]
    result = cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "sft" / "summary.json").read_text())
    # held-out perplexity falls (an untrained model is near the vocabulary size)
    assert summary["perplexity_after"] < summary["perplexity_before"] / 3
    rows = read_metrics(out / "sft" / "metrics.csv")
    losses = column(rows, "train/loss")
    assert sorted(losses) == list(range(1, 41))  # one row per optimizer step, steps 1..40
    assert losses[40] < losses[1]
    samples = [json.loads(line) for line in (out / "sft" / "samples.jsonl").read_text().splitlines()]
    assert [s["when"] for s in samples] == ["before", "before", "after", "after"]
    assert (out / "recipe.yaml").is_file()

    # the export is a plain transformers model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "sft" / "export")
    tokenizer = AutoTokenizer.from_pretrained(out / "sft" / "export")
    prompt = tokenizer(samples[0]["prompt"], return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(generated[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.strip() == samples[2]["response"]

    # running the same command again is a no-op
    started = time.perf_counter()
    again = cli(*args, cwd=tmp_path)
    assert again.returncode == 0
    assert "already finished" in again.stdout
    assert len(read_metrics(out / "sft" / "metrics.csv")) == len(rows)
    # ...but a changed stage is refused rather than silently mixed
    changed = cli(*args[:-1], "stages.sft.trainer.max_steps=41", cwd=tmp_path)
    assert changed.returncode == 2 and "different settings" in changed.stderr
    assert time.perf_counter() - started < 120


def test_kill_and_resume_gives_the_same_weights(tmp_path):
    """kill -9 mid-run, re-run the same command: it resumes from the last checkpoint and
    the final weights equal those of an uninterrupted run (dropout on, so the restored RNG
    state matters; deterministic CPU settings)."""
    # long enough that the kill, half a second after the first checkpoint, lands mid-run on a fast machine
    total = 200
    steps = [f"stages.sft.trainer.max_steps={total}", "stages.sft.trainer.checkpoint_every_n_steps=10"]
    clean = run_dir_of(tmp_path, "clean")
    result = cli("run", QUICKSTART, *TINY_SFT, *steps, f"run.dir={clean}", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr

    killed = run_dir_of(tmp_path, "killed")
    args = ["run", QUICKSTART, *TINY_SFT, *steps, f"run.dir={killed}"]
    process = popen(*args, cwd=tmp_path)
    checkpoints = killed / "sft" / "checkpoints"
    deadline = time.time() + 300
    while not any(checkpoints.glob("step-*.ckpt")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # let it get past the checkpoint, into the next steps
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert any(checkpoints.glob("step-*.ckpt")), "the run ended before its first checkpoint"
    assert not (killed / "sft" / "DONE.json").exists(), "the run finished before it was killed"
    saved_step = torch.load(max(checkpoints.glob("step-*.ckpt")), weights_only=True)["global_step"]
    assert 10 <= saved_step < total

    resumed = cli(*args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming from" in resumed.stdout

    a = load_file(clean / "sft" / "export" / "model.safetensors")
    b = load_file(killed / "sft" / "export" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        # bit-identical when both processes pick the same float kernels; MKL/oneDNN may choose by
        # memory alignment, which differs between processes, so allow the last bits
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    # the metrics of the steps logged twice (after the checkpoint, before the kill) are not
    # duplicated, and the checkpoint's own step kept its row
    rows_clean = read_metrics(clean / "sft" / "metrics.csv")
    rows_killed = read_metrics(killed / "sft" / "metrics.csv")
    assert [r["step"] for r in rows_killed] == [r["step"] for r in rows_clean]
    losses_clean = column(rows_clean, "train/loss")
    losses_killed = column(rows_killed, "train/loss")
    for step, value in losses_clean.items():
        assert losses_killed[step] == pytest.approx(value, rel=1e-5), step


@pytest.mark.parametrize("devices", [2])
def test_ddp_matches_one_process(tmp_path, devices):
    """Two CPU processes (gloo) at the same global batch as one process give the same
    loss curve. Dropout is off (each rank draws its own masks). Tolerance: 1e-5 relative
    on every step's loss; the only difference is the order of float additions in the
    gradient all-reduce."""
    common = [*TINY_SFT, "stages.sft.trainer.max_steps=12", "stages.sft.policy.architecture.dropout=0"]
    one = run_dir_of(tmp_path, "one")
    result = cli("run", QUICKSTART, *common, f"run.dir={one}", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    two = run_dir_of(tmp_path, "two")
    result = cli("run", QUICKSTART, *common, f"run.dir={two}", f"stages.sft.trainer.devices={devices}",
                 "stages.sft.trainer.strategy=ddp", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    loss_one = column(read_metrics(one / "sft" / "metrics.csv"), "train/loss")
    loss_two = column(read_metrics(two / "sft" / "metrics.csv"), "train/loss")
    assert sorted(loss_one) == sorted(loss_two) == list(range(1, 13))
    for step, value in loss_one.items():
        assert loss_two[step] == pytest.approx(value, rel=1e-5), step
    ppl_one = json.loads((one / "sft" / "summary.json").read_text())["perplexity_after"]
    ppl_two = json.loads((two / "sft" / "summary.json").read_text())["perplexity_after"]
    assert ppl_two == pytest.approx(ppl_one, rel=1e-4)
