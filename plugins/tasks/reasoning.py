"""The ``reasoning`` task: multi-step arithmetic with a known answer and graded difficulty.

A problem is a start number and a chain of operations, done left to right; its level is
the number of operations (1 to ``max_level``)::

    question : start with 7 , add 5 , multiply by 2 , subtract 9 . what is the result ?
    7 plus 5 is 12 . 12 times 2 is 24 . 24 minus 9 is 15 . answer : 15 .

Every intermediate result stays in 0..``max_value``, and each number is one word of the
vocabulary. SFT demonstrations (worked steps, then the answer) cover levels 1 to
``sft_levels`` only; prompts cover every level. So a model fine-tuned on them knows each
step and the format, and must find by itself how to carry a longer chain: what RL with
exploration can find and imitation cannot show it.

Gold: 1 when the response's last ``answer : N`` is the result, else 0 (an exact
verifier). Each prompt row carries ``answer`` and ``level`` fields, so the generic
``verifier`` reward and the curriculum sampler read them too. ``evaluate`` reports the
accuracy per level. A fifth of all problems (by a hash of the problem) is held out: the
``-eval`` splits draw only from those, the training splits never.

Preference, ranking and unpaired rows pair a correct worked solution with incorrect ones
that make one slip (a step result off by 1 to 3, carried on to the answer), the error a
fine-tuned model makes.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator, Sequence
from typing import ClassVar

from pydantic import Field, model_validator

from rlhfkit import DataError, Prompt, PromptCompletion, Ranking, Row
from rlhfkit.plugins.tasks.common import (
    COMMON_SPLITS,
    LazySplits,
    TaskSettings,
    dense_ranks,
    label_feedback,
    label_pair,
    split_rng,
)

SPLITS: dict[str, str] = {**COMMON_SPLITS}
Problem = tuple[int, tuple[tuple[str, int], ...]]  # (start, ((operation, operand), ...))
OPERATIONS = {"add": "plus", "subtract": "minus", "multiply": "times"}
_PROMPT = re.compile(r"^question : start with (\d+) ((?:, (?:add \d+|subtract \d+|multiply by \d+) )+)\. "
                     r"what is the result \?$")
_STEP = re.compile(r"(add|subtract|multiply by) (\d+)")
_ANSWER = re.compile(r"answer : (\d+)")


class ReasoningConfig(TaskSettings):
    """Settings of the reasoning task."""

    max_level: int = Field(5, ge=1, le=8, description="the hardest problems' number of operations")
    sft_levels: int = Field(2, ge=1, le=8, description="SFT demonstrations cover levels 1 to this")
    max_value: int = Field(60, ge=20, le=200, description="every number (start, operand, intermediate) is in "
                                                          "0..max_value")
    max_start: int = Field(20, ge=1, description="start numbers are drawn from 0..max_start")
    heldout_fraction: float = Field(0.2, gt=0, lt=1, description="share of problems (by hash) kept for the "
                                                                 "-eval splits")
    prompts_size: int = Field(1000, ge=1, description="rows of the prompts split")

    @model_validator(mode="after")
    def _levels(self) -> ReasoningConfig:
        if self.sft_levels > self.max_level:
            raise ValueError(f"sft_levels {self.sft_levels} is above max_level {self.max_level}")
        if self.max_start > self.max_value:
            raise ValueError(f"max_start {self.max_start} is above max_value {self.max_value}")
        return self


def prompt_text(problem: Problem) -> str:
    start, steps = problem
    said = " ".join(f", {'multiply by' if op == 'multiply' else op} {k}" for op, k in steps)
    return f"question : start with {start} {said} . what is the result ?"


def apply(value: int, operation: str, operand: int) -> int:
    return value + operand if operation == "add" else value - operand if operation == "subtract" \
        else value * operand


def result(problem: Problem) -> int:
    value, steps = problem
    for operation, operand in steps:
        value = apply(value, operation, operand)
    return value


def solution(problem: Problem, slip: tuple[int, int] | None = None) -> str:
    """The worked solution; ``slip = (step, delta)`` puts ``delta`` on that step's result
    and carries it on (an incorrect solution)."""
    value, steps = problem
    parts = []
    for i, (operation, operand) in enumerate(steps):
        new = apply(value, operation, operand) + (slip[1] if slip and slip[0] == i else 0)
        parts.append(f"{value} {OPERATIONS[operation]} {operand} is {new} .")
        value = new
    return " ".join(parts) + f" answer : {value} ."


def parse_prompt(text: str) -> Problem | None:
    match = _PROMPT.match(text.strip())
    if match is None:
        return None
    steps = tuple(("multiply" if op == "multiply by" else op, int(k)) for op, k in _STEP.findall(match.group(2)))
    return int(match.group(1)), steps


def final_answer(response: str) -> int | None:
    """The number of the response's last ``answer : N``, or None."""
    found = _ANSWER.findall(response)
    return int(found[-1]) if found else None


