"""Supervised fine-tuning (InstructGPT step 1) and plain LM pretraining.

Loss: the negative log-likelihood of the completion tokens (and of EOS) given the
prompt, averaged over every such token of the global batch, so 1 device and N devices
at the same global batch compute the same loss. ``train_on_prompt: true`` trains on
every token (LM pretraining).

This module holds only the settings and the registration; the LightningModule lives in
``module.py`` and is imported when a stage is built, so listing plugins stays fast.
"""

from __future__ import annotations

from pydantic import Field

from rlhfkit import ComponentSpec, OptimizerSettings, Slot, hookimpl, lazy


class SFTConfig(OptimizerSettings):
    """AdamW and schedule settings (:class:`rlhfkit.OptimizerSettings`), then these:"""

    train_on_prompt: bool = Field(False, description="also learn the prompt tokens (plain LM pretraining)")
    max_length: int = Field(128, ge=2, description="prompt + completion tokens; longer prompts are cut on the left")
    packing: bool = Field(
        False, description="pack several examples into each row of up to max_length tokens (best-fit decreasing, "
                            "once before training), attention and positions kept inside each example: less "
                            "padding, the same loss per token. batch_size then counts packed rows, as in TRL")
    padding_free: bool = Field(
        True, description="lay out each micro-batch's examples (or packs) in as few rows of up to max_length tokens "
                           "as fit (best-fit decreasing), each example attending to itself only, instead of one "
                           "padded row each: the same examples and loss, less padding to compute")
    trim_last_layer: bool = Field(
        True, description="run the last layer's MLP only at the columns that predict a trained token (as the LM "
                          "head): the same loss and gradients, less work where prompts are long; checked before "
                          "training, off for models without a last-layer `mlp` or with gradient checkpointing")
    eval_batch_size: int = Field(64, ge=1, description="rows per forward when computing held-out perplexity")
    sample_prompts: int = Field(4, ge=0, description="fixed prompts sampled before and after training")
    sample_max_new_tokens: int = Field(32, ge=1, description="length limit of those samples")


SLOTS = {
    "policy": Slot("policy", doc="the model to train"),
    "data": Slot("dataset", rows=frozenset({"prompt-completion", "text", "messages"}), doc="demonstrations (prompt-completion, messages) or text"),
    "eval_data": Slot("dataset", required=False, rows=frozenset({"prompt-completion", "text", "messages"}), doc="held-out rows for perplexity and samples"),
}


@hookimpl
def rlhfkit_components() -> list[ComponentSpec]:
    return [ComponentSpec(
        kind="algorithm", name="sft", config=SFTConfig, factory=lazy("rlhfkit.plugins.sft.module:SFT"), slots=SLOTS,
        doc="supervised fine-tuning on demonstrations (or LM pretraining on text)",
    )]
