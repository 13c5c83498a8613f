"""The typed objects that flow between components, and the Protocols of the kinds.

Rows are what datasets yield (plain text, tokenised later by the algorithm that uses
them). Batches are tensors, documented with their shapes: ``B`` sequences, ``P`` prompt
tokens (left-padded), ``T`` response tokens (right-padded). ``response_mask`` is 1 on
real response tokens up to and including EOS, 0 on padding.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # annotations only: importing rlhfkit stays free of torch
    import torch

# --------------------------------------------------------------------------- rows

#: Chat messages, ``({"role": "user", "content": "..."}, ...)``, oldest first.
Messages = tuple[dict[str, str], ...]
#: A prompt: text, or a conversation the chat template renders (see ``rlhfkit.encode_prompts``).
PromptText = str | Messages


@dataclass(frozen=True)
class PromptCompletion:
    """A demonstration: train on ``completion`` given ``prompt``. An empty prompt is plain
    text (pretraining)."""

    prompt: PromptText
    completion: str


@dataclass(frozen=True)
class Conversation:
    """Chat messages (``{"role": ..., "content": ...}``); the last one is the assistant
    reply to learn. Rendered with the tokenizer's chat template by the algorithm."""

    messages: tuple[dict[str, str], ...]

    @property
    def prompt(self) -> Messages:
        """The messages before the reply: what the model answers."""
        return tuple(self.messages[:-1])

    @property
    def completion(self) -> str:
        """The reply's text."""
        return self.messages[-1]["content"]


@dataclass(frozen=True)
class Preference:
    """One labelled comparison. ``margin`` is the label strength when the data has one
    (Llama-2 style), else ``None``."""

    prompt: PromptText
    chosen: str
    rejected: str
    margin: float | None = None


@dataclass(frozen=True)
class Ranking:
    """K completions of one prompt with ranks: 0 is best, equal ranks are ties."""

    prompt: PromptText
    completions: tuple[str, ...]
    ranks: tuple[int, ...]


@dataclass(frozen=True)
class Prompt:
    """A prompt for online sampling (RL, online DPO). ``fields`` holds the row's other
    columns (a reference answer, a test case...), which reward functions receive."""

    prompt: PromptText
    fields: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Feedback:
    """One completion labelled on its own, with no comparison: thumbs up (``desirable``)
    or thumbs down. Unpaired preference data, as KTO trains on."""

    prompt: PromptText
    completion: str
    desirable: bool


Row = PromptCompletion | Conversation | Preference | Ranking | Prompt | Feedback

# ------------------------------------------------------------------------ batches

#: ``Rollout.extras`` key of a per-sample ``[B]`` loss weight: 0 leaves a sample out of the
#: policy loss and of its token count (DAPO's overlong filtering); absent: every sample counts.
LOSS_MASK = "loss_mask"


