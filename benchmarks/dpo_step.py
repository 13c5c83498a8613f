"""Steps per second and peak memory of a DPO training step: rlhfkit's ``dpo`` stage
against TRL's ``DPOTrainer``, on the same model, pairs and batch.

Set-up (TRL is needed by this benchmark only, so it gets a virtual environment of its own):

    python3 -m venv ~/venvs/rlhfkit-trl
    ~/venvs/rlhfkit-trl/bin/pip install -c constraints.txt -e . -r benchmarks/requirements-trl.txt

Run (from the repository root; about two minutes with ``--threads 1`` on a free CPU core;
on a machine other jobs share, one thread per side keeps the timings steady):

    ~/venvs/rlhfkit-trl/bin/python benchmarks/dpo_step.py --threads 1 [--layers 4] [--hidden 256]
        [--heads 4] [--vocabulary 0] [--batch 16] [--prompt-length 32] [--response-length 32]
        [--warmup 3] [--steps 20] [--reference both|on-the-fly|precompute] [--repeats 1]
        [--device cpu|cuda] [--bf16] [--gradient-checkpointing]
        [--no-share-prompt] [--no-fused-activations]

Results and how to read them: docs/results-dpo-step.md.

What is the same on both sides:
- the model: one GPT-2 built from a config with a fixed seed, on the built-in reviews
  task's word-level vocabulary (``--vocabulary N``: a generated one of N words), saved
  once; both sides load these weights. Dropout is 0;
- the pairs: random words of that vocabulary, every prompt ``--prompt-length`` tokens
  and every response ``--response-length`` tokens with its EOS, so no row is padded. The
  first batch of each side is checked to hold the same prompt + response token sequences;
- the step: ``--batch`` pairs per optimizer step with no accumulation, one forward of
  chosen and rejected, the sigmoid DPO loss with beta 0.1, AdamW (same lr,
  betas, eps, no weight decay; each side's own implementation, fused in TRL), gradient
  clipping at 1.0, float32 (TRL's default is bf16; ``--bf16``: bf16 autocast on both),
  metrics logged every 10 steps;
- the reference: a separate frozen model scored on the fly at every step, or (second
  configuration) log-probs precomputed before training (rlhfkit ``reference_logps:
  precompute``, TRL ``precompute_ref_log_probs=True``);
- no evaluation, no checkpoint during training, no external logging, no gradient
  checkpointing (TRL's default turns it on; ``--gradient-checkpointing`` turns it on for both).

How each side computes that forward is its own: TRL concatenates the chosen and rejected
rows (``[2B, P + R]``); rlhfkit, by default, computes each prompt once (``share_prompt``:
``[B, P + 2R - 2]``, the rejected response masked from the chosen one, each response's
last token a target only) and runs GPT-2's GELU as one fused kernel
(``fused_activations``). ``--no-share-prompt`` and ``--no-fused-activations`` turn them
off, to measure what each contributes.

Each side trains as its users run it: rlhfkit from a recipe file, its stage built through
the registry and Lightning trainer as ``rlhfkit run`` builds it (the CLI's ``MKL_CBWR``
setting included); TRL with ``DPOTrainer`` on a ``datasets.Dataset``. Each side runs in a
fresh process, one after the other, with the same ``torch.set_num_threads``. A callback on
each side stamps the end of every optimizer step; the first ``--warmup`` steps are not
timed. Memory: CPU, the resident set size when the first step starts (model, reference,
data and trainer built) and its peak during training (the peak is reset at the first
step, Linux); CUDA, allocated memory at the first step and ``max_memory_allocated`` after.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.table import Table

SIDES = ("rlhfkit", "trl")
REFERENCE_MODES = ("on-the-fly", "precompute")
LR, BETAS, EPS, BETA, GRADIENT_CLIP, LOG_EVERY, SEED = 1e-4, (0.9, 0.95), 1e-8, 0.1, 1.0, 10, 0
TRL_MISSING = """trl is not importable from {python}.
This benchmark runs TRL's DPOTrainer, which rlhfkit itself never needs. Install it in an
environment of its own, from the repository root:
    python3 -m venv ~/venvs/rlhfkit-trl
    ~/venvs/rlhfkit-trl/bin/pip install -c constraints.txt -e . -r benchmarks/requirements-trl.txt
