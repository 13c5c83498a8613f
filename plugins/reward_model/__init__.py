"""Reward modelling (InstructGPT step 2) and the learned ``reward-model`` reward source.

The algorithm puts a scalar head on a transformers backbone (the ``backbone`` slot takes
any policy component, e.g. ``{name: transformers, from_stage: sft}``), scores every
completion at its last real token, and trains with a swappable objective (``pairwise``,
``kwise``, ``best-of-n``, ``ties``, ``margin``) plus optional regularisers (``lm-loss``,
``centering``). It exports a standard ``AutoModelForSequenceClassification`` checkpoint
(``num_labels=1``) whose config carries the reward normalisation. See
docs/reward-model.md.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rlhfkit import ComponentSpec, OptimizerSettings, Slot, StageRef, hookimpl, lazy
from rlhfkit.registry import tagged


class RewardModelConfig(OptimizerSettings):
    """AdamW and schedule settings (:class:`rlhfkit.OptimizerSettings`), then these:"""

    max_length: int = Field(128, ge=2, description="prompt + completion tokens; prompts are cut on the left")
    share_prompt: bool = Field(
        True, description="one forward per prompt over the prompt and its K responses, each response masked from "
                          "the others, so the prompt is computed once (P + sum of responses tokens, not K x P + ...); "
                          "checked against separate rows before training, and off with a warning for a model that "
                          "ignores custom attention masks")
    trim_last_layer: bool = Field(
        True, description="run the last layer's MLP only at the tokens whose hidden state is read (each completion's "
                          "last token; and the LM term's columns): the same scores and gradients, about two thirds "
                          "of that layer's work saved; checked before training, off for models without a last-layer "
                          "`mlp` or with gradient checkpointing")
    normalize_std: bool = Field(False, description="also scale rewards to unit std on the reference data")
    eval_batch_size: int = Field(64, ge=1, description="completions per forward during evaluation")
    report_examples: int = Field(4, ge=0, description="eval pairs shown with their scores in the report")


def _data_rows(config: Any, slots: dict[str, Any], registry: Any) -> frozenset[str]:
    """preference pairs, and rankings unless the objective takes pairs only (tag pairs)"""
    return frozenset({"preference"} if tagged(registry, slots.get("objective"), "pairs") else {"preference", "ranking"})


SLOTS = {
    "backbone": Slot("policy", doc="the transformer under the scalar head, e.g. {name: transformers, from_stage: sft}"),
    "objective": Slot("objective", tag="reward-model-loss", doc="the ranking loss: pairwise, kwise, best-of-n, ties or margin"),
    "regularizers": Slot("objective", required=False, many=True, tag="reward-model-regularizer", doc="loss terms added to it: lm-loss, centering"),
    "data": Slot("dataset", rows=_data_rows,
                 doc="preference pairs or K-wise rankings (pairs only for the pairwise and margin objectives)"),
    "eval_data": Slot("dataset", required=False, rows=frozenset({"preference"}),
                      doc="held-out pairs: accuracy, score statistics, calibration"),
    "reference_data": Slot("dataset", required=False, rows=frozenset({"prompt-completion", "messages", "preference"}),
                           doc="completions that should score mean 0 after training (InstructGPT: demonstrations)"),
}


class RewardModelSourceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str | None = Field(None, description="local directory of an exported reward model")
    from_stage: StageRef | None = Field(None, description="the reward-model stage of this recipe to load")
    max_length: int = Field(128, ge=2, description="prompt + response tokens scored (prompts cut on the left)")
    batch_size: int = Field(64, ge=1, description="responses per forward")
    normalize: bool = Field(True, description="apply the normalisation stored with the model (mean 0 on reference data)")

    @model_validator(mode="after")
    def _one_source(self) -> RewardModelSourceConfig:
        if (self.path is None) == (self.from_stage is None):
            raise ValueError("set exactly one of `path` (an exported reward model directory) or `from_stage`")
        return self


@hookimpl
def rlhfkit_components() -> list[ComponentSpec]:
    return [
        ComponentSpec(kind="algorithm", name="reward-model", config=RewardModelConfig, factory=lazy("rlhfkit.plugins.reward_model.module:RewardModelTraining"),
                      slots=SLOTS, doc="train a scalar reward model on preferences or rankings (InstructGPT step 2)"),
        ComponentSpec(kind="reward", name="reward-model", config=RewardModelSourceConfig, factory=lazy("rlhfkit.plugins.reward_model.scoring:RewardModelSource.load"),
                      doc="scores from a trained reward model (an exported directory or an earlier stage)",
                      provides=frozenset({"to"})),
    ]
