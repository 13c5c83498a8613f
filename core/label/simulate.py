"""A labeller in code: ranks a session's items through the same HTTP API the page uses,
with a scorer standing in for the person (the built-in task's gold scorer in tests and in
docs/human-feedback.md's measurement). Also a small client for scripts."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from typing import Any

#: ``scorer(prompts, responses) -> scores``, higher is better
Scorer = Callable[[Sequence[Any], Sequence[str]], Sequence[float]]


class LabelAPIError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status


class LabelClient:
    """The labelling server's HTTP API (what label.js calls)."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base_url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("X-Label-Token", self.token)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error", "")
            except (json.JSONDecodeError, AttributeError):
                message = ""
            raise LabelAPIError(exc.code, message) from None

    def next(self, labeller: str) -> dict[str, Any]:
        return self._call("GET", "/api/next?" + urllib.parse.urlencode({"labeller": labeller}))

    def submit(self, labeller: str, item: str, tiers: list[list[int]], flags: dict[str, list[str]] | None = None,
               submission: str | None = None) -> dict[str, Any]:
        return self._call("POST", "/api/submit", {"labeller": labeller, "item": item, "tiers": tiers,
                                                  "flags": flags or {}, "submission": submission})

    def skip(self, labeller: str, item: str, submission: str | None = None) -> dict[str, Any]:
        return self._call("POST", "/api/skip", {"labeller": labeller, "item": item, "submission": submission})

    def undo(self, labeller: str) -> dict[str, Any]:
        return self._call("POST", "/api/undo", {"labeller": labeller})

    def agreement(self) -> dict[str, Any]:
        return self._call("GET", "/api/agreement")


def tiers_from_scores(indices: Sequence[int], scores: Sequence[float], tie_precision: float = 0.0
                      ) -> list[list[int]]:
    """Completion ``indices`` grouped best first by ``scores``; with ``tie_precision`` > 0,
    scores equal after rounding to it share a tier (the built-in task's rule for ties)."""
    levels = [round(s / tie_precision) if tie_precision > 0 else s for s in scores]
    return [sorted(i for i, level in zip(indices, levels, strict=True) if level == value)
            for value in sorted(set(levels), reverse=True)]


def rank_session(client: LabelClient, labeller: str, scorer: Scorer, *, limit: int | None = None,
                 tie_precision: float = 0.0) -> int:
    """Rank up to ``limit`` items (all when None) as ``labeller``; returns how many were
    submitted. Each submission carries its own id, so a retry after a lost reply is safe."""
    done = 0
    while limit is None or done < limit:
        item = client.next(labeller)["item"]
        if item is None:
            break
        responses = item["responses"]
        scores = scorer([item["prompt"]] * len(responses), [r["text"] for r in responses])
        tiers = tiers_from_scores([r["index"] for r in responses], [float(s) for s in scores], tie_precision)
        client.submit(labeller, item["id"], tiers, submission=uuid.uuid4().hex)
        done += 1
    return done
