"""What the built-in tasks share: their common settings, lazy splits, feedback labelling.

Every split is generated from its own random stream, ``random.Random("<task>/<seed>/<split>")``
(string seeds are hashed with SHA-512, so the stream does not depend on ``PYTHONHASHSEED``),
which makes a split independent of which other splits were generated before it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field

from rlhfkit import Feedback, Preference, Row, UserError

T = TypeVar("T")

#: The split names every built-in task has (a task may add more).
COMMON_SPLITS: dict[str, str] = {
    "sft": "PromptCompletion demonstrations for supervised fine-tuning",
    "sft-eval": "held-out PromptCompletion rows, disjoint from sft",
    "pretrain": "PromptCompletion rows with an empty prompt: plain text for LM (pre)training / ptx",
    "preference": "Preference pairs labelled by the gold scorer with Bradley-Terry noise",
    "preference-eval": "held-out Preference pairs, labelled with the same noise",
    "preference-gold": "the preference-eval pairs labelled without noise (the better one chosen)",
    "ranking": "Ranking rows: ranking_k completions per prompt ranked by gold score, with ties",
    "unpaired": "Feedback rows: one completion per prompt, desirable or not by the gold scorer "
                "against desirable_threshold, with Bradley-Terry noise",
    "unpaired-eval": "held-out Feedback rows, labelled with the same noise",
    "unpaired-gold": "the unpaired-eval rows labelled without noise (desirable when gold > "
                     "desirable_threshold)",
    "prompts": "Prompt rows for reinforcement learning",
    "prompts-eval": "held-out Prompt rows for evaluating a policy",
}


class TaskSettings(BaseModel):
    """Settings every built-in task has: the seed, split sizes and how feedback is labelled."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, description="generation seed: the same seed gives the same data")
    sft_size: int = Field(2000, ge=1, description="rows of the sft split")
    pretrain_size: int = Field(2000, ge=1, description="rows of the pretrain split")
    preference_size: int = Field(2000, ge=1, description="pairs in the preference split, and "
                                 "labelled completions in the unpaired split")
    ranking_size: int = Field(500, ge=1, description="prompts in the ranking split")
    prompts_size: int = Field(512, ge=1, description="rows of the prompts split")
    eval_size: int = Field(
        200, ge=1, description="rows of each held-out split (sft-eval, preference-eval, "
                               "preference-gold, prompts-eval, ...)")
    ranking_k: int = Field(4, ge=2, le=8, description="completions per prompt in the ranking split")
    label_temperature: float = Field(
        0.5, gt=0, description="Bradley-Terry label noise: P(a chosen over b) = "
                               "sigmoid((gold(a) - gold(b)) / label_temperature)")
    tie_precision: float = Field(
        0.25, gt=0, description="gold scores are rounded to a multiple of this before ranking; "
                                "equal rounded scores are ties (equal ranks)")
    preference_margins: bool = Field(
        False, description="attach margin = |gold difference| (rounded to tie_precision) to each "
                           "pair, as a Llama-2-style annotator confidence; None when false")


def split_rng(task: str, seed: int, split: str) -> random.Random:
    """The random stream of one split of one task."""
    return random.Random(f"{task}/{seed}/{split}")


class LazySplits:
    """Generates each split on first use and keeps it (as a tuple, so callers cannot
    mutate rows another component shares)."""

    def __init__(self, task: str, descriptions: dict[str, str],
                 build: Callable[[str], Iterable[Row]]):
        self.task = task
        self.descriptions = descriptions
        self._build = build
        self._rows: dict[str, tuple[Row, ...]] = {}

    def check(self, name: str) -> None:
        """Raise a :class:`UserError` listing the splits when ``name`` is not one."""
        if name not in self.descriptions:
            raise UserError(
                f"the {self.task} task has no split {name!r}; its splits are: "
                f"{', '.join(self.descriptions)}."
            )

    def get(self, name: str) -> tuple[Row, ...]:
        self.check(name)
        if name not in self._rows:
            self._rows[name] = tuple(self._build(name))
        return self._rows[name]


def cycle_sample(rng: random.Random, pool: Sequence[T], n: int) -> list[T]:
    """``n`` items drawn by going through shuffled copies of ``pool`` in turn, so every
    item appears ``n // len(pool)`` or one more times (even coverage, unlike i.i.d. draws)."""
    if not pool:
        raise ValueError("cannot sample from an empty pool")
    out: list[T] = []
    while len(out) < n:
        epoch = list(pool)
        rng.shuffle(epoch)
        out.extend(epoch[: n - len(out)])
    return out


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def round_to(value: float, precision: float) -> float:
    """``value`` rounded to the nearest multiple of ``precision``."""
    return round(value / precision) * precision


def label_pair(rng: random.Random | None, prompt: str, a: str, b: str, gold_a: float,
               gold_b: float, settings: TaskSettings) -> Preference:
    """Label the comparison of ``a`` and ``b`` like a noisy annotator.

    With ``rng`` the label follows Bradley-Terry: ``a`` is chosen with probability
    ``sigmoid((gold_a - gold_b) / label_temperature)``. With ``rng=None`` the label is
    noiseless (the higher gold score is chosen; callers avoid exact ties).
    """
    if rng is None:
        a_chosen = gold_a > gold_b
    else:
        a_chosen = rng.random() < sigmoid((gold_a - gold_b) / settings.label_temperature)
    margin = (round_to(abs(gold_a - gold_b), settings.tie_precision)
              if settings.preference_margins else None)
    if a_chosen:
        return Preference(prompt=prompt, chosen=a, rejected=b, margin=margin)
    return Preference(prompt=prompt, chosen=b, rejected=a, margin=margin)


def label_feedback(rng: random.Random | None, prompt: str, completion: str, gold: float,
                   threshold: float, settings: TaskSettings) -> Feedback:
    """Label one completion on its own (thumbs up or down) like a noisy annotator.

    With ``rng`` it is desirable with probability ``sigmoid((gold - threshold) /
    label_temperature)``: the Bradley-Terry label of a comparison with an answer whose gold
    score is ``threshold``, the noise of :func:`label_pair`. With ``rng=None`` the label is
    noiseless (desirable when ``gold > threshold``; callers avoid exact ties).
    """
    if rng is None:
        desirable = gold > threshold
    else:
        desirable = rng.random() < sigmoid((gold - threshold) / settings.label_temperature)
    return Feedback(prompt=prompt, completion=completion, desirable=desirable)


def dense_ranks(scores: Sequence[float], precision: float) -> tuple[int, ...]:
    """Ranks (0 = best) of ``scores`` after rounding to ``precision``; equal rounded scores
    share a rank and the next distinct score takes the next integer (dense ranking)."""
    # Integer multiples of ``precision``, so float error cannot split a tie.
    levels = [round(s / precision) for s in scores]
    order = sorted(set(levels), reverse=True)
    return tuple(order.index(level) for level in levels)
