"""Settings of the ``transformers`` policy: where the model comes from and how it trains."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rlhfkit import StageRef, ref

Family = Literal["gpt2", "opt", "llama", "qwen2"]
DType = Literal["float32", "bfloat16", "float16"]
TaskRef = ref("task")


class ArchitectureConfig(BaseModel):
    """A small decoder built from scratch (the built-in tasks' models)."""

    model_config = ConfigDict(extra="forbid")

    family: Family = Field("gpt2", description="transformers model family to instantiate.")
    layers: int = Field(2, gt=0, description="Number of decoder layers.")
    hidden: int = Field(64, gt=0, description="Hidden (embedding) size.")
    heads: int = Field(4, gt=0, description="Attention heads; must divide `hidden`.")
    kv_heads: int | None = Field(
        None, gt=0,
        description="Key/value heads for grouped-query attention (llama, qwen2 only); "
                    "default: equal to `heads`.")
    intermediate: int | None = Field(
        None, gt=0, description="Feed-forward inner size; default 4 * hidden.")
    max_positions: int = Field(128, gt=0, description="Longest sequence (prompt + response).")
    dropout: float = Field(
        0.1, ge=0.0, le=1.0,
        description="Dropout probability of every dropout in the model (llama/qwen2 only "
                    "have attention dropout).")
    tie_embeddings: bool = Field(True, description="Share input embedding and output head.")

    @model_validator(mode="after")
    def _check_shapes(self) -> ArchitectureConfig:
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if self.kv_heads is not None:
            if self.family not in ("llama", "qwen2"):
                raise ValueError(f"kv_heads applies to llama and qwen2 only, not {self.family}; "
                                 "remove it")
            if self.heads % self.kv_heads:
                raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads "
                                 f"({self.kv_heads})")
        if self.family in ("llama", "qwen2") and (self.hidden // self.heads) % 2:
            raise ValueError(f"rotary embeddings need an even head size; hidden / heads = "
                             f"{self.hidden // self.heads}")
        return self


class TokenizerConfig(BaseModel):
    """Where the tokenizer comes from: a local directory or a built-in task's vocabulary."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(
        None, description="Local directory holding a transformers tokenizer.")
    task: TaskRef | None = Field(  # type: ignore[valid-type]
        None, description="Build a word-level tokenizer from this task's vocabulary.")

    @model_validator(mode="after")
    def _exactly_one(self) -> TokenizerConfig:
        if (self.path is None) == (self.task is None):
            raise ValueError("set exactly one of tokenizer.path (a local tokenizer directory) "
                             "or tokenizer.task (a word-level tokenizer from a task's vocabulary)")
        return self


class LoraSettings(BaseModel):
    """Low-rank adapters (peft). Only the adapter weights train; export merges them."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, gt=0, description="Adapter rank.")
    alpha: float = Field(16, gt=0, description="Scaling numerator: updates scale by alpha / r.")
    dropout: float = Field(0.05, ge=0.0, le=1.0, description="Dropout on the adapter input.")
    target_modules: list[str] | None = Field(
        None,
        description="Module names to adapt. Default: peft's choice for the family "
                    "(gpt2: c_attn; opt, llama, qwen2: q_proj, v_proj).")


class TransformersPolicyConfig(BaseModel):
    """A transformers causal LM: loaded from a directory or an earlier stage, or built fresh."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(
        None, description="Local directory of a transformers checkpoint (never downloaded).")
    from_stage: StageRef | None = Field(
        None, description="Start from the model an earlier stage of this recipe exported.")
    architecture: ArchitectureConfig | None = Field(
        None, description="Build a freshly initialised model from this architecture.")
    tokenizer: TokenizerConfig | None = Field(
        None,
        description="Tokenizer; default: the one saved next to the model (path / from_stage). "
                    "Required with `architecture`.")
    dtype: DType = Field("float32", description="Parameter dtype.")
    dropout: float | None = Field(
        None, ge=0.0, le=1.0,
        description="Override every dropout probability in the model config (e.g. 0 for RL, "
                    "so rollout and training log-probs agree); default: keep the model's.")
    trust_remote_code: bool = Field(
        False,
        description="Allow a checkpoint to run its own Python code when loading. Off unless "
                    "the recipe turns it on: only enable it for checkpoints you trust.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward to save memory.")
    fused_activations: bool = Field(
        True,
        description="Run the tanh-approximate GELU written out in Python (`gelu_new`, `gelu_fast`: GPT-2, "
                    "GPT-J, GPT-Neo, CodeGen, Phi) as torch's one-kernel `gelu(approximate='tanh')`: the "
                    "same formula, equal up to float rounding; exports keep the original name. false: "
                    "the checkpoint's own modules.")
    lora: LoraSettings | None = Field(
        None, description="Train low-rank adapters instead of all weights.")
    chat_template: Literal["auto", "always", "never"] | None = Field(
        None,
        description="When prompts go through the tokenizer's chat template. auto: conversational rows "
                    "(lists of messages) do, text is used as it is; always: text prompts too, as one user "
                    "message; never: no template (conversational rows are an error). Default: what the "
                    "source model's tokenizer was saved with (an earlier stage's setting), else auto.")

    @model_validator(mode="after")
    def _one_source(self) -> TransformersPolicyConfig:
        sources = [name for name in ("path", "from_stage", "architecture")
                   if getattr(self, name) is not None]
        if len(sources) != 1:
            found = f"got {' and '.join(sources)}" if sources else "got none"
            raise ValueError(
                f"set exactly one model source ({found}): `path` (a local checkpoint "
                "directory), `from_stage` (an earlier stage's export) or `architecture` "
                "(build a fresh model)")
        if self.architecture is not None and self.tokenizer is None:
            raise ValueError("a model built from `architecture` needs `tokenizer` "
                             "(tokenizer.task for a built-in task, or tokenizer.path)")
        return self
