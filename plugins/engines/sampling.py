"""The one sampling path of every online algorithm (PPO, GRPO, online DPO, evaluation):
prompts -> tokens (the chat rule) -> the engine -> a :class:`rlhfkit.Rollout`."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from rlhfkit import Rollout, SamplingSettings, provides


@torch.no_grad()
def sample(policy: Any, engine: Any, prompts: Sequence[Any], seeds: Sequence[int], sampling: SamplingSettings,
           max_prompt_length: int | None = None, greedy: bool = False) -> Rollout:
    """Responses to ``prompts`` (row ``i`` seeded by ``seeds[i]``; prompts cut to their
    last ``max_prompt_length`` tokens): token ids, masks, decoded text and the engine's
    log-probs, as ``engine_logprobs`` and, until the trainer's replace them, ``logprobs``
    (zeros when the engine gives none)."""
    ids, mask = policy.tokenize_prompts(prompts)
    if max_prompt_length is not None:
        ids, mask = ids[:, -max_prompt_length:], mask[:, -max_prompt_length:]
    out = engine.generate(ids, mask, sampling, seeds=seeds, greedy=greedy)
    truncated = ~(out.response_ids == policy.tokenizer.eos_token_id).any(dim=1)
    logprobs = out.logprobs if out.logprobs is not None else torch.zeros(out.response_ids.shape, device=ids.device)
    return Rollout(ids, mask, out.response_ids, out.response_mask, logprobs.clone(), list(prompts),
                   policy.decode_responses(out.response_ids, out.response_mask),
                   torch.zeros(len(prompts), dtype=torch.long, device=ids.device), truncated,
                   engine_logprobs=out.logprobs)


class EngineHandle:
    """An algorithm's engine with its life cycle: started on first use (after any
    checkpoint was restored), weights pushed before a rollout whenever an update changed
    them (``step`` is the optimizer step the weights belong to), closed at the end."""

    def __init__(self, engine: Any, policy: Any):
        self.engine, self.policy = engine, policy
        self.started = False
        self.synced_step = -1
        self.sync_seconds = 0.0

    def ready(self, step: int) -> Any:
        """The engine, started, holding the weights of optimizer step ``step``."""
        if not self.started:
            if provides(self.engine, "start"):
                self.engine.start(self.policy)
            self.started, self.synced_step = True, step
        elif self.synced_step != step and provides(self.engine, "sync"):
            started = time.perf_counter()
            self.engine.sync(self.policy)
            self.sync_seconds += time.perf_counter() - started
            self.synced_step = step
        return self.engine

    def check(self, gap: float, where: str) -> None:
        if provides(self.engine, "check"):
            self.engine.check(gap, where)

    def close(self) -> None:
        if self.started and provides(self.engine, "close"):
            self.engine.close()
        self.started = False
