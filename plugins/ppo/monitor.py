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
         "response/length": float(mask.sum(1).mean()),
         "response/eos_rate": 1.0 - float(rollout.truncated.float().mean()),
         "response/perplexity": math.exp(-float(masked_mean(rollout.logprobs, mask))),
         "advantage/mean": float(masked_mean(rollout.advantages, mask)),
         "advantage/std": float(masked_var(rollout.advantages, mask).sqrt())}
    if rollout.ref_logprobs is not None:
        m["kl/ref"] = float(sequence_kl(rollout.logprobs, rollout.ref_logprobs, mask).mean())
    if rollout.returns is not None:
        m["return/mean"] = float(masked_mean(rollout.returns, mask))
    if gold is not None:
        m["gold/score"] = float(gold.score(rollout.prompts, rollout.responses).mean())
    return m


def guardrail_warnings(responses: list[str], kl: float | None, lengths: torch.Tensor) -> list[tuple[str, str]]:
    """``(kind, message)`` for a negative KL estimate (when measured) and for collapse
    to empty or repetitive responses."""
    out = []
    if kl is not None and kl < -0.01:
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


@torch.no_grad()
def mismatch_metrics(pieces: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """The train/inference mismatch over ``(trainer logprobs, mask, engine logprobs)``
    ``[b, T]`` pieces of the same weights: mean and max ``|trainer − engine|`` per real
    token, and the k3 estimate of KL(engine ‖ trainer) from the engine's samples,
    ``mean((r − 1) − log r)`` with ``r = π_trainer / π_engine``."""
    total, count, largest, k3 = 0.0, 0.0, 0.0, 0.0
    for trainer, mask, engine in pieces:
        real = mask.bool()
        log_r = (trainer.float() - engine.float().to(trainer.device))[real.to(trainer.device)]
        total += float(log_r.abs().sum())
        count += float(log_r.numel())
        largest = max(largest, float(log_r.abs().max())) if log_r.numel() else largest
        k3 += float((torch.expm1(log_r) - log_r).sum())
    count = max(count, 1.0)
    return {"mismatch/logprob_abs_mean": total / count, "mismatch/logprob_abs_max": largest,
            "mismatch/kl_k3": k3 / count}
