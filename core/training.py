"""The Lightning glue: trainer construction, resumable state, metrics, batching.

Resume is exact because every source of state is either in the checkpoint (weights,
optimizers, schedulers, loop counters, RNG states, algorithm state such as running
moments) or a pure function of the optimizer step (which rows form the next batch).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import math
import os
import random
import re
import shutil
import sys
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import rank_zero_only

from rlhfkit.errors import NonFiniteError, UserError
from rlhfkit.files import atomic_write_text
from rlhfkit.recipe import OptimizerSettings, TrainerSection

CHECKPOINT_NAME = "last.ckpt"  # written before checkpoints were kept by step; still read
_STEP_FILE = re.compile(r"^step-(\d+)\.ckpt$")


def rank_seed(seed: int, rank: int) -> int:
    """Per-rank seed, ``seed + 100003 * rank`` (OpenAI lm-human-preferences)."""
    return seed + 100003 * rank


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to a temporary file in the same directory then renames, so a crash never
    leaves a half-written checkpoint; loads with ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            torch.save(checkpoint, tmp)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException as exc:
            # torch's zip writer reports a full disk as "unexpected pos ..."; say what it is
            full = not isinstance(exc, OSError) and _nearly_full(path.parent)
            tmp.unlink(missing_ok=True)  # a full disk or a kill leaves no half-written file behind
            if full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc
            raise

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


def _nearly_full(directory: Path) -> bool:
    try:
        return shutil.disk_usage(directory).free < 2**20
    except OSError:
        return False


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"step-{step:08d}.ckpt"


def checkpoint_files(directory: Path) -> list[Path]:
    """The stage's checkpoints, newest first: ``step-N.ckpt`` by step, then a legacy
    ``last.ckpt``."""
    if not directory.is_dir():
        return []
    stepped = sorted(((int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_FILE.match(p.name))),
                     reverse=True)
    legacy = [directory / CHECKPOINT_NAME] if (directory / CHECKPOINT_NAME).is_file() else []
    return [p for _, p in stepped] + legacy


def readable_checkpoint(path: Path) -> tuple[int | None, str]:
    """``(global_step, "")`` if ``path`` loads as a checkpoint (memory-mapped, so only its
    structure is read), else ``(None, why)``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(state["global_step"]), ""
    except Exception as exc:  # noqa: BLE001 - any failure to load means "not usable"
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]


def latest_checkpoint(directory: Path, warn: Callable[[str], None]) -> Path | None:
    """The newest checkpoint of ``directory`` that loads; each newer one that does not is
    reported through ``warn`` (and left on disk for inspection). ``None`` when there is no
    checkpoint at all; :class:`UserError` when there are some and none loads."""
    files = checkpoint_files(directory)
    broken: list[str] = []
    for path in files:
        step, why = readable_checkpoint(path)
        if step is not None:
            if broken:
                warn(f"checkpoint {broken[-1].split(' (')[0]} does not load; resuming from the previous one, "
                     f"{path} (step {step}). Unloadable: " + "; ".join(broken))
            return path
        broken.append(f"{path} ({why})")
    if files:
        raise UserError(
            f"no checkpoint in {directory} loads: " + "; ".join(broken) + ". They were cut short or corrupted "
            f"(a full disk, a copy that did not finish). Move them away (or delete {directory.parent}) to train "
            f"the stage from the start, or restore a good copy into {directory}.")
    return None


