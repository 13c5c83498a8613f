"""The constraint components. Each may define ``bind``, ``shape_rewards``, ``loss``,
``after_update`` and ``state_dict``/``load_state_dict`` (see :class:`rlhfkit.Constraint`);
the algorithm calls those it has, in recipe order."""

from __future__ import annotations

import random
from typing import Any

import torch

from rlhfkit import (
    LOSS_MASK,
    LossTerm,
    PolicyOutput,
    PromptCompletion,
    Rollout,
    RunningMoments,
    StageContext,
    UserError,
    encode_pairs,
    kl_estimate,
    labelled_logprobs,
    masked_mean,
    masked_sum,
)
from rlhfkit.plugins.constraints import (
    EntropyConfig,
    KLConfig,
    MissingEOSConfig,
    OverlongFilterConfig,
    OverlongPenaltyConfig,
    PtxConfig,
    ReferenceEMAConfig,
    RewardNormConfig,
    overlong_buffer,
)
from rlhfkit.plugins.ppo.functional import AdaptiveKLController, FixedKLController


class KLPenalty:
    """``r_t -= β k_t`` (placement ``reward``) or ``loss += β · mean_t k_t`` (``loss``);
    β fixed or adapted after each iteration from the mean sequence KL ``Σ_t (logp − ref)``."""

    needs_reference = True

    def __init__(self, config: KLConfig, context: StageContext):
        self.config = config
        # the penalty in the reward and the adaptive controller read the rollout's log-probs
        self.needs_old_logprobs = config.placement == "reward" or config.adaptive is not None
        adaptive = config.adaptive
        self.controller = (AdaptiveKLController(config.coef, adaptive.target, adaptive.horizon) if adaptive
                           else FixedKLController(config.coef))

    def _estimate(self, logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
        return kl_estimate(logprobs, ref_logprobs, self.config.estimator,
                           log_ratio_clamp=self.config.log_ratio_clamp, value_clamp=self.config.value_clamp)

    def shape_rewards(self, rollout: Rollout) -> dict[str, float] | None:
        if self.config.placement != "reward":
            return None
        real = rollout.response_mask != 0
        estimate = self._estimate(rollout.logprobs, rollout.ref_logprobs)
        penalty = torch.where(real, self.controller.value * estimate, torch.zeros((), dtype=estimate.dtype))
        rollout.rewards -= penalty
        return {"kl/coef": self.controller.value, "kl/penalty": float(penalty.sum(1).mean())}

    def loss(self, minibatch: Rollout, output: PolicyOutput) -> LossTerm | None:
        if self.config.placement != "loss":
            return None
        kl = masked_mean(self._estimate(output.logprobs, minibatch.ref_logprobs), output.mask)
        return LossTerm(self.controller.value * kl, {"kl/loss_estimate": kl.detach(),
                                                     "kl/coef": self.controller.value})

    def after_update(self, rollout: Rollout) -> dict[str, float] | None:
        if self.config.adaptive is None:
            return None
        mask = rollout.response_mask.float()
        kl = float(masked_sum(rollout.logprobs - rollout.ref_logprobs, mask, dim=1).mean())
        self.controller.update(kl, len(rollout))
        return {"kl/coef_next": self.controller.value}

    def state_dict(self) -> dict[str, Any]:
        return self.controller.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state)


class RewardNorm:
    """Running moments of the scores, updated with the batch before use; then
    ``r / σ`` (scale), ``(r − μ) / σ`` (normalize) or nothing, then the clip."""

    needs_reference = needs_old_logprobs = False

    def __init__(self, config: RewardNormConfig, context: StageContext):
        self.config = config
        self.moments = RunningMoments()

    def shape_rewards(self, rollout: Rollout) -> dict[str, float]:
        scores = rollout.scores
        if self.config.mode != "none":
            self.moments.update(scores)
            std = max(self.moments.std, 1e-8)
            scores = scores / std if self.config.mode == "scale" else (scores - self.moments.mean) / std
        if self.config.clip is not None:
            scores = scores.clamp(-self.config.clip, self.config.clip)
        rollout.scores = scores
        return {"reward_norm/mean": self.moments.mean, "reward_norm/std": self.moments.std}

    def state_dict(self) -> dict[str, Any]:
        return self.moments.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.moments.load_state_dict(state)


class MissingEOS:
    """``score −= penalty`` where the response hit the length limit without EOS."""

    needs_reference = needs_old_logprobs = False

    def __init__(self, config: MissingEOSConfig, context: StageContext):
        self.penalty = config.penalty

    def shape_rewards(self, rollout: Rollout) -> dict[str, float]:
        rollout.scores = rollout.scores - self.penalty * rollout.truncated.float()
        return {"missing_eos/rate": float(rollout.truncated.float().mean())}


