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

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import core_schema

from rlhfkit.errors import Problem, RecipeError, UserError
from rlhfkit.files import decode_utf8, non_unicode_path
from rlhfkit.registry import DOES, PROMPTED, ROW_KINDS, ComponentRef, Registry, Slot, error_message, ref, walk
from rlhfkit.trackers import Tracker, TrackerList

COMMAND_LINE = "command line"
# a stage or run name becomes a folder name: no separators, no "..", no hidden folders
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")
# numpy seeds are < 2**32; rank r adds 100003 * r and an ablation adds up to its seed count
MAX_SEED = 2**31 - 1
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "tpu", "auto")
STRATEGIES = ("auto", "single_device", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook",
              "ddp_find_unused_parameters_true", "ddp_find_unused_parameters_false",
              "ddp_spawn_find_unused_parameters_true", "ddp_spawn_find_unused_parameters_false",
              "fsdp", "fsdp_cpu_offload", "deepspeed", "deepspeed_stage_1", "deepspeed_stage_2",
              "deepspeed_stage_2_offload", "deepspeed_stage_3", "deepspeed_stage_3_offload",
              "deepspeed_stage_3_offload_nvme", "model_parallel")
PRECISIONS = ("32-true", "32", "64-true", "64", "16-mixed", "16", "bf16-mixed", "bf16", "16-true", "bf16-true",
              "transformer-engine", "transformer-engine-float16")


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
    dir: str | None = Field(None, min_length=1, description="run directory (relative to the working directory)")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="base seed; rank r uses seed + 100003 * r (OpenAI detail)")
    ablation: str | None = Field(None, max_length=200, description=(
        "the ablation this run belongs to (rlhfkit ablate sets it); trackers group its runs under it"))
    variant: str | None = Field(None, max_length=200, description=(
        "the ablation variant this run is (rlhfkit ablate sets it); trackers and the metrics hook are told it"))
    tracker_dir: str | None = Field(None, min_length=1, description=(
        "where trackers keep local files (TensorBoard events, the MLflow file store); default: the run directory. "
        "rlhfkit ablate sets it to the ablation's directory, so all its runs land in one store"))

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not _SAFE_NAME.match(value) or set(value) <= {"."}:
            raise ValueError(f"run name {value!r} is not a plain folder name (letters, digits, '_', '-', '.'; "
                             f"no path separators, no '..'); use run.dir for a path")
        return value


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
    max_steps: int | None = Field(None, ge=1, le=10**9, description="optimizer steps; overrides max_epochs")
    max_epochs: float | None = Field(None, gt=0, le=10**6,
                                     description="passes over the training rows (may be fractional)")
    batch_size: int = Field(32, ge=1, description="global rows per optimizer step")
    micro_batch_size: int = Field(8, ge=1, description="rows per device per forward")
    gradient_clip: float | None = Field(1.0, gt=0, description="clip the global grad norm to this (None: off)")
    log_every_n_steps: int = Field(10, ge=1, description="write a metrics row every n steps")
    checkpoint_every_n_steps: int = Field(50, ge=1, description="write the resumable checkpoint every n steps")
    keep_checkpoints: int = Field(2, ge=1, le=1000, description=(
        "checkpoints kept (newest first); a newest one that does not load falls back to the one before"))
    on_nan: Literal["stop", "skip"] = Field("stop", description=(
        "a NaN/Inf loss or gradient norm stops the stage before the update (the last checkpoint is intact), "
        "or skips that update"))
    eval_every_n_steps: int | None = Field(None, ge=1, description="evaluate every n steps (None: start and end only)")
    console_metrics: list[str] | None = Field(None, description=(
        "metrics shown on the console lines and progress bar, in order (default: the algorithm's headline "
        "metrics)"))
    deterministic: bool = Field(True, description="torch deterministic algorithms (exact resume on CPU)")
    loggers: list[Tracker] = Field(default_factory=list, description=(  # type: ignore[valid-type]
        "experiment trackers besides metrics.csv (always written): tensorboard, wandb, mlflow, each a name or "
        "{name: ..., settings}; needs pip install 'rlhfkit[trackers]'. See docs/trackers.md"))

    @field_validator("loggers")
    @classmethod
    def _trackers_installed(cls, value: list[Any]) -> list[Any]:
        TrackerList(trackers=value)
        return value

    @field_validator("accelerator", "strategy", "precision")
    @classmethod
    def _known_name(cls, value: str, info: Any) -> str:
        known = {"accelerator": ACCELERATORS, "strategy": STRATEGIES, "precision": PRECISIONS}[info.field_name]
        if value not in known:
            raise ValueError(f"unknown {info.field_name} {value!r}; one of: {', '.join(known)}")
        return value

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainerSection:
        world = self.devices * self.num_nodes
        per_step = self.micro_batch_size * world
        if self.batch_size % per_step:
            per_device = self.batch_size // world if self.batch_size % world == 0 else 0
            fits = max((m for m in range(1, min(self.micro_batch_size, per_device) + 1) if per_device % m == 0),
                       default=0)
            micro = (f", or keep batch_size and set micro_batch_size: {fits} (it divides the {per_device} rows "
                     f"each of the {world} device(s) takes per step)") if fits else ""
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of micro_batch_size x devices x "
                f"num_nodes = {per_step}; pick batch_size = k * {per_step}{micro}"
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
        """Hash of the stage's settings: a finished stage is re-run only if it changed.
        What only observes the run (trackers, console columns) is left out, so adding a
        tracker to a finished or interrupted run neither re-runs nor blocks a stage."""
        raw = dict(self.raw)
        if isinstance(raw.get("trainer"), dict):
            raw["trainer"] = {k: v for k, v in raw["trainer"].items() if k not in OBSERVERS}
        text = json.dumps(raw, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


#: trainer settings that only observe a stage, left out of its fingerprint
OBSERVERS = ("loggers", "console_metrics")


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
        dotted = item.split("=", 1)[0]
        try:
            value = apply_override(data, item)
        except UserError as exc:
            problems.append(Problem(COMMAND_LINE, dotted, str(exc)))
            continue
        # whatever the override replaced no longer comes from a file
        for known in [k for k in origins if k == dotted or k.startswith(dotted + ".")]:
            del origins[known]
        origins[dotted] = COMMAND_LINE
        origins.update(_origins_of(value, COMMAND_LINE, dotted))
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
            # a plugin names the recipe file; the key may come from a file it extends or the command line
            raise RecipeError([dataclasses.replace(p, file=_file_of(origins, p.path, p.file))
                               if p.file == str(path) and p.path else p for p in extra])
    return recipe


MAX_RECIPE_BYTES = 1 << 20   # a recipe is a page of YAML; 1 MiB is far beyond any real one
MAX_YAML_VALUES = 100_000    # values after expanding aliases (a "billion laughs" stops here)
MAX_YAML_DEPTH = 64          # nesting levels


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys and integers too long to convert,
    with the line of the offending node (the bounds on size, depth and alias expansion are
    checked on the composed document by :func:`parse_yaml`)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, "a mapping key must be a plain value", key_node.start_mark) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key].line + 1}); keep one",
                    key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError as exc:
            raise yaml.constructor.ConstructorError(None, None, f"an unusable integer ({exc})",
                                                    node.start_mark) from None


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)


