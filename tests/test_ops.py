"""Tier-1 tests of ``rlhfkit.ops`` against spec §A (whitening), §C (running moments)
and §D (KL estimators), on hand-computed tensors.

Expected numbers are written out or computed with plain Python (``math``,
``fractions``, ``statistics``), never with the torch expression under test. Each
docstring names the convention it reproduces.
"""

from __future__ import annotations

import math
import statistics
from fractions import Fraction

import numpy as np
import pytest
import torch

from rlhfkit import (
    RunningMoments,
    entropy_from_logits,
    kl_estimate,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    whiten,
)

GARBAGE = 1e9

# Valid values 1, 2, 3, 4 (row 0 has three, row 1 has one); padding holds +-1e9.
X_PADDED = torch.tensor([[1.0, 2.0, 3.0, GARBAGE], [4.0, -GARBAGE, GARBAGE, -GARBAGE]])
M_PADDED = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
VALID = [1, 2, 3, 4]


def _valid(x: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """The entries of ``x`` where ``mask`` is 1, as Python floats."""
    return [float(v) for v, m in zip(x.flatten().tolist(), mask.flatten().tolist()) if m]


def _biased_var(values: list) -> Fraction:
    values = [Fraction(v) for v in values]
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / len(values)


def _unbiased_var(values: list) -> Fraction:
    return _biased_var(values) * len(values) / (len(values) - 1)


# --------------------------------------------------------------------------- masked reductions


def test_masked_sum_and_mean_ignore_padding_garbage():
    """Mask semantics: 1.0 valid, 0.0 padding; padding holding +-1e9 must not leak.

    Valid entries 1,2,3 | 4: total sum 10, mean 10/4; per row sums [6, 4], means [2, 4];
    per column means [(1+4)/2, 2, 3, 0] (the last column is fully masked -> 0).
    """
    assert masked_sum(X_PADDED, M_PADDED).item() == 10.0
    assert masked_mean(X_PADDED, M_PADDED).item() == 2.5
    assert masked_sum(X_PADDED, M_PADDED, dim=1).tolist() == [6.0, 4.0]
    assert masked_mean(X_PADDED, M_PADDED, dim=1).tolist() == [2.0, 4.0]
    assert masked_mean(X_PADDED, M_PADDED, dim=0).tolist() == [2.5, 2.0, 3.0, 0.0]


def test_all_zero_mask_returns_zero_not_nan():
    """Convention: reductions over an all-zero mask return 0 (not NaN), biased and unbiased."""
    x = torch.tensor([[GARBAGE, -GARBAGE, 5.0]])
    zero = torch.zeros_like(x)
    for value in (
        masked_sum(x, zero),
        masked_mean(x, zero),
        masked_var(x, zero, unbiased=True),
        masked_var(x, zero, unbiased=False),
    ):
        assert value.item() == 0.0
    assert masked_mean(x, zero, dim=1).tolist() == [0.0]
    assert masked_mean(x, zero, dim=0).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_var_biased_and_unbiased_on_hand_values(dtype):
    """Biased = population variance, sum((x-mu)^2)/n (OpenAI, MOSS-RLHF); unbiased applies
    Bessel n/(n-1) (TRL, verl ``masked_var``). Valid 1,2,3,4: mu 5/2, biased 5/4,
    unbiased 5/3; padding +-1e9 ignored.
    """
    x, m = X_PADDED.to(dtype), M_PADDED.to(dtype)
    assert _biased_var(VALID) == Fraction(5, 4) and _unbiased_var(VALID) == Fraction(5, 3)
    assert masked_var(x, m, unbiased=False).item() == pytest.approx(1.25, rel=1e-6)
    assert masked_var(x, m, unbiased=True).item() == pytest.approx(5 / 3, rel=1e-6)
    assert masked_var(x, m).item() == pytest.approx(5 / 3, rel=1e-6), "default is unbiased"


def test_masked_var_less_regular_values():
    """Same conventions on non-integer values, mask with holes in the middle:
    valid [0.5, -1.5, 2.0, 7.25, 3.0] -> biased var 1097/100 - (45/20)^2 via fractions.
    """
    x = torch.tensor([[0.5, GARBAGE, -1.5, 2.0], [-GARBAGE, 7.25, 3.0, GARBAGE]], dtype=torch.float64)
    m = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    valid = [Fraction(1, 2), Fraction(-3, 2), 2, Fraction(29, 4), 3]
    assert masked_mean(x, m).item() == pytest.approx(float(sum(valid) / 5), rel=1e-12)
    assert masked_var(x, m, unbiased=False).item() == pytest.approx(float(_biased_var(valid)), rel=1e-12)
    assert masked_var(x, m, unbiased=True).item() == pytest.approx(float(_unbiased_var(valid)), rel=1e-12)


def test_masked_var_single_valid_entry():
    """n <= 1: the biased variance of one value is 0, and the unbiased one is defined as 0
    (not inf/NaN from n/(n-1)); this deviates from TRL/verl, which raise.
    """
    x = torch.tensor([[3.0, GARBAGE, -GARBAGE]])
    m = torch.tensor([[1.0, 0.0, 0.0]])
    assert masked_var(x, m, unbiased=False).item() == 0.0
    assert masked_var(x, m, unbiased=True).item() == 0.0


# --------------------------------------------------------------------------- whitening (spec §A)


def test_masked_whiten_openai_preset_shift_mean_false():
    """OpenAI lm-human-preferences reward whitening: biased variance, eps 1e-8,
    ``shift_mean=False`` adds mu back: (x - 5/2) / sqrt(5/4 + 1e-8) + 5/2 on 1,2,3,4.
    """
    x = X_PADDED.double()
    out = masked_whiten(x, M_PADDED.double(), shift_mean=False, unbiased=False, eps=1e-8)
    expected = [(v - 2.5) / math.sqrt(1.25 + 1e-8) + 2.5 for v in VALID]
    assert _valid(out, M_PADDED) == pytest.approx(expected, rel=1e-12)
    assert statistics.fmean(_valid(out, M_PADDED)) == pytest.approx(2.5, rel=1e-12)

    centered = masked_whiten(x, M_PADDED.double(), shift_mean=True, unbiased=False, eps=1e-8)
    assert _valid(centered, M_PADDED) == pytest.approx([v - 2.5 for v in expected], rel=1e-12)


def test_masked_whiten_default_is_trl_verl_preset():
    """TRL experimental PPO / verl ``masked_whiten``: unbiased (Bessel) variance, eps 1e-8,
    shift_mean=True, and these are the defaults: (x - 5/2) / sqrt(5/3 + 1e-8) on 1,2,3,4.
    """
    out = masked_whiten(X_PADDED.double(), M_PADDED.double())
    expected = [(v - 2.5) / math.sqrt(5 / 3 + 1e-8) for v in VALID]
    assert _valid(out, M_PADDED) == pytest.approx(expected, rel=1e-12)


def test_masked_whiten_moss_preset_eps_1e6():
    """MOSS-RLHF whiten: mu = sum(x)/sum(m) with zeroed padding, biased variance, eps 1e-6.

    Valid [0, 0.002] -> mu 0.001, biased var 1e-6, so eps matters:
    eps 1e-6 -> +-0.001/sqrt(2e-6) = +-0.70711; eps 1e-8 -> +-0.001/sqrt(1.01e-6) = +-0.99504.
    """
    x = torch.tensor([[0.0, 0.002, 0.0, 0.0]], dtype=torch.float64)
    m = torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    # MOSS's own mean, sum(x)/sum(m), agrees because its padding is zero.
    assert masked_mean(x, m).item() == pytest.approx(0.002 / 2, rel=1e-12)

    moss = masked_whiten(x, m, unbiased=False, eps=1e-6)
    a = 0.001 / math.sqrt(2e-6)
    assert _valid(moss, m) == pytest.approx([-a, a], rel=1e-9)
    assert a == pytest.approx(0.7071068, rel=1e-6)

    openai = masked_whiten(x, m, unbiased=False, eps=1e-8)
    b = 0.001 / math.sqrt(1.01e-6)
    assert _valid(openai, m) == pytest.approx([-b, b], rel=1e-9)


PRESETS = {
    "openai": {"unbiased": False, "eps": 1e-8},
    "trl_verl": {"unbiased": True, "eps": 1e-8},
    "moss": {"unbiased": False, "eps": 1e-6},
}


@pytest.mark.parametrize("preset", PRESETS)
def test_whitened_masked_values_have_mean_zero_and_preset_variance(preset):
    """After whitening, the valid values have mean 0 and, in the preset's own variance
    convention, variance var/(var + eps) ~ 1. In the other convention it is off by
    n/(n-1): e.g. TRL/verl-whitened values have biased variance (n-1)/n (3/4 for n=4).
    """
    kwargs = PRESETS[preset]
    values = [0.3, -1.7, 2.9, 0.05, 4.4, -0.6, 1.25]
    x = torch.tensor([values + [GARBAGE, -GARBAGE]], dtype=torch.float64)
    m = torch.tensor([[1.0] * len(values) + [0.0, 0.0]], dtype=torch.float64)
    var_fn = statistics.variance if kwargs["unbiased"] else statistics.pvariance
    var = var_fn(values)

    out = _valid(masked_whiten(x, m, **kwargs), m)
    assert statistics.fmean(out) == pytest.approx(0.0, abs=1e-12)
    assert var_fn(out) == pytest.approx(var / (var + kwargs["eps"]), rel=1e-12)

    small = torch.tensor([[1.0, 2.0, 3.0, 4.0, GARBAGE]], dtype=torch.float64)
    small_mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    out4 = _valid(masked_whiten(small, small_mask, **kwargs), small_mask)
    expected_biased = 0.75 if kwargs["unbiased"] else 1.0
    assert statistics.pvariance(out4) == pytest.approx(expected_biased, rel=1e-6)


def test_masked_whiten_float32_with_garbage_padding():
    """Padding of +-1e9 in float32 leaks into neither mu nor var (TRL/verl preset)."""
    out = masked_whiten(X_PADDED, M_PADDED)
    expected = [(v - 2.5) / math.sqrt(5 / 3 + 1e-8) for v in VALID]
    assert _valid(out, M_PADDED) == pytest.approx(expected, rel=1e-6)


def test_whiten_uses_every_entry():
    """``whiten`` = masked_whiten with an all-ones mask; default TRL/verl preset
    (unbiased, eps 1e-8): [[1,2],[3,4]] -> (x - 5/2)/sqrt(5/3 + 1e-8); biased and
    shift_mean=False pass through.
    """
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    out = whiten(x)
    assert out.shape == x.shape
    assert out.flatten().tolist() == pytest.approx([(v - 2.5) / math.sqrt(5 / 3 + 1e-8) for v in VALID], rel=1e-12)
    biased = whiten(x, shift_mean=False, unbiased=False, eps=1e-6)
    expected = [(v - 2.5) / math.sqrt(1.25 + 1e-6) + 2.5 for v in VALID]
    assert biased.flatten().tolist() == pytest.approx(expected, rel=1e-12)


# --------------------------------------------------------------------------- log-probs, entropy


def _log_softmax_at(row: list[float], label: int, temperature: float = 1.0) -> float:
    scaled = [v / temperature for v in row]
    top = max(scaled)
    return scaled[label] - (top + math.log(sum(math.exp(v - top) for v in scaled)))


LOGITS = [[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [-1.0, 0.5, 2.0]], [[4.0, -2.0, 0.0], [0.25, 0.5, -0.75], [3.0, 3.0, -3.0]]]
LABELS = [[2, 1, 0], [0, 2, 1]]


def test_logprobs_from_logits_hand_example():
    """log softmax(logits)[label], e.g. row [1,2,3] label 2: 3 - log(e + e^2 + e^3) = -0.40761;
    uniform row: log(1/3). Shape [B, T, V] -> [B, T], float32; also equals log_softmax + gather.
    """
    logits, labels = torch.tensor(LOGITS), torch.tensor(LABELS)
    out = logprobs_from_logits(logits, labels)
    assert out.shape == (2, 3) and out.dtype == torch.float32
    expected = [[_log_softmax_at(LOGITS[b][t], LABELS[b][t]) for t in range(3)] for b in range(2)]
    assert expected[0][0] == pytest.approx(-0.4076059644, rel=1e-9)
    assert expected[0][1] == pytest.approx(math.log(1 / 3), rel=1e-12)
    assert out.tolist()[0] == pytest.approx(expected[0], abs=1e-6)
    assert out.tolist()[1] == pytest.approx(expected[1], abs=1e-6)
    gathered = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out, gathered)


