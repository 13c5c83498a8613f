"""How rankings (K responses to one prompt; a pair is K = 2) become tensors and scores:
one shared-prompt row per ranking (the prompt computed once, each response masked from
the others) or one row per response (:func:`rlhfkit.layout_rankings`)."""

from __future__ import annotations

import warnings
from array import array
from typing import Any

import torch

from rlhfkit import (
    Ranking,
    last_real_index,
    layout_rankings,
    logprobs_from_logits,
    masked_mean,
    positions_from_mask,
    shared_prompt_mask,
    tokenize_rankings,
)
from rlhfkit.plugins.policy.equivalence import disagreement
from rlhfkit.plugins.policy.trim import can_trim, mlp_only_at
from rlhfkit.plugins.reward_model.scoring import ScalarHead, causal_lm


class RankingEncoder:
    """Token tensors of rankings, in the shared-prompt layout while ``shared`` (off after a
    failed :meth:`check`) or as one row per response. Training rows, passed with their
    ``indices``, are tokenized once (all at once by :meth:`tokenize_all`, or when first
    drawn) and kept as int32 arrays."""

    def __init__(self, tokenizer: Any, max_length: int, shared: bool):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.shared = shared
        self._tokens: dict[int, tuple[array, list[array]]] = {}

    def tokenize_all(self, rows: list[Ranking], chunk: int = 4096) -> None:
        """Tokenize training rows ``0..N-1`` before training, in large batches."""
        for start in range(0, len(rows), chunk):
            self._remember(list(range(start, min(start + chunk, len(rows)))), rows[start:start + chunk])

    def _remember(self, indices: list[int], rows: list[Ranking]) -> None:
        fresh = tokenize_rankings(self.tokenizer, [r.prompt for r in rows], [r.completions for r in rows])
        for i, (prompt, responses) in zip(indices, fresh, strict=True):
            self._tokens[i] = (array("i", prompt), [array("i", r) for r in responses])

    def __call__(self, rows: list[Ranking], shared: bool | None = None,
                 indices: list[int] | None = None) -> dict[str, torch.Tensor]:
        """``[B, ...]`` tensors of ``rows``: the shared layout, or ``input_ids``,
        ``attention_mask``, ``labels_mask`` ``[B, K, L]`` (K: the largest ranking)."""
        if indices is None:
            groups = tokenize_rankings(self.tokenizer, [r.prompt for r in rows], [r.completions for r in rows])
        else:
            missing = [(i, r) for i, r in zip(indices, rows, strict=True) if i not in self._tokens]
            if missing:
                self._remember([i for i, _ in missing], [r for _, r in missing])
            groups = [(p.tolist(), [r.tolist() for r in rs]) for p, rs in (self._tokens[i] for i in indices)]
        shared = self.shared if shared is None else shared
        k = max(len(r.completions) for r in rows)
        encoded = layout_rankings(groups, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id,
                                  self.max_length, shared=shared, k=k)
        if shared:
            return {name: torch.tensor(values) for name, values in encoded.items()}
        return {name: torch.tensor(values).view(len(rows), k, -1) for name, values in encoded.items()}

    def check(self, model: torch.nn.Module, head: ScalarHead, rows: list[Ranking], device: torch.device) -> None:
        """Before training: the shared layout's scores must equal those of separate rows;
        otherwise warn and use separate rows."""
        if not self.shared or not rows:
            return
        shared = {k: v.to(device) for k, v in self(rows, shared=True).items()}
        separate = {k: v.to(device) for k, v in self(rows, shared=False).items()}
        valid = torch.tensor([[j < len(r.completions) for j in range(shared["ends"].shape[1])] for r in rows],
                             device=device)
        problem = shared_prompt_problem(model, head, shared, separate, valid)
        if problem is not None:
            warnings.warn(f"reward-model share_prompt: {type(causal_lm(model)).__name__} does not honour the "
                          f"shared-prompt attention mask ({problem}); scoring each response as its own row. Set "
                          f"algorithm.share_prompt: false to skip this check.", stacklevel=1)
            self.shared = False