def _expanded_size(node: yaml.Node, memo: dict[int, int], depth: int = 0) -> int:
    """Values in ``node`` once every alias is expanded (memoised, so the check itself
    stays cheap however much the aliases would expand)."""
    if depth > MAX_YAML_DEPTH:
        raise _YamlBound(f"it is nested more than {MAX_YAML_DEPTH} levels deep", node.start_mark)
    if id(node) in memo:
        return memo[id(node)]
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, memo, depth + 1) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo, depth + 1) + _expanded_size(v, memo, depth + 1)
                       for k, v in node.value)
    else:
        size = 1
    if size > MAX_YAML_VALUES:
        raise _YamlBound(f"it expands to more than {MAX_YAML_VALUES} values (anchors and aliases "
                         f"repeated inside each other?)", node.start_mark)
    memo[id(node)] = size
    return size


class _YamlBound(Exception):
    def __init__(self, message: str, mark: Any):
        super().__init__(message)
        self.mark = mark


def parse_yaml(text: str, source: str) -> Any:
    """``text`` as YAML (safe types only), bounded: at most :data:`MAX_YAML_VALUES` values
    after expanding aliases and :data:`MAX_YAML_DEPTH` levels; duplicate keys, strings
    that are not valid Unicode (lone surrogates) and unconvertible integers are errors.
    Raises :class:`UserError` naming ``source`` and the line."""
    loader = None
    try:
        loader = _BoundedLoader(text)  # the reader already refuses some characters
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {})
        data = loader.construct_document(node)
    except _YamlBound as exc:
        raise UserError(f"{source}{_at(exc.mark)}: not accepted as a recipe: {exc}.") from None
    except RecursionError:
        raise UserError(f"{source}: not accepted as a recipe: it is nested more than {MAX_YAML_DEPTH} "
                        f"levels deep.") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = _at(mark) if mark else (f" at character {exc.position}" if hasattr(exc, "position") else "")
        raise UserError(f"{source}{where}: not valid YAML ({getattr(exc, 'problem', None) or exc}); "
                        f"check indentation and quoting there.") from None
    finally:
        if loader is not None:
            loader.dispose()
    bad = non_unicode_path(data)
    if bad is not None:
        raise UserError(f"{source}: the value at {bad or 'the top'} is not valid Unicode (a lone surrogate "
                        f"escape such as \\ud800?); write the character itself.")
    return data


