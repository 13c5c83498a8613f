"""The direct preference objectives: each turns a :class:`rlhfkit.PreferenceBatch` into a
:class:`rlhfkit.LossTerm` with one function of ``losses``. ``needs_reference = False``
tells the ``dpo`` algorithm to skip the reference forward (SimPO, ORPO);
``accepts_unpaired = True`` that the objective also takes a :class:`rlhfkit.FeedbackBatch`
of unpaired rows (KTO)."""

from __future__ import annotations

from typing import Any

import torch

from rlhfkit import FeedbackBatch, LossTerm, PreferenceBatch
from rlhfkit.plugins.dpo import losses


def _mean_logps(batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    return (_per_token(batch.chosen, batch.chosen_tokens), _per_token(batch.rejected, batch.rejected_tokens))


def _per_token(logps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean token log-prob, at least float32 (float64 stays float64)."""
    return losses.wide(logps) / tokens.clamp(min=1)


def _delta(batch: PreferenceBatch) -> torch.Tensor:
    return losses.margin(batch.chosen, batch.rejected, batch.ref_chosen, batch.ref_rejected)


class _WithReference:
    needs_reference = True

    def __init__(self, config: Any, context: Any = None):
        self.config = config

    def _term(self, per_pair: torch.Tensor) -> LossTerm:
        loss = per_pair.mean()
        return LossTerm(loss, {"dpo/loss": loss.detach()})


class DPO(_WithReference):
    def __call__(self, batch: PreferenceBatch) -> LossTerm:
        return self._term(losses.dpo(_delta(batch), self.config.beta))


class ConservativeDPO(_WithReference):
    def __call__(self, batch: PreferenceBatch) -> LossTerm:
        return self._term(losses.cdpo(_delta(batch), self.config.beta, self.config.label_smoothing))


class RobustDPO(_WithReference):
    def __call__(self, batch: PreferenceBatch) -> LossTerm:
        return self._term(losses.robust_dpo(_delta(batch), self.config.beta, self.config.label_noise))


class IPO(_WithReference):
    def __call__(self, batch: PreferenceBatch) -> LossTerm:
        pc, pr = _mean_logps(batch)
        rc = _per_token(batch.ref_chosen, batch.chosen_tokens)
        rr = _per_token(batch.ref_rejected, batch.rejected_tokens)
        return self._term(losses.ipo(losses.margin(pc, pr, rc, rr), self.config.beta))


class Hinge(_WithReference):
    def __call__(self, batch: PreferenceBatch) -> LossTerm:
        return self._term(losses.hinge(_delta(batch), self.config.beta))


class SimPO(_WithReference):
    needs_reference = False

    def __call__(self, batch: PreferenceBatch) -> LossTerm:
        mean_w, mean_l = _mean_logps(batch)
        return self._term(losses.simpo(mean_w, mean_l, self.config.beta, self.config.gamma))


class ORPO(_WithReference):
    needs_reference = False

    def __call__(self, batch: PreferenceBatch) -> LossTerm:
        mean_w, mean_l = _mean_logps(batch)
        per_pair = losses.orpo(mean_w, mean_l, -mean_w, self.config.lam)
        loss = per_pair.mean()
        return LossTerm(loss, {"dpo/loss": loss.detach(), "orpo/nll_chosen": (-mean_w).mean().detach()})


class KTO(_WithReference):
    """KTO on unpaired rows (a :class:`FeedbackBatch`), or on pairs taken apart: every
    chosen response is a desirable example and every rejected one an undesirable example
    (TRL's unpairing). The reference point ``z0`` comes from the batch's mismatched
    (prompt, completion) pairs."""

    needs_mismatched = True
    accepts_unpaired = True

    def __call__(self, batch: PreferenceBatch | FeedbackBatch) -> LossTerm:
        if isinstance(batch, PreferenceBatch):
            batch = _taken_apart(batch)
        c = self.config
        z0 = losses.kto_reference_point(batch.mismatched, batch.ref_mismatched)
        per_row = losses.kto(losses.log_ratio(batch.logps, batch.ref_logps), batch.desirable, z0, c.beta,
                             c.desirable_weight, c.undesirable_weight)
        loss = per_row.mean()
        return LossTerm(loss, {"dpo/loss": loss.detach(), "kto/z0": z0})


def _taken_apart(batch: PreferenceBatch) -> FeedbackBatch:
    """The ``2B`` responses of ``B`` pairs as unpaired rows: chosen ones desirable."""
    chosen = torch.ones_like(batch.chosen, dtype=torch.bool)
    return FeedbackBatch(torch.cat([batch.chosen, batch.rejected]),
                         torch.cat([batch.chosen_tokens, batch.rejected_tokens]),
                         torch.cat([chosen, ~chosen]), torch.cat([batch.ref_chosen, batch.ref_rejected]),
                         batch.mismatched, batch.ref_mismatched)
