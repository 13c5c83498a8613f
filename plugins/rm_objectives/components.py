"""The objective components: each checks the batch, calls one function of ``losses`` and
returns a :class:`rlhfkit.LossTerm` with namespaced metrics.

``needs_lm`` tells the reward-model algorithm whether to fill ``RewardBatch.best_nll``
(only ``lm-loss`` needs the LM head).
"""

from __future__ import annotations

from typing import Any

import torch

from rlhfkit import LossTerm, RewardBatch
from rlhfkit.plugins.rm_objectives import losses


def check_batch(batch: RewardBatch, objective: str) -> None:
    """Raise a ValueError naming ``objective`` when the batch's tensors disagree in shape."""
    shape = tuple(batch.scores.shape)
    problems = []
    if len(shape) != 2:
        problems.append(f"scores must be [B, K], got shape {list(shape)}")
    for name in ("ranks", "valid"):
        if tuple(getattr(batch, name).shape) != shape:
            problems.append(f"{name} has shape {list(getattr(batch, name).shape)}, scores {list(shape)}")
    if batch.valid.dtype != torch.bool:
        problems.append(f"valid must be a bool tensor, got {batch.valid.dtype}")
    for name in ("margins", "best_nll"):
        value = getattr(batch, name)
        if value is not None and tuple(value.shape) != shape[:1]:
            problems.append(f"{name} must be [B] = {list(shape[:1])}, got {list(value.shape)}")
    if problems:
        raise ValueError(f"objective {objective!r} got a malformed RewardBatch: " + "; ".join(problems))


def _ranking_term(loss: torch.Tensor, batch: RewardBatch) -> LossTerm:
    return LossTerm(loss, losses.ranking_metrics(batch.scores, batch.ranks, batch.valid))


class Pairwise:
    """Bradley–Terry on pairs: ``−mean log σ(r_w − r_l)``."""

    needs_lm = False

    def __init__(self, config: Any, context: Any = None):
        self.log_eps = config.log_eps

    def __call__(self, batch: RewardBatch) -> LossTerm:
        check_batch(batch, "pairwise")
        return _ranking_term(losses.pairwise_loss(batch.scores, batch.ranks, batch.valid, self.log_eps), batch)


class KWise:
    """InstructGPT: all C(K,2) pairs of a prompt as one batch element."""

    needs_lm = False

    def __init__(self, config: Any, context: Any = None):
        del config  # no settings

    def __call__(self, batch: RewardBatch) -> LossTerm:
        check_batch(batch, "kwise")
        return _ranking_term(losses.kwise_loss(batch.scores, batch.ranks, batch.valid), batch)


class BestOfN:
    """Ziegler et al. 2019: cross-entropy of the softmax over K scores, target the best."""

    needs_lm = False

    def __init__(self, config: Any, context: Any = None):
        del config  # no settings

    def __call__(self, batch: RewardBatch) -> LossTerm:
        check_batch(batch, "best-of-n")
        return _ranking_term(losses.best_of_n_loss(batch.scores, batch.ranks, batch.valid), batch)


class Ties:
    """Christiano et al. 2017: soft labels, (0.5, 0.5) for a tie, optional noise model."""

    needs_lm = False

    def __init__(self, config: Any, context: Any = None):
        self.noise = config.noise

    def __call__(self, batch: RewardBatch) -> LossTerm:
        check_batch(batch, "ties")
        return _ranking_term(losses.ties_loss(batch.scores, batch.ranks, batch.valid, self.noise), batch)


class Margin:
    """Llama-2: ``−log σ(r_w − r_l − scale · margin)``."""

    needs_lm = False

    def __init__(self, config: Any, context: Any = None):
        self.scale = config.scale

    def __call__(self, batch: RewardBatch) -> LossTerm:
        check_batch(batch, "margin")
        if batch.margins is None:
            raise ValueError(
                "objective 'margin' needs a margin per pair, but the data has no margins. Give every "
                "preference row a numeric `margin` field (the label strength), or for a built-in task set "
                "`preference_margins: true` on the task; otherwise use objective `pairwise`.")
        loss = losses.margin_loss(batch.scores, batch.ranks, batch.valid, batch.margins, self.scale)
        return _ranking_term(loss, batch)


class LMLoss:
    """Askell et al. 2021: ``coef · mean NLL`` of the best completion under the LM head."""

    needs_lm = True

    def __init__(self, config: Any, context: Any = None):
        self.coef = config.coef

    def __call__(self, batch: RewardBatch) -> LossTerm:
        check_batch(batch, "lm-loss")
        if batch.best_nll is None:
            raise ValueError(
                "regularizer 'lm-loss' needs RewardBatch.best_nll (the LM loss of each prompt's best "
                "completion), but it is None: the algorithm must compute it for objectives with "
                "`needs_lm = True`. Remove lm-loss or use an algorithm that supports it (reward-model).")
        nll = batch.best_nll.detach().float().mean()
        return LossTerm(losses.lm_loss(batch.best_nll, self.coef), {"rm/lm_nll": nll})


class Centering:
    """Eisenstein et al. 2023: ``coef · mean((r_w + r_l)²)`` keeps rewards near 0."""

    needs_lm = False

    def __init__(self, config: Any, context: Any = None):
        self.coef = config.coef

    def __call__(self, batch: RewardBatch) -> LossTerm:
        check_batch(batch, "centering")
        penalty = losses.centering_penalty(batch.scores, batch.valid)
        return LossTerm(self.coef * penalty, {"rm/center": penalty.detach()})
