"""Rollout throughput of the generation engines: ``hf`` (transformers ``generate`` with its
dynamic or static KV cache, and rlhfkit's in-place cache) against ``vllm``, on the same
model, prompts and sampling settings.

    python benchmarks/rollout_engines.py --vllm-python ~/venvs/vllm/bin/python \\
        [--layers 12] [--hidden 768] [--heads 12] [--kv-heads 4] [--vocabulary 32768]
        [--prompts 8] [--samples 8] [--prompt-length 32] [--new-tokens 64]
        [--rollouts 3] [--repeats 2] [--threads 1] [--device cpu|cuda] [--engines hf,hf-static,hf-in-place,vllm]

The model is a Qwen2-style decoder built from a config with a fixed seed (default ~110M
parameters: 12 layers x 768, 12 heads, 4 KV heads, 2048 feed-forward, tied embeddings)
over a byte-level BPE of ``--vocabulary`` tokens trained with ``tokenizers`` on generated
text, saved once; every engine loads those weights through rlhfkit's policy and engine
components, as a stage does. Each rollout samples ``--samples`` responses to each of
``--prompts`` prompts of ``--prompt-length`` random tokens, up to ``--new-tokens`` tokens
(temperature 1, no top-k/top-p), seeded per rollout. Each engine runs in a fresh process,
alternating, ``--repeats`` times; one warm-up rollout, then ``--rollouts`` timed ones.

Measured: response tokens per second (wall), CPU seconds per 1,000 tokens (the sampling
process's CPU time; for ``vllm`` its engine process's, reported by the engine, plus the
trainer's own), the ratio to ``hf`` of each, and for ``vllm`` the time to push the full
weights (``sync``) and to start. With ``--threads N``: ``torch.set_num_threads(N)`` for
``hf``; the vLLM engine is bound to the first N cores of the process's affinity and runs
N threads (``engine.threads``: left to itself, vLLM on CPU runs two threads per bound
core here, and its CPU time per token shows it).
Results: docs/results-engines.md.
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
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

SEED = 0


def prepare(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The model and tokenizer in ``workdir/model``; its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    draw = random.Random(SEED)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(draw.choices(letters, k=draw.randint(2, 9))) for _ in range(60_000)]
    corpus = (" ".join(draw.choices(words, k=200)) for _ in range(3_000))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=args.vocabulary, special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|pad|>")
    torch.manual_seed(SEED)
    config = Qwen2Config(vocab_size=args.vocabulary, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=512, tie_word_embeddings=True,
                         eos_token_id=fast.eos_token_id, bos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(workdir / "model")
    fast.save_pretrained(workdir / "model")
    return {"parameters": sum(p.numel() for p in model.parameters()), "vocabulary": len(fast)}


def run_engine(args: argparse.Namespace) -> None:
    """Child process: one engine, a warm-up and ``--rollouts`` timed rollouts."""
    from rlhfkit import SamplingSettings, StageContext, load_plugins, ref
    from rlhfkit.runner import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    context = StageContext(registry=load_plugins().registry, stage_dir=workdir / f"stage-{args.engine}")
    policy = context.build(ref("policy")(name="transformers", path=str(workdir / "model"), dropout=0.0))
    policy.model.to(args.device).eval()
    if args.engine == "vllm":
        cores = sorted(os.sched_getaffinity(0))[: args.threads]
        settings = {"name": "vllm", "python": args.vllm_python, "kv_cache_gb": 2.0, "check": "never",
                    "threads_bind": ",".join(map(str, cores)), "threads": args.threads}
    else:
        settings = {"name": "hf", "cache": {"hf-static": "static", "hf-in-place": "in-place"}.get(args.engine, "dynamic")}
    engine = context.build(ref("engine")(**settings))
    started = time.perf_counter()
    engine.start(policy)
    start_s = time.perf_counter() - started
    sync_s = None
    if args.engine == "vllm":
        started = time.perf_counter()
        engine.sync(policy)
        sync_s = time.perf_counter() - started
    sampling = SamplingSettings(max_new_tokens=args.new_tokens, temperature=1.0)
    special = set(policy.tokenizer.all_special_ids)
    ids = [i for i in range(len(policy.tokenizer)) if i not in special]
    draw = random.Random(SEED)
    rows = args.prompts * args.samples
    prompt = torch.tensor([draw.choices(ids, k=args.prompt_length) for _ in range(args.prompts)
                           for _ in range(args.samples)], device=args.device)
    mask = torch.ones_like(prompt)
    times, cpus, tokens = [], [], []
    for rollout in range(args.rollouts + 1):
        engine_cpu = getattr(engine, "engine_cpu_s", 0.0)
        cpu, wall = time.process_time(), time.perf_counter()
        out = engine.generate(prompt, mask, sampling, seeds=[1000 * rollout + i for i in range(rows)])
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        cpu += getattr(engine, "engine_cpu_s", 0.0) - engine_cpu
        if rollout:  # the first is the warm-up
            times.append(wall)
            cpus.append(cpu)
            tokens.append(int(out.response_mask.sum()))
    if hasattr(engine, "close"):
        engine.close()
    Path(args.result).write_text(json.dumps({
        "engine": args.engine, "tokens_per_s": sum(tokens) / sum(times), "tokens": statistics.fmean(tokens),
        "cpu_s_per_1k": 1000 * sum(cpus) / sum(tokens), "start_s": start_s, "sync_s": sync_s}))


def launch(engine: str, args: argparse.Namespace, workdir: Path, index: int) -> dict[str, Any]:
    result = workdir / f"{engine}-{index}.json"
    log = workdir / f"{engine}-{index}.log"
    command = [sys.executable, __file__, *sys.argv[1:], "--engine", engine, "--workdir", str(workdir),
               "--result", str(result)]
    with open(log, "w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, check=False,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"the {engine} engine failed (exit code {done.returncode}):\n{tail}")
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--vocabulary", type=int, default=32768)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rollouts", type=int, default=3, help="timed rollouts per run (after one warm-up)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each engine, alternating")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--engines", default="hf,hf-in-place,hf-static,vllm")
    parser.add_argument("--vllm-python", default=os.environ.get("RLHFKIT_VLLM_PYTHON"))
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        run_engine(args)
        return
    engines = args.engines.split(",")
    with tempfile.TemporaryDirectory(prefix="rollout-engines-") as tmp:
        workdir = Path(tmp)
        model = prepare(args, workdir)
        results = [launch(engine, args, workdir, i) for i in range(args.repeats) for engine in engines]
    by = {e: [r for r in results if r["engine"] == e] for e in engines}
    median = {e: {k: statistics.median(r[k] for r in runs) for k in ("tokens_per_s", "cpu_s_per_1k", "tokens")}
              for e, runs in by.items()}
    table = Table(title=f"Rollout: {args.prompts} prompts x {args.samples} samples x <= {args.new_tokens} new tokens "
                        f"(prompt {args.prompt_length}), Qwen2-style {model['parameters'] / 1e6:.0f}M parameters, "
                        f"vocabulary {model['vocabulary']}, {args.threads} thread(s), {args.device}, fp32")
    for column in ("engine", "tokens/s (runs)", "tokens/s", "vs hf", "CPU s / 1k tokens", "CPU vs hf",
                   "tokens per rollout", "start s", "weight push s"):
        table.add_column(column, justify="left" if column == "engine" else "right")
    base = median.get("hf")
    for engine, m in median.items():
        runs = ", ".join(f"{r['tokens_per_s']:.0f}" for r in by[engine])
        sync = [r["sync_s"] for r in by[engine] if r["sync_s"] is not None]
        table.add_row(engine, runs, f"{m['tokens_per_s']:.0f}",
                      f"{m['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "",
                      f"{m['cpu_s_per_1k']:.2f}", f"{base['cpu_s_per_1k'] / m['cpu_s_per_1k']:.2f}x" if base else "",
                      f"{m['tokens']:.0f}", f"{statistics.median(r['start_s'] for r in by[engine]):.1f}",
                      f"{statistics.median(sync):.2f}" if sync else "")
    Console(width=200).print(table)
    from importlib.metadata import version

    print(f"torch {torch.__version__}, transformers {version('transformers')}; {args.repeats} run(s) per engine, "
          f"{args.rollouts} timed rollouts each; medians over runs")


if __name__ == "__main__":
    main()
