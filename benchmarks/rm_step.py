"""Steps per second and peak memory of a reward-model training step: rlhfkit's
``reward-model`` stage against TRL's ``RewardTrainer``, on the same model, pairs and batch.

Set-up: the TRL environment of benchmarks/dpo_step.py (``~/venvs/rlhfkit-trl``).

Run (from the repository root; one thread per side keeps the timings steady on a shared
machine):

    ~/venvs/rlhfkit-trl/bin/python benchmarks/rm_step.py --threads 1 --repeats 3
        [--layers 4] [--hidden 256] [--heads 4] [--vocabulary 0] [--batch 16]
        [--prompt-length 32] [--response-length 32] [--warmup 3] [--steps 20]
        [--layout both|shared|separate] [--no-trim-last-layer] [--device cpu|cuda] [--bf16]

Results and how to read them: docs/results-offline-steps.md.

What is the same on both sides (as in benchmarks/dpo_step.py, whose model, pairs, clock,
launcher and table this script uses): one GPT-2 built from a config with a fixed seed,
saved once and loaded by both sides, dropout 0; ``--batch`` pairs of ``--prompt-length``
prompt tokens and ``--response-length`` response tokens (EOS included) per optimizer step,
no accumulation; the pairwise loss -log sigmoid(r_chosen - r_rejected); AdamW with the
same settings (each side's own implementation), gradient clipping at 1.0, float32,
metrics every 10 steps; no evaluation, checkpoint or gradient checkpointing during the
timed steps. The first batch of each side is checked to hold the same prompt + response
token sequences.

How each side computes the forward is its own: TRL's ``RewardTrainer`` runs
``AutoModelForSequenceClassification`` over chosen and rejected as ``2B`` rows of prompt +
response; rlhfkit, by default, one row per pair, prompt once, both responses masked from
each other (``share_prompt``), the score read at each response's EOS, rows tokenized
once before the first step, and the last layer's MLP only at each response's EOS, the one
position whose hidden state is read (``trim_last_layer``). ``--layout separate`` measures
rlhfkit with one row per response, ``both`` runs both layouts against TRL;
``--no-trim-last-layer`` runs the whole last layer.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from dpo_step import (
    BETAS,
    EPS,
    GRADIENT_CLIP,
    LOG_EVERY,
    LR,
    SEED,
    SIDES,
    TRL_MISSING,
    StepClock,
    build_stage,
    fit_stage,
    launch,
    model_arguments,
    prepare,
    run_arguments,
    run_side,
    step_table,
    trl_clock,
)

LAYOUTS = ("shared", "separate")


def train_rlhfkit(args: argparse.Namespace, workdir: Path, clock: StepClock) -> dict[str, Any]:
    """A one-stage reward-model recipe, built and trained as ``rlhfkit run`` does, less its
    checkpoint callback."""
    here = Path(tempfile.mkdtemp(prefix="rlhfkit-", dir=workdir))
    settings = {
        "algorithm": {"name": "reward-model", "lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": 0.0,
                      "warmup_steps": 0, "max_length": args.prompt_length + args.response_length,
                      "share_prompt": args.layout == "shared", "trim_last_layer": args.trim_last_layer},
        "backbone": {"name": "transformers", "path": str(workdir / "model"), "dropout": 0.0},
        "objective": {"name": "pairwise"},
        "data": {"name": "file", "path": str(workdir / "pairs.jsonl"), "schema": "preference"},
        "trainer": {"max_steps": args.warmup + args.steps, "batch_size": args.batch, "micro_batch_size": args.batch,
                    "gradient_clip": GRADIENT_CLIP, "log_every_n_steps": LOG_EVERY,
                    "accelerator": "gpu" if args.device == "cuda" else "cpu",
                    "precision": "bf16-mixed" if args.bf16 else "32-true"},
    }
    module, stage, stage_dir = build_stage(here, "rm", settings)
    first_batch: dict[str, Any] = {}

    def record(pl_module: Any, batch: Any) -> None:  # the first rows, as TRL's record below
        first_batch.update(batch_record(pl_module.encode([r for r, _ in pl_module.rows[:args.batch]])),
                           input=list(batch["input_ids"].shape))

    trainer = fit_stage(module, stage, stage_dir, clock, record)
    return {"batch": first_batch, "steps": trainer.global_step}


def train_trl(args: argparse.Namespace, workdir: Path, clock: StepClock) -> dict[str, Any]:
    """``RewardTrainer`` on a ``datasets.Dataset`` of the same pairs; TRL loads the saved
    causal LM as ``AutoModelForSequenceClassification`` (``num_labels=1``) itself."""
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast
    from trl import RewardConfig, RewardTrainer

    tokenizer = PreTrainedTokenizerFast.from_pretrained(workdir / "model")
    # TRL joins prompt and response as text and appends EOS as text unless the response ends
    # with it: the leading space and the spaced EOS word give exactly rlhfkit's token ids
    eos = " " + tokenizer.eos_token
    with open(workdir / "pairs.jsonl") as handle:
        rows = [json.loads(line) for line in handle]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "chosen": " " + r["chosen"] + eos,
                                  "rejected": " " + r["rejected"] + eos} for r in rows])

    config = RewardConfig(
        output_dir=str(workdir / "trl-rm"), max_steps=args.warmup + args.steps,
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=1, learning_rate=LR,
        adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS, weight_decay=0.0, warmup_steps=0,
        max_grad_norm=GRADIENT_CLIP, max_length=args.prompt_length + args.response_length,
        model_init_kwargs={"dtype": torch.float32}, gradient_checkpointing=False, bf16=args.bf16, fp16=False,
        use_cpu=args.device == "cpu", seed=SEED, logging_steps=LOG_EVERY, report_to="none", save_strategy="no",
        eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    trainer = RewardTrainer(model=str(workdir / "model"), args=config, train_dataset=dataset,
                            processing_class=tokenizer, callbacks=[trl_clock(clock)])
    first = trainer.data_collator([trainer.train_dataset[i] for i in range(args.batch)])
    trainer.train()
    return {"batch": batch_record(first), "steps": trainer.state.global_step}


def batch_record(batch: dict[str, Any]) -> dict[str, Any]:
    """A digest of the prompt + response token sequences a batch holds, whatever its
    layout, their token count and the shape of the tensor the model is given."""
    ids = batch["input_ids"]
    if "segment" in batch:  # rlhfkit's shared rows: prompt + each response
        sequences = [ids[i][batch["segment"][i] == 1].tolist() + ids[i][batch["segment"][i] == 2 + j].tolist()
                     for i in range(ids.shape[0]) for j in range(batch["ends"].shape[1])]
    else:
        flat, mask = ids.reshape(-1, ids.shape[-1]), batch["attention_mask"].reshape(-1, ids.shape[-1])
        sequences = [flat[i][mask[i].bool()].tolist() for i in range(flat.shape[0])]
    digest = hashlib.sha256(json.dumps(sorted(sequences)).encode()).hexdigest()[:16]
    return {"sequences": digest, "tokens": sum(map(len, sequences)), "input": list(ids.shape)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model_arguments(parser)
    parser.add_argument("--batch", type=int, default=16, help="pairs per optimizer step")
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--response-length", type=int, default=32, help="tokens, EOS included")
    parser.add_argument("--layout", choices=("both", *LAYOUTS), default="shared",
                        help="rlhfkit's algorithm.share_prompt on (shared), off (separate) or each in turn")
    parser.add_argument("--trim-last-layer", action=argparse.BooleanOptionalAction, default=True,
                        help="rlhfkit's algorithm.trim_last_layer (the last MLP only at each response's EOS)")
    run_arguments(parser)
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1 or args.response_length < 2:
        parser.error("--warmup and --steps must be at least 1 and --response-length at least 2")
    if args.side is not None:
        run_side(args, train_rlhfkit, train_trl, mode_key="layout")
        return
    if importlib.util.find_spec("trl") is None:
        raise SystemExit(TRL_MISSING.format(python=sys.executable))
    layouts = LAYOUTS if args.layout == "both" else (args.layout,)
    with tempfile.TemporaryDirectory(prefix="rm-step-") as tmp:
        workdir = Path(tmp)
        model = prepare(args, workdir)
        results = [launch(side, layout, args, workdir, mode_flag="--layout")
                   for layout in layouts for _ in range(args.repeats) for side in SIDES]
    shapes = {(r["layout"], r["side"]): r["batch"]["input"] for r in results}
    step_table(results, args, f"Reward-model training step, rlhfkit vs TRL {version('trl')} RewardTrainer: GPT-2 "
                              f"{args.layers} layers x {args.hidden} ({model['parameters'] / 1e6:.2f}M parameters "
                              f"with the LM head, vocabulary {model['vocabulary']}), {args.batch} pairs x "
                              f"({args.prompt_length} + {args.response_length}) tokens, {args.device}, "
                              f"{'bf16 autocast' if args.bf16 else 'fp32'}",
               "rlhfkit layout", "layout",
               lambda batch: f"the same {batch['tokens']} prompt + response tokens per step on both sides "
                             f"(digest {batch['sequences']})")
    for (layout, side), shape in shapes.items():
        print(f"model input, {layout} layout, {side}: {shape}")


if __name__ == "__main__":
    main()
