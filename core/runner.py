"""Running a recipe: stages in order, each in its own directory of the run.

Run directory layout::

    runs/<name>/recipe.yaml            the fully resolved recipe
    runs/<name>/<stage>/checkpoints/step-N.ckpt resumable state (atomic writes; the newest
                                            trainer.keep_checkpoints are kept)
    runs/<name>/<stage>/export/        the model in transformers format (safetensors)
    runs/<name>/<stage>/metrics.csv    one row per logged step
    runs/<name>/<stage>/summary.json   final metrics
    runs/<name>/<stage>/report.json    tables printed at the end of a run (optional)
    runs/<name>/<stage>/DONE.json      written last: the stage is finished (with its export's sizes)

A stage goes train -> finalise -> done. A finished stage is skipped on re-run once its
export checks out; an interrupted one resumes from its newest loadable checkpoint, and
one resumed at its last step is finalised again (docs/faults.md).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
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
from rlhfkit.provenance import code_changes, stage_code, upstream_changes
from rlhfkit.recipe import Recipe, Stage
from rlhfkit.rundir import (
    RunLock,
    disk_full_error,
    export_manifest,
    is_disk_full,
    read_json_file,
    remove_stale_temporaries,
    verify_export,
)
from rlhfkit.trackers import build_trackers, close_trackers, identity
from rlhfkit.training import (
    Finaliser,
    MetricsCSV,
    NonFiniteError,
    ResumableCheckpoint,
    RNGState,
    build_trainer,
    check_finite_weights,
    checkpoint_files,
    latest_checkpoint,
    rank_seed,
)

DONE_NAME = "DONE.json"
REPORT_NAME = "report.json"
STATE_NAME = "stage.json"
# Settings that may change between an interrupted run and its resume.
_RESUMABLE_CHANGES = ("accelerator", "devices", "num_nodes", "strategy", "log_every_n_steps",
                      "checkpoint_every_n_steps", "keep_checkpoints", "on_nan", "console_metrics")


_LAUNCH_VARIABLES = ("RANK", "GLOBAL_RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                     "GROUP_RANK")
# set by the first process of a run; the processes Lightning launches inherit it
_LAUNCHED = "RLHFKIT_RUN_LAUNCHED"


def process_rank() -> int:
    """Global rank of this process as the launcher set it (0 before any launch)."""
    for var in ("RANK", "GLOBAL_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    node = int(os.environ.get("NODE_RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return local if node == 0 else node * int(os.environ.get("LOCAL_WORLD_SIZE", "1")) + local


def check_launch_environment(recipe: Recipe, console: Console) -> None:
    """Rank variables left in the environment (an earlier job, a shell profile) must not
    silently change the seed or which process writes. A recipe on one device ignores
    them (removed, with a note); a multi-device recipe needs them to be whole numbers
    within its world. The processes a run launches itself are not checked again."""
    if os.environ.get(_LAUNCHED):
        return
    present = {k: os.environ[k] for k in _LAUNCH_VARIABLES if k in os.environ}
    world = max((s.trainer.world_size for s in recipe.stages), default=1)
    nodes = max((s.trainer.num_nodes for s in recipe.stages), default=1)
    if present and world == 1:
        for name in present:
            del os.environ[name]
        console.print(f"note: ignoring {', '.join(f'{k}={v}' for k, v in present.items())} from the environment: "
                      f"every stage of this recipe runs in one process", highlight=False)
    elif present:
        limits = {"RANK": world, "GLOBAL_RANK": world, "LOCAL_RANK": world, "NODE_RANK": nodes,
                  "WORLD_SIZE": world + 1, "LOCAL_WORLD_SIZE": world + 1, "GROUP_RANK": nodes}
        for name, text in present.items():
            if not text.strip().isdigit() or int(text) >= limits[name]:
                raise UserError(
                    f"the environment sets {name}={text!r}, which does not fit this recipe (at most {world} "
                    f"processes on {nodes} node(s)). Unset {name} (it is left over from another job), or "
                    f"launch with the values your cluster gives this process.")
    if world > 1:
        os.environ[_LAUNCHED] = "1"  # the processes Lightning launches next are not checked again


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
    """Run every stage of ``recipe`` in order; return ``{stage: summary}``.

    The first process holds the run directory's lock for the whole run
    (:class:`RunLock`) and clears what interrupted writes left behind."""
    quiet_libraries()
    console = console or Console()
    check_launch_environment(recipe, console)
    main = process_rank() == 0
    lock = RunLock(recipe.run_dir)
    if main:
        lock.acquire()
    try:
        if main:
            for path in remove_stale_temporaries(recipe.run_dir):
                console.print(f"removed {path}, left by an interrupted write", highlight=False)
        return _run_stages(recipe, plugins, console, main)
    except Exception as exc:
        if is_disk_full(exc):
            raise disk_full_error(exc, recipe.run_dir, _intact_checkpoints(recipe)) from None
        raise
    finally:
        lock.release()


def _run_stages(recipe: Recipe, plugins: Plugins, console: Console, main: bool) -> dict[str, dict[str, Any]]:
    run_dir = recipe.run_dir
    if main:
        atomic_write_text(run_dir / "recipe.yaml", f"# resolved from {recipe.path}\n" + recipe.to_yaml())
    exports: dict[str, Path] = {}
    summaries: dict[str, dict[str, Any]] = {}
    upstream: dict[str, str] = {}  # earlier stage -> the id of the finish its stage directory holds
    for stage in recipe.stages:
        stage_dir = run_dir / stage.name
        fingerprint = stage_fingerprint(stage)
        code = stage_code(stage, plugins.registry)
        info, again = finished_stage(stage, stage_dir, fingerprint, console if main else None, code, upstream)
        if info is not None:
            if main:
                console.print(f"[bold]stage {stage.name}[/]: already finished, skipping ({stage_dir / DONE_NAME})")
            summaries[stage.name] = info["summary"]
        else:
            summaries[stage.name] = run_stage(recipe, stage, plugins, exports, fingerprint, console, code, upstream,
                                              fresh=bool(again))
        done, _ = read_json_file(stage_dir / DONE_NAME, ("fingerprint",))
        upstream[stage.name] = str((done or {}).get("id", ""))
        exports[stage.name] = stage_dir / "export"
    if main:
        print_summary(summaries, console)
        for stage in recipe.stages:
            print_report(run_dir / stage.name / REPORT_NAME, console)
    return summaries


def finished_stage(stage: Stage, stage_dir: Path, fingerprint: str, console: Console | None,
                   code: dict[str, str] | None = None, upstream: dict[str, str] | None = None
                   ) -> tuple[dict[str, Any] | None, str]:
    """``DONE.json``'s content if the stage finished with these settings and its export is
    whole; ``None`` if it has to run (or be finalised again from its checkpoint). A
    ``DONE.json`` that does not read, or an export that is missing, cut short or corrupt,
    is reported and set aside (every rank sees the same files and decides alike). A stage
    whose plugin code changed since (``code``, :func:`rlhfkit.provenance.stage_code`), or
    that was trained after another finish of an earlier stage than the one its directory
    holds now (``upstream``: earlier stage -> the id of its finish), runs again from the start:
    the second value says why (every rank then ignores the checkpoints; rank 0 sets them aside)."""
    done = stage_dir / DONE_NAME
    if not done.exists():
        return None, ""
    info, why = read_json_file(done, ("fingerprint", "summary"))
    if info is not None:
        _check_same(stage, stage_dir, info.get("fingerprint"), fingerprint, "finished")
        changed = code_changes(info.get("code"), code) if code is not None else ""
        redone = upstream_changes(info.get("upstream"), upstream)
        if changed or redone:
            reason = (f"the code it ran changed since it finished ({changed})" if changed
                      else f"{redone} finished again since")
            if console is not None:
                console.print(f"[yellow]stage {stage.name}[/]: finished, but {reason}; running it again",
                              highlight=False)
                _set_aside(stage_dir)
            return None, reason
        if info.get("export") is None and "export" not in info["summary"]:
            return info, ""  # a stage that writes no model (an evaluation)
        why = verify_export(stage_dir / "export", info.get("export"))
        if not why:
            return info, ""
        why = f"its export is not whole: {why}"
    else:
        why = f"{done} is {why}"
    if console is not None:
        console.print(f"[yellow]stage {stage.name}[/]: marked finished, but {why}; finishing it again from its "
                      f"last checkpoint", highlight=False)
        os.replace(done, stage_dir / f".{DONE_NAME}.old-{os.getpid()}")  # removed as stale on the next start
    return None, ""


def _set_aside(stage_dir: Path) -> None:
    """Move a stage's DONE.json and checkpoints aside (removed as stale on the next start),
    so that it runs from the beginning."""
    pid = os.getpid()
    for name in (DONE_NAME, "checkpoints", STATE_NAME):
        if (stage_dir / name).exists():
            os.replace(stage_dir / name, stage_dir / f".{name}.old-{pid}")


def run_stage(recipe: Recipe, stage: Stage, plugins: Plugins, exports: dict[str, Path],
              fingerprint: str, console: Console, code: dict[str, str] | None = None,
              upstream: dict[str, str] | None = None, fresh: bool = False) -> dict[str, Any]:
    stage_dir = recipe.run_dir / stage.name
    state_file = stage_dir / STATE_NAME
    rank = process_rank()
    warn = (lambda text: console.print(f"[yellow]warning[/]: {text}", highlight=False)) if rank == 0 else \
        (lambda text: None)
    # fresh: the stage runs again from the start (its code, or an earlier stage, changed)
    checkpoint = None if fresh else latest_checkpoint(stage_dir / "checkpoints", warn)
    if checkpoint is not None:
        state, why = read_json_file(state_file, ("fingerprint",))
        if state is None:
            warn(f"{state_file} is {why}; resuming from {checkpoint} without checking that the settings match "
                 f"the interrupted run's")
        else:
            _check_same(stage, stage_dir, state["fingerprint"], fingerprint, "interrupted")
            changed = code_changes(state.get("code"), code) if code is not None else ""
            if changed:  # resuming would mix two versions of the code in one model
                warn(f"stage {stage.name!r}: the code it ran changed since it was interrupted ({changed}); "
                     f"starting it again instead of resuming from {checkpoint}")
                if rank == 0:  # every rank starts over; one moves the files
                    _set_aside(stage_dir)
                checkpoint = None
    if rank == 0:
        atomic_write_text(state_file, json.dumps({"fingerprint": fingerprint, "code": code,
                                                  "upstream": dict(upstream or {})}))
    seed = rank_seed(recipe.run.seed, rank)
    L.seed_everything(seed, workers=True, verbose=False)
    torch.use_deterministic_algorithms(stage.trainer.deterministic, warn_only=True)

    hook = plugins.hook
    context = StageContext(registry=plugins.registry, stage=stage.name, stage_dir=stage_dir,
                           seed=recipe.run.seed, exports=dict(exports), slots=stage.slots,
                           trainer=stage.trainer, recipe_dir=Path(recipe.path).resolve().parent)
    module = plugins.registry.build(stage.algorithm, context)
    if getattr(module, "evaluation_only", False):
        return run_evaluation(module, stage, stage_dir, fingerprint, console, hook)
    resume = checkpoint is not None
    who = identity(recipe.run.name, stage.name, recipe.run.seed, recipe.run.variant, recipe.run.ablation)
    logger = MetricsCSV(stage_dir / "metrics.csv", fresh=not resume,
                        on_row=lambda step, m: hook.rlhfkit_on_metrics(stage=stage.name, step=step, metrics=m,
                                                                       identity=who))
    tracker_dir = Path(recipe.run.tracker_dir) if recipe.run.tracker_dir else None
    trackers = build_trackers(stage.trainer.loggers, recipe.run_dir, who, tracker_dir) if rank == 0 else []
    saver = ResumableCheckpoint(
        stage_dir / "checkpoints", stage.trainer.checkpoint_every_n_steps, keep=stage.trainer.keep_checkpoints,
        on_saved=lambda step, path: hook.rlhfkit_on_checkpoint(stage=stage.name, step=step, path=path))
    finaliser = Finaliser(module.total_steps, recipe.run.seed)
    trainer = build_trainer(stage.trainer, stage_dir, module.total_steps, [saver, RNGState(), finaliser],
                            [logger, *trackers])
    if rank == 0:
        verb = "resuming from " + str(checkpoint) if resume else "starting"
        console.print(f"[bold]stage {stage.name}[/] ({stage.algorithm.name}): {verb}; "
                      f"{module.total_steps} steps, {stage.trainer.explain_batch()}"
                      + (f"; {module.explain()}" if hasattr(module, "explain") else ""))
    started = time.perf_counter()
    try:
        _fit(trainer, module, stage, stage_dir, checkpoint)
    except BaseException:
        close_trackers(trackers, "failed")
        raise
    return _finished(trainer, module, stage, stage_dir, fingerprint, started, hook, finaliser, trackers)


def _finished(trainer: L.Trainer, module: Any, stage: Stage, stage_dir: Path, fingerprint: str, started: float,
              hook: Any, finaliser: Finaliser, trackers: list[Any]) -> dict[str, Any]:
    """The stage's summary once ``fit`` returned; trackers get it as ``summary/*`` and are closed."""
    if not finaliser.finished:
        close_trackers(trackers, "failed")
        raise UserError(f"stage {stage.name!r} stopped at step {trainer.global_step} of {module.total_steps} "
                        f"before it finished; re-run the same command to resume from its last checkpoint.")
    summary: dict[str, Any] = {}
    if trainer.is_global_zero:
        summary = finish_stage(module, stage, stage_dir, fingerprint, started, hook, trainer.global_step)
        numbers = {f"summary/{k}": float(v) for k, v in summary.items()
                   if isinstance(v, int | float) and not isinstance(v, bool)}
        for tracker in trackers:
            tracker.log_metrics(numbers, step=trainer.global_step)
    close_trackers(trackers, "success")
    trainer.strategy.barrier()
    if not trainer.is_global_zero:
        summary = json.loads((stage_dir / DONE_NAME).read_text())["summary"]
    return summary


