"""Critic-free estimators (spec §E): hand-computed advantages for each, groups that are
not contiguous, padding garbage that must not leak, one-sample groups, Dr.GRPO, the
whitening of REINFORCE++, ReMax's greedy baseline with a fake algorithm, and one short
``ppo`` run with ``estimator: grpo`` through the CLI.

Expected values are written out or computed by naive Python loops (``math`` and
``statistics``), never by the code under test.

The batch used throughout (``T = 4``, ``G`` is garbage on padding: 1e9, -1e9, NaN, inf):

    row  group  token rewards (real)   R
    0    7      0.5  -0.5  1.0         1
    1    3      2.0                    2
    2    7      1.0   3.0              4
    3    3      1.0   2.0  1.0  4.0    8
    4    7     -1.0   8.0              7
"""

from __future__ import annotations

import math
import statistics
from types import SimpleNamespace

import pytest
import torch
from helpers import cli, read_metrics

import rlhfkit
from rlhfkit.plugins.estimators.functional import (
    group_mean,
    group_metrics,
    group_std,
    grpo_advantages,
    leave_one_out_mean,
    reinforce_advantages,
    reinforce_plus_plus_advantages,
    remax_advantages,
    reward_to_go,
    rloo_advantages,
    sequence_returns,
)

GARBAGE = [1e9, float("nan"), -1e9, float("inf")]
ROWS = [[0.5, -0.5, 1.0], [2.0], [1.0, 3.0], [1.0, 2.0, 1.0, 4.0], [-1.0, 8.0]]
GROUPS = [7, 3, 7, 3, 7]
R = [1.0, 2.0, 4.0, 8.0, 7.0]
PLUGINS = rlhfkit.load_plugins()


def batch(rows: list[list[float]] = ROWS, width: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rewards, mask)`` ``[B, width]`` from each row's real token rewards, with garbage
    (huge, NaN, inf) on the padding."""
    rewards = torch.tensor([row + GARBAGE[: width - len(row)] for row in rows])
    mask = torch.tensor([[1.0] * len(row) + [0.0] * (width - len(row)) for row in rows])
    return rewards, mask


def per_token(values: list[float], rows: list[list[float]] = ROWS, width: int = 4) -> torch.Tensor:
    """``[B, width]``: each row's value on its real tokens, 0 on padding."""
    return torch.tensor([[v] * len(row) + [0.0] * (width - len(row)) for v, row in zip(values, rows, strict=True)])


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-6) -> None:
    assert torch.isfinite(actual).all(), actual
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=tol, atol=tol)


def rollout(rewards: torch.Tensor, mask: torch.Tensor, group: list[int], prompts: list[str] | None = None
            ) -> rlhfkit.Rollout:
    """A rollout with what estimators read (``rewards``, ``response_mask``, ``group``)."""
    b, t = mask.shape
    prompts = prompts or [f"prompt {g}" for g in group]
    out = rlhfkit.Rollout(torch.ones(b, 2, dtype=torch.long), torch.ones(b, 2, dtype=torch.long),
                          torch.ones(b, t, dtype=torch.long), mask.long(), torch.zeros(b, t), prompts,
                          ["response"] * b, torch.tensor(group), torch.zeros(b, dtype=torch.bool))
    out.scores = torch.zeros(b)
    out.rewards = rewards
    return out


def build(name: str, **settings: object) -> object:
    return PLUGINS.registry.build(rlhfkit.ref("estimator")(name=name, **settings), None)


# ------------------------------------------------------------------ helpers


def test_sequence_returns_ignore_padding_garbage():
    rewards, mask = batch()
    close(sequence_returns(rewards, mask), torch.tensor(R))


def test_group_statistics_over_non_contiguous_groups():
    x, group = torch.tensor(R), torch.tensor(GROUPS)
    # group 7: rows 0, 2, 4 (R 1, 4, 7); group 3: rows 1, 3 (R 2, 8)
    close(group_mean(x, group), torch.tensor([4.0, 5.0, 4.0, 5.0, 4.0]))
    close(group_std(x, group), torch.tensor([3.0, math.sqrt(18), 3.0, math.sqrt(18), 3.0]))  # n - 1
    close(leave_one_out_mean(x, group), torch.tensor([5.5, 8.0, 4.0, 2.0, 2.5]))
    single = torch.tensor([5])
    close(group_std(torch.tensor([3.0]), single), torch.tensor([0.0]))
    close(leave_one_out_mean(torch.tensor([3.0]), single), torch.tensor([0.0]))


