"""Tiny causal LMs for the layout tests (shared prompt, packing, the trimmed last layer),
and a wrapper that ignores custom attention masks, as some models and kernels do."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from rlhfkit.plugins.policy.build import architecture_config
from rlhfkit.plugins.policy.config import ArchitectureConfig


def tiny_causal_lm(tokenizer, family: str, attention: str = "sdpa", hidden: int = 32):
    """A 2-layer ``family`` model in eval mode, seed 0, no dropout, its weight matrices
    scaled by 8 so that attention matters and a leak across a mask would show."""
    torch.manual_seed(0)
    config = architecture_config(ArchitectureConfig(family=family, layers=2, hidden=hidden, dropout=0.0), tokenizer)
    config._attn_implementation = attention
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.mul_(8)
    return model


class IgnoresMask(torch.nn.Module):
    """``model`` building its own causal mask whatever 4-D mask it is given (and, with
    ``ignore_positions``, its own position ids too)."""

    def __init__(self, model, ignore_positions: bool = False):
        super().__init__()
        self.inner = model
        self.config = model.config
        self.ignore_positions = ignore_positions

    def forward(self, input_ids, attention_mask=None, **kwargs):
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = None
        if self.ignore_positions:
            kwargs.pop("position_ids", None)
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
