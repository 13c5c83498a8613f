"""The ``ppo-clip`` (spec §F) and ``gspo`` policy objectives."""

from __future__ import annotations

from typing import Any

from rlhfkit import LossTerm, PolicyOutput, Rollout
from rlhfkit.plugins.ppo import GSPOConfig, PPOClipConfig
from rlhfkit.plugins.ppo.functional import gspo_loss, policy_loss, tis_weights


class PPOClip:
    """``ρ = exp(logp − old)``, ``L = max(−A·ρ, −A·clip(ρ, 1−ε_low, 1+ε_high))``
    (optionally dual-clipped), weighted by ``min(exp(old − engine), tis_cap)`` when
    ``tis_cap`` is set, aggregated over tokens as configured."""

    needs_reference = False

    def __init__(self, config: PPOClipConfig, context: Any = None):
        self.config = config

    def __call__(self, minibatch: Rollout, output: PolicyOutput) -> LossTerm:
        c = self.config
        weights, extra = None, {}
        if c.tis_cap is not None and minibatch.engine_logprobs is not None:
            weights, extra = tis_weights(minibatch.logprobs, minibatch.engine_logprobs, output.mask, c.tis_cap)
        loss, metrics = policy_loss(output.logprobs, minibatch.logprobs, minibatch.advantages, output.mask,
                                    clip_low=c.clip_low, clip_high=c.clip_high, dual_clip=c.dual_clip,
                                    aggregation=c.aggregation, constant=self._constant(output), weights=weights)
        return LossTerm(loss, {"policy/loss": loss.detach(), **metrics, **extra})

    def _constant(self, output: PolicyOutput) -> float | None:
        if self.config.aggregation == "global-token-mean":
            return output.global_tokens
        if self.config.aggregation == "token-sum-norm":
            return output.max_tokens
        return None


class GSPO:
    """Group Sequence Policy Optimization: ``s_i = exp(mean_t(logp − old))`` per sequence,
    ``L = mean_i max(−A_i·s_i, −A_i·clip(s_i, 1−ε_low, 1+ε_high))``
    (:func:`rlhfkit.plugins.ppo.functional.gspo_loss`)."""

    needs_reference = False

    def __init__(self, config: GSPOConfig, context: Any = None):
        self.config = config

    def __call__(self, minibatch: Rollout, output: PolicyOutput) -> LossTerm:
        loss, metrics = gspo_loss(output.logprobs, minibatch.logprobs, minibatch.advantages, output.mask,
                                  clip_low=self.config.clip_low, clip_high=self.config.clip_high)
        return LossTerm(loss, {"policy/loss": loss.detach(), **metrics})