def group_scores(model: torch.nn.Module, head: ScalarHead, batch: dict[str, torch.Tensor],
                 with_nll: bool, trim: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One backbone forward over a batch of either layout: scores ``[B, K]`` read at each
    response's last token and, when asked, each response's mean token NLL ``[B, K]``
    under the LM head (for the Askell LM term). ``trim``: the last layer's MLP only at the
    columns read (:func:`rlhfkit.plugins.policy.trim.mlp_only_at`)."""
    lm = causal_lm(model)
    if "segment" in batch:
        return _shared_scores(lm, head, batch, with_nll, trim)
    b, k, length = batch["input_ids"].shape
    ids, mask = batch["input_ids"].view(b * k, length), batch["attention_mask"].view(b * k, length)
    labels = batch["labels_mask"].view(b * k, length)[:, 1:]
    read = torch.zeros_like(mask, dtype=torch.bool)
    read[torch.arange(b * k, device=ids.device), last_real_index(mask)] = True
    if with_nll:
        read[:, :-1] |= labels.bool()
    with mlp_only_at(lm, read if trim else None):
        hidden = lm.base_model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                               use_cache=False).last_hidden_state
    scores = head(hidden, mask).view(b, k)
    if not with_nll:
        return scores, None
    keep = labels.bool()  # the LM head only at the columns that predict a response token
    logprobs = logprobs_from_logits(lm.get_output_embeddings()(hidden[:, :-1][keep]), ids[:, 1:][keep])
    per_token = torch.zeros(labels.shape, dtype=logprobs.dtype, device=ids.device).masked_scatter(keep, logprobs)
    return scores, -masked_mean(per_token, labels.to(per_token.dtype), dim=1).view(b, k)


def _shared_scores(lm: Any, head: ScalarHead, batch: dict[str, torch.Tensor],
                   with_nll: bool, trim: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    eager = getattr(lm.config, "_attn_implementation", "eager") == "eager"  # adds its mask to the scores
    dtype = next(lm.parameters()).dtype
    mask = shared_prompt_mask(batch["segment"], dtype if eager else None)
    rows = torch.arange(batch["ends"].shape[0], device=mask.device)[:, None]
    read = torch.zeros(batch["segment"].shape, dtype=torch.bool, device=mask.device)
    if "valid" in batch:  # a missing response's end is column 0: not read
        read[rows.expand_as(batch["ends"])[batch["valid"]], batch["ends"][batch["valid"]]] = True
    else:
        read[rows, batch["ends"]] = True
    if with_nll:
        scored = batch["scored"].bool()
        read[rows[:, :, None].expand_as(scored)[scored], batch["source"][scored]] = True
    with mlp_only_at(lm, read if trim else None):
        hidden = lm.base_model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"],
                               use_cache=False).last_hidden_state
    scores = head.score(hidden[rows, batch["ends"]]).squeeze(-1).float()
    if not with_nll:
        return scores, None
    scored = batch["scored"].bool()  # [B, K, T]
    picked = hidden[rows[:, :, None].expand_as(scored)[scored], batch["source"][scored]]
    logprobs = logprobs_from_logits(lm.get_output_embeddings()(picked), batch["labels"][scored])
    per_token = torch.zeros(scored.shape, dtype=logprobs.dtype, device=hidden.device).masked_scatter(scored, logprobs)
    return scores, -masked_mean(per_token, scored.to(per_token.dtype), dim=2)


def shared_prompt_problem(model: torch.nn.Module, head: ScalarHead, shared: dict[str, torch.Tensor],
                          separate: dict[str, torch.Tensor], valid: torch.Tensor) -> str | None:
    """Why the shared layout's scores of the ``valid [B, K]`` responses differ from
    separate rows' (a model that builds its own mask, or attention that ignores a 4-D
    mask), or ``None``."""
    return disagreement(model, lambda: group_scores(model, head, shared, False)[0][valid],
                        lambda: group_scores(model, head, separate, False)[0][valid], "scores")


def trim_agrees(model: torch.nn.Module, head: ScalarHead, batch: dict[str, torch.Tensor], with_nll: bool) -> bool:
    """Whether the last layer's MLP can run only where read (``trim``) for this model:
    it has one (:func:`rlhfkit.plugins.policy.trim.can_trim`) and the scores (and NLLs)
    of ``batch`` are those of the full forward; a model that has one but disagrees gets a
    warning."""
    if not can_trim(causal_lm(model)):
        return False

    def outputs(trim: bool) -> torch.Tensor:
        scores, nll = group_scores(model, head, batch, with_nll, trim=trim)
        return scores if nll is None else torch.cat([scores, nll])

    problem = disagreement(model, lambda: outputs(True), lambda: outputs(False), "scores")
    if problem is not None:
        warnings.warn(f"reward-model trim_last_layer: {type(causal_lm(model)).__name__}'s scores change when its last "
                      f"layer's MLP runs only at the scored tokens ({problem}); running it everywhere. Set "
                      f"algorithm.trim_last_layer: false to skip this check.", stacklevel=1)
    return problem is None
