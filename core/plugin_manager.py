"""The plugin manager: entry-point discovery, blocking, hook checks, the registry."""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import pluggy

from rlhfkit import hookspecs
from rlhfkit.errors import PluginError
from rlhfkit.registry import ComponentSpec, Registry

hookimpl = pluggy.HookimplMarker("rlhfkit")

ENTRY_POINT_GROUP = "rlhfkit"
#: Comma-separated plugin names to block, in addition to ``--block-plugin``.
BLOCK_ENV = "RLHFKIT_BLOCK_PLUGINS"


class Plugins:
    """Loaded plugins, the component registry and the presets they contribute."""

    def __init__(self, manager: pluggy.PluginManager, registry: Registry,
                 presets: dict[str, dict[str, Any]], distributions: dict[str, str]):
        self.manager = manager
        self.registry = registry
        self.presets = presets
        self.distributions = distributions

    @property
    def hook(self) -> Any:
        return self.manager.hook


def load_plugins(block: Iterable[str] = (), extra: Iterable[tuple[str, object]] = ()) -> Plugins:
    """Discover the ``rlhfkit`` entry points and build the registry.

    Args:
        block: plugin (entry-point) names not to load; ``RLHFKIT_BLOCK_PLUGINS`` adds more.
        extra: ``(name, plugin object)`` pairs registered directly (tests, notebooks).
    """
    manager = pluggy.PluginManager("rlhfkit")
    manager.add_hookspecs(hookspecs)
    blocked = set(block) | {b.strip() for b in os.environ.get(BLOCK_ENV, "").split(",") if b.strip()}
    for name in blocked:
        manager.set_blocked(name)

    distributions: dict[str, str] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if manager.is_blocked(ep.name) or manager.get_plugin(ep.name) is not None:
            continue
        dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "unknown distribution"
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken third-party plugin must name itself
            raise PluginError(
                f"plugin {ep.name!r} from {dist} failed to import ({ep.value}): "
                f"{type(exc).__name__}: {exc}. Fix or uninstall that distribution, or block "
                f"the plugin with `--block-plugin {ep.name}` or {BLOCK_ENV}={ep.name}."
            ) from exc
        _register(manager, plugin, ep.name, dist)
        distributions[ep.name] = dist
    for name, plugin in extra:
        if not manager.is_blocked(name):
            _register(manager, plugin, name, "registered directly")
            distributions[name] = "registered directly"

    registry = Registry()
    for impl in manager.hook.rlhfkit_components.get_hookimpls():
        where = f"plugin {impl.plugin_name!r} ({distributions.get(impl.plugin_name, '?')})"
        specs = _call(impl, where, "rlhfkit_components")
        if not isinstance(specs, list) or not all(isinstance(s, ComponentSpec) for s in specs):
            raise PluginError(f"{where}: rlhfkit_components must return a list of ComponentSpec.")
        registry.extend(
            replace(s, plugin=impl.plugin_name, distribution=distributions.get(impl.plugin_name, ""))
            for s in specs
        )

    presets: dict[str, dict[str, Any]] = {}
    owners: dict[str, str] = {}
    for impl in manager.hook.rlhfkit_presets.get_hookimpls():
        where = f"plugin {impl.plugin_name!r} ({distributions.get(impl.plugin_name, '?')})"
        contributed = _call(impl, where, "rlhfkit_presets")
        for name, fragment in contributed.items():
            if name in presets:
                raise PluginError(
                    f"two plugins contribute the preset {name!r}: plugin {owners[name]!r} and {where}."
                )
            presets[name], owners[name] = fragment, impl.plugin_name
    return Plugins(manager, registry, presets, distributions)


def _register(manager: pluggy.PluginManager, plugin: object, name: str, dist: str) -> None:
    try:
        manager.register(plugin, name=name)
        manager.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(
            f"plugin {name!r} from {dist} does not match the rlhfkit hook specification: {exc}. "
            f"Hook names start with `rlhfkit_`; see `rlhfkit.hookspecs` for the list."
        ) from exc


def _call(impl: Any, where: str, hook: str) -> Any:
    try:
        return impl.function()
    except PluginError:
        raise
    except Exception as exc:
        raise PluginError(f"{where} raised in {hook}: {type(exc).__name__}: {exc}") from exc
