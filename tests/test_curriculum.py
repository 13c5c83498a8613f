"""The prompt samplers: curriculum (hand cases, state, exact resume of a run) and shuffle."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from helpers import cli, kill_after_checkpoint, read_metrics

import rlhfkit
from rlhfkit import StageContext, UserError, ref
from rlhfkit.plugins.ppo import schedule

PLUGINS = rlhfkit.load_plugins()
LEVELS = [1, 1, 2, 2, 3, 3]


def build(name: str = "curriculum", **settings):
    sampler = StageContext(registry=PLUGINS.registry).build(ref("sampler")(name=name, **settings))
    sampler.bind(SimpleNamespace(prompts=["p"] * len(LEVELS), prompt_fields=[{"level": n} for n in LEVELS], seed=0))
    return sampler


def test_warm_up_draws_are_uniform_and_seeded():
    sampler = build(warmup_iterations=1)
    assert sampler.draw(0, 3) == random.Random("curriculum/0/0/0").sample(range(6), 3)
    assert sampler.draw(0, 3, round=1) == random.Random("curriculum/0/0/1").sample(range(6), 3)


def test_pass_rates_by_prompt_and_level_by_hand():
    sampler = build(warmup_iterations=1, exploration=0.25)
    sampler.draw(0, 2)
    metrics = sampler.observe([0, 2], torch.tensor([[1.0, 1, 1, 1], [1, 0, 0, 0]]))
    # prompt 0 passes 4/4, prompt 2 1/4 (scores above 0.5); levels 1 and 2 take those rates
    assert sampler.rates == {0: 1.0, 2: 0.25} and sampler.level_rates == {"1": 1.0, "2": 0.25}
    assert metrics["curriculum/pass_rate/level1"] == 1.0 and metrics["curriculum/pass_rate/level2"] == 0.25
    # in the band (0, 1): prompt 2 (0.25), prompt 3 (its level's 0.25), prompts 4 and 5 (never seen)
    assert [sampler.in_band(i) for i in range(6)] == [False, False, True, True, True, True]
    assert metrics["curriculum/in_band"] == pytest.approx(4 / 6)
    # 4 prompts with exploration 0.25: 3 from the band, 1 from the rest
    rng = random.Random("curriculum/0/1/0")
    band = rng.sample([2, 3, 4, 5], 3)
    rest = rng.sample([i for i in range(6) if i not in band], 1)
    assert sampler.draw(1, 4) == band + rest
    # an exponential average with decay 0.5
    sampler.observe([2], torch.tensor([[1.0, 1, 1, 1]]))
    assert sampler.rates[2] == pytest.approx(0.5 * 1.0 + 0.5 * 0.25)
    assert sampler.level_rates["2"] == pytest.approx(0.625)


def test_the_band_and_the_share_drawn_per_level():
    sampler = build(warmup_iterations=0, exploration=0.0, band=(0.2, 0.8))
    sampler.observe([0, 1, 2, 3, 4, 5], torch.tensor([[1.0, 1], [1, 1], [1, 0], [0, 1], [0, 0], [0, 0]]))
    assert sorted(sampler.draw(3, 2)) == [2, 3]  # only level 2 (rate 0.5) is inside (0.2, 0.8)
    drawn = sampler.draw(3, 4)  # the band holds 2: the other 2 come from the rest
    assert set(drawn[:2]) == {2, 3} and not set(drawn[2:]) & {2, 3}
    metrics = sampler.observe(drawn, torch.zeros(4, 2))
    levels = [LEVELS[i] for i in drawn]
    assert metrics["curriculum/drawn/level2"] == levels.count(2) / 4


def test_state_round_trip_gives_the_same_draws():
    sampler = build(warmup_iterations=0)
    sampler.observe([0, 3, 5], torch.tensor([[1.0, 0], [1, 1], [0, 0]]))
    restored = build(warmup_iterations=0)
    restored.load_state_dict(sampler.state_dict())
    assert restored.draw(7, 3) == sampler.draw(7, 3)
    assert restored.rates == sampler.rates and restored.level_rates == sampler.level_rates


def test_more_prompts_than_the_data_has_is_a_clear_error():
    with pytest.raises(UserError, match="prompts_per_iteration 7 is more than the 6 prompts"):
        build().draw(0, 7)


def test_shuffle_is_the_default_order():
    sampler = build("shuffle")
    assert sampler.draw(2, 4) == schedule.iteration_prompts(6, 4, 0, 2)


@pytest.mark.parametrize("settings,message", [({"band": [0.5, 0.5]}, "band"), ({"exploration": 2}, "exploration")])
def test_bad_settings(settings, message):
    with pytest.raises(UserError, match=message):
        build(**settings)


RECIPE = """\
run: {name: curriculum, seed: 0}
stages:
  grpo:
    algorithm:
      name: ppo
      lr: 1.0e-3
      prompts_per_iteration: 4
      samples_per_prompt: 4
      sampling: {max_new_tokens: 12}
      max_prompt_length: 32
      eval_prompts: 20
      sample_prompts: 0
      advantages: {whiten: none}
    policy: {name: transformers, tokenizer: {task: reasoning}, dropout: 0.0, architecture: {layers: 1, hidden: 32, heads: 2}}
    reward: {name: format, pattern: 'plus|minus'}
    estimator: grpo
    objective: ppo-clip
    sampler: {name: curriculum, warmup_iterations: 1}
    data: {name: builtin, task: reasoning, split: prompts}
    eval_data: {name: builtin, task: reasoning, split: prompts-eval}
    gold: {name: gold, task: reasoning}
    trainer: {batch_size: 16, micro_batch_size: 16, max_steps: 10, log_every_n_steps: 1, checkpoint_every_n_steps: 2}
"""


def test_a_curriculum_run_resumes_exactly(tmp_path):
    """kill -9 after a checkpoint, re-run: the draws and metrics equal an uninterrupted run's
    (the sampler's rates are in the checkpoint). The reward (does a response say "plus" or
    "minus") varies within groups of the untrained model, so the band has prompts in it."""
    (tmp_path / "r.yaml").write_text(RECIPE)
    clean = tmp_path / "clean"
    result = cli("run", "r.yaml", f"run.dir={clean}", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    killed = tmp_path / "killed"
    kill_after_checkpoint("run", "r.yaml", f"run.dir={killed}", checkpoints=killed / "grpo" / "checkpoints", step=4,
                          cwd=tmp_path)
    assert not (killed / "grpo" / "DONE.json").exists()
    resumed = cli("run", "r.yaml", f"run.dir={killed}", cwd=tmp_path)
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stdout[-3000:]
    rows_a = {r["step"]: r for r in read_metrics(clean / "grpo" / "metrics.csv")}
    rows_b = {r["step"]: r for r in read_metrics(killed / "grpo" / "metrics.csv")}
    assert rows_a.keys() == rows_b.keys()
    names = [n for n in next(iter(rows_a.values())) if n.startswith("curriculum/")]
    assert "curriculum/tracked" in names and any(n.startswith("curriculum/pass_rate/level") for n in names)
    for step, row in rows_a.items():
        for name, value in row.items():
            if value and not name.startswith("speed/"):
                assert float(rows_b[step][name]) == pytest.approx(float(value), rel=1e-5, abs=1e-7), (step, name)
