"""KV-cache sampling with the cache written in place.

transformers' ``generate`` grows its dynamic cache by concatenation: every new token
copies every layer's keys and values (about a fifth of a small model's sampling time on
CPU). :func:`sample_in_place` runs the same sampling step — the same forward, the same
processors (temperature, then top-k, then top-p), the same ``softmax`` + ``multinomial``
draw from the global generator, the same PAD after EOS — over a cache preallocated to
prompt + ``max_new_tokens`` positions, whose keys and values are views of the filled part.
The logits are the same, so the samples are those of ``generate`` token for token
(tests/test_decode.py). Layers transformers caches otherwise (sliding windows, linear
attention) keep their own cache class.

Unlike ``generate``, nothing is read from the model's ``generation_config``: the tokens
are drawn from exactly the distribution the algorithm asked for and scores.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.cache_utils import DynamicCache, DynamicLayer


class InPlaceLayer(DynamicLayer):
    """A full-attention cache layer with room for ``capacity`` positions, written in place.

    ``keys``/``values`` are views ``[B, H, filled, D]`` of the ``[B, H, capacity, D]``
    buffers, so every reader of a :class:`DynamicLayer` sees what it expects.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.filled = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        shape = (*key_states.shape[:2], self.capacity, key_states.shape[3])
        self.key_buffer = key_states.new_empty(shape)
        self.value_buffer = value_states.new_empty((*shape[:3], value_states.shape[3]))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.filled + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache full: {end} positions for room for {self.capacity}")
        self.key_buffer[:, :, self.filled:end] = key_states
        self.value_buffer[:, :, self.filled:end] = value_states
        self.filled = end
        self.keys = self.key_buffer[:, :, :end]
        self.values = self.value_buffer[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.filled


def in_place_cache(config, capacity: int) -> DynamicCache:
    """transformers' dynamic cache for ``config`` with every plain full-attention layer
    (built now or lazily) an :class:`InPlaceLayer` of ``capacity`` positions."""
    cache = DynamicCache(config=config)
    cache.layers = [InPlaceLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    if cache.layer_class_to_replicate is DynamicLayer:
        cache.layer_class_to_replicate = functools.partial(InPlaceLayer, capacity)
    return cache


@dataclass
class Sampled:
    """``tokens [B, T]`` (PAD after a row's EOS) and, when asked, each token's log-prob
    on ``logits / temperature`` (the full distribution, before top-k/top-p) ``[B, T]``."""

    tokens: torch.Tensor
    logprobs: torch.Tensor | None


def warpers(temperature: float, top_k: int, top_p: float) -> LogitsProcessorList:
    """The processors ``generate`` applies when sampling with these settings, in its order."""
    processors = LogitsProcessorList()
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k:
        processors.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    return processors


@torch.no_grad()
def sample_in_place(model: torch.nn.Module, config, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *,
                    max_new_tokens: int, do_sample: bool, temperature: float, top_k: int, top_p: float,
                    eos_token_id: int, pad_token_id: int, logprobs: bool) -> Sampled:
    """Continue the left-padded ``prompt_ids [B, P]`` by up to ``max_new_tokens``; stops
    once every row has emitted EOS. ``model`` is called as transformers' causal LMs are
    (a peft model passes the arguments through); ``config`` is its transformers config."""
    rows, width = prompt_ids.shape
    cache = in_place_cache(config, width + max_new_tokens)
    mask = prompt_mask.new_ones((rows, width + max_new_tokens))
    mask[:, :width] = prompt_mask
    positions = prompt_mask.long().cumsum(-1) - 1
    positions.masked_fill_(prompt_mask == 0, 1)
    processors = warpers(temperature, top_k, top_p) if do_sample else LogitsProcessorList()
    unfinished = torch.ones(rows, dtype=torch.long, device=prompt_ids.device)
    sequence = prompt_ids
    tokens: list[torch.Tensor] = []
    scores: list[torch.Tensor] = []
    inputs, step_positions = prompt_ids, positions
    for step in range(max_new_tokens):
        out = model(input_ids=inputs, attention_mask=mask[:, :width + step], position_ids=step_positions,
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1].to(copy=True, dtype=torch.float32)
        del out
        if do_sample:
            probs = torch.softmax(processors(sequence, logits), dim=-1)
            token = torch.multinomial(probs, num_samples=1).squeeze(1)
        else:
            token = torch.argmax(logits, dim=-1)
        if logprobs:
            scores.append(torch.log_softmax(logits / temperature, dim=-1).gather(1, token[:, None])[:, 0])
        token = token * unfinished + pad_token_id * (1 - unfinished)
        tokens.append(token)
        if processors:  # only the processors read the sequence so far
            sequence = torch.cat([sequence, token[:, None]], dim=-1)
        unfinished = unfinished & (token != eos_token_id).long()
        if not unfinished.any():
            break
        inputs, step_positions = token[:, None], step_positions[:, -1:] + 1
    return Sampled(torch.stack(tokens, dim=1), torch.stack(scores, dim=1) if logprobs else None)
