"""The ``python`` reward: a function in a Python file the recipe names, called the way
TRL calls its reward functions, so an existing one drops in: keyword arguments
``prompts`` and ``completions`` (for a conversational prompt, a list of messages, and
its completion as ``[{"role": "assistant", "content": ...}]``), and every other column
of the prompt rows as a keyword holding one value per completion (``answer=[...]``), as
far as the function's signature takes them; a list of floats back.

The file is the user's own code: it runs as it is, with the user's permissions, exactly
as a script they run themselves would. rlhfkit loads it only because the recipe names it
explicitly, and says which file it loaded.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from rlhfkit import UserError


def _where(exc: BaseException, path: Path) -> str:
    """``line N`` of the deepest frame of the traceback that is in ``path``."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve() == path]
    if isinstance(exc, SyntaxError) and exc.lineno is not None:
        return f"line {exc.lineno}"
    return f"line {frames[-1].lineno}" if frames else "(outside the file)"


def load_function(path: Path, name: str) -> Callable[..., Any]:
    """Import ``path`` as a module of its own and return its ``name``; every failure is a
    :class:`UserError` naming the file and the line."""
    if not path.is_file():
        raise UserError(f"reward 'python': no file {path}; `function:` is FILE.py:NAME with FILE relative to the "
                        f"recipe file (or absolute).")
    module_name = f"rlhfkit_user_reward_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"reward 'python': {path} cannot be imported as a Python file.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's code may raise anything; it is reported, not hidden
        del sys.modules[module_name]
        raise UserError(f"reward 'python': importing {path} failed at {_where(exc, path)}: "
                        f"{type(exc).__name__}: {exc}") from None
    function = getattr(module, name, None)
    if not callable(function):
        defined = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                         and getattr(v, "__module__", None) == module_name)
        raise UserError(f"reward 'python': {path} has no function {name!r}; it defines: "
                        f"{', '.join(defined) or 'none'}.")
    return function


def _accepted(function: Callable[..., Any]) -> tuple[set[str], bool]:
    """The keyword names ``function`` takes, and whether it takes ``**kwargs``."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return set(), True
    return ({p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)},
            any(p.kind is p.VAR_KEYWORD for p in parameters))


def trl_completion(prompt: Any, response: str) -> Any:
    """A completion as TRL passes it: text, or one assistant message after a conversation."""
    return response if isinstance(prompt, str) else [{"role": "assistant", "content": response}]


class PythonReward:
    """Scores with ``function(prompts=[...], completions=[...], **columns)`` in batches of
    ``batch_size``; each call returns one float per completion."""

    def __init__(self, function: Callable[..., Any], path: Path, name: str, batch_size: int, weight: float = 1.0):
        self.function, self.path, self.name, self.batch_size, self.weight = function, path, name, batch_size, weight
        self._names, self._any = _accepted(function)

    def score(self, prompts: Sequence[Any], responses: Sequence[str],
              fields: Sequence[dict[str, Any]] | None = None) -> torch.Tensor:
        """``[B]`` scores; ``fields`` (one dict per completion) become keyword columns."""
        scores: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            batch_prompts = [p if isinstance(p, str) else [dict(m) for m in p]
                             for p in prompts[start:start + self.batch_size]]
            batch = [trl_completion(p, r) for p, r in zip(batch_prompts, responses[start:start + self.batch_size],
                                                           strict=True)]
            columns = self._columns(fields[start:start + self.batch_size] if fields is not None else [])
            try:
                values = self.function(prompts=batch_prompts, completions=batch, **columns)
            except Exception as exc:  # noqa: BLE001 - reported with the user's file and line
                where = _where(exc, self.path)
                called = ("; it was called with the keywords " + ", ".join(["prompts", "completions", *columns])
                          + (" (the prompt rows' other columns; add **kwargs to take more)" if not self._any else "")
                          if where == "(outside the file)" else "")
                raise UserError(f"reward 'python': {self.name} in {self.path} raised at {where}: "
                                f"{type(exc).__name__}: {exc} (on rows {start}-{start + len(batch) - 1} of the "
                                f"batch; first prompt {batch_prompts[0]!r}){called}") from None
            scores += self._checked(values, batch_prompts, start)
        return self.weight * torch.tensor(scores, dtype=torch.float32)

    def _columns(self, rows: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
        """``{column: [value per row]}`` of the columns the function takes (all with
        ``**kwargs``); a row without the column gives ``None``."""
        names = [n for n in dict.fromkeys(k for row in rows for k in row)
                 if n not in ("prompts", "completions") and (self._any or n in self._names)]
        return {n: [row.get(n) for row in rows] for n in names}

    def _checked(self, values: Any, prompts: list[Any], start: int) -> list[float]:
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().reshape(-1).tolist()
        try:
            values = list(values)
        except TypeError:
            raise UserError(f"reward 'python': {self.name} in {self.path} returned a {type(values).__name__}; it "
                            f"must return a list of {len(prompts)} floats, one per completion.") from None
        if len(values) != len(prompts):
            raise UserError(f"reward 'python': {self.name} in {self.path} returned {len(values)} scores for "
                            f"{len(prompts)} completions (rows {start}-{start + len(prompts) - 1}); return one "
                            f"float per completion.")
        out = []
        for i, value in enumerate(values):
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = math.nan
            if not math.isfinite(number):
                raise UserError(f"reward 'python': {self.name} in {self.path} returned {value!r} for row "
                                f"{start + i} (prompt {prompts[i]!r}); every score must be a finite number.")
            out.append(number)
        return out
