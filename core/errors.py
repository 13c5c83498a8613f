"""User-facing errors.

A :class:`UserError` is a mistake the user can fix (a recipe, a data file, a missing
checkpoint). The CLI prints its message as one paragraph and exits non-zero without a
traceback. Anything else is a bug in rlhfkit or a plugin and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


class UserError(Exception):
    """A problem the user can fix; the message says what, where and how to fix it."""


@dataclass(frozen=True)
class Problem:
    """One problem found in a recipe: where it is, what is wrong, how to fix it."""

    file: str
    path: str
    message: str
    hint: str = ""

    def __str__(self) -> str:
        where = f"{self.file}: {self.path}" if self.path else self.file
        text = f"{where}: {self.message}"
        return f"{text} (fix: {self.hint})" if self.hint else text


class RecipeError(UserError):
    """All problems found in a recipe, reported together."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        count = len(self.problems)
        lines = [f"the recipe has {count} problem{'s' if count != 1 else ''}:"]
        lines += [f"  {i}. {p}" for i, p in enumerate(self.problems, 1)]
        super().__init__("\n".join(lines))


class DataError(UserError):
    """A malformed data row or file; names the file and the row."""


class PluginError(UserError):
    """A plugin failed to load or contributed something invalid; names plugin and distribution."""


class NonFiniteError(UserError):
    """A NaN or Inf where training cannot go on: ``what`` became non-finite at ``step``
    (``None``: the step under way), ``detail`` says more. The runner adds the stage and
    which checkpoint is intact to the message."""

    def __init__(self, what: str, step: int | None = None, detail: str = ""):
        self.what, self.step, self.detail = what, step, detail
        at = f" at step {step}" if step is not None else ""
        super().__init__(f"{what} became NaN/Inf{at}" + (f" ({detail})" if detail else ""))


class EngineError(UserError):
    """A generation engine failed to start, died or answered with an error; says which
    engine, why (the end of its log) and where its full log is."""
