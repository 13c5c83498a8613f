"""Fingerprints that see code: a stage records the distributions (and, for code outside an
installed distribution's folder, a hash of the modules) of the plugins it uses, and the
finishes of the earlier stages it was trained on. Editing a plugin re-runs exactly the runs
that use it; an earlier stage that ran again makes the later ones run again."""

from __future__ import annotations

import json
import os
from pathlib import Path

from helpers import RECIPES, TINY_SFT, pip_install
from rich.console import Console

import rlhfkit
from rlhfkit.ablate import load_ablation, run_ablation
from rlhfkit.provenance import code_changes, stage_code

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "rlhfkit-example-plugin"
SHORT = [*TINY_SFT, "stages.sft.trainer.max_steps=3", "stages.sft.eval_data.limit=16"]
INLINE = ("{name: inline, rows: [{prompt: 'the printer is', completion: ' great .'}, "
          "{prompt: 'the lamp is', completion: ' bad .'}]}")


def test_a_stage_records_its_plugins_and_their_source():
    plugins = rlhfkit.load_plugins()
    recipe = plugins.load_recipe(RECIPES / "ppo.yaml")
    code = {stage.name: stage_code(stage, plugins.registry) for stage in recipe.stages}
    assert set(code["ppo"]) == {"rlhfkit"}
    # a checkout (not inside site-packages): the version carries a hash of the modules used
    assert code["ppo"]["rlhfkit"].startswith("0.1.0+src.") and code["ppo"] != code["sft"]
    assert code_changes(None, code["ppo"]) == ""  # a stage finished before code was recorded
    assert code_changes({"rlhfkit": "0.1.0"}, {"rlhfkit": "0.2.0"}) == "rlhfkit 0.1.0 -> 0.2.0"


def test_editing_a_plugin_reruns_exactly_the_runs_that_use_it(tmp_path, monkeypatch):
    site = tmp_path / "site"
    pip_install(EXAMPLE, site)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    monkeypatch.syspath_prepend(str(site))
    path = tmp_path / "ablation.yaml"
    path.write_text(f"recipe: {RECIPES / 'sft.yaml'}\ndir: {tmp_path / 'out'}\ntable: [train_loss]\n"
                    f"variants:\n  builtin: {{}}\n  inline: {{set: {{stages.sft.data: {INLINE}}}}}\n")

    def ablate() -> tuple[dict[str, str], str]:
        plugins = rlhfkit.load_plugins()
        console = Console(record=True, width=300)
        result = run_ablation(load_ablation(path, plugins, seeds=1, overrides=SHORT), console=console)
        return {name: state for name, state, _ in result["jobs"]}, console.export_text()

    first, _ = ablate()
    assert first == {"seed 0 builtin": "done", "seed 0 inline": "done"}
    again, _ = ablate()
    assert again == {"seed 0 builtin": "skipped", "seed 0 inline": "skipped"}

    module = site / "rlhfkit_example_plugin" / "__init__.py"
    module.write_text(module.read_text() + "\n# an edit: the plugin's code changed\n")
    edited, log = ablate()
    assert edited == {"seed 0 builtin": "skipped", "seed 0 inline": "done"}
    assert "stale seed 0 inline: stage sft's code changed: rlhfkit-example-plugin 0.1.0+src." in log, log
    done = json.loads((tmp_path / "out" / "seed-0" / "inline" / "sft" / "DONE.json").read_text())
    assert done["code"]["rlhfkit-example-plugin"].startswith("0.1.0+src.") and "rlhfkit" in done["code"]


def test_a_stage_trained_on_an_earlier_finish_runs_again(tmp_path):
    plugins = rlhfkit.load_plugins()
    run_dir = tmp_path / "run"
    tiny = [f"run.dir={run_dir}", *SHORT, "stages.dpo.trainer.max_steps=2", "stages.dpo.algorithm.eval_prompts=4",
            "stages.dpo.eval_data.limit=8", "stages.dpo.trainer.batch_size=8", "stages.dpo.trainer.micro_batch_size=8"]
    from rlhfkit.runner import run_recipe

    run_recipe(plugins.load_recipe(RECIPES / "dpo.yaml", tiny), plugins)
    first = json.loads((run_dir / "dpo" / "DONE.json").read_text())
    sft = json.loads((run_dir / "sft" / "DONE.json").read_text())
    assert first["upstream"] == {"sft": sft["id"]}
    # the SFT stage finishes again (its DONE.json set aside): DPO was trained on the old one
    (run_dir / "sft" / "DONE.json").unlink()
    console = Console(record=True, width=300)
    run_recipe(plugins.load_recipe(RECIPES / "dpo.yaml", tiny), plugins, console=console)
    second = json.loads((run_dir / "dpo" / "DONE.json").read_text())
    assert second["id"] != first["id"] and second["upstream"]["sft"] != sft["id"]
    assert "stage 'sft' finished again since; running it again" in console.export_text()