def _at(mark: Any) -> str:
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def read_text_file(path: Path, what: str, limit: int) -> str:
    """A UTF-8 text file (a byte-order mark is accepted) as a string; every way it can
    fail to be one is a :class:`UserError` naming the file, and the line where decoding
    fails."""
    try:
        if path.is_symlink() and not path.exists():
            raise UserError(f"{what} {path} is a broken or looping symbolic link; point it at the file.")
        if not path.is_file():
            raise UserError(f"{what} {path} does not exist or is not a file; check the path.")
        size = path.stat().st_size
        if size > limit:
            raise UserError(f"{what} {path} has {size} bytes; more than the {limit} a {what} may have.")
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{what} {path} cannot be read ({exc.strerror or exc}).") from None
    return decode_utf8(raw, str(path))


def read_yaml(path: Path) -> dict[str, Any]:
    data = parse_yaml(read_text_file(path, "recipe file", MAX_RECIPE_BYTES), str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe is a mapping (run:, stages:, ...), not a {type(data).__name__}.")
    return data


def compose(path: Path, presets: dict[str, dict], _seen: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """Resolve ``extends:`` recursively; return the merged data and ``{dotted path: file}``."""
    try:
        key = str(path.resolve())
    except (OSError, RuntimeError):  # a symbolic-link loop
        raise UserError(f"recipe file {path} is a looping symbolic link; point it at the file.") from None
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
    for i, parent in enumerate(parents):
        if not isinstance(parent, str) or not parent:
            raise UserError(f"{path}: extends[{i}] is {parent!r}; write a recipe file name, preset:NAME or "
                            f"builtin:NAME.")
        try:
            layer, layer_origins = compose_parent(parent, path, presets, (*_seen, key))
        except UserError as exc:
            if str(exc).startswith(str(path)):
                raise
            raise UserError(f"{path}: extends[{i}] ({parent}): {exc}") from None
        merge_origins(origins, merged, layer, layer_origins)
        merged = deep_merge(merged, layer)
    merge_origins(origins, merged, data, _origins_of(data, str(path)))
    merged = deep_merge(merged, data)
    return merged, origins


def merge_origins(origins: dict[str, str], base: dict[str, Any], layer: dict[str, Any],
                  layer_origins: dict[str, str]) -> None:
    """Origins once ``layer`` is deep-merged on top of ``base``: where the layer replaces a
    subtree whole (:func:`replaces`), the origins below it go too."""
    for dotted in layer_origins:
        if replaces(_get(base, dotted), _get(layer, dotted), dotted):
            for known in [k for k in origins if k.startswith(dotted + ".")]:
                del origins[known]
    origins.update(layer_origins)


def _get(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, dict):
            return None
        data = next((v for k, v in data.items() if str(k) == part), None)
    return data


def compose_parent(parent: str, path: Path, presets: dict[str, dict], _seen: tuple[str, ...] = ()
                   ) -> tuple[dict, dict]:
    """One entry of ``path``'s ``extends:``: ``preset:NAME``, ``builtin:NAME`` (a recipe
    shipped with the package) or a recipe file relative to ``path``; its data and
    ``{dotted path: origin}``."""
    if parent.startswith("builtin:"):  # a recipe shipped with the package
        from rlhfkit.shipped import shipped_recipe

        return compose(shipped_recipe(parent[len("builtin:"):]), presets, _seen)
    if parent.startswith("preset:"):
        name = parent[len("preset:"):]
        if name not in presets:
            known = ", ".join(sorted(presets)) or "none installed"
            raise UserError(f"{path}: extends unknown preset {name!r}; presets: {known}.")
        return presets[name], _origins_of(presets[name], f"preset:{name}")
    return compose(path.parent / parent, presets, _seen)


def replaces(base: Any, top: Any, dotted: str = "") -> bool:
    """Whether ``top`` replaces ``base`` whole when merged onto it at ``dotted``: unless
    both are mappings; and inside a stage (``stages.NAME.…``, where mappings with a
    ``name:`` are components), unless they name the same component. A component of
    another name starts from its own defaults rather than inheriting the old one's
    settings."""
    if not (isinstance(base, dict) and isinstance(top, dict)):
        return not (isinstance(base, str) and isinstance(top, dict) and "name" not in top)
    inside_stage = dotted.startswith("stages.") and dotted.count(".") >= 2
    return inside_stage and "name" in base and "name" in top and base["name"] != top["name"]


def deep_merge(base: dict[str, Any], top: dict[str, Any], _at: str = "") -> dict[str, Any]:
    """``top`` merged onto ``base``: mappings merge key by key; anything else, and inside
    a stage a component mapping with another ``name:``, replaces (:func:`replaces`).
    Settings without a name onto a component given by bare name keep that name
    (``objective: dpo`` then ``objective: {beta: 0.2}`` is ``{name: dpo, beta: 0.2}``)."""
    out = dict(base)
    for k, v in top.items():
        dotted = f"{_at}.{k}" if _at else str(k)
        old = out.get(k)
        if k not in out or replaces(old, v, dotted):
            out[k] = v
        elif isinstance(old, str):
            out[k] = {"name": old, **v}
        else:
            out[k] = deep_merge(old, v, dotted)
    return out


def apply_override(data: dict[str, Any], item: str) -> Any:
    """Apply ``a.b.c=value`` (value parsed as YAML, bounded as recipes are; list items by
    index: ``a.0.b=1``); returns the value."""
    if "=" not in item:
        raise UserError(f"override {item!r} is not key.path=value")
    dotted, text = item.split("=", 1)
    if not dotted or any(not part for part in dotted.split(".")):
        raise UserError(f"override {item!r} has an empty key; write key.path=value")
    if non_unicode_path(item) is not None:
        raise UserError("the override is not valid Unicode (bytes that are not UTF-8?)")
    if len(text) > MAX_RECIPE_BYTES:
        raise UserError(f"the value has more than {MAX_RECIPE_BYTES} characters")
    try:
        value = parse_yaml(text, "value")
    except UserError as exc:
        raise UserError(f"{exc} Quote the value if it is meant as text.") from None
    set_value(data, dotted, value)
    return value


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
        if last == "name" and len(keys) >= 4 and keys[0] == "stages" and node.get("name") not in (None, value):
            node.clear()  # another component: its own defaults, not the old one's settings
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

    def add_errors(exc: ValidationError, prefix: tuple[str, ...]) -> None:
        for err in exc.errors():
            loc = (*prefix, *(str(p) for p in err["loc"]))
            add(".".join(loc), error_message(err), _layout_hint({**err, "loc": loc}))

    # every part is checked on its own, so one broken field hides no other problem
    for key in data:
        if key not in ("run", "stages", "extends", "trainer"):
            add(str(key), "unknown top-level key", "a recipe has run:, stages: and optionally trainer: and extends:")
    shared = _run_wide_trainer(data, origins, add)
    run: RunSection | None = None
    if "run" not in data:
        add("run", "Field required", _layout_hint({"type": "missing", "loc": ["run"]}))
    else:
        try:
            run = RunSection.model_validate(data["run"])
        except ValidationError as exc:
            add_errors(exc, ("run",))
    raw_stages = data.get("stages")
    if not isinstance(raw_stages, dict) or not raw_stages:
        add("stages", "a recipe needs at least one stage", "stages: {NAME: {algorithm: ..., ...}, ...}")
        raw_stages = {}

    stages: list[Stage] = []
    for index, (name, raw_stage) in enumerate(raw_stages.items()):
        prefix = f"stages.{name}"
        problem = stage_name_problem(name)
        if problem:
            add(prefix, problem, "stage names are folder names inside the run directory: letters, digits, "
                                 "'_', '-' and '.', e.g. sft, rm, ppo-2")
        if not isinstance(raw_stage, dict):
            add(prefix, f"a stage is a mapping (algorithm:, trainer:, its slots), not a {type(raw_stage).__name__}")
            continue
        if shared:  # the run-wide trainer: settings the stage does not set itself
            own = raw_stage.get("trainer") if isinstance(raw_stage.get("trainer"), dict) else {}
            raw_stage["trainer"] = {**shared, **own}
            for key in shared:
                if key not in own and f"trainer.{key}" in origins:
                    origins[f"{prefix}.trainer.{key}"] = origins[f"trainer.{key}"]
        trainer = TrainerSection()
        try:
            trainer = TrainerSection.model_validate(raw_stage.get("trainer") or {})
        except ValidationError as exc:
            add_errors(exc, ("stages", str(name), "trainer"))
        if "algorithm" not in raw_stage:
            add(f"{prefix}.algorithm", "Field required",
                f"add it: algorithm: one of {', '.join(registry.names('algorithm')) or 'none installed'}")
            continue
        try:
            algorithm = ref("algorithm").model_validate(raw_stage["algorithm"])
        except ValidationError:
            add(f"{prefix}.algorithm", "expected an algorithm name or a mapping with `name:`",
                f"one of: {', '.join(registry.names('algorithm')) or 'none installed'}")
            continue
        for p, m, h in registry.resolve(algorithm, f"{prefix}.algorithm"):
            add(p, m, h)
        slots: dict[str, Any] = {}
        if registry.has("algorithm", algorithm.name):  # check slots even if its settings are bad
            spec = registry.get("algorithm", algorithm.name)
            given = {k: v for k, v in raw_stage.items() if k not in ("algorithm", "trainer")}
            for key in given:
                if key not in spec.slots:
                    known = ", ".join([*spec.slots, "trainer"]) or "none"
                    add(f"{prefix}.{key}", f"algorithm {algorithm.name!r} has no slot {key!r}",
                        f"its slots are: {known}")
            for slot_name, slot in spec.slots.items():
                slots[slot_name] = _slot(registry, slot, slot_name, given.get(slot_name),
                                         f"{prefix}.{slot_name}", add)
        else:  # an unknown algorithm: still check the slots every known algorithm fills alike
            kinds: dict[str, set[tuple[str, bool]]] = {}
            for other in registry.specs("algorithm"):
                for slot_name, slot in other.slots.items():
                    kinds.setdefault(slot_name, set()).add((slot.kind, slot.many))
            for key, value in raw_stage.items():
                if len(kinds.get(key, ())) == 1:
                    kind, many = next(iter(kinds[key]))
                    _slot(registry, Slot(kind, required=False, many=many), key, value, f"{prefix}.{key}", add)
        stage = Stage(str(name), algorithm, slots, trainer, raw_stage)
        if registry.has("algorithm", algorithm.name):
            _rows_fit(registry, registry.get("algorithm", algorithm.name), stage, prefix, add)
        earlier = list(raw_stages)[:index]
        for dotted, value in _stage_refs(stage):
            if value not in earlier:
                add(f"{prefix}.{dotted}", f"names stage {value!r}, which is not an earlier stage",
                    f"earlier stages: {', '.join(earlier) or 'none'}")
        stages.append(stage)
    _same_processes_after_launch(stages, add)
    if problems or run is None:
        raise RecipeError(problems)
    return Recipe(path=path, run=run, stages=stages, data=data)


def _run_wide_trainer(data: dict[str, Any], origins: dict[str, str], add: Any) -> dict[str, Any]:
    """The top-level ``trainer:``: settings every stage inherits unless it sets them
    itself (``trainer.devices=2 trainer.strategy=ddp`` moves a whole pipeline)."""
    shared = data.get("trainer")
    if shared is None:
        return {}
    if not isinstance(shared, dict):
        add("trainer", f"the run-wide trainer is a mapping of trainer settings, not a {type(shared).__name__}",
            f"e.g. trainer: {{devices: 2, strategy: ddp}}; settings: {', '.join(TrainerSection.model_fields)}")
        return {}
    unknown = [key for key in shared if key not in TrainerSection.model_fields]
    for key in unknown:
        add(f"trainer.{key}", "not a trainer setting", f"allowed here: {', '.join(TrainerSection.model_fields)}")
    return {k: v for k, v in shared.items() if k not in unknown}


def stage_name_problem(name: Any) -> str:
    """Why ``name`` cannot name a folder inside the run directory ("" if it can)."""
    if not isinstance(name, str):
        return f"a stage name is text, not a {type(name).__name__} ({name!r}); quote it"
    if not name:
        return "a stage name cannot be empty"
    if not _SAFE_NAME.match(name) or set(name) <= {"."}:
        return (f"stage name {name!r} is not a plain folder name (no path separators, no '..', no leading '.', "
                f"at most 100 characters)")
    return ""


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
        if slot.tag and registry.has(slot.kind, reference.name):
            tags = registry.get(slot.kind, reference.name).tags
            if tags and slot.tag not in tags:
                fits = [spec.name for spec in registry.specs(slot.kind) if not spec.tags or slot.tag in spec.tags]
                add(where, f"{slot.kind} {reference.name!r} is a {' / '.join(sorted(tags))}, but slot "
                           f"{slot_name!r} takes a {slot.tag}", f"one of: {', '.join(fits) or 'none installed'}")
        if registry.has(slot.kind, reference.name):
            ignored = slot.ignored(registry.get(slot.kind, reference.name))
            if ignored:
                fits = [spec.name for spec in registry.specs(slot.kind) if not slot.ignored(spec)]
                does = " and ".join(DOES.get(name, f"has {name}()") for name in sorted(ignored))
                add(where, f"{slot.kind} {reference.name!r} {does}, which this stage's algorithm never calls on "
                           f"its {slot_name!r}: it would be silently ignored",
                    f"{slot_name!r} takes: {', '.join(fits) or 'none installed'}")
        built.append(reference)
    return built if slot.many else (built[0] if built else None)


def _rows_fit(registry: Registry, spec: Any, stage: Stage, prefix: str, add: Any) -> None:
    """Each dataset gives rows its slot takes (``Slot.rows`` against ``ComponentSpec.yields``)."""
    for slot_name, slot in spec.slots.items():
        value = stage.slots.get(slot_name)
        if slot.kind != "dataset" or value is None:
            continue
        accepted = slot.accepts(stage.algorithm._config, stage.slots, registry)
        if not accepted:
            continue
        for i, reference in enumerate(value if slot.many else [value]):
            if reference._config is None or not registry.has("dataset", reference.name):
                continue
            yields = registry.get("dataset", reference.name).yields
            kinds = yields(reference.config) if yields is not None else None
            if kinds and not kinds & accepted:
                where = f"{prefix}.{slot_name}" + (f"[{i}]" if slot.many else "")
                takes = ("rows with a prompt (any kind but plain text)" if accepted == PROMPTED
                         else " or ".join(ROW_KINDS[k] for k in sorted(accepted)))
                add(where, f"dataset {reference.name!r} gives {' / '.join(ROW_KINDS[k] for k in sorted(kinds))}, "
                           f"but the {stage.algorithm.name} algorithm's {slot_name!r} takes {takes}",
                    f"point it at {', '.join(sorted(accepted))} rows (file: `schema:`; builtin: a split of that kind)")


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
            "trainer": {**TrainerSection.model_json_schema(), "description": "trainer settings every stage "
                        "inherits unless it sets them itself"},
            "stages": {"type": "object", "additionalProperties": stage},
        },
    }

