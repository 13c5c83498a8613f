"""Reward sources that combine other reward sources, rewards written in Python, and
rule rewards for answers that can be checked.

Contributes the rewards ``verifier`` (a completion's final answer against the row's
answer column) and ``format`` (a regular expression), the reward ``python`` (a function
in a file the recipe names, called as TRL calls reward functions) and the reward
``composite``: a weighted sum of any registered
rewards (learned reward models, rule rewards such as ``gold``, Python ones, other
composites)::

    reward:
      name: composite
      terms:
        - {reward: {name: gold, task: knowledge}, weight: 1.0}
        - {reward: {name: reward-model, stage: rm}, weight: 0.5}

This module holds only the settings and the registration; the implementation lives in
``composite.py``, ``python.py`` and ``verifier.py`` and is imported when a reward is built, so listing plugins stays fast.
See docs/rewards.md.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rlhfkit import ComponentRef, ComponentSpec, Problem, StageContext, UserError, hookimpl, ref
from rlhfkit.files import decode_utf8
from rlhfkit.registry import walk

__all__ = ["CompositeConfig", "CompositeTerm", "FormatConfig", "PythonRewardConfig", "VerifierConfig",
           "rlhfkit_components"]

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


EXTRACTION_RULES = ("boxed", "answer-line", "hash", "last-number", "whole")


def _rules(rules: list[str]) -> list[str]:
    for rule in rules:
        if rule.startswith("regex:"):
            try:
                re.compile(rule[len("regex:"):])
            except re.error as exc:
                raise ValueError(f"{rule!r} is not a valid regular expression: {exc}") from None
        elif rule not in EXTRACTION_RULES:
            raise ValueError(f"unknown extraction rule {rule!r}; use {', '.join(EXTRACTION_RULES)} or regex:PATTERN")
    return rules


class VerifierConfig(BaseModel):
    """Checks each completion's final answer against the row's answer column."""

    model_config = ConfigDict(extra="forbid")

    answer_field: str = Field("answer", description="the prompt rows' column holding the reference answer")
    extract: list[str] = Field(["boxed", "answer-line", "last-number"], min_length=1, description=(
        "how a completion's final answer is found, the first rule that finds one wins: boxed (the last "
        "\\boxed{...}), answer-line ('answer: ...', 'the answer is ...'), hash (GSM8K's '#### 42'), "
        "last-number, whole, regex:PATTERN (its first group)"))
    gold_extract: list[str] = Field(["hash", "boxed", "whole"], min_length=1, description=(
        "how the answer column is read, same rules (a GSM8K solution ending in '#### 42' gives 42)"))
    match: Literal["symbolic", "numeric", "exact", "regex", "math-verify"] = Field("symbolic", description=(
        "numeric: numbers within `tolerance` (1,000 = 1000, 3/4 = 0.75, units and $ dropped, 12% = 12 or "
        "0.12); symbolic: numeric, else sympy finds the difference 0 ((x+1)^2 = x^2+2x+1, 2\\sqrt{2} = "
        "\\sqrt{8}); exact: normalised text; regex: the answer column is a pattern the answer matches whole; "
        "math-verify: the math-verify package (pip install 'rlhfkit[math]')"))
    tolerance: float = Field(1e-6, gt=0, description="relative tolerance of numeric comparisons")
    correct: float = Field(1.0, allow_inf_nan=False, description="score of a correct answer")
    wrong: float = Field(0.0, allow_inf_nan=False, description="score of a wrong answer")
    no_answer: float = Field(0.0, allow_inf_nan=False, description="score when no answer is found")
    timeout_s: float = Field(2.0, gt=0, description=(
        "symbolic and math-verify checks run in a worker process; one that takes longer is scored wrong"))

    @field_validator("extract", "gold_extract")
    @classmethod
    def _known_rules(cls, rules: list[str]) -> list[str]:
        return _rules(rules)

    @field_validator("match")
    @classmethod
    def _installed(cls, match: str) -> str:
        if match == "math-verify":
            import importlib.util

            if importlib.util.find_spec("math_verify") is None:
                raise ValueError("match: math-verify needs the math-verify package: pip install 'rlhfkit[math]' "
                                 "(or use match: symbolic, which needs nothing more)")
        return match


class FormatConfig(BaseModel):
    """A format check: does the completion have the shape asked for."""

    model_config = ConfigDict(extra="forbid")

    pattern: str = Field(r"\\boxed\{.+\}", description=(
        "regular expression (Python, DOTALL) the completion must contain; default: a \\boxed{} answer"))
    whole: bool = Field(False, description="the whole completion (stripped) must match, not just contain it")
    reward: float = Field(1.0, allow_inf_nan=False, description="score when it matches")
    penalty: float = Field(0.0, allow_inf_nan=False, description="score when it does not")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return pattern


def make_verifier(config: VerifierConfig, context: StageContext | None) -> Any:
    from rlhfkit.plugins.rewards.verifier import VerifierReward

    return VerifierReward(config)


def make_format(config: FormatConfig, context: StageContext | None) -> Any:
    from rlhfkit.plugins.rewards.verifier import FormatReward

    return FormatReward(config)


@hookimpl
def rlhfkit_components() -> list[ComponentSpec]:
    return [
        ComponentSpec(kind="reward", name="composite", config=CompositeConfig, factory=make_composite,
                      doc="weighted sum of reward sources (any kind, nested composites too)",
                      provides=frozenset({"to", "score_terms"})),
        ComponentSpec(kind="reward", name="python", config=PythonRewardConfig, factory=make_python,
                      doc="a reward function in a Python file the recipe names (TRL's reward-function shape)"),
        ComponentSpec(kind="reward", name="verifier", config=VerifierConfig, factory=make_verifier,
                      doc="the completion's final answer checked against the row's answer (numeric, symbolic, "
                          "exact, regex, math-verify)"),
        ComponentSpec(kind="reward", name="format", config=FormatConfig, factory=make_format,
                      doc="whether the completion matches a regular expression (e.g. has a \\boxed{} answer)"),
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
