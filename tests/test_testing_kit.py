"""rlhfkit.testing: the builders give what the pipeline gives (and worse, in padding), every
built-in estimator, constraint, objective and reward passes check_component, and a
component that breaks a rule is told which."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import BaseModel, ConfigDict

import rlhfkit
from rlhfkit import Advantages, LossTerm
from rlhfkit.testing import (
    GROUPS,
    ContractError,
    check_component,
    make_feedback_batch,
    make_policy_output,
    make_preference_batch,
    make_reward_batch,
    make_rollout,
)

PLUGINS = rlhfkit.load_plugins()
KINDS = ("estimator", "constraint", "objective", "reward", "engine")
BUILTINS = [(kind, name) for kind in KINDS for name in PLUGINS.registry.names(kind)]


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rewards") / "rewards.py"
    path.write_text("def score(prompts, completions, **kwargs):\n    return [len(c) / 10 for c in completions]\n")
    return path


def settings_for(kind, name, request):
    if (kind, name) == ("engine", "vllm"):
        pytest.skip("needs vLLM: tests/test_vllm.py checks it (pytest -m vllm)")
    if (kind, name) == ("constraint", "ptx"):
        return {"data": {"name": "builtin", "task": "reviews", "split": "pretrain"}}
    if name == "gold":
        return {"task": "reviews"}
    if name == "composite":
        return {"terms": [{"reward": {"name": "gold", "task": "reviews"}, "weight": 0.5}]}
    if name == "python":
        return {"function": str(request.getfixturevalue("reward_file")) + ":score"}
    if (kind, name) == ("reward", "reward-model"):
        return {"path": str(request.getfixturevalue("exports")["rm"])}
    return None


@pytest.mark.parametrize(("kind", "name"), BUILTINS, ids=[f"{k}:{n}" for k, n in BUILTINS])
def test_every_builtin_component_keeps_its_contract(kind, name, request):
    check_component(kind, name, settings_for(kind, name, request), plugins=PLUGINS)


def test_the_builders_are_as_awkward_as_the_pipeline():
    rollout = make_rollout()
    mask = rollout.response_mask.bool()
    assert rollout.response_mask.sum(1)[0] == 1 and bool(mask[1].all()) and bool(rollout.truncated[1])
    assert tuple(rollout.group.tolist()) == GROUPS and GROUPS.count(2) == 1  # non-contiguous, a one-sample group
    for name in ("logprobs", "ref_logprobs", "values", "rewards"):
        values = getattr(rollout, name)
        assert torch.isnan(values[~mask]).all() and torch.isfinite(values[mask]).all(), name
    assert (rollout.rewards[mask].sum() - rollout.scores.sum()).abs() < 1e-5  # scores on the last real tokens
    output = make_policy_output(rollout)
    assert output.logprobs.requires_grad and (output.logprobs[~mask] == 0).all()
    pairs = make_preference_batch()
    assert pairs.chosen.requires_grad and pairs.chosen_tokens[0] == 1
    feedback = make_feedback_batch()
    assert feedback.desirable.any() and not feedback.desirable.all()
    rewards = make_reward_batch()
    assert not rewards.valid.all() and torch.isnan(rewards.scores[~rewards.valid]).all()


# ----------------------------------------------------------- components that break a rule

class Empty(BaseModel):
    model_config = ConfigDict(extra="forbid")


def plugins_with(kind: str, name: str, component, provides=frozenset(), tags=frozenset()):
    from types import SimpleNamespace

    spec = rlhfkit.ComponentSpec(kind, name, Empty, lambda c, x: component, "broken on purpose",
                                 provides=frozenset(provides), tags=frozenset(tags))
    plugin = SimpleNamespace(rlhfkit_components=rlhfkit.hookimpl(lambda: [spec]))
    return rlhfkit.load_plugins(extra=[("broken", plugin)])


class MultiplyingEstimator:
    """Masks by multiplication: the NaN of the padding leaks into the baseline."""

    critic = None

    def estimate(self, rollout):
        mask = rollout.response_mask.float()
        returns = (rollout.rewards * mask).sum(1, keepdim=True)
        return Advantages((returns - returns.mean()) * mask)


class PaddingLoss:
    """Its loss counts padded positions."""

    def loss(self, minibatch, output):
        return LossTerm(output.logprobs.sum() + output.entropy.mean())


class VectorObjective:
    def __call__(self, minibatch, output):
        return LossTerm(output.logprobs.sum(1))


class RepeatingSampler:
    """Draws the same prompt twice."""

    def draw(self, iteration, count, round=0):
        return [0] * count

    def observe(self, indices, scores):
        return {}


class UnseededSampler:
    """Draws from the global RNG: ranks would disagree."""

    def draw(self, iteration, count, round=0):
        import random

        return random.sample(range(20), count)

    def observe(self, indices, scores):
        return {}


@pytest.mark.parametrize(("kind", "component", "provides", "tags", "says"), [
    ("sampler", RepeatingSampler(), (), (), "8 distinct prompt indices"),
    ("sampler", UnseededSampler(), (), (), "the same prompts for the same iteration"),
    ("estimator", MultiplyingEstimator(), (), (), "advantages is not finite on real tokens"),
    ("constraint", PaddingLoss(), ("loss",), (), "the gradient of output.logprobs is not 0 on padding"),
    ("objective", VectorObjective(), (), ("policy-loss",), "must return a scalar loss tensor"),
])
def test_a_broken_component_is_told_which_rule(kind, component, provides, tags, says):
    plugins = plugins_with(kind, "broken", component, provides, tags)
    with pytest.raises(ContractError, match=says):
        check_component(kind, "broken", plugins=plugins)


def test_a_component_that_needs_settings_says_so():
    with pytest.raises(ContractError, match=r"pass the settings it needs"):
        check_component("reward", "gold", plugins=PLUGINS)
    assert math.isfinite(float(check_component("reward", "gold", {"task": "reviews"}, plugins=PLUGINS)
                               .score(["the printer is"], ["great ."])[0]))
