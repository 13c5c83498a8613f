"""Tokenising prompts and responses the same way everywhere (SFT, reward models, DPO,
PPO sampling and scoring, evaluation).

**The chat rule.** A prompt is either text or a conversation (a sequence of ``{"role",
"content"}`` messages). :func:`encode_prompts` turns both into token ids, and every stage
goes through it:

- a conversation is rendered with the tokenizer's chat template with the generation
  prompt added (the model is to answer next), and the rendered text is tokenized without
  adding special tokens (a template writes its own BOS, so none is doubled);
- text is tokenized as it is, with the tokenizer's own special tokens (e.g. a Llama BOS),
  unless the tokenizer's chat setting is ``always``: then text is the content of one user
  message and goes through the template too (an empty prompt, plain text for
  pretraining, stays empty);
- with the setting ``never``, a conversation is an error.

The setting (:data:`CHAT_MODES`) is stored in the tokenizer's init kwargs
(:data:`CHAT_SETTING`), so ``save_pretrained`` writes it into ``tokenizer_config.json``
and a later stage, or a reward model scoring another stage's samples, applies the same
rule to the same prompt. Responses are always tokenized without special tokens and end
with the tokenizer's EOS (the policy makes that the token the template closes a turn
with, see :func:`template_turn_end`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rlhfkit.errors import UserError

#: The tokenizer init kwarg (saved in tokenizer_config.json) that holds the chat setting.
CHAT_SETTING = "rlhfkit_chat_template"
#: ``auto``: conversations use the template, text is used as it is; ``always``: text
#: prompts become one user message; ``never``: no template (conversations are an error).
CHAT_MODES = ("auto", "always", "never")
_PROBE = "rlhfkit-turn-end-probe"


def chat_mode(tokenizer: Any) -> str:
    """The tokenizer's chat setting, ``auto`` when none was set."""
    return getattr(tokenizer, "init_kwargs", {}).get(CHAT_SETTING) or "auto"


def set_chat_mode(tokenizer: Any, mode: str) -> None:
    """Store ``mode`` on ``tokenizer`` (and in what ``save_pretrained`` writes)."""
    if mode not in CHAT_MODES:
        raise ValueError(f"chat mode must be one of {', '.join(CHAT_MODES)}, got {mode!r}")
    tokenizer.init_kwargs[CHAT_SETTING] = mode


def is_conversation(prompt: Any) -> bool:
    """True for a sequence of messages, False for text."""
    return not isinstance(prompt, str)


def prompt_display(prompt: Any) -> str:
    """``prompt`` for people to read: text as it is, a conversation one ``role: content``
    line per message (not what the model sees: :func:`render_prompt` is)."""
    return prompt if isinstance(prompt, str) else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def prompt_messages(prompt: Any, mode: str) -> list[dict[str, str]] | None:
    """The messages the template renders for ``prompt`` under ``mode``, or ``None`` when
    the prompt is used as text."""
    if is_conversation(prompt):
        if mode == "never":
            raise UserError("a conversational prompt (a list of messages) reached a policy whose chat_template "
                            "setting is 'never'; set policy.chat_template: auto to render it with the "
                            "tokenizer's chat template, or give text prompts.")
        return [dict(message) for message in prompt]
    if mode == "always" and prompt:
        return [{"role": "user", "content": prompt}]
    return None


def render_prompt(tokenizer: Any, prompt: Any) -> str:
    """The text the model is given for ``prompt`` under the tokenizer's chat rule."""
    messages = prompt_messages(prompt, chat_mode(tokenizer))
    if messages is None:
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"conversational prompts need a chat template, and the tokenizer "
                        f"{getattr(tokenizer, 'name_or_path', '') or ''!r} has none: give it one "
                        "(chat_template.jinja or tokenizer_config.json's chat_template), or use text "
                        "prompts with policy.chat_template: auto or never.")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompts(tokenizer: Any, prompts: Sequence[Any]) -> list[list[int]]:
    """Token ids of each prompt under the chat rule (module docstring); nothing is cut."""
    mode = chat_mode(tokenizer)
    rendered = [prompt_messages(p, mode) is not None for p in prompts]
    out: list[list[int] | None] = [None] * len(prompts)
    for special in (True, False):  # text with the tokenizer's specials, templates without
        chosen = [i for i, r in enumerate(rendered) if r != special]
        if chosen:
            texts = [render_prompt(tokenizer, prompts[i]) for i in chosen]
            for i, ids in zip(chosen, tokenizer(texts, add_special_tokens=special)["input_ids"], strict=True):
                out[i] = ids
    return out  # type: ignore[return-value]