then run this script with ~/venvs/rlhfkit-trl/bin/python."""


# ------------------------------------------------------------------ memory and time


def memory_now_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak(device: torch.device) -> None:
    """Start measuring the peak from now (Linux resets ru_maxrss through clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StepClock:
    """The end time of every optimizer step, and memory when the first one starts; each
    side's training callback calls it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.ends: list[float] = []
        self.cpu_ends: list[float] = []
        self.setup_mb: float | None = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step_begins(self) -> None:
        if self.setup_mb is None:
            self._sync()
            self.setup_mb = memory_now_mb(self.device)
            reset_peak(self.device)

    def step_ends(self) -> None:
        self._sync()
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())

    def summary(self, warmup: int) -> dict[str, float]:
        """Times from the end of the last warm-up step to the end of the last step."""
        durations = [b - a for a, b in zip(self.ends[warmup - 1:], self.ends[warmup:], strict=False)]
        mean = statistics.fmean(durations)
        cpu = (self.cpu_ends[-1] - self.cpu_ends[warmup - 1]) / len(durations)
        return {"steps_per_s": 1 / mean, "ms_per_step": 1000 * mean,
                "median_ms_per_step": 1000 * statistics.median(durations), "cpu_ms_per_step": 1000 * cpu,
                "setup_mb": self.setup_mb, "peak_mb": peak_mb(self.device)}


# ------------------------------------------------------------------ shared model and pairs


def prepare(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Save the model and tokenizer to ``workdir/model`` and the pairs to
    ``workdir/pairs.jsonl``; return the model's size."""
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
                      "max_positions": args.prompt_length + args.response_length, "dropout": 0.0}))
    policy.export(workdir / "model")
    words = sorted(set(policy.tokenizer.get_vocab()) - set(SPECIAL_TOKENS) - set(CHAT_WORDS))
    draw = random.Random(SEED)
    rows = args.batch * (args.warmup + args.steps)  # one pass: no step sees a row twice

    def text(n: int) -> str:
        return " ".join(draw.choices(words, k=n))

    with open(workdir / "pairs.jsonl", "w") as handle:
        for _ in range(rows):  # the EOS ends each response: response-length - 1 words
            row = {"prompt": text(args.prompt_length), "chosen": text(args.response_length - 1),
                   "rejected": text(args.response_length - 1)}
            handle.write(json.dumps(row) + "\n")
    return {"parameters": sum(p.numel() for p in policy.model.parameters()), "vocabulary": len(policy.tokenizer)}


# ------------------------------------------------------------------ the two sides


def build_stage(here: Path, name: str, settings: dict[str, Any]) -> tuple[Any, Any, Path]:
    """A one-stage recipe written to ``here`` and its algorithm built as
    ``rlhfkit.runner.run_stage`` builds it: ``(module, stage, stage directory)``."""
    import lightning as L

    from rlhfkit import StageContext, load_plugins
    from rlhfkit.runner import quiet_libraries
    from rlhfkit.training import rank_seed

    recipe_file = here / f"{name}.yaml"
    recipe_file.write_text(yaml.safe_dump({"run": {"name": name, "dir": str(here / "run"), "seed": SEED},
                                           "stages": {name: settings}}, sort_keys=False))
    quiet_libraries()
    plugins = load_plugins()
    recipe = plugins.load_recipe(recipe_file)
    stage = recipe.stages[0]
    stage_dir = recipe.run_dir / stage.name
    L.seed_everything(rank_seed(recipe.run.seed, 0), workers=True, verbose=False)
    torch.use_deterministic_algorithms(stage.trainer.deterministic, warn_only=True)
    context = StageContext(registry=plugins.registry, stage=stage.name, stage_dir=stage_dir, seed=recipe.run.seed,
                           exports={}, slots=stage.slots, trainer=stage.trainer, recipe_dir=here)
    return plugins.registry.build(stage.algorithm, context), stage, stage_dir


def train_rlhfkit(args: argparse.Namespace, workdir: Path, clock: StepClock) -> dict[str, Any]:
    """A one-stage recipe, built and trained as ``rlhfkit.runner.run_stage`` does, less
    its checkpoint callback (no checkpoint during the timed steps, as on the TRL side)."""
    here = Path(tempfile.mkdtemp(prefix="rlhfkit-", dir=workdir))  # each run starts afresh, never resumes
    settings = {
        "algorithm": {"name": "dpo", "lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": 0.0,
                      "warmup_steps": 0, "max_length": args.prompt_length + args.response_length,
                      "reference_logps": args.reference, "share_prompt": args.share_prompt},
        "policy": {"name": "transformers", "path": str(workdir / "model"), "dropout": 0.0,
                   "gradient_checkpointing": args.gradient_checkpointing,
                   "fused_activations": args.fused_activations},
        "objective": {"name": "dpo", "beta": BETA},
        "data": {"name": "file", "path": str(workdir / "pairs.jsonl"), "schema": "preference"},
        "trainer": {"max_steps": args.warmup + args.steps, "batch_size": args.batch, "micro_batch_size": args.batch,
                    "gradient_clip": GRADIENT_CLIP, "log_every_n_steps": LOG_EVERY,
                    "accelerator": "gpu" if args.device == "cuda" else "cpu",
                    "precision": "bf16-mixed" if args.bf16 else "32-true"},
    }
    module, stage, stage_dir = build_stage(here, "dpo", settings)
    first_batch: dict[str, Any] = {}

    def record(pl_module: Any, batch: Any) -> None:  # the first rows, as TRL's record below (its sampler shuffles)
        first_batch.update(batch_record(pl_module.encode(pl_module.rows[:args.batch])),
                           input=list(batch["input_ids"].shape))

    trainer = fit_stage(module, stage, stage_dir, clock, record)
    return {"batch": first_batch, "steps": trainer.global_step}


