"""Reward sources: ``gold`` (a task's ground truth, a rule reward) and ``composite``
(a weighted sum), built through a registry and a real StageContext as a run builds them."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

import rlhfkit
import rlhfkit.plugins.rewards as rewards_plugin
import rlhfkit.plugins.tasks as tasks_plugin
from rlhfkit import ComponentSpec, Preference, PromptCompletion, StageContext, UserError
from rlhfkit.plugins.tasks.knowledge_world import ATTRIBUTES, IDK

Reward = rlhfkit.ref("reward")
SMALL = {"sft_size": 200, "preference_size": 50, "prompts_size": 16, "eval_size": 20}


class ConstantConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: float = Field(description="the score of every response")


class Constant:
    def __init__(self, value: float):
        self.value = value

    def score(self, prompts, responses):
        return torch.full((len(prompts),), self.value)


class WrongShape:
    def score(self, prompts, responses):
        return torch.zeros(len(prompts), 1)


@pytest.fixture(scope="module")
def registry() -> rlhfkit.Registry:
    reg = rlhfkit.Registry()
    reg.extend(tasks_plugin.rlhfkit_components())
    reg.extend(rewards_plugin.rlhfkit_components())
    reg.add(ComponentSpec(kind="reward", name="constant", config=ConstantConfig,
                          factory=lambda config, context: Constant(config.value),
                          doc="a constant score"))
    reg.add(ComponentSpec(kind="reward", name="wrong-shape", config=ConstantConfig,
                          factory=lambda config, context: WrongShape(), doc="[B, 1] scores"))
    return reg


@pytest.fixture
def context(registry, tmp_path) -> StageContext:
    return StageContext(registry=registry, stage="t", stage_dir=tmp_path)


def build(context: StageContext, **reference):
    return context.registry.build(Reward(**reference), context)


# ----------------------------------------------------------------------- gold


def test_gold_on_reviews_equals_the_task_gold_score(context):
    gold = build(context, name="gold", task={"name": "reviews", **SMALL})
    pairs = [r for r in gold.task.split("preference")[:8] if isinstance(r, Preference)]
    prompts = [p.prompt for p in pairs for _ in (0, 1)]
    responses = [text for p in pairs for text in (p.chosen, p.rejected)]
    scores = gold.score(prompts, responses)
    assert isinstance(gold, rlhfkit.RewardSource)
    assert scores.dtype == torch.float32 and scores.shape == (len(prompts),)
    assert scores.tolist() == pytest.approx(gold.task.gold_score(prompts, responses))
    # An example from docs/tasks.md: repetition is punished.
    repeated = gold.score(["write a review of the camera :"], ["this camera is great great great great great ."])
    assert repeated.item() == pytest.approx(0.48, abs=0.01)


def test_gold_on_knowledge_is_plus_one_zero_minus_four(context):
    gold = build(context, name="gold", task={"name": "knowledge", **SMALL})
    answered = next(r for r in gold.task.split("sft")
                    if isinstance(r, PromptCompletion) and r.completion != IDK)
    *words, value, stop = answered.completion.split()
    attribute = words[1]  # "the ATTRIBUTE of NAME is VALUE ."
    other = next(v for v in ATTRIBUTES[attribute] if v != value)
    wrong = " ".join([*words, other, stop])
    prompts = [answered.prompt] * 4
    responses = [answered.completion, IDK, wrong, "blue ."]
    assert gold.score(prompts, responses).tolist() == [1.0, 0.0, -4.0, -4.0]
    assert gold.task.gold_score(prompts, responses) == [1.0, 0.0, -4.0, -4.0]
    metrics = gold.evaluate(prompts, responses)
    assert metrics["gold"] == pytest.approx(-7 / 4)
    assert metrics["known/count"] == 4 and metrics["known/wrong"] == 0.5


def test_gold_scale(context):
    gold = build(context, name="gold", task="knowledge", scale=-0.5)
    row = next(r for r in gold.task.split("sft") if r.completion != IDK)
    assert gold.score([row.prompt] * 2, [row.completion, "nonsense ."]).tolist() == [-0.5, 2.0]


def test_gold_rejects_mismatched_lengths(context):
    gold = build(context, name="gold", task="reviews")
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        gold.score(["how is the kettle ?"] * 2, ["it is great ."])


def test_gold_shares_the_task_with_the_builtin_dataset(context):
    gold = build(context, name="gold", task={"name": "knowledge", "seed": 3})
    data = context.registry.build(
        rlhfkit.ref("dataset")(name="builtin", task={"name": "knowledge", "seed": 3}, split="sft"),
        context)
    assert gold.task is data.task
    other_seed = build(context, name="gold", task={"name": "knowledge", "seed": 4})
    assert other_seed.task is not data.task


def test_gold_builds_without_a_run(registry):
    gold = registry.build(Reward(name="gold", task="reviews"), None)
    assert gold.score(["how is the kettle ?"], ["it is great ."]).shape == (1,)


# ------------------------------------------------------------------ composite


def test_composite_is_the_weighted_sum(context):
    gold = build(context, name="gold", task="knowledge")
    row = next(r for r in gold.task.split("sft") if r.completion != IDK)
    prompts, responses = [row.prompt] * 3, [row.completion, IDK, "nonsense ."]
    composite = build(context, name="composite", terms=[
        {"reward": {"name": "gold", "task": "knowledge"}, "weight": 2.0},
        {"reward": {"name": "constant", "value": 0.5}, "weight": -3.0},
    ])
    assert isinstance(composite, rlhfkit.RewardSource)
    # gold is [1, 0, -4]: 2 * gold - 3 * 0.5
    assert composite.score(prompts, responses).tolist() == [0.5, -1.5, -9.5]
    terms = composite.score_terms(prompts, responses)
    assert list(terms) == ["0:gold", "1:constant", "total"]
    assert terms["0:gold"].tolist() == [1.0, 0.0, -4.0]  # logged unweighted
    assert terms["1:constant"].tolist() == [0.5, 0.5, 0.5]
    assert terms["total"].tolist() == [0.5, -1.5, -9.5]


def test_nested_composite(context):
    composite = build(context, name="composite", terms=[
        {"reward": {"name": "constant", "value": 1.0}},
        {"reward": {"name": "composite", "terms": [
            {"reward": {"name": "constant", "value": 2.0}, "weight": 3.0},
            {"reward": {"name": "constant", "value": 5.0}, "weight": -1.0}]},
         "weight": 10.0},
    ])
    terms = composite.score_terms(["a", "b"], ["c", "d"])
    assert list(terms) == ["0:constant", "1:composite/0:constant", "1:composite/1:constant",
                           "1:composite", "total"]
    assert terms["1:composite"].tolist() == [1.0, 1.0]  # 3 * 2 - 5
    assert terms["1:composite/1:constant"].tolist() == [5.0, 5.0]
    assert composite.score(["a", "b"], ["c", "d"]).tolist() == [11.0, 11.0]  # 1 + 10 * 1


def test_composite_errors(context):
    composite = build(context, name="composite", terms=[{"reward": {"name": "constant", "value": 1}}])
    with pytest.raises(ValueError, match="1 prompts but 2 responses"):
        composite.score(["a"], ["b", "c"])
    bad = build(context, name="composite", terms=[{"reward": {"name": "constant", "value": 1}},
                                                  {"reward": {"name": "wrong-shape", "value": 1}}])
    with pytest.raises(ValueError, match=r"term 1:wrong-shape returned scores of shape \(2, 1\)"):
        bad.score(["a", "b"], ["c", "d"])
    with pytest.raises(UserError, match="StageContext"):
        context.registry.build(Reward(name="composite", terms=[{"reward": {"name": "gold", "task": "reviews"}}]),
                               None)


def test_problems_inside_a_composite_name_their_dotted_path(registry):
    reference = Reward(name="composite", terms=[
        {"reward": {"name": "gold", "task": "reviews"}},
        {"reward": {"name": "composite", "terms": [{"reward": "gidl"}]}},
        {"reward": {"name": "gold", "task": "reviews", "scael": 2}},
    ])
    problems = {path: (message, hint) for path, message, hint in registry.resolve(reference, "reward")}
    assert set(problems) == {"reward.terms[1].reward.terms[0].reward.name",
                             "reward.terms[2].reward.scael"}
    message, _ = problems["reward.terms[1].reward.terms[0].reward.name"]
    assert "unknown reward 'gidl'" in message and "composite, constant, format, gold" in message
    assert "gold" in problems["reward.terms[2].reward.scael"][1]  # the hint lists gold's settings
    assert registry.resolve(Reward(name="composite", terms=[]), "reward")[0][0] == "reward.terms"


def test_unknown_task_inside_gold_inside_composite(registry):
    reference = Reward(name="composite", terms=[{"reward": {"name": "gold", "task": "review"}}])
    paths = [path for path, _, _ in registry.resolve(reference, "reward")]
    assert paths == ["reward.terms[0].reward.task.name"]


# --------------------------------------------------------------- discovery


def test_plugins_list_the_rewards():
    registry = rlhfkit.load_plugins().registry
    assert {"gold", "composite"} <= set(registry.names("reward"))
    assert registry.get("reward", "gold").plugin == "tasks"
    assert registry.get("reward", "composite").plugin == "rewards"


def test_registering_the_rewards_does_not_import_torch():
    code = ("import sys, rlhfkit.plugins.tasks as t, rlhfkit.plugins.rewards as r; "
            "t.rlhfkit_components(); r.rlhfkit_components(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
