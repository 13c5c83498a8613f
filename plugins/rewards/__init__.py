"""Reward sources that combine other reward sources, and rewards written in Python.

Contributes the reward ``python`` (a function in a file the recipe names, called as TRL
calls reward functions) and the reward ``composite``: a weighted sum of any registered
rewards (learned reward models, rule rewards such as ``gold``, Python ones, other
composites)::

    reward:
      name: composite
      terms:
        - {reward: {name: gold, task: knowledge}, weight: 1.0}
        - {reward: {name: reward-model, stage: rm}, weight: 0.5}

This module holds only the settings and the registration; the implementation lives in
``composite.py`` and is imported when a reward is built, so listing plugins stays fast.
See docs/rewards.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from rlhfkit import ComponentRef, ComponentSpec, Problem, StageContext, UserError, hookimpl, ref
from rlhfkit.files import decode_utf8
from rlhfkit.registry import walk

__all__ = ["CompositeConfig", "CompositeTerm", "PythonRewardConfig", "rlhfkit_components"]

RewardRef = ref("reward")


class CompositeTerm(BaseModel):
    """One weighted reward of a composite."""

    model_config = ConfigDict(extra="forbid")

    reward: RewardRef = Field(  # type: ignore[valid-type]
        description="the reward source: a name (`gold`) or a mapping with its settings "
                    "(`{name: gold, task: knowledge}`); composites nest")
    weight: float = Field(1.0, description="multiplies this term's score in the sum "
                                           "(negative: a penalty; 0: logged only)")


class CompositeConfig(BaseModel):
    """A weighted sum of reward sources."""

    model_config = ConfigDict(extra="forbid")

    terms: list[CompositeTerm] = Field(
        min_length=1, description="the rewards to add up, each with its weight; the score "
                                  "is sum(weight * score) and each term is logged unweighted")


def make_composite(config: CompositeConfig, context: StageContext | None) -> Any:
    if context is None:
        raise UserError("reward 'composite' builds its terms through a StageContext; build it "
                        "with one (`registry.build(reference, StageContext(...))`).")
    from rlhfkit.plugins.rewards.composite import CompositeReward  # torch loads only here

    return CompositeReward([(f"{i}:{term.reward.name}", term.weight, context.build(term.reward))
                            for i, term in enumerate(config.terms)])


class PythonRewardConfig(BaseModel):
    """A reward function in a Python file, TRL's shape: ``f(prompts=..., completions=...)``."""

    model_config = ConfigDict(extra="forbid")

    function: str = Field(
        pattern=r"^.+\.py:[A-Za-z_][A-Za-z0-9_]*$",
        description="FILE.py:NAME, FILE relative to the recipe file (or absolute); called as "
                    "NAME(prompts=[...], completions=[...]) -> one float per completion. The file is "
                    "your own code and runs as it is")
    batch_size: int = Field(256, ge=1, description="completions per call")
    weight: float = Field(1.0, allow_inf_nan=False,
                          description="multiplies every score (to mix with other rewards, use composite)")


def resolve(function: str, recipe_dir: Path) -> tuple[Path, str]:
    """``FILE.py:NAME`` as ``(absolute file, name)``; ``FILE`` relative to ``recipe_dir``."""
    file, _, name = function.rpartition(":")
    path = Path(file).expanduser()
    return (path if path.is_absolute() else recipe_dir / path).resolve(), name


def make_python(config: PythonRewardConfig, context: StageContext | None) -> Any:
    from rlhfkit.plugins.rewards.python import PythonReward, load_function

    path, name = resolve(config.function, context.recipe_dir if context is not None else Path.cwd())
    function = load_function(path, name)
    print(f"reward 'python': {name} from {path} (the recipe's own code, run as it is)", flush=True)
    return PythonReward(function, path, name, config.batch_size, config.weight)


@hookimpl
def rlhfkit_components() -> list[ComponentSpec]:
    return [
        ComponentSpec(kind="reward", name="composite", config=CompositeConfig, factory=make_composite,
                      doc="weighted sum of reward sources (any kind, nested composites too)",
                      provides=frozenset({"to", "score_terms"})),
        ComponentSpec(kind="reward", name="python", config=PythonRewardConfig, factory=make_python,
                      doc="a reward function in a Python file the recipe names (TRL's reward-function shape)"),
    ]


@hookimpl
def rlhfkit_check_recipe(recipe, registry) -> list[Problem]:
    """A ``python`` reward's file exists, parses and defines its function at top level,
    checked without running it (``rlhfkit validate`` executes no user code)."""
    problems = []
    for stage in recipe.stages:
        for slot, value in stage.slots.items():
            for where, node in walk(value, f"stages.{stage.name}.{slot}"):
                if isinstance(node, ComponentRef) and node.kind == "reward" and node.name == "python" \
                        and node._config is not None:
                    path, name = resolve(node.config.function, Path(recipe.path).resolve().parent)
                    why = _function_problem(path, name)
                    if why:
                        problems.append(Problem(str(recipe.path), f"{where}.function", why,
                                                "FILE.py:NAME, FILE relative to the recipe file"))
    return problems


def _function_problem(path: Path, name: str) -> str:
    import ast

    if not path.is_file():
        return f"no file {path}"
    try:
        tree = ast.parse(decode_utf8(path.read_bytes(), str(path)), filename=str(path))
    except SyntaxError as exc:
        return f"{path} line {exc.lineno}: {exc.msg}"
    except UserError as exc:
        return str(exc)
    defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)} | \
              {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    if name not in defined:
        return f"{path} defines no {name!r} at top level (it defines: {', '.join(sorted(defined)) or 'nothing'})"
    return ""
