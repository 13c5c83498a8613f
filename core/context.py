"""What a component's factory receives: where the stage runs and how to build others."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhfkit.errors import UserError
from rlhfkit.recipe import TrainerSection
from rlhfkit.registry import ComponentRef, Registry


@dataclass
class StageContext:
    """The run a component is built for. ``StageContext(registry)`` alone builds
    components (nested ones included) outside any run, e.g. in tests and notebooks.

    Attributes:
        registry: the component registry (build nested components with :meth:`build`).
        stage: this stage's name.
        stage_dir: this stage's directory inside the run directory.
        seed: the run's seed (per-rank seeds are derived by the core).
        exports: ``{earlier stage name: its exported model directory}``.
        slots: the stage's filled component slots (resolved references).
        trainer: the stage's ``trainer:`` section (batch sizes, steps, devices).
        cache: per-run memo for expensive shared objects (e.g. a generated task), so
            components that refer to the same thing share one instance.
        recipe_dir: the folder of the recipe file being run: files a recipe names (a
            Python reward) are relative to it; the working directory outside a run.
    """

    registry: Registry
    stage: str = "standalone"
    stage_dir: Path = field(default_factory=Path.cwd)
    seed: int = 0
    exports: dict[str, Path] = field(default_factory=dict)
    slots: dict[str, Any] = field(default_factory=dict)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    cache: dict[Any, Any] = field(default_factory=dict)
    recipe_dir: Path = field(default_factory=Path.cwd)

    def build(self, reference: ComponentRef) -> Any:
        """Build the component a (resolved) reference names."""
        return self.registry.build(reference, self)

    def component(self, slot: str) -> Any:
        """Build what fills ``slot``: a component, a list (``many`` slots) or ``None``."""
        value = self.slots.get(slot)
        if value is None:
            return None
        if isinstance(value, list):
            return [self.build(item) for item in value]
        return self.build(value)

    def export_of(self, stage: str) -> Path:
        """The exported model directory of an earlier stage."""
        try:
            return self.exports[stage]
        except KeyError:
            known = ", ".join(self.exports) or "none"
            raise UserError(
                f"stage {self.stage!r} refers to stage {stage!r}, which has no exported model "
                f"yet (finished earlier stages: {known}). List {stage!r} before {self.stage!r} "
                f"in `stages:`."
            ) from None

    def shared(self, key: Any, make: Any) -> Any:
        """Return ``cache[key]``, calling ``make()`` the first time."""
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]