def _fit(trainer: L.Trainer, module: Any, stage: Stage, stage_dir: Path, checkpoint: Path | None) -> None:
    """``trainer.fit``, with Ctrl-C and NaN/Inf turned into the user's one-line errors."""
    try:
        trainer.fit(module, ckpt_path=str(checkpoint) if checkpoint is not None else None)
    except SystemExit as exc:  # Lightning turns Ctrl-C into sys.exit(1) after its own shutdown
        if isinstance(exc.__context__, KeyboardInterrupt):
            raise Interrupted(stage.name, trainer.global_step, module.total_steps, stage_dir) from None
        raise
    except KeyboardInterrupt:
        raise Interrupted(stage.name, trainer.global_step, module.total_steps, stage_dir) from None
    except NonFiniteError as exc:
        step = exc.step if exc.step is not None else trainer.global_step + 1
        detail = f" ({exc.detail})" if exc.detail else ""
        raise UserError(
            f"stage {stage.name!r} stopped: {exc.what} became NaN/Inf at step {step}{detail}; nothing non-finite was "
            f"saved. {_intact(stage_dir)}. Remove the cause (a lower learning rate, bf16 instead of fp16, the "
            f"reward source), or set trainer.on_nan: skip to drop such updates, then re-run the same command to "
            f"resume. "
            f"See docs/faults.md#nan.") from None


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a stage: one line for the console, exit 130."""

    def __init__(self, stage: str, step: int, total: int, stage_dir: Path):
        files = checkpoint_files(stage_dir / "checkpoints")
        last = f"from {files[0]}" if files else "from the start of the stage (no checkpoint yet)"
        super().__init__(f"interrupted at step {step} of {total} of stage {stage!r}; re-run the same command to "
                         f"resume {last}")


def _intact(stage_dir: Path) -> str:
    files = checkpoint_files(stage_dir / "checkpoints")
    if not files:
        return "No checkpoint of this stage was written yet, so it starts from the beginning when re-run"
    return f"The last checkpoint, {files[0]}, is intact"


def _intact_checkpoints(recipe: Recipe) -> str:
    for stage in reversed(recipe.stages):
        files = checkpoint_files(recipe.run_dir / stage.name / "checkpoints")
        if files:
            return f"the last checkpoint written is {files[0]}"
    return "no checkpoint had been written yet"


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
                 hook: Any, step: int | None = None) -> dict[str, Any]:
    """On rank 0: export, then summary.json and, written last, DONE.json (with the
    export's file sizes, checked before the stage is skipped on a later run); returns the
    summary. Nothing non-finite is exported or recorded as final."""
    export_dir = stage_dir / "export"
    if isinstance(module, torch.nn.Module):
        check_finite_weights(module, "a weight", step or 0)
    summary = {**module.summary(), "wall_time_s": round(time.perf_counter() - started, 2)}
    bad = [k for k, v in summary.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad and (getattr(module, "on_nan", None) or stage.trainer.on_nan) == "stop":
        raise UserError(f"stage {stage.name!r} finished, but its final evaluation gave non-finite "
                        f"{', '.join(bad)}; it is not marked finished. {_intact(stage_dir)}. Check the reward "
                        f"source and the evaluation data, or set trainer.on_nan: skip to finish with these values "
                        f"(see docs/faults.md#nan).")
    if bad:
        warnings.warn(f"stage {stage.name!r}: its final evaluation gave non-finite {', '.join(bad)} "
                      f"(trainer.on_nan: skip)", stacklevel=1)
    module.export(export_dir)
    if export_dir.is_dir():  # an evaluation stage writes a report, not a model
        summary["export"] = str(export_dir)
    atomic_write_text(stage_dir / "summary.json", json.dumps(summary, indent=2))
    manifest = export_manifest(export_dir) if export_dir.is_dir() else None
    atomic_write_text(stage_dir / DONE_NAME, json.dumps({"fingerprint": fingerprint, **_provenance(stage_dir),
                                                         "summary": summary,
                                                         "export": manifest}))
    hook.rlhfkit_on_stage_end(stage=stage.name, stage_dir=stage_dir, summary=summary)
    return summary


def _provenance(stage_dir: Path) -> dict[str, Any]:
    """For DONE.json: a new id of this finish, and the code and earlier finishes the stage
    ran with, as its state file recorded them when it (re)started."""
    state, _ = read_json_file(stage_dir / STATE_NAME, ("fingerprint",))
    state = state or {}
    return {"id": uuid.uuid4().hex, "code": state.get("code"), "upstream": state.get("upstream")}


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
    report, why = read_json_file(path, ("tables",))
    if report is None:
        console.print(f"[yellow]warning[/]: {path} is {why}; its tables are not shown", highlight=False)
        return
    for spec in report["tables"]:
        table = Table(title=spec.get("title"), caption=spec.get("caption") or None)
        for i, column in enumerate(spec["columns"]):
            table.add_column(column, justify="left" if i == 0 or column in ("answer", "prompt", "model") else "right")
        every = spec.get("sections") or 0
        for i, row in enumerate(spec["rows"]):
            table.add_row(*[str(cell) for cell in row], end_section=bool(every) and (i + 1) % every == 0)
        console.print(table)
