"""A labelling session on disk: the items to rank and every judgement made on them.

A session is a folder (:mod:`rlhfkit.label.folder`)::

    session.json      what the session is: seed, flags, where the items came from
    items.jsonl       one item per line: id, prompt, completions (K of them)
    rankings.jsonl    one ranking per line, in the `ranking` schema the reward-model stage
                      reads (prompt, completions, ranks: 0 = best, equal ranks = a tie),
                      plus labeller, time, flags, item, id, shown, seconds
    unranked.jsonl    skips, and judgements that tie every completion ("I can't tell them
                      apart": no pair to learn from, so not a ranking row), for progress
                      and agreement
    .label.lock       held by the one server writing the session

Every judgement is appended and ``fsync``-ed before :meth:`LabelSession.submit` returns,
and the server confirms it only then: a kill at any moment loses nothing confirmed. A line
cut short by a kill was never confirmed; opening the session cuts it off. Undo rewrites
the file atomically without the labeller's last judgement.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import threading
import uuid
from pathlib import Path
from typing import Any

from rlhfkit.errors import UserError
from rlhfkit.files import append_durably, atomic_write_text
from rlhfkit.label.agreement import pairwise_agreement
from rlhfkit.label.folder import (
    DEFAULT_FLAGS,
    ITEMS_FILE,
    LOCK_FILE,
    RANKINGS_FILE,
    UNRANKED_FILE,
    Item,
    check_flags,
    now,
    read_items,
    read_meta,
)

_LABELLER = re.compile(r"^\w[\w .@-]{0,39}$")
_SUBMISSION_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")


class LabelRequestError(UserError):
    """A request the session refuses: ``status`` is the HTTP status the server answers with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _order_key(*parts: object) -> str:
    return hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()


