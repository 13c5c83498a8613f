"""Reward-model objectives (spec §B) against hand-computed numbers.

Expected values are written with ``math`` from the formulas in docs/reward-objectives.md,
never with the torch expression under test.
"""

from __future__ import annotations

import math
from itertools import combinations

import pytest
import torch

import rlhfkit
from rlhfkit.plugins.rm_objectives import (
    BestOfNConfig,
    CenteringConfig,
    KWiseConfig,
    LMLossConfig,
    MarginConfig,
    PairwiseConfig,
    TiesConfig,
    losses,
)
from rlhfkit.plugins.rm_objectives.components import (
    BestOfN,
    Centering,
    KWise,
    LMLoss,
    Margin,
    Pairwise,
    Ties,
)

NAMES = ["pairwise", "kwise", "best-of-n", "ties", "margin", "lm-loss", "centering"]


def softplus(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x), written out."""
    return math.log1p(math.exp(x))


def bt(gap: float) -> float:
    """-log sigmoid(gap)."""
    return softplus(-gap)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def batch(scores, ranks, valid=None, margins=None, best_nll=None, grad=False) -> rlhfkit.RewardBatch:
    s = torch.tensor(scores, dtype=torch.float32, requires_grad=grad)
    r = torch.tensor(ranks, dtype=torch.long)
    v = torch.ones_like(r, dtype=torch.bool) if valid is None else torch.tensor(valid, dtype=torch.bool)
    return rlhfkit.RewardBatch(
        scores=s, ranks=r, valid=v,
        margins=None if margins is None else torch.tensor(margins, dtype=torch.float32),
        best_nll=None if best_nll is None else torch.tensor(best_nll, dtype=torch.float32))


def args(b: rlhfkit.RewardBatch):
    return b.scores, b.ranks, b.valid


def random_batch(B: int, K: int, seed: int, ties: bool = True, pad: bool = True) -> rlhfkit.RewardBatch:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, K, generator=g) * 2
    if ties:
        ranks = torch.randint(0, K, (B, K), generator=g)
    else:  # a random permutation of 0..K-1 per prompt
        ranks = torch.argsort(torch.argsort(torch.rand(B, K, generator=g), dim=1), dim=1)
    valid = torch.rand(B, K, generator=g) > 0.2 if pad else torch.ones(B, K, dtype=torch.bool)
    return rlhfkit.RewardBatch(scores=scores.requires_grad_(), ranks=ranks, valid=valid)


# ------------------------------------------------------------------- pairwise


def test_pairwise_is_bradley_terry_and_follows_ranks_not_columns():
    # row 0: chosen first, gap 1; row 1: chosen first, gap -2; row 2: ranks say column 1 wins, gap 3
    b = batch([[1.0, 0.0], [0.0, 2.0], [-1.0, 2.0]], [[0, 1], [0, 1], [1, 0]])
    expected = (bt(1.0) + bt(-2.0) + bt(3.0)) / 3
    assert losses.pairwise_loss(*args(b)).item() == pytest.approx(expected, abs=1e-6)


def test_pairwise_leaves_ties_and_padded_rows_out_of_the_mean():
    b = batch([[1.0, 0.0], [5.0, -5.0], [3.0, 9.0]], [[0, 1], [0, 0], [0, 1]],
              valid=[[True, True], [True, True], [True, False]])
    assert losses.pairwise_loss(*args(b)).item() == pytest.approx(bt(1.0), abs=1e-6)


def test_pairwise_log_eps_is_moss_formula_and_bounds_the_loss():
    b = batch([[1.0, 0.0], [0.0, 100.0]], [[0, 1], [0, 1]])
    eps = 1e-5
    expected = (-math.log(sigmoid(1.0) + eps) - math.log(sigmoid(-100.0) + eps)) / 2
    assert losses.pairwise_loss(*args(b), log_eps=eps).item() == pytest.approx(expected, rel=1e-5)
    # without eps logsigmoid stays exact for a huge gap: (bt(1) + ~100) / 2
    assert losses.pairwise_loss(*args(b)).item() == pytest.approx((bt(1.0) + 100.0) / 2, rel=1e-6)


def test_pairwise_gradient_is_minus_sigmoid_of_minus_gap():
    b = batch([[1.0, 0.0]], [[0, 1]], grad=True)
    losses.pairwise_loss(*args(b)).backward()
    g = 1.0 / (1.0 + math.e)  # sigmoid(-1)
    assert b.scores.grad.tolist()[0] == pytest.approx([-g, g], abs=1e-6)


def test_pairwise_rejects_rankings_and_points_to_kwise():
    b = batch([[1.0, 0.0, 2.0]], [[0, 1, 2]])
    with pytest.raises(ValueError, match="kwise"):
        Pairwise(PairwiseConfig())(b)


# ---------------------------------------------------------------------- kwise


@pytest.mark.parametrize("seed", range(5))
def test_kwise_equals_pairwise_when_k_is_2(seed):
    b = random_batch(64, 2, seed)
    assert torch.allclose(losses.kwise_loss(*args(b)), losses.pairwise_loss(*args(b)), atol=1e-7, rtol=0)


def test_kwise_is_the_mean_over_all_six_pairs():
    scores = [2.0, 1.0, 0.5, -1.0]
    ranks = [1, 0, 3, 2]  # best is column 1, then 0, then 3, then 2
    order = sorted(range(4), key=lambda k: ranks[k])
    pair_losses = [bt(scores[i] - scores[j]) for i, j in combinations(order, 2)]
    assert len(pair_losses) == 6
    second = [0.0, 0.0, 0.0, 0.0]  # all equal scores: every pair costs log 2
    b = batch([scores, second], [ranks, [0, 1, 2, 3]])
    expected = (sum(pair_losses) / 6 + math.log(2)) / 2
    assert losses.kwise_loss(*args(b)).item() == pytest.approx(expected, abs=1e-6)


def test_kwise_with_ties_averages_over_strict_pairs_only():
    b = batch([[1.0, 0.0, -1.0]], [[0, 0, 1]])  # pairs (0,2) and (1,2); (0,1) is a tie
    expected = (bt(2.0) + bt(1.0)) / 2
    assert losses.kwise_loss(*args(b)).item() == pytest.approx(expected, abs=1e-6)


# ------------------------------------------------------------------ best-of-n


def test_best_of_n_is_cross_entropy_with_the_best():
    scores = [1.0, 2.0, 3.0, 0.0]
    b = batch([scores], [[1, 0, 2, 3]])
    lse = math.log(sum(math.exp(s) for s in scores))
    assert losses.best_of_n_loss(*args(b)).item() == pytest.approx(lse - 2.0, abs=1e-6)


def test_best_of_n_tied_best_has_a_uniform_target():
    scores = [1.0, 2.0, 3.0, 0.0]
    b = batch([scores], [[0, 0, 1, 2]])
    lse = math.log(sum(math.exp(s) for s in scores))
    expected = 0.5 * (lse - 1.0) + 0.5 * (lse - 2.0)
    assert losses.best_of_n_loss(*args(b)).item() == pytest.approx(expected, abs=1e-6)


# ----------------------------------------------------------------------- ties


def test_ties_equal_scores_cost_exactly_log_2():
    b = batch([[0.0, 0.0]], [[0, 0]])
    assert losses.ties_loss(*args(b)).item() == pytest.approx(math.log(2), abs=1e-7)


def test_ties_tied_pair_with_different_scores():
    b = batch([[1.0, 0.0]], [[0, 0]])
    # -0.5 log sigmoid(1) - 0.5 log sigmoid(-1) = 0.5 (log(1+e^-1) + log(1+e)) = 0.5 + log(1+e^-1)
    expected = 0.5 + math.log1p(math.exp(-1.0))
    assert losses.ties_loss(*args(b)).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.8132616875, abs=1e-9)


def test_ties_strict_pair_is_bradley_terry():
    b = batch([[1.0, 0.0], [0.0, 0.0]], [[0, 1], [0, 0]])
    assert losses.ties_loss(*args(b)).item() == pytest.approx((bt(1.0) + math.log(2)) / 2, abs=1e-6)


def test_ties_noise_model():
    b = batch([[2.0, 0.0], [1.0, 0.0], [0.0, 60.0]], [[0, 1], [0, 0], [0, 1]])

    def p(gap: float) -> float:  # "P = 0.9 softmax + 0.05"
        return 0.9 * sigmoid(gap) + 0.05

    strict = -math.log(p(2.0))
    tie = -0.5 * math.log(p(1.0)) - 0.5 * math.log(p(-1.0))
    hopeless = -math.log(p(-60.0))  # bounded by -log 0.05
    assert hopeless == pytest.approx(-math.log(0.05), abs=1e-12)
    expected = (strict + tie + hopeless) / 3
    assert losses.ties_loss(*args(b), noise=0.05).item() == pytest.approx(expected, abs=1e-6)


def test_ties_with_k3_averages_every_pair_of_the_prompt():
    b = batch([[1.0, 0.0, 0.0]], [[0, 0, 1]])
    tie01 = 0.5 * bt(1.0) + 0.5 * bt(-1.0)
    expected = (tie01 + bt(1.0) + math.log(2)) / 3  # pairs (0,1) tie, (0,2) gap 1, (1,2) gap 0
    assert losses.ties_loss(*args(b)).item() == pytest.approx(expected, abs=1e-6)


def test_ties_without_ties_equals_kwise():
    b = random_batch(32, 5, seed=3, ties=False)
    assert torch.allclose(losses.ties_loss(*args(b)), losses.kwise_loss(*args(b)), atol=1e-6)


# --------------------------------------------------------------------- margin


def test_margin_shifts_the_gap():
    b = batch([[2.0, 0.0], [0.0, 1.0], [3.0, 3.0]], [[0, 1], [0, 1], [0, 0]], margins=[1.0, 0.0, 2.0])
    assert Margin(MarginConfig())(b).loss.item() == pytest.approx((bt(1.0) + bt(-1.0)) / 2, abs=1e-6)
    half = Margin(MarginConfig(scale=0.5))(b).loss.item()
    assert half == pytest.approx((bt(1.5) + bt(-1.0)) / 2, abs=1e-6)


def test_margin_without_margins_says_where_they_come_from():
    with pytest.raises(ValueError, match="preference_margins: true"):
        Margin(MarginConfig())(batch([[1.0, 0.0]], [[0, 1]]))


def test_margin_zero_is_pairwise():
    b = random_batch(16, 2, seed=1)
    b.margins = torch.zeros(16)
    assert torch.equal(Margin(MarginConfig())(b).loss, Pairwise(PairwiseConfig())(b).loss)


# --------------------------------------------------------------- regularisers


def test_lm_loss_is_coef_times_mean_nll_and_asks_for_the_lm_head():
    b = batch([[1.0, 0.0]] * 3, [[0, 1]] * 3, best_nll=[1.0, 2.0, 4.5])
    term = LMLoss(LMLossConfig(coef=0.5))(b)
    assert term.loss.item() == pytest.approx(0.5 * 7.5 / 3)
    assert term.metrics == {"rm/lm_nll": pytest.approx(2.5)}
    assert LMLoss.needs_lm is True
    assert not any(c.needs_lm for c in (Pairwise, KWise, BestOfN, Ties, Margin, Centering))
    with pytest.raises(ValueError, match="best_nll"):
        LMLoss(LMLossConfig())(batch([[1.0, 0.0]], [[0, 1]]))


def test_centering_matches_the_pair_formula_and_keeps_its_scale_for_k3():
    pairs = batch([[1.0, 2.0], [-1.0, 0.5]], [[0, 1], [0, 1]])
    term = Centering(CenteringConfig())(pairs)
    assert term.loss.item() == pytest.approx(0.01 * (3.0 ** 2 + 0.5 ** 2) / 2)
    assert term.metrics["rm/center"] == pytest.approx((9.0 + 0.25) / 2)
    k3 = batch([[1.0, 2.0, 3.0]], [[0, 1, 2]])
    assert losses.centering_penalty(*args(k3)[::2]).item() == pytest.approx((2 * 2.0) ** 2)


# --------------------------------------------------------------- padding, metrics


PADDED_FUNCTIONS = {
    "kwise": losses.kwise_loss,
    "best-of-n": losses.best_of_n_loss,
    "ties": losses.ties_loss,
    "ties-noise": lambda s, r, v: losses.ties_loss(s, r, v, noise=0.05),
    "centering": lambda s, r, v: losses.centering_penalty(s, v),
}


@pytest.mark.parametrize("name", PADDED_FUNCTIONS)
@pytest.mark.parametrize("garbage", [1e9, float("nan")])
def test_a_padded_completion_changes_nothing(name, garbage):
    fn = PADDED_FUNCTIONS[name]
    three = batch([[0.3, -1.2, 2.0], [1.0, 1.0, -0.5]], [[2, 0, 1], [0, 0, 1]], grad=True)
    four = batch([[0.3, garbage, -1.2, 2.0], [1.0, 1.0, garbage, -0.5]],
                 [[2, 0, 0, 1], [0, 0, 0, 1]],
                 valid=[[True, False, True, True], [True, True, False, True]], grad=True)
    expected, got = fn(*args(three)), fn(*args(four))
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)
    got.backward()
    grad = four.scores.grad
    assert torch.isfinite(grad).all() and grad[0, 1] == 0 and grad[1, 2] == 0


def test_ranking_metrics_count_strict_pairs_only():
    # prompt 0: pairs (0,1) +2 right, (0,2) +1 right, (1,2) -1 wrong; prompt 1: a tie and a pair
    # with equal scores (counted wrong); a padded completion that would be wrong is ignored
    b = batch([[3.0, 1.0, 2.0], [0.0, 5.0, 5.0]], [[0, 1, 2], [0, 0, 1]],
              valid=[[True, True, True], [False, True, True]])
    m = losses.ranking_metrics(*args(b))
    assert m["rm/pairs"] == 4
    assert m["rm/accuracy"] == pytest.approx(2 / 4)
    assert m["rm/margin_mean"] == pytest.approx((2 + 1 - 1 + 0) / 4)
    assert KWise(KWiseConfig())(b).metrics == m


def test_no_pairs_gives_zero_loss_with_a_gradient():
    all_ties = batch([[1.0, 0.0], [2.0, 2.0]], [[0, 0], [1, 1]], margins=[1.0, 1.0], grad=True)
    for objective in (Pairwise(PairwiseConfig()), KWise(KWiseConfig()), Margin(MarginConfig())):
        term = objective(all_ties)
        assert term.loss.item() == 0.0 and term.metrics["rm/pairs"] == 0
        term.loss.backward()
        assert torch.equal(all_ties.scores.grad, torch.zeros(2, 2))
    lonely = batch([[1.0, 7.0]], [[0, 1]], valid=[[True, False]], grad=True)
    for objective in (BestOfN(BestOfNConfig()), Ties(TiesConfig())):
        term = objective(lonely)
        assert term.loss.item() == 0.0
        term.loss.backward()
        assert torch.equal(lonely.scores.grad, torch.zeros(1, 2))


@pytest.mark.parametrize("K", [2, 4])
def test_gradients_flow_without_nan(K):
    b = random_batch(16, K, seed=K)
    b.margins = torch.rand(16)
    b.best_nll = torch.rand(16, requires_grad=True)
    objectives = [KWise(KWiseConfig()), BestOfN(BestOfNConfig()), Ties(TiesConfig(noise=0.05)),
                  LMLoss(LMLossConfig()), Centering(CenteringConfig())]
    if K == 2:
        objectives += [Pairwise(PairwiseConfig(log_eps=1e-5)), Margin(MarginConfig())]
    total = sum(o(b).loss for o in objectives)
    total.backward()
    assert torch.isfinite(b.scores.grad).all() and b.scores.grad.abs().sum() > 0
    assert torch.isfinite(b.best_nll.grad).all()


def test_malformed_batch_is_a_clear_error():
    b = rlhfkit.RewardBatch(scores=torch.zeros(2, 3), ranks=torch.zeros(2, 2, dtype=torch.long),
                            valid=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="objective 'kwise'.*ranks has shape"):
        KWise(KWiseConfig())(b)


# ------------------------------------------------------------------- registry


def test_all_objectives_are_registered_and_build_with_defaults():
    plugins = rlhfkit.load_plugins()
    specs = {s.name: s for s in plugins.registry.specs("objective")}
    assert set(NAMES) <= set(specs)
    b = batch([[1.0, 0.0], [0.0, 0.5]], [[0, 1], [0, 1]], margins=[0.5, 0.5], best_nll=[2.0, 3.0])
    for name in NAMES:
        assert specs[name].kind == "objective" and specs[name].plugin == "rm-objectives"
        component = plugins.registry.build(name, None, kind="objective")
        assert isinstance(component, rlhfkit.Objective)
        term = component(b)
        assert isinstance(term, rlhfkit.LossTerm) and term.loss.dim() == 0 and torch.isfinite(term.loss)
        assert term.metrics and all(key.startswith("rm/") for key in term.metrics)
