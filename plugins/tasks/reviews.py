"""The ``reviews`` task: write a short product review; the gold score rewards sentiment.

A prompt asks for a review of one of 16 products (``write a review of the camera :``);
a response is one or two sentences from a small grammar (see
:mod:`rlhfkit.plugins.tasks.reviews_text`). The gold score is the sum of six components::

    gold = 1.5 * tanh((#positive - #negative) / 2)         # sentiment, saturating
         - 0.5 * min(#ungrammatical complete sentences, 2)  # grammar
         + (0.5 if the last word is "." else -0.5)          # ending
         - 0.5 * min(#repeated content words, 3)            # repetition
         - 0.25 * min(#words outside 6..16, 4)              # length
         + 0.5 * [names the product] - 0.5 * [names another product]
         + 0.25 * min(#distinct aspects of the product, 2)  # relevance

so ``gold`` lies in ``(-6, 3)`` (fluent reviews score in about ``[-1, 3]``). Because only
sentiment can be "pushed" and it saturates, a proxy reward model that learnt "positive
words are good" is over-optimised by piling up positive words: the proxy keeps rising while
gold falls (grammar, repetition and length penalties).

The demonstrations (sft, pretrain) are fluent but of balanced sentiment (35% positive,
35% negative, 15% neutral, 15% mixed), like honest human reviews, so the SFT policy sits
near gold 1 and RL has room to reach 3.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import ClassVar

from pydantic import Field

from rlhfkit import Prompt, PromptCompletion, Ranking, Row
from rlhfkit.plugins.tasks.common import (
    COMMON_SPLITS,
    LazySplits,
    TaskSettings,
    dense_ranks,
    label_feedback,
    label_pair,
    split_rng,
)
from rlhfkit.plugins.tasks.reviews_text import (
    ASPECTS,
    FUNCTION_WORDS,
    INTENSIFIERS,
    NEGATIVE_ADJECTIVES,
    NEGATIVE_VERBS,
    NEUTRAL_ADJECTIVES,
    POSITIVE_ADJECTIVES,
    POSITIVE_VERBS,
    PRODUCTS,
    PROMPT_TEMPLATES,
    candidate,
    fluent_review,
    gold,
    gold_components,
)

#: Tone mix of the demonstrations: honest reviews, not uniformly positive ones.
DEMONSTRATION_TONES = {"positive": 0.35, "negative": 0.35, "neutral": 0.15, "mixed": 0.15}
#: Pairs/rankings whose candidates tie exactly are redrawn up to this many times.
_MAX_REDRAWS = 100


class ReviewsConfig(TaskSettings):
    """Settings of the reviews task (the shared ones, and the threshold of unpaired labels)."""

    desirable_threshold: float = Field(
        0.5, description="unpaired splits: a completion is desirable with probability "
                         "sigmoid((gold - threshold) / label_temperature); 0.5 is about the median "
                         "gold of the candidates")


class ReviewsTask:
    """Generated product reviews with a known gold score (see the module docstring)."""

    name = "reviews"
    splits: ClassVar[dict[str, str]] = COMMON_SPLITS

    def __init__(self, config: ReviewsConfig):
        self.config = config
        self._splits = LazySplits(self.name, self.splits, self._build)

    # ------------------------------------------------------------------ Task API

    def vocabulary(self) -> list[str]:
        prompt_words = [w for t in PROMPT_TEMPLATES for w in t.split() if w != "{product}"]
        return list(dict.fromkeys(
            [*FUNCTION_WORDS, *prompt_words, *PRODUCTS, *ASPECTS, *INTENSIFIERS,
             *POSITIVE_ADJECTIVES, *NEGATIVE_ADJECTIVES, *NEUTRAL_ADJECTIVES,
             *POSITIVE_VERBS, *NEGATIVE_VERBS]))

    def split(self, name: str) -> Sequence[Row]:
        return self._splits.get(name)

    def gold_score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [gold(p, r) for p, r in zip(prompts, responses, strict=True)]

    def evaluate(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, float]:
        """Mean gold score (``gold``) and mean of each component (``gold/<component>``),
        plus the mean response length in words (``words``)."""
        rows = [gold_components(p, r) for p, r in zip(prompts, responses, strict=True)]
        n = max(len(rows), 1)
        metrics = {"gold": sum(sum(c.values()) for c in rows) / n}
        for key in ("sentiment", "grammar", "ending", "repetition", "length", "relevance"):
            metrics[f"gold/{key}"] = sum(c[key] for c in rows) / n
        metrics["words"] = sum(len(r.split()) for r in responses) / n
        return metrics

    # ------------------------------------------------------------------ generation

    def _rng(self, split: str) -> random.Random:
        return split_rng(self.name, self.config.seed, split)

    def _prompt(self, rng: random.Random) -> tuple[str, str]:
        product = rng.choice(PRODUCTS)
        return rng.choice(PROMPT_TEMPLATES).format(product=product), product

    def _demonstration(self, rng: random.Random, product: str) -> str:
        tone = rng.choices(list(DEMONSTRATION_TONES), weights=DEMONSTRATION_TONES.values())[0]
        return " ".join(fluent_review(rng, product, tone, rng.choice((1, 2, 2))))

    def _demonstrations(self, rng: random.Random, n: int,
                        exclude: frozenset[PromptCompletion] = frozenset()) -> Iterator[Row]:
        made = 0
        while made < n:
            prompt, product = self._prompt(rng)
            row = PromptCompletion(prompt, self._demonstration(rng, product))
            if row not in exclude:
                made += 1
                yield row

    def _scored_candidates(self, rng: random.Random, k: int,
                           precision: float | None) -> tuple[str, list[str], list[float]]:
        """A prompt and ``k`` distinct candidates whose gold scores are not all equal
        (after rounding to ``precision`` when given): an all-tied comparison teaches
        nothing, and the gold-labelled split could not label it."""
        prompt, product = self._prompt(rng)
        for _ in range(_MAX_REDRAWS):
            responses = list(dict.fromkeys(candidate(rng, product) for _ in range(k)))
            scores = self.gold_score([prompt] * len(responses), responses)
            levels = dense_ranks(scores, precision) if precision else scores
            if len(responses) == k and len(set(levels)) > 1:
                return prompt, responses, scores
        raise RuntimeError(f"no {k} distinct candidates with different gold scores for {prompt!r}")

    def _pairs(self, split: str, n: int) -> list[tuple[str, str, str, float, float]]:
        """``n`` comparisons ``(prompt, a, b, gold_a, gold_b)`` with ``gold_a != gold_b``."""
        rng = self._rng(split)
        pairs = []
        for _ in range(n):
            prompt, (a, b), (gold_a, gold_b) = self._scored_candidates(rng, 2, None)
            pairs.append((prompt, a, b, gold_a, gold_b))
        return pairs

    def _build(self, split: str) -> Iterator[Row]:
        c = self.config
        if split == "sft":
            return self._demonstrations(self._rng(split), c.sft_size)
        if split == "sft-eval":
            return self._demonstrations(self._rng(split), c.eval_size,
                                        exclude=frozenset(self.split("sft")))
        if split == "pretrain":
            rng = self._rng(split)
            return (PromptCompletion("", self._demonstration(rng, rng.choice(PRODUCTS)))
                    for _ in range(c.pretrain_size))
        if split in ("preference", "preference-eval", "preference-gold"):
            # preference-gold relabels the preference-eval pairs without noise.
            source = "preference-eval" if split == "preference-gold" else split
            size = c.preference_size if split == "preference" else c.eval_size
            labels = None if split == "preference-gold" else self._rng(f"{split}/labels")
            return (label_pair(labels, *pair, c)
                    for pair in self._pairs(source, size))
        if split == "ranking":
            return self._rankings(self._rng(split), c.ranking_size)
        if split in ("unpaired", "unpaired-eval", "unpaired-gold"):
            # unpaired-gold relabels the unpaired-eval completions without noise.
            source = "unpaired-eval" if split == "unpaired-gold" else split
            size = c.preference_size if split == "unpaired" else c.eval_size
            labels = None if split == "unpaired-gold" else self._rng(f"{split}/labels")
            return (label_feedback(labels, *row, c.desirable_threshold, c)
                    for row in self._completions(source, size))
        size = c.prompts_size if split == "prompts" else c.eval_size
        rng = self._rng(split)
        return (Prompt(self._prompt(rng)[0]) for _ in range(size))

    def _completions(self, split: str, n: int) -> Iterator[tuple[str, str, float]]:
        """``n`` single candidates ``(prompt, completion, gold)``; a candidate whose gold
        equals the threshold exactly is redrawn (no label is right for it)."""
        rng = self._rng(split)
        made = 0
        while made < n:
            prompt, product = self._prompt(rng)
            completion = candidate(rng, product)
            score = gold(prompt, completion)
            if score != self.config.desirable_threshold:
                made += 1
                yield prompt, completion, score

    def _rankings(self, rng: random.Random, n: int) -> Iterator[Ranking]:
        for _ in range(n):
            prompt, responses, scores = self._scored_candidates(
                rng, self.config.ranking_k, self.config.tie_precision)
            ranks = dense_ranks(scores, self.config.tie_precision)
            yield Ranking(prompt, tuple(responses), ranks)
