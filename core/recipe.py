"""Recipes: YAML (``safe_load``) validated by pydantic in two stages.

Stage 1 checks the layout (``run:``, ``stages:``, each stage's ``algorithm:`` and
``trainer:``). Stage 2 looks every component up in the registry and validates its
settings against the component's own config model, nested references included. Every
problem is collected and reported at once with its file, dotted path and a fix hint.

Composition: ``extends:`` lists recipe files (relative to the recipe) and presets
(``preset:NAME``) that are deep-merged first, in order, the recipe's own keys last;
mappings merge, anything else (lists included) is replaced. ``key.path=value``
overrides from the command line are applied last (values parsed as YAML).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import core_schema

from rlhfkit.errors import Problem, RecipeError, UserError
from rlhfkit.registry import ComponentRef, Registry, error_message, ref, walk

COMMAND_LINE = "command line"


class StageRef(str):
    """A config value naming an earlier stage of the same recipe (e.g. ``from_stage``).

    The recipe checks that it names a stage listed before the one that uses it.
    """

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(cls, core_schema.str_schema())


# ----------------------------------------------------------------- the layout


class RunSection(BaseModel):
    """Where the run lives and how it is seeded."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="run name; the run directory defaults to runs/<name>")
    dir: str | None = Field(None, description="run directory (relative to the working directory)")
    seed: int = Field(0, description="base seed; rank r uses seed + 100003 * r (OpenAI detail)")


class OptimizerSettings(BaseModel):
    """AdamW with linear warmup and cosine decay: the settings every training algorithm
    shares (subclass it, or nest it for a second model such as a critic)."""

    model_config = ConfigDict(extra="forbid")
    lr: float = Field(1e-4, gt=0, description="peak learning rate (AdamW)")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas (InstructGPT, DeepSpeed-Chat, MOSS)")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon (MOSS-RLHF uses 1e-6)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(10, ge=0, description="linear warmup steps")
    final_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decay ends at this fraction of lr "
                                                                "(InstructGPT: 10 %)")


class SamplingSettings(BaseModel):
    """How a policy samples responses (PPO rollouts, online DPO); log-probs are taken on
    ``logits / temperature`` with the same temperature."""

    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int = Field(32, ge=1, description="response length limit (tokens, EOS included)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature; log-probs use logits / temperature")
    top_k: int = Field(0, ge=0, description="0 keeps every token")
    top_p: float = Field(1.0, gt=0, le=1, description="1.0 keeps every token")


class TrainerSection(BaseModel):
    """How Lightning runs a stage, and the batch every algorithm optimises on.

    ``batch_size`` is global: rows per optimizer step across all devices. Each device
    runs forwards of ``micro_batch_size`` rows and accumulates
    ``batch_size / (micro_batch_size * devices * num_nodes)`` of them per step.
    """

    model_config = ConfigDict(extra="forbid")
    accelerator: str = Field("cpu", description="cpu | gpu | auto (Lightning accelerator)")
    devices: int = Field(1, ge=1, description="devices per node")
    num_nodes: int = Field(1, ge=1, description="number of nodes")
    strategy: str = Field("auto", description="auto | ddp | fsdp | deepspeed_stage_2 | ... (Lightning strategy)")
    precision: str = Field("32-true", description="32-true | bf16-mixed | bf16-true | 16-mixed")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides max_epochs")
    max_epochs: float | None = Field(None, gt=0, description="passes over the training rows (may be fractional)")
    batch_size: int = Field(32, ge=1, description="global rows per optimizer step")
    micro_batch_size: int = Field(8, ge=1, description="rows per device per forward")
    gradient_clip: float | None = Field(1.0, gt=0, description="clip the global grad norm to this (None: off)")
    log_every_n_steps: int = Field(10, ge=1, description="write a metrics row every n steps")
    checkpoint_every_n_steps: int = Field(50, ge=1, description="write the resumable checkpoint every n steps")
    eval_every_n_steps: int | None = Field(None, ge=1, description="evaluate every n steps (None: start and end only)")
    deterministic: bool = Field(True, description="torch deterministic algorithms (exact resume on CPU)")

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainerSection:
        per_step = self.micro_batch_size * self.devices * self.num_nodes
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of micro_batch_size x devices x "
                f"num_nodes = {per_step}; pick batch_size = k * {per_step}"
            )
        return self

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes

    @property
    def accumulation(self) -> int:
        return self.batch_size // (self.micro_batch_size * self.world_size)

    def explain_batch(self) -> str:
        return (f"global batch {self.batch_size} = {self.micro_batch_size} rows per micro-batch x "
                f"{self.accumulation} accumulated x {self.world_size} device(s)")


