"""What the ``dpo`` algorithm measures: implicit-reward metrics of preference pairs (in
training steps and on held-out pairs), the gold score of greedy answers to held-out
prompts, and the sample answers saved before and after training. Unpaired rows are
measured in ``unpaired.py``."""

from __future__ import annotations

from typing import Any

import torch

from rlhfkit import Feedback, PreferenceBatch, provides
from rlhfkit.files import write_samples as write_rows
from rlhfkit.plugins.dpo import unpaired
from rlhfkit.plugins.dpo.logps import sequence_logps


@torch.no_grad()
def pair_metrics(batch: PreferenceBatch) -> dict[str, torch.Tensor]:
    """Implicit rewards ``log π − log ref`` (SimPO/ORPO: mean token log-probs)."""
    if batch.ref_chosen is not None:
        chosen = batch.chosen - batch.ref_chosen
        rejected = batch.rejected - batch.ref_rejected
    else:
        chosen = batch.chosen / batch.chosen_tokens.clamp(min=1)
        rejected = batch.rejected / batch.rejected_tokens.clamp(min=1)
    out = {"rewards/accuracy": (chosen > rejected).float().mean(),
           "rewards/margin": (chosen - rejected).mean(),
           "rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
           "logps/chosen": batch.chosen.mean(), "logps/rejected": batch.rejected.mean()}
    if batch.ref_chosen is not None:  # sequence log-ratio to the reference on the data (k1)
        out["kl/implicit"] = ((batch.chosen - batch.ref_chosen).mean()
                              + (batch.rejected - batch.ref_rejected).mean()) / 2
    return out


@torch.no_grad()
def evaluate(module: Any) -> dict[str, float]:
    """Held-out metrics of the module's ``eval_rows`` (pairs or unpaired rows) and the gold
    score of its greedy answers to ``eval_prompts``."""
    metrics: dict[str, float] = {}
    if module.eval_rows and isinstance(module.eval_rows[0], Feedback):
        metrics.update(unpaired.evaluate(module, module.eval_rows))
    elif module.eval_rows:
        metrics.update(_held_out_pairs(module))
    if module.eval_prompts and module.gold is not None:
        responses = answers(module, module.eval_prompts)
        metrics["gold"] = float(module.gold.score(module.eval_prompts, responses).mean())
        if provides(module.gold, "evaluate"):
            task = module.gold.evaluate(module.eval_prompts, responses)
            metrics.update({f"task/{k}": v for k, v in task.items() if k != "gold"})
    return metrics


def _held_out_pairs(module: Any) -> dict[str, float]:
    was = module.model.training
    module.model.eval()
    sums: dict[str, float] = {}
    size = module.config.eval_batch_size
    for start in range(0, len(module.eval_rows), size):
        rows = module.eval_rows[start:start + size]
        batch = {k: v.to(module.device) for k, v in module.encode(rows).items()}
        logps, tokens = sequence_logps(module.model, batch)
        b = len(rows)
        preference = PreferenceBatch(logps[:b], logps[b:], tokens[:b], tokens[b:])
        if module.needs_reference and module.precomputed_eval is not None:
            ref = module.precomputed_eval[start:start + b].to(module.device)
            preference.ref_chosen, preference.ref_rejected = ref[:, 0], ref[:, 1]
        elif module.needs_reference:
            ref = module._reference_logps(batch)
            preference.ref_chosen, preference.ref_rejected = ref[:b], ref[b:]
        for name, value in pair_metrics(preference).items():
            sums[name] = sums.get(name, 0.0) + float(value) * b
    module.model.train(was)
    return {name: value / len(module.eval_rows) for name, value in sums.items()}


def answers(module: Any, prompts: list[str]) -> list[str]:
    """Greedy answers of the policy, ``eval_batch_size`` prompts at a time."""
    out: list[str] = []
    size = module.config.eval_batch_size
    for start in range(0, len(prompts), size):
        out += module.policy.generate(prompts[start:start + size], max_new_tokens=module.config.max_new_tokens,
                                      do_sample=False)
    return out


def write_samples(module: Any, when: str) -> None:
    """Answers to the first ``sample_prompts`` held-out prompts, to ``samples.jsonl``."""
    prompts = module.eval_prompts[: module.config.sample_prompts]
    if not prompts or not module.trainer.is_global_zero:
        return
    rows = [{"when": when, "prompt": p, "response": r} for p, r in zip(prompts, answers(module, prompts), strict=True)]
    write_rows(module.stage_dir / "samples.jsonl", when, rows)
