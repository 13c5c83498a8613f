"""SFT rows as tensors (tokenized once, before the first step), packing, and the token
NLL with the LM head only at the columns whose next token is trained."""

from __future__ import annotations

import warnings
from array import array
from typing import Any

import torch

from rlhfkit import (
    PromptCompletion,
    cut_pair,
    encode_prompts,
    layout_packed,
    layout_pairs,
    logprobs_from_logits,
    pack_by_length,
    packed_mask,
)
from rlhfkit.plugins.policy.equivalence import disagreement
from rlhfkit.plugins.policy.trim import can_trim, mlp_only_at


class SFTEncoder:
    """Token ids of every training row, tokenized once (:meth:`tokenize_all`) and cut to
    ``max_length`` as :func:`rlhfkit.encode_pairs` cuts them; :meth:`__call__` lays out a
    batch of examples (row indices) or of packs (lists of row indices).

    ``padding_free``: the examples of a batch (or the packs) go into rows of at most
    ``max_length`` tokens, best-fit decreasing, each example attending to itself only
    (:func:`rlhfkit.layout_packed`); otherwise one right-padded row per example (or per
    pack). After a failed :meth:`check_layouts`, ``packed`` is False and every example
    gets a padded row of its own: the same loss, more padding."""

    def __init__(self, tokenizer: Any, max_length: int, train_on_prompt: bool, padding_free: bool = True):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.train_on_prompt = train_on_prompt
        self.padding_free = padding_free
        self.packed = True
        self._tokens: list[tuple[array, array]] = []

    def tokenize_all(self, rows: list[PromptCompletion], chunk: int = 4096) -> None:
        for start in range(0, len(rows), chunk):
            part = rows[start:start + chunk]
            prompts = encode_prompts(self.tokenizer, [r.prompt for r in part])
            completions = self.tokenizer([r.completion for r in part], add_special_tokens=False)["input_ids"]
            for prompt, completion in zip(prompts, completions, strict=True):
                cut = cut_pair(prompt, completion, self.tokenizer.eos_token_id, self.max_length)
                self._tokens.append((array("i", cut[0]), array("i", cut[1])))

    def lengths(self) -> list[int]:
        return [len(p) + len(c) for p, c in self._tokens]

    def packs(self, indices: list[int] | None = None) -> list[list[int]]:
        """Training rows (all, or ``indices``) in packs of at most ``max_length`` tokens
        (:func:`rlhfkit.pack_by_length`)."""
        indices = list(range(len(self._tokens))) if indices is None else indices
        lengths = self.lengths()
        return [[indices[j] for j in pack] for pack in pack_by_length([lengths[i] for i in indices], self.max_length)]

    def _pair(self, i: int) -> tuple[list[int], list[int]]:
        prompt, completion = self._tokens[i]
        if self.train_on_prompt:  # every token after the first is learned: all of it is "completion"
            return [], prompt.tolist() + completion.tolist()
        return prompt.tolist(), completion.tolist()

    def __call__(self, items: list[int] | list[list[int]]) -> dict[str, torch.Tensor]:
        """Row indices or packs -> ``[N, L]`` tensors: :meth:`packed_rows` or
        :meth:`separate_rows`."""
        packs = [list(item) if isinstance(item, list) else [item] for item in items]
        if self.packed and self.padding_free and not any(len(pack) > 1 for pack in packs):
            packs = self.packs([i for pack in packs for i in pack])
        if self.packed and any(len(pack) > 1 for pack in packs):
            return self.packed_rows(packs)
        return self.separate_rows([i for pack in packs for i in pack])

    def packed_rows(self, packs: list[list[int]]) -> dict[str, torch.Tensor]:
        """One row per pack (:func:`rlhfkit.layout_packed`: ``segment``, ``position_ids``)."""
        encoded = layout_packed([[self._pair(i) for i in pack] for pack in packs], self.tokenizer.pad_token_id)
        return {name: torch.tensor(values) for name, values in encoded.items()}

    def separate_rows(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """One right-padded row per example (:func:`rlhfkit.encode_pairs`'s layout)."""
        encoded = layout_pairs([self._pair(i) for i in indices], self.tokenizer.pad_token_id)
        return {name: torch.tensor(values) for name, values in encoded.items()}

    def micro_batches(self, items: list[int] | list[list[int]], size: int) -> list[dict[str, torch.Tensor]]:
        """A step's items laid out ``size`` at a time (examples, or packs with packing),
        so that ``micro_batch_size`` keeps bounding what one forward holds."""
        return [self(items[i:i + size]) for i in range(0, len(items), size)]


def targets_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[N, L-1]`` True where token ``t + 1`` is trained (labelled, and in the same example
    as token ``t`` in a packed row)."""
    targets = batch["labels_mask"][:, 1:].bool()
    if "segment" in batch:
        segment = batch["segment"]
        targets &= segment[:, 1:] == segment[:, :-1]
    return targets


def token_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor], keep_logits: bool = True,
              trim: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL of the trained tokens of ``batch`` (:class:`SFTEncoder`'s rows, or
    ``encode_pairs``'s) and their count. With ``keep_logits`` the LM head runs only at the
    columns that predict a trained token (2-D boolean ``logits_to_keep``: ``[T, V]``
    logits, not ``[N, L, V]``); with ``trim`` so does the last layer's MLP
    (:func:`rlhfkit.plugins.policy.trim.mlp_only_at`)."""
    ids = batch["input_ids"]
    targets = targets_of(batch)
    if "segment" in batch:
        attention = getattr(model.config, "_attn_implementation", None) or "eager"
        if attention.startswith("flash"):  # its variable-length kernels read example boundaries from the positions
            inputs = {"position_ids": batch["position_ids"]}
        else:  # eager adds its mask to the scores; SDPA takes a boolean one
            dtype = next(model.parameters()).dtype
            inputs = {"attention_mask": packed_mask(batch["segment"], dtype if attention == "eager" else None),
                      "position_ids": batch["position_ids"]}
    else:
        inputs = {"attention_mask": batch["attention_mask"]}
    labels = ids[:, 1:][targets]
    keep = torch.nn.functional.pad(targets, (0, 1))  # column t predicts token t + 1
    with mlp_only_at(model, keep if trim else None):
        if keep_logits:
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep, **inputs).logits
        else:
            logits = model(input_ids=ids, use_cache=False, **inputs).logits[:, :-1][targets]
    return -logprobs_from_logits(logits, labels).sum(), targets.sum()