class _StageShell(BaseModel):
    model_config = ConfigDict(extra="allow")
    algorithm: ref("algorithm")  # type: ignore[valid-type]
    trainer: TrainerSection = Field(default_factory=TrainerSection)


class _RecipeShell(BaseModel):
    model_config = ConfigDict(extra="forbid")
    extends: list[str] = Field(default_factory=list)
    run: RunSection
    stages: dict[str, _StageShell] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _extends_as_list(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("extends"), str):
            data = {**data, "extends": [data["extends"]]}
        return data


# -------------------------------------------------------------- the result


@dataclass
class Stage:
    """One validated stage: its algorithm, filled slots and trainer settings."""

    name: str
    algorithm: ComponentRef
    slots: dict[str, ComponentRef | list[ComponentRef] | None]
    trainer: TrainerSection
    raw: dict[str, Any]

    def fingerprint(self) -> str:
        """Hash of the stage's settings: a finished stage is re-run only if it changed."""
        text = json.dumps(self.raw, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Recipe:
    """A validated recipe; ``data`` is the fully resolved mapping written to the run."""

    path: Path
    run: RunSection
    stages: list[Stage]
    data: dict[str, Any]

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) if self.run.dir else Path("runs") / self.run.name

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.data, sort_keys=False)


# ------------------------------------------------------------------ loading


def load_recipe(path: str | Path, registry: Registry, presets: dict[str, dict] | None = None,
                overrides: list[str] = (), check: Any = None) -> Recipe:
    """Read, compose, override and validate a recipe; raise :class:`RecipeError` listing
    every problem. ``check(recipe)`` returns the plugins' cross-component problems
    (:meth:`rlhfkit.Plugins.check_recipe`)."""
    path = Path(path)
    data, origins = compose(path, presets or {})
    problems: list[Problem] = []
    for item in overrides:
        try:
            apply_override(data, item)
            origins[item.split("=", 1)[0]] = COMMAND_LINE
        except UserError as exc:
            problems.append(Problem(COMMAND_LINE, item.split("=", 1)[0], str(exc)))
    if problems:
        raise RecipeError(problems)
    return checked(data, path, registry, origins, check)


def checked(data: dict[str, Any], path: Path, registry: Registry, origins: dict[str, str],
            check: Any = None) -> Recipe:
    """Validate composed ``data`` (:func:`validate`), then run the plugins' ``check``."""
    recipe = validate(data, path, registry, origins)
    if check is not None:
        extra = check(recipe)
        if extra:
            raise RecipeError(extra)
    return recipe


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"recipe file {path} does not exist; check the path (recipes live in recipes/).")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)}); "
                        f"check indentation and quoting there.") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe is a mapping (run:, stages:, ...), not a {type(data).__name__}.")
    return data


