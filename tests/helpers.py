"""Shared helpers for tests that run the rlhfkit CLI in a subprocess."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"

# A small, fast SFT configuration of recipes/sft.yaml for tests.
TINY_SFT = [
    "stages.sft.policy.architecture.layers=1",
    "stages.sft.policy.architecture.hidden=32",
    "stages.sft.policy.architecture.heads=2",
    "stages.sft.algorithm.lr=5e-3",
    "stages.sft.algorithm.warmup_steps=5",
    "stages.sft.trainer.batch_size=16",
    "stages.sft.trainer.micro_batch_size=8",
    "stages.sft.trainer.log_every_n_steps=1",
    "stages.sft.trainer.eval_every_n_steps=null",
    "stages.sft.algorithm.sample_prompts=2",
    "stages.sft.algorithm.sample_max_new_tokens=8",
    "stages.sft.eval_data.limit=64",
]


def cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m rlhfkit ARGS`` and capture its output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "rlhfkit", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def popen(*args: str, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rlhfkit", *args], cwd=cwd,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def kill_after_checkpoint(*args: str, checkpoints: Path, step: int, cwd: Path | None = None,
                          timeout: float = 300) -> None:
    """Start ``rlhfkit ARGS`` and kill -9 its process group once ``checkpoints`` holds a
    checkpoint of step ``step`` or later (or the run ended, or ``timeout`` passed)."""
    process = popen(*args, cwd=cwd)
    deadline = time.time() + timeout
    while process.poll() is None and time.time() < deadline:
        if any(int(p.stem.split("-")[1]) >= step for p in checkpoints.glob("step-*.ckpt")):
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def read_metrics(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def column(rows: list[dict[str, str]], name: str) -> dict[int, float]:
    """``{step: value}`` of one metric column (rows where it was logged)."""
    return {int(float(r["step"])): float(r[name]) for r in rows if r.get(name)}


def pip_install(source: Path, target: Path) -> None:
    """Install the distribution at ``source`` into ``target`` without network access."""
    # Built from a copy: an in-tree build leaves build/ and *.egg-info/ next to the source.
    copy = target.parent / f"{source.name}-src"
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--no-deps", "--no-build-isolation", "--no-index", "--no-cache-dir",
         "--target", str(target), str(copy)],
        check=False, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, f"pip could not install {source.name}:\n{result.stderr}"
