"""Recipe loading: two-stage validation, all errors at once, extends, overrides, stage refs."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field

from rlhfkit import ComponentSpec, RecipeError, Registry, Slot, StageRef, UserError, load_recipe, ref
from rlhfkit.recipe import apply_override, recipe_schema


class AlgoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lr: float = Field(1e-3, gt=0)


class PolicyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int = 2
    from_stage: StageRef | None = None


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: ref("task") = "toy"  # type: ignore[valid-type]
    split: str = "train"


class TaskConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seed: int = 0


@pytest.fixture
def registry() -> Registry:
    reg = Registry()
    slots = {"policy": Slot("policy"), "data": Slot("dataset"),
             "extras": Slot("constraint", required=False, many=True)}
    reg.extend([
        ComponentSpec("algorithm", "train", AlgoConfig, lambda c, x: ("train", c), "toy", slots=slots),
        ComponentSpec("policy", "toy-lm", PolicyConfig, lambda c, x: c, "toy policy"),
        ComponentSpec("policy", "other-lm", PolicyConfig, lambda c, x: c, "toy policy"),
        ComponentSpec("dataset", "toy-data", DataConfig, lambda c, x: c, "toy data"),
        ComponentSpec("task", "toy", TaskConfig, lambda c, x: c, "toy task"),
        ComponentSpec("constraint", "kl", AlgoConfig, lambda c, x: c, "toy constraint", provides=frozenset({"loss"})),
    ])
    return reg


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD = """
run: {name: demo}
stages:
  first:
    algorithm: {name: train, lr: 0.1}
    policy: {name: toy-lm, size: 3}
    data: toy-data
  second:
    algorithm: train
    policy: {name: toy-lm, from_stage: first}
    data: {name: toy-data, task: {name: toy, seed: 4}}
    extras: [kl, {name: kl, lr: 0.5}]
    trainer: {max_steps: 5, batch_size: 4, micro_batch_size: 2}
"""


def test_valid_recipe_resolves_every_component(tmp_path, registry):
    recipe = load_recipe(write(tmp_path, "r.yaml", GOOD), registry)
    first, second = recipe.stages
    assert first.algorithm.config.lr == 0.1
    assert first.slots["policy"].config.size == 3
    assert second.slots["data"].config.task.config.seed == 4  # nested reference resolved
    assert [c.config.lr for c in second.slots["extras"]] == [1e-3, 0.5]
    assert second.trainer.accumulation == 2
    assert recipe.run_dir == Path("runs/demo")


def test_three_mistakes_are_reported_together_with_file_and_path(tmp_path, registry):
    text = GOOD.replace("lr: 0.1", "lr: -1").replace("size: 3", "size: 3, colour: red") \
               .replace("data: toy-data\n", "data: toy-dta\n")
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, registry)
    problems = info.value.problems
    assert [p.path for p in problems] == [
        "stages.first.algorithm.lr", "stages.first.policy.colour", "stages.first.data.name"]
    assert all(p.file == str(path) for p in problems)
    message = str(info.value)
    assert "3 problems" in message
    assert "available dataset components: toy-data" in message  # unknown name lists the others
    assert "takes: from_stage, size" in message  # extra key lists the allowed settings


def test_layout_errors_and_slot_errors(tmp_path, registry):
    text = """
run: {name: demo, colour: 1}
stages:
  s:
    algorithm: train
    polcy: toy-lm
    trainer: {batch_size: 6, micro_batch_size: 4}
