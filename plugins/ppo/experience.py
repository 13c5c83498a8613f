"""How PPO's experience is made, as steps with explicit inputs:

1. :func:`rlhfkit.plugins.engines.sampling.sample`: prompts -> a :class:`rlhfkit.Rollout`
   (the engine samples; its log-probs ride along as ``engine_logprobs``);
2. :func:`policy_logprobs` / :func:`reference_logprobs`: the trainer's forwards over the
   rows that need them (none are wasted: see :class:`Needs`);
3. :func:`score`: the reward source's scores;
4. :func:`shape`: constraints shape the rewards, the score goes on the last token, the
   estimator computes advantages -> an :class:`Experience` (the rollout, its metrics,
   whether to skip the updates, warnings).

:class:`ExperienceMaker` runs them for one iteration on every rank (each its share of the
prompts, then gathered). It holds the parts it needs and nothing else, so any step can
be run and tested alone and the engine is swappable; the PPO module owns one.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rlhfkit import NonFiniteError, Rollout, masked_whiten, provides, score_rows
from rlhfkit.plugins.engines.sampling import sample
from rlhfkit.plugins.ppo import PPOConfig, schedule
from rlhfkit.plugins.ppo.dynamic import PROMPT_INDEX, groups_of, sample_dynamic
from rlhfkit.plugins.ppo.functional import score_to_token_rewards
from rlhfkit.plugins.ppo.monitor import guardrail_warnings, rollout_metrics
from rlhfkit.plugins.ppo.rollout import concat, gather, response_logprobs

#: The seeds of the samples of one prompt are this far apart (a prime).
SAMPLE_STRIDE = 1_000_003


def reads(component: Any, flag: str) -> bool:
    """Whether ``component`` declares it reads what ``flag`` names (``needs_reference``,
    ``needs_old_logprobs``); a component that does not say is taken to read it, so a
    plugin written before the flags existed still gets every forward."""
    value = getattr(component, flag, None)
    return True if value is None else bool(value)


@dataclass(frozen=True)
class Needs:
    """Which trainer forwards an iteration runs besides the updates.

    ``reference``: score the reference (a component reads ``ref_logprobs``, or
    ``kl_metric``). ``old_logprobs``: compute the policy's log-probs when sampling for
    every row (a component reads them before the updates); otherwise the rows of the
    iteration's first minibatch take theirs from its update's forward, which runs on
    the same weights, and only the other rows (later minibatches) are scored at rollout
    time: none at all with one update per iteration (exactly on-policy)."""

    reference: bool
    old_logprobs: bool

    @classmethod
    def of(cls, config: PPOConfig, parts: Sequence[Any], objective: Any) -> Needs:
        reference = config.kl_metric or any(reads(p, "needs_reference") for p in [*parts, objective])
        return cls(reference=reference, old_logprobs=any(reads(p, "needs_old_logprobs") for p in parts))


@dataclass
class Experience:
    """One iteration's experience: the shaped rollout (``advantages``, ``returns``),
    its metrics, whether its updates are skipped (a NaN/Inf score under ``on_nan:
    skip``) and the guardrail warnings ``(kind, message)`` it raised. ``deferred``: the
    rows whose old log-probs the first update fills in (empty when all are computed)."""

    rollout: Rollout
    metrics: dict[str, float]
    skip: bool = False
    warnings: list[tuple[str, str]] = field(default_factory=list)
    deferred: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))


# ------------------------------------------------------------------ the steps
@torch.no_grad()
def policy_logprobs(model: torch.nn.Module, rollout: Rollout, temperature: float,
                    rows: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, T]`` the trainer's log-probs of the sampled tokens, for ``rows`` only (a
    bool ``[B]``; ``None``: all); other rows keep ``rollout.logprobs``."""
    if rows is None or bool(rows.all()):
        return response_logprobs(model, rollout, temperature)
    out = rollout.logprobs.clone()
    if rows.any():
        index = rows.nonzero()[:, 0]
        out[index] = response_logprobs(model, rollout.select(index), temperature).to(out.dtype)
    return out