def test_group_metrics():
    returns = torch.tensor([1.0, 2.0, 4.0, 8.0, 7.0, 0.3, 0.3, 9.0])
    group = torch.tensor([7, 3, 7, 3, 7, 1, 1, 0])  # group 1 all alike, group 0 alone
    metrics = group_metrics(returns, group)
    assert metrics["group/size"] == pytest.approx(8 / 4)
    assert metrics["group/std"] == pytest.approx((3.0 + math.sqrt(18) + 0.0) / 3, rel=1e-6)
    assert metrics["group/zero_std_fraction"] == pytest.approx(1 / 3)


# --------------------------------------------------------------- estimators


def test_reinforce_with_and_without_batch_mean_baseline():
    rewards, mask = batch()
    close(reinforce_advantages(rewards, mask, "none"), per_token(R))
    mean = sum(R) / len(R)  # 4.4
    close(reinforce_advantages(rewards, mask, "batch-mean"), per_token([r - mean for r in R]))
    with pytest.raises(ValueError, match="batch-mean"):
        reinforce_advantages(rewards, mask, "ema")


def naive_rloo(returns: list[float], groups: list[int]) -> list[float]:
    out = []
    for i, (r, g) in enumerate(zip(returns, groups, strict=True)):
        others = [returns[j] for j in range(len(returns)) if j != i and groups[j] == g]
        out.append(r - (sum(others) / len(others) if others else 0.0))
    return out


def test_rloo_leave_one_out_baseline():
    rewards, mask = batch()
    # group 7: 1 - (4+7)/2, 4 - (1+7)/2, 7 - (1+4)/2; group 3: 2 - 8, 8 - 2
    expected = [-4.5, -6.0, 0.0, 6.0, 4.5]
    assert naive_rloo(R, GROUPS) == expected
    close(rloo_advantages(rewards, mask, torch.tensor(GROUPS)), per_token(expected))


def test_rloo_single_sample_group_has_no_baseline_and_bind_needs_two_samples():
    rewards, mask = batch([[0.5, 1.0]])
    close(rloo_advantages(rewards, mask, torch.tensor([4])), per_token([1.5], [[0.5, 1.0]]))
    estimator = build("rloo")
    with pytest.raises(rlhfkit.UserError, match="samples_per_prompt is 1"):
        estimator.bind(SimpleNamespace(config=SimpleNamespace(samples_per_prompt=1)))
    estimator.bind(SimpleNamespace(config=SimpleNamespace(samples_per_prompt=2)))


def naive_grpo(returns: list[float], groups: list[int], eps: float, scale: bool) -> list[float]:
    out = []
    for r, g in zip(returns, groups, strict=True):
        members = [x for x, h in zip(returns, groups, strict=True) if h == g]
        mean, std = (statistics.mean(members), statistics.stdev(members)) if len(members) > 1 else (0.0, 1.0)
        out.append((r - mean) / (std + eps) if scale else r - mean)
    return out


def test_grpo_standardises_within_each_group():
    rewards, mask = batch()
    group = torch.tensor(GROUPS)
    # group 7: mean 4, unbiased std 3; group 3: mean 5, unbiased std sqrt(18)
    s = math.sqrt(18)
    expected = [-3 / (3 + 1e-6), -3 / (s + 1e-6), 0.0, 3 / (s + 1e-6), 3 / (3 + 1e-6)]
    assert naive_grpo(R, GROUPS, 1e-6, True) == pytest.approx(expected)
    close(grpo_advantages(rewards, mask, group), per_token(expected))
    trl = [-3 / (3 + 1e-4), -3 / (s + 1e-4), 0.0, 3 / (s + 1e-4), 3 / (3 + 1e-4)]
    close(grpo_advantages(rewards, mask, group, eps=1e-4), per_token(trl))


def test_dr_grpo_drops_the_std():
    rewards, mask = batch()
    close(grpo_advantages(rewards, mask, torch.tensor(GROUPS), scale="none"),
          per_token([-3.0, -3.0, 0.0, 3.0, 3.0]))


def test_grpo_single_sample_groups_take_mean_0_std_1_and_equal_scores_give_0():
    rows = [*ROWS, [5.0], [0.25, 0.25], [0.5]]
    groups = [*GROUPS, 9, 2, 2]  # group 9 alone; group 2 scores 0.5 twice
    rewards, mask = batch(rows)
    returns = [*R, 5.0, 0.5, 0.5]
    expected = naive_grpo(returns, groups, 1e-6, True)
    assert expected[5:] == [5.0 / (1 + 1e-6), 0.0, 0.0]
    close(grpo_advantages(rewards, mask, torch.tensor(groups)), per_token(expected, rows))
    dr = grpo_advantages(rewards, mask, torch.tensor(groups), scale="none")
    close(dr, per_token(naive_grpo(returns, groups, 0.0, False), rows))
    assert dr[5, 0] == 5.0


def test_remax_subtracts_the_greedy_score():
    rewards, mask = batch()
    greedy = torch.tensor([0.5, 3.0, 0.5, 3.0, 0.5])
    close(remax_advantages(rewards, mask, greedy), per_token([0.5, -1.0, 3.5, 5.0, 6.5]))


