"""Plugins: a third-party plugin installed and discovered through a real entry point, the
built-in plugins loaded (and blocked) the same way, the plugin manager's error paths, and
the CLI basics.

Installing and discovering needs subprocesses: ``importlib.metadata`` only sees
distributions on ``sys.path``, and this test process must not change. Each ``rlhfkit``
subprocess pays for importing torch (and, unless blocked, transformers and lightning), so
the subprocess tests are few and each checks several things.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from helpers import pip_install
from pydantic import BaseModel, ConfigDict

import rlhfkit
from rlhfkit.plugin_manager import BLOCK_ENV
from rlhfkit.plugins import tasks

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "rlhfkit-example-plugin"
RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
ENTRY_POINTS = sorted({ep.name for ep in importlib.metadata.entry_points(group="rlhfkit")})


def run(args: list[str], site: Path | None = None, env: dict[str, str] | None = None,
        module: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``python -m rlhfkit ARGS`` (or ``python ARGS``) with ``site`` first on the path."""
    environment = {k: v for k, v in os.environ.items() if k != BLOCK_ENV}
    environment["COLUMNS"] = "200"  # rich wraps at 80 columns when not on a terminal
    if site is not None:
        environment["PYTHONPATH"] = os.pathsep.join(
            [str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    environment.update(env or {})
    command = [sys.executable, *(["-m", "rlhfkit"] if module else []), *args]
    return subprocess.run(command, check=False, capture_output=True, text=True, env=environment,
                          timeout=180)


def flat(text: str) -> str:
    """``text`` with every run of whitespace as one space (immune to line wrapping)."""
    return " ".join(text.split())


@pytest.fixture(scope="session")
def example_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the installed example distribution (put it on PYTHONPATH)."""
    site = tmp_path_factory.mktemp("example") / "site"
    pip_install(EXAMPLE, site)
    return site


# ------------------------------------------------- the example, installed for real


def test_installed_example_is_listed_with_the_builtins(example_site):
    result = run(["plugins"], site=example_site)
    assert result.returncode == 0, result.stderr
    out = flat(result.stdout)
    assert "reward keyword-bonus" in out and "dataset inline" in out
    assert "from plugin 'example' (distribution rlhfkit-example-plugin 0.1.0)" in out
    # the built-ins come through their entry points too, and no name clashes
    assert "algorithm sft" in out and "from plugin 'sft' (distribution rlhfkit" in out
    assert "policy transformers" in out and "dataset file" in out and "task reviews" in out


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_blocked_plugins_are_not_loaded_and_the_rest_is(example_site, how):
    if how == "flag":
        result = run(["--block-plugin", "example", "--block-plugin", "sft", "plugins"], site=example_site)
    else:
        result = run(["plugins"], site=example_site, env={BLOCK_ENV: "example, sft"})
    assert result.returncode == 0, result.stderr
    out = flat(result.stdout)
    assert "keyword-bonus" not in out and "dataset inline" not in out
    assert "algorithm sft" not in out  # a built-in is blocked like any plugin
    assert "policy transformers" in out and "task reviews" in out and "dataset file" in out


INSTALLED_SCRIPT = """
import json, rlhfkit
plugins = rlhfkit.load_plugins(block=["policy", "sft"])  # not needed here, and slow to import
registry = plugins.registry
reward = registry.build(rlhfkit.ref("reward")(
    name="keyword-bonus", keywords=["Great", "love"], penalty_per_repeat=0.5), None)
data = registry.build(rlhfkit.ref("dataset")(
    name="inline", rows=[{"prompt": "how is the lamp ?", "completion": "i love it ."}]), None)
spec = registry.get("reward", "keyword-bonus")
print(json.dumps({
    "where": spec.where(),
    "reward_source": isinstance(reward, rlhfkit.RewardSource),
    "scores": reward.score(["q", "q", "q"], ["I love it, great great!", "meh", "love love love"]).tolist(),
    "dataset": isinstance(data, rlhfkit.Dataset),
    "rows": [[row.prompt, row.completion] for row in data.rows()],
    "checkers": [impl.plugin_name for impl in plugins.hook.rlhfkit_check_recipe.get_hookimpls()],
}))
"""


def test_installed_example_builds_and_scores(example_site):
    result = run(["-c", INSTALLED_SCRIPT], site=example_site, module=False)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["where"] == "plugin 'example' (distribution rlhfkit-example-plugin 0.1.0)"
    assert found["reward_source"] and found["dataset"]
    # 2 distinct keywords - 0.5 x 1 repeat; none; 1 keyword - 0.5 x 2 repeats
    assert found["scores"] == [1.5, 0.0, 0.0]
    assert found["rows"] == [["how is the lamp ?", "i love it ."]]
    assert "example" in found["checkers"]


def test_the_example_plugins_own_tests_pass_installed(example_site):
    """Its estimator, objective and constraint are tested with rlhfkit.testing only."""
    result = run(["-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")], site=example_site,
                 module=False)
    assert result.returncode == 0 and "3 passed" in result.stdout, result.stdout + result.stderr


def test_the_example_plugins_components_fit_the_recipes(example_site):
    recipe = RECIPES_DIR / "ppo.yaml"
    for override in ("stages.ppo.estimator=whitened-return",
                     "stages.ppo.constraints=[{name: kl}, {name: length-penalty, coef: 0.05}]"):
        result = run(["validate", str(recipe), override], site=example_site)
        assert result.returncode == 0, result.stdout + result.stderr
    # the length penalty shapes rewards, which the dpo algorithm never calls: refused
    result = run(["validate", str(RECIPES_DIR / "dpo.yaml"), "stages.dpo.objective=margin-dpo",
                  "stages.dpo.constraints=[length-penalty]"], site=example_site)
    assert result.returncode == 2 and "constraint 'length-penalty' shapes rewards" in flat(result.stderr)


# ---------------------------------------------------- a broken third-party plugin


def fake_distribution(tmp_path: Path, name: str, version: str, plugin: str, modules: dict[str, str]) -> Path:
    """Install a distribution ``name`` whose entry point ``plugin`` is the first of
    ``modules`` (module name -> source) into a folder; returns it (for PYTHONPATH)."""
    source = tmp_path / name
    source.mkdir()
    names = ", ".join(f'"{m}"' for m in modules)
    (source / "pyproject.toml").write_text(textwrap.dedent(f"""
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{name}"
        version = "{version}"
        dependencies = ["rlhfkit"]

        [project.entry-points.rlhfkit]
        {plugin} = "{next(iter(modules))}"

        [tool.setuptools]
        py-modules = [{names}]
    """))
    for module, text in modules.items():
        (source / f"{module}.py").write_text(textwrap.dedent(text))
    site = tmp_path / "site"
    pip_install(source, site)
    return site


def test_broken_distribution_is_named_without_a_traceback(tmp_path):
    site = fake_distribution(tmp_path, "rlhfkit-broken-plugin", "0.3.1", "broken",
                             {"rlhfkit_broken_plugin": "import a_module_that_is_not_installed\n"})
    result = run(["plugins"], site=site)
    assert result.returncode == 2
    err = flat(result.stderr)
    assert "plugin 'broken' (rlhfkit-broken-plugin 0.3.1) failed to import" in err
    assert "a_module_that_is_not_installed" in err
    assert "--block-plugin broken" in err
    assert "Traceback" not in result.stderr


def test_a_misspelt_capability_is_refused_at_load_naming_the_distribution(tmp_path):
    site = fake_distribution(tmp_path, "rlhfkit-misspelt-plugin", "0.2.0", "misspelt", {
        "rlhfkit_misspelt_plugin": """
            from pydantic import BaseModel, ConfigDict
            import rlhfkit

            class Settings(BaseModel):
                model_config = ConfigDict(extra="forbid")

            @rlhfkit.hookimpl
            def rlhfkit_components():
                return [rlhfkit.ComponentSpec("constraint", "length-penalty", Settings,
                                              rlhfkit.lazy("rlhfkit_misspelt_components:LengthPenalty"),
                                              "penalise long responses", provides=frozenset({"after_update"}))]
        """,
        "rlhfkit_misspelt_components": """
            class LengthPenalty:
                def __init__(self, config, context):
                    pass
                def after_update(self, rollout):
                    return None
                def shape_reward(self, rollout):
                    rollout.scores -= 0.01 * rollout.response_mask.sum(1)
        """})
    result = run(["plugins"], site=site)
    assert result.returncode == 2
    err = flat(result.stderr)
    assert ("plugin 'misspelt' (distribution rlhfkit-misspelt-plugin 0.2.0): constraint 'length-penalty' defines "
            "shape_reward(), a near miss of the capability 'shape_rewards'") in err, err
    assert "Traceback" not in result.stderr


# ------------------------------------- CLI basics (more in test_cli.py: schema, validate)


def test_help():
    result = run(["--help"])
    assert result.returncode == 0
    assert "plugins" in result.stdout and "--block-plugin" in result.stdout


# ------------------------------------------- plugin manager error paths, in-process


def plugin(**hooks: object) -> SimpleNamespace:
    """A plugin object implementing ``hooks`` (hook name -> function)."""
    return SimpleNamespace(**{name: rlhfkit.hookimpl(function) for name, function in hooks.items()})


def load(*plugins: tuple[str, object]) -> rlhfkit.Plugins:
    """Load only ``plugins``: every installed entry point is blocked (fast, hermetic)."""
    return rlhfkit.load_plugins(block=ENTRY_POINTS, extra=plugins)


class Empty(BaseModel):
    model_config = ConfigDict(extra="forbid")


def spec(kind: str = "reward", name: str = "constant") -> rlhfkit.ComponentSpec:
    return rlhfkit.ComponentSpec(kind=kind, name=name, config=Empty, factory=lambda c, x: None,
                                 doc="test component")


def test_directly_registered_plugin_contributes():
    loaded = load(("mine", plugin(rlhfkit_components=lambda: [spec()],
                                  rlhfkit_presets=lambda: {"fast": {"run": {"seed": 1}}})))
    contributed = loaded.registry.get("reward", "constant")
    assert (contributed.plugin, contributed.distribution) == ("mine", "registered directly")
    assert loaded.presets == {"fast": {"run": {"seed": 1}}}


def test_blocked_extra_plugin_is_not_registered():
    loaded = rlhfkit.load_plugins(block=[*ENTRY_POINTS, "mine"],
                                  extra=[("mine", plugin(rlhfkit_components=lambda: [spec()]))])
    assert not loaded.registry.has("reward", "constant")


def test_misspelt_hook_names_the_plugin():
    with pytest.raises(rlhfkit.PluginError, match="rlhfkit_componets") as caught:
        load(("typo", plugin(rlhfkit_componets=lambda: [spec()])))
    assert "'typo'" in str(caught.value)


def test_duplicate_component_names_both_plugins():
    with pytest.raises(rlhfkit.PluginError, match="two plugins register the reward 'constant'") as caught:
        load(("first", plugin(rlhfkit_components=lambda: [spec()])),
             ("second", plugin(rlhfkit_components=lambda: [spec()])))
    assert "plugin 'first'" in str(caught.value) and "plugin 'second'" in str(caught.value)


@pytest.mark.parametrize("returned", [[{"kind": "reward", "name": "x"}], spec(), None])
def test_components_must_be_a_list_of_specs(returned):
    with pytest.raises(rlhfkit.PluginError, match="'odd'.*must return a list of ComponentSpec"):
        load(("odd", plugin(rlhfkit_components=lambda: returned)))


def test_unknown_kind_is_an_error():
    with pytest.raises(rlhfkit.PluginError, match="unknown kind 'scorer'") as caught:
        load(("kinds", plugin(rlhfkit_components=lambda: [spec(kind="scorer")])))
    assert "plugin 'kinds'" in str(caught.value)


def test_duplicate_preset_names_both_plugins():
    with pytest.raises(rlhfkit.PluginError, match="preset 'fast'") as caught:
        load(("first", plugin(rlhfkit_presets=lambda: {"fast": {}})),
             ("second", plugin(rlhfkit_presets=lambda: {"fast": {}})))
    assert "'first'" in str(caught.value) and "'second'" in str(caught.value)


def test_plugin_raising_in_components_is_named():
    def explode() -> list[rlhfkit.ComponentSpec]:
        raise RuntimeError("boom")

    with pytest.raises(rlhfkit.PluginError, match="'fragile'.*raised in rlhfkit_components: RuntimeError: boom"):
        load(("fragile", plugin(rlhfkit_components=explode)))


def test_undecorated_hook_function_is_an_error():
    undecorated = SimpleNamespace(rlhfkit_components=lambda: [spec()])
    with pytest.raises(rlhfkit.PluginError, match="without @rlhfkit.hookimpl"):
        load(("plain", undecorated))


def test_presets_must_be_a_dict_of_mappings():
    with pytest.raises(rlhfkit.PluginError, match="'listy'.*rlhfkit_presets must return a dict"):
        load(("listy", plugin(rlhfkit_presets=lambda: ["fast"])))


def no_components() -> list[rlhfkit.ComponentSpec]:
    return []


def test_extra_plugin_may_not_reuse_a_loaded_name():
    with pytest.raises(rlhfkit.PluginError, match="already loaded"):
        load(("twin", plugin(rlhfkit_components=no_components)),
             ("twin", plugin(rlhfkit_components=no_components)))


def test_exception_in_check_recipe_names_the_plugin(tmp_path):
    def explode(recipe, registry):
        raise KeyError("boom")

    loaded = rlhfkit.load_plugins(extra=[("checker", plugin(rlhfkit_check_recipe=explode))])
    with pytest.raises(rlhfkit.PluginError, match="plugin 'checker'.*rlhfkit_check_recipe.*boom"):
        loaded.load_recipe(Path(__file__).parents[1] / "recipes" / "sft.yaml")


# ------------------------------------------- the example's components, from source


@pytest.fixture(scope="module")
def example() -> Iterator[ModuleType]:
    """The example plugin's module imported from its source (not installed)."""
    name = "rlhfkit_example_plugin"
    location = importlib.util.spec_from_file_location(name, EXAMPLE / name / "__init__.py")
    module = importlib.util.module_from_spec(location)
    sys.modules[name] = module  # pydantic resolves the postponed annotations through it
    try:
        location.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[name]


@pytest.fixture
def registry(example) -> rlhfkit.Registry:
    registry = rlhfkit.Registry()
    registry.extend(example.rlhfkit_components())
    return registry


def keyword_bonus(registry: rlhfkit.Registry, **settings: object) -> object:
    return registry.build(rlhfkit.ref("reward")(name="keyword-bonus", **settings), None)


def test_keyword_bonus_counts_distinct_keywords_and_repeats(registry):
    reward = keyword_bonus(registry, keywords=["Great", "love"], bonus=2.0, penalty_per_repeat=0.25)
    assert isinstance(reward, rlhfkit.RewardSource)
    scores = reward.score(["p"] * 4, ["GREAT, I love it!", "great great great", "", "greatest lovely"])
    assert scores.dtype == torch.float32 and scores.shape == (4,)
    # 2 keywords; 1 keyword and 2 repeats; nothing; no whole-word match
    assert scores.tolist() == [4.0, 1.5, 0.0, 0.0]


def test_keyword_bonus_rejects_mismatched_batches(registry):
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        keyword_bonus(registry, keywords=["great"]).score(["a", "b"], ["great"])


@pytest.mark.parametrize(("settings", "expected"), [
    ({}, "reward.keywords: Field required"),
    ({"keywords": []}, "reward.keywords: List should have at least 1 item"),
    ({"keywords": ["very good"]}, "each keyword must be one word"),
    ({"keywords": ["good"], "penalty_per_repeat": -1}, "reward.penalty_per_repeat"),
    ({"keywords": ["good"], "bonuss": 2}, "takes: bonus, keywords, penalty_per_repeat"),
])
def test_keyword_bonus_settings_are_checked(registry, settings, expected):
    with pytest.raises(rlhfkit.UserError, match=expected):
        keyword_bonus(registry, **settings)


def test_inline_dataset_serves_its_rows(registry):
    rows = [{"prompt": "how is the lamp ?", "completion": "i love it ."}, {"prompt": "", "completion": "text"}]
    data = registry.build(rlhfkit.ref("dataset")(name="inline", rows=rows), None)
    assert isinstance(data, rlhfkit.Dataset)
    assert data.rows() == [rlhfkit.PromptCompletion("how is the lamp ?", "i love it ."),
                           rlhfkit.PromptCompletion("", "text")]
    with pytest.raises(rlhfkit.UserError, match=r"dataset.rows.0.completion: Field required"):
        registry.build(rlhfkit.ref("dataset")(name="inline", rows=[{"prompt": "p"}]), None)


class ToyPolicyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vocabulary_of: rlhfkit.ref("task") | None = None  # type: ignore[valid-type]


def toy_rl_plugin() -> SimpleNamespace:
    """An algorithm with a reward slot (no built-in has one yet) and a policy that may
    take its vocabulary from a task."""
    slots = {"policy": rlhfkit.Slot("policy"), "reward": rlhfkit.Slot("reward")}
    return plugin(rlhfkit_components=lambda: [
        rlhfkit.ComponentSpec("algorithm", "toy-rl", Empty, lambda c, x: None, "toy", slots=slots),
        rlhfkit.ComponentSpec("policy", "toy-lm", ToyPolicyConfig, lambda c, x: None, "toy"),
    ])


@pytest.mark.parametrize(("policy", "keywords", "problem"), [
    ("{name: toy-lm, vocabulary_of: reviews}", "[great, zyzzyva]", "['zyzzyva'] are not words of task 'reviews'"),
    ("{name: toy-lm, vocabulary_of: reviews}", "[great]", None),
    ("toy-lm", "[zyzzyva]", None),  # no task vocabulary: any word may be written
])
def test_example_rejects_keywords_the_policy_cannot_write(example, tmp_path, policy, keywords, problem):
    loaded = load(("example", example), ("builtin-tasks", tasks), ("toy", toy_rl_plugin()))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
run: {{name: keywords}}
stages:
  rl:
    algorithm: toy-rl
    policy: {policy}
    reward: {{name: keyword-bonus, keywords: {keywords}}}
""")
    if problem is None:
        loaded.load_recipe(recipe)
        return
    with pytest.raises(rlhfkit.RecipeError) as caught:
        loaded.load_recipe(recipe)
    [found] = caught.value.problems
    assert found.path == "stages.rl.reward.keywords"
    assert problem in found.message