def train_trl(args: argparse.Namespace, workdir: Path, clock: StepClock) -> dict[str, Any]:
    """``DPOTrainer`` on a ``datasets.Dataset`` of the same pairs, reference created by
    TRL (a second copy of the model loaded from the same directory)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(workdir / "model")
    # TRL tokenizes prompt + completion as one string and appends EOS as text: the leading
    # space and the spaced EOS word give exactly the token ids rlhfkit encodes
    eos = " " + tokenizer.eos_token
    with open(workdir / "pairs.jsonl") as handle:
        rows = [json.loads(line) for line in handle]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "chosen": " " + r["chosen"] + eos,
                                  "rejected": " " + r["rejected"] + eos} for r in rows])

    config = DPOConfig(
        output_dir=str(workdir / f"trl-{args.reference}"), max_steps=args.warmup + args.steps,
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=1, learning_rate=LR,
        adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS, weight_decay=0.0, warmup_steps=0,
        max_grad_norm=GRADIENT_CLIP, beta=BETA, loss_type=["sigmoid"],
        max_length=args.prompt_length + args.response_length,
        precompute_ref_log_probs=args.reference == "precompute", precompute_ref_batch_size=64,
        gradient_checkpointing=args.gradient_checkpointing, bf16=args.bf16, fp16=False,
        use_cpu=args.device == "cpu", seed=SEED, logging_steps=LOG_EVERY, report_to="none",
        save_strategy="no", eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[trl_clock(clock)])
    first = trainer.data_collator([trainer.train_dataset[i] for i in range(args.batch)])
    trainer.train()
    return {"batch": batch_record(first), "steps": trainer.state.global_step}


def batch_record(batch: dict[str, Any]) -> dict[str, Any]:
    """What a batch of the first rows holds, whatever its layout: a digest of its prompt +
    response token sequences (the same on both sides when they train on the same pairs),
    their token count, and the shape of the tensor the model is given."""
    ids = batch["input_ids"]
    if "segment" in batch:  # rlhfkit's shared-prompt rows: prompt + chosen, prompt + rejected (labels)
        sequences = [ids[i][batch["segment"][i] == 1].tolist()
                     + batch[f"{side}_labels"][i][batch[f"{side}_scored"][i] == 1].tolist()
                     for side in ("chosen", "rejected") for i in range(ids.shape[0])]
    else:
        sequences = [ids[i][batch["attention_mask"][i].bool()].tolist() for i in range(ids.shape[0])]
    digest = hashlib.sha256(json.dumps(sorted(sequences)).encode()).hexdigest()[:16]
    return {"sequences": digest, "tokens": sum(map(len, sequences)), "input": list(ids.shape)}


def run_side(args: argparse.Namespace, train_rlhfkit: Any = None, train_trl: Any = None,
             mode_key: str = "reference") -> None:
    """Child process: train one side (this script's ``train_rlhfkit`` / ``train_trl``, or
    another benchmark's) and write its measurements and its mode (``args.<mode_key>``) to
    ``args.result``."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    clock = StepClock(device)
    if args.side == "rlhfkit":
        train = train_rlhfkit or globals()["train_rlhfkit"]
    else:
        train = train_trl or globals()["train_trl"]
    out = train(args, Path(args.workdir), clock)
    if out["steps"] != args.warmup + args.steps:
        raise RuntimeError(f"{args.side} ran {out['steps']} steps, not {args.warmup + args.steps}")
    Path(args.result).write_text(json.dumps({**out, **clock.summary(args.warmup), "side": args.side,
                                             mode_key: getattr(args, mode_key)}))


def fit_stage(module: Any, stage: Any, stage_dir: Path, clock: StepClock, first_batch: Any = None) -> Any:
    """Train a stage built by :func:`build_stage` as ``rlhfkit.runner.run_stage`` does,
    less its checkpoint callback, with :func:`lightning_clock`; returns the trainer."""
    from rlhfkit.training import MetricsCSV, RNGState, build_trainer

    logger = MetricsCSV(stage_dir / "metrics.csv", on_row=lambda step, metrics: None)
    trainer = build_trainer(stage.trainer, stage_dir, module.total_steps,
                            [RNGState(), lightning_clock(clock, first_batch)], logger)
    trainer.fit(module)
    return trainer


def lightning_clock(clock: StepClock, first_batch: Any = None) -> Any:
    """A Lightning callback that stamps each optimizer step on ``clock`` and calls
    ``first_batch(module, batch)`` once, before the first step starts."""
    from lightning.pytorch.callbacks import Callback

    class Clock(Callback):
        seen = False

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if not self.seen and first_batch is not None:
                first_batch(pl_module, batch)
            self.seen = True
            clock.step_begins()

        def on_train_batch_end(self, *args: Any) -> None:
            clock.step_ends()

    return Clock()


def trl_clock(clock: StepClock) -> Any:
    """A transformers ``TrainerCallback`` that stamps each optimizer step on ``clock``."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            clock.step_begins()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            clock.step_ends()

    return Clock()


def model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model options every benchmark of this directory takes."""
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocabulary", type=int, default=0,
                        help="words of a generated word-level vocabulary (0: the reviews task's, 156 tokens)")


