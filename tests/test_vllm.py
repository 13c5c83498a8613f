"""The ``vllm`` engine end to end (marker ``vllm``: needs vLLM, in this environment or in
another one named by ``RLHFKIT_VLLM_PYTHON``; .ci/run sets one up).

GRPO and PPO recipes run with ``engine: vllm`` on CPU, the weight-sync check passing
after every update (``check: every``), with a tied-embedding GPT-2 and with LoRA; the gold
score rises as it does with ``hf``; killing the trainer leaves no engine behind and a
re-run resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import RECIPES, cli, column, popen, read_metrics

pytestmark = pytest.mark.vllm


def vllm_python() -> str:
    """The engine's interpreter; a named one (RLHFKIT_VLLM_PYTHON, as .ci/run sets) must have
    vLLM, else these tests fail rather than skip."""
    named = os.environ.get("RLHFKIT_VLLM_PYTHON")
    python = named or sys.executable
    found = subprocess.run([python, "-c", "import vllm"], capture_output=True, text=True, check=False)
    if found.returncode != 0:
        message = f"vLLM is not importable with {python} (set RLHFKIT_VLLM_PYTHON; see docs/engines.md)"
        if named:
            pytest.fail(message + ":\n" + found.stderr[-2000:])
        pytest.skip(message)
    return python


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """A small SFT model whose attention heads vLLM's CPU kernels take (head size 32:
    hidden 64, 2 heads), with tied input/output embeddings (GPT-2's default). The RL
    stages optimise the task's gold score itself, so that learning shows in a few steps."""
    vllm_python()
    root = tmp_path_factory.mktemp("sft-vllm")
    result = cli("run", str(RECIPES / "sft.yaml"), f"run.dir={root}",
                 "stages.sft.policy.architecture.layers=1", "stages.sft.policy.architecture.hidden=64",
                 "stages.sft.policy.architecture.heads=2", "stages.sft.algorithm.lr=3e-3",
                 "stages.sft.trainer.max_steps=80", "stages.sft.trainer.batch_size=16",
                 "stages.sft.trainer.micro_batch_size=16", "stages.sft.trainer.eval_every_n_steps=null",
                 "stages.sft.algorithm.sample_prompts=0", "stages.sft.eval_data.limit=32", cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    return {"sft": root / "sft" / "export"}


RECIPE = """\
run: {{name: vllm-test, seed: 0}}
stages:
  rl:
    algorithm:
      name: ppo
      lr: {lr}
      prompts_per_iteration: {prompts}
      samples_per_prompt: {samples}
      epochs: {epochs}
      sampling: {{max_new_tokens: 12}}
      max_prompt_length: 24
      eval_prompts: 64
      eval_greedy: false
      sample_prompts: 2
    policy: {policy}
    engine: {engine}
    reward: {{name: gold, task: reviews}}
    estimator: {estimator}
    objective: ppo-clip
    constraints: {constraints}
    data: {{name: builtin, task: reviews, split: prompts}}
    eval_data: {{name: builtin, task: reviews, split: prompts-eval}}
    gold: {{name: gold, task: reviews}}
    trainer: {{batch_size: {batch}, micro_batch_size: {micro}, max_steps: {steps}, log_every_n_steps: 1,
              checkpoint_every_n_steps: 2, accelerator: {accelerator}}}
"""
GRPO = {"lr": "1.0e-3", "prompts": 16, "samples": 4, "epochs": 1, "estimator": "grpo", "batch": 64, "micro": 32, "steps": 16,
        "constraints": "[{name: kl, coef: 0.01, placement: loss, estimator: k3}]"}
PPO_LORA = {"lr": "3.0e-3", "prompts": 8, "samples": 1, "epochs": 2, "batch": 8, "micro": 8, "steps": 6,
            "estimator": "{name: gae, critic: {name: transformers, path: SFT, dropout: 0.0}}",
            "constraints": "[{name: kl, coef: 0.05}]"}


def vllm_engine(check: str = "every") -> str:
    return f"{{name: vllm, python: {vllm_python()}, kv_cache_gb: 0.5, check: {check}, check_tolerance: 1.0e-4}}"


def write(tmp_path: Path, exports: dict[str, Path], name: str, engine: str, lora: bool = False, **settings) -> Path:
    policy = f"{{name: transformers, path: {exports['sft']}, dropout: 0.0" + (
        ", lora: {r: 8, alpha: 16}}" if lora else "}")
    settings["estimator"] = settings["estimator"].replace("SFT", str(exports["sft"]))
    path = tmp_path / f"{name}.yaml"
    # benchmarks/gpu_check.sh runs these with the trainer on a GPU
    accelerator = os.environ.get("RLHFKIT_TEST_ACCELERATOR", "cpu")
    path.write_text(RECIPE.format(policy=policy, engine=engine, accelerator=accelerator, **settings))
    return path


def run(recipe: Path, out: Path) -> dict:
    result = cli("run", str(recipe), f"run.dir={out}", cwd=recipe.parent, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((out / "rl" / "summary.json").read_text())


def test_grpo_with_vllm_learns_as_with_hf(tmp_path, exports):
    summaries = {}
    for engine in ("hf", "vllm"):
        recipe = write(tmp_path, exports, engine, "hf" if engine == "hf" else vllm_engine(), **GRPO)
        summaries[engine] = run(recipe, tmp_path / engine)
    for engine, summary in summaries.items():
        assert summary["gold"] > summary["before_gold"] + 0.05, (engine, summary)
    rows = read_metrics(tmp_path / "vllm" / "rl" / "metrics.csv")
    gaps = column(rows, "mismatch/logprob_abs_mean")
    assert sorted(gaps) == list(range(16)), gaps  # every iteration, after every weight push, checked
    assert max(gaps.values()) < 1e-4
    assert column(rows, "speed/weight_sync_s")
    log = (tmp_path / "vllm" / "rl" / "engine" / "engine.log").read_text()
    assert "Resolved architecture: GPT2LMHeadModel" in log


def test_ppo_with_lora_and_vllm(tmp_path, exports):
    recipe = write(tmp_path, exports, "ppo", vllm_engine(), lora=True, **PPO_LORA)
    summary = run(recipe, tmp_path / "ppo")
    assert summary["steps"] == 6
    gaps = column(read_metrics(tmp_path / "ppo" / "rl" / "metrics.csv"), "mismatch/logprob_abs_mean")
    assert len(gaps) == 3 and max(gaps.values()) < 1e-4  # the merged LoRA weights reached the engine


def engine_processes(run_dir: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
                cwd = os.readlink(entry / "cwd")
            except OSError:
                continue
            if "vllm_server.py" in cmdline and cwd.startswith(str(run_dir)):
                pids.append(int(entry.name))
    return pids


def test_killing_the_trainer_stops_its_engine_and_a_rerun_resumes(tmp_path, exports):
    recipe = write(tmp_path, exports, "killed", vllm_engine(check="first"), **{**GRPO, "steps": 6})
    out = tmp_path / "killed"
    process = popen("run", str(recipe), f"run.dir={out}", cwd=tmp_path)
    checkpoints = out / "rl" / "checkpoints"
    deadline = time.time() + 600
    while process.poll() is None and time.time() < deadline and not list(checkpoints.glob("step-*.ckpt")):
        time.sleep(0.1)
    assert engine_processes(out), "the engine was not running"
    os.kill(process.pid, signal.SIGKILL)  # the trainer alone, as an out-of-memory kill would
    process.wait()
    deadline = time.time() + 60
    while engine_processes(out) and time.time() < deadline:
        time.sleep(0.5)
    assert not engine_processes(out), "the engine outlived its trainer"
    summary = run(recipe, out)
    assert summary["steps"] == 6
    rows = read_metrics(out / "rl" / "metrics.csv")
    assert max(column(rows, "mismatch/logprob_abs_mean").values()) < 1e-4


def test_the_vllm_engine_keeps_the_engine_contract():
    from rlhfkit.testing import check_component

    check_component("engine", "vllm", {"python": vllm_python(), "kv_cache_gb": 0.5})


ONLINE_DPO = """\
run: {{name: online-dpo-vllm, seed: 0}}
stages:
  dpo:
    algorithm: {{name: dpo, lr: 5.0e-4, max_length: 48, online: {{max_new_tokens: 12}}}}
    policy: {{name: transformers, path: {sft}, dropout: 0.0}}
    engine: {engine}
    objective: {{name: dpo, beta: 0.1}}
    reward: {{name: gold, task: reviews}}
    data: {{name: builtin, task: reviews, split: prompts}}
    trainer: {{max_steps: 4, batch_size: 16, micro_batch_size: 16, log_every_n_steps: 1}}
"""


def test_online_dpo_samples_through_the_same_engine(tmp_path, exports):
    recipe = tmp_path / "online-dpo.yaml"
    recipe.write_text(ONLINE_DPO.format(sft=exports["sft"], engine=vllm_engine()))
    out = tmp_path / "run"
    result = cli("run", str(recipe), f"run.dir={out}", cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = read_metrics(out / "dpo" / "metrics.csv")
    assert sorted(column(rows, "train/online/pairs")) == [1, 2, 3, 4]
    log = (out / "dpo" / "engine" / "engine.log").read_text()
    assert log.count("Reloading and processing weights took") == 4  # the start, then after each of 3 updates
