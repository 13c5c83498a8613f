"""The component registry: ``(kind, name) -> ComponentSpec``.

Plugins contribute :class:`ComponentSpec` objects through the ``rlhfkit_components`` hook;
the registry is the only place recipes look names up, so a recipe can name registered
components and nothing else (no import paths).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError, model_validator

from rlhfkit.errors import PluginError, UserError

#: The component kinds rlhfkit knows. A plugin may not invent new ones: the training
#: loop calls components of these kinds through the Protocols in ``rlhfkit.interfaces``.
KINDS: tuple[str, ...] = (
    "algorithm",
    "policy",
    "reward",
    "estimator",
    "constraint",
    "objective",
    "dataset",
    "task",
)


@dataclass(frozen=True)
class Slot:
    """A component slot of an algorithm: which kind goes in it and whether it is required.

    ``many=True`` slots take a list of components applied in recipe order (constraints).
    """

    kind: str
    required: bool = True
    many: bool = False
    doc: str = ""
    # components that declare tags must carry this one to fill the slot (e.g. an
    # objective slot of the dpo algorithm takes "preference-loss" objectives); components
    # without tags are not checked
    tag: str = ""


@dataclass(frozen=True)
class ComponentSpec:
    """Everything rlhfkit needs to know about one component.

    Attributes:
        kind: one of :data:`KINDS`.
        name: the name recipes use (``name:`` key), unique within its kind.
        config: the pydantic model of the component's settings; every default lives
            here and it should forbid extra keys (``ConfigDict(extra="forbid")``).
        factory: ``factory(config, context) -> component``; ``context`` is a
            :class:`rlhfkit.StageContext` (``None`` where no run exists, e.g. in tests
            of components that need none).
        doc: one line shown by ``rlhfkit plugins``.
        slots: for algorithms only, the component slots a stage of it fills.
        tags: what the component is for within its kind; a slot with a ``tag`` takes
            only components that carry it (or declare no tags at all).
    """

    kind: str
    name: str
    config: type[BaseModel]
    factory: Callable[..., Any]
    doc: str
    slots: dict[str, Slot] = field(default_factory=dict)
    # what the component is for, within its kind (e.g. "preference-loss"); see Slot.tag
    tags: frozenset[str] = frozenset()
    # Filled in by the registry: which plugin (and distribution) contributed the spec.
    plugin: str = ""
    distribution: str = ""

    def where(self) -> str:
        return f"plugin {self.plugin!r}" + (
            f" (distribution {self.distribution})" if self.distribution else ""
        )


class Registry:
    """Components by kind and name."""

    def __init__(self) -> None:
        self._specs: dict[tuple[str, str], ComponentSpec] = {}

    def add(self, spec: ComponentSpec) -> None:
        if spec.kind not in KINDS:
            raise PluginError(
                f"{spec.where()} contributes component {spec.name!r} of unknown kind "
                f"{spec.kind!r}; the kinds are: {', '.join(KINDS)}."
            )
        if spec.slots and spec.kind != "algorithm":
            raise PluginError(f"{spec.where()}: only algorithms declare slots ({spec.name!r}).")
        for slot_name, slot in spec.slots.items():
            if slot.kind not in KINDS:
                raise PluginError(
                    f"{spec.where()}: slot {slot_name!r} of algorithm {spec.name!r} has "
                    f"unknown kind {slot.kind!r}; the kinds are: {', '.join(KINDS)}."
                )
        key = (spec.kind, spec.name)
        if key in self._specs:
            other = self._specs[key]
            raise PluginError(
                f"two plugins register the {spec.kind} {spec.name!r}: {other.where()} and "
                f"{spec.where()}. Uninstall one, or block one with "
                f"`--block-plugin NAME` / RLHFKIT_BLOCK_PLUGINS."
            )
        self._specs[key] = spec

    def get(self, kind: str, name: str) -> ComponentSpec:
        try:
            return self._specs[(kind, name)]
        except KeyError:
            raise UserError(self.unknown_message(kind, name)) from None

    def unknown_message(self, kind: str, name: str) -> str:
        available = self.names(kind)
        listing = ", ".join(available) if available else "none are installed"
        return (
            f"unknown {kind} {name!r}; available {kind} components: {listing}. "
            f"Run `rlhfkit plugins {kind}` to see each one's settings."
        )

    def has(self, kind: str, name: str) -> bool:
        return (kind, name) in self._specs

    def names(self, kind: str) -> list[str]:
        return sorted(name for k, name in self._specs if k == kind)

    def specs(self, kind: str | None = None) -> list[ComponentSpec]:
        return sorted(
            (s for s in self._specs.values() if kind is None or s.kind == kind),
            key=lambda s: (KINDS.index(s.kind), s.name),
        )

    def resolve(self, reference: ComponentRef, path: str = "") -> list[tuple[str, str, str]]:
        """Validate ``reference`` and every reference nested in its settings.

        Returns ``(dotted path, message, hint)`` for each problem (empty when valid).
        """
        problems: list[tuple[str, str, str]] = []
        _resolve_tree(self, reference, path, problems)
        return problems

    def build(self, reference: ComponentRef | str, context: Any, kind: str | None = None) -> Any:
        """Build the component ``reference`` names, validating its settings first.

        A bare string needs ``kind``. Invalid settings raise :class:`UserError`.
        """
        if isinstance(reference, str):
            if kind is None:
                raise TypeError("build(name) needs kind=")
            reference = ref(kind)(name=reference)
        if reference._config is None:
            problems = self.resolve(reference, reference.kind)
            if problems:
                raise UserError("; ".join(f"{p}: {m}" + (f" ({h})" if h else "")
                                          for p, m, h in problems))
        spec = self.get(reference.kind, reference.name)
        return spec.factory(reference.config, context)

    def extend(self, specs: Iterable[ComponentSpec]) -> None:
        for spec in specs:
            self.add(spec)


# ----------------------------------------------------------------- references


class ComponentRef(BaseModel):
    """A reference to a registered component, as written in a recipe.

    Either a bare name (``policy: transformers``) or a mapping with ``name:`` and the
    component's settings (``policy: {name: transformers, dtype: bf16}``). Use
    :func:`ref` to make the type for one kind. The settings are validated against the
    component's own config model by :meth:`Registry.resolve` (the recipe does this for
    every reference it contains, nested ones too), after which :attr:`config` holds the
    validated model.
    """

    model_config = ConfigDict(extra="allow")
    kind: ClassVar[str] = ""
    name: str
    _config: BaseModel | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def config(self) -> BaseModel:
        if self._config is None:
            raise RuntimeError(f"{self.kind} {self.name!r} was not resolved against a registry")
        return self._config


_REF_TYPES: dict[str, type[ComponentRef]] = {}


def ref(kind: str) -> type[ComponentRef]:
    """The :class:`ComponentRef` type for components of ``kind`` (cached per kind)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    if kind not in _REF_TYPES:
        _REF_TYPES[kind] = type(f"{kind.title()}Ref", (ComponentRef,), {"kind": kind,
                                "__module__": __name__})
    return _REF_TYPES[kind]


