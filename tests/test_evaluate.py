"""The ``evaluate`` stage: earlier models side by side on the same prompts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import RECIPES, TINY_SFT
from rich.console import Console

import rlhfkit
from rlhfkit import RecipeError
from rlhfkit.runner import run_recipe

PLUGINS = rlhfkit.load_plugins()
QUIET = Console(quiet=True)

REPORT = """\
extends: {base}
stages:
  report:
    algorithm: {{name: evaluate, prompts: 16, max_new_tokens: 8, max_length: 48, samples: 2, kl_samples: 2}}
    models:
      - {{name: transformers, from_stage: sft}}
      - {{name: transformers, path: {sft_export}}}
    reference: {{name: transformers, from_stage: sft}}
    reward: {{name: reward-model, from_stage: rm, max_length: 48}}
    gold: {{name: gold, task: reviews}}
    prompts: {{name: builtin, task: reviews, split: prompts-eval}}
    text: {{name: builtin, task: reviews, split: sft-eval, limit: 64}}
    pairs: {{name: builtin, task: reviews, split: preference-gold, limit: 32}}
"""

# the overrides the session's `exports` fixture trained sft and rm with (stages are skipped)
FIXTURE = [*TINY_SFT, "stages.sft.trainer.max_steps=30", "stages.rm.trainer.max_steps=10",
           "stages.rm.trainer.batch_size=16", "stages.rm.trainer.micro_batch_size=16",
           "stages.rm.eval_data.limit=32", "stages.rm.reference_data.limit=32"]


@pytest.fixture
def run(exports, tmp_path):
    """A copy of the fixture's finished run and a recipe adding a report stage."""
    root = tmp_path / "run"
    shutil.copytree(exports["sft"].parents[1], root)
    recipe = tmp_path / "report.yaml"
    recipe.write_text(REPORT.format(base=RECIPES / "reward-model.yaml", sft_export=exports["sft"]))
    return recipe, root


