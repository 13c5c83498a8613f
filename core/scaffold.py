"""``rlhfkit new KIND NAME``: a plugin distribution with one working, tested component.

    rlhfkit new estimator my-adv            # writes ./rlhfkit-my-adv/
    cd rlhfkit-my-adv && pip install -e '.[test]' && pytest && rlhfkit validate recipe.yaml

The package holds ``pyproject.toml`` (its ``rlhfkit`` entry point), the settings and
registration in ``<package>/__init__.py`` (imports no torch, so ``rlhfkit validate`` stays
fast), the component in ``<package>/components.py``, a test that uses ``rlhfkit.testing``
only, and a recipe that runs it on a built-in task. Every template is a small, real
component (documented in docs/writing-a-plugin.md), to be replaced by the author's own.
"""

from __future__ import annotations

import re
from pathlib import Path

from rlhfkit.errors import UserError

KINDS = ("estimator", "objective", "constraint", "reward")

_PYPROJECT = '''\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "DIST_"
version = "0.1.0"
description = "DOC_"
requires-python = ">=3.11"
dependencies = ["rlhfkit"]

[project.optional-dependencies]
test = ["pytest>=8"]

# rlhfkit finds the plugin through this entry point: `rlhfkit plugins KIND_` lists it.
[project.entry-points.rlhfkit]
NAME_ = "PKG_"

[tool.setuptools]
packages = ["PKG_"]
'''

_INIT = '''\
"""DIST_: the KIND_ component `NAME_` for rlhfkit (DOC_).

Settings and registration only: the component itself lives in `components.py`, imported
when a stage builds it, so `rlhfkit validate` and `rlhfkit plugins` never import torch.
"""

from __future__ import annotations

import rlhfkit
from pydantic import BaseModel, ConfigDict, Field


class CONFIG_(BaseModel):
    """Settings of `NAME_`; every default lives here (`rlhfkit plugins KIND_` shows them)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt setting is a recipe error
SETTINGS_

@rlhfkit.hookimpl
def rlhfkit_components() -> list[rlhfkit.ComponentSpec]:
    return [rlhfkit.ComponentSpec(
        kind="KIND_", name="NAME_", config=CONFIG_, factory=rlhfkit.lazy("PKG_.components:CLASS_"),
        doc="DOC_",EXTRA_
    )]
'''

