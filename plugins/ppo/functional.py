"""Pure tensor functions of PPO (spec §C, §D, §E, §F, §J).

Shapes: ``B`` sequences, ``T`` response tokens; per-token tensors are ``[B, T]``, right
padded, and ``mask`` is a float ``[B, T]`` that is 1 on real response tokens and 0 on
padding (docs/conventions.md). Entries where ``mask`` is 0 never reach a result on real
tokens, whatever they hold (NaN and inf included). Metrics are 0-dim detached tensors,
so that computing them never waits for the device; the caller converts when it logs.
"""

from __future__ import annotations

from typing import Literal

import torch

from rlhfkit import kl_estimate, last_real_index, masked_mean, masked_sum, masked_var
from rlhfkit.plugins.ppo import Aggregation

ScorePosition = Literal["last", "after-eos"]

__all__ = [
    "AdaptiveKLController",
    "Aggregation",
    "FixedKLController",
    "ScorePosition",
    "aggregate",
    "explained_variance",
    "gae",
    "policy_loss",
    "score_to_token_rewards",
    "sequence_kl",
    "value_loss",
]


def _zero_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with 0 where ``mask`` is 0 (a select, so NaN/inf padding cannot leak)."""
    return torch.where(mask != 0, x, torch.zeros((), dtype=x.dtype, device=x.device))


@torch.no_grad()
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (spec §E; OpenAI lm-human-preferences, TRL, verl).

    ``δ_t = r_t + γ V_{t+1} − V_t``, ``A_t = δ_t + γλ A_{t+1}``, ``returns = A + V``.
    After a row's last real token the episode ends: ``V`` and ``A`` there count as 0
    (spec's ``V_T = 0``), so rewards and values on padding never enter. A 0 inside a row
    would likewise end the episode early; responses are right-padded, so it does not occur.

    Args:
        rewards, values, mask: ``[B, T]``.
    Returns:
        ``(advantages, returns)``, each ``[B, T]``, 0 where ``mask`` is 0; no gradient.
    """
    rewards, values = _zero_padding(rewards, mask), _zero_padding(values, mask)
    valid = mask != 0
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = torch.where(valid[:, t], delta + gamma * lam * next_advantage, 0.0)
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, _zero_padding(advantages + values, mask)


