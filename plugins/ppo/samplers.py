"""Prompt samplers (kind ``sampler``): which prompts an iteration of PPO/GRPO samples.

- ``shuffle``: consecutive passes over seeded permutations of the prompts (what the
  ``ppo`` algorithm does with no sampler).
- ``curriculum``: prompts at the edge of the model's ability. It keeps each prompt's
  recent pass rate (an exponential average of the share of its samples whose score is
  above ``pass_threshold``) and, where the rows carry a difficulty level, each level's.
  After ``warmup_iterations`` of uniform draws, ``1 − exploration`` of each draw comes
  from the prompts whose estimated pass rate lies strictly inside ``band`` (default:
  neither always nor never solved); a prompt never drawn is estimated by its level's rate
  when the level has been seen, and counts as inside the band otherwise. The rest
  (``exploration``), and whatever the band cannot fill, is drawn uniformly from the other
  prompts. Draws are seeded by (seed, iteration, round) and the state is the rates, so
  every rank draws the same prompts and a resumed run continues exactly.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from rlhfkit import UserError
from rlhfkit.plugins.ppo import schedule


class ShuffleSampler:
    """Seeded passes over the prompts (:func:`rlhfkit.plugins.ppo.schedule.round_prompts`)."""

    def __init__(self, config: Any, context: Any = None):
        self.config = config
        self.size = 0
        self.seed = 0

    def bind(self, algorithm: Any) -> None:
        self.size, self.seed = len(algorithm.prompts), algorithm.seed

    def draw(self, iteration: int, count: int, round: int = 0) -> list[int]:
        return schedule.round_prompts(self.size, count, self.seed, iteration, round)

    def observe(self, indices: Sequence[int], scores: torch.Tensor) -> dict[str, float]:
        return {}


class CurriculumSampler:
    """See the module docstring; settings: :class:`rlhfkit.plugins.ppo.CurriculumConfig`."""

    def __init__(self, config: Any, context: Any = None):
        self.config = config
        self.levels: list[Any] = []
        self.seed = 0
        self.rates: dict[int, float] = {}         # prompt index -> recent pass rate
        self.level_rates: dict[str, float] = {}   # level -> recent pass rate
        self.drawn: list[int] = []                # the last draw (for the per-level shares)

    def bind(self, algorithm: Any) -> None:
        field = self.config.level_field
        self.levels = [fields.get(field) if field else None for fields in algorithm.prompt_fields]
        self.seed = algorithm.seed

    # ------------------------------------------------------------------ drawing
    def estimate(self, index: int) -> float | None:
        """The prompt's pass rate, else its level's, else None (never seen)."""
        if index in self.rates:
            return self.rates[index]
        level = self.levels[index]
        return self.level_rates.get(str(level)) if level is not None else None

    def in_band(self, index: int) -> bool:
        low, high = self.config.band
        rate = self.estimate(index)
        return rate is None or low < rate < high

    def draw(self, iteration: int, count: int, round: int = 0) -> list[int]:
        c = self.config
        size = len(self.levels)
        if count > size:
            raise UserError(f"sampler 'curriculum' draws distinct prompts: algorithm.prompts_per_iteration {count} is "
                            f"more than the {size} prompts of `data`; lower it or add prompts")
        rng = random.Random(f"curriculum/{self.seed}/{iteration}/{round}")
        everyone = list(range(size))
        if iteration < c.warmup_iterations:
            chosen = rng.sample(everyone, count)
        else:
            band = [i for i in everyone if self.in_band(i)]
            take = min(len(band), count - round_half_up(c.exploration * count))
            chosen = rng.sample(band, take)
            taken = set(chosen)
            chosen += rng.sample([i for i in everyone if i not in taken], count - take)
        self.drawn = chosen
        return chosen

    # ------------------------------------------------------------------ observing
    def observe(self, indices: Sequence[int], scores: torch.Tensor) -> dict[str, float]:
        c = self.config
        passed = (scores.float() > c.pass_threshold).float().mean(dim=1).tolist()
        by_level: dict[str, list[float]] = {}
        for index, rate in zip(indices, passed, strict=True):
            old = self.rates.get(index)
            self.rates[index] = rate if old is None else (1 - c.decay) * rate + c.decay * old
            level = self.levels[index]
            if level is not None:
                by_level.setdefault(str(level), []).append(rate)
        metrics: dict[str, float] = {}
        for level, rates in sorted(by_level.items()):
            mean = sum(rates) / len(rates)
            old = self.level_rates.get(level)
            self.level_rates[level] = mean if old is None else (1 - c.decay) * mean + c.decay * old
            metrics[f"curriculum/pass_rate/level{level}"] = mean
        drawn_levels = [self.levels[i] for i in self.drawn]
        for level in sorted({str(level) for level in drawn_levels if level is not None}):
            metrics[f"curriculum/drawn/level{level}"] = sum(str(x) == level for x in drawn_levels) / len(drawn_levels)
        metrics["curriculum/tracked"] = float(len(self.rates))
        metrics["curriculum/in_band"] = sum(self.in_band(i) for i in range(len(self.levels))) / max(1, len(self.levels))
        return metrics

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"rates": sorted(self.rates.items()), "level_rates": sorted(self.level_rates.items()),
                "drawn": list(self.drawn)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rates = {int(i): float(r) for i, r in state["rates"]}
        self.level_rates = {str(level): float(r) for level, r in state["level_rates"]}
        self.drawn = [int(i) for i in state["drawn"]]


def round_half_up(value: float) -> int:
    return int(value + 0.5)