@torch.no_grad()
def reference_logprobs(reference: torch.nn.Module | None, model: torch.nn.Module, rollout: Rollout,
                       temperature: float) -> torch.Tensor:
    """``[B, T]`` reference log-probs: ``reference``'s, or (``None``, LoRA) the policy's
    ``model`` with its adapter off."""
    if reference is None:
        with model.disable_adapter():
            return response_logprobs(model, rollout, temperature)
    return response_logprobs(reference, rollout, temperature)


@torch.no_grad()
def score(reward: Any, rollout: Rollout, device: torch.device) -> torch.Tensor:
    """``[B]`` float scores of the reward source (reading the rows' columns)."""
    return score_rows(reward, rollout.prompts, rollout.responses, rollout.fields).to(device).float()


def shape(rollout: Rollout, *, constraints: Sequence[Any], estimator: Any, config: PPOConfig, gold: Any,
          on_nan: str, iteration: int, step: int, trainer_logprobs: bool = True) -> Experience:
    """Constraints shape rewards, the score goes on the last token, the estimator runs.

    A NaN/Inf score stops (``on_nan: stop``) or gives an experience whose updates are
    skipped, seen by no constraint. ``trainer_logprobs``: whether ``rollout.logprobs``
    are the trainer's for every row (else the metrics that read them use the engine's)."""
    raw = rollout.scores.clone()
    bad = ~torch.isfinite(raw)
    if bad.any():
        example = rollout.prompts[int(bad.nonzero()[0])]
        message = (f"the reward source returned NaN/Inf for {int(bad.sum())} of {len(raw)} responses at "
                   f"iteration {iteration} (first prompt: {example!r}).")
        if on_nan == "stop":
            raise NonFiniteError("the reward source's scores", step + 1, message.rstrip("."))
        rollout.scores = torch.zeros_like(raw)
        rollout.rewards = torch.zeros_like(rollout.logprobs)
        rollout.advantages = torch.zeros_like(rollout.logprobs)
        rollout.returns = rollout.values if rollout.values is not None else torch.zeros_like(rollout.logprobs)
        warning = ("nan-reward", message + " Skipping this iteration's updates (trainer.on_nan: skip).")
        return Experience(rollout, {"reward/nonfinite": float(bad.sum())}, skip=True, warnings=[warning])
    metrics: dict[str, float] = {}
    mask = rollout.response_mask.float()
    rollout.rewards = torch.zeros_like(rollout.logprobs)
    for constraint in constraints:
        if provides(constraint, "shape_rewards"):
            metrics.update(constraint.shape_rewards(rollout) or {})
    rollout.rewards = rollout.rewards + score_to_token_rewards(rollout.scores, mask, config.score_position)
    if config.score_position == "after-eos":
        # the score sits one past the last real token: the estimator's episode covers it (TRL's mask_p1)
        extended = torch.cat([mask[:, :1], mask[:, :-1]], dim=1).maximum(mask)
        result = estimator.estimate(dataclasses.replace(rollout, response_mask=extended.long()))
    else:
        result = estimator.estimate(rollout)
    advantages = result.advantages
    if config.advantages.whiten == "batch":
        advantages = masked_whiten(advantages, mask)
    if config.advantages.clip is not None and config.advantages.whiten != "minibatch":
        advantages = advantages.clamp(-config.advantages.clip, config.advantages.clip)
    rollout.advantages, rollout.returns = advantages * mask, result.returns
    metrics.update(result.metrics)
    observed = rollout if trainer_logprobs or rollout.engine_logprobs is None else dataclasses.replace(
        rollout, logprobs=rollout.engine_logprobs)
    metrics.update(rollout_metrics(observed, raw, gold))
    warnings = guardrail_warnings(rollout.responses, metrics.get("kl/ref"), mask.sum(1))
    return Experience(rollout, metrics, warnings=warnings)