@dataclass
class Rollout:
    """Experience sampled from the policy for one iteration.

    Attributes:
        prompt_ids: ``[B, P]`` left-padded prompt token ids.
        prompt_mask: ``[B, P]`` 1 on real prompt tokens.
        response_ids: ``[B, T]`` right-padded sampled tokens.
        response_mask: ``[B, T]`` 1 on response tokens up to and including EOS.
        logprobs: ``[B, T]`` log pi_old of the sampled tokens (on ``logits /
            temperature``), 0 on padding: the trainer's forward at rollout time, or, for
            the rows of an iteration's first minibatch, that update's own forward (the
            policy has not moved yet, so they are the same numbers; the algorithm fills
            them in before any loss reads them, see docs/ppo-details.md#forwards).
        prompts, responses: the prompts (text or conversations, as the data gave them) and
            the decoded responses, for reward sources and logging.
        group: ``[B]`` index of the prompt each sample came from (group sampling: the
            samples of one prompt share it).
        truncated: ``[B]`` True where the response hit the length limit without EOS.
        ref_logprobs: ``[B, T]`` log pi_ref, filled in after sampling when a component
            reads it (``needs_reference``), else ``None``.
        engine_logprobs: ``[B, T]`` the generation engine's log-probs of the sampled
            tokens (same ``logits / temperature``), 0 on padding; ``None`` when the
            engine gives none. Their gap to ``logprobs`` is the train/inference mismatch.
        values: ``[B, T]`` critic values at rollout time (estimators with a critic).
        scores: ``[B]`` sequence scores: the reward source's, then as constraints shape
            them (normalise, clip, missing-EOS penalty).
        rewards: ``[B, T]`` per-token rewards: constraints add to them (KL in reward) and
            the algorithm adds ``scores`` at the last real token.
        advantages, returns: ``[B, T]`` from the estimator (returns: critic targets).
        extras: per-sample ``[B, ...]`` tensors an estimator or constraint needs beyond
            these (e.g. a greedy baseline's scores, :data:`LOSS_MASK`); sliced with the rest.
        fields: per sample, the other columns of its prompt's data row (``Prompt.fields``),
            for reward sources that read them; ``None`` when not collected.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    prompts: list[PromptText]
    responses: list[str]
    group: torch.Tensor
    truncated: torch.Tensor
    ref_logprobs: torch.Tensor | None = None
    engine_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    fields: list[dict[str, Any]] | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, index: torch.Tensor) -> Rollout:
        """The samples at ``index`` (a 1-D long tensor), every field sliced alike."""
        picked = index.tolist()
        values: dict[str, Any] = {}
        for name, value in vars(self).items():
            if isinstance(value, list):
                values[name] = [value[i] for i in picked]
            elif isinstance(value, dict):
                values[name] = {k: v[index.to(v.device)] for k, v in value.items()}
            elif value is not None:
                values[name] = value[index.to(value.device)]
            else:
                values[name] = None
        return Rollout(**values)


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
class PreferenceBatch:
    """Log-probs of chosen and rejected responses: what direct preference objectives
    (DPO and its relatives) consume. ``B`` pairs.

    Attributes:
        chosen, rejected: ``[B]`` summed token log-probs log pi(y|x) under the policy
            (with grad).
        chosen_tokens, rejected_tokens: ``[B]`` response token counts (for per-token
            averages: IPO, SimPO, ORPO).
        ref_chosen, ref_rejected: ``[B]`` summed log-probs under the reference, or
            ``None`` for reference-free objectives (``needs_reference = False``).
        mismatched, ref_mismatched: ``[B]`` summed log-probs (no grad) of each prompt
            with another pair's chosen response, under the policy and the reference;
            filled for objectives that set ``needs_mismatched = True`` (KTO's KL
            reference point).
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None
    mismatched: torch.Tensor | None = None
    ref_mismatched: torch.Tensor | None = None


@dataclass
class FeedbackBatch:
    """Log-probs of unpaired completions, each labelled desirable or undesirable: what
    objectives that train on :class:`Feedback` rows (KTO; ``accepts_unpaired = True``)
    consume. ``B`` rows of one micro-batch.

    Attributes:
        logps: ``[B]`` summed token log-probs log pi(y|x) under the policy (with grad).
        tokens: ``[B]`` response token counts.
        desirable: ``[B]`` bool, True for a desirable completion.
        ref_logps: ``[B]`` summed log-probs under the reference.
        mismatched, ref_mismatched: ``[M]`` summed log-probs (no grad) of prompts paired
            with another row's completion, under the policy and the reference (KTO's KL
            reference point), for every row of the optimizer step on every device, so
            that each micro-batch sees the same ``M >= B`` values.
    """

    logps: torch.Tensor
    tokens: torch.Tensor
    desirable: torch.Tensor
    ref_logps: torch.Tensor
    mismatched: torch.Tensor
    ref_mismatched: torch.Tensor


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