def template_turn_end(tokenizer: Any) -> str | None:
    """The special token the chat template closes an assistant turn with (Qwen's
    ``<|im_end|>``, Llama 3's ``<|eot_id|>``), or ``None`` when the template writes none
    right after the reply (or there is no template)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render this probe names no turn end
        return None
    after = text[text.rfind(_PROBE) + len(_PROBE):] if _PROBE in text else ""
    specials = sorted(set(tokenizer.all_special_tokens) | {
        t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special},
        key=len, reverse=True)
    stripped = after.lstrip(" ")
    return next((token for token in specials if token and stripped.startswith(token)), None)


def encode_pairs(tokenizer: Any, prompts: Sequence[Any], completions: Sequence[str], max_length: int,
                 add_eos: bool = True) -> dict[str, list[list[int]]]:
    """Encode ``prompt + completion (+ EOS)``, right-padded with the tokenizer's PAD.

    Prompts (text or conversations) follow the chat rule (:func:`encode_prompts`),
    completions get no special tokens.
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
    prompt_rows = encode_prompts(tokenizer, prompts)
    completion_rows = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id if add_eos else None
    pairs = [cut_pair(prompt, completion, eos, max_length)
             for prompt, completion in zip(prompt_rows, completion_rows, strict=True)]
    return _padded(pairs, tokenizer.pad_token_id)


def cut_pair(prompt: list[int], completion: list[int], eos: int | None, max_length: int
             ) -> tuple[list[int], list[int]]:
    """``(prompt, completion + EOS)`` token ids cut to ``max_length`` as
    :func:`encode_pairs` cuts them (the prompt from the left first)."""
    completion = (completion + ([] if eos is None else [eos]))[:max_length]
    return _cut_prompt(prompt, max_length - len(completion)), completion


def layout_pairs(pairs: Sequence[tuple[list[int], list[int]]], pad: int) -> dict[str, list[list[int]]]:
    """:func:`encode_pairs`'s right-padded rows from cut ``(prompt, completion)`` token ids
    (:func:`cut_pair`)."""
    return _padded(list(pairs), pad)


def pack_by_length(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: the indices of ``lengths`` grouped into bins of at most
    ``capacity`` tokens (a longer item gets a bin of its own), each item into the fullest
    bin it fits, longest items first (ties: the lower index first, the earlier bin), the
    bins in the order they were opened and each bin's items in index order. Deterministic."""
    import bisect

    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, bin), sorted: the fullest bin that fits is the first >= n
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        at = bisect.bisect_left(room, (n, -1))
        if at < len(room):
            free, b = room.pop(at)
            bins[b].append(i)
            bisect.insort(room, (free - n, b))
        else:
            bins.append([i])
            if capacity - n > 0:
                bisect.insort(room, (capacity - n, len(bins) - 1))
    return [sorted(b) for b in bins]


def layout_packed(packs: Sequence[Sequence[tuple[list[int], list[int]]]], pad: int) -> dict[str, list[list[int]]]:
    """One right-padded row per pack of cut ``(prompt, completion)`` token ids
    (:func:`cut_pair`), the examples one after another: ``input_ids``, ``position_ids``
    (from 0 in each example), ``segment`` (1, 2, ... per example, 0 padding: attention
    stays inside an example, :func:`rlhfkit.packed_mask`), ``labels_mask`` (1 on
    completion tokens) ``[N, L]``."""
    width = max(sum(len(p) + len(c) for p, c in pack) for pack in packs)
    out: dict[str, list[list[int]]] = {"input_ids": [], "position_ids": [], "segment": [], "labels_mask": []}
    for pack in packs:
        ids, positions, segment, labels = [], [], [], []
        for j, (prompt, completion) in enumerate(pack, start=1):
            ids += prompt + completion
            positions += range(len(prompt) + len(completion))
            segment += [j] * (len(prompt) + len(completion))
            labels += [0] * len(prompt) + [1] * len(completion)
        fill = width - len(ids)
        for name, row, value in (("input_ids", ids, pad), ("position_ids", positions, 0), ("segment", segment, 0),
                                 ("labels_mask", labels, 0)):
            out[name].append(row + [value] * fill)
    return out


