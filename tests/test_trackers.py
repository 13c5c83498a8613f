"""Experiment trackers (trainer.loggers): TensorBoard, W&B offline and MLflow's local store
each receive a short run's metrics, read back here; an ablation's runs carry their
variant and seed. Needs the trackers extra: run in its own environment,
``pip install -e '.[test,trackers]' && pytest -m trackers tests/test_trackers.py``
(.ci/run does). The checks that need no tracker package run with the main suite."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from helpers import RECIPES, TINY_SFT, cli

import rlhfkit
from rlhfkit import RecipeError
from rlhfkit.ablate import load_ablation, run_ablation
from rlhfkit.trackers import mlflow_store

PLUGINS = rlhfkit.load_plugins()
SHORT = [*TINY_SFT, "stages.sft.trainer.max_steps=6", "stages.sft.trainer.log_every_n_steps=2"]
ALL = "stages.sft.trainer.loggers=[csv, tensorboard, {name: wandb, project: tracked}, mlflow]"
ENV = {"WANDB_SILENT": "true", "WANDB_DISABLE_CODE": "true"}


def csv_metric(path: Path, name: str) -> dict[int, float]:
    with open(path, newline="") as handle:
        return {int(float(r["step"])): float(r[name]) for r in csv.DictReader(handle) if r.get(name)}


def tensorboard_scalars(directory: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = {p.parent for p in directory.rglob("events.out.tfevents.*")}
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    return {e.step: e.value for e in accumulator.Scalars(tag)}


def wandb_records(file: Path) -> list[bytes]:
    """The records of a W&B run file (``run-<id>.wandb``): a 7-byte header (``:W&B``, magic,
    version), then LevelDB-log records in 32 KiB blocks (crc32, length, type: 1 full,
    2 first, 3 middle, 4 last). wandb 0.2x+ ships no Python reader for it."""
    import struct

    data = file.read_bytes()
    assert data[:4] == b":W&B"
    block, position, records, parts = 32768, 7, [], b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        body = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == 1:
            records.append(body)
        elif kind == 2:
            parts = body
        elif kind == 3:
            parts += body
        elif kind == 4:
            records.append(parts + body)
    return records


def wandb_run(run_dir: Path) -> tuple[Any, list[dict], dict]:
    """The run record, history rows and config of the one offline W&B run under ``run_dir``."""
    from wandb.proto import wandb_internal_pb2

    (file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    run, rows, config = None, [], {}
    for data in wandb_records(file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    return run, rows, config


def mlflow_runs(uri: str, experiment: str) -> tuple[Any, list]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r} in {uri}"
    return client, client.search_runs([found.experiment_id])


@pytest.mark.trackers
def test_every_tracker_receives_the_metrics_of_a_short_run(tmp_path):
    result = cli("run", str(RECIPES / "sft.yaml"), f"run.dir={tmp_path / 'run'}", *SHORT, ALL, env=ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "run"
    expected = csv_metric(run / "sft" / "metrics.csv", "train/loss")
    assert sorted(expected) == [2, 4, 6]

    board = tensorboard_scalars(run / "tensorboard" / "sft", "train/loss")
    assert board == pytest.approx(expected)

    record, rows, config = wandb_run(run)
    logged = {int(r["trainer/global_step"]): float(r["train/loss"]) for r in rows if "train/loss" in r}
    assert logged == pytest.approx(expected)
    assert (record.project, record.display_name, record.run_group, record.job_type) == ("tracked", "sft/sft", "sft", "sft")
    assert {"stage:sft", "seed:0"} <= set(record.tags)
    identity = {k: v.get("value", v) if isinstance(v, dict) else v for k, v in config.items()}
    assert identity["stage"] == "sft" and identity["seed"] == 0 and identity["run"] == "sft"
    assert any("summary/train_loss" in r for r in rows)

    client, runs = mlflow_runs(mlflow_store(run), "sft")
    (tracked,) = runs
    history = {m.step: m.value for m in client.get_metric_history(tracked.info.run_id, "train/loss")}
    assert history == pytest.approx(expected)
    assert tracked.data.tags["stage"] == "sft" and tracked.data.tags["seed"] == "0"
    assert tracked.info.status == "FINISHED"
    assert "summary/train_loss" in tracked.data.metrics  # the stage's summary, at its last step
    # nothing was written outside the run directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.trackers
def test_an_ablations_runs_carry_their_variant_and_seed(tmp_path):
    path = tmp_path / "ablation.yaml"
    path.write_text(f"recipe: {RECIPES / 'sft.yaml'}\ndir: {tmp_path / 'out'}\ntable: [train_loss]\n"
                    "set: {stages.sft.trainer.loggers: [tensorboard, mlflow]}\n"
                    "variants:\n  base: {}\n  fast: {set: {stages.sft.algorithm.lr: 1.0e-2}}\n")
    ablation = load_ablation(path, PLUGINS, seeds=2, overrides=SHORT)
    result = run_ablation(ablation, jobs_at_once=2)
    assert [state for _, state, _ in result["jobs"]] == ["done"] * 4
    out = tmp_path / "out"
    _client, runs = mlflow_runs(mlflow_store(out), "out")  # one store, one experiment
    seen = {(r.data.tags["variant"], r.data.tags["seed"]) for r in runs}
    assert seen == {("base", "0"), ("base", "1"), ("fast", "0"), ("fast", "1")}
    assert all(r.data.tags["ablation"] == "out" and r.data.metrics.get("train/loss") is not None for r in runs)
    for variant in ("base", "fast"):
        for seed in (0, 1):
            assert tensorboard_scalars(out / "tensorboard" / variant / "sft" / f"seed-{seed}", "train/loss")


# ------------------------------------------------------------- without the tracker packages

def test_trackers_are_checked_by_validate_and_left_out_of_the_fingerprint(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("wandb", "tensorboard", "tensorboardX") else real(name, *a))
    with pytest.raises(RecipeError, match=r"the wandb logger needs the wandb package.*rlhfkit\[trackers\]"):
        PLUGINS.load_recipe(RECIPES / "sft.yaml", ["stages.sft.trainer.loggers=[wandb]"])
    with pytest.raises(RecipeError, match="loggers"):
        PLUGINS.load_recipe(RECIPES / "sft.yaml", ["stages.sft.trainer.loggers=[neptune]"])
    plain = PLUGINS.load_recipe(RECIPES / "sft.yaml")
    observed = PLUGINS.load_recipe(RECIPES / "sft.yaml", ["stages.sft.trainer.loggers=[csv]",
                                                          "stages.sft.trainer.console_metrics=[train/loss]"])
    assert plain.stages[0].fingerprint() == observed.stages[0].fingerprint()


def test_the_metrics_hook_is_told_the_runs_identity(tmp_path):
    from rlhfkit import hookimpl
    from rlhfkit.runner import run_recipe

    seen = []

    class Observer:
        @hookimpl
        def rlhfkit_on_metrics(self, stage, step, metrics, identity):
            seen.append((stage, step, dict(identity)))

    plugins = rlhfkit.load_plugins()
    plugins.manager.register(Observer())
    recipe = plugins.load_recipe(RECIPES / "sft.yaml", [f"run.dir={tmp_path / 'run'}", *SHORT,
                                                        "run.variant=fast", "run.ablation=study"])
    run_recipe(recipe, plugins)
    assert seen and all(who == {"run": "sft", "stage": "sft", "seed": 0, "variant": "fast", "ablation": "study"}
                        for _, _, who in seen)
