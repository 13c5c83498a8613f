"""The reward-model algorithm and source: scoring under left and right padding for the
four model families, the exported classifier, normalisation, a K-wise run with
regularisers, DDP with two CPU processes against one, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import RECIPES, TINY_SFT, cli, column, read_metrics
from pydantic import BaseModel, ConfigDict
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast

from rlhfkit import (
    ComponentSpec,
    Registry,
    StageContext,
    UserError,
    encode_pairs,
    load_plugins,
    positions_from_mask,
    ref,
)
from rlhfkit.plugins import policy as policy_plugin
from rlhfkit.plugins import reward_model as reward_model_plugin
from rlhfkit.plugins.reward_model.scoring import ScalarHead, causal_lm, export_classifier, score_and_logits

FAMILIES = ["gpt2", "opt", "llama", "qwen2"]
WORDS = ["a", "b", "c", "d", "e", "f", "."]
PROMPTS = ["a b c", "d", "e f . a b c d", "f f"]
RESPONSES = ["d e .", "a b c d e f", "b", "c . c . c"]
REWARD_MODEL = str(RECIPES / "reward-model.yaml")


class FakeTaskConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FakeTask:
    def vocabulary(self) -> list[str]:
        return list(WORDS)


@pytest.fixture(scope="module")
def registry() -> Registry:
    registry = Registry()
    registry.extend(policy_plugin.rlhfkit_components())
    registry.extend(reward_model_plugin.rlhfkit_components())
    registry.add(ComponentSpec(kind="task", name="fake", config=FakeTaskConfig,
                               factory=lambda config, context: FakeTask(), doc="test words"))
    return registry


def left_padded(right: dict[str, list[list[int]]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same sequences as ``encode_pairs``' right-padded rows, padded on the left."""
    ids, mask = [], []
    for row, row_mask in zip(right["input_ids"], right["attention_mask"], strict=True):
        real = [t for t, m in zip(row, row_mask, strict=True) if m]
        fill = len(row) - len(real)
        ids.append([pad] * fill + real)
        mask.append([0] * fill + [1] * len(real))
    return torch.tensor(ids), torch.tensor(mask)


# ------------------------------------------------------------------ scoring and export


@pytest.mark.parametrize("family", FAMILIES)
def test_export_scores_equal_training_scores_under_both_paddings(registry, tmp_path, family):
    torch.manual_seed(0)
    context = StageContext(registry=registry, stage_dir=tmp_path)
    backbone = context.build(ref("policy")(name="transformers", tokenizer={"task": "fake"},
                                          architecture={"family": family, "layers": 1, "hidden": 32}))
    model = backbone.model.eval()
    with torch.no_grad():  # larger random weights, so that every position matters
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
    head = ScalarHead(32)
    tokenizer = backbone.tokenizer
    right = encode_pairs(tokenizer, PROMPTS, RESPONSES, max_length=32)
    right_ids, right_mask = torch.tensor(right["input_ids"]), torch.tensor(right["attention_mask"])
    left_ids, left_mask = left_padded(right, tokenizer.pad_token_id)
    assert not torch.equal(left_ids, right_ids)  # the rows really are ragged
    with torch.no_grad():
        training, _ = score_and_logits(model, head, right_ids, right_mask, with_logits=False)
        training_left, _ = score_and_logits(model, head, left_ids, left_mask, with_logits=False)
        alone = torch.cat([score_and_logits(model, head, right_ids[i:i + 1, :int(right_mask[i].sum())],
                                            right_mask[i:i + 1, :int(right_mask[i].sum())], False)[0]
                           for i in range(len(PROMPTS))])
    torch.testing.assert_close(training_left, training, rtol=0, atol=1e-5)
    torch.testing.assert_close(alone, training, rtol=0, atol=1e-5)
    assert training.std() > 1e-3  # the sequences score differently

    export = tmp_path / "rm"
    export_classifier(causal_lm(backbone.plain_model()), head, tokenizer, export, {"mean": 0.5, "std": 2.0})
    classifier = AutoModelForSequenceClassification.from_pretrained(export, local_files_only=True).eval()
    assert classifier.config.num_labels == 1
    if family == "gpt2":  # trained with the fused GELU; the export keeps the checkpoint's name
        assert type(backbone.model.transformer.h[0].mlp.act).__name__ == "GELUTanh"
        assert classifier.config.activation_function == "gelu_new"
    assert classifier.config.rlhfkit_reward_normalization == {"mean": 0.5, "std": 2.0}
    with torch.no_grad():
        # the standard transformers call on right padding reads the same token
        plain = classifier(input_ids=right_ids, attention_mask=right_mask).logits[:, 0]
        left = classifier(input_ids=left_ids, attention_mask=left_mask,
                          position_ids=positions_from_mask(left_mask)).logits[:, 0]
    torch.testing.assert_close(plain, training, rtol=0, atol=1e-5)
    torch.testing.assert_close(left, training, rtol=0, atol=1e-5)

    source = context.build(ref("reward")(name="reward-model", path=str(export), max_length=32, batch_size=3))
    if family == "gpt2":  # and scoring runs it fused again
        assert type(source.model.base_model.h[0].mlp.act).__name__ == "GELUTanh"
    torch.testing.assert_close(source.raw_scores(PROMPTS, RESPONSES), training, rtol=0, atol=1e-5)
    torch.testing.assert_close(source.score(PROMPTS, RESPONSES), (training - 0.5) / 2.0, rtol=0, atol=1e-5)
    raw = context.build(ref("reward")(name="reward-model", path=str(export), max_length=32, normalize=False))
    torch.testing.assert_close(raw.score(PROMPTS, RESPONSES), training, rtol=0, atol=1e-5)
    # the exported tokenizer reads back as the one that trained
    loaded = PreTrainedTokenizerFast.from_pretrained(export, local_files_only=True)
    assert loaded(PROMPTS)["input_ids"] == tokenizer(PROMPTS)["input_ids"]


