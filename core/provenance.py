"""Which code a stage runs: the distributions of the plugins whose components it uses,
with their versions, and for code outside an installed distribution's folder (an
editable install, a checkout, a plugin registered directly) a hash of those components'
modules.

A stage's settings fingerprint (``Stage.fingerprint``) says whether the recipe changed;
this says whether the code did. A finished stage whose plugin code changed is run again,
and so is every stage after it in the run; an interrupted one starts again rather than
resume under other code; ``rlhfkit ablate`` re-runs exactly the runs whose stages use the
changed plugin, and says why.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from functools import cache
from pathlib import Path
from typing import Any

from rlhfkit.registry import ComponentRef, ComponentSpec, Registry, walk


def stage_code(stage: Any, registry: Registry) -> dict[str, str]:
    """``{distribution: version}`` of every plugin a stage's components come from; for an
    editable install the version is followed by ``+src.<hash>`` of the modules that define
    those components (their settings, factory and lazily built class)."""
    modules: dict[str, set[str]] = {}
    versions: dict[str, str] = {}
    nodes = [*walk(stage.algorithm, "algorithm"), *(n for slot, v in stage.slots.items() for n in walk(v, slot))]
    for _, node in nodes:
        if not isinstance(node, ComponentRef) or not registry.has(node.kind, node.name):
            continue
        spec = registry.get(node.kind, node.name)
        name, version = _distribution(spec)
        versions[name] = version
        modules.setdefault(name, set()).update(_modules_of(spec))
    out = {}
    for name, version in sorted(versions.items()):
        editable = sorted(m for m in modules[name] if _editable(m))
        if editable:
            digest = hashlib.sha256()
            for module in editable:
                digest.update(module.encode() + b"\0" + _source(module) + b"\0")
            version = f"{version}+src.{digest.hexdigest()[:12]}"
        out[name] = version
    return out


def code_changes(saved: dict[str, str] | None, current: dict[str, str]) -> str:
    """What changed between two :func:`stage_code` results, in words ('' when nothing, or
    when ``saved`` is unknown: a stage finished before rlhfkit recorded code)."""
    if saved is None:
        return ""
    changed = [f"{name} {saved.get(name, 'absent')} -> {current.get(name, 'absent')}"
               for name in sorted(set(saved) | set(current)) if saved.get(name) != current.get(name)]
    return "; ".join(changed)


def upstream_changes(saved: dict[str, str] | None, current: dict[str, str] | None) -> str:
    """Which earlier stages finished again since a stage was trained on them ('' when none,
    or when either side is unknown)."""
    if saved is None or current is None:
        return ""
    again = [name for name, finish in saved.items() if name in current and finish and current[name] != finish]
    return ", ".join(f"stage {name!r}" for name in again)


def _distribution(spec: ComponentSpec) -> tuple[str, str]:
    """``(name, version)`` from the spec's ``distribution`` (``"name version"``)."""
    parts = spec.distribution.rsplit(" ", 1)
    if len(parts) == 2 and spec.distribution != "registered directly":
        return parts[0], parts[1]
    return f"plugin {spec.plugin or '?'}", spec.distribution or "unknown"


def _modules_of(spec: ComponentSpec) -> set[str]:
    modules = {spec.config.__module__, getattr(spec.factory, "__module__", "") or ""}
    target = getattr(spec.factory, "target", None)
    if isinstance(target, str):
        modules.add(target.partition(":")[0])
    return {m for m in modules if m and m != "rlhfkit.registry"}


@cache
def _editable(module: str) -> bool:
    """Whether ``module``'s code may change under the same version: it is not inside an
    installed distribution's folder (site-packages), as with an editable install, a
    checkout on ``sys.path`` or a plugin registered directly."""
    origin = _origin(module)
    return origin is not None and not any(part in ("site-packages", "dist-packages") for part in Path(origin).parts)


def _origin(module: str) -> str | None:
    loaded = sys.modules.get(module)
    origin = getattr(loaded, "__file__", None)
    if origin is None:
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            found = None
        origin = found.origin if found is not None else None
    return origin if origin and origin.endswith(".py") else None


def _source(module: str) -> bytes:
    origin = _origin(module)
    try:
        return Path(origin).read_bytes() if origin else b""
    except OSError:
        return b""