class ResumableCheckpoint(Callback):
    """Writes ``checkpoints/step-N.ckpt`` every ``every`` optimizer steps and at the end,
    keeping the ``keep`` newest (older ones are deleted once a newer one is on disk).

    The checkpoint of step n is written after step n's metrics row (:func:`log_step`
    writes it inside ``training_step``), and holds the ``metrics.csv`` rows up to step n:
    on resume they replace the file's rows, so rows logged after the checkpoint by an
    interrupted run are dropped and rows lost from the file (emptied, cut, corrupted) come
    back. A checkpoint is never written with a non-finite weight (:class:`NonFiniteError`).
    """

    def __init__(self, directory: Path, every: int, on_saved: Callable[[int, Path], None], keep: int = 2):
        self.directory = directory
        self.every = every
        self.keep = keep
        self.on_saved = on_saved
        self._last_saved = -1

    def _save(self, trainer: L.Trainer) -> None:
        if trainer.global_step == self._last_saved:
            return
        check_finite_weights(trainer.lightning_module, "a weight", trainer.global_step)
        path = checkpoint_path(self.directory, trainer.global_step)
        trainer.save_checkpoint(path, weights_only=False)  # full state: optimizers, loops
        self._last_saved = trainer.global_step
        if trainer.is_global_zero:
            for old in checkpoint_files(self.directory)[self.keep:]:
                old.unlink(missing_ok=True)
            self.on_saved(trainer.global_step, path)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step > 0 and trainer.global_step % self.every == 0:
            self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, MetricsCSV):
                checkpoint["rlhfkit_metrics"] = logger.state()
        # what summaries read at the end (the last training loss...), also when a stage is
        # resumed at its last step and runs no step
        checkpoint["rlhfkit_latest_metrics"] = dict(latest_metrics(pl_module))

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._last_saved = int(checkpoint["global_step"])
        pl_module._latest_metrics = dict(checkpoint.get("rlhfkit_latest_metrics", {}))
        for logger in trainer.loggers:
            if isinstance(logger, MetricsCSV):
                if "rlhfkit_metrics" in checkpoint:
                    logger.restore(checkpoint["rlhfkit_metrics"])
                else:  # a checkpoint written before the rows were kept in it
                    logger.truncate(int(checkpoint["global_step"]))


def check_finite_weights(module: torch.nn.Module, what: str, step: int) -> None:
    """Raise :class:`NonFiniteError` if any floating-point parameter or buffer of
    ``module`` holds a NaN or Inf (one host sync)."""
    tensors = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point() and t.numel()]
    if tensors and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        names = [n for n, t in (*module.named_parameters(), *module.named_buffers())
                 if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all())]
        raise NonFiniteError(f"{what} ({', '.join(names[:3])}{' ...' if len(names) > 3 else ''})", step)


class NonFiniteGuard(Callback):
    """What :func:`optimizer_step` does when the loss or the gradient norm is NaN/Inf:
    ``stop`` raises :class:`NonFiniteError` before the optimizer step (so no non-finite
    value reaches the weights, a checkpoint or an export); ``skip`` drops that step's
    update (the step still counts, and the learning-rate schedule moves on) and warns."""

    def __init__(self, on_nan: str = "stop"):
        self.on_nan = on_nan
        self.skipped = 0

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = int(state.get("skipped", 0))

    def handle(self, module: L.LightningModule, what: str) -> None:
        step = module.global_step + 1
        if (getattr(module, "on_nan", None) or self.on_nan) == "stop":  # a module may decide (PPO's setting)
            raise NonFiniteError(what, step)
        self.skipped += 1
        if module.trainer.is_global_zero and (self.skipped <= 5 or self.skipped % 100 == 0):
            warnings.warn(f"{what} was NaN/Inf at step {step}: update skipped (trainer.on_nan: skip; "
                          f"{self.skipped} skipped so far)", stacklevel=2)



def _guard(module: L.LightningModule) -> NonFiniteGuard:
    trainer = module._trainer
    for callback in trainer.callbacks if trainer is not None else ():
        if isinstance(callback, NonFiniteGuard):
            return callback
    return NonFiniteGuard("stop")


class Finaliser(Callback):
    """A stage's end-of-training work, run once training has reached its last step,
    whether the steps ran now or the stage resumed from a checkpoint at its last step
    (Lightning then skips the training loop and ``on_train_end``).

    It calls the module's ``finalize()`` (every built-in algorithm's final evaluation,
    samples, reward normalisation) on the training device, with the torch RNG seeded from
    the run's seed, so finalising again after a kill gives the same result. A module
    without ``finalize`` keeps its ``on_train_end``, which is then also called here when
    the loop was skipped.
    """

    def __init__(self, total: int, seed: int):
        self.total, self.seed = total, seed
        self.finished = False
        self._loop_ended = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._loop_ended = True

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step < self.total:
            return  # stopped early: nothing to finalise
        pl_module.to(trainer.strategy.root_device)  # Lightning's teardown moved it to the CPU
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            if hasattr(pl_module, "finalize"):
                pl_module.finalize()
            elif not self._loop_ended:
                pl_module.on_train_end()
        self.finished = True


