"""rlhfkit: align language models with feedback, every algorithmic piece a plugin.

The public API that plugins may import. Everything else is internal.
"""

from rlhfkit.context import StageContext
from rlhfkit.errors import DataError, PluginError, Problem, RecipeError, UserError
from rlhfkit.interfaces import (
    Advantages,
    Algorithm,
    Constraint,
    Conversation,
    Dataset,
    Estimator,
    LossTerm,
    Objective,
    Policy,
    Preference,
    Prompt,
    PromptCompletion,
    Ranking,
    RewardSource,
    Rollout,
    Row,
    Task,
)
from rlhfkit.ops import (
    RunningMoments,
    entropy_from_logits,
    kl_estimate,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    whiten,
)
from rlhfkit.plugin_manager import Plugins, hookimpl, load_plugins
from rlhfkit.registry import KINDS, ComponentRef, ComponentSpec, Registry, Slot, ref

__version__ = "0.1.0"

__all__ = [
    "KINDS", "Advantages", "Algorithm", "ComponentRef", "ComponentSpec", "Constraint",
    "Conversation", "DataError", "Dataset", "Estimator", "LossTerm", "Objective", "PluginError",
    "Plugins", "Policy", "Preference", "Problem", "Prompt", "PromptCompletion", "Ranking",
    "RecipeError", "Registry", "RewardSource", "Rollout", "Row", "RunningMoments", "Slot",
    "StageContext", "Task", "UserError", "entropy_from_logits", "hookimpl", "kl_estimate",
    "load_plugins", "logprobs_from_logits", "masked_mean", "masked_sum", "masked_var",
    "masked_whiten", "ref", "whiten",
]