@pytest.mark.parametrize("temperature", [0.5, 2.0, 0.7])
def test_logprobs_from_logits_divides_by_temperature(temperature):
    """Spec notation: log-probs are taken on logits / T with the sampling temperature,
    e.g. T=2, row [1,2,3], label 2: 1.5 - log(e^0.5 + e + e^1.5).
    """
    out = logprobs_from_logits(torch.tensor(LOGITS), torch.tensor(LABELS), temperature=temperature)
    expected = [[_log_softmax_at(LOGITS[b][t], LABELS[b][t], temperature) for t in range(3)] for b in range(2)]
    assert out.tolist()[0] == pytest.approx(expected[0], abs=1e-6)
    assert out.tolist()[1] == pytest.approx(expected[1], abs=1e-6)
    if temperature == 2.0:
        assert expected[0][0] == pytest.approx(1.5 - math.log(math.exp(0.5) + math.e + math.exp(1.5)), rel=1e-12)


def test_logprobs_from_logits_large_logits_stay_finite():
    """Logits of order 1e4 do not overflow: [1e4, 1e4-1, 1e4-2] label 0 gives
    -log(1 + e^-1 + e^-2) = -0.40761; [1e4, -1e4, 0] label 1 gives -2e4.

    gather - logsumexp (as TRL's ``selective_log_softmax``) rounds the logsumexp
    ~1e4 + 0.41 to float32 spacing 2^-10 near 1e4, so the error bound is 2^-11 ~ 4.9e-4.
    """
    logits = torch.tensor([[[1e4, 1e4 - 1, 1e4 - 2], [1e4, -1e4, 0.0]]])
    out = logprobs_from_logits(logits, torch.tensor([[0, 1]]))
    assert torch.isfinite(out).all()
    assert out[0, 0].item() == pytest.approx(-math.log(1 + math.exp(-1) + math.exp(-2)), abs=2**-11)
    assert out[0, 1].item() == pytest.approx(-2e4, rel=1e-6)


