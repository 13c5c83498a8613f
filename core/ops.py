"""Pure tensor functions shared by plugins.

Conventions (see docs/conventions.md): ``mask`` is 1.0 on valid entries, 0.0 elsewhere,
same shape as ``x``; reductions over an all-zero mask return 0 rather than NaN.
"""

from __future__ import annotations

from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3"]


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[N, L]`` position ids 0, 1, 2... over each row's real tokens (0 on padding before
    them), so a left- or right-padded row is encoded exactly as it would be alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def labelled_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, L-1]`` log-probs of tokens ``1..L-1`` of a :func:`rlhfkit.encode_pairs` batch
    (``input_ids``, ``attention_mask``, ``labels_mask``) and the labels mask shifted to
    match (token t+1 is predicted from tokens <= t), in the log-probs' dtype. The rows are
    right-padded, so the model's default position ids are each row's own."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    logprobs = logprobs_from_logits(logits[:, :-1], ids[:, 1:])
    return logprobs, batch["labels_mask"][:, 1:].to(logprobs.dtype)


def shared_prompt_mask(segment: torch.Tensor, additive_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[B, L] -> [B, 1, L, L]`` attention mask of a shared-prompt layout
    (:func:`rlhfkit.encode_preferences`: segment 1 prompt, 2 chosen, 3 rejected;
    :func:`rlhfkit.layout_rankings`: 1 prompt, 2.. the K responses; 0 padding): causal,
    never to padding, each response to the prompt and itself only. Boolean (True:
    attend), or with ``additive_dtype`` 0 where attended and the dtype's minimum elsewhere
    (for attention that adds its mask to the scores)."""
    return segment_mask(segment, shared=1, additive_dtype=additive_dtype)


def packed_mask(segment: torch.Tensor, additive_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[B, L] -> [B, 1, L, L]`` attention mask of packed rows (several examples in one
    row, segment ``1, 2, ...`` per example, 0 padding): causal within each example only.
    Boolean, or additive with ``additive_dtype`` (as :func:`shared_prompt_mask`)."""
    return segment_mask(segment, shared=None, additive_dtype=additive_dtype)


def segment_mask(segment: torch.Tensor, shared: int | None, additive_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Causal attention within each segment of ``segment [B, L]`` (and to the ``shared``
    segment from every other, when given), never to padding (0). Padding columns attend
    to every real column before them: their outputs are never read, and a query with no
    key would give NaN attention."""
    length = segment.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment.device).tril()
    query, key = segment[:, :, None], segment[:, None, :]
    visible = (key == query) | (query == 0)
    if shared is not None:
        visible |= key == shared
    allowed = (causal & (key != 0) & visible)[:, None]
    if additive_dtype is None:
        return allowed
    blocked = torch.full((), torch.finfo(additive_dtype).min, dtype=additive_dtype, device=segment.device)
    return torch.zeros((), dtype=additive_dtype, device=segment.device).where(allowed, blocked)


def last_real_index(mask: torch.Tensor) -> torch.Tensor:
    """``[N, L] -> [N]`` column of each row's last nonzero mask entry (left or right
    padding); 0 for an all-zero row."""
    columns = torch.arange(mask.shape[-1], device=mask.device)
    return (columns * (mask != 0)).argmax(-1)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x * mask`` where ``mask`` is not 0. ``x, mask: [...]``; over all entries or
    ``dim``. Entries where ``mask`` is 0 are left out, whatever they hold (NaN or Inf in
    padding do not leak, as they would through ``x * mask``)."""
    kept = torch.where(mask != 0, x * mask, torch.zeros((), dtype=x.dtype, device=x.device))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``sum(x * mask) / sum(mask)`` over all entries, or along ``dim`` (entries where
    ``mask`` is 0 are left out whatever they hold: see :func:`masked_sum`)."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1e-12)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries of ``x`` (a scalar).

    ``unbiased=True`` applies Bessel's correction ``n / (n - 1)`` with ``n = sum(mask)``
    (TRL, verl ``masked_var``); ``unbiased=False`` is the biased (population) variance
    (OpenAI lm-human-preferences, MOSS-RLHF). With ``n <= 1`` the unbiased variance is 0.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = torch.where(n > 1, var * n / (n - 1).clamp(min=1e-12), torch.zeros_like(var))
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True,
                  unbiased: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mu) * rsqrt(var + eps)`` with masked statistics; ``x, mask: [...]``.

    ``shift_mean=False`` adds ``mu`` back (OpenAI's reward whitening). Entries where
    ``mask`` is 0 are transformed too (callers mask them downstream).

    Presets of spec §A: OpenAI ``unbiased=False, eps=1e-8``; TRL/verl
    ``unbiased=True, eps=1e-8``; MOSS-RLHF ``unbiased=False, eps=1e-6``.
    """
    mean = masked_mean(x, mask)
    whitened = (x - mean) * torch.rsqrt(masked_var(x, mask, unbiased=unbiased) + eps)
    return whitened + mean if not shift_mean else whitened


def whiten(x: torch.Tensor, *, shift_mean: bool = True, unbiased: bool = True,
           eps: float = 1e-8) -> torch.Tensor:
    """:func:`masked_whiten` over every entry of ``x``."""
    return masked_whiten(x, torch.ones_like(x), shift_mean=shift_mean, unbiased=unbiased, eps=eps)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor,
                         temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of ``labels`` under ``softmax(logits / temperature)``.

    Args:
        logits: ``[B, T, V]`` (any float dtype; computed in float32).
        labels: ``[B, T]`` token ids.
    Returns:
        ``[B, T]`` float32 log-probs. Uses ``gather - logsumexp`` so the full
        ``[B, T, V]`` log-softmax is never materialised.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of ``softmax(logits / temperature)``: ``[B, T, V] -> [B, T]`` (float32, or
    float64 for float64 logits).

    Computed as ``-Σ p log p`` from ``log_softmax``, never as ``logsumexp(z) - Σ p z``:
    with large logits the latter subtracts two large, nearly equal numbers and can go
    negative. Tokens of probability 0 (``-inf`` logits) contribute 0; the result is ≥ 0.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    probs = logp.exp()
    terms = torch.where(probs > 0, probs * logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
    return (-terms.sum(-1)).clamp(min=0)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1",
                *, log_ratio_clamp: float | None = None,
                value_clamp: float | None = None) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1/k2/k3).

    With ``log r = ref_logprobs - logprobs``: ``k1 = -log r``; ``k2 = (log r)^2 / 2``;
    ``k3 = (r - 1) - log r`` (unbiased and >= 0).

    Args:
        logprobs, ref_logprobs: ``[B, T]``.
        log_ratio_clamp: clamp ``log r`` to ``±value`` first (verl/OpenRLHF use 20).
        value_clamp: clamp the estimate to ``±value`` (verl/OpenRLHF use 10 for k3).
    Returns:
        ``[B, T]``.
    """
    log_ratio = ref_logprobs.float() - logprobs.float()
    if log_ratio_clamp is not None:
        log_ratio = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
    if estimator == "k1":
        kl = -log_ratio
    elif estimator == "k2":
        kl = 0.5 * log_ratio**2
    elif estimator == "k3":
        kl = torch.expm1(log_ratio) - log_ratio
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}; use k1, k2 or k3")
    if value_clamp is not None:
        kl = kl.clamp(-value_clamp, value_clamp)
    return kl


class RunningMoments:
    """Running mean and variance of a stream of values, merged with Chan et al.'s
    parallel update. Starts at ``mean=0, var=1, count≈0`` (MOSS-RLHF / TRL).

    ``var`` is the biased (population) variance of everything seen; ``std`` applies
    Bessel's correction, as MOSS-RLHF does when it scales rewards by it.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.var = 1.0
        self.count = 1e-24

    @property
    def std(self) -> float:
        if self.count <= 1:
            return self.var**0.5
        return (self.var * self.count / (self.count - 1)) ** 0.5

    @torch.no_grad()
    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, float]:
        """Merge the (masked) values of ``x``; returns the batch's mean and unbiased std."""
        if mask is None:
            mask = torch.ones_like(x)
        n = float(mask.sum())
        if n == 0:
            return 0.0, 0.0
        batch_mean = float(masked_mean(x.double(), mask.double()))
        batch_var = float(masked_var(x.double(), mask.double(), unbiased=False))
        delta = batch_mean - self.mean
        total = self.count + n
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total
        batch_std = (batch_var * n / (n - 1)) ** 0.5 if n > 1 else 0.0
        return batch_mean, batch_std

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]