@dataclass
class Generation:
    """What a generation engine returns for ``B`` left-padded prompts.

    Attributes:
        response_ids: ``[B, T]`` sampled tokens, right-padded with PAD (``T <=
            max_new_tokens``).
        response_mask: ``[B, T]`` 1 up to and including each row's first EOS (all ones
            when a row never emitted one).
        logprobs: ``[B, T]`` the engine's log-probs of the sampled tokens on ``logits /
            temperature`` of the full distribution (top-k/top-p do not renormalise
            them: the convention the trainer's forward uses), 0 on padding; ``None`` for
            an engine that cannot give them.
    """

    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor | None = None


@runtime_checkable
class Engine(Protocol):
    """Samples responses for an algorithm (kind ``engine``: ``hf``, ``vllm``).

    ``start(policy)`` comes first, once, with the policy (``model``, ``tokenizer``) whose
    weights it samples from. ``generate`` samples one response per prompt row; every row
    ``i`` is seeded by ``seeds[i]``, so a response depends on its seed and its prompt
    alone where the engine allows (not on the batch it came in, nor on the number of
    devices). ``sync(policy)`` is called before a rollout whenever the policy changed
    since the last one: the engine then samples from the trained weights. Optional:
    ``close()`` at the end of the stage (or when it fails), ``check(policy, generation,
    prompt_ids, prompt_mask)`` to compare its log-probs with the trainer's.
    """

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: Any, *,
                 seeds: Sequence[int], greedy: bool = False) -> Generation: ...


@runtime_checkable
class RewardSource(Protocol):
    """Scores (prompt, response) pairs. A prompt is text or a conversation (a sequence of
    ``{"role", "content"}`` messages), as the data gave it.

    A source that also reads the rows' other columns (a reference answer...) takes a
    keyword ``fields``: one dict per pair; :func:`score_rows` passes it only to sources
    whose ``score`` accepts it.
    """

    def score(self, prompts: Sequence[PromptText], responses: Sequence[str]) -> torch.Tensor:
        """Return ``[B]`` float scores."""
        ...


def row_fields(row: Any) -> dict[str, Any]:
    """A row's other columns (``Prompt.fields``), ``{}`` for rows that keep none."""
    return dict(getattr(row, "fields", None) or {})


def score_rows(source: RewardSource, prompts: Sequence[PromptText], responses: Sequence[str],
               fields: Sequence[dict[str, Any]] | None = None) -> torch.Tensor:
    """``source.score(prompts, responses)``, with ``fields=`` when given and the source's
    ``score`` takes a ``fields`` keyword (or ``**kwargs``)."""
    if fields is not None and _takes_fields(source.score):
        return source.score(prompts, responses, fields=list(fields))
    return source.score(prompts, responses)


def _takes_fields(method: Any) -> bool:
    function = getattr(method, "__func__", method)
    try:
        return _signature_takes_fields(function)
    except TypeError:  # an unhashable callable: look at it each time
        return _signature_takes_fields.__wrapped__(function)


@functools.cache
def _signature_takes_fields(function: Any) -> bool:
    """Per function, not per call: scoring runs every iteration."""
    import inspect

    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "fields" or p.kind is p.VAR_KEYWORD for p in parameters)


@runtime_checkable
class Estimator(Protocol):
    """Turns a scored rollout into advantages (and returns).

    Required: ``critic`` (``None`` for critic-free estimators) and ``estimate``. Optional
    capabilities, called only when the component declares them in
    ``ComponentSpec.provides`` (see :data:`rlhfkit.CAPABILITIES`):

    - ``prepare(rollout)``: fill what ``estimate`` needs from models (no grad), e.g.
      ``rollout.values`` or a greedy baseline in ``rollout.extras``;
    - ``critic_loss(minibatch) -> LossTerm``: the value loss, for an estimator that owns a
      critic (``gae``): ``critic`` is then the ``nn.Module`` the algorithm trains alongside
      the policy, with its ``optimizer`` settings (an :class:`rlhfkit.OptimizerSettings`);
    - ``bind(algorithm)``: once before training, with the algorithm's documented
      attributes (docs/ppo-details.md);
    - ``state_dict()`` / ``load_state_dict(state)``: state beyond the critic's weights.
    """

    critic: torch.nn.Module | None

    def estimate(self, rollout: Rollout) -> Advantages: ...


