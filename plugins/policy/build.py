"""The factory of the ``transformers`` policy: find the model and tokenizer, set them up."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    GPT2Config,
    LlamaConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
)
from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation
from transformers.utils import logging as transformers_logging

from rlhfkit import StageContext, UserError, chat_mode, set_chat_mode, template_turn_end
from rlhfkit.plugins.policy.config import ArchitectureConfig, LoraSettings, TransformersPolicyConfig
from rlhfkit.plugins.policy.model import TransformersPolicy
from rlhfkit.plugins.policy.tokenizer import (
    build_word_tokenizer,
    ensure_distinct_pad,
    load_tokenizer,
)


def build_policy(config: TransformersPolicyConfig, context: StageContext | None
                 ) -> TransformersPolicy:
    """Build the policy: source directory or architecture, tokenizer, dropout, LoRA."""
    source = _source_directory(config, context)
    tokenizer = _tokenizer(config, context, source)
    apply_chat_setting(tokenizer, config.chat_template)
    pad_added = ensure_distinct_pad(tokenizer)
    dtype = getattr(torch, config.dtype)
    if source is None:
        model_config = architecture_config(config.architecture, tokenizer)
        if config.dropout is not None:
            override_dropout(model_config, config.dropout)
        # from_config draws from torch's global RNG: torch.manual_seed makes it reproducible.
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    else:
        model = _load_model(source, config, dtype)
    if config.fused_activations:
        fuse_activations(model)
    _fit_vocabulary(model, tokenizer, pad_added)
    model.config.pad_token_id = tokenizer.pad_token_id
    # A checkpoint's generation_config.json may carry sampling defaults (repetition penalty,
    # top_k, ...) that transformers would mix into every generate call; the policy samples
    # with exactly the settings the algorithm passes, so only the token ids remain.
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    if config.gradient_checkpointing:
        # Non-reentrant checkpointing also works when the inputs need no grad (LoRA).
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
    if config.lora is not None:
        model = _add_lora(model, config.lora, config.dropout)
    return TransformersPolicy(model, tokenizer, config)


def apply_chat_setting(tokenizer: PreTrainedTokenizerBase, mode: str | None) -> None:
    """Store the chat setting on ``tokenizer`` (``None``: keep the saved one) and, when
    the template closes an assistant turn with a special token other than EOS (a base
    Qwen tokenizer: EOS ``<|endoftext|>``, turns end with ``<|im_end|>``), make that token
    EOS: responses are then trained to end, and sampling stops, where the template ends
    a reply."""
    if mode is not None:
        set_chat_mode(tokenizer, mode)
    mode = chat_mode(tokenizer)
    if mode == "always" and not tokenizer.chat_template:
        raise UserError(f"policy.chat_template is 'always' but the tokenizer {tokenizer.name_or_path!r} has no "
                        "chat template; give it one (chat_template.jinja) or set chat_template: auto.")
    end = template_turn_end(tokenizer) if mode != "never" else None
    if end is not None and end != tokenizer.eos_token:
        print(f"policy: responses end with {end!r}, the token the chat template closes a turn with "
              f"(the tokenizer's EOS was {tokenizer.eos_token!r})", flush=True)
        tokenizer.eos_token = end


def architecture_config(architecture: ArchitectureConfig, tokenizer: PreTrainedTokenizerBase
                        ) -> PretrainedConfig:
    """The transformers config of ``architecture``, sized to ``tokenizer``'s vocabulary."""
    arch = architecture
    common: dict[str, Any] = {
        "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "tie_word_embeddings": arch.tie_embeddings}
    intermediate = arch.intermediate or 4 * arch.hidden
    if arch.family == "gpt2":
        return GPT2Config(n_embd=arch.hidden, n_layer=arch.layers, n_head=arch.heads,
                          n_inner=intermediate, n_positions=arch.max_positions,
                          resid_pdrop=arch.dropout, embd_pdrop=arch.dropout,
                          attn_pdrop=arch.dropout, **common)
    if arch.family == "opt":
        return OPTConfig(hidden_size=arch.hidden, num_hidden_layers=arch.layers,
                         num_attention_heads=arch.heads, ffn_dim=intermediate,
                         max_position_embeddings=arch.max_positions,
                         word_embed_proj_dim=arch.hidden, dropout=arch.dropout,
                         attention_dropout=arch.dropout, **common)
    family_config = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch.family]
    return family_config(hidden_size=arch.hidden, num_hidden_layers=arch.layers,
                         num_attention_heads=arch.heads,
                         num_key_value_heads=arch.kv_heads or arch.heads,
                         intermediate_size=intermediate,
                         max_position_embeddings=arch.max_positions,
                         attention_dropout=arch.dropout, **common)