class ReasoningTask:
    """Arithmetic chains; gold 1 for the right final answer, else 0."""

    name = "reasoning"
    splits: ClassVar[dict[str, str]] = SPLITS

    def __init__(self, config: ReasoningConfig):
        self.config = config
        self._splits = LazySplits(self.name, self.splits, self._build)

    # ------------------------------------------------------------------ Task API

    def vocabulary(self) -> list[str]:
        words = ["question", ":", "start", "with", ",", "add", "subtract", "multiply", "by", ".", "what", "is",
                 "the", "result", "?", "plus", "minus", "times", "answer"]
        return list(dict.fromkeys(words + [str(n) for n in range(self.config.max_value + 1)]))

    def split(self, name: str) -> Sequence[Row]:
        return self._splits.get(name)

    def gold_score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [float(final_answer(r) == result(self._parse(p))) for p, r in zip(prompts, responses, strict=True)]

    def evaluate(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, float]:
        """``gold`` (the accuracy), ``format`` (share with an ``answer : N``), and per
        level ``level{n}/accuracy`` and ``level{n}/count``."""
        per_level: dict[int, list[float]] = {}
        formatted = 0
        for prompt, response in zip(prompts, responses, strict=True):
            problem = self._parse(prompt)
            answer = final_answer(response)
            formatted += answer is not None
            per_level.setdefault(len(problem[1]), []).append(float(answer == result(problem)))
        scores = [s for level in per_level.values() for s in level]
        metrics = {"gold": sum(scores) / max(len(scores), 1), "format": formatted / max(len(prompts), 1)}
        for level in sorted(per_level):
            metrics[f"level{level}/accuracy"] = sum(per_level[level]) / len(per_level[level])
            metrics[f"level{level}/count"] = float(len(per_level[level]))
        return metrics

    def _parse(self, prompt: str) -> Problem:
        text = prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt if m["role"] == "user")
        problem = parse_prompt(text)
        if problem is None:
            raise DataError(f"{text!r} is not a question of the reasoning task; expected 'question : start with N , "
                            f"add K , multiply by K , subtract K . what is the result ?'")
        return problem

    # ------------------------------------------------------------------ generation

    def _rng(self, split: str) -> random.Random:
        return split_rng(self.name, self.config.seed, split)

    def held_out(self, problem: Problem) -> bool:
        digest = hashlib.sha256(prompt_text(problem).encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.config.heldout_fraction

    def problem(self, rng: random.Random, level: int, held_out: bool) -> Problem:
        """A random problem of ``level`` operations on the requested side of the hold-out."""
        c = self.config
        while True:
            start = value = rng.randint(0, c.max_start)
            steps = []
            for _ in range(level):
                operation = rng.choice(("add", "subtract", "multiply"))
                operand = rng.randint(2, 3) if operation == "multiply" else rng.randint(1, 9)
                new = apply(value, operation, operand)
                if not 0 <= new <= c.max_value:
                    operation, operand = ("subtract", rng.randint(1, min(9, value))) if new > c.max_value \
                        else ("add", rng.randint(1, 9))
                    new = apply(value, operation, operand)
                steps.append((operation, operand))
                value = new
            problem = (start, tuple(steps))
            if all(0 <= v <= c.max_value for v in _values(problem)) and self.held_out(problem) == held_out:
                return problem

    def prompt(self, problem: Problem) -> Prompt:
        return Prompt(prompt_text(problem), {"answer": str(result(problem)), "level": len(problem[1])})

    def slips(self, rng: random.Random, problem: Problem, k: int) -> list[str]:
        """``k`` distinct incorrect solutions, each with one slip."""
        out: dict[str, None] = {}
        right = result(problem)
        while len(out) < k:
            step = rng.randrange(len(problem[1]))
            wrong = solution(problem, (step, rng.choice((-3, -2, -1, 1, 2, 3))))
            in_range = all(0 <= int(n) <= self.config.max_value for n in re.findall(r"-?\d+", wrong))
            if final_answer(wrong) != right and in_range:
                out[wrong] = None
        return list(out)

    def _build(self, split: str) -> Iterator[Row]:
        c = self.config
        rng = self._rng(split)
        held_out = split.endswith(("-eval", "-gold"))
        levels = range(1, c.max_level + 1)
        if split in ("sft", "sft-eval"):
            n = c.sft_size if split == "sft" else c.eval_size
            sft_levels = range(1, c.sft_levels + 1)
            return (PromptCompletion(prompt_text(p), solution(p))
                    for p in (self.problem(rng, sft_levels[i % len(sft_levels)], held_out) for i in range(n)))
        if split == "pretrain":
            # arithmetic facts, one step each ("7 plus 5 is 12 ."): no chains, no answers
            return (PromptCompletion("", solution(self.problem(rng, 1, False)).split(" answer")[0])
                    for _ in range(c.pretrain_size))
        if split in ("prompts", "prompts-eval"):
            n = c.prompts_size if split == "prompts" else c.eval_size
            return (self.prompt(self.problem(rng, levels[i % len(levels)], held_out)) for i in range(n))
        if split in ("preference", "preference-eval", "preference-gold"):
            source = "preference-eval" if split == "preference-gold" else split
            pair_rng = self._rng(source)
            labels = None if split == "preference-gold" else self._rng(f"{split}/labels")
            n = c.preference_size if split == "preference" else c.eval_size
            return (label_pair(labels, *self._pair(pair_rng, levels[i % len(levels)], held_out), c) for i in range(n))
        if split == "ranking":
            return (self._ranking(rng, levels[i % len(levels)]) for i in range(c.ranking_size))
        source = "unpaired-eval" if split == "unpaired-gold" else split
        unpaired_rng = self._rng(source)
        labels = None if split == "unpaired-gold" else self._rng(f"{split}/labels")
        n = c.preference_size if split == "unpaired" else c.eval_size
        return (label_feedback(labels, *self._single(unpaired_rng, levels[i % len(levels)], held_out), 0.5, c)
                for i in range(n))

    def _pair(self, rng: random.Random, level: int, held_out: bool) -> tuple[str, str, str, float, float]:
        problem = self.problem(rng, level, held_out)
        pair = [(solution(problem), 1.0), (self.slips(rng, problem, 1)[0], 0.0)]
        rng.shuffle(pair)
        (a, gold_a), (b, gold_b) = pair
        return prompt_text(problem), a, b, gold_a, gold_b

    def _single(self, rng: random.Random, level: int, held_out: bool) -> tuple[str, str, float]:
        prompt, a, _, gold_a, _ = self._pair(rng, level, held_out)
        return prompt, a, gold_a

    def _ranking(self, rng: random.Random, level: int) -> Ranking:
        problem = self.problem(rng, level, False)
        completions = [solution(problem), *self.slips(rng, problem, self.config.ranking_k - 1)]
        rng.shuffle(completions)
        scores = [float(final_answer(text) == result(problem)) for text in completions]
        return Ranking(prompt_text(problem), tuple(completions), dense_ranks(scores, self.config.tie_precision))


def _values(problem: Problem) -> list[int]:
    value, steps = problem
    values = [value]
    for operation, operand in steps:
        value = apply(value, operation, operand)
        values.append(value)
    return values