def naive_reward_to_go(rows: list[list[float]], gamma: float) -> list[list[float]]:
    out = []
    for row in rows:
        out.append([sum(gamma ** (s - t) * row[s] for s in range(t, len(row))) for t in range(len(row))])
    return out


def naive_whiten(rows: list[list[float]], eps: float = 1e-8) -> list[list[float]]:
    """The TRL/verl preset over every real token: unbiased variance, eps inside the sqrt."""
    flat = [x for row in rows for x in row]
    mean, var = statistics.mean(flat), statistics.variance(flat)
    return [[(x - mean) / math.sqrt(var + eps) for x in row] for row in rows]


def padded(rows: list[list[float]], width: int = 4) -> torch.Tensor:
    return torch.tensor([row + [0.0] * (width - len(row)) for row in rows])


def test_reward_to_go():
    rewards, mask = batch()
    expected = [[1.0, 0.5, 1.0], [2.0], [4.0, 3.0], [8.0, 7.0, 5.0, 4.0], [7.0, 8.0]]
    assert naive_reward_to_go(ROWS, 1.0) == expected
    close(reward_to_go(rewards, mask), padded(expected))
    # gamma 0.5: row 0 is 0.5 - 0.25 + 0.25, -0.5 + 0.5, 1
    discounted = [[0.5, 0.0, 1.0], [2.0], [2.5, 3.0], [2.75, 3.5, 3.0, 4.0], [3.0, 8.0]]
    assert naive_reward_to_go(ROWS, 0.5) == discounted
    close(reward_to_go(rewards, mask, gamma=0.5), padded(discounted))


def test_reinforce_plus_plus_whitens_the_reward_to_go_over_valid_tokens():
    rewards, mask = batch()
    advantages = reinforce_plus_plus_advantages(rewards, mask)
    close(advantages, padded(naive_whiten(naive_reward_to_go(ROWS, 1.0))), tol=1e-5)
    valid = advantages[mask.bool()]
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-6)
    n = len(valid)  # unbiased variance var / (var + eps): 1 up to eps
    assert valid.var(unbiased=True).item() == pytest.approx(1.0, abs=1e-6)
    assert valid.var(unbiased=False).item() == pytest.approx((n - 1) / n, abs=1e-6)
    assert (advantages[~mask.bool()] == 0).all()


def test_reinforce_plus_plus_group_baseline_subtracts_the_group_mean_of_r_first():
    rows = [*ROWS, [0.5, 2.5]]
    groups = [*GROUPS, 11]  # group 11 alone: subtracts 0
    rewards, mask = batch(rows)
    returns = [sum(row) for row in rows]
    means = {g: statistics.mean([r for r, h in zip(returns, groups, strict=True) if h == g]) for g in set(groups)}
    to_go = naive_reward_to_go(rows, 1.0)
    shifted = [[g_t - (means[g] if groups.count(g) > 1 else 0.0) for g_t in row]
               for row, g in zip(to_go, groups, strict=True)]
    assert shifted[0] == [1.0 - 4.0, 0.5 - 4.0, 1.0 - 4.0] and shifted[5] == [3.0, 2.5]
    advantages = reinforce_plus_plus_advantages(rewards, mask, group=torch.tensor(groups))
    close(advantages, padded(naive_whiten(shifted)), tol=1e-5)
    # scores alone (no per-token terms): verl's REINFORCE++-baseline, (R - mean_G) on every token, whitened
    scores_only = [[0.0] * (len(row) - 1) + [sum(row)] for row in rows]
    rewards, _ = batch(scores_only)
    verl = naive_whiten([[r - (means[g] if groups.count(g) > 1 else 0.0)] * len(row)
                         for r, g, row in zip(returns, groups, rows, strict=True)])
    close(reinforce_plus_plus_advantages(rewards, mask, group=torch.tensor(groups)), padded(verl), tol=1e-5)


# --------------------------------------------------------------- components


@pytest.mark.parametrize("name", ["reinforce", "rloo", "grpo", "remax", "reinforce++"])
def test_components_follow_the_estimator_protocol(name):
    estimator = build(name)
    assert isinstance(estimator, rlhfkit.Estimator) and estimator.critic is None
    rewards, mask = batch()
    r = rollout(rewards, mask, GROUPS)
    if rlhfkit.provides(estimator, "bind"):
        estimator.bind(SimpleNamespace(config=SimpleNamespace(samples_per_prompt=3),
                                       greedy_scores=lambda rollout: torch.zeros(len(rollout))))
    if rlhfkit.provides(estimator, "prepare"):
        estimator.prepare(r)
    result = estimator.estimate(r)
    assert result.returns is None and result.advantages.shape == (5, 4)
    assert torch.isfinite(result.advantages).all() and (result.advantages[mask == 0] == 0).all()
    assert "advantage/raw_mean" in result.metrics and all(math.isfinite(v) for v in result.metrics.values())
    assert not rlhfkit.provides(estimator, "critic_loss")  # critic-free


