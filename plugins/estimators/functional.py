"""Pure tensor functions of the critic-free estimators (spec §E).

Shapes: ``B`` sequences, ``T`` response tokens. ``rewards`` ``[B, T]`` are the token
rewards the ``ppo`` algorithm hands its estimator: the (shaped) sequence score on the
last real token plus any KL-in-reward terms. ``mask`` ``[B, T]`` is 1 on real response
tokens and 0 on padding (docs/conventions.md); whatever the padded entries of
``rewards`` hold (NaN and inf included) never reaches a result. ``group`` ``[B]`` holds
each sample's prompt id: any integers, in any order (the samples of one prompt need not
be contiguous). Every advantage returned is ``[B, T]`` and 0 on padding; REINFORCE++
aside, it is one sequence value broadcast to each real token.
"""

from __future__ import annotations

from typing import Literal

import torch

from rlhfkit import last_real_index, masked_mean, masked_var, masked_whiten

ReinforceBaseline = Literal["none", "batch-mean"]
GRPOScale = Literal["std", "none"]

__all__ = [
    "GRPOScale",
    "ReinforceBaseline",
    "advantage_metrics",
    "group_mean",
    "group_metrics",
    "group_size",
    "group_std",
    "grpo_advantages",
    "leave_one_out_mean",
    "reinforce_advantages",
    "reinforce_plus_plus_advantages",
    "remax_advantages",
    "reward_to_go",
    "rloo_advantages",
    "sequence_returns",
    "to_tokens",
]


def _zero_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with 0 where ``mask`` is 0 (a select, so NaN/inf padding cannot leak)."""
    return torch.where(mask != 0, x, torch.zeros((), dtype=x.dtype, device=x.device))


def sequence_returns(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``R = Σ_t r_t`` over real tokens (γ = 1): ``[B, T], [B, T] -> [B]``."""
    return _zero_padding(rewards, mask).sum(-1)


