"""Tokenising text pairs the same way everywhere (SFT, reward models, DPO, PPO scoring)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def encode_pairs(tokenizer: Any, prompts: Sequence[str], completions: Sequence[str], max_length: int,
                 add_eos: bool = True) -> dict[str, list[list[int]]]:
    """Encode ``prompt + completion (+ EOS)``, right-padded with the tokenizer's PAD.

    Prompts get the tokenizer's own special tokens (e.g. a Llama BOS), completions none.
    Over ``max_length``, tokens are dropped from the left of the prompt first: the
    completion is what is learned or scored, and the prompt's end is the context nearest
    to it. A completion that alone exceeds ``max_length`` keeps its first ``max_length``
    tokens (losing its EOS).

    Returns:
        ``input_ids``, ``attention_mask``, ``labels_mask`` as ``[B, L]`` lists (``L <=
        max_length``); ``labels_mask`` is 1 on completion tokens, EOS included. Build
        tensors with ``torch.tensor`` on the device that needs them.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    prompt_rows = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    completion_rows = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if add_eos else []
    pairs = []
    for prompt, completion in zip(prompt_rows, completion_rows, strict=True):
        completion = (completion + eos)[:max_length]
        keep = max_length - len(completion)
        pairs.append((prompt[len(prompt) - keep:] if len(prompt) > keep else prompt, completion))
    width = max(len(p) + len(c) for p, c in pairs)
    pad = tokenizer.pad_token_id
    ids, attention, labels = [], [], []
    for prompt, completion in pairs:
        fill = width - len(prompt) - len(completion)
        ids.append(prompt + completion + [pad] * fill)
        attention.append([1] * (len(prompt) + len(completion)) + [0] * fill)
        labels.append([0] * len(prompt) + [1] * len(completion) + [0] * fill)
    return {"input_ids": ids, "attention_mask": attention, "labels_mask": labels}
