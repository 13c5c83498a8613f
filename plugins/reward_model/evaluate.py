"""Evaluate an exported reward model on held-out preference pairs, outside any run.

    python -m rlhfkit.plugins.reward_model.evaluate MODEL_DIR --task reviews \\
        [--split preference-gold] [--limit N] [--out DIR] [--max-length 128]
    python -m rlhfkit.plugins.reward_model.evaluate MODEL_DIR --file pairs.jsonl

Prints the same report as the reward-model stage (accuracy, chosen and rejected score
statistics, calibration error, a table of example pairs with their scores) and writes
``report.json`` and ``calibration.png`` to ``--out`` (default ``MODEL_DIR/../eval-cli``).
Scores are raw (before the stored normalisation), as in the stage's report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from rlhfkit import Preference, StageContext, UserError, load_plugins, ref


class _OneProcess:
    """The ``reduce`` a Lightning strategy offers, for a single process."""

    @staticmethod
    def reduce(x: Any, reduce_op: str = "sum") -> Any:
        return x


def evaluate(model_dir: Path, rows: list[Preference], out: Path, max_length: int = 128,
             examples: int = 4) -> dict:
    from rlhfkit.plugins.reward_model.report import evaluate_pairs, write_report
    from rlhfkit.plugins.reward_model.scoring import RewardModelSource

    config = SimpleNamespace(path=str(model_dir), from_stage=None, max_length=max_length, batch_size=64,
                             normalize=False)
    source = RewardModelSource.load(config, None)
    prompts = [r.prompt for r in rows]
    chosen = source.score(prompts, [r.chosen for r in rows])
    rejected = source.score(prompts, [r.rejected for r in rows])
    result = evaluate_pairs(chosen, rejected, _OneProcess())
    shown = list(zip(rows[:examples], chosen[:examples].tolist(), rejected[:examples].tolist(), strict=True))
    write_report(out, result, shown)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhfkit.plugins.reward_model.evaluate",
                                     description="Evaluate an exported reward model on preference pairs.")
    parser.add_argument("model", type=Path, help="an exported reward model directory")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", help="a built-in task (its --split is used)")
    source.add_argument("--file", help="a local jsonl/csv/parquet file of prompt/chosen/rejected rows")
    parser.add_argument("--split", default="preference-gold", help="the task's split (default preference-gold)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N pairs")
    parser.add_argument("--max-length", type=int, default=128, help="prompt + response tokens scored")
    parser.add_argument("--out", type=Path, default=None, help="report directory")
    args = parser.parse_args(argv)
    try:
        context = StageContext(registry=load_plugins().registry)
        dataset = (ref("dataset")(name="builtin", task=args.task, split=args.split, limit=args.limit) if args.task
                   else ref("dataset")(name="file", path=args.file, limit=args.limit))
        rows = list(context.build(dataset).rows())
        if not rows or not all(isinstance(r, Preference) for r in rows):
            raise UserError("evaluation needs preference pairs (prompt, chosen, rejected); the data given has "
                            f"{type(rows[0]).__name__ if rows else 'no'} rows")
        evaluate(args.model, rows, args.out or args.model.parent / "eval-cli", args.max_length)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
