"""How preference pairs become tensors and summed response log-probs: two rows per pair,
or one shared-prompt row (prompt, chosen, rejected; see :func:`rlhfkit.encode_preferences`)."""

from __future__ import annotations

import warnings
from array import array
from typing import Any

import torch

from rlhfkit import (
    Preference,
    labelled_logprobs,
    layout_preferences,
    logprobs_from_logits,
    masked_sum,
    shared_prompt_mask,
    tokenize_preferences,
)
from rlhfkit.plugins.policy.equivalence import disagreement
from rlhfkit.plugins.policy.trim import can_trim, mlp_only_at


class PairEncoder:
    """Token tensors of preference pairs, in the shared-prompt layout while ``shared`` (off
    after a failed :meth:`check`) or as two rows. Training rows, passed with their
    ``indices``, are tokenized once (all at once by :meth:`tokenize_all`, or when first
    drawn) and kept as int32 arrays."""

    def __init__(self, tokenizer: Any, max_length: int, shared: bool, trim: bool = False):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.shared = shared
        self.trim = trim  # the last layer's MLP only at the columns read (off after a failed check)
        self._tokens: dict[int, tuple[array, array, array]] = {}

    def tokenize_all(self, rows: list[Preference], chunk: int = 4096) -> None:
        """Tokenize training rows ``0..N-1`` before training, in large batches (as a
        pre-tokenized dataset would be), so that a step only lays out cached ids."""
        for start in range(0, len(rows), chunk):
            self._remember(list(range(start, min(start + chunk, len(rows)))), rows[start:start + chunk])

    def _remember(self, indices: list[int], rows: list[Preference]) -> None:
        fresh = tokenize_preferences(self.tokenizer, [r.prompt for r in rows], [r.chosen for r in rows],
                                     [r.rejected for r in rows])
        for i, triple in zip(indices, fresh, strict=True):
            self._tokens[i] = tuple(array("i", part) for part in triple)

    def __call__(self, rows: list[Preference], shared: bool | None = None,
                 indices: list[int] | None = None) -> dict[str, torch.Tensor]:
        if indices is None:
            triples = tokenize_preferences(self.tokenizer, [r.prompt for r in rows], [r.chosen for r in rows],
                                           [r.rejected for r in rows])
        else:
            missing = [(i, r) for i, r in zip(indices, rows, strict=True) if i not in self._tokens]
            if missing:
                self._remember([i for i, _ in missing], [r for _, r in missing])
            triples = [tuple(part.tolist() for part in self._tokens[i]) for i in indices]
        encoded = layout_preferences(triples, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id,
                                     self.max_length, shared=self.shared if shared is None else shared)
        return {name: torch.tensor(values) for name, values in encoded.items()}

    def check(self, models: list[torch.nn.Module], rows: list[Preference], device: torch.device) -> None:
        """Before training: each model's shared-prompt log-probs must equal those of
        separate rows (:func:`shared_prompt_problem`); otherwise warn and use separate rows.
        Then, with ``trim``, the log-probs with the last layer's MLP at the read columns
        only must equal the full forward's; otherwise warn and run the whole layer."""
        if not rows:
            return
        shared = {k: v.to(device) for k, v in self(rows, shared=True).items()}
        separate = {k: v.to(device) for k, v in self(rows, shared=False).items()}
        self._check_shared(models, shared, separate)
        if self.trim:
            self.trim = all(can_trim(model) for model in models)
        if self.trim:
            batch = shared if self.shared else separate
            for model in models:
                problem = trim_problem(model, batch)
                if problem is not None:
                    warnings.warn(f"dpo trim_last_layer: {type(model).__name__}'s log-probs change when its last "
                                  f"layer's MLP runs only at the columns read ({problem}); running it everywhere. "
                                  f"Set algorithm.trim_last_layer: false to skip this check.", stacklevel=1)
                    self.trim = False
                    return

    def _check_shared(self, models: list[torch.nn.Module], shared: dict[str, torch.Tensor],
                      separate: dict[str, torch.Tensor]) -> None:
        if not self.shared:
            return
        for model in models:
            problem = shared_prompt_problem(model, shared, separate)
            if problem is not None:
                warnings.warn(f"dpo share_prompt: {type(model).__name__} does not honour the shared-prompt "
                              f"attention mask or 2-D logits_to_keep ({problem}); computing chosen and rejected "
                              f"as separate rows. Set algorithm.share_prompt: false to skip this check.",
                              stacklevel=1)
                self.shared = False
                return


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                   trim: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs ``[2B]`` and response token counts ``[2B]`` (chosen,
    then rejected; or one per row for single completions). ``trim``: the last layer's MLP
    only at the columns that predict a response token
    (:func:`rlhfkit.plugins.policy.trim.mlp_only_at`)."""
    if "segment" in batch:
        return shared_logps(model, batch, trim)
    read = torch.nn.functional.pad(batch["labels_mask"][:, 1:].bool(), (0, 1)) if trim else None
    with mlp_only_at(model, read):
        logprobs, labels = labelled_logprobs(model, batch)
    return masked_sum(logprobs, labels, dim=1), labels.sum(1)


def shared_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                 trim: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared-prompt layout: one forward over prompt, chosen, rejected (less each
    response's last token). The LM head runs only at the columns that predict a response
    token (``logits_to_keep``: ``[B, C + R, V]`` logits, not ``[B, L, V]``), unless the
    padded response columns outnumber the row's."""
    ids = batch["input_ids"]
    eager = getattr(model.config, "_attn_implementation", "eager") == "eager"  # adds its mask to the scores
    dtype = next(model.parameters()).dtype
    mask = shared_prompt_mask(batch["segment"], dtype if eager else None)
    sources = torch.cat([batch["chosen_source"], batch["rejected_source"]], dim=1)
    read = None
    if trim:
        scored = torch.cat([batch["chosen_scored"], batch["rejected_scored"]], dim=1).bool()
        read = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
        read[torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(sources)[scored], sources[scored]] = True
    with mlp_only_at(model, read):
        return _shared_forward(model, batch, ids, mask, sources)


