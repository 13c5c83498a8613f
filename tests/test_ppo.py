"""PPO end to end on tiny models: every constraint at once, kill -9 and exact resume,
DDP with two CPU processes against one, NaN guardrails and batch-size errors.

The session fixture ``exports`` (conftest.py) trains a tiny SFT model and reward model
once; each test runs a PPO stage on their exports from a recipe it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import cli, kill_after_checkpoint, read_metrics
from safetensors.torch import load_file

PPO_RECIPE = """\
run: {{name: ppo-test, seed: 0}}
stages:
  ppo:
    algorithm:
      name: ppo
      lr: 1.0e-4
      warmup_steps: 1
      prompts_per_iteration: 16
      epochs: 2
      generation_batch_size: 8
      sampling: {{max_new_tokens: 12}}
      max_prompt_length: 24
      eval_prompts: 16
      sample_prompts: 2
    policy: {{name: transformers, path: {sft}, dropout: 0.0}}
    reward: {{name: reward-model, path: {rm}, max_length: 48}}
    estimator:
      name: gae
      critic: {{name: transformers, path: {rm}, dropout: 0.0}}
      optimizer: {{lr: 3.0e-4, warmup_steps: 1}}
    objective: ppo-clip
    constraints: {constraints}
    data: {{name: builtin, task: reviews, split: prompts}}
    eval_data: {{name: builtin, task: reviews, split: prompts-eval}}
    gold: {{name: gold, task: reviews}}
    trainer: {{batch_size: 8, micro_batch_size: 4, max_steps: 12, log_every_n_steps: 1, checkpoint_every_n_steps: 3}}
