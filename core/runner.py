"""Running a recipe: stages in order, each in its own directory of the run.

Run directory layout::

    runs/<name>/recipe.yaml            the fully resolved recipe
    runs/<name>/<stage>/checkpoints/last.ckpt   resumable state (atomic writes)
    runs/<name>/<stage>/export/        the model in transformers format (safetensors)
    runs/<name>/<stage>/metrics.csv    one row per logged step
    runs/<name>/<stage>/summary.json   final metrics
    runs/<name>/<stage>/report.json    tables printed at the end of a run (optional)
    runs/<name>/<stage>/DONE.json      written last: the stage is finished

A finished stage is skipped on re-run; an interrupted one resumes from its checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from rich.console import Console
from rich.table import Table

from rlhfkit.context import StageContext
from rlhfkit.errors import UserError
from rlhfkit.files import atomic_write_text
from rlhfkit.plugin_manager import Plugins
from rlhfkit.recipe import Recipe, Stage
from rlhfkit.training import (
    CHECKPOINT_NAME,
    MetricsCSV,
    ResumableCheckpoint,
    RNGState,
    build_trainer,
    rank_seed,
)

DONE_NAME = "DONE.json"
REPORT_NAME = "report.json"
STATE_NAME = "stage.json"
# Settings that may change between an interrupted run and its resume.
_RESUMABLE_CHANGES = ("accelerator", "devices", "num_nodes", "strategy", "log_every_n_steps",
                      "checkpoint_every_n_steps")


def process_rank() -> int:
    """Global rank of this process as the launcher set it (0 before any launch)."""
    for var in ("RANK", "GLOBAL_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    node = int(os.environ.get("NODE_RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return local if node == 0 else node * int(os.environ.get("LOCAL_WORLD_SIZE", "1")) + local


def stage_fingerprint(stage: Stage) -> str:
    trainer = {k: v for k, v in stage.raw.get("trainer", {}).items() if k not in _RESUMABLE_CHANGES}
    return Stage(stage.name, stage.algorithm, stage.slots, stage.trainer,
                 {**stage.raw, "trainer": trainer}).fingerprint()


def quiet_libraries() -> None:
    """Keep the console for rlhfkit's own output: no Lightning banners and tips, no
    per-file progress bars from transformers."""
    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    # RL algorithms keep every model in eval mode on purpose (no dropout during RL)
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def run_recipe(recipe: Recipe, plugins: Plugins, console: Console | None = None) -> dict[str, dict[str, Any]]:
    """Run every stage of ``recipe`` in order; return ``{stage: summary}``."""
    quiet_libraries()
    console = console or Console()
    main = process_rank() == 0
    run_dir = recipe.run_dir
    if main:
        atomic_write_text(run_dir / "recipe.yaml", f"# resolved from {recipe.path}\n" + recipe.to_yaml())
    exports: dict[str, Path] = {}
    summaries: dict[str, dict[str, Any]] = {}
    for stage in recipe.stages:
        stage_dir = run_dir / stage.name
        fingerprint = stage_fingerprint(stage)
        done = stage_dir / DONE_NAME
        if done.is_file():
            info = json.loads(done.read_text())
            _check_same(stage, stage_dir, info.get("fingerprint"), fingerprint, "finished")
            if main:
                console.print(f"[bold]stage {stage.name}[/]: already finished, skipping ({done})")
            summaries[stage.name] = info["summary"]
        else:
            summaries[stage.name] = run_stage(recipe, stage, plugins, exports, fingerprint, console)
        exports[stage.name] = stage_dir / "export"
    if main:
        print_summary(summaries, console)
        for stage in recipe.stages:
            print_report(run_dir / stage.name / REPORT_NAME, console)
    return summaries


def run_stage(recipe: Recipe, stage: Stage, plugins: Plugins, exports: dict[str, Path],
              fingerprint: str, console: Console) -> dict[str, Any]:
    stage_dir = recipe.run_dir / stage.name
    state_file = stage_dir / STATE_NAME
    checkpoint = stage_dir / "checkpoints" / CHECKPOINT_NAME
    if checkpoint.is_file() and state_file.is_file():
        _check_same(stage, stage_dir, json.loads(state_file.read_text()).get("fingerprint"),
                    fingerprint, "interrupted")
    rank = process_rank()
    if rank == 0:
        atomic_write_text(state_file, json.dumps({"fingerprint": fingerprint}))
    seed = rank_seed(recipe.run.seed, rank)
    L.seed_everything(seed, workers=True, verbose=False)
    torch.use_deterministic_algorithms(stage.trainer.deterministic, warn_only=True)

    hook = plugins.hook
    context = StageContext(registry=plugins.registry, stage=stage.name, stage_dir=stage_dir,
                           seed=recipe.run.seed, exports=dict(exports), slots=stage.slots,
                           trainer=stage.trainer)
    module = plugins.registry.build(stage.algorithm, context)
    if getattr(module, "evaluation_only", False):
        return run_evaluation(module, stage, stage_dir, fingerprint, console, hook)
    logger = MetricsCSV(stage_dir / "metrics.csv",
                        on_row=lambda step, m: hook.rlhfkit_on_metrics(stage=stage.name, step=step, metrics=m))
    saver = ResumableCheckpoint(
        stage_dir / "checkpoints", stage.trainer.checkpoint_every_n_steps,
        on_saved=lambda step, path: hook.rlhfkit_on_checkpoint(stage=stage.name, step=step, path=path))
    trainer = build_trainer(stage.trainer, stage_dir, module.total_steps, [saver, RNGState()], logger)
    resume = checkpoint.is_file()
    if rank == 0:
        verb = "resuming from " + str(checkpoint) if resume else "starting"
        console.print(f"[bold]stage {stage.name}[/] ({stage.algorithm.name}): {verb}; "
                      f"{module.total_steps} steps, {stage.trainer.explain_batch()}"
                      + (f"; {module.explain()}" if hasattr(module, "explain") else ""))
    started = time.perf_counter()
    trainer.fit(module, ckpt_path=str(checkpoint) if resume else None)
    summary: dict[str, Any] = {}
    if trainer.is_global_zero:
        summary = finish_stage(module, stage, stage_dir, fingerprint, started, hook)
    trainer.strategy.barrier()
    if not trainer.is_global_zero:
        summary = json.loads((stage_dir / DONE_NAME).read_text())["summary"]
    return summary


def run_evaluation(module: Any, stage: Stage, stage_dir: Path, fingerprint: str, console: Console,
                   hook: Any) -> dict[str, Any]:
    """A stage that trains nothing (``evaluation_only``): ``run()``, then on rank 0
    ``export`` and ``summary``. Every rank measures the same thing; only rank 0 writes."""
    main = process_rank() == 0
    if main:
        console.print(f"[bold]stage {stage.name}[/] ({stage.algorithm.name}): evaluating")
    started = time.perf_counter()
    module.run()
    if main:
        return finish_stage(module, stage, stage_dir, fingerprint, started, hook)
    return {**module.summary(), "wall_time_s": round(time.perf_counter() - started, 2)}


def finish_stage(module: Any, stage: Stage, stage_dir: Path, fingerprint: str, started: float,
                 hook: Any) -> dict[str, Any]:
    """On rank 0: export, then summary.json and, written last, DONE.json; returns the summary."""
    export_dir = stage_dir / "export"
    module.export(export_dir)
    summary = {**module.summary(), "wall_time_s": round(time.perf_counter() - started, 2)}
    if export_dir.is_dir():  # an evaluation stage writes a report, not a model
        summary["export"] = str(export_dir)
    atomic_write_text(stage_dir / "summary.json", json.dumps(summary, indent=2))
    atomic_write_text(stage_dir / DONE_NAME, json.dumps({"fingerprint": fingerprint, "summary": summary}))
    hook.rlhfkit_on_stage_end(stage=stage.name, stage_dir=stage_dir, summary=summary)
    return summary


def _check_same(stage: Stage, stage_dir: Path, saved: str | None, current: str, state: str) -> None:
    if saved is not None and saved != current:
        raise UserError(
            f"stage {stage.name!r} in {stage_dir} was {state} with different settings than the "
            f"recipe now gives. Use a new run directory (run.dir=... or run.name=...) or delete "
            f"{stage_dir} to start that stage again."
        )


def print_summary(summaries: dict[str, dict[str, Any]], console: Console) -> None:
    table = Table(title="rlhfkit run summary")
    table.add_column("stage")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for stage, summary in summaries.items():
        # task breakdowns (keys with a "/") stay in summary.json; reports print their own tables
        numbers = {k: v for k, v in summary.items()
                   if isinstance(v, float | int) and not isinstance(v, bool) and "/" not in k}
        for i, (key, value) in enumerate(numbers.items()):
            table.add_row(stage if i == 0 else "", key, f"{value:.4g}", end_section=i == len(numbers) - 1)
    console.print(table)


def print_report(path: Path, console: Console) -> None:
    """Print the tables a stage wrote to ``report.json``: ``{"tables": [{"title",
    "columns", "rows", "caption", "sections"}]}`` (``sections``: a rule every N rows)."""
    if not path.is_file():
        return
    for spec in json.loads(path.read_text()).get("tables", []):
        table = Table(title=spec.get("title"), caption=spec.get("caption") or None)
        for i, column in enumerate(spec["columns"]):
            table.add_column(column, justify="left" if i == 0 or column in ("answer", "prompt", "model") else "right")
        every = spec.get("sections") or 0
        for i, row in enumerate(spec["rows"]):
            table.add_row(*[str(cell) for cell in row], end_section=bool(every) and (i + 1) % every == 0)
        console.print(table)
