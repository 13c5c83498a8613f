"""Contract tests over the registry: every installed component follows the rules that
make recipes, `rlhfkit plugins` and `rlhfkit schema` work."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

import rlhfkit

PLUGINS = rlhfkit.load_plugins()
SPECS = PLUGINS.registry.specs()


def test_every_kind_but_the_later_ones_has_a_builtin():
    kinds = {spec.kind for spec in SPECS}
    assert {"algorithm", "policy", "dataset", "task"} <= kinds


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}:{s.name}")
def test_component_contract(spec: rlhfkit.ComponentSpec):
    assert spec.doc and "\n" not in spec.doc, "one-line doc for `rlhfkit plugins`"
    assert spec.plugin in PLUGINS.distributions, "arrived through a loaded plugin"
    assert spec.config.model_config.get("extra") == "forbid", "misspelt settings must be errors"
    for name, field in spec.config.model_fields.items():
        assert field.description, f"{spec.name}.{name} needs a description (shown by `rlhfkit plugins`)"
    spec.config.model_json_schema()  # `rlhfkit schema` can describe it
    with pytest.raises(ValidationError):
        spec.config.model_validate({"surely_not_a_setting": 1})
    required = [n for n, f in spec.config.model_fields.items() if f.is_required()]
    if not required:  # all defaults live in the model: the defaults validate, or a
        try:            # whole-model rule (e.g. "exactly one model source") says what is missing
            spec.config.model_validate({})
        except ValidationError as exc:
            assert all(err["loc"] == () and len(err["msg"]) > 30 for err in exc.errors()), exc


@pytest.mark.parametrize("spec", [s for s in SPECS if s.kind == "algorithm"], ids=lambda s: s.name)
def test_algorithm_slots_name_known_kinds(spec):
    assert spec.slots, "an algorithm declares the slots a stage fills"
    for slot in spec.slots.values():
        assert slot.kind in rlhfkit.KINDS and slot.doc


@pytest.mark.parametrize("spec", [s for s in SPECS if s.kind == "task"], ids=lambda s: s.name)
def test_tasks_build_with_defaults_and_follow_the_protocol(spec):
    task = PLUGINS.registry.build(rlhfkit.ref("task")(name=spec.name), None)
    assert isinstance(task, rlhfkit.Task)
    for split in task.splits:
        rows = task.split(split)
        assert len(rows) > 0, split
    prompts = [r.prompt for r in task.split("sft")[:4]]
    completions = [r.completion for r in task.split("sft")[:4]]
    assert len(task.gold_score(prompts, completions)) == 4