def test_report_measures_each_model_consistently_with_the_stages(run):
    recipe_path, root = run
    recipe = PLUGINS.load_recipe(recipe_path, [*FIXTURE, f"run.dir={root}"])
    console = Console(record=True, width=160)
    summaries = run_recipe(recipe, PLUGINS, console)
    report = summaries["report"]
    sft_label = str(Path(recipe.stage("report").slots["models"][1].config.path))
    # the same weights, loaded two ways, measure the same
    for metric in ("gold", "proxy", "length", "perplexity"):
        assert report[f"sft/{metric}"] == pytest.approx(report[f"{sft_label}/{metric}"], abs=1e-6)
    # KL of the reference to itself is exactly zero
    assert report["sft/kl"] == 0.0
    # perplexity as the sft stage measured it on the same rows; RM accuracy as the rm stage's
    assert report["sft/perplexity"] == pytest.approx(summaries["sft"]["perplexity_after"], rel=1e-4)
    assert report["rm/accuracy"] == pytest.approx(summaries["rm"]["accuracy"], abs=1e-6)
    # gold is the gold scorer's mean over greedy answers to the same prompts
    stage = recipe.stage("report")
    context = rlhfkit.StageContext(PLUGINS.registry, exports={"sft": root / "sft" / "export"})
    policy = context.build(stage.slots["models"][0])
    gold = context.build(stage.slots["gold"])
    prompts = [r.prompt for r in context.build(stage.slots["prompts"]).rows()][:16]
    answers = policy.generate(prompts, max_new_tokens=8, do_sample=False)
    assert report["sft/gold"] == pytest.approx(float(gold.score(prompts, answers).float().mean()), abs=1e-5)
    # tables printed at the end, samples saved
    text = console.export_text()
    assert "every model on the same prompts" in text and "the same prompts after each stage" in text
    samples = [json.loads(line) for line in (root / "report" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 2 and samples[0]["prompt"] == prompts[0] and samples[0]["response"] == answers[0]
    assert {"gold", "proxy"} <= set(samples[0])
    # a re-run skips every stage and prints the same report again
    console = Console(record=True, width=160)
    assert run_recipe(recipe, PLUGINS, console) == summaries
    assert "the same prompts after each stage" in console.export_text()


def test_kl_to_a_different_model_is_positive(run):
    recipe_path, root = run
    untrained = "{family: gpt2, layers: 1, hidden: 32, heads: 2}"
    recipe = PLUGINS.load_recipe(recipe_path, [*FIXTURE, f"run.dir={root}",
                                               "stages.report.reference.from_stage=null",
                                               f"stages.report.reference.architecture={untrained}",
                                               "stages.report.reference.tokenizer={task: reviews}"])
    torch.manual_seed(0)
    report = run_recipe(recipe, PLUGINS, QUIET)["report"]
    assert report["sft/kl"] > 1.0  # an untrained model is far from the trained one


def test_rows_without_the_needed_field_are_a_clear_error(run):
    recipe_path, root = run
    # refused by the recipe check, before any stage runs
    with pytest.raises(RecipeError, match=r"stages.report.text: dataset 'builtin' gives prompts \(Prompt\), but the "
                                          r"evaluate algorithm's 'text' takes"):
        PLUGINS.load_recipe(recipe_path, [*FIXTURE, f"run.dir={root}", "stages.report.text.split=prompts-eval"])


PASS_AT_K = """\
run: {name: pass-at-k, seed: 0}
stages:
  report:
    algorithm: {name: evaluate, prompts: 4, max_new_tokens: 8, samples: 0, kl_samples: 0, pass_k: 3, labels: [m]}
    models:
      - {name: transformers, tokenizer: {task: reasoning}, architecture: {layers: 1, hidden: 16, heads: 2}}
    gold: {name: gold, task: reasoning}
    prompts: {name: builtin, task: reasoning, split: prompts-eval}
"""


def test_pass_at_k_and_the_task_metrics_by_hand(tmp_path, monkeypatch):
    """Scripted answers: greedy ones all wrong; of 3 samples, prompt 0's second and prompt
    2's third are right. pass@3 = 2/4; per level, levels 1 and 3 pass."""
    from rlhfkit.plugins.policy.model import TransformersPolicy
    from rlhfkit.plugins.tasks import ReasoningConfig, ReasoningTask
    from rlhfkit.plugins.tasks.reasoning import parse_prompt, result

    rows = ReasoningTask(ReasoningConfig()).split("prompts-eval")[:4]
    results = [result(parse_prompt(r.prompt)) for r in rows]
    assert [r.fields["level"] for r in rows] == [1, 2, 3, 4]
    calls = {"sampled": 0}

    def generate_ids(self, ids, mask, *, do_sample, **kwargs):
        return torch.zeros(len(ids), 1, dtype=torch.long), torch.ones(len(ids), 1, dtype=torch.long), do_sample

    def decode_responses(self, response_ids, response_mask):
        return self._scripted.pop(0)

    def scripted(self, ids, mask, **kwargs):
        ids_, mask_, do_sample = generate_ids(self, ids, mask, **kwargs)
        if do_sample:
            j = calls["sampled"]
            calls["sampled"] += 1
            right = {(0, 1), (2, 2)}
            self._scripted = [[f"answer : {n + (0 if (i, j) in right else 1)} ." for i, n in enumerate(results)]]
        else:
            self._scripted = [[f"answer : {n + 1} ." for n in results]]
        return ids_, mask_

    monkeypatch.setattr(TransformersPolicy, "generate_ids", scripted)
    monkeypatch.setattr(TransformersPolicy, "decode_responses", decode_responses)
    (tmp_path / "r.yaml").write_text(PASS_AT_K)
    recipe = PLUGINS.load_recipe(tmp_path / "r.yaml", [f"run.dir={tmp_path / 'run'}"])
    report = run_recipe(recipe, PLUGINS, QUIET)["report"]
    assert calls["sampled"] == 3
    assert report["m/gold"] == 0.0 and report["m/task/level1/accuracy"] == 0.0
    assert report["m/pass@3"] == 0.5
    assert [report[f"m/pass@3/level{n}/accuracy"] for n in (1, 2, 3, 4)] == [1.0, 0.0, 1.0, 0.0]
