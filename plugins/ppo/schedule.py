"""How a PPO stage is laid out in steps: iterations, updates, which prompts an iteration
samples and which responses each minibatch trains on. Every choice is a function of
the seed and the step, so a resumed run and any number of devices see the same batches."""

from __future__ import annotations

import math
import random

import torch

from rlhfkit import TrainerSection, UserError
from rlhfkit.plugins.ppo import PPOConfig


def plan(config: PPOConfig, section: TrainerSection, num_prompts: int) -> tuple[int, int]:
    """``(updates per iteration, iterations)``, the batch sizes checked against each other."""
    rollouts = config.prompts_per_iteration * config.samples_per_prompt
    problems = []
    if config.prompts_per_iteration % section.world_size:
        problems.append(f"algorithm.prompts_per_iteration {config.prompts_per_iteration} is not a multiple of the "
                        f"{section.world_size} devices")
    if rollouts % section.batch_size:
        problems.append(f"the {rollouts} responses of an iteration (prompts_per_iteration x samples_per_prompt) "
                        f"do not split into minibatches of trainer.batch_size {section.batch_size}; pick a "
                        f"batch_size that divides {rollouts}")
    if problems:
        raise UserError("; ".join(problems))
    updates = config.epochs * rollouts // section.batch_size
    if config.iterations is not None:
        return updates, config.iterations
    if section.max_steps is not None:
        if section.max_steps % updates:
            raise UserError(f"trainer.max_steps {section.max_steps} counts optimizer steps, and an iteration is "
                            f"{updates} of them (epochs x responses / batch_size); use a multiple of {updates} or "
                            f"set algorithm.iterations")
        return updates, section.max_steps // updates
    epochs = section.max_epochs if section.max_epochs is not None else 1.0
    return updates, max(1, math.ceil(epochs * num_prompts / config.prompts_per_iteration))


def iteration_prompts(num_prompts: int, per_iteration: int, seed: int, iteration: int) -> list[int]:
    """Global prompt indices of an iteration: consecutive passes over seeded permutations."""
    out: list[int] = []
    position = iteration * per_iteration
    while len(out) < per_iteration:
        epoch, offset = divmod(position, num_prompts)
        order = list(range(num_prompts))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        take = order[offset: offset + per_iteration - len(out)]
        out += take
        position += len(take)
    return out


#: Round ``r`` of dynamic sampling orders the prompts with the seed ``seed + r * this``.
ROUND_SEED_STRIDE = 65_537


def round_prompts(num_prompts: int, per_iteration: int, seed: int, iteration: int, round_: int = 0) -> list[int]:
    """:func:`iteration_prompts` of round ``round_`` (dynamic sampling draws again)."""
    return iteration_prompts(num_prompts, per_iteration, seed + ROUND_SEED_STRIDE * round_, iteration)


def minibatch(num_responses: int, batch_size: int, seed: int, iteration: int, update: int, rank: int,
              world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the global minibatch ``update`` of an iteration (each epoch reshuffles
    the experience) and this rank's contiguous slice of it."""
    epoch, index = divmod(update, num_responses // batch_size)
    order = torch.randperm(num_responses, generator=torch.Generator().manual_seed(
        seed * 1_000_003 + iteration * 1009 + epoch))
    batch = order[index * batch_size:(index + 1) * batch_size]
    share = batch_size // world
    return batch, batch[rank * share:(rank + 1) * share]
