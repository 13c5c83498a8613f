"""Plot and tabulate recipes/ppo-kl-ablation.yaml: proxy vs gold reward with and without
the KL constraint.

    python benchmarks/ppo_kl_plot.py runs/ppo-kl-ablation docs/images/ppo-kl-ablation.png

Reads each PPO stage's metrics.csv (the held-out evaluations: greedy responses to the
task's prompts-eval prompts, logged as eval/*) and writes one PNG with three panels
(proxy reward, gold score, KL to the SFT model) and prints a markdown table.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

STAGES = {"ppo-kl": "with KL (coef 0.05)", "ppo-no-kl": "without KL"}
PANELS = [("eval/proxy", "proxy reward (reward model)"), ("eval/gold", "gold score (the truth)"),
          ("eval/kl", "KL to SFT (nats per response)")]


def evaluations(stage_dir: Path) -> list[dict[str, float]]:
    with open(stage_dir / "metrics.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("eval/gold")]
    return [{k: float(v) for k, v in r.items() if v} for r in rows]


def main(run_dir: str, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {stage: evaluations(Path(run_dir) / stage) for stage in STAGES}
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for axis, (metric, title) in zip(axes, PANELS, strict=True):
        for stage, label in STAGES.items():
            axis.plot([r["step"] for r in data[stage]], [r[metric] for r in data[stage]], marker="o",
                      markersize=3, label=label)
        axis.set_title(title)
        axis.set_xlabel("optimizer step (4 per iteration)")
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png, dpi=110)
    print("| stage | step | proxy | gold | KL | length |")
    print("|---|---|---|---|---|---|")
    for stage in STAGES:
        rows = data[stage]
        peak = max(rows, key=lambda r: r["eval/gold"])
        for name, row in (("start", rows[0]), ("best gold", peak), ("end", rows[-1])):
            print(f"| `{stage}` ({name}) | {int(row['step'])} | {row['eval/proxy']:.2f} | {row['eval/gold']:.2f} | "
                  f"{row['eval/kl']:.2f} | {row['eval/length']:.1f} |")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
