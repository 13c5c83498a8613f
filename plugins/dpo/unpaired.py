"""Unpaired rows in the ``dpo`` algorithm: KTO on :class:`rlhfkit.Feedback` rows (prompt,
completion, desirable or not), with as many desirable rows as the data happens to hold.

Every training row has a fixed partner, the next row of a permutation seeded by the run's
seed: the row's prompt with the partner's completion is its *mismatched pair*. KTO's
reference point ``z0`` is the clamped mean policy-vs-reference log-ratio of the mismatched
pairs of every row of the optimizer step (on every device), so each micro-batch of a step
uses the same ``z0`` (spec §G). Fixed partners let the reference's log-probs of the
mismatched pairs be precomputed with those of the completions (TRL builds its KL dataset
the same way).
"""

from __future__ import annotations

from typing import Any

import torch

from rlhfkit import Feedback, FeedbackBatch, UserError, encode_pairs, gradient_sync, micro_batches
from rlhfkit.plugins.dpo import losses
from rlhfkit.plugins.dpo.logps import sequence_logps

#: the key under which a step's mean objective loss reaches the NaN guard (not logged)
LOSS_KEY = "_loss"

_PARTS = ("input_ids", "attention_mask", "labels_mask")


def check_objective(objective: Any, name: str) -> None:
    """Refuse an objective that needs pairs, saying what it needs and how to go on."""
    if not getattr(objective, "accepts_unpaired", False):
        raise UserError(
            f"the {name} objective compares a chosen and a rejected response of one prompt, so it needs "
            f"preference pairs (prompt, chosen, rejected), but `data:` holds unpaired Feedback rows (prompt, "
            f"completion, desirable). Train them with `objective: kto`, or point `data:` at pairs (the built-in "
            f"tasks' `preference` split, or a file with schema: preference).")


