"""Steps per second and peak memory of an SFT training step: rlhfkit's ``sft`` stage
against TRL's ``SFTTrainer``, on the same model, examples and batch, with packing off on
both sides and on on both sides.

Set-up: the TRL environment of benchmarks/dpo_step.py (``~/venvs/rlhfkit-trl``).

Run (from the repository root; one thread per side keeps the timings steady on a shared
machine):

    ~/venvs/rlhfkit-trl/bin/python benchmarks/sft_step.py --threads 1 --repeats 3
        [--layers 4] [--hidden 256] [--heads 4] [--vocabulary 0] [--batch 16]
        [--max-length 128] [--warmup 3] [--steps 20] [--packing both|off|on]
        [--no-padding-free] [--no-trim-last-layer] [--device cpu|cuda] [--bf16]

Results and how to read them: docs/results-offline-steps.md.

What is the same on both sides (the model, clock, launcher and table of
benchmarks/dpo_step.py): one GPT-2 built from a config with a fixed seed, saved once and
loaded by both sides, dropout 0; prompt-completion examples of random words whose
lengths (prompt + completion + EOS) come in complementary pairs summing to
``--max-length``, so packing is exact and identical on both sides (every pack holds two
examples and ``--max-length`` tokens) while unpacked batches need padding; the loss on
completion tokens (EOS included) only, averaged over the step's tokens; AdamW with the
same settings (each side's own implementation), gradient clipping at 1.0, float32,
metrics every 10 steps; no evaluation, checkpoint or gradient checkpointing.

A step is ``--batch`` rows: examples with packing off, packs with packing on (TRL's
meaning of the batch size, and rlhfkit's with ``packing: true``). Packing off: the first
batch of each side is checked to hold the same token sequences. Packing on: both sides
are checked to hold the same examples in the same number of full packs.

How each side computes the step is its own: TRL pads each batch and runs its fused LM
head over every position (CPU), and with packing flattens a batch's packs into one
padding-free row whose attention transformers masks per example; rlhfkit tokenizes every
row once before training, lays out a batch's examples padding-free in rows of up to
``--max-length`` tokens (``padding_free``; with packing, one pack per row), each attending
to itself only, and runs the LM head and the last layer's MLP only at the columns that
predict a completion token (``trim_last_layer``). ``--no-padding-free`` and
``--no-trim-last-layer`` turn those off, to measure what each contributes.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import random
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
    run_arguments,
    run_side,
    step_table,
    trl_clock,
)

MODES = ("off", "on")


def prepare(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The model and tokenizer in ``workdir/model``, the examples in ``workdir/sft.jsonl``."""
    from rlhfkit import StageContext, load_plugins, ref
    from rlhfkit.plugins.policy.tokenizer import CHAT_WORDS, SPECIAL_TOKENS, build_word_tokenizer
    from rlhfkit.runner import quiet_libraries

    quiet_libraries()
    tokenizer: dict[str, str] = {"task": "reviews"}
    if args.vocabulary:
        build_word_tokenizer([f"w{i}" for i in range(args.vocabulary)]).save_pretrained(workdir / "tokenizer")
        tokenizer = {"path": str(workdir / "tokenizer")}
    torch.manual_seed(SEED)
    context = StageContext(registry=load_plugins().registry)
    policy = context.build(ref("policy")(
        name="transformers", tokenizer=tokenizer,
        architecture={"family": "gpt2", "layers": args.layers, "hidden": args.hidden, "heads": args.heads,
                      "max_positions": args.max_length, "dropout": 0.0}))
    policy.export(workdir / "model")
    words = sorted(set(policy.tokenizer.get_vocab()) - set(SPECIAL_TOKENS) - set(CHAT_WORDS))
    draw = random.Random(SEED)
    pairs = args.batch * (args.warmup + args.steps)  # two examples per pack: enough packs, and examples unpacked
    with open(workdir / "sft.jsonl", "w") as handle:
        for _ in range(pairs):
            first = draw.randint(args.max_length // 4, 3 * args.max_length // 4)
            for length in (first, args.max_length - first):  # prompt + completion + EOS tokens
                prompt = length // 2
                row = {"prompt": " ".join(draw.choices(words, k=prompt)),
                       "completion": " ".join(draw.choices(words, k=length - prompt - 1))}
                handle.write(json.dumps(row) + "\n")
    return {"parameters": sum(p.numel() for p in policy.model.parameters()), "vocabulary": len(policy.tokenizer)}


def train_rlhfkit(args: argparse.Namespace, workdir: Path, clock: StepClock) -> dict[str, Any]:
    """A one-stage sft recipe, built and trained as ``rlhfkit run`` does, less its
    checkpoint callback, evaluation and samples."""
    here = Path(tempfile.mkdtemp(prefix="rlhfkit-", dir=workdir))
    settings = {
        "algorithm": {"name": "sft", "lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": 0.0,
                      "warmup_steps": 0, "max_length": args.max_length, "packing": args.packing == "on",
                      "padding_free": args.padding_free, "trim_last_layer": args.trim_last_layer,
                      "sample_prompts": 0},
        "policy": {"name": "transformers", "path": str(workdir / "model"), "dropout": 0.0},
        "data": {"name": "file", "path": str(workdir / "sft.jsonl"), "schema": "prompt-completion"},
        "trainer": {"max_steps": args.warmup + args.steps, "batch_size": args.batch, "micro_batch_size": args.batch,
                    "gradient_clip": GRADIENT_CLIP, "log_every_n_steps": LOG_EVERY,
                    "accelerator": "gpu" if args.device == "cuda" else "cpu",
                    "precision": "bf16-mixed" if args.bf16 else "32-true"},
    }
    module, stage, stage_dir = build_stage(here, "sft", settings)
    encoder = module.encoder
    examples = [p.tolist() + c.tolist() for p, c in encoder._tokens]
    if args.packing == "on":
        record = packs_record([[examples[i] for i in pack] for pack in module.items])
    else:
        record = batch_record(encoder.separate_rows(list(range(args.batch))))
    shape: list[int] = []

    def first(pl_module: Any, batch: Any) -> None:  # the step's micro-batches (one here)
        shape.extend(batch[0]["input_ids"].shape)

    trainer = fit_stage(module, stage, stage_dir, clock, first)
    return {"batch": record | {"input": shape}, "steps": trainer.global_step}


def train_trl(args: argparse.Namespace, workdir: Path, clock: StepClock) -> dict[str, Any]:
    """``SFTTrainer`` on a ``datasets.Dataset`` of the same prompt-completion rows; TRL
    loads the saved model itself, masks the prompt from the loss (its default for
    prompt-completion data) and, with ``packing=True``, packs best-fit decreasing."""
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    tokenizer = PreTrainedTokenizerFast.from_pretrained(workdir / "model")
    eos = " " + tokenizer.eos_token  # a spaced EOS word: exactly rlhfkit's ids (TRL adds none when present)
    with open(workdir / "sft.jsonl") as handle:
        rows = [json.loads(line) for line in handle]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": " " + r["completion"] + eos} for r in rows])
    shape: list[int] = []

    config = SFTConfig(
        output_dir=str(workdir / "trl-sft"), max_steps=args.warmup + args.steps,
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=1, learning_rate=LR,
        adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS, weight_decay=0.0, warmup_steps=0,
        max_grad_norm=GRADIENT_CLIP, max_length=args.max_length, packing=args.packing == "on",
        model_init_kwargs={"dtype": torch.float32}, gradient_checkpointing=False, bf16=args.bf16, fp16=False,
        use_cpu=args.device == "cpu", seed=SEED, logging_steps=LOG_EVERY, report_to="none", save_strategy="no",
        eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    trainer = SFTTrainer(model=str(workdir / "model"), args=config, train_dataset=dataset,
                         processing_class=tokenizer, callbacks=[trl_clock(clock)])
    data = trainer.train_dataset
    if args.packing == "on":
        packs = []
        for ids, lengths in zip(data["input_ids"], data["seq_lengths"], strict=True):
            starts = [sum(lengths[:j]) for j in range(len(lengths))]
            packs.append([ids[s:s + n] for s, n in zip(starts, lengths, strict=True)])
        record = packs_record(packs)
    else:
        record = batch_record(trainer.data_collator([data[i] for i in range(args.batch)]))
    collate = trainer.data_collator

    def spy(features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(features)
        if not shape:
            shape.extend(batch["input_ids"].shape)
        return batch

    trainer.data_collator = spy
    trainer.train()
    return {"batch": record | {"input": shape}, "steps": trainer.state.global_step}


def batch_record(batch: dict[str, Any]) -> dict[str, Any]:
    """A digest of the token sequences of a padded batch and their token count."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    sequences = [ids[i][mask[i].bool()].tolist() for i in range(ids.shape[0])]
    return {"sequences": hashlib.sha256(json.dumps(sorted(sequences)).encode()).hexdigest()[:16],
            "tokens": sum(map(len, sequences))}


def packs_record(packs: list[list[list[int]]]) -> dict[str, Any]:
    """A digest of every packed example and of the packs' sizes; the token count."""
    examples = sorted(example for pack in packs for example in pack)
    sizes = sorted((len(pack), sum(map(len, pack))) for pack in packs)
    return {"sequences": hashlib.sha256(json.dumps([examples, sizes]).encode()).hexdigest()[:16],
            "tokens": sum(map(len, examples)), "packs": len(packs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model_arguments(parser)
    parser.add_argument("--batch", type=int, default=16, help="rows per optimizer step: examples, or packs")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per row (and per pack)")
    parser.add_argument("--packing", choices=("both", *MODES), default="both", help="on both sides")
    parser.add_argument("--padding-free", action=argparse.BooleanOptionalAction, default=True,
                        help="rlhfkit's algorithm.padding_free (a micro-batch's examples in as few rows as fit)")
    parser.add_argument("--trim-last-layer", action=argparse.BooleanOptionalAction, default=True,
                        help="rlhfkit's algorithm.trim_last_layer (the last MLP only where a learned token is predicted)")
    run_arguments(parser)
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1 or args.max_length < 8:
        parser.error("--warmup and --steps must be at least 1 and --max-length at least 8")
    if args.side is not None:
        run_side(args, train_rlhfkit, train_trl, mode_key="packing")
        return
    if importlib.util.find_spec("trl") is None:
        raise SystemExit(TRL_MISSING.format(python=sys.executable))
    modes = MODES if args.packing == "both" else (args.packing,)
    with tempfile.TemporaryDirectory(prefix="sft-step-") as tmp:
        workdir = Path(tmp)
        model = prepare(args, workdir)
        results = [launch(side, mode, args, workdir, mode_flag="--packing")
                   for mode in modes for _ in range(args.repeats) for side in SIDES]
    shapes = {(r["packing"], r["side"]): r["batch"]["input"] for r in results}
    step_table(results, args, f"SFT training step, rlhfkit vs TRL {version('trl')} SFTTrainer: GPT-2 {args.layers} "
                              f"layers x {args.hidden} ({model['parameters'] / 1e6:.2f}M parameters, vocabulary "
                              f"{model['vocabulary']}), {args.batch} rows of up to {args.max_length} tokens, "
                              f"{args.device}, {'bf16 autocast' if args.bf16 else 'fp32'}",
               "packing", "packing",
               lambda batch: (f"the same {batch['packs']} full packs of the same examples on both sides, "
                              f"{batch['tokens']} tokens (digest {batch['sequences']})" if "packs" in batch else
                              f"the same first batch on both sides, {batch['tokens']} tokens (digest "
                              f"{batch['sequences']})"))
    for (mode, side), shape in shapes.items():
        print(f"model input, packing {mode}, {side}: {shape}")


if __name__ == "__main__":
    main()