def run_arguments(parser: argparse.ArgumentParser) -> None:
    """The timing, device and child-process options every benchmark of this directory takes."""
    parser.add_argument("--warmup", type=int, default=3, help="steps before the timed ones (at least 1)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side, alternating")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides (default fp32)")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)


def launch(side: str, reference: str, args: argparse.Namespace, workdir: Path, mode_flag: str = "--reference"
           ) -> dict[str, Any]:
    """Run one side in a fresh process (this script again, with ``--side`` and ``mode_flag
    reference``) and return its measurements; the other benchmarks of this directory
    launch their sides with it too."""
    result = workdir / f"{side}-{reference}.json"
    log = workdir / f"{side}-{reference}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(workdir / "hf-datasets"),
           "TOKENIZERS_PARALLELISM": "false"}
    if side == "rlhfkit":  # what `rlhfkit run` sets before MKL starts (core/cli.py)
        env.setdefault("MKL_CBWR", "AUTO,STRICT")
    command = [sys.executable, os.path.abspath(sys.argv[0]), *sys.argv[1:], "--side", side, mode_flag, reference,
               "--threads", str(args.threads), "--workdir", str(workdir), "--result", str(result)]
    with open(log, "w") as handle:
        done = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"the {side} side ({reference}) failed with exit code {done.returncode}; "
                         f"the end of its output:\n{tail}")
    return json.loads(result.read_text())


# ------------------------------------------------------------------ report


def report(results: list[dict[str, Any]], args: argparse.Namespace, model: dict[str, Any]) -> None:
    batch_note = {side: next(r["batch"]["input"] for r in results if r["side"] == side) for side in SIDES}
    step_table(results, args, f"DPO training step, rlhfkit vs TRL {version('trl')}: GPT-2 {args.layers} layers x "
                              f"{args.hidden} ({model['parameters'] / 1e6:.2f}M parameters, vocabulary "
                              f"{model['vocabulary']}), {args.batch} pairs x ({args.prompt_length} + "
                              f"{args.response_length}) tokens, {args.device}, "
                              f"{'bf16 autocast' if args.bf16 else 'fp32'}",
               "reference log-probs", "reference",
               lambda batch: f"each step: the same {batch['tokens']} prompt + response tokens on both sides (digest "
                             f"{batch['sequences']}); model input {batch_note['rlhfkit']} in rlhfkit (share_prompt "
                             f"{args.share_prompt}, fused_activations {args.fused_activations}), "
                             f"{batch_note['trl']} in TRL")


