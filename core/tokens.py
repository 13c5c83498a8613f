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
        pairs.append((_cut_prompt(prompt, max_length - len(completion)), completion))
    return _padded(pairs, tokenizer.pad_token_id)


def encode_preferences(tokenizer: Any, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str],
                       max_length: int, shared: bool) -> dict[str, list[list[int]]]:
    """Encode preference pairs; both responses of a pair see the same prompt, cut on the
    left so that it fits ``max_length`` with the longer of the two (each response + EOS is
    cut as in :func:`encode_pairs`).

    ``shared=False``: :func:`encode_pairs`'s ``[2B, L]`` layout, the chosen rows then the
    rejected rows.

    ``shared=True``: one ``[B, L]`` row per pair, ``prompt, chosen, rejected``, right-padded,
    for one forward that computes the prompt once. A response's last token is only ever a
    target (its logits predict nothing, and no later token of the row attends to it), so
    it is not in the row: ``L`` is ``P + C + R - 2``.
        ``input_ids``; ``position_ids`` (the rejected response continues from the prompt,
        as the chosen one does); ``segment``: 1 prompt, 2 chosen, 3 rejected, 0 padding
        (attend causally, never to padding, and never from rejected to chosen);
        ``chosen_labels`` / ``rejected_labels``: each response's tokens (EOS included),
        ``chosen_source`` / ``rejected_source``: the columns whose logits predict them
        (the prompt's last token predicts both first tokens), ``chosen_scored`` /
        ``rejected_scored``: 1 on tokens that have a predictor (all but a first token
        after an empty prompt) — ``[B, T]`` each, 0-padded.
    """
    if not len(prompts) == len(chosen) == len(rejected):
        raise ValueError(f"{len(prompts)} prompts, {len(chosen)} chosen and {len(rejected)} rejected responses")
    triples = tokenize_preferences(tokenizer, prompts, chosen, rejected)
    return layout_preferences(triples, tokenizer.eos_token_id, tokenizer.pad_token_id, max_length, shared)


def tokenize_preferences(tokenizer: Any, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str]
                         ) -> list[tuple[list[int], list[int], list[int]]]:
    """``(prompt, chosen, rejected)`` token ids per pair: the prompt with the tokenizer's
    special tokens, the responses without, nothing cut, no EOS yet (for
    :func:`layout_preferences`; a caller may keep them to lay out again without
    re-tokenizing)."""
    rows = [tokenizer(list(texts), add_special_tokens=special)["input_ids"]
            for texts, special in ((prompts, True), (chosen, False), (rejected, False))]
    return list(zip(*rows, strict=True))


def layout_preferences(triples: Sequence[tuple[list[int], list[int], list[int]]], eos: int, pad: int,
                       max_length: int, shared: bool) -> dict[str, list[list[int]]]:
    """:func:`encode_preferences` from token ids (:func:`tokenize_preferences`)."""
    cut = []
    for p, c, r in triples:
        c, r = (c + [eos])[:max_length], (r + [eos])[:max_length]
        cut.append((_cut_prompt(p, max_length - max(len(c), len(r))), c, r))
    triples = cut
    if not shared:
        return _padded([(p, c) for p, c, _ in triples] + [(p, r) for p, _, r in triples], pad)
    width = max(len(p) + len(c) + len(r) - 2 for p, c, r in triples)
    longest = {"chosen": max(len(c) for _, c, _ in triples), "rejected": max(len(r) for _, _, r in triples)}
    out: dict[str, list[list[int]]] = {name: [] for name in (
        "input_ids", "position_ids", "segment", "chosen_labels", "chosen_source", "chosen_scored",
        "rejected_labels", "rejected_source", "rejected_scored")}
    for p, c, r in triples:
        n, fill = len(p), width - (len(p) + len(c) + len(r) - 2)
        out["input_ids"].append(p + c[:-1] + r[:-1] + [pad] * fill)
        out["position_ids"].append(list(range(n + len(c) - 1)) + list(range(n, n + len(r) - 1)) + [0] * fill)
        out["segment"].append([1] * n + [2] * (len(c) - 1) + [3] * (len(r) - 1) + [0] * fill)
        for side, response, start in (("chosen", c, n), ("rejected", r, n + len(c) - 1)):
            # token 0 is predicted by the prompt's last column, token j > 0 by the column of token j - 1
            sources = [n - 1] + list(range(start, start + len(response) - 1))
            extra = longest[side] - len(response)
            out[f"{side}_labels"].append(response + [0] * extra)
            out[f"{side}_source"].append([max(s, 0) for s in sources] + [0] * extra)
            out[f"{side}_scored"].append([int(s >= 0) for s in sources] + [0] * extra)
    return out


def _cut_prompt(prompt: list[int], keep: int) -> list[int]:
    """The last ``keep`` tokens of ``prompt`` (none when ``keep <= 0``)."""
    return prompt[len(prompt) - keep:] if len(prompt) > keep else prompt


def _padded(pairs: list[tuple[list[int], list[int]]], pad: int) -> dict[str, list[list[int]]]:
    width = max(len(p) + len(c) for p, c in pairs)
    ids, attention, labels = [], [], []
    for prompt, completion in pairs:
        fill = width - len(prompt) - len(completion)
        ids.append(prompt + completion + [pad] * fill)
        attention.append([1] * (len(prompt) + len(completion)) + [0] * fill)
        labels.append([0] * len(prompt) + [1] * len(completion) + [0] * fill)
    return {"input_ids": ids, "attention_mask": attention, "labels_mask": labels}
