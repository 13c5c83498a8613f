"""The last layer's MLP only where its output is read.

A causal LM's last decoder layer feeds only the final norm and the LM head (or a score
head), both position-wise. When a step reads the last hidden state at a few positions —
a reward model at each response's EOS, SFT and DPO at the columns that predict a trained
token — the last layer's MLP at every other position is work whose result is never read:
about two thirds of that layer's matmuls. :func:`mlp_only_at` computes it at the read
positions only and leaves zeros elsewhere; what is read, and its gradients, are the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def last_mlp(model: torch.nn.Module) -> torch.nn.Module | None:
    """The ``mlp`` submodule of the last decoder layer (GPT-2, Llama, Qwen2, Mistral,
    Gemma, ...), or ``None`` for a model without one (OPT keeps ``fc1``/``fc2`` in the
    layer itself) or when it cannot be found."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    layers = getattr(config, "num_hidden_layers", None)
    if not layers:
        return None
    stacks = [m for m in inner.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == layers]
    if len(stacks) != 1:
        return None
    mlp = getattr(stacks[0][-1], "mlp", None)
    return mlp if isinstance(mlp, torch.nn.Module) else None


def can_trim(model: torch.nn.Module) -> bool:
    """Whether :func:`mlp_only_at` applies: a last-layer ``mlp`` and no gradient
    checkpointing (its recomputation in the backward pass would run the untrimmed MLP)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = "is_activation_checkpointing" if hasattr(type(inner), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"  # the name before transformers 5.20
    return last_mlp(model) is not None and not getattr(inner, name, False)


@contextmanager
def mlp_only_at(model: torch.nn.Module, keep: torch.Tensor | None) -> Iterator[None]:
    """While inside, the last layer's MLP runs only where ``keep [B, L]`` (bool) is True,
    for inputs of that batch shape; its output is 0 elsewhere. ``keep=None`` or a model
    :func:`can_trim` refuses: no change."""
    mlp = last_mlp(model) if keep is not None and can_trim(model) else None
    if mlp is None:
        yield
        return
    original = mlp.forward

    def trimmed(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if hidden.shape[:-1] != keep.shape:
            return original(hidden, *args, **kwargs)
        out = original(hidden[keep], *args, **kwargs)
        return out.new_zeros(*keep.shape, out.shape[-1]).masked_scatter(keep[..., None], out)

    own = "forward" in mlp.__dict__  # e.g. an accelerate hook's: put it back, not the class's
    mlp.forward = trimmed
    try:
        yield
    finally:
        if own:
            mlp.forward = original
        else:
            del mlp.forward
