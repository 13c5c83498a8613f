"""The critic-free estimator components (see :class:`rlhfkit.Estimator`).

Each reads ``rollout.rewards`` ``[B, T]`` (score on the last real token plus KL-in-reward
terms), ``rollout.response_mask`` and, for group baselines, ``rollout.group``; calls one
function of ``functional``; and returns :class:`rlhfkit.Advantages` with no returns and
its metrics: ``advantage/raw_mean`` and ``/raw_std`` before the algorithm's whitening,
plus ``group/*`` for group baselines and the component's own.
"""

from __future__ import annotations

from typing import Any

import torch

from rlhfkit import Advantages, Rollout, UserError
from rlhfkit.plugins.estimators import (
    GRPOConfig,
    ReinforceConfig,
    ReinforcePlusPlusConfig,
    ReMaxConfig,
    RLOOConfig,
)
from rlhfkit.plugins.estimators.functional import (
    advantage_metrics,
    group_metrics,
    grpo_advantages,
    reinforce_advantages,
    reinforce_plus_plus_advantages,
    remax_advantages,
    rloo_advantages,
    sequence_returns,
)

GREEDY_SCORE = "greedy_score"  # the rollout.extras key of ReMax's baseline


class CriticFree:
    """What every estimator here shares: no critic (so no value loss); the advantages
    come from the rewards alone (never from the log-probs or the reference)."""

    critic = None
    needs_reference = False
    needs_old_logprobs = False


class Reinforce(CriticFree):
    """``A = R − b`` on every real token; ``b`` none or the batch mean of ``R``."""

    def __init__(self, config: ReinforceConfig, context: Any = None):
        self.config = config

    def estimate(self, rollout: Rollout) -> Advantages:
        mask = rollout.response_mask.float()
        advantages = reinforce_advantages(rollout.rewards, mask, self.config.baseline)
        returns = sequence_returns(rollout.rewards, mask)
        baseline = float(returns.mean()) if self.config.baseline == "batch-mean" else 0.0
        return Advantages(advantages, None, {**advantage_metrics(advantages, mask), "reinforce/baseline": baseline})


class RLOO(CriticFree):
    """``A_i = R_i − mean_{j≠i} R_j`` over the samples of the same prompt."""

    def __init__(self, config: RLOOConfig, context: Any = None):
        self.config = config

    def bind(self, algorithm: Any) -> None:
        k = algorithm.config.samples_per_prompt
        if k < 2:
            raise UserError(f"the rloo estimator compares each response with the other responses to its prompt, "
                            f"but algorithm.samples_per_prompt is {k}; set it to 2 or more (TRL's default is 2), "
                            f"or use estimator: reinforce or remax with one response per prompt")

    def estimate(self, rollout: Rollout) -> Advantages:
        mask = rollout.response_mask.float()
        advantages = rloo_advantages(rollout.rewards, mask, rollout.group)
        returns = sequence_returns(rollout.rewards, mask)
        return Advantages(advantages, None, {**advantage_metrics(advantages, mask),
                                             **group_metrics(returns, rollout.group)})


class GRPO(CriticFree):
    """``A_i = (R_i − mean_G) / (std_G + eps)`` (``scale: none``: ``R_i − mean_G``, Dr.GRPO)."""

    def __init__(self, config: GRPOConfig, context: Any = None):
        self.config = config

    def estimate(self, rollout: Rollout) -> Advantages:
        mask = rollout.response_mask.float()
        advantages = grpo_advantages(rollout.rewards, mask, rollout.group, self.config.scale, self.config.eps)
        returns = sequence_returns(rollout.rewards, mask)
        return Advantages(advantages, None, {**advantage_metrics(advantages, mask),
                                             **group_metrics(returns, rollout.group)})


class ReMax(CriticFree):
    """``A = R(y) − b``, ``b`` the reward source's score of the greedy response to the
    same prompt. ``prepare`` decodes and scores one greedy response per prompt of the
    (local) rollout and stores ``b`` ``[B]`` in ``rollout.extras["greedy_score"]``, which
    is gathered and sliced with the rest of the rollout."""

    def __init__(self, config: ReMaxConfig, context: Any = None):
        self.config = config
        self.algorithm: Any = None

    def bind(self, algorithm: Any) -> None:
        self.algorithm = algorithm

    def prepare(self, rollout: Rollout) -> None:
        if self.algorithm is None:
            raise RuntimeError("the remax estimator needs bind(algorithm) before prepare: the algorithm decodes "
                               "the greedy responses (greedy_scores)")
        # greedy decoding is deterministic: one response per prompt serves all its samples
        groups, index = torch.unique(rollout.group, return_inverse=True)
        positions = torch.arange(len(index), device=index.device)
        first = torch.full((len(groups),), len(index), device=index.device).scatter_reduce(
            0, index, positions, reduce="amin")
        scores = self.algorithm.greedy_scores(rollout.select(first))
        rollout.extras[GREEDY_SCORE] = scores.float().to(rollout.response_mask.device)[index.to(scores.device)]

    def estimate(self, rollout: Rollout) -> Advantages:
        if GREEDY_SCORE not in rollout.extras:
            raise RuntimeError(f"the remax estimator found no rollout.extras[{GREEDY_SCORE!r}]: its prepare(rollout) "
                               "must run on the rollout before estimate (the ppo algorithm calls it after scoring)")
        mask = rollout.response_mask.float()
        baseline = rollout.extras[GREEDY_SCORE]
        advantages = remax_advantages(rollout.rewards, mask, baseline)
        returns = sequence_returns(rollout.rewards, mask)
        return Advantages(advantages, None, {**advantage_metrics(advantages, mask),
                                             "remax/greedy_score": float(baseline.mean()),
                                             "remax/beats_greedy": float((returns > baseline).float().mean())})


class ReinforcePlusPlus(CriticFree):
    """Reward-to-go of the token rewards whitened over the batch (REINFORCE++), with the
    group mean of ``R`` subtracted first under ``baseline: group-mean``."""

    def __init__(self, config: ReinforcePlusPlusConfig, context: Any = None):
        self.config = config

    def estimate(self, rollout: Rollout) -> Advantages:
        mask = rollout.response_mask.float()
        group = rollout.group if self.config.baseline == "group-mean" else None
        advantages = reinforce_plus_plus_advantages(rollout.rewards, mask, self.config.gamma, group)
        metrics = advantage_metrics(advantages, mask)
        if group is not None:
            metrics.update(group_metrics(sequence_returns(rollout.rewards, mask), group))
        return Advantages(advantages, None, metrics)