class OverlongPenalty:
    """DAPO's soft overlong punishment: with ``L_max`` = ``sampling.max_new_tokens`` and
    ``L_cache`` the buffer, ``score += 0`` when ``|y| <= L_max − L_cache``, else
    ``score −= penalty · (|y| − (L_max − L_cache)) / L_cache`` (``−penalty`` at the limit)."""

    needs_reference = needs_old_logprobs = False

    def __init__(self, config: OverlongPenaltyConfig, context: StageContext):
        self.config = config
        self.limit: int | None = None
        self.buffer: int | None = None

    def bind(self, algorithm: Any) -> None:
        self.limit = algorithm.config.sampling.max_new_tokens
        self.buffer = overlong_buffer(self.config, self.limit)
        if self.buffer >= self.limit:
            raise UserError(f"constraint overlong-penalty: buffer {self.buffer} must be smaller than "
                            f"sampling.max_new_tokens {self.limit} (the penalty starts at max_new_tokens - buffer)")

    def shape_rewards(self, rollout: Rollout) -> dict[str, float]:
        lengths = rollout.response_mask.sum(1).to(rollout.scores.dtype)
        over = ((lengths - (self.limit - self.buffer)) / self.buffer).clamp(min=0, max=1)
        rollout.scores = rollout.scores - self.config.penalty * over
        return {"overlong/penalty": float((self.config.penalty * over).mean()),
                "overlong/rate": float((over > 0).float().mean())}


class OverlongFilter:
    """DAPO's overlong filtering: a response that hit the length limit without EOS gets a
    loss weight of 0 (``rollout.extras["loss_mask"]``): its tokens are neither in the
    policy loss nor in its token count. Its score still counts in its group's statistics."""

    needs_reference = needs_old_logprobs = False

    def __init__(self, config: OverlongFilterConfig, context: StageContext):
        self.config = config

    def shape_rewards(self, rollout: Rollout) -> dict[str, float]:
        keep = (~rollout.truncated).to(torch.float32)
        if LOSS_MASK in rollout.extras:
            keep = keep * rollout.extras[LOSS_MASK].to(torch.float32)
        rollout.extras[LOSS_MASK] = keep
        return {"overlong/filtered": float(1 - keep.mean())}


class EntropyBonus:
    """``loss −= c_H · H`` (bonus) or ``loss += w · |H − target|`` (MOSS), with H the
    token-mean entropy of the minibatch."""

    needs_reference = needs_old_logprobs = False

    needs_entropy = True

    def __init__(self, config: EntropyConfig, context: StageContext):
        self.config = config

    def loss(self, minibatch: Rollout, output: PolicyOutput) -> LossTerm:
        entropy = masked_mean(output.entropy, output.mask)
        if self.config.target is None:
            loss = -self.config.coef * entropy
        else:
            loss = self.config.coef * (entropy - self.config.target).abs()
        return LossTerm(loss, {"entropy/term": loss.detach()})


class PretrainMix:
    """``loss += γ · NLL`` of a batch of its own data (completion tokens; every token
    of prompt-less text) under the policy, at every micro-batch of the policy loss."""

    needs_reference = needs_old_logprobs = False

    def __init__(self, config: PtxConfig, context: StageContext):
        self.config = config
        rows = context.build(config.data).rows()
        self.rows = [r for r in rows if isinstance(r, PromptCompletion)]
        if not self.rows:
            raise UserError("constraint ptx: its data has no prompt-completion or text rows; point ptx.data at "
                            "text or demonstrations (e.g. {name: builtin, task: reviews, split: pretrain})")
        self.calls = (-1, 0)

    def bind(self, algorithm: Any) -> None:
        self.algorithm = algorithm

    def loss(self, minibatch: Rollout, output: PolicyOutput) -> LossTerm:
        algorithm = self.algorithm
        step = algorithm.global_step
        call = self.calls[1] + 1 if self.calls[0] == step else 0
        self.calls = (step, call)
        rng = random.Random(f"{algorithm.seed}/{algorithm.global_rank}/{step}/{call}")
        batch = rng.sample(self.rows, min(self.config.batch_size, len(self.rows)))
        tokenizer = algorithm.policy.tokenizer
        encoded = encode_pairs(tokenizer, [r.prompt for r in batch], [r.completion for r in batch],
                               self.config.max_length)
        logprobs, labels = labelled_logprobs(algorithm.model, {k: torch.tensor(v, device=algorithm.device)
                                                               for k, v in encoded.items()})
        nll = -masked_mean(logprobs, labels)
        return LossTerm(self.config.coef * nll, {"ptx/nll": nll.detach()})


class ReferenceEMA:
    """``θ_ref ← η θ + (1 − η) θ_ref`` every ``every``-th call of ``after_update`` (PPO:
    after each iteration; DPO: after each optimizer step, TR-DPO's soft update)."""

    needs_reference = needs_old_logprobs = False

    def __init__(self, config: ReferenceEMAConfig, context: StageContext):
        self.rate = config.rate
        self.every = config.every
        self.calls = 0

    def bind(self, algorithm: Any) -> None:
        if algorithm.reference is None:
            raise UserError("constraint reference-ema needs a reference model of its own; with LoRA and no "
                            "`reference:` the reference is the adapter switched off. Set `reference:` explicitly.")
        self.algorithm = algorithm

    @torch.no_grad()
    def after_update(self, rollout: Rollout | None) -> dict[str, float] | None:
        self.calls += 1
        if self.calls % self.every:
            return None
        policy = self.algorithm.policy.plain_model() if hasattr(self.algorithm.model, "merge_and_unload") \
            else self.algorithm.model
        drift = 0.0
        for ref_param, param in zip(self.algorithm.reference.parameters(), policy.parameters(), strict=True):
            ref_param.lerp_(param.detach().to(ref_param.dtype), self.rate)
            drift += float((param - ref_param).pow(2).sum())
        return {"reference_ema/distance": drift ** 0.5}

    def state_dict(self) -> dict[str, int]:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.calls = state["calls"]
