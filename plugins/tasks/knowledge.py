"""The ``knowledge`` task: answer questions about fictional entities, or say "i do not know".

John Schulman's knowledge-boundary thought experiment, made measurable. Invented entities
(``zorlivak``, ``melritha``...) each have four attributes (color, city, food, pet; 12 values
each). Prompt: ``question : what is the color of zorlivak ?``; answer:
``the color of zorlivak is blue .`` or ``i do not know .``. Gold: ``+1`` correct, ``0``
"i do not know", ``-4`` anything else (see :mod:`rlhfkit.plugins.tasks.knowledge_world`).

The entities are dealt into five groups:

* ``known``: facts in ``pretrain`` (statements) and ``sft`` (questions and answers). A
  fraction (``heldout_fraction``) of their question/answer pairs is kept out of ``sft``
  for ``sft-eval``: those facts are known from pretraining only.
* ``sft-only``: facts only in ``sft`` answers, new knowledge at fine-tuning time. This is
  how SFT teaches hallucination (Schulman; Gekhman et al. 2024, "Does fine-tuning LLMs on
  new knowledge encourage hallucinations?"): the policy learns to answer about entities
  pretraining told it nothing about. ``num_sft_only: 0`` is the ablation.
* ``idk-train``: never described; ``sft`` answers questions about them with
  "i do not know ." (``idk_fraction`` of the sft rows), so the behaviour exists.
* ``unknown-train``: never described; asked about in ``prompts`` (RL) and, with
  "i do not know ." preferred over a wrong answer, in ``preference`` and ``ranking``.
* ``unknown-eval``: never described, never asked about in a training split; asked about in
  ``prompts-unknown``, ``prompts-eval`` and the held-out preference splits.

With ``introduce_all_entities`` (the default) pretraining also says that every entity
exists (``zorlivak is a person .``). Otherwise an untaught name is a word the model never
read, and a word-level model tells those apart trivially (by an untrained embedding)
instead of having to know what it knows.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import ClassVar

from pydantic import Field

from rlhfkit import DataError, Prompt, PromptCompletion, Ranking, Row
from rlhfkit.plugins.tasks import knowledge_world as world
from rlhfkit.plugins.tasks.common import (
    COMMON_SPLITS,
    LazySplits,
    TaskSettings,
    cycle_sample,
    dense_ranks,
    label_feedback,
    label_pair,
    split_rng,
)
from rlhfkit.plugins.tasks.knowledge_world import IDK, Entity, question, true_answer

SPLITS: dict[str, str] = {
    **COMMON_SPLITS,
    "prompts-known": "held-out Prompt rows about known entities (accuracy)",
    "prompts-unknown": "held-out Prompt rows about unknown-eval entities (wrong-answer rate)",
}
Question = tuple[Entity, str]  # (entity, attribute)


class KnowledgeConfig(TaskSettings):
    """Settings of the knowledge task."""

    num_known: int = Field(60, ge=1, le=300, description="entities whose facts are in "
                           "pretrain and sft")
    num_sft_only: int = Field(30, ge=0, le=300, description="entities whose facts are only "
                              "in sft answers (new knowledge at fine-tuning time)")
    num_idk_train: int = Field(10, ge=1, le=300, description="entities answered with "
                                                             "'i do not know .' in sft")
    num_unknown_train: int = Field(20, ge=1, le=300, description="untaught entities asked "
                                   "about in prompts, preference and ranking")
    num_unknown_eval: int = Field(20, ge=1, le=300, description="untaught entities asked "
                                  "about only in held-out splits")
    idk_fraction: float = Field(0.1, ge=0, le=0.5, description="fraction of sft (and sft-eval) "
                                "rows that answer an idk-train question with 'i do not know .'")
    heldout_fraction: float = Field(0.2, ge=0.05, le=0.5, description="fraction of known facts "
                                    "(and idk-train questions) kept out of sft for sft-eval")
    unknown_prompt_fraction: float = Field(0.5, ge=0, le=1, description="fraction of prompts "
                                           "and prompts-eval rows about unknown entities")
    introduce_all_entities: bool = Field(True, description="pretrain also states that every "
                                         "entity exists ('zorlivak is a person .'), so untaught "
                                         "names are familiar words, not unseen ones")
    desirable_threshold: float = Field(-2.0, description="unpaired splits: an answer is desirable "
                                       "with probability sigmoid((gold - threshold) / "
                                       "label_temperature); -2 puts wrong answers (-4) below it, "
                                       "correct ones (+1) and 'i do not know .' (0) above")


class KnowledgeTask:
    """Questions about fictional entities with a +1 / 0 / -4 gold score."""

    name = "knowledge"
    splits: ClassVar[dict[str, str]] = SPLITS

    def __init__(self, config: KnowledgeConfig):
        self.config = config
        sizes = (config.num_known, config.num_sft_only, config.num_idk_train,
                 config.num_unknown_train, config.num_unknown_eval)
        self.entities = world.make_entities(self._rng("entities"), sizes)
        self.questions: dict[str, list[Question]] = {
            g: [(e, a) for e in self.entities.values() if e.group == g for a in world.ATTRIBUTES]
            for g in world.GROUPS}
        # Known facts and idk-train questions are split once into sft and sft-eval pools.
        rng = self._rng("heldout")
        self._sft_pool, self._heldout_pool = {}, {}
        for group in ("known", "idk-train"):
            pool = list(self.questions[group])
            rng.shuffle(pool)
            cut = max(1, round(len(pool) * config.heldout_fraction))
            self._heldout_pool[group], self._sft_pool[group] = pool[:cut], pool[cut:]
        self._splits = LazySplits(self.name, self.splits, self._build)

    # ------------------------------------------------------------------ Task API

    def vocabulary(self) -> list[str]:
        return world.vocabulary(self.entities)

    def split(self, name: str) -> Sequence[Row]:
        return self._splits.get(name)

    def gold_score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [world.gold(*self._parse(p), r) for p, r in zip(prompts, responses, strict=True)]

    def evaluate(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, float]:
        """Mean gold and, per group (``known``: entities whose facts a training split
        teaches; ``unknown``: all others), the fraction of correct, "i do not know" and
        wrong answers and the group's count. Fractions of an empty group are 0 (see its
        ``count``)."""
        tally = {g: {"correct": 0, "idk": 0, "wrong": 0} for g in ("known", "unknown")}
        outcomes = {world.GOLD_CORRECT: "correct", world.GOLD_IDK: "idk"}
        total = 0.0
        for prompt, response in zip(prompts, responses, strict=True):
            entity, attribute = self._parse(prompt)
            score = world.gold(entity, attribute, response)
            total += score
            group = "known" if entity.group in world.TAUGHT else "unknown"
            tally[group][outcomes.get(score, "wrong")] += 1
        metrics = {"gold": total / max(len(prompts), 1)}
        for group, counts in tally.items():
            n = sum(counts.values())
            metrics[f"{group}/count"] = float(n)
            for outcome, k in counts.items():
                metrics[f"{group}/{outcome}"] = k / n if n else 0.0
        return metrics

    def _parse(self, prompt: str) -> Question:
        parsed = world.parse_question(self.entities, prompt)
        if parsed is None:
            raise DataError(
                f"{prompt!r} is not a question of the knowledge task (seed "
                f"{self.config.seed}); expected 'question : what is the ATTRIBUTE of NAME ?' "
                f"with ATTRIBUTE one of {', '.join(world.ATTRIBUTES)} and NAME one of its "
                f"entities (same task settings as the data)."
            )
        return parsed

    # ------------------------------------------------------------------ generation

    def _rng(self, split: str) -> random.Random:
        return split_rng(self.name, self.config.seed, split)

    def _build(self, split: str) -> Iterator[Row]:
        c = self.config
        rng = self._rng(split)
        if split in ("sft", "sft-eval"):
            pools = self._sft_pool if split == "sft" else self._heldout_pool
            n = c.sft_size if split == "sft" else c.eval_size
            n_idk = round(n * c.idk_fraction)
            answered = pools["known"] + (self.questions["sft-only"] if split == "sft" else [])
            rows = [PromptCompletion(question(e, a), true_answer(e, a))
                    for e, a in cycle_sample(rng, answered, n - n_idk)]
            rows += [PromptCompletion(question(e, a), IDK)
                     for e, a in cycle_sample(rng, pools["idk-train"], n_idk)] if n_idk else []
            rng.shuffle(rows)
            return iter(rows)
        if split == "pretrain":
            said: list[tuple[Entity, str | None]] = list(self.questions["known"])
            if c.introduce_all_entities:
                said += [(e, None) for e in self.entities.values()]  # "NAME is a person ."
            return (PromptCompletion("", world.statement(rng, e, a))
                    for e, a in cycle_sample(rng, said, c.pretrain_size))
        if split in ("preference", "preference-eval", "preference-gold"):
            # preference-gold relabels the preference-eval pairs without noise.
            source = "preference-eval" if split == "preference-gold" else split
            unknown = "unknown-train" if split == "preference" else "unknown-eval"
            size = c.preference_size if split == "preference" else c.eval_size
            labels = None if split == "preference-gold" else self._rng(f"{split}/labels")
            pair_rng = self._rng(source)
            return (label_pair(labels, *self._pair(pair_rng, unknown), c) for _ in range(size))
        if split == "ranking":
            return (self._ranking(rng) for _ in range(c.ranking_size))
        if split in ("unpaired", "unpaired-eval", "unpaired-gold"):
            # unpaired-gold relabels the unpaired-eval answers without noise.
            source = "unpaired-eval" if split == "unpaired-gold" else split
            unknown = "unknown-train" if split == "unpaired" else "unknown-eval"
            size = c.preference_size if split == "unpaired" else c.eval_size
            labels = None if split == "unpaired-gold" else self._rng(f"{split}/labels")
            return (label_feedback(labels, *row, c.desirable_threshold, c)
                    for row in self._answers(self._rng(source), unknown, size))
        if split in ("prompts", "prompts-eval"):
            unknown = "unknown-train" if split == "prompts" else "unknown-eval"
            n = c.prompts_size if split == "prompts" else c.eval_size
            n_unknown = round(n * c.unknown_prompt_fraction)
            asked = (cycle_sample(rng, self.questions["known"], n - n_unknown)
                     + cycle_sample(rng, self.questions[unknown], n_unknown))
            rng.shuffle(asked)
            return (Prompt(question(e, a)) for e, a in asked)
        group = "known" if split == "prompts-known" else "unknown-eval"
        return (Prompt(question(e, a))
                for e, a in cycle_sample(rng, self.questions[group], c.eval_size))

    def _pair(self, rng: random.Random, unknown_group: str) -> tuple[str, str, str, float, float]:
        """A comparison ``(prompt, a, b, gold_a, gold_b)``: 40% known correct vs wrong, 20%
        known correct vs "i do not know", 40% unknown "i do not know" vs wrong."""
        draw = rng.random()
        entity, attribute = rng.choice(self.questions["known" if draw < 0.6 else unknown_group])
        wrong = world.wrong_answers(rng, entity, attribute, 1)[0]
        if draw < 0.4:
            pair = [true_answer(entity, attribute), wrong]
        elif draw < 0.6:
            pair = [true_answer(entity, attribute), IDK]
        else:
            pair = [IDK, wrong]
        rng.shuffle(pair)
        a, b = pair
        return (question(entity, attribute), a, b,
                world.gold(entity, attribute, a), world.gold(entity, attribute, b))

    def _answers(self, rng: random.Random, unknown_group: str, n: int) -> Iterator[tuple[str, str, float]]:
        """``n`` single answers ``(prompt, answer, gold)``: one side of a :meth:`_pair`
        (30% correct, 30% "i do not know", 40% wrong), redrawn when its gold equals the
        threshold exactly (no label is right for it)."""
        made = 0
        while made < n:
            prompt, answer, _, score, _ = self._pair(rng, unknown_group)
            if score != self.config.desirable_threshold:
                made += 1
                yield prompt, answer, score

    def _ranking(self, rng: random.Random) -> Ranking:
        """``ranking_k`` answers ranked by gold: for a known entity the correct answer,
        "i do not know" and wrong ones (ranks 0, 1, 2, 2...); for an unknown-train entity
        "i do not know" and wrong ones (ranks 0, 1, 1...)."""
        known = rng.random() < 0.6
        entity, attribute = rng.choice(self.questions["known" if known else "unknown-train"])
        good = [true_answer(entity, attribute), IDK] if known else [IDK]
        completions = good + world.wrong_answers(rng, entity, attribute,
                                                 self.config.ranking_k - len(good))
        rng.shuffle(completions)
        scores = [world.gold(entity, attribute, text) for text in completions]
        return Ranking(question(entity, attribute), tuple(completions),
                       dense_ranks(scores, self.config.tie_precision))
