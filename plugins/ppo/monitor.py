"""What a PPO iteration reports: rollout metrics and the guardrail warnings (each with a
pointer to docs/ppo-details.md)."""

from __future__ import annotations

import math
from typing import Any

import torch

from rlhfkit import Rollout, masked_mean, masked_var
from rlhfkit.plugins.ppo.functional import sequence_kl

DOCS = "docs/ppo-details.md"


def rollout_metrics(rollout: Rollout, raw_scores: torch.Tensor, gold: Any | None) -> dict[str, float]:
    """Rewards, KL to the reference (summed k1 per response), lengths, perplexity,
    advantage and return statistics, and the gold score when a ``gold`` reward is given."""
    mask = rollout.response_mask.float()
    m = {"reward/score": float(raw_scores.mean()), "reward/shaped_score": float(rollout.scores.mean()),
         "reward/token_sum": float((rollout.rewards * mask).sum(1).mean()),
         "kl/ref": float(sequence_kl(rollout.logprobs, rollout.ref_logprobs, mask).mean()),
         "response/length": float(mask.sum(1).mean()),
         "response/eos_rate": 1.0 - float(rollout.truncated.float().mean()),
         "response/perplexity": math.exp(-float(masked_mean(rollout.logprobs, mask))),
         "advantage/mean": float(masked_mean(rollout.advantages, mask)),
         "advantage/std": float(masked_var(rollout.advantages, mask).sqrt())}
    if rollout.returns is not None:
        m["return/mean"] = float(masked_mean(rollout.returns, mask))
    if gold is not None:
        m["gold/score"] = float(gold.score(rollout.prompts, rollout.responses).mean())
    return m


def guardrail_warnings(responses: list[str], kl: float, lengths: torch.Tensor) -> list[tuple[str, str]]:
    """``(kind, message)`` for a negative KL estimate and for collapse to empty or
    repetitive responses."""
    out = []
    if kl < -0.01:
        out.append(("negative-kl", (f"the estimated KL to the reference is negative ({kl:.3f}): the sampling and "
                                   f"scoring distributions differ (temperature, top-k/top-p). See {DOCS}#negative-kl.")))
    if float((lengths <= 1).float().mean()) > 0.5:
        out.append(("collapse-empty", (f"over half the responses are empty or EOS only: the policy collapsed. "
                                      f"See {DOCS}#collapse.")))
    words = [r.split() for r in responses]
    repetitive = [len(set(w)) / len(w) < 0.3 for w in words if len(w) >= 8]
    if repetitive and sum(repetitive) / len(words) > 0.5:
        out.append(("collapse-repeat", (f"over half the responses repeat a few words: the policy collapsed "
                                       f"(reward hacking?). See {DOCS}#collapse.")))
    return out
