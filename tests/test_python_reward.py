"""The ``python`` reward: a function in a file the recipe names, called as TRL calls
reward functions; its mistakes are errors naming the file and line or the row."""

from __future__ import annotations

import pytest
import torch
from helpers import RECIPES, cli

from rlhfkit import StageContext, UserError, load_plugins, ref

REWARDS = '''\
import math


def score(prompts, completions, **kwargs):
    return [float(len(c.split())) for c in completions]


def trl_style(completions, **kwargs):  # TRL's reward functions take what they need as keywords
    return [1.0 if "good" in c else 0.0 for c in completions]


def broken(prompts, completions, **kwargs):
    values = []
    for c in completions:
        values.append(1 / 0)
    return values


def short(prompts, completions, **kwargs):
    return [0.0]


def nan(prompts, completions, **kwargs):
    return [math.nan if c == "bad" else 1.0 for c in completions]
'''


@pytest.fixture
def context(tmp_path):
    (tmp_path / "rewards.py").write_text(REWARDS)
    return StageContext(load_plugins().registry, recipe_dir=tmp_path)


def build(context, function, **settings):
    return context.build(ref("reward")(name="python", function=function, **settings))


def test_scores_in_batches_like_trl(context, capsys):
    reward = build(context, "rewards.py:score", batch_size=2)
    printed = capsys.readouterr().out
    assert "reward 'python': score from" in printed and "the recipe's own code" in printed
    scores = reward.score(["p"] * 5, ["a", "a b", "a b c", "", "x y"])
    assert scores.dtype == torch.float32 and scores.tolist() == [1.0, 2.0, 3.0, 0.0, 2.0]
    assert build(context, "rewards.py:trl_style").score(["p", "q"], ["good", "bad"]).tolist() == [1.0, 0.0]


@pytest.mark.parametrize(("function", "message"), [
    ("rewards.py:broken", "raised at line 15: ZeroDivisionError"),
    ("rewards.py:short", "returned 1 scores for 2 completions"),
    ("rewards.py:nan", "returned nan for row 1 (prompt 'q')"),
])
def test_mistakes_in_the_function_name_the_line_or_the_row(context, function, message):
    reward = build(context, function)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        reward.score(["p", "q"], ["good", "bad"])


def test_a_missing_file_function_or_broken_import_is_an_error(context, tmp_path):
    with pytest.raises(UserError, match="no file"):
        build(context, "missing.py:score")
    with pytest.raises(UserError, match="has no function 'nope'; it defines: broken, nan, score, short, trl_style"):
        build(context, "rewards.py:nope")
    (tmp_path / "bad.py").write_text("x = 1\nraise RuntimeError('at import')\n")
    with pytest.raises(UserError, match="importing .*bad.py failed at line 2: RuntimeError: at import"):
        build(context, "bad.py:score")


def test_a_recipe_with_a_python_reward_validates_without_running_it(tmp_path):
    (tmp_path / "rewards.py").write_text("import sys\nsys.exit(3)\n\ndef score(prompts, completions):\n    return []\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"extends: {RECIPES}/ppo.yaml\nstages:\n  ppo:\n    reward: {{name: python, function: rewards.py:score}}\n")
    result = cli("validate", str(recipe), cwd=tmp_path)
    assert result.returncode == 0, result.stderr  # the file's sys.exit did not run
    result = cli("validate", str(recipe), "stages.ppo.reward.function=rewards.py:other", cwd=tmp_path)
    assert result.returncode == 2 and "defines no 'other' at top level" in result.stderr
    (tmp_path / "rewards.py").write_text("def score(:\n")
    result = cli("validate", str(recipe), cwd=tmp_path)
    assert result.returncode == 2 and "rewards.py line 1" in result.stderr


def test_ppo_trains_on_a_python_reward_in_a_composite(tmp_path, exports):
    from test_ppo import KL_ONLY, write_recipe

    (tmp_path / "rewards.py").write_text(REWARDS)
    recipe = write_recipe(tmp_path, exports, KL_ONLY)
    composite = ("stages.ppo.reward={name: composite, terms: [{reward: {name: python, function: rewards.py:score}, "
                 "weight: 0.1}, {reward: {name: gold, task: reviews}}]}")
    result = cli("run", recipe, composite, "stages.ppo.trainer.max_steps=4", f"run.dir={tmp_path / 'run'}",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"reward 'python': score from {tmp_path / 'rewards.py'}" in " ".join(result.stdout.split())
