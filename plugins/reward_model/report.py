"""Reward-model evaluation: accuracy, score statistics, calibration, examples (seed 002)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torchmetrics.classification import BinaryAccuracy

BINS = 10


def evaluate_pairs(chosen: torch.Tensor, rejected: torch.Tensor, strategy: Any,
                   index: torch.Tensor | None = None) -> dict[str, Any]:
    """Metrics of held-out pairs, reduced over ranks.

    ``chosen, rejected: [N]`` scores of this rank's pairs; ``index: [N]`` their positions
    in the whole evaluation set (default ``0..N-1``). For calibration each pair is shown
    in a fixed orientation (even positions chosen-first, odd ones rejected-first), so
    every device count gives the same bins: the
    predicted probability that the first is chosen is ``sigmoid(r_first - r_second)``,
    compared per bin with how often it was chosen. Accuracy is torchmetrics'
    ``BinaryAccuracy`` on those predictions (= the fraction of pairs with ``r_chosen >
    r_rejected``), synchronised across DDP ranks.
    """
    index = torch.arange(len(chosen), device=chosen.device) if index is None else index.to(chosen.device)
    flip = index % 2 == 1
    first = torch.where(flip, rejected, chosen)
    second = torch.where(flip, chosen, rejected)
    predicted = torch.sigmoid(first - second)
    observed = (~flip).long()
    accuracy = BinaryAccuracy().to(chosen.device)
    accuracy.update(predicted, observed)

    def total(x: torch.Tensor) -> torch.Tensor:
        return strategy.reduce(x.double(), reduce_op="sum")

    bins = (predicted * BINS).long().clamp(max=BINS - 1)
    counts = total(torch.zeros(BINS, device=chosen.device).index_add_(0, bins, torch.ones_like(predicted)))
    p_sums = total(torch.zeros(BINS, device=chosen.device).index_add_(0, bins, predicted))
    o_sums = total(torch.zeros(BINS, device=chosen.device).index_add_(0, bins, observed.float()))
    n = counts.sum()

    def mean_std(x: torch.Tensor) -> tuple[float, float]:
        s, s2 = total(x.sum()), total((x.double() ** 2).sum())
        mean = s / n
        return float(mean), float(((s2 / n - mean**2) * n / (n - 1).clamp(min=1)).clamp(min=0).sqrt())

    chosen_mean, chosen_std = mean_std(chosen)
    rejected_mean, rejected_std = mean_std(rejected)
    filled = counts > 0
    ece = float(((p_sums - o_sums).abs()[filled]).sum() / n)
    return {
        "accuracy": float(accuracy.compute()),
        "pairs": int(n),
        "chosen_mean": chosen_mean, "chosen_std": chosen_std,
        "rejected_mean": rejected_mean, "rejected_std": rejected_std,
        "margin_mean": chosen_mean - rejected_mean,
        "calibration_error": ece,
        "bins": {"count": counts.tolist(), "predicted": (p_sums / counts.clamp(min=1)).tolist(),
                 "observed": (o_sums / counts.clamp(min=1)).tolist()},
    }


def write_report(directory: Path, result: dict[str, Any], examples: list[tuple[Any, float, float]],
                 console: Console | None = None) -> None:
    """``report.json``, ``calibration.png`` and a printed table of example pairs."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "report.json").write_text(json.dumps(result, indent=2))
    plot_calibration(result["bins"], directory / "calibration.png", result["accuracy"])
    console = console or Console()
    table = Table(title=f"reward model on held-out pairs: accuracy {result['accuracy']:.3f}, "
                        f"chosen {result['chosen_mean']:.2f} ± {result['chosen_std']:.2f}, "
                        f"rejected {result['rejected_mean']:.2f} ± {result['rejected_std']:.2f}")
    for column in ("prompt", "good answer", "score", "bad answer", "score"):
        table.add_column(column, justify="right" if column == "score" else "left")
    for row, good, bad in examples:
        table.add_row(row.prompt, row.chosen, f"{good:.2f}", row.rejected, f"{bad:.2f}")
    console.print(table)


def plot_calibration(bins: dict[str, list[float]], path: Path, accuracy: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [i for i, c in enumerate(bins["count"]) if c > 0]
    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    axis.plot([bins["predicted"][i] for i in shown], [bins["observed"][i] for i in shown], marker="o",
              label=f"reward model (accuracy {accuracy:.3f})")
    axis.set_xlabel("predicted P(first is chosen) = sigmoid(r1 - r2)")
    axis.set_ylabel("observed frequency")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