"""
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, "r.yaml", text), registry)
    paths = [p.path for p in info.value.problems]
    assert "run.colour" in paths
    assert "stages.s.trainer" in paths  # batch not a multiple of the micro-batch
    # layout errors are reported before component validation
    text2 = text.replace(", colour: 1", "").replace("batch_size: 6", "batch_size: 8")
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, "r2.yaml", text2), registry)
    found = {p.path: p for p in info.value.problems}
    assert "its slots are: policy, data, extras" in found["stages.s.polcy"].hint
    assert "required" in found["stages.s.policy"].message
    assert "required" in found["stages.s.data"].message


def test_stage_reference_must_name_an_earlier_stage(tmp_path, registry):
    text = GOOD.replace("from_stage: first", "from_stage: third")
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, "r.yaml", text), registry)
    (problem,) = info.value.problems
    assert problem.path == "stages.second.policy.from_stage"
    assert "earlier stages: first" in problem.hint


def test_stages_after_the_first_multi_device_one_use_as_many_devices(tmp_path, registry):
    path = write(tmp_path, "r.yaml", GOOD)
    # a single-device stage before a multi-device one is fine: the processes start there
    load_recipe(path, registry, overrides=["stages.second.trainer.devices=2"])
    with pytest.raises(RecipeError) as info:
        load_recipe(path, registry, overrides=["stages.first.trainer.devices=2",
                                               "stages.first.trainer.micro_batch_size=4"])
    (problem,) = info.value.problems
    assert problem.path == "stages.second.trainer"
    assert "after stage 'first' launched 2 processes" in problem.message
    assert "to match (2 in all)" in problem.hint


def test_a_stage_set_to_null_is_removed(tmp_path, registry):
    recipe = load_recipe(write(tmp_path, "r.yaml", GOOD), registry, overrides=["stages.second=null"])
    assert [s.name for s in recipe.stages] == ["first"]
    assert "second" not in recipe.data["stages"]


def test_extends_files_and_presets_with_provenance(tmp_path, registry):
    write(tmp_path, "base.yaml", GOOD)
    child = write(tmp_path, "child.yaml", """
extends: [base.yaml, "preset:fast"]
stages:
  first:
    policy: {name: toy-lm, size: 9}
""")
    presets = {"fast": {"stages": {"first": {"algorithm": {"name": "train", "lr": 0.5}}}}}
    recipe = load_recipe(child, registry, presets)
    first = recipe.stage("first")
    assert first.algorithm.config.lr == 0.5  # from the preset
    assert first.slots["policy"].config.size == 9  # from the child
    assert first.slots["data"].name == "toy-data"  # from the base
    # a mistake inherited from the base file is reported against the base file
    write(tmp_path, "base.yaml", GOOD.replace("data: toy-data\n", "data: nope\n"))
    with pytest.raises(RecipeError) as info:
        load_recipe(child, registry, presets)
    assert info.value.problems[0].file == str(tmp_path / "base.yaml")


def test_extends_cycle_and_unknown_preset(tmp_path, registry):
    write(tmp_path, "a.yaml", "extends: b.yaml\n")
    write(tmp_path, "b.yaml", "extends: a.yaml\n")
    with pytest.raises(UserError, match="cycle"):
        load_recipe(tmp_path / "a.yaml", registry)
    write(tmp_path, "c.yaml", "extends: preset:nope\n")
    with pytest.raises(UserError, match="unknown preset 'nope'"):
        load_recipe(tmp_path / "c.yaml", registry)


def test_overrides(tmp_path, registry):
    path = write(tmp_path, "r.yaml", GOOD)
    recipe = load_recipe(path, registry, overrides=[
        "stages.first.algorithm.lr=0.25", "stages.second.extras.1.lr=2", "run.seed=7",
        "stages.first.trainer.max_steps=3"])
    assert recipe.stage("first").algorithm.config.lr == 0.25
    assert recipe.stage("second").slots["extras"][1].config.lr == 2
    assert recipe.run.seed == 7
    assert recipe.stage("first").trainer.max_steps == 3
    with pytest.raises(RecipeError) as info:
        load_recipe(path, registry, overrides=["stages.first.algorithm.lr=oops"])
    assert info.value.problems[0].file == "command line"
    data: dict = {"a": [1, 2]}
    with pytest.raises(UserError, match="not an index"):
        apply_override(data, "a.5=1")
    # a component given by bare name keeps its name when a setting is overridden
    data = {"objective": "ppo-clip", "constraints": ["kl", {"name": "entropy"}]}
    apply_override(data, "objective.clip_high=0.28")
    apply_override(data, "constraints.0.coef=0.1")
    assert data == {"objective": {"name": "ppo-clip", "clip_high": 0.28},
                    "constraints": [{"name": "kl", "coef": 0.1}, {"name": "entropy"}]}


def test_yaml_errors_are_user_errors(tmp_path, registry):
    with pytest.raises(UserError, match=r"r.yaml at line 2, column \d+: not valid YAML"):
        load_recipe(write(tmp_path, "r.yaml", "run:\n  name: a: b\n"), registry)
    with pytest.raises(UserError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml", registry)
    with pytest.raises(UserError, match="is a mapping"):
        load_recipe(write(tmp_path, "l.yaml", "- 1\n"), registry)


def test_yaml_is_safe_loaded(tmp_path, registry):
    text = "run: !!python/object/apply:os.system ['echo pwned']\nstages: {}\n"
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(write(tmp_path, "r.yaml", text), registry)


def test_schema_lists_components(registry):
    schema = recipe_schema(registry)
    stage = schema["properties"]["stages"]["additionalProperties"]
    policy_names = stage["properties"]["policy"]["anyOf"][0]["enum"]
    assert policy_names == ["other-lm", "toy-lm"]
    assert stage["properties"]["extras"]["type"] == "array"


def test_a_component_of_another_name_replaces_the_old_ones_settings(tmp_path):
    """Extending a recipe (or overriding a name) with a component of another name starts
    from that component's defaults; the same name, or settings without a name, merge."""
    from rlhfkit.recipe import compose, set_value

    base = tmp_path / "base.yaml"
    base.write_text("run: {name: base, seed: 3}\nstages:\n  s:\n    algorithm: {name: algo, lr: 0.5}\n"
                    "    estimator: {name: gae, critic: {size: 2}, lam: 0.9}\n    objective: dpo\n")
    top = tmp_path / "top.yaml"
    top.write_text("extends: base.yaml\nrun: {name: top}\nstages:\n  s:\n    estimator: {name: grpo}\n"
                   "    objective: {beta: 0.2}\n    algorithm: {lr: 0.1}\n")
    data, origins = compose(top, {})
    stage = data["stages"]["s"]
    assert stage["estimator"] == {"name": "grpo"}  # gae's critic and lam are not grpo's settings
    assert stage["objective"] == {"name": "dpo", "beta": 0.2}  # settings onto a bare name keep the name
    assert stage["algorithm"] == {"name": "algo", "lr": 0.1}  # the same component: merged
    assert data["run"] == {"name": "top", "seed": 3}  # run: is not a component; it merges
    assert "stages.s.estimator.lam" not in origins and origins["stages.s.estimator"] == str(top)

    set_value(data, "stages.s.algorithm.name", "other")
    assert stage["algorithm"] == {"name": "other"}
    set_value(data, "stages.s.objective.name", "dpo")
    assert stage["objective"] == {"name": "dpo", "beta": 0.2}