@dataclass
class PolicyOutput:
    """The policy's forward on a minibatch of a rollout, for loss terms.

    ``logprobs`` ``[B, T]`` of the sampled tokens (with grad, on ``logits /
    temperature``); ``entropy`` ``[B, T]`` (with grad only when a loss term asked for it
    with ``needs_entropy = True``); ``mask`` ``[B, T]`` float response mask;
    ``global_tokens``: the divisor of a ``global-token-mean`` loss (DAPO) for this
    micro-batch: the global minibatch's response tokens / (ranks x micro-batches), so
    that the micro-batch losses, accumulated and averaged over ranks, sum to
    ``Σ L / tokens of the minibatch``; ``max_tokens``: the generation budget (the
    constant of a ``token-sum-norm`` loss, Dr.GRPO).
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor
    mask: torch.Tensor
    global_tokens: float | torch.Tensor = 1.0
    max_tokens: int | None = None


class Constraint(Protocol):
    """Shapes rewards, adds a loss term and/or updates state after an iteration.

    Every method is optional: the algorithm calls those the constraint declares in
    ``ComponentSpec.provides`` (at least one of ``shape_rewards``, ``loss``,
    ``after_update``), in recipe order; a slot that never calls a declared one (DPO calls
    only ``after_update``) refuses the constraint at validation. ``bind(algorithm)`` comes first, once (the policy, reference model, tokenizer
    and device it may use are listed in docs/ppo-details.md); ``state_dict`` /
    ``load_state_dict`` make its state (running moments, a KL coefficient) part of the
    resumable checkpoint. ``needs_entropy = True`` asks for an entropy with grad.
    """

    def shape_rewards(self, rollout: Rollout) -> dict[str, float] | None:
        """Change ``rollout.scores`` ``[B]`` and/or ``rollout.rewards`` ``[B, T]`` in
        place (before the scores are placed on the last token); return metrics."""
        ...

    def loss(self, minibatch: Rollout, output: PolicyOutput) -> LossTerm | None:
        """A term added to the policy loss of each minibatch."""
        ...

    def after_update(self, rollout: Rollout) -> dict[str, float] | None:
        """Called after each iteration's updates (adaptive KL, reference EMA)."""
        ...


@runtime_checkable
class Objective(Protocol):
    """A loss variant inside an algorithm (policy loss, preference loss, RM loss)."""

    def __call__(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> LossTerm: ...


@runtime_checkable
class Algorithm(Protocol):
    """A training stage: a LightningModule with an export step.

    The core builds the Trainer from the recipe's ``trainer:`` section, calls
    ``trainer.fit(algorithm)`` and then, on rank 0, ``export`` and ``summary``.

    End-of-training work (a final evaluation, samples, a normalisation the export
    carries) goes in an optional ``finalize()``, not ``on_train_end``: the core calls it
    once the last step is reached, also when a stage resumes from a checkpoint at its last
    step (Lightning then skips ``on_train_end``), with the torch RNG seeded, so doing it
    again after a kill gives the same export and summary. Optimizer steps go through
    :func:`rlhfkit.optimizer_step`, whose NaN/Inf guard follows ``trainer.on_nan`` (a
    module may override it with an ``on_nan`` attribute).

    A stage that trains nothing (an evaluation) is not a LightningModule: it sets the class
    attribute ``evaluation_only = True`` and has ``run()``, which the core calls instead
    of ``trainer.fit``. Any stage may write ``report.json`` (``{"tables": [{"title",
    "columns", "rows", "caption"}]}``) into its directory; the core prints those tables at
    the end of every run, also when the stage was already finished.
    """

    def export(self, directory: Path) -> None: ...

    def summary(self) -> dict[str, Any]: ...
