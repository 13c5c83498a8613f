"""The Lightning glue's own state: metrics.csv and the resumable checkpoint agree on
which steps happened, whatever moment a kill lands."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import read_metrics

from rlhfkit.training import (
    ConsoleLines,
    MetricsCSV,
    MetricsProgressBar,
    ResumableCheckpoint,
    latest_metrics,
    log_step,
    optimizer_step,
)


def _steps(path):
    return [int(float(row["step"])) for row in read_metrics(path)]


def test_metrics_csv_appends_completes_and_widens(tmp_path):
    path = tmp_path / "metrics.csv"
    seen = []
    log = MetricsCSV(path, on_row=lambda step, m: seen.append((step, m)))
    log.log_metrics({"train/loss": 1.0}, step=1)
    log.log_metrics({"train/loss": 0.5}, step=2)
    log.log_metrics({"eval/ppl": 3.0}, step=2)          # completes row 2, adds a column
    log.log_metrics({"train/loss": 0.25}, step=3)
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert rows[1] == {"step": "2", "train/loss": "0.5", "eval/ppl": "3.0"}
    assert rows[2] == {"step": "3", "train/loss": "0.25", "eval/ppl": ""}
    assert seen[2] == (2, {"eval/ppl": 3.0})


def test_metrics_csv_drops_a_cut_line_and_truncates_on_resume(tmp_path):
    path = tmp_path / "metrics.csv"
    log = MetricsCSV(path, on_row=lambda *a: None)
    for step in range(1, 6):
        log.log_metrics({"a": float(step), "b": 2.0 * step}, step=step)
    with open(path, "a") as handle:   # a kill in the middle of writing step 6
        handle.write("6,6.0")
    again = MetricsCSV(path, on_row=lambda *a: None)
    assert [int(r["step"]) for r in again.rows] == [1, 2, 3, 4, 5]
    again.truncate(3)
    assert _steps(path) == [1, 2, 3]
    again.log_metrics({"a": 4.5, "b": 9.0}, step=4)
    assert _steps(path) == [1, 2, 3, 4]
    assert read_metrics(path)[-1]["a"] == "4.5"


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.weight = torch.nn.Parameter(torch.ones(3))

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        loss = ((self.weight - batch[0]) ** 2).mean()
        self.manual_backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        log_step(self, {"train/loss": loss.detach()})

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(64, 3), batch_size=2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path, callbacks, logger, steps):
    return L.Trainer(max_steps=steps, logger=logger, callbacks=callbacks, accelerator="cpu",
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                     log_every_n_steps=1, default_root_dir=tmp_path)


def test_a_checkpoint_is_written_after_its_steps_metrics_row_and_resume_leaves_no_duplicates(tmp_path):
    """Whenever checkpoint n exists, metrics.csv already has row n: a kill right after the
    checkpoint write loses no row. Resuming drops the rows logged past the checkpoint."""
    path = tmp_path / "metrics.csv"
    rows_at_save = {}

    def on_saved(step, _):
        rows_at_save[step] = _steps(path)

    saver = ResumableCheckpoint(tmp_path / "checkpoints", 4, on_saved)
    _trainer(tmp_path, [saver], MetricsCSV(path, on_row=lambda *a: None), 10).fit(_Tiny())
    assert sorted(rows_at_save) == [4, 8, 10]
    for step, steps in rows_at_save.items():
        assert steps == list(range(1, step + 1)), step
    clean = read_metrics(path)

    # as if killed after step 10 was logged but with only checkpoint 8 on disk: resume from 8
    checkpoint = tmp_path / "checkpoints" / "step-00000010.ckpt"
    state = torch.load(checkpoint, weights_only=False)
    # the newest two checkpoints are kept
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["step-00000008.ckpt", "step-00000010.ckpt"]
    assert state["global_step"] == 10
    interrupted = tmp_path / "interrupted"
    saver = ResumableCheckpoint(interrupted / "checkpoints", 4, lambda *a: None)
    _trainer(interrupted, [saver], MetricsCSV(interrupted / "metrics.csv", on_row=lambda *a: None), 8).fit(_Tiny())
    extra = MetricsCSV(interrupted / "metrics.csv", on_row=lambda *a: None)
    extra.log_metrics({"train/loss": 123.0}, step=9)   # logged past the checkpoint, then killed
    saver = ResumableCheckpoint(interrupted / "checkpoints", 4, lambda *a: None)
    _trainer(interrupted, [saver], MetricsCSV(interrupted / "metrics.csv", on_row=lambda *a: None), 10).fit(
        _Tiny(), ckpt_path=str(interrupted / "checkpoints" / "step-00000008.ckpt"))
    resumed = read_metrics(interrupted / "metrics.csv")
    assert [r["step"] for r in resumed] == [r["step"] for r in clean]
    assert "123.0" not in [r["train/loss"] for r in resumed]

    # rows lost from the file (emptied, cut, corrupted) come back from the checkpoint
    again = tmp_path / "again"
    saver = ResumableCheckpoint(again / "checkpoints", 4, lambda *a: None)
    _trainer(again, [saver], MetricsCSV(again / "metrics.csv", on_row=lambda *a: None), 8).fit(_Tiny())
    (again / "metrics.csv").write_bytes(b"\xff\x00 not a csv")
    saver = ResumableCheckpoint(again / "checkpoints", 4, lambda *a: None)
    _trainer(again, [saver], MetricsCSV(again / "metrics.csv", on_row=lambda *a: None), 10).fit(
        _Tiny(), ckpt_path=str(again / "checkpoints" / "step-00000008.ckpt"))
    assert [r["step"] for r in read_metrics(again / "metrics.csv")] == [r["step"] for r in clean]


def test_a_fresh_start_drops_rows_an_earlier_attempt_left(tmp_path):
    """A stage killed before its first checkpoint starts again from step 0: the rows the
    killed attempt wrote are not kept (they would be duplicated)."""
    path = tmp_path / "metrics.csv"
    MetricsCSV(path, on_row=lambda *a: None).log_metrics({"train/loss": 5.0}, step=1)
    logger = MetricsCSV(path, on_row=lambda *a: None, fresh=True)
    _trainer(tmp_path, [], logger, 3).fit(_Tiny())
    assert [r["step"] for r in read_metrics(path)] == ["1", "2", "3"]
    assert "5.0" not in [r["train/loss"] for r in read_metrics(path)]


def test_log_step_feeds_the_console_lines_and_latest_metrics(tmp_path, capsys):
    """log_step's values, as floats, are what the console lines print and what stage
    summaries read (latest_metrics), without Lightning's self.log."""
    path = tmp_path / "metrics.csv"
    module = _Tiny()
    _trainer(tmp_path, [ConsoleLines(every=3, total=6)], MetricsCSV(path, on_row=lambda *a: None), 6).fit(module)
    latest = latest_metrics(module)
    assert set(latest) == {"train/loss"} and isinstance(latest["train/loss"], float)
    assert latest["train/loss"] == float(read_metrics(path)[-1]["train/loss"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["3/6", "6/6"]
    assert lines[-1].endswith(f"train/loss={latest['train/loss']:.4g}")


def test_the_progress_bar_shows_log_step_metrics(tmp_path):
    module = _Tiny()
    bar = MetricsProgressBar()
    trainer = _trainer(tmp_path, [], MetricsCSV(tmp_path / "metrics.csv", on_row=lambda *a: None), 2)
    trainer.fit(module)
    shown = bar.get_metrics(trainer, module)
    assert shown["train/loss"] == f"{latest_metrics(module)['train/loss']:.4g}"


class _Clipped(_Tiny):
    """One step through optimizer_step with clipping; records the gradients the optimizer
    sees and how many times the gradient norm is computed."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip
        self.seen = {}

    def training_step(self, batch, batch_idx):
        from unittest import mock

        loss = ((self.weight * 10 - batch[0]) ** 2).sum()
        self.manual_backward(loss)
        self.seen["raw"] = self.weight.grad.clone()
        optimizer = self.optimizers().optimizer
        real_step, real_norm = optimizer.step, torch._foreach_norm
        norms = []

        def step(*args, **kwargs):
            self.seen["stepped"] = self.weight.grad.clone()
            return real_step(*args, **kwargs)

        with mock.patch.object(optimizer, "step", step), \
                mock.patch.object(torch, "_foreach_norm", lambda *a, **k: norms.append(1) or real_norm(*a, **k)):
            self.seen["norm"] = float(optimizer_step(self, self.clip))
        self.seen["norm_calls"] = len(norms)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_optimizer_step_clips_as_lightning_does_with_one_norm(tmp_path, precision):
    module = _Clipped(clip=0.5)
    L.Trainer(max_steps=1, logger=False, accelerator="cpu", precision=precision, enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path).fit(module)
    raw, norm = module.seen["raw"], float(module.seen["raw"].norm())
    assert module.seen["norm"] == pytest.approx(norm, rel=1e-6) and norm > 0.5
    torch.testing.assert_close(module.seen["stepped"], raw * 0.5 / (norm + 1e-6))  # clip_grad_norm_'s formula
    assert module.seen["norm_calls"] == 1


class _Headlines(_Tiny):
    console_metrics = ("train/z", "train/loss", "never/logged")

    def training_step(self, batch, batch_idx):
        super().training_step(batch, batch_idx)
        log_step(self, {"train/a": 1.0, "train/z": 2.0, "train/b": 3.0})


def test_console_lines_show_the_algorithms_headline_metrics_or_the_chosen_ones(tmp_path, capsys):
    _trainer(tmp_path, [ConsoleLines(every=2, total=2)], MetricsCSV(tmp_path / "m.csv", on_row=lambda *a: None),
             2).fit(_Headlines())
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("step ")][-1]
    assert [part.split("=")[0] for part in line.split()[2:]] == ["train/z", "train/loss"]  # in the declared order
    _trainer(tmp_path, [ConsoleLines(every=2, total=2, chosen=["train/b", "train/a"])],
             MetricsCSV(tmp_path / "n.csv", on_row=lambda *a: None), 2).fit(_Headlines())
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("step ")][-1]
    assert [part.split("=")[0] for part in line.split()[2:]] == ["train/b", "train/a"]  # trainer.console_metrics