def test_a_run_wide_trainer_is_inherited_by_every_stage(tmp_path, registry):
    """A top-level trainer: sets what no stage sets itself; a stage's own settings win; its
    errors name where the value came from; a batch that does not divide gets both fixes."""
    path = write(tmp_path, "r.yaml", GOOD + "trainer: {devices: 2, strategy: ddp, batch_size: 16}\n")
    recipe = load_recipe(path, registry, overrides=["trainer.max_steps=7"])
    first, second = recipe.stages
    assert (first.trainer.devices, first.trainer.strategy, first.trainer.batch_size) == (2, "ddp", 16)
    assert first.trainer.max_steps == 7
    assert (second.trainer.devices, second.trainer.batch_size, second.trainer.max_steps) == (2, 4, 5)
    assert recipe.data["stages"]["first"]["trainer"]["devices"] == 2  # the stage's fingerprint sees it
    with pytest.raises(RecipeError) as info:
        load_recipe(path, registry, overrides=["trainer.devices=4", "trainer.colour=red"])
    text = " ".join(str(info.value).split())
    assert "command line: trainer.colour: not a trainer setting" in text
    # first: 16 rows over 4 devices in micro-batches of 8; second: 4 rows over 4 devices in micro-batches of 2
    assert "stages.first.trainer: batch_size 16 is not a multiple of micro_batch_size x devices x num_nodes = 32" \
        in text and "set micro_batch_size: 4 (it divides the 4 rows each of the 4 device(s)" in text
    assert "stages.second.trainer: batch_size 4 is not a multiple of" in text and "set micro_batch_size: 1" in text
    with pytest.raises(RecipeError, match="trainer: the run-wide trainer is a mapping"):
        load_recipe(path, registry, overrides=["trainer=3"])