"""
ALL_CONSTRAINTS = """
      - {name: reward-norm}
      - {name: missing-eos, penalty: 0.5}
      - {name: kl, coef: 0.05, adaptive: {target: 1.0, horizon: 100}}
      - {name: entropy, coef: 0.001}
      - {name: ptx, coef: 0.1, batch_size: 4, data: {name: builtin, task: reviews, split: pretrain}}
      - {name: reference-ema, rate: 0.01}"""
KL_ONLY = "[{name: kl, coef: 0.05}]"


def write_recipe(directory: Path, exports: dict[str, Path], constraints: str = ALL_CONSTRAINTS) -> str:
    path = directory / "ppo.yaml"
    path.write_text(PPO_RECIPE.format(sft=exports["sft"], rm=exports["rm"], constraints=constraints))
    return str(path)


def rows_by_step(path: Path) -> dict[int, dict[str, float]]:
    return {int(float(r["step"])): {k: float(v) for k, v in r.items() if v != "" and k != "step"}
            for r in read_metrics(path)}


def test_ppo_with_every_constraint(tmp_path, exports):
    recipe = write_recipe(tmp_path, exports)
    out = tmp_path / "run"
    result = cli("run", recipe, f"run.dir={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 iterations x 4 updates" in result.stdout
    rows = rows_by_step(out / "ppo" / "metrics.csv")
    assert sorted(s for s, r in rows.items() if "train/policy/loss" in r) == list(range(1, 13))
    rollout_steps = sorted(s for s, r in rows.items() if "reward/score" in r)
    assert rollout_steps == [0, 4, 8]  # one rollout per iteration, logged when sampled
    every = [
        "reward/score", "gold/score", "kl/ref", "response/length", "response/eos_rate", "response/perplexity",
        "advantage/mean", "return/mean", "value/explained_variance", "reward_norm/mean", "missing_eos/rate",
        "kl/coef", "kl/penalty",
    ]
    for name in every:
        assert name in rows[4], name
    for name in ("train/policy/loss", "train/policy/clip_fraction", "train/policy/approx_kl", "train/value/loss",
                 "train/entropy/term", "train/ptx/nll", "train/grad_norm"):
        assert name in rows[5], name
    assert all(name in rows[4] for name in ("kl/coef_next", "reference_ema/distance"))
    assert rows[4]["kl/coef_next"] != pytest.approx(0.05)  # the adaptive controller moved
    summary = json.loads((out / "ppo" / "summary.json").read_text())
    assert summary["iterations"] == 3 and "before_gold" in summary and "gold" in summary
    samples = [json.loads(line) for line in (out / "ppo" / "samples.jsonl").read_text().splitlines()]
    assert [s["when"] for s in samples] == ["before", "before", "after", "after"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "ppo" / "export", local_files_only=True)


def test_kill_and_resume_gives_the_same_run(tmp_path, exports):
    """kill -9 after a mid-iteration checkpoint, re-run: the final weights and every
    metric (timings aside) equal an uninterrupted run's."""
    recipe = write_recipe(tmp_path, exports)
    clean = tmp_path / "clean"
    result = cli("run", recipe, f"run.dir={clean}", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    killed = tmp_path / "killed"
    checkpoints = killed / "ppo" / "checkpoints"
    kill_after_checkpoint("run", recipe, f"run.dir={killed}", checkpoints=checkpoints, step=3, cwd=tmp_path)
    saved = torch.load(max(checkpoints.glob("step-*.ckpt")), weights_only=True)
    assert 3 <= saved["global_step"] < 12 and not (killed / "ppo" / "DONE.json").exists()
    resumed = cli("run", recipe, f"run.dir={killed}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming from" in resumed.stdout
    a = load_file(clean / "ppo" / "export" / "model.safetensors")
    b = load_file(killed / "ppo" / "export" / "model.safetensors")
    for name in a:  # see tests/test_sft.py: the last bits may differ between processes
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    rows_a, rows_b = rows_by_step(clean / "ppo" / "metrics.csv"), rows_by_step(killed / "ppo" / "metrics.csv")
    assert rows_a.keys() == rows_b.keys()
    for step, row in rows_a.items():
        for name, value in row.items():
            if not name.startswith("speed/"):
                assert rows_b[step][name] == pytest.approx(value, rel=1e-5, abs=1e-7), (step, name)


KL_IN_LOSS = "[{name: kl, coef: 0.05, placement: loss}]"


@pytest.mark.parametrize(("devices", "constraints"), [(2, KL_ONLY), (2, KL_IN_LOSS)])
def test_ddp_matches_one_process(tmp_path, exports, devices, constraints):
    """Two CPU processes (gloo) against one: the rollouts are the same (each generate
    call is seeded by iteration and call), so rewards, KL and gold agree within 1e-4
    and every step's losses within 1e-3 relative (float summation order differs in the
    all-reduce and in forwards over differently padded batches). With the KL in the loss
    nothing reads the old log-probs before the updates: the first minibatch's come from
    its update, each rank its own rows, gathered for the second epoch's minibatches."""
    recipe = write_recipe(tmp_path, exports, constraints)
    one, two = tmp_path / "one", tmp_path / "two"
    result = cli("run", recipe, f"run.dir={one}", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    result = cli("run", recipe, f"run.dir={two}", f"stages.ppo.trainer.devices={devices}",
                 "stages.ppo.trainer.strategy=ddp", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    rows_one, rows_two = rows_by_step(one / "ppo" / "metrics.csv"), rows_by_step(two / "ppo" / "metrics.csv")
    assert rows_one.keys() == rows_two.keys()
    for step, row in rows_one.items():
        for name, value in row.items():
            if name.startswith(("reward/", "gold/", "kl/", "response/length", "eval/")):
                assert rows_two[step][name] == pytest.approx(value, abs=1e-4), (step, name)
            elif name in ("train/policy/loss", "train/value/loss"):
                assert rows_two[step][name] == pytest.approx(value, rel=1e-3, abs=1e-5), (step, name)


def test_nan_reward_stops_with_a_clear_error_or_is_skipped(tmp_path, exports):
    recipe = write_recipe(tmp_path, exports, KL_ONLY)
    nan_reward = "stages.ppo.reward={name: composite, terms: [{reward: {name: gold, task: reviews}, weight: .nan}]}"
    result = cli("run", recipe, f"run.dir={tmp_path / 'stop'}", nan_reward, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "NaN/Inf for 16 of 16 responses at iteration 0" in result.stderr
    assert "trainer.on_nan: skip" in result.stderr and "Traceback" not in result.stderr
    result = cli("run", recipe, f"run.dir={tmp_path / 'skip'}", nan_reward, "stages.ppo.algorithm.on_nan=skip",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Skipping this iteration's updates" in result.stderr
    # every update was skipped, so the policy is the SFT model
    before = load_file(exports["sft"] / "model.safetensors")
    after = load_file(tmp_path / "skip" / "ppo" / "export" / "model.safetensors")
    for name in before:
        assert torch.equal(before[name], after[name]), name


def test_batch_sizes_are_checked_against_each_other(tmp_path, exports):
    recipe = write_recipe(tmp_path, exports, KL_ONLY)
    result = cli("run", recipe, f"run.dir={tmp_path / 'a'}", "stages.ppo.trainer.batch_size=12",
                 "stages.ppo.trainer.micro_batch_size=4", cwd=tmp_path)
    assert result.returncode == 2 and "do not split into minibatches of trainer.batch_size 12" in result.stderr
    result = cli("run", recipe, f"run.dir={tmp_path / 'b'}", "stages.ppo.trainer.max_steps=10", cwd=tmp_path)
    assert result.returncode == 2 and "an iteration is 4 of them" in result.stderr


def test_variants_run_end_to_end(tmp_path, exports):
    """Score one past EOS, minibatch whitening with a clip, DAPO's global token mean, the
    dual clip, k3 KL in the loss and a critic warm-up: the run finishes with finite losses."""
    recipe = write_recipe(tmp_path, exports, "[{name: kl, placement: loss, estimator: k3, coef: 0.1}]")
    out = tmp_path / "run"
    result = cli("run", recipe, f"run.dir={out}", "stages.ppo.trainer.max_steps=8",
                 "stages.ppo.algorithm.score_position=after-eos", "stages.ppo.algorithm.advantages.whiten=minibatch",
                 "stages.ppo.algorithm.advantages.clip=2.0", "stages.ppo.objective.aggregation=global-token-mean",
                 "stages.ppo.objective.dual_clip=3.0", "stages.ppo.estimator.warmup_iterations=1", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = rows_by_step(out / "ppo" / "metrics.csv")
    losses = [r["train/policy/loss"] for s, r in rows.items() if "train/policy/loss" in r]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert all("train/kl/loss_estimate" in rows[s] for s in range(1, 9))
    # the warm-up iteration left the policy alone: its first 4 steps have no policy gradient
    assert all(abs(rows[s]["train/policy/approx_kl"]) < 1e-6 for s in range(1, 5))


def test_guardrails_warn_with_a_pointer_to_the_docs():
    from rlhfkit.plugins.ppo.monitor import guardrail_warnings

    responses = ["", "", "good good good good good good good good", "a"]
    warnings = guardrail_warnings(responses, -0.5, torch.tensor([1.0, 1.0, 8.0, 1.0]))
    kinds = [kind for kind, _ in warnings]
    assert kinds == ["negative-kl", "collapse-empty"]
    assert all("docs/ppo-details.md#" in message for _, message in warnings)
    warnings = guardrail_warnings(["x y " * 6] * 3 + ["fine answer here"], 0.1, torch.tensor([12.0, 12.0, 12.0, 3.0]))
    assert [kind for kind, _ in warnings] == ["collapse-repeat"]
