"""Forwards over (prompt, response) batches, and assembling rollouts from pieces.

Shapes: ``B`` sequences, ``P`` prompt tokens (left-padded), ``T`` response tokens
(right-padded). Position ids follow the attention mask (spec §J: left padding with
correct position ids), so a padded row is computed exactly as it would be alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from rlhfkit import Rollout, entropy_from_logits, logprobs_from_logits, positions_from_mask


def joined(rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids``, ``attention_mask``, ``position_ids`` ``[B, P + T]`` of prompt + response."""
    ids = torch.cat([rollout.prompt_ids, rollout.response_ids], dim=1)
    mask = torch.cat([rollout.prompt_mask, rollout.response_mask], dim=1)
    return ids, mask, positions_from_mask(mask)


def response_hidden(model: torch.nn.Module, rollout: Rollout) -> torch.Tensor:
    """``[B, T, H]`` last hidden states at the positions that predict each response token
    (the state before token t is emitted: what a value head reads)."""
    ids, mask, positions = joined(rollout)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True, use_cache=False,
                logits_to_keep=1)  # only the hidden states are read
    p = rollout.prompt_ids.shape[1]
    return out.hidden_states[-1][:, p - 1:-1]


def response_logits(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                    response_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T, V]`` logits of the columns that predict each response token, from one
    forward over left-padded prompt + right-padded response; the LM head runs on the
    ``T + 1`` last columns only (``logits_to_keep``)."""
    ids = torch.cat([prompt_ids, response_ids], dim=1)
    mask = torch.cat([prompt_mask, response_mask], dim=1)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=False,
                 logits_to_keep=response_ids.shape[1] + 1).logits[:, :-1]


def response_logprobs(model: torch.nn.Module, rollout: Rollout, temperature: float = 1.0) -> torch.Tensor:
    """``[B, T]`` log-probs of ``rollout``'s response tokens on ``logits / temperature``, 0
    on padding (no entropy: what sampling and the reference need)."""
    logits = response_logits(model, rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids,
                             rollout.response_mask)
    logprobs = logprobs_from_logits(logits, rollout.response_ids, temperature)
    return logprobs * rollout.response_mask.to(logprobs.dtype)


def policy_forward(model: torch.nn.Module, rollout: Rollout, temperature: float, entropy_grad: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs ``[B, T]`` of the response tokens on ``logits / temperature`` (with grad
    when enabled) and the entropy ``[B, T]`` (with grad only if ``entropy_grad``)."""
    logits = response_logits(model, rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids,
                             rollout.response_mask)
    logprobs = logprobs_from_logits(logits, rollout.response_ids, temperature)
    with contextlib.nullcontext() if entropy_grad else torch.no_grad():
        entropy = entropy_from_logits(logits, temperature)
    mask_f = rollout.response_mask.to(logprobs.dtype)
    return logprobs * mask_f, entropy * mask_f


def pad_to(x: torch.Tensor, width: int, value: float, left: bool) -> torch.Tensor:
    """Pad the last dim of ``x`` to ``width`` with ``value`` on the left or right."""
    missing = width - x.shape[-1]
    if missing <= 0:
        return x
    fill = torch.full((*x.shape[:-1], missing), value, dtype=x.dtype, device=x.device)
    return torch.cat([fill, x] if left else [x, fill], dim=-1)


def concat(parts: Sequence[Rollout], pad_token_id: int) -> Rollout:
    """One rollout from several (e.g. generation chunks, or every rank's): prompts are
    re-padded on the left and responses on the right to the widest part."""
    parts = [p for p in parts if len(p)]
    p_width = max(p.prompt_ids.shape[1] for p in parts)
    t_width = max(p.response_ids.shape[1] for p in parts)
    fields: dict[str, Any] = {}
    for name, value in vars(parts[0]).items():
        values = [getattr(p, name) for p in parts]
        if value is None:
            fields[name] = None
        elif isinstance(value, list):
            fields[name] = [item for v in values for item in v]
        elif isinstance(value, dict):
            fields[name] = {k: torch.cat([v[k] for v in values]) for k in value}
        elif name.startswith("prompt_"):
            fill = pad_token_id if name == "prompt_ids" else 0
            fields[name] = torch.cat([pad_to(v, p_width, fill, left=True) for v in values])
        elif value.dim() == 2:
            fill = pad_token_id if name == "response_ids" else 0
            fields[name] = torch.cat([pad_to(v, t_width, fill, left=False) for v in values])
        else:
            fields[name] = torch.cat(values)
    return Rollout(**fields)


def to_state(rollout: Rollout) -> dict[str, Any]:
    """A rollout as plain tensors, lists and dicts (checkpointable with weights_only)."""
    return {k: _moved(v, torch.device("cpu")) for k, v in vars(rollout).items()}


def from_state(state: dict[str, Any], device: torch.device) -> Rollout:
    return Rollout(**{k: _moved(v, device) for k, v in state.items()})


def _moved(value: Any, device: torch.device) -> Any:
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, dict):
        return {k: v.to(device) for k, v in value.items()}
    return value


def gather(rollout: Rollout, pad_token_id: int, device: torch.device) -> Rollout:
    """Every rank's rollout, concatenated in rank order, on every rank (one process:
    unchanged). The experience is small next to the models, so each rank holds all of
    it and minibatches are the same global batches whatever the number of devices."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return rollout
    parts: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, to_state(rollout))
    return concat([from_state(part, device) for part in parts], pad_token_id)