def _shared_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor,
                    sources: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if sources.shape[1] < ids.shape[1]:  # fewer columns than the row: the LM head runs only there
        logits = model(input_ids=ids, attention_mask=mask, position_ids=batch["position_ids"], use_cache=False,
                       logits_to_keep=sources).logits
    else:  # prompts so short that the padded response columns outnumber the row's
        logits = model(input_ids=ids, attention_mask=mask, position_ids=batch["position_ids"], use_cache=False).logits
        logits = logits[torch.arange(ids.shape[0], device=ids.device)[:, None], sources]
    logprobs = logprobs_from_logits(logits, torch.cat([batch["chosen_labels"], batch["rejected_labels"]], dim=1))
    scored = torch.cat([batch["chosen_scored"], batch["rejected_scored"]], dim=1).to(logprobs.dtype)
    parts = (slice(0, batch["chosen_source"].shape[1]), slice(batch["chosen_source"].shape[1], None))
    return (torch.cat([masked_sum(logprobs[:, part], scored[:, part], dim=1) for part in parts]),
            torch.cat([scored[:, part].sum(1) for part in parts]))


def trim_problem(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> str | None:
    """Why ``model``'s log-probs of ``batch`` change when the last layer's MLP runs only at
    the columns read, or ``None``."""
    return disagreement(model, lambda: sequence_logps(model, batch, trim=True)[0],
                        lambda: sequence_logps(model, batch)[0], "log-probs")


def shared_prompt_problem(model: torch.nn.Module, shared: dict[str, torch.Tensor],
                          separate: dict[str, torch.Tensor]) -> str | None:
    """Why ``model``'s shared-prompt log-probs differ from those of separate rows (a model
    that builds its own mask, or attention that ignores a 4-D mask), or ``None``."""
    return disagreement(model, lambda: shared_logps(model, shared)[0], lambda: sequence_logps(model, separate)[0],
                        "log-probs")


def pair_slice(batch: dict[str, torch.Tensor], start: int, end: int) -> dict[str, torch.Tensor]:
    """Pairs ``start:end`` of a batch, chosen and rejected kept together."""
    if "segment" in batch:  # one row per pair
        return {k: v[start:end] for k, v in batch.items()}
    b = batch["index"].shape[0]
    rows = torch.cat([torch.arange(start, end), torch.arange(b + start, b + end)])
    return {k: (v[start:end] if k == "index" else v[rows]) for k, v in batch.items()}
