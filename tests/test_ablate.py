"""``rlhfkit ablate``: variants × seeds, shared stages, resumability, CSV, table, plots."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from helpers import RECIPES, TINY_SFT, cli
from rich.console import Console

import rlhfkit
from rlhfkit import RecipeError, UserError
from rlhfkit.ablate import load_ablation, mean_std, run_ablation

PLUGINS = rlhfkit.load_plugins()
ABLATIONS = sorted((RECIPES / "ablations").glob("*.yaml"))

TINY = [*TINY_SFT, "stages.sft.trainer.max_steps=10", "stages.rm.trainer.max_steps=4",
        "stages.rm.trainer.batch_size=16", "stages.rm.trainer.micro_batch_size=16", "stages.rm.eval_data.limit=16",
        "stages.rm.reference_data.limit=16"]


def write_ablation(tmp_path: Path, variants: str) -> Path:
    path = tmp_path / "ablation.yaml"
    path.write_text(f"recipe: {RECIPES / 'reward-model.yaml'}\ndir: {tmp_path / 'out'}\n"
                    f"table: [accuracy, train_loss]\nplots: [eval/accuracy]\nvariants:\n{variants}")
    return path


def test_variants_over_seeds_share_stages_and_resume(tmp_path):
    path = write_ablation(tmp_path, "  base: {doc: as written}\n"
                                    "  slow: {set: {stages.rm.algorithm.lr: 1.0e-5}}\n")
    ablation = load_ablation(path, PLUGINS, seeds=2, overrides=TINY)
    assert ablation.seeds == [0, 1] and ablation.shared == {0: ["sft"], 1: ["sft"]}
    console = Console(record=True, width=200)
    result = run_ablation(ablation, jobs_at_once=2, console=console)
    assert [state for _, state, _ in result["jobs"]] == ["done"] * 6  # 2 seeds x (shared + 2 variants)
    out = tmp_path / "out"
    # the sft stage ran once per seed and every variant links to it
    for seed in (0, 1):
        for variant in ("base", "slow"):
            link = out / f"seed-{seed}" / variant / "sft"
            assert link.is_symlink() and link.resolve() == (out / f"seed-{seed}" / "_shared" / "sft").resolve()
            assert (out / f"seed-{seed}" / variant / "rm" / "DONE.json").is_file()
    # every step's metrics of every variant and seed, in one long CSV
    with open(out / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["variant"], r["seed"], r["stage"]) for r in rows} == {
        (v, s, st) for v in ("base", "slow") for s in ("0", "1") for st in ("sft", "rm")}
    # the table: mean and sample std over seeds of the rm stage's summary
    with open(out / "table.csv", newline="") as handle:
        table = {r["variant"]: r for r in csv.DictReader(handle)}
    assert set(table) == {"base", "slow"} and table["base"]["seeds"] == "2"
    accuracies = [float(json.loads((out / f"seed-{s}" / "base" / "rm" / "summary.json").read_text())
                        ["accuracy"]) for s in (0, 1)]
    mean, std = mean_std(accuracies)
    assert float(table["base"]["accuracy_mean"]) == pytest.approx(mean)
    assert float(table["base"]["accuracy_std"]) == pytest.approx(std)
    assert "±" in console.export_text() and "| base |" in (out / "table.md").read_text()
    assert (out / "plots" / "eval_accuracy.png").stat().st_size > 1000
    assert (out / "plots" / "final_accuracy.png").stat().st_size > 1000
    # again: nothing to do, no run is launched
    def no_launch(job, env):
        raise AssertionError(f"{job.name} should have been skipped")

    again = run_ablation(load_ablation(path, PLUGINS, seeds=2, overrides=TINY), 2, Console(quiet=True), no_launch)
    assert [state for _, state, _ in again["jobs"]] == ["skipped"] * 6
    assert again["table"] == result["table"]


def test_a_failed_run_is_reported_and_the_others_finish(tmp_path):
    path = write_ablation(tmp_path, "  base: {}\n  other: {set: {stages.rm.algorithm.lr: 1.0e-5}}\n")
    ablation = load_ablation(path, PLUGINS, seeds=1, overrides=TINY)
    launched = []

    def fake(job, env):
        launched.append(job.name)
        return 1 if "other" in job.name else 0

    with pytest.raises(UserError, match=r"1 run\(s\) of the ablation failed:\n- seed 0 other: see .*seed-0-other.log"):
        run_ablation(ablation, 1, Console(quiet=True), fake)
    assert launched == ["seed 0 shared (sft)", "seed 0 base", "seed 0 other"]


def test_every_variant_is_validated_before_anything_runs(tmp_path):
    path = write_ablation(tmp_path, "  good: {}\n  bad: {set: {stages.rm.objective: pairwize}}\n"
                                    "  worse: {extends: ['preset:no-such-preset']}\n")
    with pytest.raises(RecipeError) as error:
        load_ablation(path, PLUGINS, seeds=1)
    text = str(error.value)
    assert "(variant bad)" in text and "pairwize" in text and "pairwise" in text
    assert "no-such-preset" in text and "variants.worse" in text
    assert not (tmp_path / "out").exists()


def test_a_malformed_ablation_file_names_the_field(tmp_path):
    path = tmp_path / "ablation.yaml"
    path.write_text(f"recipe: {RECIPES / 'sft.yaml'}\nvariants: {{a: {{sett: {{}}}}}}\nseed: 3\n")
    result = cli("ablate", str(path), "--validate")
    assert result.returncode == 2
    assert "variants.a.sett" in result.stderr and "seed" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("path", ABLATIONS, ids=lambda p: p.stem)
def test_shipped_ablations_validate(path):
    first = path.read_text().splitlines()[0]
    assert re.fullmatch(rf"# rlhfkit ablate recipes/ablations/{re.escape(path.name)} --seeds \d+( --jobs \d+)?", first)
    ablation = load_ablation(path, PLUGINS)
    assert len(ablation.spec.variants) >= 3
    assert all(v.doc for v in ablation.spec.variants.values())
