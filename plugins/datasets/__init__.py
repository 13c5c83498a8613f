"""The ``file`` dataset: rows for a stage from local jsonl, json, parquet, csv or arrow files.

::

    dataset: {name: file, path: data/prefs.jsonl, schema: preference}

See docs/data.md for the schemas, formats, column renaming and error handling.
"""

from __future__ import annotations

from typing import Any

from rlhfkit import ComponentSpec, hookimpl
from rlhfkit.plugins.datasets.config import FileDatasetConfig
from rlhfkit.plugins.datasets.dataset import FileDataset
from rlhfkit.plugins.datasets.schemas import SCHEMAS, ranks_from_scores

__all__ = ["SCHEMAS", "FileDataset", "FileDatasetConfig", "build", "ranks_from_scores",
           "rlhfkit_components"]


def build(config: FileDatasetConfig, context: Any) -> FileDataset:
    """Find the files now (a wrong path fails before any model loads); read them on the
    first ``rows()`` call. ``context`` is unused: paths are relative to the current
    directory."""
    return FileDataset(config)


@hookimpl
def rlhfkit_components() -> list[ComponentSpec]:
    return [ComponentSpec(
        kind="dataset", name="file", config=FileDatasetConfig, factory=build,
        yields=lambda config: frozenset({config.schema_}),
        doc="rows from local jsonl/json/parquet/csv/arrow files, validated against a "
            "schema (prompt-completion, preference, ranking, unpaired, messages, prompt, text)")]