def override_dropout(model_config: PretrainedConfig, probability: float) -> list[str]:
    """Set every dropout probability of ``model_config`` (fields named ``*dropout`` or
    ``*pdrop``: the names transformers uses) to ``probability``; returns the field names.

    Must run before the model is built: modules copy the probability at construction.
    LayerDrop (``layerdrop``) skips whole layers and is left alone.
    """
    names = [name for name, value in model_config.to_dict().items()
             if name.endswith(("dropout", "pdrop"))
             and isinstance(value, (int, float)) and not isinstance(value, bool)]
    for name in names:
        setattr(model_config, name, probability)
    return names


def fuse_activations(model: torch.nn.Module) -> int:
    """Replace ``model``'s written-out tanh GELUs (transformers' ``gelu_new`` and
    ``gelu_fast`` modules: GPT-2, GPT-J, GPT-Neo, CodeGen, Phi) with torch's one-kernel
    ``gelu(approximate="tanh")``, the same formula; returns how many were replaced.

    One kernel forward and one backward instead of eight element-wise ops; in float32 the
    outputs differ by float rounding (at most 2.4e-7 on N(0, 1) inputs). The model config
    is left alone, so exports keep the checkpoint's own activation name.
    """
    written_out = (NewGELUActivation, FastGELUActivation)
    targets = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
               if type(child) in written_out]
    for parent, name in targets:
        setattr(parent, name, GELUTanh())
    return len(targets)


def _source_directory(config: TransformersPolicyConfig, context: StageContext | None
                      ) -> Path | None:
    if config.path is not None:
        path = Path(config.path).expanduser()
        if not path.is_dir():
            raise UserError(f"policy.path {config.path!r} is not a directory. rlhfkit never "
                            "downloads models: point it at a local transformers checkpoint.")
        return path
    if config.from_stage is not None:
        if context is None:
            raise UserError(f"policy.from_stage {config.from_stage!r} needs a run; use "
                            "policy.path outside a recipe.")
        return context.export_of(config.from_stage)
    return None


def _tokenizer(config: TransformersPolicyConfig, context: StageContext | None,
               source: Path | None) -> PreTrainedTokenizerBase:
    settings = config.tokenizer
    if settings is not None and settings.task is not None:
        if context is None:
            raise UserError("policy.tokenizer.task needs a run to build the task in; use "
                            "tokenizer.path outside a recipe.")
        return build_word_tokenizer(context.build(settings.task).vocabulary())
    directory = settings.path if settings is not None else source
    try:
        return load_tokenizer(directory, config.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"could not load a tokenizer from {str(directory)!r}: {exc}. Set "
                        "policy.tokenizer.path to a local tokenizer directory.") from exc


def _load_model(directory: Path, config: TransformersPolicyConfig, dtype: torch.dtype
                ) -> PreTrainedModel:
    options = {"local_files_only": True, "trust_remote_code": config.trust_remote_code}
    try:
        model_config = AutoConfig.from_pretrained(directory, **options)
        if config.dropout is not None:
            override_dropout(model_config, config.dropout)
        # A reward-model export (e.g. a critic's backbone) has a score head and no LM head:
        # expected, so transformers' load report about them is not shown.
        reward_model = hasattr(model_config, "rlhfkit_reward_normalization")
        verbosity = transformers_logging.get_verbosity()
        if reward_model:
            transformers_logging.set_verbosity_error()
        try:
            return AutoModelForCausalLM.from_pretrained(directory, config=model_config, dtype=dtype, **options)
        finally:
            transformers_logging.set_verbosity(verbosity)
    except (OSError, ValueError) as exc:
        hint = ("" if config.trust_remote_code else
                " If the checkpoint ships its own modelling code and you trust it, set "
                "policy.trust_remote_code: true.")
        raise UserError(f"could not load a causal LM from {str(directory)!r}: {exc}.{hint}"
                        ) from exc


def _fit_vocabulary(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                    pad_added: bool) -> None:
    rows = model.get_input_embeddings().num_embeddings
    if pad_added and len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer))
    elif len(tokenizer) > rows:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the model embeds only "
                        f"{rows}; use the tokenizer the model was trained with.")


def _add_lora(model: PreTrainedModel, lora: LoraSettings, dropout: float | None) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model  # peft is only needed with LoRA on

    # The policy-wide `dropout` (e.g. 0 for RL) covers the adapters too.
    lora_config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha,
        lora_dropout=lora.dropout if dropout is None else dropout,
        target_modules=lora.target_modules, task_type="CAUSAL_LM",
        # GPT-2 stores its projections transposed (Conv1D).
        fan_in_fan_out=model.config.model_type == "gpt2")
    try:
        with warnings.catch_warnings():
            # peft reads transformers' deprecated `is_gradient_checkpointing` alias on every
            # wrap; the FutureWarning is theirs to fix and says nothing about this recipe.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing",
                                    category=FutureWarning)
            return get_peft_model(model, lora_config)
    except ValueError as exc:
        raise UserError(f"could not add LoRA adapters to {model.config.model_type}: {exc}. Set "
                        "policy.lora.target_modules to the names of its linear layers.") from exc