def check_layouts(encoder: SFTEncoder, model: torch.nn.Module, rows: list[int], packing: bool,
                  trim: bool) -> tuple[bool, bool]:
    """Before training, on ``rows``: the LM head at the trained columns only, (with
    ``packing``, or the encoder's ``padding_free``) packed rows, and (with ``trim``) the
    last layer's MLP at those columns only must each give the NLL of full logits over
    separate rows. Otherwise warn and do without: every example in its own row
    (``encoder.packed = False``), full logits, the whole last layer. Returns whether
    ``logits_to_keep`` and the trim may be used (each check in eval mode, the model's mode
    restored: :func:`rlhfkit.plugins.policy.equivalence.disagreement`)."""
    device = next(model.parameters()).device
    separate = {k: v.to(device) for k, v in encoder.separate_rows(rows).items()}

    def expected() -> torch.Tensor:
        return token_nll(model, separate, keep_logits=False)[0]

    keep_logits = _agrees(lambda: token_nll(model, separate, keep_logits=True)[0], expected, model,
                          "the LM head at the trained columns only (2-D logits_to_keep)",
                          "computing logits at every column")
    if packing or encoder.padding_free:
        pack = {k: v.to(device) for k, v in encoder.packed_rows([rows]).items()}
        encoder.packed = _agrees(lambda: token_nll(model, pack, keep_logits=keep_logits)[0], expected, model,
                                 "packed rows (a per-example attention mask and position ids)",
                                 "laying each pack's examples out as separate rows (same loss, more padding)")
    trim = trim and can_trim(model)
    if trim:
        trim = _agrees(lambda: token_nll(model, separate, keep_logits=keep_logits, trim=True)[0], expected,
                       model, "the last layer's MLP at the trained columns only (trim_last_layer)",
                       "running it at every column")
    return keep_logits, trim


def _agrees(compute: Any, reference: Any, model: torch.nn.Module, what: str, instead: str) -> bool:
    problem = disagreement(model, compute, reference, "NLLs")
    if problem is not None:
        warnings.warn(f"sft: {type(model).__name__} does not support {what} ({problem}); {instead}.", stacklevel=2)
    return problem is None