def lazy(target: str) -> Any:
    """A ``ComponentSpec.factory`` that imports ``"package.module:Name"`` (``Name`` may be
    dotted, e.g. ``Class.load``) only when the component is first built, so listing and
    validating never import torch, and calls ``Name(config, context)``."""
    module, _, name = target.partition(":")

    def factory(config: Any, context: Any) -> Any:
        import importlib

        built: Any = importlib.import_module(module)
        for part in name.split("."):
            built = getattr(built, part)
        return built(config, context)

    factory.__qualname__ = f"lazy({target})"
    return factory


def walk(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every node of a config tree with its dotted path, parents first. A resolved
    :class:`ComponentRef` is followed into its validated config (checked after the ref
    itself was yielded, so a caller may resolve it on the way)."""
    yield path, value
    if isinstance(value, ComponentRef):
        children = [] if value._config is None else [(path, value._config)]
    elif isinstance(value, BaseModel):
        children = [(f"{path}.{n}" if path else n, getattr(value, n)) for n in type(value).model_fields]
    elif isinstance(value, (list, tuple)):
        children = [(f"{path}[{i}]", item) for i, item in enumerate(value)]
    elif isinstance(value, dict):
        children = [(f"{path}.{k}" if path else str(k), item) for k, item in value.items()]
    else:
        children = []
    for child_path, child in children:
        yield from walk(child, child_path)


def _resolve_tree(registry: Registry, value: Any, path: str, problems: list[tuple[str, str, str]]) -> None:
    """Validate every ComponentRef in ``value``, nested ones included."""
    for where, node in walk(value, path):
        if isinstance(node, ComponentRef) and node._config is None:
            _resolve_one(registry, node, where, problems)


def _resolve_one(registry: Registry, reference: ComponentRef, path: str,
                 problems: list[tuple[str, str, str]]) -> None:
    if not registry.has(reference.kind, reference.name):
        problems.append((f"{path}.name" if path else "name",
                         registry.unknown_message(reference.kind, reference.name), ""))
        return
    spec = registry.get(reference.kind, reference.name)
    try:
        reference._config = spec.config.model_validate(reference.settings)
    except ValidationError as exc:
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            where = ".".join(part for part in (path, loc) if part)
            problems.append((where, error_message(err), _hint(err, spec)))


def error_message(err: Any) -> str:
    """pydantic's message without its ``Value error, `` prefix."""
    return err["msg"].removeprefix("Value error, ")


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel]:
    """The (nested) config model that owns the field at ``loc``."""
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            break
        inner = [a for a in getattr(field.annotation, "__args__", (field.annotation,))
                 if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            break
        model = inner[0]
    return model


def _hint(err: Any, spec: ComponentSpec) -> str:
    if err["type"] == "extra_forbidden":
        owner = _model_at(spec.config, tuple(err["loc"][:-1]))
        fields = ", ".join(sorted(f.alias or n for n, f in owner.model_fields.items())) or "none"
        where = f"{spec.kind} {spec.name!r}" + (
            f" setting {'.'.join(map(str, err['loc'][:-1]))!r}" if len(err["loc"]) > 1 else "")
        return f"{where} takes: {fields}"
    if err["type"] == "missing":
        return "add this setting"
    return f"see `rlhfkit plugins {spec.kind}` for {spec.name!r}"
