"""Component contracts: what an algorithm calls on the component in each slot is declared
(ComponentSpec.provides, Slot.uses, objective tags) and checked when plugins load, when a
recipe is validated and when a component is built; every built-in pair of slot and
component is either valid or a validate error."""

from __future__ import annotations

import sys
import textwrap

import pytest
from helpers import RECIPES
from pydantic import BaseModel, ConfigDict

import rlhfkit
from rlhfkit import PluginError, RecipeError

PLUGINS = rlhfkit.load_plugins()
REGISTRY = PLUGINS.registry

# (recipe, stage, slot) -> the built-in components that fit it
FITS = {
    ("ppo.yaml", "ppo", "objective"): {"ppo-clip", "gspo"},
    ("ppo.yaml", "ppo", "constraints"): {"kl", "reward-norm", "missing-eos", "entropy", "ptx", "reference-ema",
                                         "overlong-penalty", "overlong-filter"},
    ("ppo.yaml", "ppo", "estimator"): {"gae", "reinforce", "rloo", "grpo", "remax", "reinforce++"},
    ("dpo.yaml", "dpo", "objective"): {"dpo", "cdpo", "robust-dpo", "ipo", "hinge", "simpo", "orpo", "kto"},
    ("dpo.yaml", "dpo", "constraints"): {"reference-ema"},
    ("reward-model.yaml", "rm", "objective"): {"pairwise", "kwise", "best-of-n", "ties", "margin"},
    ("reward-model.yaml", "rm", "regularizers"): {"lm-loss", "centering"},
}
SETTINGS = {"ptx": {"data": {"name": "builtin", "task": "reviews", "split": "pretrain"}}}
CASES = [(recipe, stage, slot, spec.name) for (recipe, stage, slot) in FITS
         for spec in REGISTRY.specs(PLUGINS.registry.get("algorithm", "ppo" if stage == "ppo" else
                                                          "dpo" if stage == "dpo" else "reward-model")
                                    .slots[slot].kind)]


def refused(recipe: str, override: str, fits: bool) -> rlhfkit.Problem | None:
    """Validate the recipe with ``override``: ``None`` when it ``fits``, else the one problem."""
    if fits:
        PLUGINS.load_recipe(RECIPES / recipe, [override])
        return None
    with pytest.raises(RecipeError) as caught:
        PLUGINS.load_recipe(RECIPES / recipe, [override])
    (problem,) = caught.value.problems  # one paragraph, for this slot
    return problem


@pytest.mark.parametrize(("recipe", "stage", "slot", "name"), CASES, ids=[f"{c[1]}.{c[2]}={c[3]}" for c in CASES])
def test_every_builtin_pair_is_valid_or_a_validate_error(recipe, stage, slot, name):
    algorithm = REGISTRY.get("algorithm", {"ppo": "ppo", "dpo": "dpo", "rm": "reward-model"}[stage])
    component = {"name": name, **SETTINGS.get(name, {})}
    value = [component] if algorithm.slots[slot].many else component
    problem = refused(recipe, f"stages.{stage}.{slot}={value}", name in FITS[(recipe, stage, slot)])
    if problem is None:
        return
    assert problem.path.startswith(f"stages.{stage}.{slot}") and name in problem.message
    assert any(fit in problem.hint for fit in FITS[(recipe, stage, slot)]), problem.hint


def test_the_table_above_covers_every_builtin_of_those_kinds():
    for (_, stage, slot), fits in FITS.items():
        kind = REGISTRY.get("algorithm", {"ppo": "ppo", "dpo": "dpo", "rm": "reward-model"}[stage]).slots[slot].kind
        assert fits <= set(REGISTRY.names(kind))


# ---------------------------------------------------------------- plugin authors' mistakes

class Empty(BaseModel):
    model_config = ConfigDict(extra="forbid")


def load(*specs: rlhfkit.ComponentSpec) -> rlhfkit.Plugins:
    from types import SimpleNamespace

    plugin = SimpleNamespace(rlhfkit_components=rlhfkit.hookimpl(lambda: list(specs)))
    blocked = sorted({ep.name for ep in __import__("importlib.metadata").metadata.entry_points(group="rlhfkit")})
    return rlhfkit.load_plugins(block=blocked, extra=[("mine", plugin)])