def test_logprobs_from_logits_bf16_computed_in_float32():
    """bf16 inputs are upcast before the softmax: output is float32 and exact for
    bf16-representable logits [100, 101, 102] (label 2: -log(1 + e^-1 + e^-2)),
    where a bf16 logsumexp (spacing 0.5 near 100) would be off by ~0.1.
    """
    logits = torch.tensor([[[100.0, 101.0, 102.0], [1.0, 2.0, 3.0]]], dtype=torch.bfloat16)
    out = logprobs_from_logits(logits, torch.tensor([[2, 0]]))
    assert out.dtype == torch.float32
    assert out[0, 0].item() == pytest.approx(-math.log(1 + math.exp(-1) + math.exp(-2)), abs=1e-5)
    assert out[0, 1].item() == pytest.approx(_log_softmax_at([1.0, 2.0, 3.0], 0), abs=1e-5)


@pytest.mark.parametrize("level", [0.0, 7.0, -3.5, 1e4])
def test_entropy_of_uniform_is_log_vocab(level):
    """Uniform softmax over V=5 (any constant logit) has entropy log 5 = 1.60944.
    Formula logsumexp - sum(p * logits) as in verl; at logits ~1e4 float32 rounding of
    the two ~1e4 terms costs up to ~1e-3, hence the looser tolerance there.
    """
    out = entropy_from_logits(torch.full((2, 3, 5), level))
    assert out.shape == (2, 3) and out.dtype == torch.float32
    tolerance = 1e-3 if abs(level) >= 1e3 else 1e-6
    assert out.flatten().tolist() == pytest.approx([math.log(5)] * 6, abs=tolerance)