# ------------------------------------------------------------------ one iteration
@dataclass
class ExperienceMaker:
    """Everything an iteration's experience is made from, and nothing else.

    ``reference`` is the frozen reference model, ``None`` when it is the policy with its
    LoRA adapter off; ``prepare`` is the estimator's (called on the local rollout before
    gathering, e.g. critic values). Seeds: row ``j`` of prompt ``p`` (global index in the
    iteration) at iteration ``i`` gets ``seed * 7919 + i * 104729 + p + j * SAMPLE_STRIDE``,
    so a sample does not depend on the number of devices or on how prompts are batched
    (with ``hf``, a call is seeded by its first row: see ``generation_batch_size``).
    """

    policy: Any
    engine: Any
    reference: torch.nn.Module | None
    reward: Any
    estimator: Any
    constraints: Sequence[Any]
    objective: Any
    gold: Any
    config: PPOConfig
    seed: int
    sampler: Any = None
    needs: Needs = field(init=False)
    clock: dict[str, float] = field(default_factory=lambda: {"rollout": 0.0, "rollout_tokens": 0})

    def __post_init__(self) -> None:
        self.needs = Needs.of(self.config, [self.estimator, *self.constraints], self.objective)

    def seeds(self, iteration: int, first_prompt: int, prompts: int) -> list[int]:
        base = self.seed * 7919 + iteration * 104_729 + first_prompt
        return [base + p + j * SAMPLE_STRIDE for p in range(prompts) for j in range(self.config.samples_per_prompt)]

    def draw(self, num_prompts: int, iteration: int, round_: int) -> list[int]:
        """The iteration's prompts (round ``round_`` of dynamic sampling): the sampler's,
        or seeded passes over the prompts."""
        if self.sampler is not None:
            return list(self.sampler.draw(iteration, self.config.prompts_per_iteration, round_))
        return schedule.round_prompts(num_prompts, self.config.prompts_per_iteration, self.seed, iteration, round_)

    def deferred_rows(self, total: int, batch_size: int, iteration: int, first_update: bool) -> torch.Tensor:
        """Global rows whose old log-probs the first update's forward gives (sorted)."""
        if self.needs.old_logprobs or not first_update:
            return torch.zeros(0, dtype=torch.long)
        whole, _ = schedule.minibatch(total, batch_size, self.seed, iteration, 0, 0, 1)
        return whole.sort().values

    def make(self, iteration: int, prompts: Sequence[Any], fields: Sequence[dict[str, Any]], *, rank: int,
             world: int, batch_size: int, device: torch.device, on_nan: str, step: int,
             first_update: bool = True, prepare: Callable[[Rollout], None] | None = None) -> Experience:
        """The iteration's experience on every rank: this rank samples and scores its
        share of the prompts, then every rank holds the gathered, shaped whole."""
        c = self.config
        started = time.perf_counter()
        chosen = self.draw(len(prompts), iteration, 0)
        share = len(chosen) // world
        local = chosen[rank * share:(rank + 1) * share]
        total = len(chosen) * c.samples_per_prompt
        deferred = self.deferred_rows(total, batch_size, iteration, first_update)
        needed = torch.ones(total, dtype=torch.bool)
        needed[deferred] = False
        pad = self.policy.tokenizer.pad_token_id
        if c.dynamic_sampling is None:
            rollout = self._sample(iteration, prompts, fields, local, rank * share, needed, device)
            extra: dict[str, Any] = {}
        else:
            rollout, extra = sample_dynamic(self, iteration, prompts, fields, rank, share, needed, device)
        if prepare is not None:
            prepare(rollout)
        rollout = gather(rollout, pad, device)
        # every group drawn, with its prompt and raw scores: what a sampler learns from
        drawn = extra.pop("drawn", None)
        if drawn is None and self.sampler is not None:
            drawn = groups_of(rollout, c.samples_per_prompt)
        self.clock["rollout"] += time.perf_counter() - started
        tokens = int(rollout.response_mask.sum())
        self.clock["rollout_tokens"] += tokens
        experience = shape(rollout, constraints=self.constraints, estimator=self.estimator, config=c,
                           gold=self.gold, on_nan=on_nan, iteration=iteration, step=step,
                           trainer_logprobs=len(deferred) == 0)
        experience.deferred = deferred
        # every token the engine produced, kept or not (the compute budget of a comparison)
        experience.metrics["rollout/sampled_tokens"] = extra.pop("sampled_tokens", float(tokens))
        experience.metrics.update(extra)
        if self.sampler is not None:
            indices, scores = drawn
            experience.metrics.update(self.sampler.observe(indices, scores))
        return experience

    def _sample(self, iteration: int, prompts: Sequence[Any], fields: Sequence[dict[str, Any]], local: list[int],
                offset: int, needed: torch.Tensor, device: torch.device) -> Rollout:
        """This rank's rollout of the prompts ``local`` (global positions from ``offset``):
        sampled in calls of ``generation_batch_size`` prompts, each call's trainer forwards
        run on it (old log-probs of the ``needed`` rows, the reference), then scored."""
        c = self.config
        per_call = c.generation_batch_size or len(local)
        chunks = []
        for start in range(0, len(local), per_call):
            indices = local[start:start + per_call]
            first = offset + start  # global index of the call's first prompt
            chunk = self.sample_groups(iteration, prompts, fields, indices, first, first, device)
            rows = torch.arange(first * c.samples_per_prompt, (first + len(indices)) * c.samples_per_prompt)
            self.forwards(chunk, needed[rows])
            chunks.append(chunk)
        rollout = concat(chunks, self.policy.tokenizer.pad_token_id)
        rollout.scores = self.score(rollout, device)
        return rollout

    def score(self, rollout: Rollout, device: torch.device) -> torch.Tensor:
        """``[B]`` the reward source's scores of ``rollout``."""
        return score(self.reward, rollout, device)

    def sample_groups(self, iteration: int, prompts: Sequence[Any], fields: Sequence[dict[str, Any]], indices: list[int],
              seed_index: int, group_index: int, device: torch.device) -> Rollout:
        """``samples_per_prompt`` responses to each prompt of ``indices``, seeded from
        global prompt position ``seed_index``, groups numbered from ``group_index``."""
        c = self.config
        texts = [prompts[i] for i in indices for _ in range(c.samples_per_prompt)]
        chunk = sample(self.policy, self.engine, texts, self.seeds(iteration, seed_index, len(indices)), c.sampling,
                       c.max_prompt_length)
        chunk.fields = [fields[i] for i in indices for _ in range(c.samples_per_prompt)]
        chunk.group = torch.arange(group_index, group_index + len(indices), device=device).repeat_interleave(
            c.samples_per_prompt)
        chunk.extras[PROMPT_INDEX] = torch.tensor(indices, device=device).repeat_interleave(c.samples_per_prompt)
        return chunk

    def forwards(self, rollout: Rollout, needed: torch.Tensor) -> None:
        """The trainer's forwards over ``rollout``: old log-probs of the ``needed`` rows
        (bool ``[B]``), and the reference's when something reads them."""
        temperature = self.config.sampling.temperature
        rollout.logprobs = policy_logprobs(self.policy.model, rollout, temperature,
                                           needed.to(rollout.logprobs.device))
        if self.needs.reference:
            rollout.ref_logprobs = reference_logprobs(self.reference, self.policy.model, rollout, temperature)

    @torch.no_grad()
    def greedy_scores(self, rollout: Rollout, device: torch.device) -> torch.Tensor:
        """``[B]`` reward-source scores of greedy responses to ``rollout.prompts`` (the
        ReMax baseline)."""
        per_call = self.config.generation_batch_size or len(rollout)
        responses: list[str] = []
        for start in range(0, len(rollout), per_call):
            prompts = rollout.prompts[start:start + per_call]
            seeds = [self.seed + start + i for i in range(len(prompts))]
            responses += sample(self.policy, self.engine, prompts, seeds, self.config.sampling,
                                self.config.max_prompt_length, greedy=True).responses
        return score_rows(self.reward, rollout.prompts, responses, rollout.fields).to(device).float()