_TEMPLATES = {
    "estimator": {
        "imports": "check_component, make_rollout",
        "doc": "advantage = the response's reward minus the batch mean, times scale, on every real token",
        "settings": '''    scale: float = Field(1.0, gt=0, description="multiplies every advantage")
''',
        "extra": "",
        "components": '''\
"""The `NAME_` estimator: A_t = scale * (R - mean_batch R) on every real token, where R is
the sum of a response's token rewards (its score, plus any per-token shaping)."""

from __future__ import annotations

import torch

from rlhfkit import Advantages, Rollout


class CLASS_:
    critic = None  # critic-free: no value model to train

    def __init__(self, config, context=None):
        self.config = config

    def estimate(self, rollout: Rollout) -> Advantages:
        real = rollout.response_mask != 0
        # padding may hold anything (NaN): select with torch.where, never multiply by the mask
        rewards = torch.where(real, rollout.rewards, torch.zeros((), dtype=rollout.rewards.dtype))
        returns = rewards.sum(dim=1)  # [B]
        centred = self.config.scale * (returns - returns.mean())
        advantages = torch.where(real, centred[:, None].expand_as(rewards), torch.zeros((), dtype=rewards.dtype))
        return Advantages(advantages, None, {"advantage/raw_mean": float(returns.mean()),
                                             "advantage/raw_std": float(returns.std()) if len(returns) > 1 else 0.0})
''',
        "test": '''\
def test_advantage_is_the_centred_return_on_real_tokens():
    rollout = make_rollout()
    estimator = check_component("estimator", "NAME_", {"scale": 2.0})
    out = estimator.estimate(rollout)
    real = rollout.response_mask.bool()
    returns = torch.where(real, rollout.rewards, torch.zeros(())).sum(1)
    expected = 2.0 * (returns - returns.mean())
    assert torch.allclose(out.advantages[real], expected[:, None].expand_as(out.advantages)[real])
    assert (out.advantages[~real] == 0).all()
''',
        "recipe": '''\
# PPO on the built-in reviews task with the NAME_ estimator (critic-free): the shipped
# ppo recipe, its estimator replaced.
extends: [builtin:ppo]
run: {name: NAME_-demo}
stages:
  ppo:
    estimator: {name: NAME_, scale: 1.0}
''',
    },
    "objective": {
        "imports": "check_component, make_preference_batch",
        "doc": "DPO with a target margin: -log sigmoid(beta * delta - margin)",
        "settings": '''    beta: float = Field(0.1, gt=0, description="strength of the implicit KL to the reference")
    margin: float = Field(0.0, ge=0, description="the target reward margin")
''',
        "extra": '\n        tags=frozenset({"preference-loss"}),  # the dpo algorithm\'s objective slot takes it',
        "components": '''\
"""The `NAME_` preference objective: -mean log sigmoid(beta * delta - margin), where
delta = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)) per pair."""

from __future__ import annotations

import torch.nn.functional as F

from rlhfkit import LossTerm, PreferenceBatch


class CLASS_:
    needs_reference = True  # the algorithm fills batch.ref_chosen and batch.ref_rejected

    def __init__(self, config, context=None):
        self.config = config

    def __call__(self, batch: PreferenceBatch) -> LossTerm:
        delta = (batch.chosen - batch.ref_chosen) - (batch.rejected - batch.ref_rejected)
        loss = -F.logsigmoid(self.config.beta * delta - self.config.margin).mean()
        # metrics are logged under train/...; dpo/loss is the console's headline for DPO
        return LossTerm(loss, {"dpo/loss": loss.detach()})
''',
        "test": '''\
def test_the_loss_matches_its_formula():
    batch = make_preference_batch()
    objective = check_component("objective", "NAME_", {"beta": 0.5, "margin": 0.2})
    delta = (batch.chosen - batch.ref_chosen) - (batch.rejected - batch.ref_rejected)
    expected = -torch.nn.functional.logsigmoid(0.5 * delta - 0.2).mean()
    assert torch.allclose(objective(batch).loss, expected)
''',
        "recipe": '''\
# DPO on the built-in reviews task with the NAME_ objective: the shipped dpo recipe, its
# objective replaced.
extends: [builtin:dpo]
run: {name: NAME_-demo}
stages:
  dpo:
    objective: {name: NAME_, beta: 0.1, margin: 0.5}
''',
    },
    "constraint": {
        "imports": "check_component, make_rollout",
        "doc": "a length penalty: each response's score minus coef times its length in tokens",
        "settings": '''    coef: float = Field(0.01, ge=0, description="penalty per response token")
''',
        "extra": '\n        provides=frozenset({"shape_rewards"}),  # what the algorithm calls: shape_rewards(rollout)',
        "components": '''\
"""The `NAME_` constraint: score -= coef * (response length in tokens), before the scores
are placed on each response's last token."""

from __future__ import annotations

from rlhfkit import Rollout


class CLASS_:
    def __init__(self, config, context=None):
        self.config = config

    def shape_rewards(self, rollout: Rollout) -> dict[str, float]:
        lengths = rollout.response_mask.sum(dim=1).to(rollout.scores.dtype)  # [B]
        penalty = self.config.coef * lengths
        rollout.scores = rollout.scores - penalty
        return {"length/penalty": float(penalty.mean())}
''',
        "test": '''\
def test_the_score_loses_coef_per_token():
    rollout = make_rollout()
    before = rollout.scores.clone()
    constraint = check_component("constraint", "NAME_", {"coef": 0.5})
    constraint.shape_rewards(rollout)
    assert torch.allclose(rollout.scores, before - 0.5 * rollout.response_mask.sum(1))
''',
        "recipe": '''\
# PPO on the built-in reviews task with the NAME_ constraint next to the KL penalty.
extends: [builtin:ppo]
run: {name: NAME_-demo}
stages:
  ppo:
    constraints: [{name: kl, coef: 0.05}, {name: NAME_, coef: 0.01}]
''',
    },
    "reward": {
        "imports": "check_component",
        "doc": "a rule reward: +1 for a response that ends with a full stop, minus coef per word",
        "settings": '''    coef: float = Field(0.05, ge=0, description="penalty per word")
''',
        "extra": "",
        "components": '''\
"""The `NAME_` reward: 1 if the response ends with '.', minus coef per word."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class CLASS_:
    def __init__(self, config, context=None):
        self.config = config

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        return torch.tensor([float(r.strip().endswith(".")) - self.config.coef * len(r.split())
                             for r in responses])
''',
        "test": '''\
def test_the_score_of_a_response():
    reward = check_component("reward", "NAME_", {"coef": 0.1})
    assert torch.allclose(reward.score(["p", "p"], ["good .", "no full stop"]), torch.tensor([0.8, -0.3]))
''',
        "recipe": '''\
# PPO on the built-in reviews task against the NAME_ rule reward instead of a reward model.
extends: [builtin:ppo]
run: {name: NAME_-demo}
stages:
  ppo:
    reward: {name: NAME_, coef: 0.05}
''',
    },
}

