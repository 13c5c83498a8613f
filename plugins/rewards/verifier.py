"""The ``verifier`` and ``format`` rewards: rule rewards for tasks with a known answer.

``verifier`` extracts each completion's final answer, compares it with the row's answer
column (:mod:`rlhfkit.plugins.rewards.verify`) and scores ``correct`` / ``wrong`` /
``no_answer``. The ``symbolic`` and ``math-verify`` comparisons run in a worker process
with a timeout per answer: an answer that does not finish in time (``9^9^9^9``) scores
``wrong``, the worker is replaced, and the rest of the batch goes on.
"""

from __future__ import annotations

import json
import re
import select
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import torch

from rlhfkit import UserError
from rlhfkit.plugins.rewards import verify
from rlhfkit.plugins.rewards.verify import extract, numeric, same, same_numeric

SLOW = ("symbolic", "math-verify")
STARTUP_S = 120.0  # the worker's imports (sympy; math-verify's parser)


class VerifierReward:
    """Scores completions against the rows' answers; see :class:`VerifierConfig`."""

    def __init__(self, config: Any):
        self.config = config
        self.timeouts = 0
        self._process: subprocess.Popen | None = None

    def score(self, prompts: Sequence[Any], responses: Sequence[str],
              fields: Sequence[dict[str, Any]] | None = None) -> torch.Tensor:
        c = self.config
        golds = [self._gold(i, prompts, fields) for i in range(len(responses))]
        answers = [extract(text, c.extract) for text in responses]
        verdicts = self._verdicts(answers, golds)
        scores = [c.no_answer if answer is None else c.correct if ok else c.wrong
                  for answer, ok in zip(answers, verdicts, strict=True)]
        return torch.tensor(scores, dtype=torch.float32)

    def _gold(self, i: int, prompts: Sequence[Any], fields: Sequence[dict[str, Any]] | None) -> str:
        column = self.config.answer_field
        row = fields[i] if fields is not None and i < len(fields) else {}
        if row.get(column) is None:
            have = ", ".join(sorted(row)) or "none"
            raise UserError(f"reward 'verifier': the row of prompt {prompts[i]!r} has no {column!r} column (its "
                            f"columns: {have}); set reward.answer_field to the column holding the answer.")
        gold = extract(str(row[column]), self.config.gold_extract)
        if gold is None:
            raise UserError(f"reward 'verifier': no answer found in column {column!r} of the row of prompt "
                            f"{prompts[i]!r} ({str(row[column])[:80]!r}) with reward.gold_extract "
                            f"{self.config.gold_extract}.")
        return gold

    def _verdicts(self, answers: list[str | None], golds: list[str]) -> list[bool]:
        c = self.config
        if c.match not in SLOW:
            return [same(a, g, c.match, c.tolerance) for a, g in zip(answers, golds, strict=True)]
        verdicts: list[bool | None] = [None] * len(answers)
        pending = []
        for i, (answer, gold) in enumerate(zip(answers, golds, strict=True)):
            if answer is None:
                verdicts[i] = False
            elif numeric(answer) is not None and numeric(gold) is not None:
                verdicts[i] = same_numeric(answer, gold, c.tolerance)  # numbers need no worker
            else:
                pending.append(i)
        for i in pending:
            verdicts[i] = self._ask(answers[i], golds[i])
        return [bool(v) for v in verdicts]

    def _ask(self, answer: str, gold: str) -> bool:
        """One check in the worker, within ``timeout_s`` (else wrong, and a new worker)."""
        worker = self._worker()
        request = {"answer": answer, "gold": gold, "match": self.config.match, "tolerance": self.config.tolerance}
        reply = _exchange(worker, request, self.config.timeout_s)
        if reply is None:
            self.timeouts += 1
            print(f"reward 'verifier': checking answer {answer[:60]!r} against {gold[:60]!r} took over "
                  f"{self.config.timeout_s} s; scored as wrong", flush=True)
            self.close()
            return False
        return bool(reply.get("same"))

    def _worker(self) -> subprocess.Popen:
        if self._process is None or self._process.poll() is not None:
            self._process = subprocess.Popen([sys.executable, "-I", verify.__file__],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            # start-up (imports) is not an answer's time: a first check without the timeout
            if _exchange(self._process, {"answer": "x", "gold": "x", "match": self.config.match,
                                         "tolerance": 1e-6}, STARTUP_S) is None:
                self.close()
                raise UserError(f"reward 'verifier': its checking process did not start within {STARTUP_S:.0f} s")
        return self._process

    def close(self) -> None:
        """Stop the worker (a new one starts on the next check)."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def __del__(self) -> None:  # the worker never outlives the reward
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown
            pass


def _exchange(process: subprocess.Popen, request: dict[str, Any], timeout: float) -> dict[str, Any] | None:
    """Send one request line and read its reply within ``timeout`` seconds (None: no reply)."""
    assert process.stdin is not None and process.stdout is not None
    try:
        process.stdin.write(json.dumps(request) + "\n")
        process.stdin.flush()
    except (BrokenPipeError, OSError):
        return None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    if not ready:
        return None
    line = process.stdout.readline()
    return json.loads(line) if line else None


class FormatReward:
    """``reward`` when a completion matches ``pattern`` (searched, DOTALL), else ``penalty``."""

    def __init__(self, config: Any):
        self.config = config
        self.pattern = re.compile(config.pattern, re.DOTALL)

    def score(self, prompts: Sequence[Any], responses: Sequence[str]) -> torch.Tensor:
        c = self.config
        hits = [(self.pattern.fullmatch(r.strip()) if c.whole else self.pattern.search(r)) is not None
                for r in responses]
        return torch.tensor([c.reward if hit else c.penalty for hit in hits], dtype=torch.float32)
