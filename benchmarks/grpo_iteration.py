"""Iterations per second and peak memory of GRPO: rlhfkit's ``ppo`` stage with the
``grpo`` estimator (``hf`` engine, and ``vllm`` with ``--vllm-python``) against TRL's
``GRPOTrainer`` (transformers generate), on the same model, prompts and settings.

Set-up: the TRL environment of benchmarks/dpo_step.py (``~/venvs/rlhfkit-trl``); for the
vLLM side, an environment with vLLM (docs/engines.md).

    ~/venvs/rlhfkit-trl/bin/python benchmarks/grpo_iteration.py --threads 1 [--beta both|0|0.04]
        [--layers 4] [--hidden 256] [--heads 4] [--prompts 8] [--group 8] [--prompt-length 16]
        [--new-tokens 64] [--warmup 2] [--steps 6] [--repeats 1] [--vllm-python PATH]
        [--sides rlhfkit,trl[,rlhfkit-generate][,rlhfkit-vllm]] [--hf-cache in-place|dynamic|static]

What is the same on both sides:
- the model: one GPT-2 built from a config with a fixed seed on the built-in reviews
  task's word-level vocabulary, saved once, dropout 0; the reference (β > 0) a frozen
  copy of it;
- an iteration = one optimizer step: ``--prompts`` prompts x ``--group`` samples of up
  to ``--new-tokens`` tokens (temperature 1, no top-k/top-p), scored by the same Python
  reward function (distinct words per word), advantages ``(R − mean_G) / (std_G + 1e-4)``
  (TRL's ``scale_rewards: group``; rlhfkit's ``grpo`` with ``eps: 1e-4`` and no further
  whitening), the clipped loss with ε = 0.2 aggregated over the batch's tokens (TRL's
  default ``loss_type: dapo``; rlhfkit ``aggregation: global-token-mean``), one epoch of
  one minibatch (exactly on-policy: neither side computes old log-probs), KL k3 in the
  loss with coefficient β (none at β = 0), AdamW (lr 1e-6, no weight decay), gradient
  clipping at 1.0, fp32, no evaluation, no checkpoint, metrics every 10 steps;
- prompts: random words, ``--prompt-length`` each.

Each side runs in a fresh process, alternating, with ``torch.set_num_threads(--threads)``
(the vLLM engine bound to as many cores); the first ``--warmup`` iterations are not timed.
CPU time per iteration is the process's (all threads), plus, for ``rlhfkit-vllm``, the
engine process's; peak memory is the training process's peak RSS from the first step,
plus the engine's peak RSS for ``rlhfkit-vllm``. The sampled lengths differ run to run
(different RNGs); each row shows its mean response length. Results: docs/results-engines.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dpo_step import TRL_MISSING, StepClock, build_stage  # the same clock, memory readings and stage

LR, EPS, CLIP, GRADIENT_CLIP, LOG_EVERY, SEED = 1e-6, 1e-8, 0.2, 1.0, 10, 0
REWARD = '''\
def distinct(prompts, completions, **kwargs):
    """Distinct words per word of each completion."""
    return [len(set(c.split())) / (1 + len(c.split())) for c in completions]
'''


def prepare(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from rlhfkit import StageContext, load_plugins, ref
    from rlhfkit.plugins.policy.tokenizer import CHAT_WORDS, SPECIAL_TOKENS
    from rlhfkit.runner import quiet_libraries

    quiet_libraries()
    torch.manual_seed(SEED)
    policy = StageContext(registry=load_plugins().registry).build(ref("policy")(
        name="transformers", tokenizer={"task": "reviews"},
        architecture={"family": "gpt2", "layers": args.layers, "hidden": args.hidden, "heads": args.heads,
                      "max_positions": args.prompt_length + args.new_tokens + 8, "dropout": 0.0}))
    policy.export(workdir / "model")
    words = sorted(set(policy.tokenizer.get_vocab()) - set(SPECIAL_TOKENS) - set(CHAT_WORDS))
    draw = random.Random(SEED)
    with open(workdir / "prompts.jsonl", "w") as handle:
        handle.writelines(json.dumps({"prompt": " ".join(draw.choices(words, k=args.prompt_length))}) + "\n" for _ in range(args.prompts * (args.warmup + args.steps)))
    (workdir / "reward.py").write_text(REWARD)
    return {"parameters": sum(p.numel() for p in policy.model.parameters()), "vocabulary": len(policy.tokenizer)}


def train_rlhfkit(args: argparse.Namespace, workdir: Path, clock: StepClock, engine: str,
                  cache: str = "in-place") -> dict[str, Any]:
    import tempfile as tmp

    from lightning.pytorch.callbacks import Callback

    from rlhfkit.training import MetricsCSV, RNGState, build_trainer

    here = Path(tmp.mkdtemp(prefix="rlhfkit-", dir=workdir))
    rows = args.prompts * args.group
    settings: dict[str, Any] = {
        "algorithm": {"name": "ppo", "lr": LR, "eps": EPS, "weight_decay": 0.0, "warmup_steps": 0,
                      "prompts_per_iteration": args.prompts, "samples_per_prompt": args.group, "epochs": 1,
                      "sampling": {"max_new_tokens": args.new_tokens, "temperature": 1.0},
                      "max_prompt_length": args.prompt_length + 8, "advantages": {"whiten": "none"},
                      "sample_prompts": 0},
        "policy": {"name": "transformers", "path": str(workdir / "model"), "dropout": 0.0},
        "reward": {"name": "python", "function": f"{workdir / 'reward.py'}:distinct"},
        "estimator": {"name": "grpo", "eps": 1e-4},
        "objective": {"name": "ppo-clip", "clip_low": CLIP, "clip_high": CLIP, "aggregation": "global-token-mean"},
        "constraints": ([{"name": "kl", "coef": args.beta, "placement": "loss", "estimator": "k3"}]
                        if args.beta else []),
        "data": {"name": "file", "path": str(workdir / "prompts.jsonl"), "schema": "prompt"},
        "trainer": {"max_steps": args.warmup + args.steps, "batch_size": rows, "micro_batch_size": rows,
                    "gradient_clip": GRADIENT_CLIP, "log_every_n_steps": LOG_EVERY,
                    "accelerator": "gpu" if args.device == "cuda" else "cpu"},
    }
    if engine == "hf":
        settings["engine"] = {"name": "hf", "cache": cache}
    if engine == "vllm":
        cores = sorted(os.sched_getaffinity(0))[: args.threads]
        settings["engine"] = {"name": "vllm", "python": args.vllm_python, "kv_cache_gb": 1.0, "check": "first",
                              "threads_bind": ",".join(map(str, cores)), "threads": args.threads}
    module, stage, stage_dir = build_stage(here, "grpo", settings)
    clock.extra_cpu = lambda: getattr(module.engine, "engine_cpu_s", 0.0)

    class Clock(Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            clock.step_begins()

        def on_train_batch_end(self, *args: Any) -> None:
            clock.step_ends()

    lengths: list[float] = []
    logger = MetricsCSV(stage_dir / "metrics.csv", on_row=lambda step, metrics: lengths.append(
        metrics["response/length"]) if "response/length" in metrics else None)
    trainer = build_trainer(stage.trainer, stage_dir, module.total_steps, [RNGState(), Clock()], logger)
    trainer.fit(module)
    process = getattr(module.engine, "process", None)
    engine_peak = _peak_of(process.pid if process is not None else None)
    module.close_engine()
    return {"steps": trainer.global_step, "length": statistics.fmean(lengths[args.warmup:] or lengths),
            "engine_peak_mb": engine_peak}


def _peak_of(pid: int | None) -> float:
    """Peak RSS (MB) of another live process, 0 when none."""
    if pid is None:
        return 0.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def train_trl(args: argparse.Namespace, workdir: Path, clock: StepClock) -> dict[str, Any]:
    from importlib import util

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    spec = util.spec_from_file_location("bench_reward", workdir / "reward.py")
    reward = util.module_from_spec(spec)
    spec.loader.exec_module(reward)
    model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(workdir / "model")
    tokenizer.padding_side = "left"
    with open(workdir / "prompts.jsonl") as handle:
        dataset = Dataset.from_list([json.loads(line) for line in handle])
    lengths: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            clock.step_begins()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            clock.step_ends()

        def on_log(self, args_: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    rows = args.prompts * args.group
    config = GRPOConfig(
        output_dir=str(workdir / "trl"), max_steps=args.warmup + args.steps, per_device_train_batch_size=rows,
        gradient_accumulation_steps=1, num_generations=args.group, steps_per_generation=1, num_iterations=1,
        max_completion_length=args.new_tokens, temperature=1.0, top_k=0, top_p=1.0, beta=args.beta,
        epsilon=CLIP, loss_type="dapo", scale_rewards="group", learning_rate=LR, adam_epsilon=EPS,
        weight_decay=0.0, warmup_steps=0, lr_scheduler_type="constant", max_grad_norm=GRADIENT_CLIP,
        bf16=False, fp16=False, use_cpu=args.device == "cpu", seed=SEED, logging_steps=1, report_to="none",
        save_strategy="no", eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        gradient_checkpointing=False)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward.distinct], args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Clock()])
    trainer.train()
    return {"steps": trainer.state.global_step, "length": statistics.fmean(lengths[args.warmup:] or lengths),
            "engine_peak_mb": 0.0}


def run_side(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    clock = StepClock(device)
    clock.extra_cpu = lambda: 0.0
    original = clock.step_ends

    def step_ends() -> None:  # the engine process's CPU time counts too
        original()
        clock.cpu_ends[-1] += clock.extra_cpu()

    clock.step_ends = step_ends
    if args.side == "trl":
        out = train_trl(args, Path(args.workdir), clock)
    else:
        out = train_rlhfkit(args, Path(args.workdir), clock, "vllm" if args.side == "rlhfkit-vllm" else "hf",
                            "dynamic" if args.side == "rlhfkit-generate" else args.hf_cache)
    if out["steps"] != args.warmup + args.steps:
        raise RuntimeError(f"{args.side} ran {out['steps']} steps, not {args.warmup + args.steps}")
    summary = clock.summary(args.warmup)
    summary["peak_mb"] += out["engine_peak_mb"]
    Path(args.result).write_text(json.dumps({**out, **summary, "side": args.side, "beta": args.beta}))


def launch(side: str, beta: float, args: argparse.Namespace, workdir: Path, index: int) -> dict[str, Any]:
    result = workdir / f"{side}-{beta}-{index}.json"
    log = workdir / f"{side}-{beta}-{index}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(workdir / "hf-datasets"),
           "TOKENIZERS_PARALLELISM": "false"}
    if side.startswith("rlhfkit"):
        env.setdefault("MKL_CBWR", "AUTO,STRICT")
    command = [sys.executable, __file__, *sys.argv[1:], "--side", side, "--beta-value", str(beta),
               "--threads", str(args.threads), "--workdir", str(workdir), "--result", str(result)]
    with open(log, "w") as handle:
        done = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"the {side} side (beta {beta}) failed with exit code {done.returncode}:\n{tail}")
    return json.loads(result.read_text())


def report(results: list[dict[str, Any]], args: argparse.Namespace, model: dict[str, Any], sides: list[str]) -> None:
    table = Table(title=f"GRPO iteration, rlhfkit vs TRL {version('trl')}: GPT-2 {args.layers} x {args.hidden} "
                        f"({model['parameters'] / 1e6:.2f}M parameters, vocabulary {model['vocabulary']}), "
                        f"{args.prompts} prompts x {args.group} samples x <= {args.new_tokens} tokens, "
                        f"{args.threads} thread(s), {args.device}, fp32")
    columns = ["beta", "side", "iterations/s", "CPU s/iteration", "runs (CPU s)", "mean length", "peak RSS (MB)",
               "iter/s vs TRL", "per CPU-second vs TRL", "peak vs TRL"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("beta", "side") else "right")
    for beta in dict.fromkeys(r["beta"] for r in results):
        stats = {}
        for side in sides:
            runs = [r for r in results if r["beta"] == beta and r["side"] == side]
            stats[side] = {"steps_per_s": statistics.median(r["steps_per_s"] for r in runs),
                           "cpu": statistics.median(r["cpu_ms_per_step"] for r in runs) / 1000,
                           "runs": ", ".join(f"{r['cpu_ms_per_step'] / 1000:.2f}" for r in runs),
                           "length": statistics.fmean(r["length"] for r in runs),
                           "peak": max(r["peak_mb"] for r in runs)}
        trl = stats.get("trl")
        for i, side in enumerate(sides):
            s = stats[side]
            table.add_row(f"{beta:g}" if i == 0 else "", side, f"{s['steps_per_s']:.3f}", f"{s['cpu']:.2f}",
                          s["runs"], f"{s['length']:.1f}", f"{s['peak']:,.0f}",
                          f"{s['steps_per_s'] / trl['steps_per_s']:.2f}x" if trl else "",
                          f"{trl['cpu'] / s['cpu']:.2f}x" if trl else "",
                          f"{s['peak'] / trl['peak']:.2f}x" if trl else "", end_section=i == len(sides) - 1)
    Console(width=220).print(table)
    print(f"{args.warmup} warm-up + {args.steps} timed iterations, {args.repeats} run(s) per side, alternating; "
          f"torch {torch.__version__}, transformers {version('transformers')}, lightning {version('lightning')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--beta", choices=("both", "0", "0.04"), default="both")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--sides", default="rlhfkit,trl")
    parser.add_argument("--hf-cache", choices=("in-place", "dynamic", "static"), default="in-place",
                        help="the rlhfkit side's hf engine KV cache (rlhfkit-generate: transformers generate "
                             "with its dynamic cache)")
    parser.add_argument("--vllm-python", default=os.environ.get("RLHFKIT_VLLM_PYTHON"))
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--beta-value", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side is not None:
        args.beta = args.beta_value
        run_side(args)
        return
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        raise SystemExit(TRL_MISSING.format(python=sys.executable))
    sides = args.sides.split(",")
    betas = (0.0, 0.04) if args.beta == "both" else (float(args.beta),)
    with tempfile.TemporaryDirectory(prefix="grpo-iteration-") as tmp:
        workdir = Path(tmp)
        model = prepare(args, workdir)
        results = [launch(side, beta, args, workdir, i)
                   for beta in betas for i in range(args.repeats) for side in sides]
    report(results, args, model, sides)


if __name__ == "__main__":
    main()
