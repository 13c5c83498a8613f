"""The ``composite`` reward: ``score = Σ_i weight_i · score_i``, with every term logged."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rlhfkit import provides, score_rows

TOTAL = "total"


class CompositeReward:
    """A weighted sum of reward sources.

    Attributes:
        terms: ``(key, weight, reward source)`` in recipe order; ``key`` is
            ``"<index>:<name>"`` (``"0:gold"``), unique even when a reward appears twice.
    """

    def __init__(self, terms: list[tuple[str, float, Any]]):
        self.terms = terms

    def to(self, device: Any) -> CompositeReward:
        """Move the terms that hold models (a reward model) to ``device``."""
        for _, _, reward in self.terms:
            if provides(reward, "to"):
                reward.to(device)
        return self

    def score(self, prompts: Sequence[Any], responses: Sequence[str],
              fields: Sequence[dict[str, Any]] | None = None) -> torch.Tensor:
        """``[B]`` float scores: the weighted sum (``fields`` go to the terms that read them)."""
        return self.score_terms(prompts, responses, fields)[TOTAL]

    def score_terms(self, prompts: Sequence[Any], responses: Sequence[str],
                    fields: Sequence[dict[str, Any]] | None = None) -> dict[str, torch.Tensor]:
        """Each term's unweighted ``[B]`` score by key, and the weighted sum as ``"total"``.

        A nested composite's own terms appear under its key (``"1:composite/0:gold"``).
        Everything is on the device of the first term's scores.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"reward 'composite': got {len(prompts)} prompts but "
                             f"{len(responses)} responses; pass one response per prompt.")
        scores: dict[str, torch.Tensor] = {}
        total: torch.Tensor | None = None
        for key, weight, reward in self.terms:
            if isinstance(reward, CompositeReward):
                parts = reward.score_terms(prompts, responses, fields)
            else:
                parts = {TOTAL: score_rows(reward, prompts, responses, fields)}
            term = parts.pop(TOTAL)
            if term.shape != (len(prompts),):
                raise ValueError(f"reward 'composite': term {key} returned scores of shape "
                                 f"{tuple(term.shape)}; a reward source returns [B] = "
                                 f"[{len(prompts)}] scores.")
            device = term.device if total is None else total.device
            scores.update({f"{key}/{part}": value.to(device) for part, value in parts.items()})
            scores[key] = term = term.to(device, torch.float32)
            total = weight * term if total is None else total + weight * term
        scores[TOTAL] = total
        return scores
