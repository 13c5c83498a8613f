"""The ``file`` dataset: typed, validated rows from local data files."""

from __future__ import annotations

import logging
import random
from bisect import bisect_right
from collections.abc import Iterator
from itertools import accumulate
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from rlhfkit import DataError, Row
from rlhfkit.plugins.datasets.config import FileDatasetConfig, csv_problem
from rlhfkit.plugins.datasets.loading import Unparsable, file_format, find_files, read_file
from rlhfkit.plugins.datasets.schemas import SCHEMAS, Schema, describe_problem

logger = logging.getLogger(__name__)

#: How many row problems a skipping dataset keeps to show (the count is always exact).
MAX_PROBLEMS = 10
#: Rows of a portion fetched from the files at a time (a ``limit`` stops between chunks).
_CHUNK = 4096

#: One record to validate: its file, ``{schema field: file column}``, where it is, and
#: its fields (or why it could not be parsed).
ReadRecord = tuple[Path, dict[str, str], str, dict[str, Any] | Unparsable]


def selected_positions(total: int, portion: tuple[float, float] | None,
                       shuffle_seed: int | None) -> list[int]:
    """The positions (0-based, over all the files' rows in file order) that ``portion``
    keeps, in the order they are read.

    The rows are first put in ``shuffle_seed``'s random order (when set); the portion
    ``[start, end]`` then keeps that order's rows ``round(start * total)`` up to, not
    including, ``round(end * total)``. Each boundary depends only on its own fraction, so
    portions that meet (``[0, 0.2]``, ``[0.2, 0.6]``, ``[0.6, 1]``) split the rows exactly.
    """
    order = list(range(total))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    start, end = portion or (0.0, 1.0)
    return order[round(start * total):round(end * total)]


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
        """Every valid row of the portion (the first ``limit`` of them when a limit is
        set)."""
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
        self._skipped, self._problems = 0, []  # a failed read is read again from the start
        limit, rows, seen = self.config.limit, [], 0
        for file, column_of, where, record in self._records():
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
                break  # with the files in file order, later files are not even read
        if not seen:
            raise DataError(f"no rows in {self.path!r}: the data is empty. Check the path.")
        if not rows:
            raise DataError(f"no valid rows in {self.path!r}: all {seen} read were malformed; "
                            f"for example: {'; '.join(self._problems[:3])}")
        if self._skipped:
            logger.warning("%s: skipped %d malformed row(s) of %d (on_error: skip); first: %s",
                           self.path, self._skipped, seen, self._problems[0])
        return rows

    def _records(self) -> Iterator[ReadRecord]:
        """The records to validate, in the order they are kept."""
        if self.config.portion is None and self.config.shuffle_seed is None:
            return self._records_in_file_order()
        return self._records_of_portion()

    def _records_in_file_order(self) -> Iterator[ReadRecord]:
        for file in self.files:  # one file in memory at a time
            records = read_file(file, file_format(file, self.config.format))
            # a JSON file with no readable record has no columns to check; its unreadable
            # lines are still reported as malformed rows
            column_of = self._columns_for(file, records.columns) if records.columns else {}
            for where, record in records.select(column_of):
                yield file, column_of, where, record

    def _records_of_portion(self) -> Iterator[ReadRecord]:
        """The portion's records, in shuffled order when ``shuffle_seed`` is set. A
        portion is a fraction of every file's rows, so all files are read first."""
        tables = []
        for file in self.files:
            records = read_file(file, file_format(file, self.config.format))
            if len(records):
                tables.append((file, records, self._columns_for(file, records.columns) if records.columns else {}))
        starts = list(accumulate((len(records) for _, records, _ in tables), initial=0))
        positions = selected_positions(starts[-1], self.config.portion, self.config.shuffle_seed)
        if starts[-1] and not positions:
            start, end = self.config.portion or (0.0, 1.0)
            raise DataError(
                f"portion [{start}, {end}] of the {starts[-1]} rows in {self.path!r} holds no "
                f"row; widen the portion or add data.")
        for first in range(0, len(positions), _CHUNK):
            chunk = positions[first:first + _CHUNK]
            wanted: dict[int, list[int]] = {}  # table -> its rows in this chunk, in order
            for position in chunk:
                table = bisect_right(starts, position) - 1
                wanted.setdefault(table, []).append(position - starts[table])
            found = {}
            for table, indices in wanted.items():
                file, records, column_of = tables[table]
                for index, (where, record) in zip(indices, records.take(indices, column_of),
                                                  strict=True):
                    found[starts[table] + index] = (file, column_of, where, record)
            yield from (found[position] for position in chunk)

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
        if self.schema.keeps_other_columns:
            used = set(column_of.values())
            column_of.update({name: name for name in names if name not in used and name not in column_of})
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
