"""How PPO's experience is made: sample responses to this iteration's prompts (every rank
its share), score them, gather the rollout on every rank, let constraints shape the
rewards and the estimator compute advantages. Functions of the ``PPO`` module."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from rlhfkit import NonFiniteError, Rollout, masked_whiten, provides, score_rows
from rlhfkit.plugins.ppo import schedule
from rlhfkit.plugins.ppo.functional import score_to_token_rewards
from rlhfkit.plugins.ppo.monitor import guardrail_warnings, rollout_metrics
from rlhfkit.plugins.ppo.rollout import concat, gather, response_logprobs


@torch.no_grad()
def sample(module: Any, prompts: list[Any], seed: int, greedy: bool = False) -> Rollout:
    """Responses to ``prompts`` (seeded), with the policy's and the reference's log-probs."""
    sampling = module.config.sampling
    torch.manual_seed(seed)
    ids, mask = module.policy.tokenize_prompts(prompts)
    ids, mask = ids[:, -module.config.max_prompt_length:], mask[:, -module.config.max_prompt_length:]
    response_ids, response_mask = module.policy.generate_ids(
        ids, mask, max_new_tokens=sampling.max_new_tokens, do_sample=not greedy,
        temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    eos = module.policy.tokenizer.eos_token_id
    truncated = ~(response_ids == eos).any(dim=1)
    empty = torch.zeros(len(prompts), response_ids.shape[1], device=ids.device)
    rollout = Rollout(ids, mask, response_ids, response_mask, empty, list(prompts),
                      module.policy.decode_responses(response_ids, response_mask),
                      torch.zeros(len(prompts), dtype=torch.long, device=ids.device), truncated)
    rollout.logprobs = response_logprobs(module.model, rollout, sampling.temperature)
    rollout.ref_logprobs = reference_logprobs(module, rollout)
    return rollout


def reference_logprobs(module: Any, rollout: Rollout) -> torch.Tensor:
    """``[B, T]`` reference log-probs (the policy with its adapter off, under LoRA)."""
    temperature = module.config.sampling.temperature
    if module.adapter_reference:
        with module.model.disable_adapter():
            return response_logprobs(module.model, rollout, temperature)
    return response_logprobs(module.reference, rollout, temperature)


@torch.no_grad()
def greedy_scores(module: Any, rollout: Rollout) -> torch.Tensor:
    """``[B]`` reward-source scores of greedy responses to ``rollout.prompts`` (the
    ReMax baseline), on the device; call it from an estimator's ``prepare``."""
    parts = []
    for start in range(0, len(rollout), module.config.generation_batch_size):
        prompts = rollout.prompts[start:start + module.config.generation_batch_size]
        parts.append(sample(module, prompts, seed=module.seed, greedy=True).responses)
    responses = [r for part in parts for r in part]
    return score_rows(module.reward, rollout.prompts, responses, rollout.fields).to(module.device).float()


def make_experience(module: Any, iteration: int) -> Rollout:
    """The iteration's rollout: this rank samples and scores its share of the prompts,
    then every rank holds the gathered whole, shaped (:func:`shape`)."""
    c = module.config
    started = time.perf_counter()
    rank, world = module.global_rank, module.trainer.world_size
    chosen = schedule.iteration_prompts(len(module.prompts), c.prompts_per_iteration, module.seed, iteration)
    share = len(chosen) // world
    local = chosen[rank * share:(rank + 1) * share]
    chunks = []
    for start in range(0, len(local), c.generation_batch_size):
        indices = local[start:start + c.generation_batch_size]
        # seeded by the call's first global prompt: the same calls give the same samples whatever
        # the device count, when generation_batch_size divides each device's share of the prompts
        first = rank * share + start
        texts = [module.prompts[i] for i in indices for _ in range(c.samples_per_prompt)]
        chunk = sample(module, texts, seed=module.seed * 7919 + iteration * 104_729 + first)
        chunk.fields = [module.prompt_fields[i] for i in indices for _ in range(c.samples_per_prompt)]
        chunk.group = torch.tensor([rank * share + start + j for j in range(len(indices))
                                    for _ in range(c.samples_per_prompt)], device=module.device)
        chunks.append(chunk)
    pad = module.policy.tokenizer.pad_token_id
    rollout = concat(chunks, pad)
    with torch.no_grad():
        rollout.scores = score_rows(module.reward, rollout.prompts, rollout.responses,
                                    rollout.fields).to(module.device).float()
        if provides(module.estimator, "prepare"):
            module.estimator.prepare(rollout)
    rollout = gather(rollout, pad, module.device)
    module._clock["rollout"] += time.perf_counter() - started
    module._clock["rollout_tokens"] += int(rollout.response_mask.sum())
    return shape(module, rollout, iteration)


def shape(module: Any, rollout: Rollout, iteration: int) -> Rollout:
    """Constraints shape rewards, the score goes on the last token, the estimator runs."""
    metrics: dict[str, float] = {}
    raw = rollout.scores.clone()
    bad = ~torch.isfinite(raw)
    module.skip_iteration = False
    if bad.any():
        example = rollout.prompts[int(bad.nonzero()[0])]
        message = (f"the reward source returned NaN/Inf for {int(bad.sum())} of {len(raw)} responses at "
                   f"iteration {iteration} (first prompt: {example!r}).")
        if module.on_nan == "stop":
            raise NonFiniteError("the reward source's scores", module.global_step + 1, message.rstrip("."))
        module._warn("nan-reward", message + " Skipping this iteration's updates (trainer.on_nan: skip).")
        module.skip_iteration = True
        # nothing learns from this rollout: no constraint state (running moments) sees it
        rollout.scores = torch.zeros_like(raw)
        rollout.rewards = torch.zeros_like(rollout.logprobs)
        rollout.advantages = torch.zeros_like(rollout.logprobs)
        rollout.returns = rollout.values if rollout.values is not None else torch.zeros_like(rollout.logprobs)
        module._rollout_log = {"reward/nonfinite": float(bad.sum())}
        return rollout
    mask = rollout.response_mask.float()
    rollout.rewards = torch.zeros_like(rollout.logprobs)
    for constraint in module.constraints:
        if provides(constraint, "shape_rewards"):
            metrics.update(constraint.shape_rewards(rollout) or {})
    rollout.rewards = rollout.rewards + score_to_token_rewards(rollout.scores, mask, module.config.score_position)
    if module.config.score_position == "after-eos":
        # the score sits one past the last real token: the estimator's episode covers it (TRL's mask_p1)
        extended = torch.cat([mask[:, :1], mask[:, :-1]], dim=1).maximum(mask)
        result = module.estimator.estimate(dataclasses.replace(rollout, response_mask=extended.long()))
    else:
        result = module.estimator.estimate(rollout)
    advantages = result.advantages
    if module.config.advantages.whiten == "batch":
        advantages = masked_whiten(advantages, mask)
    if module.config.advantages.clip is not None and module.config.advantages.whiten != "minibatch":
        advantages = advantages.clamp(-module.config.advantages.clip, module.config.advantages.clip)
    rollout.advantages, rollout.returns = advantages * mask, result.returns
    metrics.update(result.metrics)
    metrics.update(rollout_metrics(rollout, raw, module.gold))
    for kind, message in guardrail_warnings(rollout.responses, metrics["kl/ref"], mask.sum(1)):
        module._warn(kind, message)
    module._rollout_log = metrics
    return rollout
