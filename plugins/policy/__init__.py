"""The ``transformers`` policy: a causal LM from a local checkpoint, an earlier stage's
export or a small architecture built from scratch, optionally with LoRA adapters.

See docs/policy.md.
"""

import importlib
from typing import Any

from rlhfkit import ComponentSpec, StageContext, hookimpl
from rlhfkit.plugins.policy.config import (
    ArchitectureConfig,
    LoraSettings,
    TokenizerConfig,
    TransformersPolicyConfig,
)

# transformers loads only when a policy is built or one of these names is used, so that
# `rlhfkit plugins` and `rlhfkit validate` start fast.
_LAZY = {
    "architecture_config": "build", "build_policy": "build", "override_dropout": "build",
    "TransformersPolicy": "model", "mask_after_eos": "model",
    "CHAT_TEMPLATE": "tokenizer", "build_word_tokenizer": "tokenizer",
    "ensure_distinct_pad": "tokenizer", "load_tokenizer": "tokenizer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _build(config: TransformersPolicyConfig, context: StageContext | None) -> Any:
    from rlhfkit.plugins.policy.build import build_policy

    return build_policy(config, context)

__all__ = [
    "CHAT_TEMPLATE", "ArchitectureConfig", "LoraSettings", "TokenizerConfig", "TransformersPolicy",
    "TransformersPolicyConfig", "architecture_config", "build_policy", "build_word_tokenizer",
    "ensure_distinct_pad", "load_tokenizer", "mask_after_eos", "override_dropout",
]


@hookimpl
def rlhfkit_components() -> list[ComponentSpec]:
    return [ComponentSpec(
        kind="policy", name="transformers", config=TransformersPolicyConfig,
        factory=_build,
        doc="transformers causal LM from a local path, an earlier stage or an architecture; "
            "full or LoRA")]