def aggregate(
    loss_per_token: torch.Tensor, mask: torch.Tensor, mode: Aggregation, constant: float | None = None
) -> torch.Tensor:
    """Reduce a ``[B, T]`` per-token loss to a scalar (spec §F, "loss aggregation").

    - ``token-mean``: ``Σ L·m / Σ m`` over the batch (TRL, OpenRLHF, verl default).
    - ``sequence-mean``: the mean over sequences of each one's token mean (GRPO paper);
      sequences with no real token are left out.
    - ``token-sum-norm`` (Dr.GRPO): each sequence's ``Σ_t L·m`` divided by a constant, then
      the mean over the ``B`` sequences, i.e. ``Σ L·m / (B · constant)``. ``constant``
      defaults to ``T`` (the generation budget ``mask.shape[1]``), as in Dr.GRPO's code and
      verl's ``seq-mean-token-sum-norm``.
    - ``global-token-mean`` (DAPO): ``Σ L·m / constant`` where ``constant`` (required) is
      the real-token count of the whole batch over minibatches and ranks, so summing the
      pieces gives the token mean of the global batch.

    An all-zero mask gives 0, not NaN.
    """
    if mode == "token-mean":
        return masked_mean(loss_per_token, mask)
    if mode == "sequence-mean":
        has_tokens = (mask.sum(-1) > 0).to(loss_per_token.dtype)
        return masked_mean(masked_mean(loss_per_token, mask, dim=-1), has_tokens)
    if mode == "token-sum-norm":
        return masked_sum(loss_per_token, mask) / (mask.shape[0] * (constant or mask.shape[1]))
    if mode == "global-token-mean":
        if constant is None:
            raise ValueError("aggregation 'global-token-mean' needs `constant`: the global real-token count")
        return masked_sum(loss_per_token, mask) / constant
    raise ValueError(
        f"unknown aggregation {mode!r}; use token-mean, sequence-mean, token-sum-norm or global-token-mean"
    )


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    aggregation: Aggregation = "token-mean",
    constant: float | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip surrogate (spec §F), with asymmetric epsilon and verl's dual clip.

    ``ρ = exp(logp − old)``, ``L_t = max(−A·ρ, −A·clip(ρ, 1 − clip_low, 1 + clip_high))``;
    with ``dual_clip = c > 1`` (verl ``clip_ratio_c``), ``L_t = min(L_t, −A·c)`` where
    ``A < 0``. ``L`` is then reduced by :func:`aggregate` (``constant`` goes there).

    Args:
        logprobs: ``[B, T]`` log π_θ (with grad); old_logprobs: ``[B, T]`` log π at rollout.
        advantages, mask: ``[B, T]``.
        weights: ``[B, T]`` per-token factors of ``L_t`` (no grad), e.g. the truncated
            importance weights of :func:`tis_weights`; ``None``: 1.
    Returns:
        ``(loss, metrics)``; metrics are 0-dim detached tensors over real tokens:
        ``policy/clip_fraction`` (share where the clipped term is strictly larger, i.e.
        chosen), ``policy/dual_clip_fraction`` (share where the dual bound is taken; only
        with ``dual_clip``), ``policy/approx_kl`` (k3 of π_old vs π_θ: an estimate of
        KL(π_old ‖ π_θ) from the rollout's samples, ``(ρ − 1) − log ρ``, as CleanRL) and
        ``policy/kl_k1`` (mean of ``old − logp``, verl's ``ppo_kl``).
    """
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1 (verl uses 3), got {dual_clip}")
    log_ratio = _zero_padding(logprobs - old_logprobs, mask)
    advantages = _zero_padding(advantages, mask)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    metrics: dict[str, torch.Tensor] = {}
    if dual_clip is not None:
        bound = -advantages * dual_clip
        dual_taken = (advantages < 0) & (loss > bound)
        loss = torch.where(dual_taken, bound, loss)
        metrics["policy/dual_clip_fraction"] = masked_mean(dual_taken.float(), mask).detach()
    with torch.no_grad():
        metrics["policy/clip_fraction"] = masked_mean((clipped > unclipped).float(), mask)
        # samples come from π_old, so k3 takes log r = logp − old (kl_estimate's ref − logp)
        metrics["policy/approx_kl"] = masked_mean(
            kl_estimate(-log_ratio, torch.zeros_like(log_ratio), "k3"), mask
        )
        metrics["policy/kl_k1"] = masked_mean(-log_ratio, mask)
    if weights is not None:
        loss = loss * weights.detach().to(loss.dtype)
    return aggregate(loss, mask, aggregation, constant), metrics


def gspo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO (Zheng et al. 2025): a sequence-level, length-normalised ratio, clipped per sequence.

    ``s_i = exp((1/|y_i|) Σ_t (logp − old))`` (the geometric mean of the token ratios),
    ``A_i`` the sequence's advantage (the mean of its tokens' advantages: the one value
    an outcome reward gives every token), ``L_i = max(−A_i·s_i, −A_i·clip(s_i, 1−ε_low,
    1+ε_high))``, and the loss the mean of ``L_i`` over the sequences with a real token
    (a sequence without one contributes nothing; all empty: 0). The sequence log-ratio
    is capped at 10 (verl's cap), so an extreme ratio gives a finite loss.

    Returns ``(loss, metrics)``: ``policy/clip_fraction`` (share of sequences whose
    clipped term is taken), ``policy/approx_kl`` (k3 on the token ratios, as
    :func:`policy_loss`), ``policy/kl_k1`` and ``policy/sequence_ratio`` (mean ``s_i``).
    """
    mask = mask.to(logprobs.dtype)
    lengths = mask.sum(-1)
    has_tokens = (lengths > 0).to(logprobs.dtype)
    log_ratio = _zero_padding(logprobs - old_logprobs, mask)
    # capped at 10 (as verl): exp of a larger log-ratio overflows fp32 to inf, and the loss with it
    sequence_log_ratio = (log_ratio.sum(-1) / lengths.clamp(min=1)).clamp(max=10.0)
    advantage = _zero_padding(advantages, mask).sum(-1) / lengths.clamp(min=1)
    ratio = torch.exp(sequence_log_ratio)
    unclipped = -advantage * ratio
    clipped = -advantage * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = masked_mean(torch.maximum(unclipped, clipped), has_tokens)
    with torch.no_grad():
        metrics = {
            "policy/clip_fraction": masked_mean((clipped > unclipped).to(logprobs.dtype), has_tokens),
            "policy/approx_kl": masked_mean(kl_estimate(-log_ratio, torch.zeros_like(log_ratio), "k3"), mask),
            "policy/kl_k1": masked_mean(-log_ratio, mask),
            "policy/sequence_ratio": masked_mean(ratio, has_tokens),
        }
    return loss, metrics


def tis_weights(old_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, mask: torch.Tensor, cap: float
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework
    secretly brings you off-policy RL training"; verl ``tis_imp_ratio_cap``, OpenRLHF,
    TRL ``vllm_importance_sampling_cap``): the samples came from the engine's π_engine,
    not the trainer's π_old, so each token's loss is weighted by
    ``w_t = min(π_old / π_engine, cap) = min(exp(old − engine), cap)`` (no grad).

    Returns ``([B, T] weights, 1 on padding; metrics)``: ``policy/tis_weight`` (mean
    over real tokens) and ``policy/tis_truncated_fraction`` (share at the cap)."""
    raw = torch.exp(_zero_padding(old_logprobs.float() - engine_logprobs.float(), mask)).detach()
    weights = raw.clamp(max=cap)
    return torch.where(mask.bool(), weights, torch.ones_like(weights)), {
        "policy/tis_weight": masked_mean(weights, mask), "policy/tis_truncated_fraction":
        masked_mean((raw > cap).float(), mask)}


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None = 0.2,
    aggregation: Aggregation = "token-mean",
    constant: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss (spec §F; OpenAI, TRL, MOSS-RLHF, verl).

    ``Vc = old + clamp(V − old, −clip, clip)``, ``L_t = ½ · max((V − R)², (Vc − R)²)``;
    ``clip=None`` gives ``½ (V − R)²``. Reduced by :func:`aggregate`.

    Args:
        values: ``[B, T]`` (with grad); old_values: ``[B, T]`` at rollout; returns, mask: ``[B, T]``.
    Returns:
        ``(loss, metrics)``; 0-dim detached metrics over real tokens: ``value/abs_error``
        (mean ``|V − R|``) and, with ``clip``, ``value/clip_fraction`` (share where the
        clipped term is strictly larger).
    """
    values, returns = _zero_padding(values, mask), _zero_padding(returns, mask)
    loss = (values - returns) ** 2
    metrics = {"value/abs_error": masked_mean((values - returns).abs(), mask).detach()}
    if clip is not None:
        old_values = _zero_padding(old_values, mask)
        clipped = (old_values + (values - old_values).clamp(-clip, clip) - returns) ** 2
        metrics["value/clip_fraction"] = masked_mean((clipped > loss).float(), mask).detach()
        loss = torch.maximum(loss, clipped)
    return aggregate(0.5 * loss, mask, aggregation, constant), metrics


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 − Var[R − V] / Var[R]`` over real tokens (``[B, T]`` each -> 0-dim tensor).

    Unbiased (Bessel) variances, ``masked_var``'s default; the ratio is the same either way
    except with one token, where both are 0. 1 means perfect values, 0 no better than a
    constant; NaN when ``Var[R]`` is 0 (explained variance is undefined there, as in
    CleanRL/SB3).
    """
    values, returns = _zero_padding(values, mask), _zero_padding(returns, mask)
    var_returns = masked_var(returns, mask)
    ratio = masked_var(returns - values, mask) / var_returns
    return torch.where(var_returns > 0, 1 - ratio, torch.full_like(ratio, float("nan")))


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` per-sequence ``Σ_t (logp − ref)`` over real tokens (the k1 sum, in float32):
    the KL whose batch mean drives :class:`AdaptiveKLController` (spec §D, Ziegler et al.)."""
    return masked_sum(_zero_padding(logprobs.float() - ref_logprobs.float(), mask), mask, dim=-1)


class FixedKLController:
    """A constant KL coefficient ``β`` (spec §D: 0.2 OpenAI, 0.05 TRL)."""

    def __init__(self, beta: float):
        self.value = beta

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt; present so that both controllers are used the same way."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = state["value"]


class AdaptiveKLController:
    """Ziegler et al. (2019) proportional controller of the KL coefficient (spec §D).

    ``e = clip(KL / target − 1, −0.2, 0.2)``, ``β ← β · (1 + e · n_steps / horizon)``,
    where ``KL`` is the batch mean of :func:`sequence_kl` and ``n_steps`` the number of
    samples (episodes) since the last update.
    """

    def __init__(self, init_beta: float = 0.15, target: float = 6.0, horizon: int = 10000):
        self.value = init_beta
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = state["value"]


def score_to_token_rewards(
    scores: torch.Tensor, mask: torch.Tensor, position: ScorePosition = "last"
) -> torch.Tensor:
    """Place each sequence score on one response token (spec §C): ``[B], [B, T] -> [B, T]``.

    - ``last``: on the last real token (OpenRLHF, MOSS-RLHF).
    - ``after-eos``: one past the last real token when that fits in ``T``, else on the
      last real token (TRL's old PPO: ``sequence_lengths + 1`` where it is ``< T``). That
      position is padding, so the caller must extend the mask by one token there (TRL's
      ``padding_mask_p1``), or GAE drops the score.

    Everything else is 0; rows with no real token get nothing. Result dtype: ``scores``'.
    """
    if position not in ("last", "after-eos"):
        raise ValueError(f"unknown score position {position!r}; use 'last' or 'after-eos'")
    index = last_real_index(mask)
    if position == "after-eos":
        index = torch.where(index + 1 < mask.shape[1], index + 1, index)
    has_tokens = (mask != 0).any(-1)
    placed = torch.where(has_tokens, scores, torch.zeros((), dtype=scores.dtype, device=scores.device))
    rewards = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
    return rewards.scatter(1, index.unsqueeze(1), placed.unsqueeze(1))
