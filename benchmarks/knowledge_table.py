"""The knowledge-boundary comparison table from runs of recipes/knowledge-comparison.yaml.

    python benchmarks/knowledge_table.py runs/knowledge-comparison-seed0 runs/knowledge-comparison-seed1

For each method (SFT = the policy before RL, read from the ppo stage's first
evaluation; then dpo, online-dpo, ppo, grpo) prints mean ± std over the run directories
(sample std, n − 1) of: the wrong-answer rate and the "i do not know" rate on held-out
unknown entities, the accuracy on known entities, the mean gold score, and the stage
time. Greedy answers to the task's prompts-eval split (100 known + 100 unknown-eval).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

METHODS = [("SFT", "ppo", "before_"), ("DPO", "dpo", ""), ("online DPO", "online-dpo", ""), ("PPO", "ppo", ""),
           ("GRPO", "grpo", "")]
COLUMNS = [("unknown: wrong", "task/unknown/wrong"), ("unknown: i do not know", "task/unknown/idk"),
           ("known: correct", "task/known/correct"), ("gold", "gold")]


def cell(values: list[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main(run_dirs: list[str]) -> None:
    summaries = [{stage: json.loads((Path(d) / stage / "summary.json").read_text())
                  for stage in ("ppo", "dpo", "online-dpo", "grpo")} for d in run_dirs]
    print(f"| method | {' | '.join(name for name, _ in COLUMNS)} | stage time (s) |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    for label, stage, prefix in METHODS:
        cells = [cell([s[stage][prefix + key] for s in summaries]) for _, key in COLUMNS]
        time = "–" if prefix else cell([s[stage]["wall_time_s"] for s in summaries], 1)
        print(f"| {label} | {' | '.join(cells)} | {time} |")
    print(f"\n{len(run_dirs)} seed(s): {', '.join(run_dirs)}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(sys.argv[1:])
