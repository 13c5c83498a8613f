"""How many human rankings make a useful reward model on the built-in task?

    python benchmarks/human_feedback.py [--out runs/human-feedback-bench] [--sizes 25 50 100 200 400]

The gold scorer stands in for the person, through the same HTTP API the labelling page uses:

1. SFT (recipes/sft.yaml) into OUT/sft-run (skipped when done).
2. A labelling session: `rlhfkit label OUT/labels/round-1 --from-stage OUT/sft-run/sft`,
   K = 4 responses sampled from the SFT model for each of max(sizes) prompts of the task's
   `prompts` split.
3. `rlhfkit label` serves it; the simulated labeller ranks every item through HTTP as
   "gold": responses ordered by gold score, tied when equal after rounding to 0.25 (the
   task's own tie rule for its ranking split). Submissions per second are timed.
4. For each N in sizes, a reward model from the SFT model (InstructGPT's K-wise loss) on
   the first N rankings, next to the same labelling budget (4N responses shown) of the
   task's automatically labelled pairs: 2N pairs with the quickstart's Bradley-Terry
   label noise (`preference`, label_temperature 0.5), and 2N noiseless ones; and the
   rankings again with Christiano et al.'s tie-aware loss (`ties`). Every reward model gets
   the same optimizer steps and 64 responses per step, over --seeds seeds (the reward
   model's initialisation and data order), and is scored on 2,000 held-out pairs labelled
   by gold without noise (`preference-gold`, eval_size 2000).

Prints a markdown table (mean ± sample std over seeds) and writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STEPS = 60
EVAL = "{name: builtin, task: {name: reviews, eval_size: 2000}, split: preference-gold}"


def rlhfkit(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "rlhfkit", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"rlhfkit {' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return result


def rm_recipe(path: Path, sft_export: Path, objective: str, data: str, batch: int) -> Path:
    path.write_text(f"""# a reward model on one labelled set (benchmarks/human_feedback.py)
run: {{name: {path.stem}}}
stages:
  rm:
    algorithm: {{name: reward-model, lr: 1.0e-3, warmup_steps: 5, max_length: 64}}
    backbone: {{name: transformers, path: {sft_export}, dropout: 0.0}}
    objective: {objective}
    data: {data}
    eval_data: {EVAL}
    trainer: {{max_steps: {STEPS}, batch_size: {batch}, micro_batch_size: {batch}, log_every_n_steps: 10,
              checkpoint_every_n_steps: 1000}}
""")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/human-feedback-bench"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100, 200, 400])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    # 1. SFT
    t0 = time.time()
    rlhfkit("run", str(REPO / "recipes" / "sft.yaml"), f"run.dir={out / 'sft-run'}")
    sft = out / "sft-run" / "sft"
    print(f"sft: {time.time() - t0:.0f} s", flush=True)

    # 2. the session: K = 4 samples of the SFT model per prompt
    session = out / "labels" / "round-1"
    if not (session / "session.json").exists():
        t0 = time.time()
        rlhfkit("label", str(session), "--from-stage", str(sft), "--k", "4", "--items", str(max(args.sizes)),
                "--prompts", "{name: builtin, task: reviews, split: prompts}", "--max-new-tokens", "24",
                "--no-serve")
        print(f"sampled the session: {time.time() - t0:.0f} s", flush=True)

    # 3. the gold scorer ranks every item through the page's HTTP API
    import rlhfkit as kit
    from rlhfkit.label.simulate import LabelClient, rank_session
    from rlhfkit.registry import ref

    gold = kit.load_plugins().registry.build(ref("reward")(name="gold", task="reviews"), None)
    server = subprocess.Popen([sys.executable, "-m", "rlhfkit", "label", str(session), "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert server.stdout is not None
        port = int(re.search(r":(\d+)/", server.stdout.readline()).group(1))
        t0 = time.time()
        ranked = rank_session(LabelClient(f"http://127.0.0.1:{port}"), "gold",
                              lambda p, r: gold.score(p, r).tolist(), tie_precision=0.25)
        seconds = time.time() - t0
    finally:
        server.terminate()
        server.wait()
    rows = [json.loads(line) for line in (session / "rankings.jsonl").read_text().splitlines()]
    unranked = (session / "unranked.jsonl")
    tied_all = len(unranked.read_text().splitlines()) if unranked.exists() else 0
    print(f"ranked {ranked} items through HTTP in {seconds:.1f} s ({ranked / max(seconds, 1e-9):.0f} per s); "
          f"{len(rows)} rankings, {tied_all} with every response tied", flush=True)

    # 4. reward models at each size
    results: dict[str, dict[int, list[float]]] = {}
    for n in args.sizes:
        subset = out / f"rankings-{n}.jsonl"
        subset.write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))
        runs = {
            "human rankings (K-wise)": (rm_recipe(out / f"rm-human-{n}.yaml", sft / "export", "kwise",
                                                  f"{{name: file, path: {subset}, schema: ranking}}", 16)),
            "human rankings (ties)": (rm_recipe(out / f"rm-ties-{n}.yaml", sft / "export", "ties",
                                                f"{{name: file, path: {subset}, schema: ranking}}", 16)),
            "auto pairs, BT noise": (rm_recipe(out / f"rm-auto-{n}.yaml", sft / "export", "pairwise",
                                               f"{{name: builtin, task: reviews, split: preference, limit: {2 * n}}}",
                                               32)),
            "auto pairs, noiseless": (rm_recipe(
                out / f"rm-clean-{n}.yaml", sft / "export", "pairwise",
                f"{{name: builtin, task: {{name: reviews, label_temperature: 1.0e-6}}, split: preference, "
                f"limit: {2 * n}}}", 32)),
        }
        for name, recipe in runs.items():
            for seed in range(args.seeds):
                run_dir = out / f"{recipe.stem}-seed{seed}"
                t0 = time.time()
                rlhfkit("run", str(recipe), f"run.dir={run_dir}", f"run.seed={seed}")
                accuracy = json.loads((run_dir / "rm" / "summary.json").read_text())["accuracy"]
                results.setdefault(name, {}).setdefault(n, []).append(accuracy)
                print(f"  {name:26s} N={n:4d} seed {seed}: accuracy {accuracy:.3f} ({time.time() - t0:.0f} s)",
                      flush=True)

    head = "| labels (budget: 4N responses shown) | " + " | ".join(f"N = {n}" for n in args.sizes) + " |"
    lines = [head, "|---|" + "---|" * len(args.sizes)]
    for name, by_size in results.items():
        lines.append(f"| {name} | " + " | ".join(_cell(by_size[n]) for n in args.sizes) + " |")
    print("\n".join(lines))
    (out / "results.json").write_text(json.dumps({"sizes": args.sizes, "accuracy": results,
                                                  "ranked_per_second": ranked / max(seconds, 1e-9),
                                                  "rankings": len(rows), "all_tied": tied_all}, indent=2))


def _cell(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


if __name__ == "__main__":
    main()
