"""The typed objects that flow between components, and the Protocols of the kinds.

Rows are what datasets yield (plain text, tokenised later by the algorithm that uses
them). Batches are tensors, documented with their shapes: ``B`` sequences, ``P`` prompt
tokens (left-padded), ``T`` response tokens (right-padded). ``response_mask`` is 1 on
real response tokens up to and including EOS, 0 on padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # annotations only: importing rlhfkit stays free of torch
    import torch

# --------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class PromptCompletion:
    """A demonstration: train on ``completion`` given ``prompt``. An empty prompt is plain
    text (pretraining)."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class Conversation:
    """Chat messages (``{"role": ..., "content": ...}``); the last one is the assistant
    reply to learn. Rendered with the tokenizer's chat template by the algorithm."""

    messages: tuple[dict[str, str], ...]


@dataclass(frozen=True)
class Preference:
    """One labelled comparison. ``margin`` is the label strength when the data has one
    (Llama-2 style), else ``None``."""

    prompt: str
    chosen: str
    rejected: str
    margin: float | None = None


@dataclass(frozen=True)
class Ranking:
    """K completions of one prompt with ranks: 0 is best, equal ranks are ties."""

    prompt: str
    completions: tuple[str, ...]
    ranks: tuple[int, ...]


@dataclass(frozen=True)
class Prompt:
    """A prompt for online sampling (RL, online DPO)."""

    prompt: str


Row = PromptCompletion | Conversation | Preference | Ranking | Prompt

# ------------------------------------------------------------------------ batches


@dataclass
class Rollout:
    """Experience sampled from the policy for one iteration.

    Attributes:
        prompt_ids: ``[B, P]`` left-padded prompt token ids.
        prompt_mask: ``[B, P]`` 1 on real prompt tokens.
        response_ids: ``[B, T]`` right-padded sampled tokens.
        response_mask: ``[B, T]`` 1 on response tokens up to and including EOS.
        logprobs: ``[B, T]`` log pi_old of the sampled tokens at rollout time.
        prompts, responses: the decoded text, for reward sources and logging.
        group: ``[B]`` index of the prompt each sample came from (group sampling).
        ref_logprobs: ``[B, T]`` log pi_ref, filled in after sampling.
        values: ``[B, T]`` critic values, filled in by estimators that own a critic.
        scores: ``[B]`` sequence scores from the reward source.
        rewards: ``[B, T]`` per-token rewards after the constraints shaped them.
        truncated: ``[B]`` True where the response hit the length limit without EOS.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    prompts: list[str]
    responses: list[str]
    group: torch.Tensor
    truncated: torch.Tensor
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    rewards: torch.Tensor | None = None


@dataclass
class RewardBatch:
    """Reward-model scores of ranked completions: what reward-model objectives consume.

    ``B`` prompts with ``K`` completions each (pairs are ``K = 2``, chosen first).

    Attributes:
        scores: ``[B, K]`` scalar rewards r(x, y_k).
        ranks: ``[B, K]`` long, 0 is best; equal ranks are ties.
        valid: ``[B, K]`` bool, False on padding (prompts with fewer than K completions).
        margins: ``[B]`` label strength of a pair (Llama-2 style), or ``None``.
        best_nll: ``[B]`` mean token NLL of each prompt's best completion under the
            model's LM head, filled only when an objective sets ``needs_lm = True``.
    """

    scores: torch.Tensor
    ranks: torch.Tensor
    valid: torch.Tensor
    margins: torch.Tensor | None = None
    best_nll: torch.Tensor | None = None


@dataclass
class Advantages:
    """What an estimator returns: ``advantages`` ``[B, T]`` and, for critics, ``returns``
    ``[B, T]`` (the value targets)."""

    advantages: torch.Tensor
    returns: torch.Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class LossTerm:
    """A scalar loss contribution with its namespaced metrics (``kl/value``...)."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------- protocols


@runtime_checkable
class Dataset(Protocol):
    """Rows for a stage. ``rows()`` is called once per stage; it validates every row."""

    def rows(self) -> Sequence[Row]: ...


@runtime_checkable
class Task(Protocol):
    """A built-in task: generated data with a known ground truth ("gold") scorer."""

    #: split name -> one-line description
    splits: dict[str, str]

    def vocabulary(self) -> list[str]:
        """Every word the task's text uses (for a word-level tokenizer)."""
        ...

    def split(self, name: str) -> Sequence[Row]:
        """The rows of a named split (see the task's ``splits``)."""
        ...

    def gold_score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """The ground-truth score of each (prompt, response)."""
        ...

    def evaluate(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, float]:
        """Task-level metrics of responses (mean gold and its parts, accuracy...)."""
        ...


@runtime_checkable
class Policy(Protocol):
    """A causal LM that samples and scores tokens."""

    model: torch.nn.Module
    tokenizer: Any

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, do_sample: bool,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> list[str]:
        """Sample one response per prompt (KV cache, no grad) and return the text."""
        ...

    def export(self, directory: Path) -> None:
        """Write the model and tokenizer in transformers format (safetensors)."""
        ...


@runtime_checkable
class RewardSource(Protocol):
    """Scores (prompt, response) pairs."""

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Return ``[B]`` float scores."""
        ...


@runtime_checkable
class Estimator(Protocol):
    """Turns a scored rollout into advantages (and returns)."""

    def estimate(self, rollout: Rollout) -> Advantages: ...


@runtime_checkable
class Constraint(Protocol):
    """Shapes rewards, adds a loss term and/or updates after an optimizer step.

    Each method may return ``None`` when the constraint does not act at that point.
    """

    def shape_rewards(self, rollout: Rollout) -> LossTerm | None:
        """Return per-token reward changes ``[B, T]`` in ``LossTerm.loss`` (added to
        ``rollout.rewards`` by the algorithm, in recipe order)."""
        ...

    def loss(self, rollout: Rollout, logprobs: torch.Tensor) -> LossTerm | None: ...

    def after_update(self, rollout: Rollout) -> dict[str, float] | None: ...


@runtime_checkable
class Objective(Protocol):
    """A loss variant inside an algorithm (policy loss, preference loss, RM loss)."""

    def __call__(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> LossTerm: ...


@runtime_checkable
class Algorithm(Protocol):
    """A training stage: a LightningModule with an export step.

    The core builds the Trainer from the recipe's ``trainer:`` section, calls
    ``trainer.fit(algorithm)`` and then, on rank 0, ``export`` and ``summary``.
    """

    def export(self, directory: Path) -> None: ...

    def summary(self) -> dict[str, Any]: ...
