"""The example plugin's estimator, objective and constraint, tested with rlhfkit.testing
only: the contract run of each kind, then each formula on the kit's toy batches (which
hold NaN in padding, uneven lengths and a one-sample group, as the pipeline can)."""

import torch

from rlhfkit.testing import check_component, make_preference_batch, make_rollout


def test_whitened_return():
    estimator = check_component("estimator", "whitened-return", {"eps": 1e-6})
    rollout = make_rollout()
    out = estimator.estimate(rollout)
    real = rollout.response_mask.bool()
    returns = torch.where(real, rollout.rewards, torch.zeros(())).sum(1)
    whitened = (returns - returns.mean()) / (returns.std() + 1e-6)
    assert torch.allclose(out.advantages[real], whitened[:, None].expand_as(out.advantages)[real])
    assert (out.advantages[~real] == 0).all()


def test_margin_dpo():
    objective = check_component("objective", "margin-dpo", {"beta": 0.5, "margin": 0.2})
    batch = make_preference_batch()
    delta = (batch.chosen - batch.ref_chosen) - (batch.rejected - batch.ref_rejected)
    expected = -torch.nn.functional.logsigmoid(0.5 * delta - 0.2).mean()
    assert torch.allclose(objective(batch).loss, expected)


def test_length_penalty():
    constraint = check_component("constraint", "length-penalty", {"coef": 0.5, "free": 2})
    rollout = make_rollout()
    before = rollout.scores.clone()
    metrics = constraint.shape_rewards(rollout)
    lengths = rollout.response_mask.sum(1).float()
    assert torch.allclose(rollout.scores, before - 0.5 * (lengths - 2).clamp(min=0))
    assert metrics["length/penalty"] >= 0
