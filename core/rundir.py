"""Keeping a run directory sound: one writer at a time, no stale temporary files, run
files read back defensively, exports verified before a finished stage is trusted, and a
full disk reported as what it is.

See docs/faults.md for what each of these guarantees.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

from rlhfkit.errors import UserError

LOCK_NAME = ".rlhfkit.lock"
# what atomic writes leave beside their target when killed: files.atomic_write_text,
# files.atomic_directory, training.AtomicCheckpointIO
_STALE_PREFIXES = (".tmp-", ".old-")


class RunLock:
    """An OS lock (``flock``) on ``<run dir>/.rlhfkit.lock`` held for the whole run: a
    second ``rlhfkit run`` into the same directory is refused with a message naming the
    process that holds it. The kernel releases the lock when the holder dies, however it
    dies, so a killed run never leaves a stale lock behind."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_NAME
        self._handle: Any = None

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held open for the whole run
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UserError(
                f"run directory {self.path.parent} is in use by {holder}. Two runs writing one directory "
                f"would mix their checkpoints and exports. Wait for that run to finish (or stop it), or give "
                f"this one its own directory (run.dir=... or run.name=...).") from None
        handle.seek(0)
        handle.truncate()
        command = " ".join(sys.argv[:4]) + (" ..." if len(sys.argv) > 4 else "")
        handle.write(f"process {os.getpid()} on {socket.gethostname()} ({command}), "
                     f"since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the descriptor releases the flock
            self._handle = None



def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete what interrupted atomic writes left in ``run_dir`` and its stage folders
    (hidden ``.NAME.tmp-*`` / ``.NAME.old-*`` files and folders). Only safe while holding
    the :class:`RunLock`. Returns what was removed."""
    removed: list[Path] = []
    folders = [run_dir, *(p for p in run_dir.iterdir() if p.is_dir() and not p.is_symlink())] \
        if run_dir.is_dir() else []
    for folder in list(folders):
        checkpoints = folder / "checkpoints"
        if folder is not run_dir and checkpoints.is_dir() and not checkpoints.is_symlink():
            folders.append(checkpoints)
    for folder in folders:
        for path in folder.iterdir():
            if path.name.startswith(".") and any(marker in path.name for marker in _STALE_PREFIXES):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def read_json_file(path: Path, keys: tuple[str, ...] = ()) -> tuple[dict[str, Any] | None, str]:
    """``(data, "")`` for a JSON object file holding ``keys``; ``(None, why)`` when the
    file is missing, not UTF-8, not JSON, not an object or lacks a key."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return None, "missing"
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        return None, f"unreadable ({type(exc).__name__})"
    except OSError as exc:
        return None, f"unreadable ({exc.strerror})"
    if not isinstance(data, dict):
        return None, f"not a JSON object but a {type(data).__name__}"
    missing = [k for k in keys if k not in data]
    if missing:
        return None, f"lacks {', '.join(missing)}"
    return data, ""


# ------------------------------------------------------------------ exports


def export_manifest(export_dir: Path) -> dict[str, int]:
    """``{relative file name: size}`` of an export, recorded in ``DONE.json``."""
    if not export_dir.is_dir():
        return {}
    return {str(p.relative_to(export_dir)): p.stat().st_size
            for p in sorted(export_dir.rglob("*")) if p.is_file()}


def verify_export(export_dir: Path, manifest: dict[str, int] | None) -> str:
    """``""`` if the export is whole, else what is wrong. Whole: every file of
    ``manifest`` present with its size, every ``*.safetensors`` header readable, every
    JSON file parses. Without a manifest (a run from before manifests were kept), the
    files present are checked."""
    if manifest is None:
        manifest = export_manifest(export_dir)
        if not manifest:
            return f"{export_dir} is missing or empty"
    for name, size in manifest.items():
        path = export_dir / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, {size} when it was written"
        if name.endswith(".safetensors"):
            problem = _safetensors_header_problem(path)
            if problem:
                return f"{path}: {problem}"
        elif name.endswith(".json"):
            _, why = read_json_file(path)
            if why:
                return f"{path} is {why}"
    return ""


def _safetensors_header_problem(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return "too short for a safetensors file"
            (length,) = struct.unpack("<Q", head)
            if length > 100 * 2**20 or length > path.stat().st_size - 8:
                return "its header length is impossible (cut short or not a safetensors file)"
            header = json.loads(handle.read(length).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"its header does not parse ({type(exc).__name__})"
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end > path.stat().st_size:
        return "its tensors end past the end of the file (cut short)"
    return ""


# ----------------------------------------------------------------- full disk


def is_disk_full(exc: BaseException) -> bool:
    """A write failed for want of space: ENOSPC/EDQUOT, or torch's zip writer's message."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if "No space left on device" in text or "file write failed" in text or "Disk quota exceeded" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_error(exc: BaseException, run_dir: Path, intact: str) -> UserError:
    """The paragraph for a write that failed on a full disk."""
    where = getattr(exc, "filename", None)
    try:
        free = shutil.disk_usage(run_dir if run_dir.exists() else Path.cwd()).free
        space = f"{free / 2**20:.1f} MiB free"
    except OSError:
        space = "free space unknown"
    what = f"writing {where}" if where else "writing to the run directory"
    return UserError(
        f"the disk holding {run_dir} is full ({space}): {what} failed. Nothing already saved was lost and "
        f"the unfinished write was removed; {intact}. Free some space (or point run.dir at a larger disk "
        f"and move the run there), then re-run the same command to resume.")

