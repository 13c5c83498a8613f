"""docs/contracts.md, generated from the declarations (capabilities, slots, row kinds), so
the page cannot drift from what the registry checks: ``python -m rlhfkit.docgen``
rewrites it, and a test fails when it is out of date."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from rlhfkit.plugin_manager import load_plugins
from rlhfkit.registry import CAPABILITIES, NEUTRAL, PROMPTED, ROW_KINDS, Registry

#: Each capability: its call, what it reads and writes (shapes, masking) and the metrics it names.
CALLS: dict[tuple[str, str], tuple[str, str]] = {
    ("estimator", "estimate"): (
        "estimate(rollout: Rollout) -> Advantages",
        ("reads `rollout.rewards` `[B, T]` (each score already on its response's last real token, constraint "
        "shaping included), `response_mask` `[B, T]`, `group` `[B]` (samples of one prompt share it; groups "
        "need not be contiguous and may hold one sample), `values` `[B, T]` with a critic, `extras`; returns "
        "`advantages` `[B, T]` and, with a critic, `returns` `[B, T]`; padding may hold anything (NaN): select "
        "with `torch.where`, never multiply by the mask. Metrics: `advantage/raw_mean`, `advantage/raw_std` "
        "before any whitening, `group/*` for group statistics. Class attributes `needs_reference` and "
        "`needs_old_logprobs` (default True) say whether it reads `rollout.ref_logprobs` and `rollout.logprobs`; "
        "declared False, the algorithm skips those forwards when nothing else reads them")),
    ("estimator", "prepare"): (
        "prepare(rollout: Rollout) -> None",
        ("no grad, on the rank's share before gathering: fill `rollout.values` `[B, T]` or `rollout.extras[key]` "
        "`[B, ...]` (sliced and gathered with the rest)")),
    ("estimator", "critic_loss"): (
        "critic_loss(minibatch: Rollout) -> LossTerm",
        ("the value loss of a minibatch (with grad through `critic`), metrics `value/*`; only for an estimator "
        "whose `critic` is an `nn.Module` (with its `optimizer: OptimizerSettings`)")),
    ("estimator", "bind"): (
        "bind(algorithm) -> None",
        ("once before training; `algorithm` has `config`, `policy`, `model`, `reference`, `device`, `seed`, "
        "`global_rank`, `global_step` and (PPO) `greedy_scores(rollout)` (rlhfkit.testing.toy_algorithm)")),
    ("estimator", "state_dict"): ("state_dict() -> dict", "saved in the resumable checkpoint (plain types, tensors)"),
    ("estimator", "load_state_dict"): ("load_state_dict(state: dict) -> None", "on resume"),
    ("constraint", "shape_rewards"): (
        "shape_rewards(rollout: Rollout) -> dict[str, float] | None",
        ("in place, before the scores are placed on the last token: change `rollout.scores` `[B]` and/or "
        "`rollout.rewards` `[B, T]` (padding may hold NaN: select, do not multiply); return metrics. Class "
        "attributes `needs_reference` (reads `ref_logprobs`, here or in `loss`) and `needs_old_logprobs` (reads "
        "`rollout.logprobs` here or in `after_update`) default to True; declare False what you do not read")),
    ("constraint", "loss"): (
        "loss(minibatch: Rollout, output: PolicyOutput) -> LossTerm | None",
        ("a term added to each minibatch's policy loss: `output.logprobs` `[B, T]` with grad (0 on padding), "
        "`output.entropy` `[B, T]` (with grad only when the class sets `needs_entropy = True`), `output.mask` "
        "float `[B, T]`; `minibatch.ref_logprobs` etc. hold NaN in padding")),
    ("constraint", "after_update"): (
        "after_update(rollout: Rollout | None) -> dict[str, float] | None",
        "PPO: after each iteration's updates, with its rollout; DPO: after each optimizer step, with `None`"),
    ("constraint", "bind"): ("bind(algorithm) -> None", "once before training (as an estimator's `bind`)"),
    ("constraint", "state_dict"): ("state_dict() -> dict", "saved in the resumable checkpoint"),
    ("constraint", "load_state_dict"): ("load_state_dict(state: dict) -> None", "on resume"),
    ("reward", "score"): (
        "score(prompts, responses[, fields=...]) -> Tensor [B]",
        ("float scores; a prompt is text or a conversation (a sequence of `{role, content}` messages); "
        "`fields` (one dict per pair: the prompt rows' other columns) only when `score` takes it")),
    ("engine", "generate"): (
        "generate(prompt_ids, prompt_mask, sampling: SamplingSettings, *, seeds, greedy=False) -> Generation",
        ("`prompt_ids`, `prompt_mask` `[B, P]` left-padded; one response per row, row `i` seeded by `seeds[i]` "
        "(a sample should depend on its seed and prompt alone); returns `response_ids` `[B, T]` right-padded "
        "with PAD, `response_mask` `[B, T]` (1 up to and including the first EOS) and `logprobs` `[B, T]` of "
        "the sampled tokens on `logits / temperature` (0 on padding; `None` if the engine has none). An engine "
        "that cannot seed rows one by one (transformers draws a batch from one generator) sets the class "
        "attribute `seeds_per_row = False`")),
    ("engine", "start"): ("start(policy) -> None", ("once, before the first `generate` (after any resume): the "
                          "policy's `model` and `tokenizer`; an engine with its own copy loads the weights here")),
    ("engine", "sync"): ("sync(policy) -> None", ("before a rollout, whenever an optimizer step changed the policy "
                         "since the engine's last one: take the current weights (LoRA merged)")),
    ("engine", "check"): ("check(gap: float, where: str) -> None", ("after the first update of an iteration, with the "
                          "mean absolute engine-vs-trainer log-prob gap of its minibatch (`mismatch/*` metrics): "
                          "raise `rlhfkit.EngineError` when the engine's weights cannot be the policy's")),
    ("engine", "close"): ("close() -> None", "at the end of the stage and when it fails: stop what `start` started"),
    ("sampler", "draw"): ("draw(iteration: int, count: int, round: int = 0) -> list[int]", (
        "the indices (into the stage's prompt rows) of `count` distinct prompts for this iteration (`round` > 0: "
        "dynamic sampling's later rounds); must give the same answer on every rank, from the seed and the "
        "observed state only")),
    ("sampler", "observe"): ("observe(indices: list[int], scores: Tensor [n, G]) -> dict[str, float]", (
        "after scoring, on every rank, every group drawn this iteration: its prompt's index and its samples' "
        "scores (the reward source's, before constraints); returns metrics")),
    ("sampler", "bind"): ("bind(algorithm) -> None", ("once, before the first draw: the algorithm's `prompts`, "
                          "`prompt_fields` and `seed`")),
    ("sampler", "state_dict"): ("state_dict() -> dict", "saved in the resumable checkpoint"),
    ("sampler", "load_state_dict"): ("load_state_dict(state: dict) -> None", "on resume"),
    ("reward", "to"): ("to(device) -> self", "move models it holds to the training device"),
    ("reward", "evaluate"): ("evaluate(prompts, responses) -> dict[str, float]",
                             "extra evaluation metrics (a task's gold scorer), logged as `task/*`"),
    ("reward", "score_terms"): ("score_terms(prompts, responses[, fields]) -> dict[str, Tensor]",
                                "each term's `[B]` scores (a composite), logged per term"),
    ("objective", "__call__"): (
        "__call__(...) -> LossTerm",
        ("by tag: `policy-loss`: `(minibatch: Rollout, output: PolicyOutput)`, reads `minibatch.logprobs` "
        "(old) and `advantages` `[B, T]` (and `engine_logprobs`, the sampler's, or `None`), class attribute "
        "`needs_reference` (reads `minibatch.ref_logprobs`; default True), metrics `policy/*`; `preference-loss`: `(batch: PreferenceBatch)`, "
        "and with tag `unpaired` also `(batch: FeedbackBatch)`, class attributes `needs_reference` (default "
        "True) and `needs_mismatched`, metrics `dpo/*` (`dpo/loss` is the console's headline); "
        "`reward-model-loss` / `reward-model-regularizer`: `(batch: RewardBatch)`, `needs_lm = True` fills "
        "`batch.best_nll`, tag `pairs` for K = 2 only, metrics `rm/*`. The loss is a finite scalar")),
}


def contracts_markdown(registry: Registry) -> str:
    """The page: capabilities per kind, then every installed algorithm's slots."""
    out = ["# Component contracts",
           "",
           ("Generated from the declarations the registry checks (`rlhfkit.CAPABILITIES`, each algorithm's "
           "`Slot`s, the row kinds): `python -m rlhfkit.docgen` writes this page, and a test fails when it is out "
           "of date. How to write a component: [writing-a-plugin.md](writing-a-plugin.md); a test kit that "
           "checks one: `rlhfkit.testing.check_component`."),
           "",
           "## What an algorithm calls on a component",
           "",
           ("A component declares the optional capabilities it implements in `ComponentSpec.provides`; the "
           "required ones it must have. Metrics are namespaced (`kl/coef`, `value/loss`); the algorithm adds "
           "`train/` or `eval/` in front."),
           ""]
    for kind, (required, optional) in CAPABILITIES.items():
        out += [f"### {kind}", "", "| capability | | call | reads, writes, metrics |", "|---|---|---|---|"]
        for name in [*sorted(required), *sorted(optional)]:
            call, what = CALLS.get((kind, name), (name, ""))
            out.append(f"| `{name}` | {'required' if name in required else 'optional'} | `{_cell(call)}` | {_cell(what)} |")
        out.append("")
    out += ["## Row kinds", "", "What datasets yield (`ComponentSpec.yields`) and data slots take (`Slot.rows`):",
            "", "| kind | rows |", "|---|---|"]
    out += [f"| `{kind}` | {what} |" for kind, what in ROW_KINDS.items()]
    out += ["", "## Algorithms and their slots", ""]
    for spec in registry.specs("algorithm"):
        if spec.distribution.split(" ")[0] != "rlhfkit":
            continue  # the page describes rlhfkit's own algorithms
        out += [f"### {spec.name}", "", f"{spec.doc} (plugin `{spec.plugin}`).", "",
                "| slot | kind | required | list | takes | calls |", "|---|---|---|---|---|---|"]
        for name, slot in spec.slots.items():
            out.append(f"| `{name}` | {slot.kind} | {'yes' if slot.required else 'no'} | "
                       f"{'yes' if slot.many else 'no'} | {_takes(slot)} | {_calls(slot)} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _cell(text: str) -> str:
    """``text`` inside a table cell: a ``|`` would end the cell."""
    return text.replace("|", "\\|")


def _takes(slot: Any) -> str:
    if slot.kind == "dataset":
        if callable(slot.rows):
            return "rows by its settings: " + (slot.rows.__doc__ or "see the algorithm").strip().splitlines()[0]
        if slot.rows is None:
            return "any rows"
        return "rows with a prompt (all but `text`)" if slot.rows == PROMPTED else \
            ", ".join(f"`{k}`" for k in sorted(slot.rows)) + " rows"
    return f"tag `{slot.tag}`" if slot.tag else "any"


def _calls(slot: Any) -> str:
    if slot.kind not in CAPABILITIES:
        return ""
    required, optional = CAPABILITIES[slot.kind]
    used = optional if slot.uses is None else slot.uses | (optional & NEUTRAL)
    return ", ".join(f"`{n}`" for n in [*sorted(required), *sorted(used)])


def main(argv: list[str] | None = None) -> int:
    target = Path(argv[0] if argv else Path(__file__).resolve().parents[1] / "docs" / "contracts.md")
    target.write_text(contracts_markdown(load_plugins().registry))
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
