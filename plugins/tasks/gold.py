"""The ``gold`` reward: a task's ground-truth scorer as a :class:`rlhfkit.RewardSource`.

The rule / python-function kind of reward, registered by a plugin: any object with
``score(prompts, responses) -> [B] tensor`` is a reward source. With the built-in tasks it
plays the human of the InstructGPT recipe directly (RL against the truth, the upper
bound a learned proxy is compared with).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class GoldReward:
    """``scale · task.gold_score(prompts, responses)``.

    Attributes:
        task: the task object (shared with the ``builtin`` dataset of the same settings).
        scale: the factor applied to every score.
    """

    def __init__(self, task: Any, scale: float):
        self.task = task
        self.scale = scale

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """``[B]`` float32 scores on the CPU."""
        _check_lengths(prompts, responses)
        gold = torch.tensor(self.task.gold_score(prompts, responses), dtype=torch.float32)
        return gold * self.scale

    def evaluate(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, float]:
        """The task's metrics of the responses (unscaled: ``gold`` and its parts)."""
        _check_lengths(prompts, responses)
        return self.task.evaluate(prompts, responses)


def _check_lengths(prompts: Sequence[str], responses: Sequence[str]) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"reward 'gold': got {len(prompts)} prompts but {len(responses)} "
                         f"responses; pass one response per prompt.")