def test_entropy_of_one_hot_and_two_point_distribution():
    """One-hot-like logits [60, 0, 0, 0] have entropy ~ 0 (3 * 61 e^-60 < 1e-24);
    logits [0, log 3] give p = (1/4, 3/4): H = log 4 - (3/4) log 3 = 0.56234;
    logits [0, 2 log 3] at T=2 are the same distribution; bf16 input -> float32 output.
    """
    one_hot = entropy_from_logits(torch.tensor([[[60.0, 0.0, 0.0, 0.0]]]))
    assert one_hot.item() == pytest.approx(0.0, abs=1e-6)
    two_point = math.log(4) - 0.75 * math.log(3)
    assert two_point == pytest.approx(0.5623351446, rel=1e-9)
    assert entropy_from_logits(torch.tensor([[[0.0, math.log(3)]]])).item() == pytest.approx(two_point, abs=1e-6)
    tempered = entropy_from_logits(torch.tensor([[[0.0, 2 * math.log(3)]]]), temperature=2.0)
    assert tempered.item() == pytest.approx(two_point, abs=1e-6)
    bf16 = entropy_from_logits(torch.zeros(1, 2, 8, dtype=torch.bfloat16))
    assert bf16.dtype == torch.float32
    assert bf16.flatten().tolist() == pytest.approx([math.log(8)] * 2, abs=1e-6)