def encode_preferences(tokenizer: Any, prompts: Sequence[Any], chosen: Sequence[str], rejected: Sequence[str],
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


def tokenize_preferences(tokenizer: Any, prompts: Sequence[Any], chosen: Sequence[str], rejected: Sequence[str]
                         ) -> list[tuple[list[int], list[int], list[int]]]:
    """``(prompt, chosen, rejected)`` token ids per pair: the prompt under the chat rule
    (:func:`encode_prompts`), the responses without special tokens, nothing cut, no EOS
    yet (for :func:`layout_preferences`; a caller may keep them to lay out again without
    re-tokenizing)."""
    rows = [encode_prompts(tokenizer, prompts)] + [tokenizer(list(texts), add_special_tokens=False)["input_ids"]
                                                   for texts in (chosen, rejected)]
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


def tokenize_rankings(tokenizer: Any, prompts: Sequence[Any], completions: Sequence[Sequence[str]]
                      ) -> list[tuple[list[int], list[list[int]]]]:
    """``(prompt, [response, ...])`` token ids per ranking (K responses to one prompt),
    as :func:`tokenize_preferences` makes them: nothing cut, no EOS yet (for
    :func:`layout_rankings`)."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} groups of completions")
    flat = [text for group in completions for text in group]
    ids = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    out, start = [], 0
    for prompt, group in zip(encode_prompts(tokenizer, prompts), completions, strict=True):
        out.append((prompt, ids[start:start + len(group)]))
        start += len(group)
    return out


def layout_rankings(groups: Sequence[tuple[list[int], list[list[int]]]], eos: int, pad: int, max_length: int,
                    shared: bool, k: int | None = None) -> dict[str, list[Any]]:
    """Token rows of rankings (:func:`tokenize_rankings`) for scoring every response at
    its last token (EOS). Each response + EOS is cut to ``max_length``; the prompt is cut
    on the left to fit with the group's longest response, the same cut for every response
    of the group (as :func:`encode_preferences` does for a pair).

    ``shared=False``: ``B * k`` rows (``k``: the largest group unless given), group by
    group, each response as its own :func:`encode_pairs` row; a group of fewer responses
    is filled with copies of its first one. ``input_ids``, ``attention_mask``,
    ``labels_mask`` ``[B * k, L]``.

    ``shared=True``: one row per group, ``prompt, response 1, ..., response K``, right-padded:
        ``input_ids``, ``position_ids`` (every response continues from the prompt),
        ``segment`` (1 prompt, 2 + j response j, 0 padding: see :func:`rlhfkit.shared_prompt_mask`)
        ``[B, L]``; ``ends [B, k]``: the column of each response's last token (0 for a
        missing one); ``labels``, ``source``, ``scored`` ``[B, k, T]``: each response's
        tokens, the columns whose logits predict them (the prompt's last column predicts
        every first token) and 1 where a token has a predictor (for an LM loss on them).
    """
    k = k or max(len(responses) for _, responses in groups)
    cut = []
    for prompt, responses in groups:
        responses = [(r + [eos])[:max_length] for r in responses]
        cut.append((_cut_prompt(prompt, max_length - max(map(len, responses))), responses))
    if not shared:
        return _padded([(p, rs[j] if j < len(rs) else rs[0]) for p, rs in cut for j in range(k)], pad)
    width = max(len(p) + sum(map(len, rs)) for p, rs in cut)
    longest = max(len(r) for _, rs in cut for r in rs)
    out: dict[str, list[Any]] = {name: [] for name in (
        "input_ids", "position_ids", "segment", "ends", "labels", "source", "scored")}
    for p, responses in cut:
        n = len(p)
        ids, positions, segment, ends, labels, source, scored = list(p), list(range(n)), [1] * n, [], [], [], []
        for j in range(k):
            response = responses[j] if j < len(responses) else []
            start = len(ids)
            ids += response
            positions += range(n, n + len(response))
            segment += [2 + j] * len(response)
            ends.append(start + len(response) - 1 if response else 0)
            sources = ([n - 1] + list(range(start, start + len(response) - 1))) if response else []
            extra = longest - len(response)
            labels.append(response + [0] * extra)
            source.append([max(c, 0) for c in sources] + [0] * extra)
            scored.append([int(c >= 0) for c in sources] + [0] * extra)
        fill = width - len(ids)
        out["input_ids"].append(ids + [pad] * fill)
        out["position_ids"].append(positions + [0] * fill)
        out["segment"].append(segment + [0] * fill)
        for name, value in (("ends", ends), ("labels", labels), ("source", source), ("scored", scored)):
            out[name].append(value)
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
