"""Built-in tasks: generated data with a known ground truth, so RLHF runs in minutes on a CPU.

Contributes the tasks ``reviews`` (sentiment-rewarded product reviews, a multi-term gold
score that a learned proxy can over-optimise), ``knowledge`` (questions about fictional
entities scored +1 / 0 / -4: the knowledge-boundary experiment) and ``reasoning``
(multi-step arithmetic by difficulty level, scored by an exact verifier), the dataset ``builtin``,
which serves one split of a task, and the reward ``gold``, a task's ground-truth scorer::

    dataset: {name: builtin, task: {name: reviews, seed: 1}, split: preference}
    reward: {name: gold, task: {name: reviews, seed: 1}}

Generation is pure Python (``random.Random`` streams derived from the seed), needs no
download and takes well under a second. See docs/tasks.md.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from rlhfkit import ComponentSpec, Row, StageContext, UserError, hookimpl, ref
from rlhfkit.plugins.tasks.knowledge import KnowledgeConfig, KnowledgeTask
from rlhfkit.plugins.tasks.reasoning import ReasoningConfig, ReasoningTask
from rlhfkit.plugins.tasks.reviews import ReviewsConfig, ReviewsTask

__all__ = ["BuiltinDataConfig", "BuiltinDataset", "GoldConfig", "KnowledgeConfig", "KnowledgeTask",
           "ReasoningConfig", "ReasoningTask", "ReviewsConfig", "ReviewsTask", "rlhfkit_components"]


# Once per process: generation is deterministic in the settings, so equal settings (compared
# as JSON, since config models are not hashable) can share one task object.
@functools.lru_cache(maxsize=16)
def _reviews(config_json: str) -> ReviewsTask:
    return ReviewsTask(ReviewsConfig.model_validate_json(config_json))


@functools.lru_cache(maxsize=16)
def _knowledge(config_json: str) -> KnowledgeTask:
    return KnowledgeTask(KnowledgeConfig.model_validate_json(config_json))


@functools.lru_cache(maxsize=16)
def _reasoning(config_json: str) -> ReasoningTask:
    return ReasoningTask(ReasoningConfig.model_validate_json(config_json))


def _shared(name: str, config: BaseModel, context: StageContext | None,
            generate: Callable[[str], Any]) -> Any:
    key = config.model_dump_json()
    if context is None:
        return generate(key)
    return context.shared(("task", name, key), lambda: generate(key))


def make_reviews(config: ReviewsConfig, context: StageContext | None) -> ReviewsTask:
    return _shared("reviews", config, context, _reviews)


def make_knowledge(config: KnowledgeConfig, context: StageContext | None) -> KnowledgeTask:
    return _shared("knowledge", config, context, _knowledge)


def make_reasoning(config: ReasoningConfig, context: StageContext | None) -> ReasoningTask:
    return _shared("reasoning", config, context, _reasoning)


#: How the ``builtin`` dataset builds a task without a run (``context=None``): from the
#: type of its resolved settings. Tasks of other plugins need a :class:`StageContext`.
_BUILD_WITHOUT_CONTEXT: dict[type[BaseModel], Callable[[Any, None], Any]] = {
    ReviewsConfig: make_reviews, KnowledgeConfig: make_knowledge, ReasoningConfig: make_reasoning,
}

# ----------------------------------------------------------------- the dataset

TaskRef = ref("task")
#: The splits of this plugin's tasks, known before anything is generated. While this plugin
#: is loaded these task names are its own (a second registration would be an error), so
#: ``rlhfkit validate`` can reject a misspelt split before any stage runs.
_SPLITS_OF = {"reviews": ReviewsTask.splits, "knowledge": KnowledgeTask.splits,
              "reasoning": ReasoningTask.splits}


class BuiltinDataConfig(BaseModel):
    """Rows of one split of a built-in (or any registered) task."""

    model_config = ConfigDict(extra="forbid")

    task: TaskRef = Field(  # type: ignore[valid-type]
        description="the task: a name (`reviews`) or a mapping with its settings "
                    "(`{name: knowledge, seed: 1}`)")
    split: str = Field(description="the split to serve, e.g. sft, preference, ranking, prompts "
                                   "(`rlhfkit plugins task` lists each task's splits)")
    limit: int | None = Field(None, ge=1, description="serve only the first N rows "
                                                      "(null: every row)")

    @field_validator("split")
    @classmethod
    def _known_split(cls, split: str, info: ValidationInfo) -> str:
        task = info.data.get("task")
        splits = _SPLITS_OF.get(task.name) if task is not None else None
        if splits is not None and split not in splits:
            raise ValueError(f"the {task.name} task has no split {split!r}; "
                             f"its splits are: {', '.join(splits)}")
        return split


#: The row kind of a split, by its name's beginning (every split of this plugin's tasks).
_SPLIT_KINDS = (("prompts", "prompt"), ("preference", "preference"), ("unpaired", "unpaired"),
                ("ranking", "ranking"), ("pretrain", "text"), ("sft", "prompt-completion"))


def split_rows(config: BuiltinDataConfig) -> frozenset[str] | None:
    """The row kind of the configured split of one of this plugin's tasks (``None`` for
    another plugin's task, whose splits it does not know)."""
    if config.task.name not in _SPLITS_OF:
        return None
    kind = next((kind for prefix, kind in _SPLIT_KINDS if config.split.startswith(prefix)), None)
    return frozenset({kind}) if kind else None


