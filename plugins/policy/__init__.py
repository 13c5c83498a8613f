"""The ``transformers`` policy: a causal LM from a local checkpoint, an earlier stage's
export or a small architecture built from scratch, optionally with LoRA adapters.

See docs/policy.md.
"""

from rlhfkit import ComponentSpec, hookimpl
from rlhfkit.plugins.policy.build import architecture_config, build_policy, override_dropout
from rlhfkit.plugins.policy.config import (
    ArchitectureConfig,
    LoraSettings,
    TokenizerConfig,
    TransformersPolicyConfig,
)
from rlhfkit.plugins.policy.model import TransformersPolicy, mask_after_eos
from rlhfkit.plugins.policy.tokenizer import (
    CHAT_TEMPLATE,
    build_word_tokenizer,
    ensure_distinct_pad,
    load_tokenizer,
)

__all__ = [
    "CHAT_TEMPLATE", "ArchitectureConfig", "LoraSettings", "TokenizerConfig", "TransformersPolicy",
    "TransformersPolicyConfig", "architecture_config", "build_policy", "build_word_tokenizer",
    "ensure_distinct_pad", "load_tokenizer", "mask_after_eos", "override_dropout",
]


@hookimpl
def rlhfkit_components() -> list[ComponentSpec]:
    return [ComponentSpec(
        kind="policy", name="transformers", config=TransformersPolicyConfig,
        factory=build_policy,
        doc="transformers causal LM from a local path, an earlier stage or an architecture; "
            "full or LoRA")]
