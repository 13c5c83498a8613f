"""DAPO's dynamic sampling for :class:`rlhfkit.plugins.ppo.experience.ExperienceMaker`:
rounds of prompts until the iteration holds enough groups whose scores differ
(docs/ppo-details.md, "DAPO and GSPO")."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from rlhfkit import Rollout
from rlhfkit.plugins.ppo.rollout import concat

if TYPE_CHECKING:
    from rlhfkit.plugins.ppo.experience import ExperienceMaker

#: ``Rollout.extras`` key: each row's prompt, as an index into the stage's prompt rows.
PROMPT_INDEX = "prompt_index"


def groups_of(rollout: Rollout, per_group: int) -> tuple[list[int], torch.Tensor]:
    """``(prompt index per group, scores [groups, per_group])`` of a rollout whose groups
    are consecutive rows."""
    indices = rollout.extras[PROMPT_INDEX][::per_group].tolist()
    return indices, rollout.scores.detach().float().cpu().view(len(indices), per_group)


def gather_objects(items: list[Any]) -> list[Any]:
    """Every rank's ``items``, concatenated in rank order (one process: as they are)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return items
    parts: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def reduce_sum(counts: dict[str, float], device: torch.device) -> dict[str, float]:
    """``counts`` summed over ranks (one process: as they are), with ``ranks``."""
    values = torch.tensor([*counts.values(), 1.0], dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(values)
    return dict(zip([*counts, "ranks"], values.tolist(), strict=True))


def sample_dynamic(maker: ExperienceMaker, iteration: int, prompts: Sequence[Any], fields: Sequence[dict[str, Any]], rank: int,
                    share: int, needed: torch.Tensor, device: torch.device) -> tuple[Rollout, dict[str, float]]:
    """DAPO's dynamic sampling on this rank: rounds of ``share`` prompts (round ``r``
    draws from the seeded prompt order of seed + r), each group scored as it comes;
    groups whose scores span more than the tolerance are kept (a NaN score counts as
    spread, so ``on_nan`` still sees it) until ``share`` are, for at most
    ``max_rounds`` rounds, then the most recent uninformative groups fill what is
    missing. The trainer's forwards run on the kept rollout only."""
    c, settings = maker.config, maker.config.dynamic_sampling
    per_group = c.samples_per_prompt
    kept: list[Rollout] = []
    spare: list[Rollout] = []
    counts = {"drawn": 0.0, "informative": 0.0, "sampled_tokens": 0.0, "rounds": 0.0}
    observed: list[tuple[int, list[float]]] = []
    for round_ in range(settings.max_rounds):
        counts["rounds"] += 1
        chosen = maker.draw(len(prompts), iteration, round_)
        local = chosen[rank * share:(rank + 1) * share]
        per_call = c.generation_batch_size or len(local)
        for start in range(0, len(local), per_call):
            indices = local[start:start + per_call]
            first = rank * share + start
            chunk = maker.sample_groups(iteration, prompts, fields, indices, first + round_ * c.prompts_per_iteration,
                               0, device)
            chunk.scores = maker.score(chunk, device)
            counts["sampled_tokens"] += float(chunk.response_mask.sum())
            spread = chunk.scores.view(len(indices), per_group)
            spread = spread.max(dim=1).values - spread.min(dim=1).values
            observed += [(i, row) for i, row in zip(indices, chunk.scores.view(len(indices), per_group).tolist(),
                                                     strict=True)]
            for g in range(len(indices)):
                group = chunk.select(torch.arange(g * per_group, (g + 1) * per_group))
                counts["drawn"] += 1
                if bool(spread[g] <= settings.tolerance):
                    spare.append(group)
                else:
                    counts["informative"] += 1
                    kept.append(group)
        if len(kept) >= share:
            break
    missing = max(0, share - len(kept))
    groups = kept[:share] + spare[len(spare) - missing:]
    rollout = concat(groups, maker.policy.tokenizer.pad_token_id)
    rollout.group = torch.arange(rank * share, (rank + 1) * share, device=device).repeat_interleave(per_group)
    first_row = rank * share * per_group
    per_call = (c.generation_batch_size or share) * per_group
    if per_call >= len(rollout):
        maker.forwards(rollout, needed[first_row:first_row + len(rollout)])
    else:
        parts = []
        for start in range(0, len(rollout), per_call):
            part = rollout.select(torch.arange(start, min(start + per_call, len(rollout))))
            maker.forwards(part, needed[first_row + start:first_row + start + len(part)])
            parts.append(part)
        rollout = concat(parts, maker.policy.tokenizer.pad_token_id)
    counts["filled"] = float(missing)
    totals = reduce_sum(counts, device)
    metrics = {"dynamic/rounds": totals["rounds"] / max(1, totals["ranks"]),
               "dynamic/drawn_groups": totals["drawn"],
               "dynamic/informative_fraction": totals["informative"] / max(1.0, totals["drawn"]),
               "dynamic/filled_groups": totals["filled"],
               "sampled_tokens": totals["sampled_tokens"]}
    if maker.sampler is not None:
        observed = gather_objects(observed)
        metrics["drawn"] = ([i for i, _ in observed], torch.tensor([row for _, row in observed]))
    return rollout, metrics