_TEST = '''\
"""Tests of `NAME_`, with rlhfkit.testing only: check_component runs the KIND_ contract
(settings, build, declared capabilities, shapes, finite values, padding ignored,
gradients), and a hand-computed check of its formula on the kit's toy batches."""

import torch

from rlhfkit.testing import IMPORTS_


def test_it_keeps_the_KIND__contract():
    check_component("KIND_", "NAME_")


TEST_'''

_README = '''\
# DIST_

The rlhfkit KIND_ `NAME_`: DOC_.

```bash
pip install -e '.[test]'
pytest                              # rlhfkit.testing's contract run, and the formula
rlhfkit plugins KIND_               # lists NAME_ with its settings
rlhfkit validate recipe.yaml        # the shipped recipe with NAME_ in it
rlhfkit run recipe.yaml
```

Replace the formula in `PKG_/components.py` with your own, and its settings in
`PKG_/__init__.py`; docs/writing-a-plugin.md in rlhfkit says what the algorithms call.
'''


def new_plugin(kind: str, name: str, directory: Path | None = None, force: bool = False) -> Path:
    """Write the distribution for ``kind``/``name``; returns its folder."""
    if kind not in KINDS:
        raise UserError(f"rlhfkit new makes one of: {', '.join(KINDS)}; got {kind!r}")
    if not re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", name):
        raise UserError(f"component name {name!r}: use lowercase letters, digits and single dashes, starting "
                        f"with a letter (e.g. my-adv)")
    dist, package = f"rlhfkit-{name}", "rlhfkit_" + name.replace("-", "_")
    cls = "".join(part.capitalize() for part in name.split("-"))
    root = (directory or Path(dist)).expanduser()
    if root.exists() and any(root.iterdir()) and not force:
        raise UserError(f"{root} exists and is not empty; choose another folder (--dir) or pass --force")
    template = _TEMPLATES[kind]

    def fill(text: str) -> str:
        for key, value in (("SETTINGS_", template["settings"]), ("EXTRA_", template["extra"]),
                           ("TEST_", template["test"]), ("IMPORTS_", template["imports"]),
                           ("DOC_", template["doc"]), ("DIST_", dist),
                           ("PKG_", package), ("CONFIG_", f"{cls}Config"), ("CLASS_", cls), ("KIND_", kind),
                           ("NAME_", name)):
            text = text.replace(key, value)
        return text

    files = {"pyproject.toml": _PYPROJECT, f"{package}/__init__.py": _INIT, f"{package}/components.py":
             template["components"], f"tests/test_{package}.py": _TEST, "recipe.yaml": template["recipe"],
             "README.md": _README}
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(fill(text))
    return root
