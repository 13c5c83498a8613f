"""The component registry: ``(kind, name) -> ComponentSpec``.

Plugins contribute :class:`ComponentSpec` objects through the ``rlhfkit_components`` hook;
the registry is the only place recipes look names up, so a recipe can name registered
components and nothing else (no import paths).
"""

from __future__ import annotations

import difflib
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError, model_validator

from rlhfkit.errors import PluginError, UserError

#: The component kinds rlhfkit knows. A plugin may not invent new ones: the training
#: loop calls components of these kinds through the Protocols in ``rlhfkit.interfaces``.
KINDS: tuple[str, ...] = (
    "algorithm",
    "policy",
    "engine",
    "reward",
    "estimator",
    "constraint",
    "objective",
    "dataset",
    "task",
    "sampler",
)


#: What an algorithm may call on a component of each kind: the methods every component
#: of the kind has, and the optional capabilities a component declares it implements
#: (``ComponentSpec.provides``). A slot says which optional ones its algorithm calls
#: (``Slot.uses``); the signatures are in ``rlhfkit.interfaces`` and docs/writing-a-plugin.md.
CAPABILITIES: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "estimator": (frozenset({"estimate"}),
                  frozenset({"prepare", "critic_loss", "bind", "state_dict", "load_state_dict"})),
    "constraint": (frozenset(),
                   frozenset({"shape_rewards", "loss", "after_update", "bind", "state_dict", "load_state_dict"})),
    "reward": (frozenset({"score"}), frozenset({"to", "evaluate", "score_terms"})),
    "objective": (frozenset({"__call__"}), frozenset()),
    "engine": (frozenset({"generate"}), frozenset({"start", "sync", "close", "check"})),
    "sampler": (frozenset({"draw", "observe"}), frozenset({"bind", "state_dict", "load_state_dict"})),
}
#: Capabilities that change no result on their own: a slot that does not call them loses nothing.
NEUTRAL = frozenset({"bind", "state_dict", "load_state_dict", "to", "score_terms", "start", "sync", "close",
                     "check"})
#: What each capability does, in the words of an error message.
DOES = {"shape_rewards": "shapes rewards (shape_rewards)", "loss": "adds a loss term (loss)",
        "after_update": "acts after each update (after_update)", "prepare": "prepares rollouts (prepare)",
        "critic_loss": "trains a critic (critic_loss)", "evaluate": "evaluates responses (evaluate)"}


#: The kinds of rows datasets yield (the ``file`` dataset's schema names): what a data
#: slot says it takes (``Slot.rows``) and a dataset says it gives (``ComponentSpec.yields``).
ROW_KINDS: dict[str, str] = {
    "prompt-completion": "demonstrations (PromptCompletion)",
    "text": "plain text (PromptCompletion with an empty prompt)",
    "messages": "chat conversations (Conversation)",
    "preference": "preference pairs (Preference)",
    "unpaired": "unpaired labelled completions (Feedback)",
    "ranking": "K-wise rankings (Ranking)",
    "prompt": "prompts (Prompt)",
}
#: Row kinds that carry a prompt to sample from (every kind but plain text).
PROMPTED = frozenset(ROW_KINDS) - {"text"}


