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

    def check_recipe(self, recipe: Any) -> list[Any]:
        """Every plugin's ``rlhfkit_check_recipe`` problems for ``recipe``."""
        found = call_each(self.manager, "rlhfkit_check_recipe", self.distributions,
                          recipe=recipe, registry=self.registry)
        return [problem for problems in found for problem in problems or []]

    def load_recipe(self, path: Any, overrides: list[str] = ()) -> Any:
        """Load and validate a recipe against the installed components and presets."""
        from rlhfkit.recipe import load_recipe

        return load_recipe(path, self.registry, self.presets, overrides, check=self.check_recipe)


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
        if manager.is_blocked(ep.name):
            continue
        dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "unknown distribution"
        if ep.name in distributions:
            if distributions[ep.name] == dist:  # the same distribution seen twice on sys.path
                continue
            raise PluginError(
                f"two distributions register an rlhfkit plugin named {ep.name!r}: "
                f"{distributions[ep.name]} and {dist}. Uninstall one of them."
            )
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken third-party plugin must name itself
            raise PluginError(
                f"plugin {ep.name!r} ({dist}) failed to import ({ep.value}): "
                f"{type(exc).__name__}: {exc}. Fix or uninstall that distribution, or block "
                f"the plugin with `--block-plugin {ep.name}` or {BLOCK_ENV}={ep.name}."
            ) from exc
        _register(manager, plugin, ep.name, dist)
        distributions[ep.name] = dist
    for name, plugin in extra:
        if manager.is_blocked(name):
            continue
        if name in distributions:
            raise PluginError(f"a plugin named {name!r} is already loaded from {distributions[name]}.")
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
        if not isinstance(contributed, dict) or not all(isinstance(f, dict) for f in contributed.values()):
            raise PluginError(f"{where}: rlhfkit_presets must return a dict of preset name -> recipe mapping.")
        for name, fragment in contributed.items():
            if name in presets:
                raise PluginError(
                    f"two plugins contribute the preset {name!r}: plugin {owners[name]!r} and {where}."
                )
            presets[name], owners[name] = fragment, impl.plugin_name
    return Plugins(manager, registry, presets, distributions)


def _register(manager: pluggy.PluginManager, plugin: object, name: str, dist: str) -> None:
    undecorated = [attr for attr in dir(plugin) if attr.startswith("rlhfkit_")
                   and callable(getattr(plugin, attr))
                   and not hasattr(getattr(plugin, attr), "rlhfkit_impl")]
    if undecorated:
        raise PluginError(
            f"plugin {name!r} ({dist}) defines {', '.join(undecorated)} without @rlhfkit.hookimpl, "
            f"so rlhfkit would never call it; decorate it (from rlhfkit import hookimpl)."
        )
    try:
        manager.register(plugin, name=name)
        manager.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(
            f"plugin {name!r} ({dist}) does not match the rlhfkit hook specification: {exc}. "
            f"Hook names start with `rlhfkit_`; see `rlhfkit.hookspecs` for the list."
        ) from exc


def call_each(manager: pluggy.PluginManager, hook: str, distributions: dict[str, str],
              **kwargs: Any) -> list[Any]:
    """Call every implementation of ``hook`` separately, so that an exception names the
    plugin (and distribution) that raised it."""
    results = []
    for impl in getattr(manager.hook, hook).get_hookimpls():
        where = f"plugin {impl.plugin_name!r} ({distributions.get(impl.plugin_name, '?')})"
        args = {k: v for k, v in kwargs.items() if k in impl.argnames}
        results.append(_call(impl, where, hook, **args))
    return results


def _call(impl: Any, where: str, hook: str, **kwargs: Any) -> Any:
    try:
        return impl.function(**kwargs)
    except PluginError:
        raise
    except Exception as exc:
        raise PluginError(f"{where} raised in {hook}: {type(exc).__name__}: {exc}") from exc
