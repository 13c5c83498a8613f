"""Tier-1 tests of ``rlhfkit.plugins.ppo.functional`` (spec §C, §D, §E, §F) on
hand-computed tensors.

Expected numbers are written out or computed with plain Python loops over floats, never
with the function under test. Padding holds garbage (1e9, NaN) that must not leak.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from rlhfkit.plugins.ppo.functional import (
    AdaptiveKLController,
    FixedKLController,
    aggregate,
    explained_variance,
    gae,
    policy_loss,
    score_to_token_rewards,
    sequence_kl,
    value_loss,
)

G = 1e9  # garbage in padded entries


def _naive_gae(rewards: list[float], values: list[float], n: int, gamma: float, lam: float) -> list[float]:
    """GAE over the first ``n`` (real) entries of one row; the episode ends after them."""
    advantages = [0.0] * len(rewards)
    next_value = next_advantage = 0.0
    for t in reversed(range(n)):
        delta = rewards[t] + gamma * next_value - values[t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[t] = next_advantage
        next_value = values[t]
    return advantages


# --------------------------------------------------------------------------- GAE (spec §E)


def test_gae_hand_example():
    """γ = 0.9, λ = 0.5. Row 0 (all real): r = [0, 0, 1], V = [0.5, 0.25, 0.75]
    t2: δ = 1 − 0.75 = 0.25 = A2;  t1: δ = 0.9·0.75 − 0.25 = 0.425, A1 = 0.425 + 0.45·0.25 = 0.5375;
    t0: δ = 0.9·0.25 − 0.5 = −0.275, A0 = −0.275 + 0.45·0.5375 = −0.033125.
    Row 1 (one real token, garbage after): δ = 2 − 1 = 1 = A, return 2 (V after the last token is 0).
    """
    rewards = torch.tensor([[0.0, 0.0, 1.0], [2.0, G, -G]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.25, 0.75], [1.0, -G, G]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    assert advantages[0].tolist() == pytest.approx([-0.033125, 0.5375, 0.25], rel=1e-12)
    assert returns[0].tolist() == pytest.approx([0.466875, 0.7875, 1.0], rel=1e-12)
    assert advantages[1].tolist() == [1.0, 0.0, 0.0] and returns[1].tolist() == [2.0, 0.0, 0.0]


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 0.95), (1.0, 1.0), (0.9, 0.0), (0.5, 0.9)])
def test_gae_matches_naive_loop_on_ragged_masks(gamma, lam):
    """Random rewards/values, right-padded rows of length 0..T; returns = A + V; padding 0."""
    rng = random.Random(0)
    b, t = 6, 7
    lengths = [0, 1, 3, 7, 5, 2]
    rewards = [[rng.uniform(-2, 2) for _ in range(t)] for _ in range(b)]
    values = [[rng.uniform(-2, 2) for _ in range(t)] for _ in range(b)]
    mask = [[1.0 if j < n else 0.0 for j in range(t)] for n in lengths]
    advantages, returns = gae(
        torch.tensor(rewards, dtype=torch.float64),
        torch.tensor(values, dtype=torch.float64),
        torch.tensor(mask, dtype=torch.float64),
        gamma,
        lam,
    )
    for row in range(b):
        expected = _naive_gae(rewards[row], values[row], lengths[row], gamma, lam)
        expected_returns = [a + v * m for a, v, m in zip(expected, values[row], mask[row])]
        assert advantages[row].tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)
        assert returns[row].tolist() == pytest.approx(expected_returns, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("garbage", [G, -G, float("nan"), float("inf")])
def test_gae_padding_garbage_does_not_leak(garbage):
    """Garbage rewards/values on padding change nothing; advantages/returns there are 0."""
    g = torch.Generator().manual_seed(1)
    rewards, values = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    mask = torch.tensor([[1.0] * n + [0.0] * (5 - n) for n in (5, 3, 1, 0)])
    clean = gae(rewards * mask, values * mask, mask, 1.0, 0.95)
    dirty = gae(
        torch.where(mask > 0, rewards, garbage), torch.where(mask > 0, values, garbage), mask, 1.0, 0.95
    )
    for a, b in zip(clean, dirty):
        assert torch.equal(a, b)
        assert (b[mask == 0] == 0).all()


def test_gae_carries_no_gradient():
    values = torch.zeros(1, 2, requires_grad=True)
    advantages, returns = gae(torch.ones(1, 2), values, torch.ones(1, 2), 1.0, 0.95)
    assert not advantages.requires_grad and not returns.requires_grad


# --------------------------------------------------------------------------- aggregation (spec §F)

# Per-token losses 1, 2, 3 | 4 | (none); garbage on padding. B = 3, T = 4.
LOSS = torch.tensor([[1.0, 2.0, 3.0, G], [4.0, G, -G, G], [G, G, G, G]])
LOSS_MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    "mode, constant, expected",
    [
        ("token-mean", None, 10 / 4),  # (1 + 2 + 3 + 4) / 4 tokens
        ("sequence-mean", None, (2 + 4) / 2),  # row means 2 and 4; the empty row is left out
        ("token-sum-norm", None, 10 / (3 * 4)),  # Dr.GRPO: mean over 3 rows of row sum / T (= 4)
        ("token-sum-norm", 5.0, 10 / (3 * 5)),  # ... / a given constant
        ("global-token-mean", 8.0, 10 / 8),  # DAPO: / global token count
    ],
)
def test_aggregate_modes_on_hand_example(mode, constant, expected):
    assert aggregate(LOSS, LOSS_MASK, mode, constant).item() == pytest.approx(expected, rel=1e-6)


def test_aggregate_errors_and_empty_mask():
    with pytest.raises(ValueError, match="global-token-mean"):
        aggregate(LOSS, LOSS_MASK, "global-token-mean")
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate(LOSS, LOSS_MASK, "mean")  # type: ignore[arg-type]
    empty = torch.zeros_like(LOSS_MASK)
    for mode in ("token-mean", "sequence-mean", "token-sum-norm"):
        assert aggregate(LOSS, empty, mode).item() == 0.0


# --------------------------------------------------------------------------- policy loss (spec §F)

# ratios ρ and advantages A; row 1's last entry is padding with garbage.
RATIOS = [[1.5, 0.5, 1.1], [0.7, 4.0, 1.0]]
ADVANTAGES = [[1.0, 1.0, -2.0], [-1.0, -1.0, G]]
POLICY_MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def _policy_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    old = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, -G]], dtype=torch.float64)
    logprobs = (old + torch.tensor(RATIOS, dtype=torch.float64).log()).masked_fill(POLICY_MASK == 0, G)
    return logprobs.requires_grad_(), old, torch.tensor(ADVANTAGES, dtype=torch.float64)


def test_policy_loss_asymmetric_clip_hand_example():
    """ε_low = 0.2, ε_high = 0.28 (clip range [0.8, 1.28]); L = max(−Aρ, −A·clip(ρ)):
    ρ=1.5, A=+1: max(−1.5, −1.28) = −1.28 (clipped);  ρ=0.5, A=+1: max(−0.5, −0.8) = −0.5;
    ρ=1.1, A=−2: 2.2 (inside);  ρ=0.7, A=−1: max(0.7, 0.8) = 0.8 (clipped);  ρ=4, A=−1: max(4, 1.28) = 4.
    token-mean = 5.22 / 5; clip fraction 2/5. d loss/d logp = −Aρ/5 on unclipped tokens, 0 on clipped
    ones and on padding.
    """
    logprobs, old, advantages = _policy_inputs()
    loss, metrics = policy_loss(logprobs, old, advantages, POLICY_MASK, clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx((-1.28 - 0.5 + 2.2 + 0.8 + 4.0) / 5, rel=1e-12)
    assert metrics["policy/clip_fraction"].item() == pytest.approx(2 / 5)
    assert "policy/dual_clip_fraction" not in metrics
    loss.backward()
    expected_grad = [[0.0, -0.5 / 5, 2.2 / 5], [0.0, 4.0 / 5, 0.0]]
    assert logprobs.grad.tolist()[0] == pytest.approx(expected_grad[0], rel=1e-12, abs=1e-15)
    assert logprobs.grad.tolist()[1] == pytest.approx(expected_grad[1], rel=1e-12, abs=1e-15)


def test_policy_loss_dual_clip_caps_negative_advantages():
    """Dual clip c = 3 applies only where A < 0: min(L, −A·c). ρ=4, A=−1: min(4, 3) = 3
    (bound taken, no gradient); ρ=0.7, A=−1: min(0.8, 3) and ρ=1.1, A=−2: min(2.2, 6) unchanged;
    the A > 0 tokens are untouched. token-mean = 4.22 / 5; dual clip fraction 1/5.
    """
    logprobs, old, advantages = _policy_inputs()
    loss, metrics = policy_loss(
        logprobs, old, advantages, POLICY_MASK, clip_low=0.2, clip_high=0.28, dual_clip=3.0
    )
    assert loss.item() == pytest.approx((-1.28 - 0.5 + 2.2 + 0.8 + 3.0) / 5, rel=1e-12)
    assert metrics["policy/dual_clip_fraction"].item() == pytest.approx(1 / 5)
    assert metrics["policy/clip_fraction"].item() == pytest.approx(2 / 5)
    loss.backward()
    assert logprobs.grad[1, 1].item() == 0.0
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        policy_loss(logprobs, old, advantages, POLICY_MASK, dual_clip=1.0)


def test_policy_loss_kl_metrics_and_their_form():
    """approx_kl = k3 of π_old vs π_θ = mean((ρ − 1) − log ρ); kl_k1 = mean(old − logp) = −mean(log ρ).
    Metrics are detached 0-dim tensors."""
    logprobs, old, advantages = _policy_inputs()
    _, metrics = policy_loss(logprobs, old, advantages, POLICY_MASK)
    ratios = [1.5, 0.5, 1.1, 0.7, 4.0]
    assert metrics["policy/approx_kl"].item() == pytest.approx(
        sum(r - 1 - math.log(r) for r in ratios) / 5, rel=1e-6
    )
    assert metrics["policy/kl_k1"].item() == pytest.approx(-sum(math.log(r) for r in ratios) / 5, rel=1e-12)
    for value in metrics.values():
        assert value.dim() == 0 and not value.requires_grad


def test_policy_loss_with_aggregation_mode():
    """sequence-mean: row 0 mean (−1.28 − 0.5 + 2.2)/3, row 1 mean (0.8 + 4)/2."""
    logprobs, old, advantages = _policy_inputs()
    loss, _ = policy_loss(logprobs, old, advantages, POLICY_MASK, clip_high=0.28, aggregation="sequence-mean")
    assert loss.item() == pytest.approx(((-1.28 - 0.5 + 2.2) / 3 + (0.8 + 4.0) / 2) / 2, rel=1e-12)


# --------------------------------------------------------------------------- value loss, explained variance


VALUE_MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])


def _value_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    values = torch.tensor([[1.0, 0.6, G], [-1.0, 2.0, -G]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[0.5, 0.5, -G], [0.0, 1.0, G]], dtype=torch.float64)
    returns = torch.tensor([[1.2, 0.0, G], [-2.0, 0.0, G]], dtype=torch.float64)
    return values, old, returns


def test_value_loss_clipped_hand_example():
    """ε = 0.2, Vc = old + clamp(V − old, ±0.2), L = ½ max((V−R)², (Vc−R)²):
    V=1, old=.5, R=1.2: Vc=.7, max(.04, .25) = .25 (clipped);  V=.6, old=.5, R=0: Vc=.6, .36;
    V=−1, old=0, R=−2: Vc=−.2, max(1, 3.24) = 3.24 (clipped);  V=2, old=1, R=0: Vc=1.2, max(4, 1.44) = 4.
    token-mean ½·7.85/4; clip fraction 2/4; mean |V − R| = (.2 + .6 + 1 + 2)/4.
    """
    values, old, returns = _value_inputs()
    loss, metrics = value_loss(values, old, returns, VALUE_MASK, clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (0.25 + 0.36 + 3.24 + 4.0) / 4, rel=1e-12)
    assert metrics["value/clip_fraction"].item() == pytest.approx(0.5)
    assert metrics["value/abs_error"].item() == pytest.approx(3.8 / 4, rel=1e-12)
    loss.backward()  # the clipped-and-chosen entries get no gradient; padding none either
    expected_grad = [[0.0, 0.6 / 4, 0.0], [0.0, 2.0 / 4, 0.0]]
    assert values.grad.tolist()[0] == pytest.approx(expected_grad[0], rel=1e-12, abs=1e-15)
    assert values.grad.tolist()[1] == pytest.approx(expected_grad[1], rel=1e-12, abs=1e-15)


def test_value_loss_unclipped():
    """clip=None: ½ (V − R)² = ½ mean(.04, .36, 1, 4); no clip-fraction metric."""
    values, old, returns = _value_inputs()
    loss, metrics = value_loss(values, old, returns, VALUE_MASK, clip=None)
    assert loss.item() == pytest.approx(0.5 * 5.4 / 4, rel=1e-12)
    assert set(metrics) == {"value/abs_error"}


def test_explained_variance():
    """R = 1, 2, 3, 4 (garbage padding). Perfect values → 1; zero values → 0;
    V = 1, 2, 3, 3: R − V = 0, 0, 0, 1 has unbiased var 0.25, Var[R] = 5/3 → 1 − 0.15 = 0.85;
    constant returns → NaN (undefined)."""
    returns = torch.tensor([[1.0, 2.0, G], [3.0, 4.0, -G]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    assert explained_variance(returns.clone(), returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.zeros_like(returns), returns, mask).item() == pytest.approx(
        0.0, abs=1e-12
    )
    values = torch.tensor([[1.0, 2.0, -G], [3.0, 3.0, G]], dtype=torch.float64)
    assert explained_variance(values, returns, mask).item() == pytest.approx(0.85, rel=1e-12)
    assert math.isnan(explained_variance(values, torch.full_like(returns, 2.0), mask).item())


# --------------------------------------------------------------------------- KL (spec §D)


def test_sequence_kl_sums_logp_minus_ref_over_real_tokens():
    """Row 0: (−1 − −1.5) + (−2 − −1) = −0.5; row 1: −0.5 − −0.25 = −0.25; empty row: 0."""
    logprobs = torch.tensor([[-1.0, -2.0, G], [-0.5, G, G], [G, G, G]])
    ref = torch.tensor([[-1.5, -1.0, -G], [-0.25, G, -G], [G, -G, G]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert sequence_kl(logprobs, ref, mask).tolist() == pytest.approx([-0.5, -0.25, 0.0])


@pytest.mark.parametrize(
    "kl, expected",
    [
        (12.0, 0.1 * (1 + 0.2 * 256 / 10000)),  # e = 12/6 − 1 = 1, clipped to 0.2
        (6.6, 0.1 * (1 + 0.1 * 256 / 10000)),  # e = 0.1
        (5.7, 0.1 * (1 - 0.05 * 256 / 10000)),  # e = −0.05
        (0.0, 0.1 * (1 - 0.2 * 256 / 10000)),  # e = −1, clipped to −0.2
    ],
)
def test_adaptive_kl_controller_worked_example(kl, expected):
    """Ziegler et al.: e = clip(KL/target − 1, ±0.2), β ← β(1 + e·n_steps/horizon)."""
    controller = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    controller.update(kl, 256)
    assert controller.value == pytest.approx(expected, rel=1e-12)


def test_kl_controllers_defaults_and_state_round_trip():
    default = AdaptiveKLController()
    assert (default.value, default.target, default.horizon) == (0.15, 6.0, 10000)
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 256)
    assert fixed.value == 0.05

    trained = AdaptiveKLController()
    for kl in (12.0, 3.0, 7.0):
        trained.update(kl, 64)
    restored = AdaptiveKLController()
    restored.load_state_dict(trained.state_dict())
    assert restored.value == trained.value
    trained.update(9.0, 64)
    restored.update(9.0, 64)
    assert restored.value == trained.value
    other = FixedKLController(0.2)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.05


# --------------------------------------------------------------------------- score placement (spec §C)

SCORE_MASK = torch.tensor(
    [[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
)
SCORES = torch.tensor([2.0, 3.0, 5.0, 7.0])


def test_score_at_last_real_token():
    """OpenRLHF/MOSS: the score sits on the last real token; the all-masked row gets nothing."""
    expected = [[0, 2, 0, 0], [0, 0, 0, 3], [0, 0, 0, 0], [7, 0, 0, 0]]
    assert score_to_token_rewards(SCORES, SCORE_MASK).tolist() == expected
    assert score_to_token_rewards(SCORES, SCORE_MASK, "last").tolist() == expected


def test_score_after_eos():
    """Old TRL: one past the last real token where that fits in T, else on the last real token
    (row 1 is full); the all-masked row gets nothing."""
    expected = [[0, 0, 2, 0], [0, 0, 0, 3], [0, 0, 0, 0], [0, 7, 0, 0]]
    assert score_to_token_rewards(SCORES, SCORE_MASK, "after-eos").tolist() == expected
    with pytest.raises(ValueError, match="unknown score position"):
        score_to_token_rewards(SCORES, SCORE_MASK, "first")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- GSPO
def test_gspo_on_a_hand_example():
    """Row 0: mean log-ratio 0.1, s = e^0.1 = 1.10517, A = 2 -> clipped to 1.05: L = -2.1.
    Row 1: s = e^-0.5 = 0.60653, A = -1 -> clipped to 0.95: L = 0.95. Row 2: s = 1, A = 0.5:
    L = -0.5, not clipped. Row 3: no real token, left out. Loss (-2.1 + 0.95 - 0.5) / 3."""
    from rlhfkit.plugins.ppo.functional import gspo_loss

    old = torch.zeros(4, 3)
    logprobs = torch.tensor([[0.3, -0.1, 0.1], [-0.5, G, G], [0.01, -0.01, G], [G, G, G]], requires_grad=True)
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]])
    advantages = torch.tensor([[2.0, 2, 2], [-1, G, G], [0.5, 0.5, G], [G, G, G]])
    loss, metrics = gspo_loss(logprobs, old, advantages, mask, clip_low=0.05, clip_high=0.05)
    assert loss.item() == pytest.approx((-2.1 + 0.95 - 0.5) / 3, abs=1e-6)
    assert metrics["policy/clip_fraction"].item() == pytest.approx(2 / 3)
    assert metrics["policy/sequence_ratio"].item() == pytest.approx((math.exp(0.1) + math.exp(-0.5) + 1) / 3, rel=1e-6)
    loss.backward()
    # d/d logp_t of -A s / 3 with s = exp(mean_t): -A s / (|y| 3) on row 2's tokens; clipped rows get none
    expected = torch.zeros(4, 3)
    expected[2, :2] = -0.5 * 1.0 / (2 * 3)
    torch.testing.assert_close(logprobs.grad, expected, atol=1e-6, rtol=0)


def test_gspo_sequence_advantage_is_the_token_mean_and_empty_rows_give_zero():
    from rlhfkit.plugins.ppo.functional import gspo_loss

    logprobs = torch.zeros(1, 2, requires_grad=True)
    loss, _ = gspo_loss(logprobs, torch.zeros(1, 2), torch.tensor([[1.0, 3.0]]), torch.ones(1, 2))
    assert loss.item() == pytest.approx(-2.0)  # s = 1, A = mean(1, 3)
    empty, _ = gspo_loss(logprobs, torch.zeros(1, 2), torch.ones(1, 2), torch.zeros(1, 2))
    assert empty.item() == 0.0


def test_gspo_extreme_ratios_stay_finite():
    from rlhfkit.plugins.ppo.functional import gspo_loss

    logprobs = torch.tensor([[200.0, 150.0], [-300.0, -100.0]], requires_grad=True)
    loss, metrics = gspo_loss(logprobs, torch.zeros(2, 2), torch.tensor([[-1.0, -1.0], [1.0, 1.0]]), torch.ones(2, 2))
    assert torch.isfinite(loss) and torch.isfinite(metrics["policy/sequence_ratio"])
    loss.backward()
    assert torch.isfinite(logprobs.grad).all()
