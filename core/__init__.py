"""rlhfkit: align language models with feedback, every algorithmic piece a plugin.

The public API that plugins may import. Everything else is internal.
"""

from rlhfkit.context import StageContext
from rlhfkit.errors import (
    DataError,
    EngineError,
    NonFiniteError,
    PluginError,
    Problem,
    RecipeError,
    UserError,
)
from rlhfkit.files import atomic_directory, atomic_write_text, write_samples
from rlhfkit.interfaces import (
    Advantages,
    Algorithm,
    Constraint,
    Conversation,
    Dataset,
    Engine,
    Estimator,
    Feedback,
    FeedbackBatch,
    Generation,
    LossTerm,
    Messages,
    Objective,
    Policy,
    PolicyOutput,
    Preference,
    PreferenceBatch,
    Prompt,
    PromptCompletion,
    PromptText,
    Ranking,
    RewardBatch,
    RewardSource,
    Rollout,
    Row,
    Task,
    row_fields,
    score_rows,
)
from rlhfkit.plugin_manager import Plugins, hookimpl, load_plugins
from rlhfkit.recipe import OptimizerSettings, Recipe, SamplingSettings, StageRef, TrainerSection, load_recipe
from rlhfkit.registry import (
    CAPABILITIES,
    KINDS,
    ComponentRef,
    ComponentSpec,
    Registry,
    Slot,
    lazy,
    provides,
    ref,
)
from rlhfkit.tokens import (
    CHAT_MODES,
    chat_mode,
    encode_pairs,
    encode_preferences,
    encode_prompts,
    layout_preferences,
    prompt_display,
    render_prompt,
    set_chat_mode,
    template_turn_end,
    tokenize_preferences,
)

# torch and lightning load only when a plugin first asks for these names, so that
# `rlhfkit validate` and `rlhfkit plugins` start fast.
_LAZY = {
    **{name: "rlhfkit.ops"
       for name in ("RunningMoments", "entropy_from_logits", "kl_estimate", "labelled_logprobs", "last_real_index",
                    "logprobs_from_logits", "masked_mean", "masked_sum", "masked_var", "masked_whiten",
                    "positions_from_mask", "shared_prompt_mask", "whiten")},
    **{name: "rlhfkit.training"
       for name in ("check_finite_weights", "gradient_sync", "latest_metrics", "log_now",
                    "log_step", "micro_batches", "optimizer_step", "rank_seed", "step_loader", "total_steps",
                    "adamw")},
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rlhfkit' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "CAPABILITIES",
    "CHAT_MODES",
    "KINDS",
    "Advantages",
    "Algorithm",
    "ComponentRef",
    "ComponentSpec",
    "Constraint",
    "Conversation",
    "DataError",
    "Dataset",
    "Engine",
    "EngineError",
    "Estimator",
    "Feedback",
    "FeedbackBatch",
    "Generation",
    "LossTerm",
    "Messages",
    "NonFiniteError",
    "Objective",
    "OptimizerSettings",
    "PluginError",
    "Plugins",
    "Policy",
    "PolicyOutput",
    "Preference",
    "PreferenceBatch",
    "Problem",
    "Prompt",
    "PromptCompletion",
    "PromptText",
    "Ranking",
    "Recipe",
    "RecipeError",
    "Registry",
    "RewardBatch",
    "RewardSource",
    "Rollout",
    "Row",
    "RunningMoments",
    "SamplingSettings",
    "Slot",
    "StageContext",
    "StageRef",
    "Task",
    "TrainerSection",
    "UserError",
    "adamw",
    "atomic_directory",
    "atomic_write_text",
    "chat_mode",
    "check_finite_weights",
    "encode_pairs",
    "encode_preferences",
    "encode_prompts",
    "entropy_from_logits",
    "gradient_sync",
    "hookimpl",
    "kl_estimate",
    "labelled_logprobs",
    "last_real_index",
    "latest_metrics",
    "layout_preferences",
    "lazy",
    "load_plugins",
    "load_recipe",
    "log_now",
    "log_step",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "micro_batches",
    "optimizer_step",
    "positions_from_mask",
    "prompt_display",
    "provides",
    "rank_seed",
    "ref",
    "render_prompt",
    "row_fields",
    "score_rows",
    "set_chat_mode",
    "shared_prompt_mask",
    "step_loader",
    "template_turn_end",
    "tokenize_preferences",
    "total_steps",
    "whiten",
    "write_samples",
]
