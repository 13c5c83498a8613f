"""Experiment trackers: Lightning's TensorBoard, Weights & Biases and MLflow loggers, next
to the ``metrics.csv`` every stage writes.

``trainer.loggers`` names them, each with its settings::

    trainer:
      loggers: [tensorboard, {name: wandb, project: my-project}, {name: mlflow}]

Every tracked run carries the run's identity (:func:`identity`): run name, stage, seed and,
inside ``rlhfkit ablate``, the variant, so runs group and compare in the tracker. Files
stay inside the run directory unless a setting points elsewhere (an MLflow server, W&B
online). The tracker packages are optional: ``pip install 'rlhfkit[trackers]'``.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from rlhfkit.errors import UserError

if TYPE_CHECKING:
    from lightning.pytorch.loggers import Logger

INSTALL = "pip install 'rlhfkit[trackers]'"


class CsvTracker(BaseModel):
    """``metrics.csv`` in the stage directory; always on, listed or not."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["csv"] = "csv"


class TensorBoardTracker(BaseModel):
    """Event files in ``<run>/tensorboard/[<variant>/]<stage>/seed-<seed>``: ``tensorboard --logdir <run>/tensorboard``."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["tensorboard"] = "tensorboard"


class WandbTracker(BaseModel):
    """A W&B run per stage, files in ``<run>/wandb``; offline unless ``mode: online``."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["wandb"] = "wandb"
    project: str | None = Field(None, description="W&B project (default: the ablation's name, else the run name)")
    entity: str | None = Field(None, description="W&B entity (team or user); default: yours")
    mode: Literal["offline", "online"] = Field(
        "offline", description="offline: write the run locally (upload later with `wandb sync`); online: stream it")
    tags: list[str] = Field(default_factory=list, description="extra tags, after stage, seed and variant")


class MlflowTracker(BaseModel):
    """An MLflow run per stage; a local store (SQLite, ``<run>/mlruns/mlflow.db``) unless ``tracking_uri`` is set."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["mlflow"] = "mlflow"
    experiment: str | None = Field(None, description="MLflow experiment (default: the ablation's name, else the run name)")
    tracking_uri: str | None = Field(
        None, description="an MLflow server or store (default: the SQLite store <run>/mlruns/mlflow.db)")


#: the package each tracker needs
PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}


def _named(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


Tracker = Annotated[CsvTracker | TensorBoardTracker | WandbTracker | MlflowTracker,
                    Field(discriminator="name"), BeforeValidator(_named)]


class TrackerList(BaseModel):
    """Checks that the trackers' packages are installed (so ``validate`` says it)."""

    trackers: list[Tracker]

    @model_validator(mode="after")
    def _installed(self) -> TrackerList:
        for tracker in self.trackers:
            packages = PACKAGES.get(tracker.name, ())
            if packages and not any(importlib.util.find_spec(p) for p in packages):
                raise ValueError(f"the {tracker.name} logger needs the {packages[0]} package, which is not "
                                 f"installed: {INSTALL}")
        return self


def identity(run: str, stage: str, seed: int, variant: str | None = None, ablation: str | None = None
             ) -> dict[str, Any]:
    """What every tracked run and the metrics hook are told about where the numbers come
    from: run name, stage, seed, and inside ``rlhfkit ablate`` the ablation and variant."""
    return {"run": run, "stage": stage, "seed": seed, "variant": variant, "ablation": ablation}


def build_trackers(trackers: list[Any], run_dir: Path, who: dict[str, Any], tracker_dir: Path | None = None
                   ) -> list[Logger]:
    """Lightning loggers for ``trackers`` (``csv`` is the stage's own ``metrics.csv``, not
    built here). Local files go to ``tracker_dir`` (default ``run_dir``); W&B's offline
    run stays in ``run_dir``."""
    store = tracker_dir or run_dir
    out: list[Logger] = []
    for tracker in trackers:
        try:
            out += _build(tracker, run_dir, store, who)
        except Exception as exc:
            close_trackers(out, "failed")
            raise UserError(f"could not start the {tracker.name} tracker (trainer.loggers): {type(exc).__name__}: "
                            f"{exc}") from exc
    return out


def _build(tracker: Any, run_dir: Path, store: Path, who: dict[str, Any]) -> list[Logger]:
    """The Lightning logger of one tracker (none for ``csv``)."""
    label = f"{who['run']}/{who['stage']}"
    project = who["ablation"] or who["run"]  # an ablation's variants and seeds side by side
    group = who["variant"] if who["ablation"] else who["run"]  # a variant's seeds together
    tags = [f"stage:{who['stage']}", f"seed:{who['seed']}"] + ([f"variant:{who['variant']}"] if who["variant"] else [])
    if tracker.name == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        name = f"{who['variant']}/{who['stage']}" if who["variant"] else who["stage"]
        board = TensorBoardLogger(save_dir=str(store / "tensorboard"), name=name, version=f"seed-{who['seed']}",
                                  default_hp_metric=False)
        board.log_hyperparams({k: v for k, v in who.items() if v is not None})
        return [board]
    if tracker.name == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        # one W&B run per (run directory, stage): a resumed stage continues it
        run_id = hashlib.sha1(f"{run_dir.resolve()}:{who['stage']}".encode()).hexdigest()[:16]
        return [WandbLogger(name=label, project=tracker.project or project, entity=tracker.entity,
                            save_dir=str(run_dir), offline=tracker.mode == "offline", id=run_id, group=group,
                            job_type=who["stage"], tags=tags + tracker.tags, config=who, resume="allow")]
    if tracker.name == "mlflow":
        from lightning.pytorch.loggers import MLFlowLogger

        local = (store / "mlruns").resolve()
        local.mkdir(parents=True, exist_ok=True)
        # The store, experiment and run are made now, one process at a time: the runs of an
        # ablation start together and would race to create the SQLite schema (which making
        # the client already does).
        with open(local / ".create.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                flow = MLFlowLogger(experiment_name=tracker.experiment or project, run_name=label,
                                    tracking_uri=tracker.tracking_uri or mlflow_store(store),
                                    artifact_location=None if tracker.tracking_uri else (local / "artifacts").as_uri(),
                                    tags={k: str(v) for k, v in who.items() if v is not None})
                _ = flow.run_id
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return [flow]
    return []


def mlflow_store(directory: Path) -> str:
    """The default MLflow store: a SQLite database in ``<directory>/mlruns`` (MLflow's
    recommended local store; its plain-file store is deprecated)."""
    return f"sqlite:///{(directory / 'mlruns' / 'mlflow.db').resolve()}"


def close_trackers(loggers: list[Logger], status: str) -> None:
    """Flush and close each tracker's run (W&B keeps one run per process open otherwise)."""
    for logger in loggers:
        logger.finalize(status)
        if type(logger).__name__ == "WandbLogger":
            import wandb

            wandb.finish()
