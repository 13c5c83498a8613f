"""Reward sources that combine other reward sources.

Contributes the reward ``composite``: a weighted sum of any registered rewards (learned
reward models, rule rewards such as ``gold``, other composites)::

    reward:
      name: composite
      terms:
        - {reward: {name: gold, task: knowledge}, weight: 1.0}
        - {reward: {name: reward-model, stage: rm}, weight: 0.5}

This module holds only the settings and the registration; the implementation lives in
``composite.py`` and is imported when a reward is built, so listing plugins stays fast.
See docs/rewards.md.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from rlhfkit import ComponentSpec, StageContext, UserError, hookimpl, ref

__all__ = ["CompositeConfig", "CompositeTerm", "rlhfkit_components"]

RewardRef = ref("reward")


class CompositeTerm(BaseModel):
    """One weighted reward of a composite."""

    model_config = ConfigDict(extra="forbid")

    reward: RewardRef = Field(  # type: ignore[valid-type]
        description="the reward source: a name (`gold`) or a mapping with its settings "
                    "(`{name: gold, task: knowledge}`); composites nest")
    weight: float = Field(1.0, description="multiplies this term's score in the sum "
                                           "(negative: a penalty; 0: logged only)")


class CompositeConfig(BaseModel):
    """A weighted sum of reward sources."""

    model_config = ConfigDict(extra="forbid")

    terms: list[CompositeTerm] = Field(
        min_length=1, description="the rewards to add up, each with its weight; the score "
                                  "is sum(weight * score) and each term is logged unweighted")


def make_composite(config: CompositeConfig, context: StageContext | None) -> Any:
    if context is None:
        raise UserError("reward 'composite' builds its terms through a StageContext; build it "
                        "with one (`registry.build(reference, StageContext(...))`).")
    from rlhfkit.plugins.rewards.composite import CompositeReward  # torch loads only here

    return CompositeReward([(f"{i}:{term.reward.name}", term.weight, context.build(term.reward))
                            for i, term in enumerate(config.terms)])


@hookimpl
def rlhfkit_components() -> list[ComponentSpec]:
    return [ComponentSpec(
        kind="reward", name="composite", config=CompositeConfig, factory=make_composite,
        doc="weighted sum of reward sources (any kind, nested composites too)",
    )]
