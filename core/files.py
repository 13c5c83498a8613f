"""Atomic writes: a crash never leaves a half-written file or directory behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rlhfkit.errors import UserError


def atomic_write_text(path: Path, text: str, *, durable: bool = False) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same directory and ``os.replace``.

    ``durable``: also ``fsync`` the file before the rename and the folder after it, so the
    new content survives a power cut once this returns (what a caller that confirms the
    write to someone needs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # a full disk leaves no temporary file behind
        raise
    if durable:
        fsync_directory(path.parent)


def fsync_directory(folder: Path) -> None:
    """Make the names in ``folder`` (a file just created or renamed there) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def append_durably(path: Path, data: bytes) -> None:
    """Append ``data`` (whole lines) to ``path`` and ``fsync`` it before returning. A
    failed write (a full disk) cuts the file back to its size before, so no partial line
    is left behind."""
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)
    if created:
        fsync_directory(path.parent)


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a staging directory beside ``target``; on success it replaces ``target``
    (an existing one is swapped out, then removed), on error it is deleted."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would stick to the result; mkdir honours umask.
    staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not target.exists():
        os.replace(staging, target)
        return
    retired = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(target, retired)
    os.replace(staging, target)
    shutil.rmtree(retired)


def write_samples(path: Path, when: str, rows: list[dict]) -> None:
    """Put ``rows`` (each with ``"when": when``) into the JSON-lines file ``path``,
    replacing the rows an earlier attempt wrote for the same ``when`` and keeping the
    others, atomically: writing the samples again after a resume never duplicates them.
    Lines that do not read back (cut short) are dropped."""
    kept: list[dict] = []
    if path.is_file():
        for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("when") != when:
                kept.append(row)
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in [*kept, *rows]))


def decode_utf8(raw: bytes, where: str, error: type[UserError] = UserError) -> str:
    """``raw`` as UTF-8 text (a byte-order mark is accepted); otherwise ``error`` naming
    ``where`` and the line of the first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise error(f"{where} line {line}: not UTF-8 text (byte {raw[exc.start]:#04x}); save it as UTF-8.") from None


def non_unicode_path(value: Any) -> str | None:
    """The dotted path of the first string (key or value) in ``value`` that cannot be written
    as UTF-8 (a lone surrogate), or ``None``; ``""`` when ``value`` itself is that string.
    Iterative, so deeply nested data cannot exhaust the stack."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return path
        elif isinstance(item, dict):
            for key, child in reversed(list(item.items())):
                where = f"{path}.{key}" if path else str(key)
                stack.append((where, child))
                if isinstance(key, str):
                    stack.append((path, key))  # a bad key: its mapping (the key itself cannot be shown)
        elif isinstance(item, list):
            stack.extend((f"{path}.{i}" if path else str(i), child) for i, child in reversed(list(enumerate(item))))
    return None
