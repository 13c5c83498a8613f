"""Reward-model objectives as pure tensor functions (spec §B).

Every function takes the fields of a :class:`rlhfkit.RewardBatch`:

- ``scores``: ``[B, K]`` float, the reward r(x, y_k) of completion k of prompt b.
- ``ranks``: ``[B, K]`` long, 0 is best; equal ranks are ties.
- ``valid``: ``[B, K]`` bool, False on padding (prompts with fewer than K completions).

and returns a scalar loss (float32). Padded scores never reach the loss or its gradient,
whatever they hold. Ranks, not column order, say which completion is better (pairs put
the chosen one first with ranks ``(0, 1)``). A prompt that offers nothing to learn (no
strict pair, fewer than two valid completions) is left out of the mean over prompts;
when no prompt is left the loss is a zero that still backpropagates. docs/reward-objectives.md
lists the formulas with their sources and conventions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def strict_pairs(ranks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B, K, K]`` bool: True at ``(b, i, j)`` when completion i is strictly better than j
    (``ranks[b, i] < ranks[b, j]``) and both are valid. Ties and padding are False."""
    both_valid = valid[:, :, None] & valid[:, None, :]
    return both_valid & (ranks[:, :, None] < ranks[:, None, :])


def score_gaps(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B, K, K]`` float32 ``r_i − r_j``, with padded scores replaced by 0 first so that
    neither their values nor their gradients leak."""
    clean = torch.where(valid, scores.float(), 0.0)
    return clean[:, :, None] - clean[:, None, :]


def ranking_metrics(scores: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Accuracy and mean gap over every strict pair (ties and padding excluded).

    ``rm/accuracy`` is the fraction of strict pairs with ``r_better > r_worse`` (equal
    scores count as wrong); ``rm/margin_mean`` the mean of ``r_better − r_worse``;
    ``rm/pairs`` how many strict pairs there were. Both are 0 when there are none. Values
    are detached 0-dim tensors: computing them never waits for the device.
    """
    with torch.no_grad():
        pairs = strict_pairs(ranks, valid).float()
        gaps = score_gaps(scores, valid)
        count = pairs.sum()
        return {"rm/accuracy": ((gaps > 0).float() * pairs).sum() / count.clamp(min=1),
                "rm/margin_mean": (gaps * pairs).sum() / count.clamp(min=1), "rm/pairs": count}


