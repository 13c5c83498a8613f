"""The rlhfkit plugin API: every hook a plugin may implement.

A plugin is a module (or object) registered under the ``rlhfkit`` entry-point group::

    [project.entry-points.rlhfkit]
    my-plugin = "my_package.rlhfkit_plugin"

and implements any of the hooks below with ``@rlhfkit.hookimpl``. Hook names are checked
when plugins load: a misspelt ``rlhfkit_*`` function is an error, not a silent no-op.

Hooks are for discovery and lifecycle only. The training loop calls the components
(typed objects, see ``rlhfkit.interfaces``) directly; no hook runs per token or per step
of an algorithm's inner loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from rlhfkit.errors import Problem
    from rlhfkit.recipe import Recipe
    from rlhfkit.registry import ComponentSpec, Registry

hookspec = pluggy.HookspecMarker("rlhfkit")


@hookspec
def rlhfkit_components() -> list[ComponentSpec]:
    """Contribute components.

    Called once, 1:N, when the plugin manager is built; every plugin's list is added to
    the registry. Each :class:`~rlhfkit.ComponentSpec` names its kind, name, pydantic
    config model, factory and a one-line doc. A name already taken in the same kind is
    an error naming both plugins and their distributions.

    Returns:
        the plugin's component specs.
    """


@hookspec
def rlhfkit_presets() -> dict[str, dict[str, Any]]:
    """Contribute presets: named recipe fragments usable with ``extends:``.

    Called once, 1:N. A preset is a plain mapping in recipe layout (e.g. the
    ``stages.ppo`` settings of PPO-max) that a recipe composes with
    ``extends: [preset:ppo-max]``. A name contributed twice is an error.

    Returns:
        ``{preset name: recipe fragment}``.
    """


@hookspec
def rlhfkit_check_recipe(recipe: Recipe, registry: Registry) -> list[Problem]:
    """Check a whole, validated recipe across components.

    Called 1:N after every component's own config validated, by ``rlhfkit validate``
    and before ``rlhfkit run`` starts anything. Use it for rules that span components
    (e.g. "this estimator needs group sampling in the rollout"). Problems from every
    plugin are reported together with the recipe's other errors.

    Returns:
        problems found (an empty list when the recipe is fine).
    """


@hookspec
def rlhfkit_on_metrics(stage: str, step: int, metrics: dict[str, float], identity: dict[str, Any]) -> None:
    """Observe metrics as they are logged (rank 0 only).

    Called 1:N each time a stage logs a row of metrics, after they were written to the
    stage's ``metrics.csv``. ``identity`` says where they come from, as trackers are told:
    ``run``, ``stage``, ``seed``, and inside ``rlhfkit ablate`` ``ablation`` and
    ``variant`` (else ``None``). An implementation may leave out parameters it does not
    use. Return value ignored.
    """


@hookspec
def rlhfkit_on_checkpoint(stage: str, step: int, path: Path) -> None:
    """Observe a resumable checkpoint after it was written atomically (rank 0 only).

    Called 1:N with the stage name, the optimizer step and the checkpoint path.
    """


@hookspec
def rlhfkit_on_stage_end(stage: str, stage_dir: Path, summary: dict[str, Any]) -> None:
    """Observe the end of a stage (rank 0 only).

    Called 1:N once a stage finished and exported its model, with the stage's directory
    and its summary (final metrics, export path). Not called for stages skipped because
    they were already done.
    """
