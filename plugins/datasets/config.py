"""Settings of the ``file`` dataset, checked when the recipe is validated."""

from __future__ import annotations

from pathlib import PurePath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from rlhfkit.plugins.datasets.schemas import SCHEMAS, SchemaName

Format = Literal["jsonl", "json", "parquet", "csv", "arrow"]

#: File name endings and the format each one means (for ``format: auto``).
FORMAT_OF_SUFFIX: dict[str, Format] = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
    ".pq": "parquet", ".csv": "csv", ".arrow": "arrow", ".feather": "arrow",
}

_GLOB_CHARACTERS = frozenset("*?[")


def format_from_name(name: str) -> Format | None:
    """The format a file name's ending says, or ``None`` when it says none."""
    return FORMAT_OF_SUFFIX.get(PurePath(name).suffix.lower())


def is_glob(path: str) -> bool:
    return any(c in _GLOB_CHARACTERS for c in path)


def csv_problem(schema: str, fmt: str) -> str:
    """Why ``schema`` cannot be read from ``fmt`` (empty when it can)."""
    lists = SCHEMAS[schema].lists
    if fmt != "csv" or not lists:
        return ""
    return (f"schema {schema!r} needs list columns ({', '.join(lists)}), which a CSV file "
            f"cannot hold; convert the file to jsonl or parquet")


class FileDatasetConfig(BaseModel):
    """Rows of one schema read from local data files."""

    # serialize_by_alias: the resolved recipe written into a run must say ``schema:``.
    model_config = ConfigDict(extra="forbid", serialize_by_alias=True)

    path: str = Field(
        min_length=1,
        description="A local file, or a glob of files (`data/train-*.parquet`, read in "
                    "sorted order). Relative paths are resolved against the current "
                    "directory, not the recipe's.")
    format: Literal["auto", "jsonl", "json", "parquet", "csv", "arrow"] = Field(
        "auto",
        description="How to read the files; `auto` decides from each file's ending "
                    "(.jsonl/.ndjson, .json, .parquet/.pq, .csv, .arrow/.feather).")
    # Named schema_ because `schema` shadows a BaseModel method; recipes write `schema:`.
    schema_: SchemaName = Field(
        alias="schema",
        description="The row layout: prompt-completion, preference, ranking, unpaired, messages, "
                    "prompt or text (see docs/data.md for the columns of each).")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Renames from the file's column to the schema's field, e.g. "
                    "`{question: prompt, answer: completion}`. Columns not needed are "
                    "ignored.")
    shuffle_seed: int | None = Field(
        None,
        description="Put the rows of all the files in a random order drawn from this seed "
                    "before `portion` and `limit` apply; every stage that reads the same "
                    "files with the same seed sees the same order. null keeps file order.")
    portion: tuple[float, float] | None = Field(
        None,
        description="Keep only the rows from fraction `start` (inclusive) to `end` "
                    "(exclusive) of all the files' rows, valid or not, in file order or "
                    "in `shuffle_seed`'s order: [0.0, 0.2] is the first 20 %. Portions "
                    "that meet, e.g. [0.0, 0.2], [0.2, 0.6] and [0.6, 1.0], split the rows "
                    "exactly. null keeps all.")
    limit: int | None = Field(
        None, ge=1,
        description="Keep only the first this many valid rows (files in sorted order; of "
                    "the portion, in its order, when `portion` or `shuffle_seed` is set); "
                    "null keeps all.")
    on_error: Literal["raise", "skip"] = Field(
        "raise",
        description="What a malformed row does: `raise` stops with an error naming the "
                    "file, row and field; `skip` leaves the row out, counts it and logs "
                    "one warning (an error still if no row is valid).")

    @field_validator("schema_")
    @classmethod
    def _format_can_hold_schema(cls, schema: str, info: ValidationInfo) -> str:
        path, fmt = info.data.get("path"), info.data.get("format")
        if path is None or fmt is None:  # reported as their own errors
            return schema
        if fmt == "auto":
            fmt = format_from_name(path)
            if fmt is None and not is_glob(path):
                folder = (f", or, if it is a folder, name its files with a glob such as "
                          f"{path.rstrip('/')}/*.jsonl" if not PurePath(path).suffix else "")
                raise ValueError(
                    f"cannot tell the format of {path!r} from its ending; set format: to "
                    f"one of jsonl, json, parquet, csv, arrow{folder}")
        problem = csv_problem(schema, fmt or "")
        if problem:
            raise ValueError(problem)
        return schema

    @field_validator("portion")
    @classmethod
    def _portion_is_a_range(cls, portion: tuple[float, float] | None
                            ) -> tuple[float, float] | None:
        if portion is not None and not 0.0 <= portion[0] < portion[1] <= 1.0:
            raise ValueError(
                f"portion [{portion[0]}, {portion[1]}] is not a part of the rows: it needs "
                f"0 <= start < end <= 1, e.g. [0.0, 0.2] for the first 20 % or [0.2, 0.6] "
                f"for the next 40 %")
        return portion

    @field_validator("columns")
    @classmethod
    def _renames_to_schema_fields(cls, columns: dict[str, str],
                                  info: ValidationInfo) -> dict[str, str]:
        schema = info.data.get("schema_")
        if schema is None:
            return columns
        fields = SCHEMAS[schema].fields
        for column, field in columns.items():
            if field not in fields:
                raise ValueError(
                    f"renames {column!r} to {field!r}, which schema {schema!r} does not have; "
                    f"its fields are {', '.join(fields)}")
        targets = list(columns.values())
        doubled = sorted({field for field in targets if targets.count(field) > 1})
        if doubled:
            raise ValueError(f"renames several columns to {', '.join(doubled)}; "
                             f"each field can come from one column only")
        return columns