def test_components_pass_their_settings():
    rewards, mask = batch()
    r = rollout(rewards, mask, GROUPS)
    close(build("grpo", scale="none").estimate(r).advantages, per_token([-3.0, -3.0, 0.0, 3.0, 3.0]))
    result = build("reinforce", baseline="none").estimate(r)
    close(result.advantages, per_token(R))
    assert result.metrics["reinforce/baseline"] == 0.0
    assert result.metrics["advantage/raw_mean"] == pytest.approx((1 * 3 + 2 + 4 * 2 + 8 * 4 + 7 * 2) / 12)
    grpo = build("grpo").estimate(r).metrics
    assert grpo["group/size"] == pytest.approx(2.5) and grpo["group/zero_std_fraction"] == 0.0
    close(build("reinforce++", gamma=0.5).estimate(r).advantages,
          padded(naive_whiten(naive_reward_to_go(ROWS, 0.5))), tol=1e-5)


def test_remax_prepares_one_greedy_score_per_prompt():
    calls: list[list[str]] = []
    greedy = {"a": 0.5, "b": 3.0}

    def greedy_scores(r: rlhfkit.Rollout) -> torch.Tensor:
        calls.append(list(r.prompts))
        return torch.tensor([greedy[p] for p in r.prompts])

    rewards, mask = batch()
    r = rollout(rewards, mask, GROUPS, prompts=["a", "b", "a", "b", "a"])
    estimator = build("remax")
    with pytest.raises(RuntimeError, match="greedy_score"):
        estimator.estimate(r)
    estimator.bind(SimpleNamespace(config=SimpleNamespace(samples_per_prompt=3), greedy_scores=greedy_scores))
    estimator.prepare(r)
    assert sorted(calls[0]) == ["a", "b"] and len(calls) == 1  # greedy decoding once per prompt
    close(r.extras["greedy_score"], torch.tensor([0.5, 3.0, 0.5, 3.0, 0.5]))
    picked = r.select(torch.tensor([3, 0]))  # extras are sliced with the rest
    close(picked.extras["greedy_score"], torch.tensor([3.0, 0.5]))
    result = estimator.estimate(r)
    close(result.advantages, per_token([0.5, -1.0, 3.5, 5.0, 6.5]))
    assert result.metrics["remax/greedy_score"] == pytest.approx(7.5 / 5)
    assert result.metrics["remax/beats_greedy"] == pytest.approx(4 / 5)


# ------------------------------------------------------------- end to end

GRPO_RECIPE = """\
run: {{name: grpo-test, seed: 0}}
stages:
  grpo:
    algorithm:
      name: ppo
      lr: 1.0e-4
      warmup_steps: 1
      prompts_per_iteration: 8
      samples_per_prompt: 4
      generation_batch_size: 8
      sampling: {{max_new_tokens: 12}}
      max_prompt_length: 24
      sample_prompts: 2
      advantages: {{whiten: none}}
    policy: {{name: transformers, path: {sft}, dropout: 0.0}}
    reward: {{name: reward-model, path: {rm}, max_length: 48}}
    estimator: {{name: grpo}}
    objective: {{name: ppo-clip, aggregation: sequence-mean}}
    constraints: [{{name: kl, placement: loss, estimator: k3, coef: 0.04}}]
    data: {{name: builtin, task: reviews, split: prompts}}
    trainer: {{batch_size: 16, micro_batch_size: 8, max_steps: 4, log_every_n_steps: 1}}
"""


def test_grpo_runs_in_the_ppo_algorithm_without_a_critic(tmp_path, exports):
    recipe = tmp_path / "grpo.yaml"
    recipe.write_text(GRPO_RECIPE.format(sft=exports["sft"], rm=exports["rm"]))
    out = tmp_path / "run"
    result = cli("run", str(recipe), f"run.dir={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 iterations x 2 updates: 8 prompts x 4 samples" in result.stdout
    rows = read_metrics(out / "grpo" / "metrics.csv")
    columns = set(rows[0])
    assert "train/policy/loss" in columns and "train/value/loss" not in columns
    assert not any(name.startswith("value/") for name in columns)
    losses = [float(r["train/policy/loss"]) for r in rows if r.get("train/policy/loss")]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    sizes = [float(r["group/size"]) for r in rows if r.get("group/size")]
    assert sizes == [4.0, 4.0]  # one rollout per iteration, 8 groups of 4
    assert (out / "grpo" / "export" / "model.safetensors").exists()
