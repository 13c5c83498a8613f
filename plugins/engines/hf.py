"""The ``hf`` engine: the policy's transformers ``generate`` in the trainer's process."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rlhfkit import Generation, SamplingSettings
from rlhfkit.plugins.engines import HFEngineConfig


class HFEngine:
    """Samples with the policy's own model (so it always has the trained weights).

    Seeding: transformers draws every row of a call from one generator, so a call is
    seeded by its first row's seed; the samples do not depend on the number of devices
    when the algorithm's calls do not (PPO: ``generation_batch_size`` divides each
    device's share of the prompts, or is unset).
    """

    seeds_per_row = False  # a call draws from one generator, seeded by its first row

    def __init__(self, config: HFEngineConfig, context: Any = None):
        self.config = config
        self.policy: Any = None

    def start(self, policy: Any) -> None:
        self.policy = policy

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: SamplingSettings, *,
                 seeds: Sequence[int], greedy: bool = False) -> Generation:
        torch.manual_seed(int(seeds[0]))
        return self.policy.sample(prompt_ids, prompt_mask, max_new_tokens=sampling.max_new_tokens,
                                  do_sample=not greedy, temperature=sampling.temperature, top_k=sampling.top_k,
                                  top_p=sampling.top_p, cache=self.config.cache)
