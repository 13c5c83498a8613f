"""Every recipe in recipes/ opens with its command, validates, and runs a few steps on a
shrunken model (the recipe-smoke tier)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import rlhfkit
from rlhfkit.recipe import compose
from rlhfkit.runner import run_recipe

# Only the files directly in recipes/: the folders below it are tested on their own terms
# (rm-static/ needs real checkpoints and data files: tests/test_real_recipes.py).
RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
PLUGINS = rlhfkit.load_plugins()


def shrink(recipe_path: Path, run_dir: Path) -> list[str]:
    """Overrides that make every stage of a recipe tiny: 2 steps, a 1-layer model."""
    data, _ = compose(recipe_path, PLUGINS.presets)  # with everything it extends
    overrides = [f"run.dir={run_dir}"]
    for name, stage in data["stages"].items():
        overrides += [f"stages.{name}.trainer.max_steps=2", f"stages.{name}.trainer.batch_size=4",
                      f"stages.{name}.trainer.micro_batch_size=4",
                      f"stages.{name}.trainer.log_every_n_steps=1"]
        policy = stage.get("policy")
        if isinstance(policy, dict) and "architecture" in policy:
            overrides += [f"stages.{name}.policy.architecture.layers=1",
                          f"stages.{name}.policy.architecture.hidden=16",
                          f"stages.{name}.policy.architecture.heads=2"]
        algorithm = stage.get("algorithm")
        if isinstance(algorithm, dict) and algorithm.get("name") == "ppo":  # 4 responses: 1 update per iteration
            prompts = max(1, 4 // algorithm.get("samples_per_prompt", 1))
            overrides += [f"stages.{name}.algorithm.prompts_per_iteration={prompts}",
                          f"stages.{name}.algorithm.epochs=1",
                          f"stages.{name}.algorithm.sampling.max_new_tokens=6",
                          f"stages.{name}.algorithm.eval_prompts=4"]
        if isinstance(algorithm, dict) and algorithm.get("name") == "evaluate":
            overrides += [f"stages.{name}.algorithm.prompts=4", f"stages.{name}.algorithm.max_new_tokens=6"]
            for slot in ("text", "pairs"):
                if isinstance(stage.get(slot), dict):
                    overrides.append(f"stages.{name}.{slot}.limit=8")
        if isinstance(stage.get("eval_data"), dict):
            overrides.append(f"stages.{name}.eval_data.limit=8")
    return overrides


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_opens_with_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first == f"# rlhfkit run {path.relative_to(Path(__file__).resolve().parents[1]).as_posix()}"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates_and_runs_shrunk(path, tmp_path):
    PLUGINS.load_recipe(path)  # as written
    recipe = PLUGINS.load_recipe(path, shrink(path, tmp_path / "run"))
    summaries = run_recipe(recipe, PLUGINS)
    assert list(summaries) == [stage.name for stage in recipe.stages]
    for stage in recipe.stages:
        if stage.algorithm.name == "evaluate":  # trains nothing: a report instead of a model
            assert (tmp_path / "run" / stage.name / "report.json").is_file()
            continue
        assert (tmp_path / "run" / stage.name / "export" / "config.json").is_file()
        assert json.loads((tmp_path / "run" / stage.name / "summary.json").read_text())["steps"] == 2
    # a second run skips every finished stage
    again = run_recipe(recipe, PLUGINS)
    assert again == summaries