def test_source_errors(registry, tmp_path):
    context = StageContext(registry=registry, stage_dir=tmp_path)
    with pytest.raises(UserError, match="has no config.json.*reward-model stage's export"):
        context.build(ref("reward")(name="reward-model", path=str(tmp_path / "missing")))
    for settings in ({}, {"path": "x", "from_stage": "rm"}):
        with pytest.raises(UserError, match="exactly one of `path`"):
            context.build(ref("reward")(name="reward-model", **settings))
    with pytest.raises(UserError, match="refers to stage 'rm', which has no exported model"):
        context.build(ref("reward")(name="reward-model", from_stage="rm"))


# ------------------------------------------------------------------ whole runs

TINY_RM = [
    *TINY_SFT,
    "stages.sft.trainer.max_steps=30",
    "stages.rm.algorithm.lr=3e-3",
    "stages.rm.algorithm.warmup_steps=2",
    "stages.rm.trainer.batch_size=8",
    "stages.rm.trainer.micro_batch_size=4",
    "stages.rm.trainer.log_every_n_steps=1",
    "stages.rm.eval_data.limit=40",
    "stages.rm.reference_data.limit=48",
]


def test_kwise_with_regularizers_normalises_and_reports(tmp_path):
    """K-wise on rankings with an LM loss and centring: every term is logged, the report
    is written, and the exported model scores the reference data at mean 0, std 1."""
    out = tmp_path / "run"
    result = cli("run", REWARD_MODEL, *TINY_RM, f"run.dir={out}", "stages.rm.trainer.max_steps=6",
                 "stages.rm.objective=kwise", "stages.rm.data.split=ranking",
                 "stages.rm.regularizers=[{name: lm-loss, coef: 0.5}, centering]",
                 "stages.rm.algorithm.normalize_std=true", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = read_metrics(out / "rm" / "metrics.csv")
    for name in ("train/loss", "train/rm/accuracy", "train/rm/lm_nll", "train/rm/center", "train/grad_norm"):
        assert sorted(column(rows, name)) == list(range(1, 7)), name
    assert all(v > 0 for v in column(rows, "train/rm/lm_nll").values())
    # a ranking of 4 has up to 6 strict pairs per prompt
    assert max(column(rows, "train/rm/pairs").values()) > 1
    report = json.loads((out / "rm" / "eval" / "report.json").read_text())
    assert 0 <= report["accuracy"] <= 1 and (out / "rm" / "eval" / "calibration.png").stat().st_size > 1000
    summary = json.loads((out / "rm" / "summary.json").read_text())
    assert summary["accuracy"] == report["accuracy"] and "before_accuracy" in summary

    plugins = load_plugins()
    context = StageContext(registry=plugins.registry, stage_dir=tmp_path)
    source = context.build(ref("reward")(name="reward-model", path=str(out / "rm" / "export"), max_length=48))
    reference = context.build(ref("dataset")(name="builtin", task="reviews", split="sft-eval", limit=48)).rows()
    scores = source.score([r.prompt for r in reference], [r.completion for r in reference])
    assert abs(float(scores.mean())) < 1e-4
    assert float(scores.std()) == pytest.approx(1.0, abs=1e-4)

    # the standalone evaluation of the export reproduces the stage's report
    import subprocess
    import sys

    command = [sys.executable, "-m", "rlhfkit.plugins.reward_model.evaluate", str(out / "rm" / "export"),
               "--task", "reviews", "--limit", "40", "--max-length", "48", "--out", str(tmp_path / "cli")]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    again = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert again["accuracy"] == report["accuracy"]
    assert again["chosen_mean"] == pytest.approx(report["chosen_mean"], abs=1e-4)
    assert "good answer" in done.stdout
    bad = subprocess.run([*command[:4], "--task", "reviews", "--split", "sft"], capture_output=True, text=True,
                         check=False)
    assert bad.returncode == 2 and "needs preference pairs" in bad.stderr


DDP_RECIPE = """\
run: {name: rm-ddp, seed: 0}
stages:
  rm:
    algorithm: {name: reward-model, lr: 3.0e-3, warmup_steps: 2, max_length: 48}
    backbone:
      name: transformers
      architecture: {family: gpt2, layers: 1, hidden: 32, heads: 2, max_positions: 64, dropout: 0.0}
      tokenizer: {task: reviews}
    objective: pairwise
    data: {name: builtin, task: reviews, split: preference}
    eval_data: {name: builtin, task: reviews, split: preference-gold, limit: 64}
    trainer: {max_steps: 8, batch_size: 8, micro_batch_size: 4, log_every_n_steps: 1}
"""


@pytest.mark.parametrize("devices", [2])
def test_ddp_matches_one_process(tmp_path, devices):
    """Two CPU processes (gloo) against one at the same global batch (8 pairs a step, 4
    per micro-batch): every step's loss within 1e-5 relative, held-out accuracy equal and
    score means within 1e-4. Dropout is off; the only difference is the order of float
    additions in the gradient all-reduce."""
    recipe = tmp_path / "rm-ddp.yaml"
    recipe.write_text(DDP_RECIPE)
    one, two = tmp_path / "one", tmp_path / "two"
    result = cli("run", str(recipe), f"run.dir={one}", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    result = cli("run", str(recipe), f"run.dir={two}", f"stages.rm.trainer.devices={devices}",
                 "stages.rm.trainer.strategy=ddp", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    loss_one = column(read_metrics(one / "rm" / "metrics.csv"), "train/loss")
    loss_two = column(read_metrics(two / "rm" / "metrics.csv"), "train/loss")
    assert sorted(loss_one) == sorted(loss_two) == list(range(1, 9))
    for step, value in loss_one.items():
        assert loss_two[step] == pytest.approx(value, rel=1e-5), step
    summary_one = json.loads((one / "rm" / "summary.json").read_text())
    summary_two = json.loads((two / "rm" / "summary.json").read_text())
    assert summary_one["pairs"] == summary_two["pairs"] == 64
    for name in ("accuracy", "before_accuracy"):
        assert summary_two[name] == summary_one[name], name
    for name in ("chosen_mean", "rejected_mean"):
        assert summary_two[name] == pytest.approx(summary_one[name], abs=1e-4), name


def test_wrong_rows_and_reference_data_are_clear_errors(tmp_path):
    # found by the recipe check, before any stage trains
    out = tmp_path / "run"
    result = cli("run", REWARD_MODEL, *TINY_RM, f"run.dir={out}", "stages.rm.data.split=sft", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "stages.rm.data: dataset 'builtin' gives demonstrations (PromptCompletion)" in " ".join(result.stderr.split())
    assert not (out / "sft").exists()
    result = cli("run", REWARD_MODEL, *TINY_RM, f"run.dir={out}", "stages.rm.trainer.max_steps=1",
                 "stages.rm.reference_data.split=prompts", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "the reward-model algorithm's 'reference_data' takes" in " ".join(result.stderr.split())