@pytest.fixture
def module(tmp_path, monkeypatch):
    """Write ``mine_components.py`` (importable) holding ``source``."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(source: str) -> str:
        sys.modules.pop("mine_components", None)
        (tmp_path / "mine_components.py").write_text(textwrap.dedent(source))
        return "mine_components"
    return write


def test_a_capability_that_does_not_exist_is_refused_at_load_with_the_nearest():
    spec = rlhfkit.ComponentSpec("constraint", "mine", Empty, lambda c, x: None, "mine",
                                 provides=frozenset({"shape_reward"}))
    with pytest.raises(PluginError, match=r"plugin 'mine' \(distribution registered directly\): constraint 'mine' "
                                          r"declares provides=\{'shape_reward'\}.*did you mean 'shape_rewards'"):
        load(spec)


def test_a_misspelt_method_is_refused_at_load_from_the_source(module):
    name = module("""
        class Base:
            def loss(self, minibatch, output):
                return None

        class Mine(Base):
            def __init__(self, config, context):
                pass

            def shape_reward(self, rollout):   # misspelt: would never be called
                return None
    """)
    spec = rlhfkit.ComponentSpec("constraint", "mine", Empty, rlhfkit.lazy(f"{name}:Mine"), "mine",
                                 provides=frozenset({"loss"}))
    with pytest.raises(PluginError, match=r"defines shape_reward\(\), a near miss of the capability 'shape_rewards'"):
        load(spec)
    assert name not in sys.modules  # checked from the source, nothing imported


def test_a_missing_required_method_or_an_undeclared_capability_is_refused_at_load(module):
    name = module("""
        class NoEstimate:
            critic = None
            def advantages(self, rollout):
                return None

        class Undeclared:
            critic = None
            def estimate(self, rollout):
                return None
            def prepare(self, rollout):
                return None
    """)
    with pytest.raises(PluginError, match=r"estimator 'mine' has no method estimate\(\), which it must have"):
        load(rlhfkit.ComponentSpec("estimator", "mine", Empty, rlhfkit.lazy(f"{name}:NoEstimate"), "mine"))
    with pytest.raises(PluginError, match=r"defines prepare\(\) without declaring it"):
        load(rlhfkit.ComponentSpec("estimator", "mine", Empty, rlhfkit.lazy(f"{name}:Undeclared"), "mine"))


def test_a_constraint_that_declares_nothing_to_do_is_refused():
    with pytest.raises(PluginError, match="declares none of shape_rewards, loss, after_update"):
        load(rlhfkit.ComponentSpec("constraint", "mine", Empty, lambda c, x: None, "mine"))


def test_the_built_object_is_checked_against_its_declaration():
    class Mine:
        def loss(self, minibatch, output):
            return None

        def after_update(self, rollout):   # not declared: the algorithm would never call it
            return None

    plugins = load(rlhfkit.ComponentSpec("constraint", "mine", Empty, lambda c, x: Mine(), "mine",
                                         provides=frozenset({"loss"})))
    with pytest.raises(PluginError, match=r"defines after_update\(\) without declaring it"):
        plugins.registry.build(rlhfkit.ref("constraint")(name="mine"), None)


def test_algorithms_call_what_is_declared():
    ema = REGISTRY.get("constraint", "reference-ema")
    assert ema.capabilities() == {"bind", "after_update", "state_dict", "load_state_dict"}
    grpo = REGISTRY.build(rlhfkit.ref("estimator")(name="grpo"), None)
    assert not rlhfkit.provides(grpo, "prepare") and not rlhfkit.provides(grpo, "critic_loss")
    assert rlhfkit.provides(grpo, "estimate")


# ---------------------------------------------------------------- data against algorithms

# a dataset of each row kind: built-in splits, and a file for chat conversations
KIND_SOURCES = {"prompt-completion": "sft", "text": "pretrain", "preference": "preference", "unpaired": "unpaired",
                "ranking": "ranking", "prompt": "prompts"}
PROMPTED = {"prompt-completion", "messages", "preference", "unpaired", "ranking", "prompt"}
DEMOS = {"prompt-completion", "text", "messages"}
# (recipe, stage, slot) -> the row kinds it takes
TAKES = {
    ("sft.yaml", "sft", "data"): DEMOS, ("sft.yaml", "sft", "eval_data"): DEMOS,
    ("reward-model.yaml", "rm", "data"): {"preference"},  # its objective, pairwise, takes pairs only
    ("reward-objectives.yaml", "kwise", "data"): {"preference", "ranking"},
    ("reward-model.yaml", "rm", "eval_data"): {"preference"},
    ("reward-model.yaml", "rm", "reference_data"): {"prompt-completion", "messages", "preference"},
    ("ppo.yaml", "ppo", "data"): PROMPTED, ("ppo.yaml", "ppo", "eval_data"): PROMPTED,
    ("dpo.yaml", "dpo", "data"): {"preference"}, ("dpo.yaml", "dpo", "eval_data"): {"preference"},
    ("dpo.yaml", "dpo", "eval_prompts"): PROMPTED,
    ("kto.yaml", "kto", "data"): {"preference", "unpaired"},
    ("online-dpo.yaml", "online-dpo", "data"): PROMPTED,
    ("quickstart.yaml", "report", "prompts"): PROMPTED, ("quickstart.yaml", "report", "text"): DEMOS,
    ("quickstart.yaml", "report", "pairs"): {"preference"},
}
DATA_CASES = [(*key, kind) for key in TAKES for kind in [*KIND_SOURCES, "messages"]]


@pytest.mark.parametrize(("recipe", "stage", "slot", "kind"), DATA_CASES,
                         ids=[f"{c[0].split('.')[0]}.{c[2]}={c[3]}" for c in DATA_CASES])
def test_every_data_slot_takes_its_row_kinds_and_refuses_the_rest(tmp_path, recipe, stage, slot, kind):
    if kind == "messages":
        chat = tmp_path / "chat.jsonl"
        chat.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
        dataset = f"{{name: file, path: {chat}, schema: messages}}"
    else:
        dataset = f"{{name: builtin, task: reviews, split: {KIND_SOURCES[kind]}}}"
    problem = refused(recipe, f"stages.{stage}.{slot}={dataset}", kind in TAKES[(recipe, stage, slot)])
    if problem is None:
        return
    assert problem.path == f"stages.{stage}.{slot}" and "takes" in problem.message, problem


def test_validating_every_shipped_recipe_imports_no_torch():
    """Loading plugins, checking declarations (from source) and every plugin's recipe check
    stay torch-free, so `rlhfkit validate` answers fast."""
    import subprocess

    code = ("import sys, rlhfkit; from rlhfkit.shipped import shipped_recipes; p = rlhfkit.load_plugins(); "
            "[p.load_recipe(path) for name, path in shipped_recipes().items() if not name.startswith('ablations/')]; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0, result.stderr