def compose(path: Path, presets: dict[str, dict], _seen: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """Resolve ``extends:`` recursively; return the merged data and ``{dotted path: file}``."""
    key = str(path.resolve())
    if key in _seen:
        chain = " -> ".join([*_seen, key])
        raise UserError(f"recipes extend each other in a cycle: {chain}; remove one `extends:`.")
    data = read_yaml(path)
    parents = data.pop("extends", [])
    parents = [parents] if isinstance(parents, str) else parents
    if not isinstance(parents, list):
        raise UserError(f"{path}: extends must be a file name, preset:NAME, or a list of them.")
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for parent in parents:
        layer, layer_origins = compose_parent(str(parent), path, presets, (*_seen, key))
        merged = deep_merge(merged, layer)
        origins.update(layer_origins)
    merged = deep_merge(merged, data)
    origins.update(_origins_of(data, str(path)))
    return merged, origins


def compose_parent(parent: str, path: Path, presets: dict[str, dict], _seen: tuple[str, ...] = ()
                   ) -> tuple[dict, dict]:
    """One entry of ``path``'s ``extends:``: ``preset:NAME`` or a recipe file relative to
    ``path``; its data and ``{dotted path: origin}``."""
    if parent.startswith("preset:"):
        name = parent[len("preset:"):]
        if name not in presets:
            known = ", ".join(sorted(presets)) or "none installed"
            raise UserError(f"{path}: extends unknown preset {name!r}; presets: {known}.")
        return presets[name], _origins_of(presets[name], f"preset:{name}")
    return compose(path.parent / parent, presets, _seen)


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML; list items by index: ``a.0.b=1``)."""
    if "=" not in item:
        raise UserError(f"override {item!r} is not key.path=value")
    dotted, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise UserError(f"value {text!r} is not valid YAML; quote it") from None
    set_value(data, dotted, value)


def set_value(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``dotted = "a.b.c"``, creating mappings on the way
    (list items by index: ``a.0.b``). ``stages.NAME = None`` later removes that stage."""
    keys = dotted.split(".")
    node: Any = data
    for i, k in enumerate(keys[:-1]):
        if isinstance(node, list):
            index = _index(node, k, keys[: i + 1])
            if isinstance(node[index], str):  # a component by bare name: keep the name
                node[index] = {"name": node[index]}
            node = node[index]
        else:
            if isinstance(node.get(k), str):  # `objective: ppo-clip` + `objective.x=1` -> {name: ppo-clip, x: 1}
                node[k] = {"name": node[k]}
            elif not isinstance(node.get(k), (dict, list)):
                node[k] = {}
            node = node[k]
    last = keys[-1]
    if isinstance(node, list):
        node[_index(node, last, keys)] = value
    else:
        node[last] = value


def _index(node: list, key: str, keys: list[str]) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise UserError(f"{'.'.join(keys)}: {key!r} is not an index of a list of {len(node)}")
    return int(key)