def step_table(results: list[dict[str, Any]], args: argparse.Namespace, title: str, mode_label: str, mode_key: str,
               note: Any) -> None:
    """One row per side and mode (``mode_key`` of each result): medians over the repeats,
    and the memory of the run with the largest peak. CPU time per step (all threads of the
    process) is shown on CPU, where it is the measure that other load on the machine
    disturbs least. Both sides of a mode must report the same ``batch`` record (what one
    step trains on); ``note(batch)`` says what it was."""
    cpu = args.device == "cpu"
    memory = "RSS" if cpu else "GPU allocated"
    table = Table(title=title)
    columns = [mode_label, "side", "steps/s", "ms/step (mean)", "ms/step (median)",
               *(["CPU ms/step"] if cpu else []), f"{memory} at step 1 (MB)", f"peak {memory} (MB)",
               "peak - step 1 (MB)", "steps/s vs TRL", *(["CPU time vs TRL"] if cpu else []), "peak vs TRL"]
    for column in columns:
        table.add_column(column, justify="left" if column in (mode_label, "side") else "right")
    notes = []
    for mode in dict.fromkeys(r[mode_key] for r in results):
        runs = {side: [r for r in results if r[mode_key] == mode and r["side"] == side] for side in SIDES}
        batches = {json.dumps({k: v for k, v in r["batch"].items() if k != "input"}, sort_keys=True)
                   for side in SIDES for r in runs[side]}  # what a step trains on, less its layout
        if len(batches) != 1:
            raise SystemExit(f"the sides did not train on the same batches ({mode}): {sorted(batches)}")
        notes.append((mode, json.loads(batches.pop())))
        stats = {side: max(runs[side], key=lambda r: r["peak_mb"])
                 | {key: statistics.median(r[key] for r in runs[side])
                    for key in ("steps_per_s", "ms_per_step", "median_ms_per_step", "cpu_ms_per_step")}
                 for side in SIDES}
        trl = stats["trl"]
        for i, side in enumerate(SIDES):
            s = stats[side]
            pairs = [(r, t) for r, t in zip(runs["rlhfkit"], runs["trl"], strict=False)] if side == "rlhfkit" else []
            per_pair = (" (" + ", ".join(f"{t['cpu_ms_per_step'] / r['cpu_ms_per_step']:.2f}" for r, t in pairs) + ")"
                        if cpu and len(pairs) > 1 else "")
            cells = [mode if i == 0 else "", side, f"{s['steps_per_s']:.2f}", f"{s['ms_per_step']:.1f}",
                     f"{s['median_ms_per_step']:.1f}", *([f"{s['cpu_ms_per_step']:.1f}"] if cpu else []),
                     f"{s['setup_mb']:,.0f}", f"{s['peak_mb']:,.0f}", f"{s['peak_mb'] - s['setup_mb']:,.0f}",
                     f"{s['steps_per_s'] / trl['steps_per_s']:.2f}x",
                     *([f"{trl['cpu_ms_per_step'] / s['cpu_ms_per_step']:.2f}x{per_pair}"] if cpu else []),
                     f"{s['peak_mb'] / trl['peak_mb']:.2f}x"]
            table.add_row(*cells, end_section=i == len(SIDES) - 1)
    console = Console(width=220)
    console.print(table)
    for mode, batch in notes:
        console.print(f"{mode}: {note(batch)}")
    console.print(f"{args.warmup} warm-up + {args.steps} timed steps, {args.repeats} run(s) per side, alternating; "
                  f"CPU time vs TRL: the ratio of the medians (each alternating pair's in brackets); torch {torch.__version__}, "
                  f"transformers {version('transformers')}, lightning {version('lightning')}, "
                  f"{args.threads} thread(s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model_arguments(parser)
    parser.add_argument("--batch", type=int, default=16, help="pairs per optimizer step")
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--response-length", type=int, default=32, help="tokens, EOS included")
    parser.add_argument("--reference", choices=("both", *REFERENCE_MODES), default="both")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on both sides")
    parser.add_argument("--share-prompt", action=argparse.BooleanOptionalAction, default=True,
                        help="rlhfkit's algorithm.share_prompt (the prompt computed once per pair)")
    parser.add_argument("--fused-activations", action=argparse.BooleanOptionalAction, default=True,
                        help="rlhfkit's policy.fused_activations (GPT-2's GELU as one kernel)")
    run_arguments(parser)
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1 or args.response_length < 2:
        parser.error("--warmup and --steps must be at least 1 and --response-length at least 2")
    if args.side is not None:
        run_side(args)
        return
    if importlib.util.find_spec("trl") is None:
        raise SystemExit(TRL_MISSING.format(python=sys.executable))
    references = REFERENCE_MODES if args.reference == "both" else (args.reference,)
    with tempfile.TemporaryDirectory(prefix="dpo-step-") as tmp:
        workdir = Path(tmp)
        model = prepare(args, workdir)
        results = [launch(side, reference, args, workdir)
                   for reference in references for _ in range(args.repeats) for side in SIDES]
    report(results, args, model)


if __name__ == "__main__":
    main()