@dataclass(frozen=True)
class Slot:
    """A component slot of an algorithm: which kind goes in it and whether it is required.

    ``many=True`` slots take a list of components applied in recipe order (constraints).
    ``uses``: the optional capabilities (:data:`CAPABILITIES`) the algorithm calls on
    the components in this slot; ``None``: all of its kind's. A component that provides
    one the slot does not call (a reward-shaping constraint in a DPO stage) is a recipe
    error rather than silently ignored.
    """

    kind: str
    required: bool = True
    many: bool = False
    doc: str = ""
    # components that declare tags must carry this one to fill the slot (e.g. an
    # objective slot of the dpo algorithm takes "preference-loss" objectives); components
    # without tags are not checked
    tag: str = ""
    uses: frozenset[str] | None = None
    # dataset slots: the row kinds (ROW_KINDS) the algorithm takes here, or a function of the
    # algorithm's validated config, the stage's slots and the registry giving them (DPO
    # online: prompts; a pairs-only objective: no rankings)
    rows: frozenset[str] | Callable[[Any, dict[str, Any], Registry], frozenset[str]] | None = None

    def accepts(self, algorithm_config: Any, slots: dict[str, Any], registry: Registry) -> frozenset[str] | None:
        """The row kinds this slot takes, ``None`` when it does not say (or cannot yet)."""
        if callable(self.rows):
            return None if algorithm_config is None else self.rows(algorithm_config, slots, registry)
        return self.rows

    def ignored(self, spec: ComponentSpec) -> frozenset[str]:
        """The capabilities of ``spec`` this slot's algorithm would never call."""
        if self.uses is None:
            return frozenset()
        return frozenset(spec.capabilities() - self.uses - NEUTRAL - CAPABILITIES.get(spec.kind, (frozenset(),))[0])