def _origins_of(data: Any, origin: str, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            out[path] = origin
            out.update(_origins_of(v, origin, path))
    return out


def _file_of(origins: dict[str, str], dotted: str, default: str) -> str:
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        hit = origins.get(".".join(parts[:n]))
        if hit:
            return hit
    return default


# --------------------------------------------------------------- validation


def validate(data: dict[str, Any], path: Path, registry: Registry,
             origins: dict[str, str] | None = None) -> Recipe:
    origins = origins or {}
    problems: list[Problem] = []

    def add(dotted: str, message: str, hint: str = "") -> None:
        problems.append(Problem(_file_of(origins, dotted, str(path)), dotted, message, hint))

    if isinstance(data.get("stages"), dict):  # `stages.NAME: null` removes an inherited stage
        data["stages"] = {name: stage for name, stage in data["stages"].items() if stage is not None}
    try:
        shell = _RecipeShell.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            dotted = ".".join(str(p) for p in err["loc"])
            add(dotted, error_message(err), _layout_hint(err))
        raise RecipeError(problems) from None

    stages: list[Stage] = []
    for index, (name, shell_stage) in enumerate(shell.stages.items()):
        prefix = f"stages.{name}"
        algorithm = shell_stage.algorithm
        for p, m, h in registry.resolve(algorithm, f"{prefix}.algorithm"):
            add(p, m, h)
        slots: dict[str, Any] = {}
        if registry.has("algorithm", algorithm.name):  # check slots even if its settings are bad
            spec = registry.get("algorithm", algorithm.name)
            given = dict(shell_stage.model_extra or {})
            for key in given:
                if key not in spec.slots:
                    known = ", ".join([*spec.slots, "trainer"]) or "none"
                    add(f"{prefix}.{key}", f"algorithm {algorithm.name!r} has no slot {key!r}",
                        f"its slots are: {known}")
            for slot_name, slot in spec.slots.items():
                slots[slot_name] = _slot(registry, slot, slot_name, given.get(slot_name),
                                         f"{prefix}.{slot_name}", add)
        stage = Stage(name, algorithm, slots, shell_stage.trainer, data["stages"][name])
        earlier = list(shell.stages)[:index]
        for dotted, value in _stage_refs(stage):
            if value not in earlier:
                add(f"{prefix}.{dotted}", f"names stage {value!r}, which is not an earlier stage",
                    f"earlier stages: {', '.join(earlier) or 'none'}")
        stages.append(stage)
    _same_processes_after_launch(stages, add)
    if problems:
        raise RecipeError(problems)
    return Recipe(path=path, run=shell.run, stages=stages, data=data)


def _same_processes_after_launch(stages: list[Stage], add: Any) -> None:
    """The first stage on several devices launches the run's processes, and they stay for
    every later stage: a later stage must use as many (earlier ones may use one)."""
    launched: Stage | None = None
    for stage in stages:
        if launched is None:
            launched = stage if stage.trainer.world_size > 1 else None
        elif stage.trainer.world_size != launched.trainer.world_size:
            n = launched.trainer.world_size
            add(f"stages.{stage.name}.trainer",
                f"runs on {stage.trainer.world_size} device(s) after stage {launched.name!r} launched {n} processes; "
                f"every stage after the first multi-device one runs in those {n} processes",
                f"set devices (and num_nodes) of stage {stage.name!r} to match ({n} in all), an evaluation "
                f"stage too; stages before {launched.name!r} may use one device")


def _slot(registry: Registry, slot: Any, slot_name: str, value: Any, dotted: str, add: Any) -> Any:
    if value is None:
        if slot.required:
            add(dotted, f"slot {slot_name!r} ({slot.kind}) is required",
                f"set it to one of: {', '.join(registry.names(slot.kind)) or 'none installed'}")
        return [] if slot.many else None
    items = value if slot.many else [value]
    if slot.many and not isinstance(value, list):
        add(dotted, f"slot {slot_name!r} takes a list of {slot.kind} components", "write it as a YAML list")
        return []
    built: list[ComponentRef] = []
    for i, item in enumerate(items):
        where = f"{dotted}[{i}]" if slot.many else dotted
        try:
            reference = ref(slot.kind).model_validate(item)
        except ValidationError:
            add(where, f"expected a {slot.kind} name or a mapping with `name:`",
                f"e.g. {slot_name}: {{name: {next(iter(registry.names(slot.kind)), 'NAME')}}}")
            continue
        for p, m, h in registry.resolve(reference, where):
            add(p, m, h)
        built.append(reference)
    return built if slot.many else (built[0] if built else None)


def _stage_refs(stage: Stage) -> list[tuple[str, str]]:
    nodes = [*walk(stage.algorithm, "algorithm"), *(n for slot, v in stage.slots.items() for n in walk(v, slot))]
    return [(path, str(value)) for path, value in nodes if isinstance(value, StageRef)]


def _layout_hint(err: Any) -> str:
    loc = [str(p) for p in err["loc"]]
    if err["type"] == "extra_forbidden":
        return "a recipe has run:, stages: and optionally extends:" if len(loc) == 1 else \
            f"allowed here: {', '.join(TrainerSection.model_fields)}" if "trainer" in loc else ""
    if err["type"] == "missing":
        return "add it" + (" (e.g. run: {name: my-run})" if loc == ["run"] else "")
    return ""


def recipe_schema(registry: Registry) -> dict[str, Any]:
    """JSON Schema of recipes for editors: the layout plus every component's settings."""

    def choice(kind: str) -> dict[str, Any]:
        options: list[dict[str, Any]] = [{"type": "string", "enum": registry.names(kind)}]
        for spec in registry.specs(kind):
            schema = spec.config.model_json_schema()
            schema.setdefault("properties", {})["name"] = {"const": spec.name}
            schema["required"] = ["name", *schema.get("required", [])]
            schema["title"] = f"{kind} {spec.name}"
            schema["description"] = spec.doc
            options.append(schema)
        return {"anyOf": options}

    slot_props: dict[str, Any] = {}
    for spec in registry.specs("algorithm"):
        for slot_name, slot in spec.slots.items():
            item = choice(slot.kind)
            slot_props[slot_name] = {"type": "array", "items": item} if slot.many else item
    stage = {"type": "object", "required": ["algorithm"],
             "properties": {"algorithm": choice("algorithm"),
                            "trainer": TrainerSection.model_json_schema(), **slot_props}}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "rlhfkit recipe",
        "type": "object",
        "required": ["run", "stages"],
        "properties": {
            "extends": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
            "run": RunSection.model_json_schema(),
            "stages": {"type": "object", "additionalProperties": stage},
        },
    }