def partners(n: int, seed: int) -> list[int]:
    """``partner[i]``: the row whose completion row ``i``'s prompt is paired with, the next
    one in a seeded permutation (so no row is its own partner when ``n > 1``)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    partner = [0] * n
    for position, row in enumerate(order):
        partner[row] = order[(position + 1) % n]
    return partner


def encode(module: Any, items: list[tuple[int, Feedback]], mismatched: bool = True) -> dict[str, torch.Tensor]:
    """``[B, L]`` completions, ``[B, L']`` mismatched pairs (keys prefixed ``mismatched_``),
    the ``[B]`` labels ``desirable`` and row indices ``index``."""
    index = [i for i, _ in items]
    prompts = [row.prompt for _, row in items]
    tokenizer, length = module.policy.tokenizer, module.config.max_length
    parts = {"": encode_pairs(tokenizer, prompts, [row.completion for _, row in items], length)}
    if mismatched:
        others = [module.rows[module.partners[i]].completion for i in index]
        parts["mismatched_"] = encode_pairs(tokenizer, prompts, others, length)
    return {**{prefix + k: torch.tensor(v) for prefix, part in parts.items() for k, v in part.items()},
            "desirable": torch.tensor([row.desirable for _, row in items]), "index": torch.tensor(index)}


def _part(batch: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k: batch[prefix + k] for k in _PARTS}


def backward(module: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The forward and backward passes of one optimizer step on unpaired rows; returns the
    step's metrics."""
    rows = batch["index"].shape[0]
    chunks = micro_batches(batch, module.section.micro_batch_size)
    table = module.precomputed  # [N, 2]: reference log-probs of each completion and mismatched pair
    # 1. z0's inputs: every row's mismatched pair under the policy and the reference (no grad),
    #    from every device
    with torch.no_grad():
        mismatched = torch.cat([sequence_logps(module.model, _part(c, "mismatched_"))[0] for c in chunks])
        ref_mismatched = (table[batch["index"].cpu(), 1].to(module.device) if table is not None else
                          torch.cat([module._reference_logps(_part(c, "mismatched_")) for c in chunks]))
    mismatched, ref_mismatched = (module.all_gather(x).flatten() for x in (mismatched, ref_mismatched))
    # 2. each micro-batch: the completions with grad, their reference log-probs, the loss; every
    #    row of the global batch weighs the same
    share = module.section.batch_size / module.trainer.world_size
    sums: dict[str, torch.Tensor] = {}
    rewards, logps_of = [], []
    for i, chunk in enumerate(chunks):
        n = chunk["index"].shape[0]
        completions = _part(chunk, "")
        with gradient_sync(module, last=i == len(chunks) - 1):
            logps, tokens = sequence_logps(module.model, completions)
            ref = (table[chunk["index"].cpu(), 0].to(module.device) if table is not None
                   else module._reference_logps(completions))
            term = module.objective(FeedbackBatch(logps, tokens, chunk["desirable"], ref, mismatched, ref_mismatched))
            module.manual_backward(term.loss * n / share)
        for name, value in {**term.metrics, LOSS_KEY: term.loss.detach()}.items():
            sums[name] = sums.get(name, 0.0) + torch.as_tensor(value).float() * n
        rewards.append(losses.log_ratio(logps, ref).detach().float())
        logps_of.append(logps.detach().float())
    # 3. the step's metrics, over the rows of every device (a device may hold no row of a kind)
    gathered = module.all_gather(torch.stack([torch.cat(rewards), torch.cat(logps_of), batch["desirable"].float()]))
    rewards_, logps_, desirable = gathered.reshape(-1, 3, rows).transpose(0, 1).reshape(3, -1)
    return {**{name: value / rows for name, value in sums.items()},
            **feedback_metrics(rewards_, logps_, desirable > 0), "kl/implicit": rewards_.mean()}


def feedback_metrics(rewards: torch.Tensor, logps: torch.Tensor, desirable: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean implicit rewards and log-probs ``[N]`` of the desirable and the undesirable rows
    (``desirable``: ``[N]`` bool); nan for a kind with no rows."""
    d = desirable.float()
    u = 1 - d
    reward_d, reward_u = (rewards * d).sum() / d.sum(), (rewards * u).sum() / u.sum()
    return {"rewards/desirable": reward_d, "rewards/undesirable": reward_u, "rewards/margin": reward_d - reward_u,
            "logps/desirable": (logps * d).sum() / d.sum(), "logps/undesirable": (logps * u).sum() / u.sum()}


def separation(rewards: torch.Tensor, desirable: torch.Tensor) -> torch.Tensor:
    """How well the implicit reward separates desirable from undesirable rows: the
    fraction of (desirable, undesirable) row pairs in which the desirable row has the
    higher reward, ties counting half (the ROC AUC; 0.5 is chance, nan when a kind has no
    rows). ``rewards``: ``[N]``, ``desirable``: ``[N]`` bool."""
    good, bad = rewards[desirable], rewards[~desirable].sort().values
    below = torch.searchsorted(bad, good, right=False)
    up_to = torch.searchsorted(bad, good, right=True)
    return (below + up_to).double().sum() / (2 * good.numel() * bad.numel())


def reference_table(module: Any, rows: list[Feedback], mismatched: bool) -> torch.Tensor:
    """``[N, 2]`` reference log-probs of each row's completion and mismatched pair (``[N,
    1]``, the completions only, when ``mismatched`` is false: held-out rows)."""
    out = []
    size = module.config.eval_batch_size
    for start in range(0, len(rows), size):
        items = list(enumerate(rows[start:start + size], start))
        batch = {k: v.to(module.device) for k, v in encode(module, items, mismatched).items()}
        columns = [module._reference_logps(_part(batch, prefix)) for prefix in ("", "mismatched_")[:1 + mismatched]]
        out.append(torch.stack(columns, dim=1).cpu())
    return torch.cat(out) if out else torch.zeros(0, 1 + mismatched)


@torch.no_grad()
def evaluate(module: Any, rows: list[Feedback]) -> dict[str, float]:
    """Implicit rewards of held-out unpaired rows by label, and how well they separate the
    labels (``rewards/auc``). Without a reference (SimPO, ORPO) the rewards are mean token
    log-probs."""
    was = module.model.training
    module.model.eval()
    rewards, logps_of = [], []
    size = module.config.eval_batch_size
    for start in range(0, len(rows), size):
        items = list(enumerate(rows[start:start + size], start))
        batch = {k: v.to(module.device) for k, v in encode(module, items, mismatched=False).items()}
        logps, tokens = sequence_logps(module.model, _part(batch, ""))
        if not module.needs_reference:
            rewards.append(logps / tokens.clamp(min=1))
        elif module.precomputed_eval is not None:
            rewards.append(losses.log_ratio(logps, module.precomputed_eval[start:start + len(items), 0].to(module.device)))
        else:
            rewards.append(losses.log_ratio(logps, module._reference_logps(_part(batch, ""))))
        logps_of.append(logps)
    module.model.train(was)
    desirable = torch.tensor([row.desirable for row in rows], device=module.device)
    rewards_ = torch.cat(rewards)
    metrics = {**feedback_metrics(rewards_, torch.cat(logps_of), desirable),
               "rewards/auc": separation(rewards_, desirable)}
    if module.needs_reference:
        metrics["kl/implicit"] = rewards_.mean()
    return {name: float(value) for name, value in metrics.items()}