# --------------------------------------------------------------------------- KL (spec §D)

E = math.e
# (logp, ref) -> (k1, k2, k3) with log r = ref - logp.
KL_HAND = [
    ((-1.0, -2.0), (1.0, 0.5, math.exp(-1))),  # log r = -1: k3 = e^-1 - 1 + 1 = 0.36788
    ((-2.0, -1.0), (-1.0, 0.5, E - 2)),  # log r = +1: k3 = e - 1 - 1 = 0.71828
    ((-0.5, -0.5), (0.0, 0.0, 0.0)),  # identical policies
    ((-3.0, -0.5), (-2.5, 3.125, math.exp(2.5) - 3.5)),  # log r = 2.5
]


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_on_hand_values(estimator):
    """Schulman's estimators with log r = ref - logp (samples from pi_theta):
    k1 = -log r, k2 = (log r)^2 / 2, k3 = (r - 1) - log r.
    """
    index = ["k1", "k2", "k3"].index(estimator)
    logp = torch.tensor([[pair[0] for pair, _ in KL_HAND]])
    ref = torch.tensor([[pair[1] for pair, _ in KL_HAND]])
    out = kl_estimate(logp, ref, estimator)
    assert out.shape == (1, len(KL_HAND)) and out.dtype == torch.float32
    assert out[0].tolist() == pytest.approx([expected[index] for _, expected in KL_HAND], abs=1e-6)
    assert math.exp(-1) == pytest.approx(0.36788, abs=1e-5)


def test_kl_default_estimator_is_k1_and_bf16_upcasts():
    """Default estimator k1; bf16 log-probs are computed in float32."""
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.bfloat16)
    ref = torch.tensor([[-2.0, -1.0]], dtype=torch.bfloat16)
    out = kl_estimate(logp, ref)
    assert out.dtype == torch.float32 and out[0].tolist() == [1.0, -1.0]


# log r = -30 (first column) and +30 (second column).
CLAMP_LOGP = torch.tensor([[0.0, -30.0, -1.0]])
CLAMP_REF = torch.tensor([[-30.0, 0.0, -2.0]])
CLAMP_CASES = [
    # (estimator, log_ratio_clamp, value_clamp, expected for log r = -30, +30, -1)
    ("k1", None, None, [30.0, -30.0, 1.0]),
    ("k1", 20.0, None, [20.0, -20.0, 1.0]),
    ("k1", None, 10.0, [10.0, -10.0, 1.0]),
    ("k1", 20.0, 10.0, [10.0, -10.0, 1.0]),
    ("k2", None, None, [450.0, 450.0, 0.5]),
    ("k2", 20.0, None, [200.0, 200.0, 0.5]),
    ("k2", 20.0, 10.0, [10.0, 10.0, 0.5]),
    ("k3", None, None, [29.0 + math.exp(-30), math.exp(30) - 31.0, math.exp(-1)]),
    ("k3", 20.0, None, [19.0 + math.exp(-20), math.exp(20) - 21.0, math.exp(-1)]),
    ("k3", None, 10.0, [10.0, 10.0, math.exp(-1)]),
    ("k3", 20.0, 10.0, [10.0, 10.0, math.exp(-1)]),
]


