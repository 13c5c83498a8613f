"""The Lightning glue: trainer construction, resumable state, metrics, batching.

Resume is exact because every source of state is either in the checkpoint (weights,
optimizers, schedulers, loop counters, RNG states, algorithm state such as running
moments) or a pure function of the optimizer step (which rows form the next batch).
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import random
import sys
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

from rlhfkit.recipe import OptimizerSettings, TrainerSection

CHECKPOINT_NAME = "last.ckpt"


def rank_seed(seed: int, rank: int) -> int:
    """Per-rank seed, ``seed + 100003 * rank`` (OpenAI lm-human-preferences)."""
    return seed + 100003 * rank


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to a temporary file in the same directory then renames, so a crash never
    leaves a half-written checkpoint; loads with ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(checkpoint, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


class ResumableCheckpoint(Callback):
    """Writes ``checkpoints/last.ckpt`` every ``every`` optimizer steps and at the end.

    The checkpoint of step n is written after step n's metrics row (:func:`log_step`
    writes it inside ``training_step``); on resume the rows an interrupted run logged past
    the checkpoint are dropped from ``metrics.csv``, since those steps run again.
    """

    def __init__(self, directory: Path, every: int, on_saved: Callable[[int, Path], None]):
        self.path = directory / CHECKPOINT_NAME
        self.every = every
        self.on_saved = on_saved
        self._last_saved = -1

    def _save(self, trainer: L.Trainer) -> None:
        if trainer.global_step == self._last_saved:
            return
        trainer.save_checkpoint(self.path, weights_only=False)  # full state: optimizers, loops
        self._last_saved = trainer.global_step
        if trainer.is_global_zero:
            self.on_saved(trainer.global_step, self.path)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step > 0 and trainer.global_step % self.every == 0:
            self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, MetricsCSV):
                logger.truncate(int(checkpoint["global_step"]))


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
    On resume, rows past the restored step are dropped (:meth:`truncate`): they were
    logged after the last checkpoint by the interrupted run and will be logged again. A
    line cut short by a kill is dropped when the file is read back.
    """

    def __init__(self, path: Path, on_row: Callable[[int, dict[str, float]], None]):
        super().__init__()
        self.path = path
        self.on_row = on_row
        self.rows: list[dict[str, Any]] = []
        self.columns: list[str] = ["step"]
        if path.is_file():
            with open(path, newline="") as handle:
                reader = csv.DictReader(handle)
                self.columns = list(reader.fieldnames or ["step"])
                self.rows = [row for row in reader if _complete(row, self.columns)]

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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.path)


def _complete(row: dict[str, Any], columns: list[str]) -> bool:
    """A row read back whole: as many fields as the header and a numeric step."""
    if None in row or any(row.get(name) is None for name in columns):
        return False
    try:
        float(row["step"])
    except (TypeError, ValueError):
        return False
    return True


def latest_metrics(module: L.LightningModule) -> dict[str, float]:
    """The last value of each metric :func:`log_step` wrote for ``module`` (what the
    progress display shows and stage summaries read)."""
    return getattr(module, "_latest_metrics", {})


class ConsoleLines(Callback):
    """Without a terminal (CI, logs), print one line of metrics every n steps instead of a
    progress bar."""

    def __init__(self, every: int, total: int):
        self.every = every
        self.total = total

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if trainer.is_global_zero and (step % self.every == 0 or step == self.total):
            shown = {k: v for k, v in latest_metrics(pl_module).items() if "/" in k}
            text = "  ".join(f"{k}={v:.4g}" for k, v in sorted(shown.items())[:8])
            print(f"step {step}/{self.total}  {text}", flush=True)


class MetricsProgressBar(RichProgressBar):
    """Lightning's rich progress bar, showing the metrics of :func:`log_step`."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        return {**super().get_metrics(trainer, pl_module),
                **{k: f"{v:.4g}" for k, v in latest_metrics(pl_module).items()}}


def build_trainer(section: TrainerSection, stage_dir: Path, total_steps: int,
                  callbacks: Sequence[Callback], logger: Logger) -> L.Trainer:
    """A ``lightning.Trainer`` from the recipe's ``trainer:`` section.

    Algorithms use manual optimization (accumulation and gradient clipping are applied
    by :func:`optimizer_step`), so the Trainer runs exactly ``total_steps`` steps in one
    long epoch whose batches come from :class:`StepSampler`.
    """
    interactive = sys.stdout.isatty()
    progress: list[Callback] = (
        [MetricsProgressBar(leave=True)] if interactive
        else [ConsoleLines(section.log_every_n_steps, total_steps)]
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
        callbacks=[*callbacks, *progress],
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
    return torch.utils.data.DataLoader(
        rows, batch_sampler=sampler, collate_fn=collate, num_workers=0,
        generator=torch.Generator().manual_seed(seed),
    )


def micro_batches(batch: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """Split a dict of ``[N, ...]`` tensors into chunks of ``size`` rows."""
    n = next(iter(batch.values())).shape[0]
    return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, size)]


def optimizer_step(module: L.LightningModule, gradient_clip: float | None) -> torch.Tensor:
    """One optimizer step of a manually-optimized module, through Lightning so that the
    precision plugin and strategy (AMP scaler, FSDP, DeepSpeed) take part: clip the
    global gradient norm, step, zero grads, step the scheduler.

    Returns the gradient norm before clipping as a tensor (no host sync); under FSDP it
    is this rank's shard's norm.
    """
    optimizer = module.optimizers()
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norm = (torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in params]))) if params
            else torch.zeros(()))
    if gradient_clip is not None:
        if params and _plain_clipping(module):  # what Lightning would do, reusing the norm just computed
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
    values = _as_floats(metrics)
    module._latest_metrics = {**latest_metrics(module), **values}
    log_now(module, values)


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
    if module.trainer.is_global_zero:
        for logger in module.loggers:
            logger.log_metrics(dict(metrics), step=module.global_step)