def _mean_over(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` ``[B]`` where ``keep`` ``[B]`` is True; 0 (still in the graph) when
    nothing is kept."""
    return torch.where(keep, values, 0.0).sum() / keep.sum().clamp(min=1)


def _pair_gap(scores: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor,
              objective: str) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``K = 2``: ``r_better − r_worse`` ``[B]`` and whether the row has a strict pair ``[B]``."""
    if scores.shape[1] != 2:
        raise ValueError(
            f"objective {objective!r} takes pairs (K = 2 completions per prompt), got K = "
            f"{scores.shape[1]}. For rankings of K > 2 completions use objective `kwise` "
            f"(all C(K,2) pairs of a prompt) or `best-of-n`.")
    pairs = strict_pairs(ranks, valid)
    gap = torch.where(pairs, score_gaps(scores, valid), 0.0).sum(dim=(1, 2))
    return gap, pairs.any(dim=(1, 2))


def pairwise_loss(scores: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor,
                  log_eps: float = 0.0) -> torch.Tensor:
    """Bradley–Terry: ``−mean log σ(r_w − r_l)`` over the pairs (``K = 2``) that are not ties.

    ``log_eps = 0`` uses ``logsigmoid`` (stable for any gap); ``log_eps > 0`` computes
    ``−log(σ(Δ) + log_eps)`` as MOSS-RLHF does (1e-5), which caps the loss at
    ``−log(log_eps)``. Tied rows contribute nothing. Returns ``[]``.
    """
    gap, has_pair = _pair_gap(scores, ranks, valid, "pairwise")
    per_row = -F.logsigmoid(gap) if log_eps == 0.0 else -torch.log(torch.sigmoid(gap) + log_eps)
    return _mean_over(per_row, has_pair)


def kwise_loss(scores: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """InstructGPT: per prompt, the mean of ``−log σ(r_i − r_j)`` over its strict pairs
    (``rank_i < rank_j``, both valid), i.e. ``1/C(K,2) · Σ`` without ties or padding; then
    the mean over prompts that have a strict pair. Equals :func:`pairwise_loss` at ``K = 2``.
    Returns ``[]``.
    """
    pairs = strict_pairs(ranks, valid)
    per_pair = torch.where(pairs, -F.logsigmoid(score_gaps(scores, valid)), 0.0)
    count = pairs.sum(dim=(1, 2))
    return _mean_over(per_pair.sum(dim=(1, 2)) / count.clamp(min=1), count > 0)


def best_of_n_loss(scores: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Ziegler et al. 2019: ``CE(softmax_k r_k, best)`` over the valid completions of each
    prompt, averaged over prompts with at least two valid completions.

    The best completions are the valid ones with the lowest rank (rank 0); when several
    tie for best, the target is uniform over them. Returns ``[]``.
    """
    scores = scores.float()
    logits = scores.masked_fill(~valid, torch.finfo(scores.dtype).min)
    log_probs = torch.log_softmax(logits, dim=1)
    best_rank = ranks.masked_fill(~valid, torch.iinfo(ranks.dtype).max).min(dim=1, keepdim=True).values
    best = valid & (ranks == best_rank)
    target = best.float() / best.sum(dim=1, keepdim=True).clamp(min=1)
    per_prompt = -torch.where(best, target * log_probs, 0.0).sum(dim=1)
    return _mean_over(per_prompt, valid.sum(dim=1) >= 2)


def ties_loss(scores: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor,
              noise: float = 0.0) -> torch.Tensor:
    """Christiano et al. 2017: ``−[μ1 log P(1≻2) + μ2 log P(2≻1)]`` for every pair of valid
    completions, ties included: μ = (1, 0) for a strict preference, (0.5, 0.5) for equal
    ranks. ``P = (1 − 2·noise) · softmax(r1, r2) + noise`` (``noise = 0.05`` is the paper's
    "0.9 · softmax + 0.05"). Pairs are averaged per prompt (``C(k,2)`` pairs among its k
    valid completions), then over prompts with at least one pair. Returns ``[]``.
    """
    both_valid = valid[:, :, None] & valid[:, None, :]
    # mu[b, i, j] is the label weight of "i beats j"; summing over ordered pairs (i, j)
    # gives both terms of each unordered pair.
    mu = torch.where(ranks[:, :, None] < ranks[:, None, :], 1.0,
                     torch.where(ranks[:, :, None] == ranks[:, None, :], 0.5, 0.0))
    off_diagonal = ~torch.eye(scores.shape[1], dtype=torch.bool, device=scores.device)
    labelled = both_valid & off_diagonal & (mu > 0)
    gaps = score_gaps(scores, valid)
    if noise == 0.0:
        log_p = F.logsigmoid(gaps)
    else:
        log_p = torch.log((1.0 - 2.0 * noise) * torch.sigmoid(gaps) + noise)
    per_prompt_sum = -torch.where(labelled, mu * log_p, 0.0).sum(dim=(1, 2))
    unordered_pairs = (both_valid & off_diagonal).sum(dim=(1, 2)) // 2
    return _mean_over(per_prompt_sum / unordered_pairs.clamp(min=1), unordered_pairs > 0)


def margin_loss(scores: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor,
                margins: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Llama-2: ``−mean log σ(r_w − r_l − scale · margin)`` over pairs (``K = 2``) that are
    not ties. ``margins`` is ``[B]``. Returns ``[]``."""
    gap, has_pair = _pair_gap(scores, ranks, valid, "margin")
    return _mean_over(-F.logsigmoid(gap - scale * margins.float()), has_pair)


def lm_loss(best_nll: torch.Tensor, coef: float = 1.0) -> torch.Tensor:
    """Askell et al. 2021: ``coef · mean(best_nll)``, the LM loss of each prompt's best
    completion (``best_nll`` ``[B]``, mean token NLL). Returns ``[]``."""
    return coef * best_nll.float().mean()


def centering_penalty(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Eisenstein et al. 2023, before the ``centering`` component's ``coef``: the mean over
    prompts of ``(2 · mean_k r_k)²`` over each prompt's valid completions. For a pair this
    is exactly ``(r_w + r_l)²``; for any K it keeps that scale. Prompts without a valid
    completion are left out. Returns ``[]``."""
    count = valid.sum(dim=1)
    prompt_mean = torch.where(valid, scores.float(), 0.0).sum(dim=1) / count.clamp(min=1)
    return _mean_over((2.0 * prompt_mean) ** 2, count > 0)


__all__ = [
    "best_of_n_loss", "centering_penalty", "kwise_loss", "lm_loss", "margin_loss",
    "pairwise_loss", "ranking_metrics", "score_gaps", "strict_pairs", "ties_loss",
]
