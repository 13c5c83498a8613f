"""The session folder: its files, creating one, and reading the parts written once
(``session.json``, ``items.jsonl``). The judgements are :mod:`rlhfkit.label.session`'s."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhfkit.errors import UserError
from rlhfkit.files import atomic_directory, fsync_directory

SESSION_FILE = "session.json"
ITEMS_FILE = "items.jsonl"
RANKINGS_FILE = "rankings.jsonl"
UNRANKED_FILE = "unranked.jsonl"
LOCK_FILE = ".label.lock"
DEFAULT_FLAGS = ("harmful", "false", "off-topic")
MAX_COMPLETIONS = 9  # keys 1-9 place a completion in a tier
_FLAG = re.compile(r"^[a-z][a-z0-9-]{0,23}$")


@dataclass(frozen=True)
class Item:
    id: str
    prompt: Any  # text, or a list of {role, content} messages
    completions: tuple[str, ...]


def check_flags(flags: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    bad = [f for f in flags if not _FLAG.match(f)]
    if bad or len(set(flags)) != len(flags) or len(flags) > 6:
        raise UserError(f"flags {list(flags)}: give up to 6 distinct names of lower-case letters, digits and "
                        f"dashes, e.g. harmful,false,off-topic")
    return tuple(flags)


def create_session(directory: Path, items: list[Item], *, seed: int = 0,
                   flags: tuple[str, ...] = DEFAULT_FLAGS, source: dict[str, Any] | None = None) -> None:
    """Write a new session folder with ``items`` (atomically: it exists whole or not at all)."""
    check_new_session(directory)
    if not items:
        raise UserError("the session would have no items; the source gave no prompt with 2 or more completions.")
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        raise UserError("two items share an id; give every item its own `id`, or none.")
    meta = {"version": 1, "seed": seed, "flags": list(check_flags(flags)), "items": len(items),
            "created": now(), "source": source or {}}
    with atomic_directory(directory) as staging:
        (staging / ITEMS_FILE).write_text("".join(
            json.dumps({"id": i.id, "prompt": i.prompt, "completions": list(i.completions)}) + "\n"
            for i in items), encoding="utf-8")
        (staging / SESSION_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    fsync_directory(directory)


def check_new_session(directory: Path) -> None:
    """Refuse to create a session where one (or anything else) already is."""
    if (directory / SESSION_FILE).exists():
        raise UserError(f"{directory} already holds a labelling session; open it without a source "
                        f"(--samples/--from-stage) to go on labelling, or give a new folder.")
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise UserError(f"{directory} exists and is not an empty folder; give a new folder for the session.")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read_meta(directory: Path) -> dict[str, Any]:
    path = directory / SESSION_FILE
    if not path.is_file():
        raise UserError(f"{directory} is not a labelling session (no {SESSION_FILE}); create one with "
                        f"`rlhfkit label {directory} --samples FILE` or `--from-stage RUN/STAGE`.")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is damaged (not JSON); it is written once when the session is created.") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path} is damaged (not a JSON object).")
    return meta


def read_items(path: Path) -> list[Item]:
    items = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read the session's items {path}: {exc}") from None
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            items.append(Item(id=str(row["id"]), prompt=row["prompt"], completions=tuple(row["completions"])))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path} line {number} is damaged; it is written once when the session is "
                            f"created.") from None
    return items
