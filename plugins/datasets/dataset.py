"""The ``file`` dataset: typed, validated rows from local data files."""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import ValidationError

from rlhfkit import DataError, Row
from rlhfkit.plugins.datasets.config import FileDatasetConfig, csv_problem
from rlhfkit.plugins.datasets.loading import Unparsable, file_format, find_files, read_file
from rlhfkit.plugins.datasets.schemas import SCHEMAS, Schema, describe_problem

logger = logging.getLogger(__name__)

#: How many row problems a skipping dataset keeps to show (the count is always exact).
MAX_PROBLEMS = 10


class FileDataset:
    """Rows of one schema from one or more local files.

    The files are found when the dataset is built (a wrong path fails early) and read
    and validated on the first :meth:`rows` call; the rows are then cached.

    Attributes:
        path: the configured path or glob, as written.
        files: the files it names, in the order they are read.
    """

    def __init__(self, config: FileDatasetConfig):
        self.config = config
        self.schema: Schema = SCHEMAS[config.schema_]
        self.path = config.path
        self.files: tuple[Path, ...] = tuple(find_files(config.path))
        for file in self.files:  # a glob may match files whose ending rules them out
            problem = csv_problem(config.schema_, file_format(file, config.format))
            if problem:
                raise DataError(f"data file {str(file)!r}: {problem}")
        self._rows: list[Row] | None = None
        self._skipped = 0
        self._problems: list[str] = []

    def rows(self) -> list[Row]:
        """Every valid row (the first ``limit`` of them when a limit is set)."""
        if self._rows is None:
            self._rows = self._load()
        return self._rows

    @property
    def skipped(self) -> int:
        """How many malformed rows ``on_error: skip`` left out (reads the data)."""
        self.rows()
        return self._skipped

    @property
    def problems(self) -> list[str]:
        """What was wrong with the first few skipped rows (reads the data)."""
        self.rows()
        return list(self._problems)

    def __len__(self) -> int:
        return len(self.rows())

    def __repr__(self) -> str:
        return f"FileDataset(path={self.path!r}, schema={self.schema.name!r})"

    # ------------------------------------------------------------------ reading

    def _load(self) -> list[Row]:
        limit, rows, seen = self.config.limit, [], 0
        for file in self.files:
            if limit is not None and len(rows) >= limit:
                break  # later files are not even read
            records = read_file(file, file_format(file, self.config.format))
            if not records.columns:
                continue  # an empty file (a JSON shard with no records) has nothing to check
            column_of = self._columns_for(file, records.columns)
            for where, record in records.select(column_of):
                seen += 1
                if isinstance(record, Unparsable):
                    self._reject(f"{file} {where} {record}", "fix the line")
                    continue
                try:
                    rows.append(self.schema.record.model_validate(record).to_row())
                except ValidationError as exc:
                    problem, missing = describe_problem(exc, column_of)
                    self._reject(f"{file} {where}: {problem}", self._how_to_fix(missing))
                if limit is not None and len(rows) >= limit:
                    break
        if not seen:
            raise DataError(f"no rows in {self.path!r}: the data is empty. Check the path.")
        if not rows:
            raise DataError(f"no valid rows in {self.path!r}: all {seen} read were malformed; "
                            f"for example: {'; '.join(self._problems[:3])}")
        if self._skipped:
            logger.warning("%s: skipped %d malformed row(s) of %d (on_error: skip); first: %s",
                           self.path, self._skipped, seen, self._problems[0])
        return rows

    def _reject(self, problem: str, fix: str) -> None:
        if self.config.on_error == "raise":
            raise DataError(f"{problem} ({fix}, or set on_error: skip to leave malformed "
                            f"rows out)")
        self._skipped += 1
        if len(self._problems) < MAX_PROBLEMS:
            self._problems.append(problem)

    def _how_to_fix(self, missing: bool) -> str:
        if missing:
            return (f"schema {self.schema.name!r} needs {self.schema.needs()}; map other "
                    f"column names with columns: {{file column: field}}")
        return "fix the row"

    def _columns_for(self, file: Path, names: list[str]) -> dict[str, str]:
        """``{schema field: file column}`` for the fields this file provides.

        A column renamed by ``columns`` wins over one that has the field's own name. A
        required field no column provides is one error for the whole file, rather than
        one per row.
        """
        renames = self.config.columns
        column_of = {field: column for column, field in renames.items() if column in names}
        for field in self.schema.fields:
            if field not in column_of and field in names and field not in renames:
                column_of[field] = field
        missing = [f for f in self.schema.required if f not in column_of]
        if self.schema.one_of and not any(f in column_of for f in self.schema.one_of):
            missing.append(" or ".join(self.schema.one_of))
        if missing:
            absent = [c for c in renames if c not in names]
            raise DataError(
                f"data file {str(file)!r} has no column for {', '.join(missing)}: schema "
                f"{self.schema.name!r} needs {self.schema.needs()}, and the file's columns "
                f"are {', '.join(names) or 'none'}"
                + (f" (columns: renames {', '.join(absent)}, which the file lacks)"
                   if absent else "")
                + ". Rename the file's columns with columns: {file column: field}.")
        return column_of