def tagged(registry: Registry, reference: Any, tag: str) -> bool:
    """Whether the component ``reference`` names is registered with ``tag``."""
    return (reference is not None and registry.has(reference.kind, reference.name)
            and tag in registry.get(reference.kind, reference.name).tags)


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
        provides: the optional capabilities of its kind it implements (:data:`CAPABILITIES`:
            a constraint's ``shape_rewards``, ``loss``, ``after_update``...). Checked when
            the plugin loads (a name that is not a capability is refused, with the nearest
            one) and when the component is built (the object has each, and no
            undeclared capability method). Algorithms call exactly these
            (:func:`provides`), never what an object merely happens to have.
    """

    kind: str
    name: str
    config: type[BaseModel]
    factory: Callable[..., Any]
    doc: str
    slots: dict[str, Slot] = field(default_factory=dict)
    # what the component is for, within its kind (e.g. "preference-loss"); see Slot.tag
    tags: frozenset[str] = frozenset()
    provides: frozenset[str] = frozenset()
    # datasets: the row kinds (ROW_KINDS) it yields with these settings, None when unknown
    yields: Callable[[Any], frozenset[str] | None] | None = None
    # Filled in by the registry: which plugin (and distribution) contributed the spec.
    plugin: str = ""
    distribution: str = ""

    def where(self) -> str:
        return f"plugin {self.plugin!r}" + (
            f" (distribution {self.distribution})" if self.distribution else ""
        )

    def capabilities(self) -> frozenset[str]:
        """Required methods of its kind and the optional ones it provides."""
        return CAPABILITIES.get(self.kind, (frozenset(), frozenset()))[0] | frozenset(self.provides)

    def contract_problem(self) -> str:
        """Why the declaration breaks its kind's contract ('' when it does not)."""
        if self.kind not in CAPABILITIES:
            return "" if not self.provides else f"declares provides= but {self.kind} components have no optional capabilities"
        optional = CAPABILITIES[self.kind][1]
        for name in sorted(set(self.provides) - optional):
            near = difflib.get_close_matches(name, sorted(optional), n=1)
            return (f"declares provides={{{name!r}}}, which is not a capability of a {self.kind}"
                    + (f" (did you mean {near[0]!r}?)" if near else "")
                    + f"; {self.kind} capabilities: {', '.join(sorted(optional)) or 'none'}")
        if self.kind == "constraint" and not set(self.provides) & {"shape_rewards", "loss", "after_update"}:
            return ("declares none of shape_rewards, loss, after_update, so it would do nothing; declare what it "
                    "implements with provides=frozenset({...})")
        return ""


def object_problem(spec: ComponentSpec, component: Any) -> str:
    """Why a built ``component`` does not match its spec's declaration ('' when it does):
    a required or declared method missing, a capability method it has but does not
    declare, or a method whose name is a near miss of a capability (a misspelling)."""
    if spec.kind not in CAPABILITIES:
        return ""
    cls = type(component)
    defined = {n for n in dir(cls) if (not n.startswith("_") or n == "__call__") and callable(getattr(cls, n, None))}
    return methods_problem(spec, defined, complete=True)


def methods_problem(spec: ComponentSpec, defined: set[str], complete: bool) -> str:
    """:func:`object_problem` on the method names a class defines; with ``complete=False``
    (some base classes unknown) a method that seems missing may be inherited: not checked."""
    required, optional = CAPABILITIES[spec.kind]
    for name in sorted(required | set(spec.provides)):
        if complete and name not in defined:
            return f"has no method {name}(), which it {'must have' if name in required else 'declares'}"
    for name in sorted((defined & optional) - set(spec.provides)):
        return (f"defines {name}() without declaring it, so algorithms would never call it; add it to "
                f"provides=, or rename the method")
    for name in sorted(defined - optional - required):
        near = difflib.get_close_matches(name, sorted(optional | required), n=1, cutoff=0.85)
        if near:
            return f"defines {name}(), a near miss of the capability {near[0]!r}: rename it (and declare it)"
    return ""


def static_methods(target: str) -> tuple[set[str], bool] | None:
    """The method names the class ``"package.module:Class"`` defines, read from its source
    without importing it (so loading plugins imports no torch), with those of its bases in
    the same module; and whether every base was found (else some may be inherited).
    ``None`` when the source cannot be read."""
    import ast
    import importlib.util

    module, _, name = target.partition(":")
    if not name or "." in name:
        return None
    try:
        found = importlib.util.find_spec(module)
        origin = found.origin if found is not None else None
        tree = ast.parse(Path(origin).read_text(encoding="utf-8")) if origin and origin.endswith(".py") else None
    except (ImportError, OSError, SyntaxError, ValueError):
        return None
    if tree is None:
        return None
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    names: set[str] = set()
    complete = True
    todo, seen = [name], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        node = classes.get(current)
        if node is None:
            complete = False
            continue
        names |= {item.name for item in node.body if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
                  and (not item.name.startswith("_") or item.name == "__call__")}
        for base in node.bases:
            if isinstance(base, ast.Name) and base.id != "object":
                todo.append(base.id)
            elif not isinstance(base, ast.Name):
                complete = False
    return names, complete


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
        problem = spec.contract_problem()
        target = getattr(spec.factory, "target", None)
        if not problem and spec.kind in CAPABILITIES and isinstance(target, str):
            found = static_methods(target)  # a lazy("module:Class") factory: check the class's source
            if found is not None:
                problem = methods_problem(spec, *found)
        if problem:
            raise PluginError(f"{spec.where()}: {spec.kind} {spec.name!r} {problem}.")
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
        component = spec.factory(reference.config, context)
        problem = object_problem(spec, component)
        if problem:
            raise PluginError(f"{spec.where()}: {spec.kind} {spec.name!r} {problem}.")
        _declared(component, spec)
        return component

    def extend(self, specs: Iterable[ComponentSpec]) -> None:
        for spec in specs:
            self.add(spec)


# ----------------------------------------------------------------- capabilities

_PROVIDED: weakref.WeakKeyDictionary[Any, frozenset[str]] = weakref.WeakKeyDictionary()


def _declared(component: Any, spec: ComponentSpec) -> None:
    try:
        _PROVIDED[component] = spec.capabilities()
    except TypeError:  # not weak-referenceable (a function, a builtin): nothing optional to ask about
        pass


def provides(component: Any, capability: str) -> bool:
    """Whether ``component`` declared ``capability`` (``ComponentSpec.provides``): what an
    algorithm asks before calling an optional method. A component built without the
    registry (by hand, in a test) is asked about the methods it has."""
    if component is None:
        return False
    try:
        declared = _PROVIDED.get(component)
    except TypeError:
        declared = None
    if declared is not None:
        return capability in declared
    return callable(getattr(component, capability, None))


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
    factory.target = target  # type: ignore[attr-defined]  # read by the registry's contract check
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