class RNGState(Callback):
    """Saves the Python and torch RNG states in the checkpoint and restores them when
    training resumes (after all setup, so nothing consumes random numbers in between)."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        python_state = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "python": [python_state[0], list(python_state[1]), python_state[2]],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = state

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is None:
            return
        torch.set_rng_state(self._pending["torch"])
        version, internal, gauss = self._pending["python"]
        random.setstate((version, tuple(internal), gauss))
        self._pending = None


class MetricsCSV(Logger):
    """``metrics.csv``: one row per logged step, columns the union of metric names.

    A new row is appended (one line, flushed); the file is rewritten atomically only when
    a column appears, a row is completed (several logs at one step) or rows are dropped.
    ``fresh=True`` (a stage starting from step 0) starts from no rows, whatever an earlier
    attempt left in the file. On resume the rows come from the checkpoint
    (:meth:`restore`); the file is read back (lines cut short, undecodable or without a
    finite step dropped) only for a checkpoint that does not hold them.
    """

    def __init__(self, path: Path, on_row: Callable[[int, dict[str, float]], None], fresh: bool = False):
        super().__init__()
        self.path = path
        self.on_row = on_row
        self.rows: list[dict[str, Any]] = []
        self.columns: list[str] = ["step"]
        if path.is_file() and not fresh:
            text = path.read_bytes().decode("utf-8", errors="replace")
            reader = csv.DictReader(io.StringIO(text, newline=""))
            try:
                self.columns = list(reader.fieldnames or ["step"])
                self.rows = [row for row in reader if _complete(row, self.columns)]
            except csv.Error:
                self.columns, self.rows = ["step"], []
            if "step" not in self.columns or len(set(self.columns)) != len(self.columns):
                self.columns, self.rows = ["step"], []

    @property
    def name(self) -> str:
        return "rlhfkit"

    @property
    def version(self) -> str:
        return "0"

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        return None

    @rank_zero_only
    def truncate(self, step: int) -> None:
        self.rows = [r for r in self.rows if int(float(r["step"])) <= step]
        self._write()

    def state(self) -> dict[str, Any]:
        """The rows so far, for the checkpoint (strings and floats only)."""
        return {"columns": list(self.columns),
                "rows": [{k: v for k, v in row.items() if v is not None} for row in self.rows]}

    @rank_zero_only
    def restore(self, state: dict[str, Any]) -> None:
        """Rows as a checkpoint saved them; the file is rewritten to hold exactly these."""
        self.columns = list(state["columns"])
        self.rows = [dict(row) for row in state["rows"]]
        self._write()

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        step = int(metrics.pop("step", step or 0))
        metrics = {k: float(v) for k, v in metrics.items() if k != "epoch"}
        row = {"step": step, **metrics}
        new_columns = [k for k in row if k not in self.columns]
        self.columns += new_columns
        if self.rows and int(float(self.rows[-1]["step"])) == step:
            self.rows[-1].update(row)
            self._write()
        else:
            self.rows.append(row)
            if new_columns or not self.path.is_file():
                self._write()
            else:
                with open(self.path, "a", newline="") as handle:
                    csv.DictWriter(handle, fieldnames=self.columns).writerow(row)
        self.on_row(step, metrics)

    def _write(self) -> None:
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=self.columns)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buffer.getvalue())


def _complete(row: dict[str, Any], columns: list[str]) -> bool:
    """A row read back whole: as many fields as the header and a finite whole step."""
    if None in row or any(row.get(name) is None for name in columns):
        return False
    try:
        step = float(row["step"])
    except (TypeError, ValueError):
        return False
    return math.isfinite(step) and step >= 0 and step == int(step)


def latest_metrics(module: L.LightningModule) -> dict[str, float]:
    """The last value of each metric :func:`log_step` wrote for ``module`` (what the
    progress display shows and stage summaries read)."""
    return getattr(module, "_latest_metrics", {})


def headline_metrics(module: L.LightningModule, chosen: Sequence[str] | None = None) -> dict[str, float]:
    """The metrics a person watches, in order: ``chosen`` (``trainer.console_metrics``),
    else the algorithm's ``console_metrics``, else the first eight by name; only those
    logged so far."""
    latest = latest_metrics(module)
    names = chosen or getattr(module, "console_metrics", None)
    if not names:
        names = sorted(k for k in latest if "/" in k)[:8]
    return {name: latest[name] for name in names if name in latest}


class ConsoleLines(Callback):
    """Without a terminal (CI, logs), print one line of the headline metrics
    (:func:`headline_metrics`) every n steps instead of a progress bar."""

    def __init__(self, every: int, total: int, chosen: Sequence[str] | None = None):
        self.every = every
        self.total = total
        self.chosen = chosen

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if trainer.is_global_zero and (step % self.every == 0 or step == self.total):
            text = "  ".join(f"{k}={v:.4g}" for k, v in headline_metrics(pl_module, self.chosen).items())
            print(f"step {step}/{self.total}  {text}", flush=True)


class MetricsProgressBar(RichProgressBar):
    """Lightning's rich progress bar, showing the metrics of :func:`log_step`."""

    def __init__(self, *args: Any, chosen: Sequence[str] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.chosen = chosen

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        return {**super().get_metrics(trainer, pl_module),
                **{k: f"{v:.4g}" for k, v in headline_metrics(pl_module, self.chosen).items()}}


def build_trainer(section: TrainerSection, stage_dir: Path, total_steps: int,
                  callbacks: Sequence[Callback], logger: Logger | list[Logger]) -> L.Trainer:
    """A ``lightning.Trainer`` from the recipe's ``trainer:`` section.

    Algorithms use manual optimization (accumulation and gradient clipping are applied
    by :func:`optimizer_step`), so the Trainer runs exactly ``total_steps`` steps in one
    long epoch whose batches come from :class:`StepSampler`.
    """
    interactive = sys.stdout.isatty()
    progress: list[Callback] = (
        [MetricsProgressBar(leave=True, chosen=section.console_metrics)] if interactive
        else [ConsoleLines(section.log_every_n_steps, total_steps, section.console_metrics)]
    )
    return L.Trainer(
        accelerator=section.accelerator,
        devices=section.devices,
        num_nodes=section.num_nodes,
        strategy=section.strategy,
        precision=section.precision,
        max_steps=total_steps,
        max_epochs=1,
        deterministic=section.deterministic,
        callbacks=[*callbacks, NonFiniteGuard(section.on_nan), *progress],
        logger=logger,
        log_every_n_steps=section.log_every_n_steps,
        enable_progress_bar=interactive,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(stage_dir),
    )


def total_steps(section: TrainerSection, num_rows: int, default_epochs: float = 1.0) -> int:
    """Optimizer steps of a stage: ``max_steps`` or ``max_epochs`` passes over the rows."""
    if section.max_steps is not None:
        return section.max_steps
    epochs = section.max_epochs if section.max_epochs is not None else default_epochs
    return max(1, math.ceil(epochs * num_rows / section.batch_size))


class StepSampler(torch.utils.data.Sampler[list[int]]):
    """Yields, for each optimizer step from the current one, this rank's rows of the
    global batch, as one list of indices (``micro_batch_size * accumulation`` rows).

    Rows are visited in passes over a permutation seeded with ``seed + pass``; the global
    batch of step ``s`` is rows ``[s * B, (s + 1) * B)`` of the concatenated passes and
    rank ``r`` takes its contiguous ``B / world`` slice. The batch of a step depends only
    on the step, so resuming needs no sampler state and 1 or N devices see the same
    global batches.
    """

    def __init__(self, num_rows: int, section: TrainerSection, seed: int, total: int,
                 position: Callable[[], int], rank: int = 0, shuffle: bool = True):
        if num_rows == 0:
            raise ValueError("no rows to train on")
        self.num_rows, self.seed, self.total, self.shuffle = num_rows, seed, total, shuffle
        self.global_batch = section.batch_size
        self.per_rank = section.batch_size // section.world_size
        self.rank = rank
        self.position = position
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                self._perms = {epoch: torch.randperm(self.num_rows, generator=g).tolist()}
            else:
                self._perms = {epoch: list(range(self.num_rows))}
        return self._perms[epoch]

    def batch_for_step(self, step: int) -> list[int]:
        start = step * self.global_batch + self.rank * self.per_rank
        return [self._perm(i // self.num_rows)[i % self.num_rows] for i in range(start, start + self.per_rank)]

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.position(), self.total):
            yield self.batch_for_step(step)

    def __len__(self) -> int:
        return self.total


def step_loader(rows: Sequence[Any], collate: Callable[[list[Any]], Any], section: TrainerSection,
                seed: int, total: int, position: Callable[[], int], rank: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader over ``rows`` driven by :class:`StepSampler` (no workers, its own
    generator so building it consumes no global random numbers)."""
    sampler = StepSampler(len(rows), section, seed, total, position, rank)
    return StepLoader(
        rows, batch_sampler=sampler, collate_fn=collate, num_workers=0,
        generator=torch.Generator().manual_seed(seed),
    )


class StepLoader(torch.utils.data.DataLoader):
    """A DataLoader whose position is the trainer's step: it has no state of its own to
    save or restore, and says so (``state_dict`` / ``load_state_dict``), so Lightning
    knows a mid-epoch resume is exact instead of warning that the loader is not
    resumable."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def micro_batches(batch: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """Split a dict of ``[N, ...]`` tensors into chunks of ``size`` rows."""
    n = next(iter(batch.values())).shape[0]
    return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, size)]


def optimizer_step(module: L.LightningModule, gradient_clip: float | None,
                   loss: torch.Tensor | None = None) -> torch.Tensor:
    """One optimizer step of a manually-optimized module, through Lightning so that the
    precision plugin and strategy (AMP scaler, FSDP, DeepSpeed) take part: clip the
    global gradient norm, step, zero grads, step the scheduler.

    The NaN/Inf guard of every algorithm: if the gradient norm (or ``loss``, the step's
    loss, when given) is not finite on any rank, ``trainer.on_nan`` decides
    (:class:`NonFiniteGuard`): stop before the update, or skip it. That check is the
    step's one host sync (plus one all-reduce of a flag with several processes).

    Returns the gradient norm before clipping as a tensor; under FSDP it is this rank's
    shard's norm.
    """
    optimizer = module.optimizers()
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    device = params[0].grad.device if params else module.device
    norm = (torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in params]))) if params
            else torch.zeros((), device=device))
    trainer = module._trainer
    # a grad scaler (16-mixed) expects Inf gradients now and then: it skips that step and
    # lowers its scale, so only the loss is checked then
    scaled = trainer is not None and getattr(trainer.precision_plugin, "scaler", None) is not None
    finite = torch.isfinite(norm) if not scaled else torch.ones((), dtype=torch.bool, device=device)
    if loss is not None:
        finite = finite & torch.isfinite(loss.detach().to(device)).all()
    if trainer is not None and trainer.world_size > 1:
        bad = trainer.strategy.reduce((~finite).float(), reduce_op="sum")
        finite = bad == 0
    if not bool(finite):
        what = "the gradient norm" if loss is None or bool(torch.isfinite(loss.detach()).all()) else "the loss"
        _guard(module).handle(module, what)  # stop raises; skip drops the update below
        optimizer.zero_grad(set_to_none=True)
        params = []
    if gradient_clip is not None and params:
        if _plain_clipping(module):  # what Lightning would do, reusing the norm just computed
            torch.nn.utils.clip_grads_with_norm_(params, gradient_clip, norm)
        else:  # sharded or scaled gradients: the strategy and precision plugin clip
            module.clip_gradients(optimizer, gradient_clip_val=gradient_clip, gradient_clip_algorithm="norm")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler = module.lr_schedulers()
    if scheduler is not None:
        scheduler.step()
    return norm


def _plain_clipping(module: L.LightningModule) -> bool:
    """Whether Lightning would clip with ``torch.nn.utils.clip_grad_norm_`` over all the
    optimizer's parameters: its plain float precision, or bf16 autocast (no grad scaler).
    Other plugins (FSDP, DeepSpeed, a GradScaler) clip their own way."""
    plugin = module.trainer.precision_plugin
    plain = type(plugin) is Precision or (type(plugin) is MixedPrecision and plugin.scaler is None)
    return plain and hasattr(torch.nn.utils, "clip_grads_with_norm_")  # torch >= 2.6


def adamw(groups: Sequence[tuple[Iterable[torch.nn.Parameter], OptimizerSettings]], total: int) -> dict[str, Any]:
    """What ``configure_optimizers`` returns: one AdamW with a parameter group per
    ``(parameters, settings)`` (e.g. policy and critic, each with its own lr, betas, eps
    and weight decay) and a per-step warmup-cosine schedule for each group.

    The fused implementation (one kernel over all tensors; on CPU about 4x faster than the
    single-tensor default) is used when every parameter is a plain floating-point tensor on
    CPU or CUDA; sharded parameters (FSDP's DTensors) get torch's default."""
    param_groups = [{"params": [p for p in params if p.requires_grad], "lr": s.lr, "betas": s.betas, "eps": s.eps,
                     "weight_decay": s.weight_decay} for params, s in groups]
    every = [p for group in param_groups for p in group["params"]]
    fused = bool(every) and all(type(p.data) is torch.Tensor and p.device.type in ("cpu", "cuda")
                                and p.dtype.is_floating_point for p in every)
    optimizer = torch.optim.AdamW(param_groups, fused=fused or None)
    factors = [warmup_cosine_factor(s.warmup_steps, total, s.final_lr_ratio) for _, s in groups]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def warmup_cosine_factor(warmup: int, total: int, final_ratio: float) -> Callable[[int], float]:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``final_ratio`` x lr."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def gradient_sync(module: L.LightningModule, last: bool) -> Any:
    """Skip the DDP gradient all-reduce on all but the last micro-batch of a step."""
    wrapped = module.trainer.model if module._trainer is not None else None
    if not last and hasattr(wrapped, "no_sync"):
        return wrapped.no_sync()
    return contextlib.nullcontext()


def log_step(module: L.LightningModule, metrics: dict[str, Any]) -> None:
    """Log a row of training metrics at the current optimizer step, after the step.

    The row goes to the loggers at once (rank 0), so it is on disk before this step's
    checkpoint (Lightning would log it after ``on_train_batch_end``, where the checkpoint
    is written, and one step late under manual optimization). The values, as floats,
    also become :func:`latest_metrics` for the progress display. Lightning's ``self.log``
    is not used: it builds a metric object per key on every call (about 2 ms a key on CPU).
    """
    log_now(module, _as_floats(metrics))  # which also makes them the latest metrics


def _as_floats(metrics: dict[str, Any]) -> dict[str, float]:
    """Metric values as Python floats, the tensors read back in one transfer (one host
    sync on an accelerator, not one per metric)."""
    tensors = {name: value for name, value in metrics.items() if isinstance(value, torch.Tensor)}
    read: dict[str, float] = {}
    if tensors:
        device = next(iter(tensors.values())).device
        stacked = torch.stack([t.detach().reshape(()).to(device, torch.float64) for t in tensors.values()])
        read = dict(zip(tensors, stacked.tolist(), strict=True))
    return {name: read[name] if name in read else float(value) for name, value in metrics.items()}


def log_now(module: L.LightningModule, metrics: dict[str, float]) -> None:
    """Write metrics at the current step straight to the loggers (rank 0), for values
    computed outside ``training_step`` (evaluations at start and end)."""
    module._latest_metrics = {**latest_metrics(module), **{k: float(v) for k, v in metrics.items()}}
    if module.trainer.is_global_zero:
        for logger in module.loggers:
            logger.log_metrics(dict(metrics), step=module.global_step)
