"""An example third-party rlhfkit plugin.

Installed, it is found through its entry point (see ``pyproject.toml``)::

    [project.entry-points.rlhfkit]
    example = "rlhfkit_example_plugin"

and contributes five components:

- reward ``keyword-bonus``: ``bonus`` for each distinct keyword a response contains,
  minus ``penalty_per_repeat`` for each repeated word. Rule-based, no model::

      reward: {name: keyword-bonus, keywords: [great, love], penalty_per_repeat: 0.5}

- dataset ``inline``: prompt-completion rows written in the recipe itself, for tiny
  experiments::

      data: {name: inline, rows: [{prompt: "how is the lamp ?", completion: "i love it ."}]}

- estimator ``whitened-return``, objective ``margin-dpo`` and constraint
  ``length-penalty`` (in ``components.py``, imported only when built), each tested with
  ``rlhfkit.testing`` alone (``tests/``)::

      estimator: whitened-return
      objective: {name: margin-dpo, beta: 0.1, margin: 0.5}
      constraints: [{name: kl}, {name: length-penalty, coef: 0.05, free: 8}]

It also checks recipes: a keyword that the stage's policy cannot write (because its
word-level tokenizer is built from a task's vocabulary, as the built-in tasks' models
are) could never earn its bonus, so the recipe is rejected before anything runs.

Like every plugin, it imports only the public names of ``rlhfkit``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

import rlhfkit

#: A word: letters, digits and underscores, with inner apostrophes ("don't").
WORD = re.compile(r"\w+(?:'\w+)*")


def words(text: str) -> list[str]:
    """The lower-cased words of ``text``; punctuation and spacing are ignored."""
    return WORD.findall(text.lower())


# ------------------------------------------------------------ reward: keyword-bonus


class KeywordBonusConfig(BaseModel):
    """Settings of the ``keyword-bonus`` reward."""

    model_config = ConfigDict(extra="forbid")

    keywords: list[str] = Field(
        min_length=1,
        description="words that earn the bonus; matched as whole words, ignoring case")
    bonus: float = Field(1.0, description="score for each distinct keyword in a response")
    penalty_per_repeat: float = Field(
        0.0, ge=0,
        description="subtracted for each repeated word (every occurrence of a word after its "
                    "first), against degenerate, repetitive responses")

    @field_validator("keywords")
    @classmethod
    def _single_words(cls, keywords: list[str]) -> list[str]:
        not_words = [k for k in keywords if words(k) != [k.strip().lower()]]
        if not_words:
            raise ValueError(f"each keyword must be one word without punctuation, not {not_words}; "
                             f"split phrases into separate keywords")
        return [k.strip().lower() for k in keywords]


class KeywordBonus:
    """``bonus * distinct keywords - penalty_per_repeat * repeated words`` per response.

    The prompt is not scored. Satisfies :class:`rlhfkit.RewardSource`.
    """

    def __init__(self, config: KeywordBonusConfig):
        self.config = config
        self.keywords = frozenset(config.keywords)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Return ``[B]`` float32 scores of ``B`` (prompt, response) pairs."""
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
        return torch.tensor([self._score(response) for response in responses], dtype=torch.float32)

    def _score(self, response: str) -> float:
        found = words(response)
        repeats = len(found) - len(set(found))
        return (self.config.bonus * len(self.keywords.intersection(found))
                - self.config.penalty_per_repeat * repeats)


def make_keyword_bonus(config: KeywordBonusConfig, context: rlhfkit.StageContext | None) -> KeywordBonus:
    return KeywordBonus(config)


# ------------------------------------------------------------------ dataset: inline