@pytest.mark.parametrize(("estimator", "log_ratio_clamp", "value_clamp", "expected"), CLAMP_CASES)
def test_kl_clamps(estimator, log_ratio_clamp, value_clamp, expected):
    """Clamps default to off; verl/OpenRLHF clamp log r to +-20 first, then the estimate
    to +-10 (both symmetric). Values inside the bounds (log r = -1) are untouched.
    """
    out = kl_estimate(CLAMP_LOGP, CLAMP_REF, estimator, log_ratio_clamp=log_ratio_clamp, value_clamp=value_clamp)
    assert out[0].tolist() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_k3_is_nonnegative(dtype):
    """k3 = (r - 1) - log r >= 0 for every log r (e^y >= 1 + y), also in floating point:
    tiny |log r| down to 1e-12 (expm1 keeps the cancellation exact), |log r| up to 50
    unclamped, and |log r| up to 1000 with the verl clamps.
    """
    g = torch.Generator().manual_seed(0)
    tiny = torch.logspace(-12, 0, 2000)
    log_ratio = torch.cat([torch.rand(20_000, generator=g) * 100 - 50, tiny, -tiny, torch.zeros(1)])
    logp = torch.randn(log_ratio.shape, generator=g) * 5
    ref = logp + log_ratio
    k3 = kl_estimate(logp.to(dtype), ref.to(dtype), "k3")
    assert torch.isfinite(k3).all() and (k3 >= 0).all()

    huge = torch.rand(10_000, generator=g) * 2000 - 1000
    clamped = kl_estimate(torch.zeros_like(huge).to(dtype), huge.to(dtype), "k3", log_ratio_clamp=20, value_clamp=10)
    assert (clamped >= 0).all() and (clamped <= 10).all()