class LabelSession:
    """An open session: the items, every judgement in memory, and the files they go to.

    Thread-safe: one lock serialises every read and write, so concurrent labellers never
    overwrite each other. One writer per session: ``lock=True`` (the server) takes the
    session's OS lock before reading, and only then cuts off a line a kill left unfinished;
    a reader (export, agreement) leaves the files as they are and ignores such a line.
    """

    def __init__(self, directory: Path, lock: bool = False):
        self.directory = Path(directory)
        self.meta = read_meta(self.directory)
        self.seed = int(self.meta.get("seed", 0))
        self.flags = check_flags(self.meta.get("flags", list(DEFAULT_FLAGS)))
        self.items = read_items(self.directory / ITEMS_FILE)
        self.by_id = {item.id: item for item in self.items}
        self._mutex = threading.Lock()
        self._lock_handle: Any = None
        self._orders: dict[str, list[Item]] = {}
        self.repaired: list[str] = []
        if lock:
            self._lock()
        #: every judgement, rankings and unranked rows together, in the order they were made
        self.entries: list[dict[str, Any]] = [row for name in (RANKINGS_FILE, UNRANKED_FILE)
                                              for row in self._read_log(name)]
        self.entries.sort(key=lambda row: row.get("seq", 0))
        self._seq = max((row.get("seq", 0) for row in self.entries), default=0)

    # ------------------------------------------------------------------ the files
    def _lock(self) -> None:
        """Take the session's OS lock (released when the process ends, however it ends)."""
        import fcntl

        handle = open(self.directory / LOCK_FILE, "a+")  # noqa: SIM115 - held while serving
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise UserError(f"the labelling session {self.directory} is open in another `rlhfkit label` "
                            f"process; two servers writing one session would lose judgements. Use that "
                            f"server (several labellers can share it), or stop it first.") from None
        self._lock_handle = handle

    def _read_log(self, name: str) -> list[dict[str, Any]]:
        path = self.directory / name
        if not path.exists():
            return []
        raw = path.read_bytes()
        if raw and not raw.endswith(b"\n"):
            # a line cut short by a kill during its write: never confirmed, so dropped (by
            # the writer; a reader may be looking at an append under way, and only skips it)
            keep = raw.rfind(b"\n") + 1
            if self._lock_handle is not None:
                with open(path, "r+b") as handle:
                    handle.truncate(keep)
                self.repaired.append(f"{path}: dropped an unfinished last line ({len(raw) - keep} bytes) that "
                                     f"was never confirmed")
            raw = raw[:keep]
        rows = []
        for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path} line {number} is not JSON; the file was edited or damaged. Fix or "
                                f"delete that line, then start the server again.") from None
            if not _is_judgement(row, self.by_id):
                raise UserError(f"{path} line {number} is not a judgement of this session (it needs id, item, "
                                f"labeller and, unless skipped, one rank per completion; its item must be in "
                                f"{ITEMS_FILE}); fix or delete it.")
            rows.append(row)
        return rows

    # ------------------------------------------------------------------ reading
    def order(self, labeller: str) -> list[Item]:
        """The items in ``labeller``'s own order (fixed by the session seed and the name)."""
        if labeller not in self._orders:
            self._orders[labeller] = sorted(self.items, key=lambda item: _order_key(self.seed, labeller, item.id))
        return self._orders[labeller]

    def shown_order(self, labeller: str, item: Item) -> list[int]:
        """The order ``labeller`` sees ``item``'s completions in (same on every reload)."""
        order = list(range(len(item.completions)))
        random.Random(_order_key(self.seed, labeller, item.id, "shown")).shuffle(order)
        return order

    def _done(self, labeller: str) -> dict[str, dict[str, Any]]:
        return {row["item"]: row for row in self.entries if row["labeller"] == labeller}

    def next_item(self, labeller: str) -> dict[str, Any]:
        """What the page shows ``labeller`` next: the first item of their order they have
        not judged (``item`` is None when every item is done), and their progress."""
        labeller = check_labeller(labeller)
        with self._mutex:
            done = self._done(labeller)
            item = next((i for i in self.order(labeller) if i.id not in done), None)
            return {"item": self.view(labeller, item) if item else None, "progress": self._progress(done)}

    def view(self, labeller: str, item: Item, previous: dict[str, Any] | None = None) -> dict[str, Any]:
        """``item`` as the page gets it: completions in the labeller's order, each with its
        index; with ``previous`` (an undone judgement), its tiers and flags."""
        view = {"id": item.id, "prompt": item.prompt,
                "responses": [{"index": i, "text": item.completions[i]} for i in self.shown_order(labeller, item)],
                "flags": list(self.flags)}
        if previous is not None:
            view["previous"] = {"tiers": _tiers_of(previous.get("ranks", [])),
                                "flags": previous.get("flags") or [[] for _ in item.completions],
                                "skipped": previous.get("reason") == "skip"}
        return view

    def _progress(self, done: dict[str, dict[str, Any]]) -> dict[str, int]:
        skipped = sum(row.get("reason") == "skip" for row in done.values())
        return {"done": len(done), "total": len(self.items), "skipped": skipped,
                "ranked": len(done) - skipped}

    def progress(self, labeller: str) -> dict[str, int]:
        with self._mutex:
            return self._progress(self._done(check_labeller(labeller)))

    def labellers(self) -> list[str]:
        with self._mutex:
            return sorted({row["labeller"] for row in self.entries})

    # ------------------------------------------------------------------ writing
    def submit(self, labeller: str, item_id: str, tiers: list[list[int]], flags: dict[str, list[str]] | None = None,
               submission: str | None = None, seconds: float | None = None) -> dict[str, Any]:
        """Record ``labeller``'s ranking of ``item_id``: ``tiers`` lists completion indices
        best tier first; several in one tier are tied. Durable when this returns."""
        labeller = check_labeller(labeller)
        item = self._item(item_id)
        k = len(item.completions)
        tiers = [list(tier) for tier in tiers if tier]
        placed = [i for tier in tiers for i in tier]
        if any(type(i) is not int for i in placed) or sorted(placed) != list(range(k)):
            raise LabelRequestError(400, f"tiers {tiers} must place each of the item's {k} completions "
                                         f"(indices 0-{k - 1}) exactly once")
        ranks = [0] * k
        for rank, tier in enumerate(tiers):
            for index in tier:
                ranks[index] = rank
        row = {"prompt": item.prompt, "completions": list(item.completions), "ranks": ranks,
               "flags": self._flag_lists(flags or {}, k)}
        if len(tiers) == 1:  # all tied: no pair to learn from, not a ranking row
            row["reason"] = "tied"
        return self._append(labeller, item, row, submission, seconds)

    def skip(self, labeller: str, item_id: str, submission: str | None = None) -> dict[str, Any]:
        """Record that ``labeller`` skipped ``item_id`` (it counts as done for them)."""
        labeller = check_labeller(labeller)
        return self._append(labeller, self._item(item_id), {"reason": "skip"}, submission, None)

    def undo(self, labeller: str) -> dict[str, Any]:
        """Remove ``labeller``'s latest judgement (durably) and return its item to show
        again, with the tiers and flags it had."""
        labeller = check_labeller(labeller)
        with self._mutex:
            mine = [row for row in self.entries if row["labeller"] == labeller]
            if not mine:
                raise LabelRequestError(409, f"{labeller} has nothing to undo")
            last = mine[-1]
            kept = [row for row in self.entries if row is not last]
            name = _file_of(last)
            self._rewrite(name, [row for row in kept if _file_of(row) == name])
            self.entries = kept
            item = self.by_id[last["item"]]
            return {"item": self.view(labeller, item, previous=last),
                    "progress": self._progress(self._done(labeller)), "undone": last["id"]}

    def _append(self, labeller: str, item: Item, row: dict[str, Any], submission: str | None,
                seconds: float | None) -> dict[str, Any]:
        if submission is not None and not _SUBMISSION_ID.match(submission):
            raise LabelRequestError(400, "submission ids are 8-64 letters, digits, '-' or '_'")
        if seconds is not None and not 0 <= seconds < 1e7:
            raise LabelRequestError(400, f"seconds {seconds} is not a time spent on an item")
        with self._mutex:
            if submission is not None:
                same = next((r for r in self.entries if r["id"] == submission), None)
                if same is not None:  # a retry of a confirmed submission (the reply was lost)
                    if same["labeller"] != labeller or same["item"] != item.id:
                        raise LabelRequestError(409, f"submission id {submission} was used for another judgement")
                    return self._receipt(same, duplicate=True)
            done = self._done(labeller)
            if item.id in done:
                raise LabelRequestError(409, f"{labeller} already judged item {item.id}; undo it first to change it")
            self._seq += 1
            row = row | {"labeller": labeller, "time": now(), "item": item.id,
                         "id": submission or uuid.uuid4().hex, "seq": self._seq}
            if seconds is not None:
                row["seconds"] = round(float(seconds), 2)
            if "ranks" in row:
                row["shown"] = self.shown_order(labeller, item)
            append_durably(self.directory / _file_of(row), (json.dumps(row) + "\n").encode("utf-8"))
            self.entries.append(row)
            return self._receipt(row)

    def _receipt(self, row: dict[str, Any], duplicate: bool = False) -> dict[str, Any]:
        done = self._done(row["labeller"])
        return {"saved": row["id"], "file": _file_of(row), "duplicate": duplicate, "progress": self._progress(done)}

    def _rewrite(self, name: str, rows: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(row) + "\n" for row in rows)
        atomic_write_text(self.directory / name, text, durable=True)

    def _item(self, item_id: Any) -> Item:
        item = self.by_id.get(item_id) if isinstance(item_id, str) else None
        if item is None:
            raise LabelRequestError(404, f"no item {str(item_id)[:80]!r} in this session")
        return item

    def _flag_lists(self, flags: dict[str, list[str]], k: int) -> list[list[str]]:
        lists: list[list[str]] = [[] for _ in range(k)]
        for key, names in flags.items():
            if not str(key).isdigit() or not 0 <= int(key) < k:
                raise LabelRequestError(400, f"flags name completion {key!r}; indices are 0-{k - 1}")
            unknown = [n for n in names if n not in self.flags]
            if unknown:
                raise LabelRequestError(400, f"unknown flag(s) {unknown}; this session's flags are {list(self.flags)}")
            lists[int(key)] = sorted(set(names), key=self.flags.index)
        return lists

    # ------------------------------------------------------------------ results
    def agreement(self) -> dict[str, Any]:
        """Pairwise agreement between labellers on the items both ranked, ties included and
        skips left out (:func:`~rlhfkit.label.agreement.pairwise_agreement`)."""
        with self._mutex:
            ranked: dict[str, dict[str, list[int]]] = {}
            for row in self.entries:
                if row.get("reason") != "skip":
                    ranked.setdefault(row["labeller"], {})[row["item"]] = row["ranks"]
        return pairwise_agreement(ranked)

    def rankings(self, labellers: list[str] | None = None, drop_flags: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        """The ranking rows (in the ``ranking`` schema), optionally only ``labellers``'
        and without rows where any completion has one of ``drop_flags``."""
        with self._mutex:
            rows = [row for row in self.entries if _file_of(row) == RANKINGS_FILE]
        return [{k: v for k, v in row.items() if k != "seq"} for row in rows
                if (labellers is None or row["labeller"] in labellers)
                and not any(flag in drop_flags for flags in row.get("flags", []) for flag in flags)]


def _file_of(row: dict[str, Any]) -> str:
    """Where a judgement is kept: rankings in the ranking file, skips and all-tied ones
    (which carry a ``reason``) in the other."""
    return UNRANKED_FILE if "reason" in row else RANKINGS_FILE


def _is_judgement(row: Any, items: dict[str, Item]) -> bool:
    if not isinstance(row, dict) or row.get("item") not in items or not isinstance(row.get("id"), str) \
            or not isinstance(row.get("labeller"), str):
        return False
    ranks = row.get("ranks")
    if row.get("reason") == "skip" and ranks is None:
        return True
    return isinstance(ranks, list) and len(ranks) == len(items[row["item"]].completions) \
        and all(type(r) is int and r >= 0 for r in ranks)


def _tiers_of(ranks: list[int]) -> list[list[int]]:
    return [[i for i, r in enumerate(ranks) if r == rank] for rank in sorted(set(ranks))]


def check_labeller(name: Any) -> str:
    if not isinstance(name, str) or not _LABELLER.match(name.strip()):
        raise LabelRequestError(400, "a labeller name is 1-40 letters, digits, spaces, '.', '@', '-' or '_', "
                                     "starting with a letter or digit")
    return name.strip()