class InlineRow(BaseModel):
    """One demonstration written in the recipe."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="the prompt (empty for plain text)")
    completion: str = Field(description="the text to learn after the prompt")


class InlineDataConfig(BaseModel):
    """Settings of the ``inline`` dataset."""

    model_config = ConfigDict(extra="forbid")

    rows: list[InlineRow] = Field(
        min_length=1, description="the rows, each a mapping {prompt: ..., completion: ...}")


class InlineDataset:
    """Prompt-completion rows from the recipe. Satisfies :class:`rlhfkit.Dataset`."""

    def __init__(self, config: InlineDataConfig):
        self._rows = [rlhfkit.PromptCompletion(row.prompt, row.completion) for row in config.rows]

    def rows(self) -> list[rlhfkit.PromptCompletion]:
        return list(self._rows)


def make_inline(config: InlineDataConfig, context: rlhfkit.StageContext | None) -> InlineDataset:
    return InlineDataset(config)


# ----------------------------------------------- estimator, objective, constraint: settings


class WhitenedReturnConfig(BaseModel):
    """Settings of the ``whitened-return`` estimator."""

    model_config = ConfigDict(extra="forbid")

    eps: float = Field(1e-6, gt=0, description="added to the batch std of the returns")


class MarginDPOConfig(BaseModel):
    """Settings of the ``margin-dpo`` objective."""

    model_config = ConfigDict(extra="forbid")

    beta: float = Field(0.1, gt=0, description="strength of the implicit KL to the reference")
    margin: float = Field(0.5, ge=0, description="the reward margin the chosen response should win by")


class LengthPenaltyConfig(BaseModel):
    """Settings of the ``length-penalty`` constraint."""

    model_config = ConfigDict(extra="forbid")

    coef: float = Field(0.05, ge=0, description="penalty per token beyond `free`")
    free: int = Field(8, ge=0, description="tokens a response may use without penalty")


# -------------------------------------------------------------------------- hooks


@rlhfkit.hookimpl
def rlhfkit_components() -> list[rlhfkit.ComponentSpec]:
    return [
        rlhfkit.ComponentSpec(
            kind="reward", name="keyword-bonus", config=KeywordBonusConfig,
            factory=make_keyword_bonus,
            doc="rule-based: a bonus per distinct keyword in the response, minus a penalty "
                "per repeated word"),
        rlhfkit.ComponentSpec(
            kind="dataset", name="inline", config=InlineDataConfig, factory=make_inline,
            doc="prompt-completion rows written in the recipe (tiny experiments)",
            # the row kind it gives: `rlhfkit validate` refuses it where an algorithm takes others
            yields=lambda config: frozenset({"prompt-completion"})),
        # The class behind each: rlhfkit.lazy imports it only when a stage builds it (torch stays
        # out of `rlhfkit validate`); the registry reads the class's source to check its methods.
        rlhfkit.ComponentSpec(
            kind="estimator", name="whitened-return", config=WhitenedReturnConfig,
            factory=rlhfkit.lazy("rlhfkit_example_plugin.components:WhitenedReturn"),
            doc="advantage = the response's return whitened over the batch, on every real token (no critic)"),
        rlhfkit.ComponentSpec(
            kind="objective", name="margin-dpo", config=MarginDPOConfig,
            factory=rlhfkit.lazy("rlhfkit_example_plugin.components:MarginDPO"),
            doc="DPO with a target margin: -log sigmoid(beta * delta - margin)",
            tags=frozenset({"preference-loss"})),  # the dpo algorithm's objective slot
        rlhfkit.ComponentSpec(
            kind="constraint", name="length-penalty", config=LengthPenaltyConfig,
            factory=rlhfkit.lazy("rlhfkit_example_plugin.components:LengthPenalty"),
            doc="score minus coef per response token beyond `free`",
            provides=frozenset({"shape_rewards"})),  # what PPO calls on it
    ]


@rlhfkit.hookimpl
def rlhfkit_check_recipe(recipe: rlhfkit.Recipe, registry: rlhfkit.Registry) -> list[rlhfkit.Problem]:
    """Reject keywords the stage's policy cannot write.

    A rule across components, which is what this hook is for: the reward's settings are
    fine on their own, and so are the policy's; only together are they wrong. When a
    task appears in the settings of a stage's policy, its tokenizer is a word-level one
    built from that task's vocabulary, and a keyword outside the vocabulary never earns
    its bonus.
    """
    problems = []
    for stage in recipe.stages:
        found = list(_references(stage.slots, f"stages.{stage.name}"))
        rewards = [(path, r) for path, r in found if r.kind == "reward" and r.name == "keyword-bonus"]
        if not rewards:
            continue
        policies = [(path, r) for path, r in found if r.kind == "policy"]
        tasks = [t for path, policy in policies for _, t in _references(policy.config, path)
                 if t.kind == "task"]
        for task in tasks:
            # Built-in tasks build without a run (context None) in well under a second.
            vocabulary = set(registry.build(task, None).vocabulary())
            for path, reward in rewards:
                missing = [k for k in reward.config.keywords if k not in vocabulary]
                if missing:
                    problems.append(rlhfkit.Problem(
                        file=str(recipe.path), path=f"{path}.keywords",
                        message=f"keywords {missing} are not words of task {task.name!r}, the "
                                f"vocabulary of the policy's tokenizer, so no response can "
                                f"contain them",
                        hint="use words that the task's rows contain, or give the policy a "
                             "tokenizer from a path"))
    return problems


def _references(value: Any, path: str) -> Iterator[tuple[str, rlhfkit.ComponentRef]]:
    """Every component reference in ``value`` (a stage's slots, a resolved config), depth
    first, with its dotted recipe path."""
    if isinstance(value, rlhfkit.ComponentRef):
        yield path, value
        value = value.config
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _references(getattr(value, name), f"{path}.{name}")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _references(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _references(item, f"{path}[{i}]")
