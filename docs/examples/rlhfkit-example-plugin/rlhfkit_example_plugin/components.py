"""The example plugin's algorithmic components: an advantage estimator, a preference
objective and a reward-shaping constraint. Imported only when a stage builds one of them
(``rlhfkit.lazy``), so listing and validating never import torch from here.

Each follows docs/contracts.md: per-token rollout tensors hold anything (NaN) in padding,
so they select with ``torch.where`` and never multiply by the mask.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

import rlhfkit


class WhitenedReturn:
    """Advantage estimator ``whitened-return``: ``A_t = (R - mean R) / (std R + eps)`` on
    every real token, R the sum of the response's token rewards, mean and std over the
    batch (unbiased std; one response: 0). No critic."""

    critic = None

    def __init__(self, config: Any, context: Any = None):
        self.config = config

    def estimate(self, rollout: rlhfkit.Rollout) -> rlhfkit.Advantages:
        real = rollout.response_mask != 0
        zero = torch.zeros((), dtype=rollout.rewards.dtype)
        returns = torch.where(real, rollout.rewards, zero).sum(dim=1)  # [B]
        std = returns.std() if len(returns) > 1 else zero
        whitened = (returns - returns.mean()) / (std + self.config.eps)
        advantages = torch.where(real, whitened[:, None].expand_as(rollout.rewards), zero)
        return rlhfkit.Advantages(advantages, None, {"advantage/raw_mean": float(returns.mean()),
                                                     "advantage/raw_std": float(std)})


class MarginDPO:
    """Preference objective ``margin-dpo``: ``-mean log sigmoid(beta * delta - margin)``,
    ``delta = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))``."""

    needs_reference = True

    def __init__(self, config: Any, context: Any = None):
        self.config = config

    def __call__(self, batch: rlhfkit.PreferenceBatch) -> rlhfkit.LossTerm:
        delta = (batch.chosen - batch.ref_chosen) - (batch.rejected - batch.ref_rejected)
        loss = -F.logsigmoid(self.config.beta * delta - self.config.margin).mean()
        return rlhfkit.LossTerm(loss, {"dpo/loss": loss.detach(),
                                       "margin/satisfied": (self.config.beta * delta > self.config.margin)
                                       .float().mean()})


class LengthPenalty:
    """Constraint ``length-penalty``: ``score -= coef * max(0, length - free)`` for each
    response, ``length`` its tokens (EOS included); before the scores are placed."""

    def __init__(self, config: Any, context: Any = None):
        self.config = config

    def shape_rewards(self, rollout: rlhfkit.Rollout) -> dict[str, float]:
        lengths = rollout.response_mask.sum(dim=1).to(rollout.scores.dtype)
        penalty = self.config.coef * (lengths - self.config.free).clamp(min=0)
        rollout.scores = rollout.scores - penalty
        return {"length/penalty": float(penalty.mean())}