class BuiltinDataset:
    """One split of a task. ``task`` is the task object itself, so other components can
    reach its gold scorer, ``evaluate`` and vocabulary."""

    def __init__(self, task: Any, split: str, limit: int | None):
        self.task = task
        self.split = split
        self.limit = limit

    def rows(self) -> Sequence[Row]:
        rows = self.task.split(self.split)
        return rows if self.limit is None else rows[: self.limit]


def _build_task(task: Any, context: StageContext | None, component: str) -> Any:
    """The task a resolved task reference names: through the run's context (one instance per
    run for equal settings), or without a run for this plugin's own tasks."""
    if context is not None:
        return context.build(task)
    build = _BUILD_WITHOUT_CONTEXT.get(type(task.config))
    if build is None:
        raise UserError(
            f"the task {task.name!r} can only be built inside a run (it comes from another "
            f"plugin); build the {component} with a StageContext."
        )
    return build(task.config, None)


def make_builtin_dataset(config: BuiltinDataConfig, context: StageContext | None) -> BuiltinDataset:
    task = _build_task(config.task, context, "dataset")
    # Tasks of other plugins are only known once built.
    splits = getattr(task, "splits", {})
    if config.split not in splits:
        raise UserError(
            f"dataset 'builtin': the {config.task.name} task has no split {config.split!r}; "
            f"set `split:` to one of: {', '.join(splits) or 'none (it declares no splits)'}."
        )
    return BuiltinDataset(task, config.split, config.limit)


# ----------------------------------------------------------------- the reward


class GoldConfig(BaseModel):
    """A task's ground-truth scorer as a reward source."""

    model_config = ConfigDict(extra="forbid")

    task: TaskRef = Field(  # type: ignore[valid-type]
        description="the task whose gold score is the reward: a name (`knowledge`) or a "
                    "mapping with its settings; equal settings share the data's task object")
    scale: float = Field(1.0, description="multiply the gold score by this factor")


def make_gold(config: GoldConfig, context: StageContext | None) -> Any:
    from rlhfkit.plugins.tasks.gold import GoldReward  # torch loads only when a run builds it

    return GoldReward(_build_task(config.task, context, "reward 'gold'"), config.scale)


@hookimpl
def rlhfkit_components() -> list[ComponentSpec]:
    return [
        ComponentSpec(
            kind="task", name="reviews", config=ReviewsConfig, factory=make_reviews,
            doc="product reviews; gold = sentiment + grammar + ending - repetition - length "
                "+ relevance (over-optimisable)"),
        ComponentSpec(
            kind="task", name="knowledge", config=KnowledgeConfig, factory=make_knowledge,
            doc="questions about fictional entities; gold +1 correct, 0 'i do not know', "
                "-4 wrong (knowledge boundary)"),
        ComponentSpec(
            kind="task", name="reasoning", config=ReasoningConfig, factory=make_reasoning,
            doc="multi-step arithmetic with graded difficulty; gold 1 for the right final answer (a verifier)"),
        ComponentSpec(
            kind="dataset", name="builtin", config=BuiltinDataConfig,
            factory=make_builtin_dataset, doc="rows of a built-in task's split",
            yields=split_rows),
        ComponentSpec(
            kind="reward", name="gold", config=GoldConfig, factory=make_gold,
            doc="a task's ground-truth (gold) score, times `scale`: a rule reward",
            provides=frozenset({"evaluate"})),
    ]