def to_tokens(sequence_advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Broadcast ``[B]`` sequence advantages to every real token: ``-> [B, T]``, 0 on padding."""
    return _zero_padding(sequence_advantages.unsqueeze(-1).expand(mask.shape), mask)


def _groups(group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index [B], counts [G])``: each sample's group as 0..G-1, and the group sizes."""
    _, index, counts = torch.unique(group, return_inverse=True, return_counts=True)
    return index, counts


def _group_sums(x: torch.Tensor, index: torch.Tensor, n_groups: int) -> torch.Tensor:
    return torch.zeros(n_groups, dtype=x.dtype, device=x.device).index_add_(0, index, x)


def _group_moments(x: torch.Tensor, group: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(index [B], counts [G], mean [G], unbiased std [G])`` of ``x`` ``[B]`` per group;
    the std of a one-sample group is 0."""
    index, counts = _groups(group)
    n = counts.to(x.dtype)
    mean = _group_sums(x, index, len(counts)) / n
    squares = _group_sums((x - mean[index]) ** 2, index, len(counts))
    var = torch.where(counts > 1, squares / (n - 1).clamp(min=1), torch.zeros_like(squares))
    return index, counts, mean, var.sqrt()


def group_size(group: torch.Tensor) -> torch.Tensor:
    """``[B]`` number of samples in each sample's group."""
    index, counts = _groups(group)
    return counts[index]


def group_mean(x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """``[B]`` mean of ``x`` ``[B]`` over each sample's group (the sample included)."""
    index, _, mean, _ = _group_moments(x, group)
    return mean[index]


def group_std(x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """``[B]`` unbiased (Bessel, ``n − 1``) std of ``x`` ``[B]`` over each sample's group,
    as ``torch.std`` in verl and TRL; 0 for a group of one sample."""
    index, _, _, std = _group_moments(x, group)
    return std[index]


def leave_one_out_mean(x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """``[B]`` ``1/(k−1) · Σ_{j≠i} x_j`` over the other samples of each sample's group
    (``k`` its size); 0 for a group of one sample, which has no other sample."""
    index, counts = _groups(group)
    others = _group_sums(x, index, len(counts))[index] - x
    k = counts[index]
    return torch.where(k > 1, others / (k - 1).clamp(min=1).to(x.dtype), torch.zeros_like(x))


def reinforce_advantages(rewards: torch.Tensor, mask: torch.Tensor,
                         baseline: ReinforceBaseline = "batch-mean") -> torch.Tensor:
    """REINFORCE (spec §E): ``A = R − b`` on every real token, ``R = Σ_t r_t`` (γ = 1).

    ``baseline``: ``none`` (``b = 0``) or ``batch-mean`` (``b`` = the mean of ``R`` over
    the ``B`` sequences, each sample's own ``R`` included).
    """
    returns = sequence_returns(rewards, mask)
    if baseline == "batch-mean":
        returns = returns - returns.mean()
    elif baseline != "none":
        raise ValueError(f"unknown REINFORCE baseline {baseline!r}; use 'none' or 'batch-mean'")
    return to_tokens(returns, mask)


def rloo_advantages(rewards: torch.Tensor, mask: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """RLOO (spec §E; TRL, verl): ``A_i = R_i − 1/(k−1) · Σ_{j≠i} R_j`` over the ``k``
    samples of the same prompt, on every real token. A group of one sample has no other
    sample: its baseline is 0 and ``A = R`` (the ``rloo`` component refuses
    ``samples_per_prompt < 2``, as TRL does).
    """
    returns = sequence_returns(rewards, mask)
    return to_tokens(returns - leave_one_out_mean(returns, group), mask)


def grpo_advantages(rewards: torch.Tensor, mask: torch.Tensor, group: torch.Tensor,
                    scale: GRPOScale = "std", eps: float = 1e-6) -> torch.Tensor:
    """GRPO (spec §E; DeepSeekMath, verl): ``A_i = (R_i − mean_G) / (std_G + eps)`` on every
    real token, with the unbiased std of the group's ``R``.

    ``scale="none"`` is Dr.GRPO: ``A_i = R_i − mean_G``. ``eps``: verl 1e-6, TRL 1e-4. A
    group of one sample takes ``mean = 0, std = 1`` (verl), so ``A = R / (1 + eps)``
    (``A = R`` with ``scale="none"``). A group of two or more samples that all score alike
    gets exactly 0 (not the rounding error of its mean divided by a std of the same size).
    """
    if scale not in ("std", "none"):
        raise ValueError(f"unknown GRPO scale {scale!r}; use 'std' or 'none' (Dr.GRPO)")
    if scale == "std" and not eps > 0:
        raise ValueError(f"GRPO's eps must be > 0 (got {eps}): a group whose samples all score alike has std 0")
    returns = sequence_returns(rewards, mask)
    index, counts = _groups(group)
    single = (counts == 1)[index]
    # a group whose returns are all equal has A = 0 exactly: its float mean can be one
    # rounding step off the common value, and that step divided by a std of the same size
    # would be O(1)
    lowest = torch.full_like(counts, 0, dtype=returns.dtype).scatter_reduce(0, index, returns, "amin",
                                                                          include_self=False)
    highest = torch.full_like(counts, 0, dtype=returns.dtype).scatter_reduce(0, index, returns, "amax",
                                                                           include_self=False)
    flat = (lowest == highest)[index] & ~single
    mean = torch.where(single, torch.zeros_like(returns), group_mean(returns, group))
    centred = torch.where(flat, torch.zeros_like(returns), returns - mean)
    if scale == "std":
        std = torch.where(single, torch.ones_like(returns), group_std(returns, group))
        centred = centred / (std + eps)
    return to_tokens(centred, mask)


def remax_advantages(rewards: torch.Tensor, mask: torch.Tensor, greedy_scores: torch.Tensor) -> torch.Tensor:
    """ReMax (spec §E; Li et al. 2023): ``A = R(y) − b`` on every real token, where ``b``
    ``[B]`` is the reward of the greedy response to the same prompt and ``R = Σ_t r_t``."""
    return to_tokens(sequence_returns(rewards, mask) - greedy_scores.to(rewards.dtype), mask)


def reward_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """``G_t = Σ_{s≥t} γ^{s−t} r_s`` over each row's real tokens: ``[B, T] -> [B, T]``, 0 on
    padding (the padded rewards are dropped, as verl's reset after EOS does)."""
    rewards = _zero_padding(rewards, mask)
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return _zero_padding(returns, mask)


def reinforce_plus_plus_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                                   group: torch.Tensor | None = None) -> torch.Tensor:
    """REINFORCE++ (spec §E; Hu 2025, verl, OpenRLHF): the reward-to-go ``G_t`` of the
    token rewards, whitened over every real token of the batch (``masked_whiten`` with the
    TRL/verl preset: unbiased variance, eps 1e-8), 0 on padding.

    With ``group`` (REINFORCE++-baseline), the group mean of ``R = Σ_t r_t`` is subtracted
    from each row's reward on its last real token before the returns, so every ``G_t``
    drops by it (γ = 1). When the rewards are the score alone this is verl's
    ``reinforce_plus_plus_baseline``: ``R − mean_G`` on every token, then whitened. A
    group of one sample takes ``mean = 0`` (verl).
    """
    rewards = _zero_padding(rewards, mask)
    if group is not None:
        returns = sequence_returns(rewards, mask)
        single = group_size(group) == 1
        mean = torch.where(single, torch.zeros_like(returns), group_mean(returns, group))
        last = last_real_index(mask).unsqueeze(-1)
        rewards = rewards.scatter_add(1, last, -mean.unsqueeze(-1))
    return _zero_padding(masked_whiten(reward_to_go(rewards, mask, gamma), mask), mask)


@torch.no_grad()
def group_metrics(returns: torch.Tensor, group: torch.Tensor) -> dict[str, float]:
    """Debug statistics of the sequence returns ``[B]`` over groups: ``group/size`` (mean
    samples per group), ``group/std`` (mean unbiased within-group std of ``R``, over
    groups of two or more) and ``group/zero_std_fraction`` (share of those groups whose
    samples all score the same: a group baseline leaves them no learning signal)."""
    index, counts, _, std = _group_moments(returns, group)
    highest = torch.full_like(std, -torch.inf).scatter_reduce(0, index, returns, reduce="amax")
    lowest = torch.full_like(std, torch.inf).scatter_reduce(0, index, returns, reduce="amin")
    several = (counts > 1).to(returns.dtype)
    return {"group/size": float(counts.to(returns.dtype).mean()),
            "group/std": float(masked_mean(std, several)),
            "group/zero_std_fraction": float(masked_mean((highest == lowest).to(returns.dtype), several))}


@torch.no_grad()
def advantage_metrics(advantages: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """``advantage/raw_mean`` and ``advantage/raw_std`` (unbiased) over real tokens, before
    the algorithm's own whitening (``advantage/mean`` and ``/std`` are logged after it)."""
    return {"advantage/raw_mean": float(masked_mean(advantages, mask)),
            "advantage/raw_std": float(masked_var(advantages, mask).sqrt())}
