"""Numerical edge cases that used to give a wrong or non-finite number: zero-variance GRPO
groups, ``eps: 0``, ORPO with near-certain responses, the entropy of large logits, and
float64 inputs to the per-token preference losses."""

from __future__ import annotations

import math

import pytest
import torch

from rlhfkit import PreferenceBatch, entropy_from_logits, load_plugins, ref
from rlhfkit.plugins.dpo import losses, objectives
from rlhfkit.plugins.estimators.functional import grpo_advantages


@pytest.mark.parametrize("value", [0.1, 1.7, 3.3, 123.456, -0.7])
def test_grpo_group_whose_samples_score_alike_has_zero_advantage(value):
    # float32 means of equal values can be one rounding step off; that step divided by a
    # std of the same size was an advantage of |A| ~ 0.1-0.9
    rewards = torch.zeros(6, 3)
    rewards[:, -1] = torch.tensor([value] * 3 + [0.0, 1.0, 2.0], dtype=torch.float32)
    mask = torch.ones(6, 3)
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    advantages = grpo_advantages(rewards, mask, group, "std", 1e-6)
    assert torch.equal(advantages[:3], torch.zeros(3, 3))
    # the other group is (R - 1) / (1 + 1e-6), unbiased std 1
    assert torch.allclose(advantages[3:, 0], torch.tensor([-1.0, 0.0, 1.0]) / (1 + 1e-6))


def test_grpo_zero_variance_group_of_many_sequence_tokens():
    # R = sum of token rewards; 0.1 * 7 summed in a different order per row is still the
    # same float here, and the group gets exactly 0 with scale none (Dr.GRPO) too
    rewards = torch.full((4, 7), 0.1)
    mask = torch.ones(4, 7)
    group = torch.zeros(4, dtype=torch.long)
    for scale in ("std", "none"):
        assert torch.equal(grpo_advantages(rewards, mask, group, scale, 1e-6), torch.zeros(4, 7))


def test_grpo_eps_zero_is_refused_in_the_function_and_the_recipe():
    rewards, mask, group = torch.ones(2, 1), torch.ones(2, 1), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="eps must be > 0"):
        grpo_advantages(rewards, mask, group, "std", 0.0)
    registry = load_plugins().registry
    problems = registry.resolve(ref("estimator").model_validate({"name": "grpo", "eps": 0}), "x")
    assert problems and "greater than 0" in problems[0][1]


def test_orpo_is_finite_when_both_responses_are_near_certain():
    for value in (0.0, -1e-9, -1e-30, -1e-45):
        w = torch.tensor([value], requires_grad=True)
        l = torch.tensor([value * 0.5])
        loss = losses.orpo(w, l, -w, 0.1)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(w.grad).all(), value


def test_log1mexp_against_float64_reference():
    a = torch.tensor([-1e-20, -1e-8, -1e-3, -0.5, -math.log(2), -1.0, -20.0, -100.0], dtype=torch.float64)
    expected = torch.tensor([math.log(-math.expm1(x)) for x in a.tolist()], dtype=torch.float64)
    assert torch.allclose(losses.log1mexp(a), expected, rtol=1e-12)
    # float32: the naive log1p(-exp(a)) is -inf at a = -1e-8; log1mexp keeps ~7 digits
    got = losses.log1mexp(a.float()).double()
    assert torch.allclose(got, expected, rtol=1e-6)


def test_entropy_of_large_logits_is_accurate_and_non_negative():
    # one dominant logit of 1e4 next to a runner-up at 1e4 - 30: the entropy is tiny and
    # positive; logsumexp(z) - sum p z cancelled two numbers of size 1e4 in float32
    logits = torch.tensor([[[1e4, 1e4 - 30.0, 0.0, -1e4]]])
    exact = entropy_from_logits(logits.double())
    got = entropy_from_logits(logits)
    assert got.dtype == torch.float32 and exact.dtype == torch.float64
    assert (got >= 0).all()
    assert torch.allclose(got.double(), exact, rtol=1e-4, atol=1e-10)
    # -inf logits (masked tokens) contribute 0, not NaN
    masked = torch.tensor([[[0.0, 0.0, float("-inf")]]])
    assert torch.allclose(entropy_from_logits(masked), torch.tensor([[math.log(2)]]))
    # a large uniform row: entropy log V exactly, not a rounding residue
    uniform = torch.full((1, 1, 8), 3e4)
    assert torch.allclose(entropy_from_logits(uniform), torch.tensor([[math.log(8)]]), atol=1e-6)


@pytest.mark.parametrize("name", ["ipo", "simpo", "orpo"])
def test_per_token_objectives_keep_float64(name):
    registry = load_plugins().registry
    config_cls = {"ipo": objectives.IPO, "simpo": objectives.SimPO, "orpo": objectives.ORPO}[name]
    spec = registry.get("objective", name)
    objective = config_cls(spec.config())
    d = torch.float64
    batch = PreferenceBatch(torch.tensor([-10.0, -3.2], dtype=d), torch.tensor([-12.0, -2.1], dtype=d),
                            torch.tensor([4, 2]), torch.tensor([8, 1]),
                            torch.tensor([-11.0, -3.0], dtype=d), torch.tensor([-11.5, -2.5], dtype=d))
    term = objective(batch)
    assert term.loss.dtype == torch.float64