def test_unknown_kl_estimator_raises():
    """An estimator other than k1/k2/k3 is a ValueError naming the bad value."""
    with pytest.raises(ValueError, match="'k4'"):
        kl_estimate(torch.zeros(1, 2), torch.zeros(1, 2), "k4")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def gaussian_log_densities() -> tuple[torch.Tensor, torch.Tensor]:
    """x ~ q = N(0, 1) (the policy that samples); logp = log q(x), ref = log p(x), p = N(0.1, 1)."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(2_000_000, generator=g, dtype=torch.float64)
    half_log_two_pi = 0.5 * math.log(2 * math.pi)
    return -0.5 * x**2 - half_log_two_pi, -0.5 * (x - 0.1) ** 2 - half_log_two_pi


@pytest.mark.parametrize(("estimator", "expected"), [("k1", 0.005), ("k2", 0.0050125), ("k3", 0.005)])
def test_kl_estimators_match_analytic_gaussian_kl(gaussian_log_densities, estimator, expected):
    """Spec §D analytic check. KL(q || p) = (0.1)^2 / 2 = 0.005 for q = N(0,1), p = N(0.1,1).
    log r = 0.1 x - 0.005, so E[k1] = 0.005, E[k3] = E[r] - 1 + 0.005 = 0.005 (E[r] = 1) and
    E[k2] = (Var + mean^2)/2 = (0.01 + 0.000025)/2 = 0.0050125.

    2,000,000 seeded samples; tolerance = 5 standard errors of the sample mean, from the
    sample std (k1: std 0.1 -> 5 SE ~ 3.5e-4; k2, k3: std ~ 0.007 -> 5 SE ~ 2.5e-5).
    """
    logp, ref = gaussian_log_densities
    k = kl_estimate(logp, ref, estimator).double()
    standard_error = k.std().item() / math.sqrt(k.numel())
    assert abs(k.mean().item() - expected) < 5 * standard_error
    assert 5 * standard_error < 4e-4, "the check must be tight enough to tell the estimators apart"


# --------------------------------------------------------------------------- RunningMoments (spec §C)


def test_running_moments_initial_state():
    """MOSS-RLHF / TRL init: mean 0, var 1, count ~ 0 (1e-24, not exactly 0), std 1."""
    moments = RunningMoments()
    assert moments.mean == 0.0 and moments.var == 1.0 and moments.std == 1.0
    assert 0.0 < moments.count < 1e-20


def test_running_moments_first_update_replaces_initial_state():
    """With count ~ 0 the prior (0, 1) has no weight: after [1,2,3,4] mean = 5/2,
    var = biased 5/4, std = unbiased sqrt(5/3); the call returns the batch's
    (mean, unbiased std) = (5/2, sqrt(5/3)).
    """
    moments = RunningMoments()
    batch_mean, batch_std = moments.update(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert (batch_mean, batch_std) == pytest.approx((2.5, math.sqrt(5 / 3)), rel=1e-12)
    assert moments.mean == pytest.approx(2.5, rel=1e-12)
    assert moments.var == pytest.approx(1.25, rel=1e-12)
    assert moments.std == pytest.approx(math.sqrt(5 / 3), rel=1e-12)
    assert moments.count == pytest.approx(4.0, rel=1e-12)


def test_running_moments_chan_merge_hand_values():
    """Chan's parallel merge of [1,2,3,4] then [10] equals the statistics of
    [1,2,3,4,10]: mean 4, biased var (9+4+1+0+36)/5 = 10, std sqrt(50/4); a
    one-element batch returns std 0.0 (MOSS would divide by zero).
    """
    moments = RunningMoments()
    moments.update(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert moments.update(torch.tensor([10.0])) == (10.0, 0.0)
    assert moments.mean == pytest.approx(4.0, rel=1e-12)
    assert moments.var == pytest.approx(10.0, rel=1e-12)
    assert moments.std == pytest.approx(math.sqrt(12.5), rel=1e-12)
    assert moments.count == pytest.approx(5.0, rel=1e-12)


def test_running_moments_match_numpy_over_batches_of_different_sizes():
    """After batches of sizes 5, 1, 17, 3, 64 from different distributions: mean and var
    equal numpy's mean and biased var (ddof=0) of the concatenation, std equals numpy's
    std with ddof=1; each call returns that batch's (mean, std ddof=1).
    """
    rng = np.random.default_rng(7)
    batches = [rng.normal(loc, scale, size) for loc, scale, size in [(3, 2, 5), (-1, 1, 1), (10, 0.5, 17), (0, 5, 3), (2, 1, 64)]]
    moments = RunningMoments()
    for batch in batches:
        returned = moments.update(torch.from_numpy(batch).reshape(1, -1))
        expected_std = float(np.std(batch, ddof=1)) if batch.size > 1 else 0.0
        assert returned == pytest.approx((float(np.mean(batch)), expected_std), rel=1e-10, abs=1e-12)
    everything = np.concatenate(batches)
    assert moments.mean == pytest.approx(float(np.mean(everything)), rel=1e-10)
    assert moments.var == pytest.approx(float(np.var(everything)), rel=1e-10)
    assert moments.std == pytest.approx(float(np.std(everything, ddof=1)), rel=1e-10)
    assert moments.count == pytest.approx(everything.size, rel=1e-12)


def test_running_moments_masked_update_ignores_masked_entries():
    """A masked update equals an update on the valid values only (padding +-1e9 ignored);
    an all-masked batch returns (0.0, 0.0) and leaves the state unchanged.
    """
    masked, plain = RunningMoments(), RunningMoments()
    assert masked.update(X_PADDED, M_PADDED) == pytest.approx(plain.update(torch.tensor(VALID, dtype=torch.float32)))
    assert masked.state_dict() == pytest.approx(plain.state_dict(), rel=1e-12)
    assert masked.mean == pytest.approx(2.5) and masked.var == pytest.approx(1.25)

    before = masked.state_dict()
    assert masked.update(X_PADDED, torch.zeros_like(M_PADDED)) == (0.0, 0.0)
    assert masked.state_dict() == before


def test_running_moments_state_dict_round_trip():
    """state_dict holds mean, var, count; loading it into a fresh object restores the
    state, and both continue identically.
    """
    original = RunningMoments()
    original.update(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    original.update(torch.tensor([10.0, -2.0]))
    state = original.state_dict()
    assert set(state) == {"mean", "var", "count"}

    restored = RunningMoments()
    restored.load_state_dict(dict(state))
    assert restored.state_dict() == state and restored.std == original.std
    batch = torch.tensor([0.5, 7.0, -3.0])
    assert restored.update(batch) == original.update(batch)
    assert restored.state_dict() == original.state_dict()
