"""Markdown table of recipes/reward-objectives.yaml over seeds, from each stage's summary.json.

    python benchmarks/reward_objectives_table.py --baseline pairwise \
        runs/reward-objectives runs/reward-objectives-seed*

Each argument is the run directory of one seed. A cell is the mean over seeds ± the
sample standard deviation (the spread; nothing when there is one seed). Scores are shown
after the reference shift, i.e. relative to SFT demonstrations scoring 0: the summary's
raw ``chosen_mean`` minus ``reward_mean_removed``. Stages without an ``accuracy`` (sft)
are left out.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml

# (column title, function of one summary, decimals)
COLUMNS = [
    ("held-out accuracy vs gold", lambda s: s["accuracy"], 3),
    ("chosen mean", lambda s: s["chosen_mean"] - s.get("reward_mean_removed", 0.0), 2),
    ("rejected mean", lambda s: s["rejected_mean"] - s.get("reward_mean_removed", 0.0), 2),
    ("margin", lambda s: s["margin_mean"], 2),
    ("calibration error", lambda s: s["calibration_error"], 3),
    ("train steps", lambda s: s["steps"], 0),
    ("stage wall time (s)", lambda s: s["wall_time_s"], 1),
]


def cell(values: list[float], decimals: int, signed: bool = False) -> str:
    """``mean ± sample std`` (the mean alone for one value or a constant integer)."""
    mean = statistics.fmean(values)
    text = f"{mean:+.{decimals}f}" if signed else f"{mean:.{decimals}f}"
    if len(values) < 2 or (decimals == 0 and len(set(values)) == 1):
        return text
    return f"{text} ± {statistics.stdev(values):.{decimals}f}"


def table(run_dirs: list[Path], baseline: str | None = None) -> str:
    """The markdown table. With ``baseline`` (a stage), a column gives each stage's accuracy
    minus the baseline's, paired by seed (every stage of one seed shares its SFT model and
    evaluation pairs, so the paired spread is smaller than the spread of the accuracies)."""
    order: list[str] = []
    summaries: dict[str, list[dict]] = {}
    for run_dir in run_dirs:
        # stages in recipe order, from the resolved recipe the run wrote
        recipe_order = list(yaml.safe_load((run_dir / "recipe.yaml").read_text())["stages"])
        for stage in recipe_order:
            if not (run_dir / stage / "summary.json").exists():
                continue
            summary = json.loads((run_dir / stage / "summary.json").read_text())
            if "accuracy" not in summary:
                continue
            if stage not in summaries:
                order.append(stage)
                summaries[stage] = []
            summaries[stage].append(summary)
    header = ["stage", "seeds", COLUMNS[0][0],
              *([f"accuracy − `{baseline}` (paired)"] if baseline else []),
              *(title for title, _, _ in COLUMNS[1:])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for stage in order:
        rows = summaries[stage]
        cells = [f"`{stage}`", str(len(rows))]
        cells += [cell([float(get(s)) for s in rows], decimals) for _, get, decimals in COLUMNS]
        if baseline:
            if len(summaries[baseline]) != len(rows):
                raise SystemExit(f"{stage} and {baseline} ran in different numbers of seeds")
            diffs = [s["accuracy"] - b["accuracy"] for s, b in zip(rows, summaries[baseline], strict=True)]
            cells.insert(3, "–" if stage == baseline else cell(diffs, 3, signed=True))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="one run directory per seed")
    parser.add_argument("--baseline", default=None,
                        help="a stage: add each stage's accuracy minus this stage's, paired by seed")
    args = parser.parse_args()
    print(table(args.run_dirs, args.baseline))


if __name__ == "__main__":
    main()
