"""Direct preference losses as pure tensor functions (spec §G).

Inputs are ``[B]`` float tensors of one batch of pairs: summed token log-probs of the
chosen (``w``) and rejected (``l``) responses under the policy (``pc``, ``pr``) and the
reference (``rc``, ``rr``), or per-token averages where a loss says so. Each function
returns the per-pair losses ``[B]`` in float32 (float64 for float64 inputs); callers take
the mean. Notation:
``Δ = (pc − rc) − (pr − rr)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16/fp16 log-probs are upcast; float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def margin(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
    """``Δ = (log π_w − log ref_w) − (log π_l − log ref_l)`` (at least float32)."""
    return (wide(pc) - wide(rc)) - (wide(pr) - wide(rr))


def log_ratio(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``log π − log ref`` (at least float32): an implicit reward, KTO's ``Δ``."""
    return wide(logp) - wide(ref)


def dpo(delta: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO (Rafailov et al. 2023): ``−log σ(βΔ)``."""
    return -F.logsigmoid(beta * delta)


def cdpo(delta: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Conservative DPO (label smoothing ε): ``−(1−ε) log σ(βΔ) − ε log σ(−βΔ)``."""
    return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)


def robust_dpo(delta: torch.Tensor, beta: float, label_noise: float) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024), unbiased under label flips with rate ε < ½:
    ``[−(1−ε) log σ(βΔ) + ε log σ(−βΔ)] / (1 − 2ε)``."""
    eps = label_noise
    return (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)


def ipo(delta_mean: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023): ``(Δ̄ − 1/(2β))²`` with Δ̄ built from per-token-averaged
    log-probs (TRL's convention)."""
    return (delta_mean - 1 / (2 * beta)) ** 2


def hinge(delta: torch.Tensor, beta: float) -> torch.Tensor:
    """SLiC hinge (Zhao et al. 2023): ``relu(1 − βΔ)``."""
    return torch.relu(1 - beta * delta)


def simpo(mean_w: torch.Tensor, mean_l: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """SimPO (Meng et al. 2024), reference-free: ``−log σ(β(ā_w − ā_l) − γ)`` with ā the
    mean token log-prob."""
    return -F.logsigmoid(beta * (wide(mean_w) - wide(mean_l)) - gamma)


def orpo(mean_w: torch.Tensor, mean_l: torch.Tensor, nll_w: torch.Tensor, lam: float) -> torch.Tensor:
    """ORPO (Hong et al. 2024), reference-free: ``NLL_w − λ log σ(logodds_w − logodds_l)``
    with ``logodds = ā − log(1 − e^ā)``; ``log(1 − e^ā)`` is :func:`log1mexp` (stable
    near ``ā = 0``), and ``ā`` is capped just below 0 so that a response of probability 1
    has large, finite log-odds instead of ``inf`` (both near-certain: ``inf − inf``)."""
    mean_w, mean_l = wide(mean_w), wide(mean_l)
    log_odds = (_log_odds(mean_w)) - _log_odds(mean_l)
    return wide(nll_w) - lam * F.logsigmoid(log_odds)


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """``log(1 − e^a)`` for ``a ≤ 0``, stable at both ends (Mächler 2012): ``log(−expm1(a))``
    for ``a > −log 2``, ``log1p(−e^a)`` below."""
    near = a > -math.log(2)
    # each branch sees a safe stand-in where it is not taken, so its gradient there is 0, not NaN
    safe = torch.full_like(a, -1.0)
    return torch.where(near, torch.log(-torch.expm1(torch.where(near, a, safe))),
                       torch.log1p(-torch.exp(torch.where(near, safe, a))))


def _log_odds(mean: torch.Tensor) -> torch.Tensor:
    capped = mean.clamp(max=-torch.finfo(mean.dtype).tiny)
    return capped - log1mexp(capped)


def kto(delta: torch.Tensor, desirable: torch.Tensor, z0: torch.Tensor, beta: float, weight_desirable: float,
        weight_undesirable: float) -> torch.Tensor:
    """KTO (Ethayarajh et al. 2024) on unpaired rows: with ``Δ = log π(y|x) − log ref(y|x)``
    and the detached reference point ``z0``, ``w_D (1 − σ(β(Δ − z0)))`` for desirable
    rows and ``w_U (1 − σ(β(z0 − Δ)))`` for undesirable ones."""
    z0 = wide(z0.detach())
    delta = wide(delta)
    return torch.where(desirable, weight_desirable * (1 - torch.sigmoid(beta * (delta - z0))),
                       weight_undesirable * (1 - torch.sigmoid(beta * (z0 - delta))))


def kto_reference_point(policy_mismatched: torch.Tensor, ref_mismatched: torch.Tensor) -> torch.Tensor:
    """KTO's ``z0 = clamp(mean(log π(y'|x) − log ref(y'|x)), min=0)``, detached, from
    mismatched (prompt, completion) pairs."""
    return (wide(policy_mismatched) - wide(ref_mismatched)).mean().clamp(min=0).detach()
