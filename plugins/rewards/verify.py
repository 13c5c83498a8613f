"""Answer checking for verifier rewards, as plain functions (no torch).

- :func:`extract`: a completion's final answer, by the first rule that finds one
  (``boxed``: the last ``\\boxed{...}``; ``answer-line``: the last "answer: ..." / "the
  answer is ..."; ``hash``: GSM8K's "#### 42"; ``last-number``; ``whole``; or
  ``regex:PATTERN``, its first group or whole match).
- :func:`numeric`: a number from an answer (``1,000``, ``-3.5``, ``3/4``, ``\\frac{3}{4}``,
  ``1e-3``, ``$5``, ``5 cm``, ``12%``), or None.
- :func:`same`: whether two answers agree under a ``match`` rule: ``numeric`` (relative
  tolerance), ``exact`` (normalised text), ``regex`` (the gold answer is a pattern the
  answer must match whole), ``symbolic`` (sympy: the difference simplifies to 0, or
  evaluates to within the tolerance), ``math-verify`` (the optional package's ``verify``).

``symbolic`` and ``math-verify`` can take unbounded time on hostile input (``9^9^9^9``);
:class:`rlhfkit.plugins.rewards.verifier.VerifierReward` runs them in a worker process with
a timeout. Everything here is deterministic.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from fractions import Fraction

MAX_CHARS = 400  # answers longer than this are not parsed (a final answer is short)

_NUMBER = r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][-+]?\d+)?|-?\.\d+"
_ANSWER_LINE = re.compile(r"(?i)(?:final\s+answer|answer)\s*(?:is|:|=|：)\s*(.+)")
_HASH = re.compile(r"####\s*(.+)")


def boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        start = text.rfind("\\boxed ")
        if start < 0:
            return None
        return text[start + len("\\boxed "):].split("$")[0].strip() or None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None  # unbalanced: no answer


def _clean(answer: str) -> str:
    answer = answer.strip()
    if answer.startswith("$") and answer.endswith("$") and len(answer) > 1:
        answer = answer.strip("$").strip()
    answer = re.sub(r"^\\\(|\\\)$|^\\\[|\\\]$", "", answer).strip()
    return answer.rstrip(".").strip()


def extract(text: str, rules: Sequence[str]) -> str | None:
    """The answer of ``text`` by the first of ``rules`` that finds one, cleaned
    (surrounding ``$``, a trailing period); None when none does."""
    for rule in rules:
        found: str | None = None
        if rule == "boxed":
            found = boxed(text)
        elif rule == "answer-line":
            matches = _ANSWER_LINE.findall(text)
            found = matches[-1].strip() if matches else None
            if found is not None:
                found = boxed(found) or found
        elif rule == "hash":
            matches = _HASH.findall(text)
            found = matches[-1] if matches else None
        elif rule == "last-number":
            matches = re.findall(_NUMBER, text)
            found = matches[-1] if matches else None
        elif rule == "whole":
            found = text
        elif rule.startswith("regex:"):
            match = None
            for match in re.finditer(rule[len("regex:"):], text):
                pass
            if match is not None:
                found = match.group(1) if match.groups() else match.group(0)
        else:
            raise ValueError(f"unknown extraction rule {rule!r}")
        if found is not None and found.strip():
            return _clean(found)
    return None


_FRAC = re.compile(r"^(-?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$")
_UNIT = re.compile(r"^(.*?\d)\s*(?:\\%|%|\\text\{[^{}]*\}|\\mathrm\{[^{}]*\}|[A-Za-z°][A-Za-z°.²³/ ]*)$")


def numeric(answer: str) -> tuple[float, bool] | None:
    """``(value, percent)`` of a numeric answer, ``percent`` when it ended in ``%``; None
    when it is not a number. Thousands separators, a leading currency sign and a
    trailing unit are dropped."""
    text = answer.strip().replace("\\!", "").replace("\\,", "").replace("{,}", ",")
    if len(text) > MAX_CHARS:
        return None
    text = re.sub(r"^(?:\\\$|\$|€|£)\s*", "", text)
    text = re.sub(r"^(-?)\s*(?:\\\$|\$)", r"\1", text)
    percent = text.endswith("%")
    unit = _UNIT.match(text)
    if unit:
        text = unit.group(1)
    text = text.strip()
    frac = _FRAC.match(text)
    try:
        if frac:
            value = float(Fraction(_plain(frac.group(2))) / Fraction(_plain(frac.group(3))))
            return (-value if frac.group(1) else value), percent
        if re.fullmatch(r"-?\d+\s*/\s*\d+", text):
            numerator, denominator = text.replace(" ", "").split("/")
            return float(Fraction(int(numerator), int(denominator))), percent
        if re.fullmatch(_NUMBER, text):
            if "," in text and not re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", text):
                return None
            value = float(text.replace(",", ""))
            return (value, percent) if math.isfinite(value) else None
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return None


def _plain(text: str) -> str:
    text = text.strip()
    if not re.fullmatch(r"-?\d+(?:\.\d+)?", text):
        raise ValueError(text)
    return text


def normalise(answer: str) -> str:
    """Text for ``exact``: casefolded, whitespace collapsed, ``\\text{}`` unwrapped, a
    trailing period and surrounding quotes dropped."""
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", answer)
    text = " ".join(text.casefold().split())
    return text.strip(" .\"'`")


def numbers_agree(a: float, b: float, tolerance: float) -> bool:
    return math.isclose(a, b, rel_tol=tolerance, abs_tol=tolerance * 1e-3)


def same_numeric(answer: str, gold: str, tolerance: float) -> bool:
    parsed, expected = numeric(answer), numeric(gold)
    if parsed is None or expected is None:
        return False
    (value, percent), (target, gold_percent) = parsed, expected
    if numbers_agree(value, target, tolerance):
        return True
    # "12%" against 0.12 (or the other way round): the percent sign may be the unit or a factor
    if percent and not gold_percent:
        return numbers_agree(value / 100, target, tolerance)
    if gold_percent and not percent:
        return numbers_agree(value, target / 100, tolerance)
    return False


def same(answer: str | None, gold: str, match: str, tolerance: float = 1e-6) -> bool:
    """Whether ``answer`` agrees with ``gold`` under ``match`` (a missing answer never does)."""
    if answer is None or len(answer) > MAX_CHARS:
        return False
    if match == "numeric":
        return same_numeric(answer, gold, tolerance)
    if match == "exact":
        return normalise(answer) == normalise(gold)
    if match == "regex":
        return re.fullmatch(gold, answer.strip()) is not None
    if match == "symbolic":
        return same_numeric(answer, gold, tolerance) or same_symbolic(answer, gold, tolerance)
    if match == "math-verify":
        from math_verify import parse, verify  # the optional extra: pip install "rlhfkit[math]"

        return bool(verify(parse(f"${gold}$", parsing_timeout=None),
                           parse(f"${answer}$", parsing_timeout=None), timeout_seconds=None))
    raise ValueError(f"unknown match {match!r}")


# ------------------------------------------------------------------ symbolic, with sympy
_LATEX = [
    (r"\\left|\\right|\\displaystyle|\\!|\\,|\\;|\\ ", ""),
    (r"\\[dt]?frac\{", r"\\frac{"),
    (r"\\cdot|\\times", "*"),
    (r"\\div", "/"),
    (r"\\pi", "pi"),
    (r"\\infty", "oo"),
    (r"\\ln", "log"),
    (r"\\(sin|cos|tan|log|exp)", r"\1"),
]


def latex_to_sympy(text: str) -> str:
    """Common LaTeX of final answers as sympy syntax (``\\frac``, ``\\sqrt``, ``^``,
    ``\\cdot``, ``\\pi``, braces); what it does not know stays and fails to parse."""
    for pattern, repl in _LATEX:
        text = re.sub(pattern, repl, text)
    for _ in range(10):  # innermost first, so nested fractions and roots unfold
        new = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", text)
        new = re.sub(r"\\sqrt\[([^\]]*)\]\{([^{}]*)\}", r"((\2)**(1/(\1)))", new)
        new = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", new)
        new = re.sub(r"\\sqrt(\d+)", r"sqrt(\1)", new)
        if new == text:
            break
        text = new
    text = text.replace("^", "**").replace("{", "(").replace("}", ")")
    if "=" in text:  # "x = 3": the right-hand side
        text = text.rsplit("=", 1)[1]
    return text.strip()


def sympy_expression(text: str):
    from sympy.parsing.sympy_parser import (
        convert_xor,
        implicit_multiplication_application,
        parse_expr,
        standard_transformations,
    )

    transformations = (*standard_transformations, implicit_multiplication_application, convert_xor)
    return parse_expr(latex_to_sympy(text), transformations=transformations, evaluate=True)


def same_symbolic(answer: str, gold: str, tolerance: float) -> bool:
    """sympy: ``answer − gold`` simplifies to 0, or evaluates to a number within
    ``tolerance``; anything that does not parse is not the same. Unbounded in time on
    hostile input: run under a timeout."""
    import sympy

    try:
        a, b = sympy_expression(answer), sympy_expression(gold)
        difference = sympy.simplify(a - b)
        if difference == 0:
            return True
        if difference.free_symbols:
            return False
        value = complex(difference.evalf())
        scale = max(1.0, abs(complex(b.evalf())))
        return abs(value) <= tolerance * scale
    except Exception:  # noqa: BLE001 - sympy raises many kinds on malformed input; it is a wrong answer
        return False


# ------------------------------------------------------------------ the worker process
def serve() -> None:
    """Answer ``{"answer", "gold", "match", "tolerance"}`` JSON lines on stdin with
    ``{"same": bool}`` lines on stdout. Run as a script (``python verify.py``), so the
    worker imports sympy and nothing of rlhfkit or torch."""
    import json
    import sys

    for line in sys.stdin:
        request = json.loads(line)
        try:
            verdict = same(request["answer"], request["gold"], request["match"], request["tolerance"])
            reply = {"same": bool(verdict)}
        except Exception as exc:  # noqa: BLE001 - reported to the trainer, which scores the answer wrong
            reply = {"same": False, "error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve()
