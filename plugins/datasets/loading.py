"""Finding data files and reading their records.

Columnar files (parquet, csv, arrow) are read with the ``datasets`` library, through
``datasets.Dataset.from_parquet/from_csv`` rather than ``datasets.load_dataset``: the
latter asks the network to count the download even for local files, and no network is
reachable on many training machines. The library writes its Arrow cache into a temporary
directory removed afterwards and keeps the data in memory, so nothing is ever written next
to the user's files or into ``~/.cache/huggingface``.

JSON and JSON Lines are parsed with the standard library instead. Arrow needs one type
per column, so a single malformed row (a number where text belongs) either fails the
whole file or silently changes the column's type, depending on the ``datasets`` version;
parsed record by record, that row is reported as itself, with its line number, and
``on_error: skip`` can drop it.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhfkit import DataError
from rlhfkit.files import decode_utf8, non_unicode_path
from rlhfkit.plugins.datasets.config import Format, format_from_name, is_glob

if TYPE_CHECKING:
    import datasets
    import pyarrow


def find_files(path: str) -> list[Path]:
    """The files ``path`` names: itself, or every file its glob matches, sorted.

    Relative paths are resolved against the current directory; the returned paths keep
    the user's spelling so error messages show what the recipe says.
    """
    expanded = os.path.expanduser(path)
    where = f"relative paths are resolved against the current directory, {os.getcwd()}"
    if is_glob(expanded):
        files = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
        if not files:
            raise DataError(
                f"no data file matches {path!r} ({where}). Check the pattern, or give an "
                f"absolute path.")
        return files
    file = Path(expanded)
    if file.is_dir():
        raise DataError(
            f"data path {path!r} is a directory; name the files in it with a glob, e.g. "
            f"path: {os.path.join(path, '*.jsonl')}")
    if not file.is_file():
        raise DataError(
            f"data file {path!r} not found (looked for {file.absolute()}; {where}). Check "
            f"the path, or give an absolute one.")
    return [file]


def file_format(file: Path, configured: str) -> Format:
    """The format to read ``file`` with: the configured one, or its ending's."""
    if configured != "auto":
        return configured  # type: ignore[return-value]  # the config's Literal minus "auto"
    fmt = format_from_name(file.name)
    if fmt is None:
        raise DataError(
            f"cannot tell the format of data file {str(file)!r} from its ending; set "
            f"format: to one of jsonl, json, parquet, csv, arrow (or narrow the glob)")
    return fmt


#: One record as read: where it is, and its fields, or why it could not be parsed.
Item = tuple[str, "dict[str, Any] | Unparsable"]


class Unparsable(str):
    """Why a record (a JSON line) could not be read; a malformed row like any other."""


class Records(ABC):
    """The records of one file: its column names, and the records with where each is."""

    def __init__(self, columns: list[str]):
        self.columns = columns

    @abstractmethod
    def __len__(self) -> int:
        """How many records the file holds, valid or not (a JSON line that does not
        parse is one)."""

    @abstractmethod
    def select(self, column_of: dict[str, str]) -> Iterator[Item]:
        """``(where, {field: value})`` for each record, from the columns ``column_of``
        names (``{schema field: file column}``)."""

    @abstractmethod
    def take(self, indices: list[int], column_of: dict[str, str]) -> list[Item]:
        """Like :meth:`select`, for the records at ``indices`` (0-based, in that order)."""


class JsonRecords(Records):
    def __init__(self, items: list[Item]):
        super().__init__(list(dict.fromkeys(
            key for _, item in items if isinstance(item, dict) for key in item)))
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def select(self, column_of: dict[str, str]) -> Iterator[Item]:
        for where, item in self.items:
            yield where, self._fields(item, column_of)

    def take(self, indices: list[int], column_of: dict[str, str]) -> list[Item]:
        return [(self.items[i][0], self._fields(self.items[i][1], column_of)) for i in indices]

    @staticmethod
    def _fields(item: dict[str, Any] | Unparsable, column_of: dict[str, str]
                ) -> dict[str, Any] | Unparsable:
        if isinstance(item, Unparsable):
            return item
        # An absent key stays absent, so the row is reported as missing the field.
        return {field: item[column] for field, column in column_of.items() if column in item}


class TableRecords(Records):
    _BATCH = 1024  # rows turned into Python at a time: far faster than row-by-row access

    def __init__(self, table: datasets.Dataset):
        super().__init__(list(table.column_names))
        self.table = table

    def __len__(self) -> int:
        return len(self.table)

    def select(self, column_of: dict[str, str]) -> Iterator[tuple[str, dict[str, Any]]]:
        columns, index = list(column_of.values()), 0
        for batch in self.table.select_columns(columns).iter(batch_size=self._BATCH):
            size = len(batch[columns[0]])
            for offset in range(size):
                yield (f"row {index + offset} (0-based)",
                       {field: batch[column][offset] for field, column in column_of.items()})
            index += size

    def take(self, indices: list[int], column_of: dict[str, str]) -> list[Item]:
        table = self.table.select_columns(list(dict.fromkeys(column_of.values())))
        columns = table.select(indices)[:]
        return [(f"row {index} (0-based)",
                 {field: columns[column][k] for field, column in column_of.items()})
                for k, index in enumerate(indices)]


def read_file(file: Path, fmt: Format) -> Records:
    """Read one file into memory; a file that cannot be parsed raises :class:`DataError`."""
    if fmt in ("jsonl", "json"):
        return JsonRecords(_read_json(file))
    # Imported here: it takes a second, and plugin discovery imports this package for
    # every CLI command, most of which read no data.
    import datasets

    with tempfile.TemporaryDirectory(prefix="rlhfkit-data-") as cache:
        try:
            if fmt == "parquet":
                table = datasets.Dataset.from_parquet(str(file), cache_dir=cache,
                                                      keep_in_memory=True)
            elif fmt == "csv":
                # Every CSV cell is text: without this a prompt column of numbers would
                # arrive as integers ("007" as 7). Numeric fields are converted per row.
                features = datasets.Features(
                    {name: datasets.Value("string") for name in _csv_header(file)})
                table = datasets.Dataset.from_csv(str(file), cache_dir=cache,
                                                  keep_in_memory=True, features=features)
            else:
                table = datasets.Dataset(_read_arrow(file))
        except DataError:
            raise
        except Exception as exc:  # the library's message is all a malformed file gives us
            raise DataError(
                f"could not read data file {str(file)!r} as {fmt}: {type(exc).__name__}: "
                f"{exc}. Fix the file, or set format: if its ending is misleading.") from exc
    return TableRecords(table)


def _decoded(file: Path) -> str:
    """A data file's text: UTF-8, a byte-order mark accepted; otherwise a
    :class:`DataError` naming the line."""
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise DataError(f"data file {str(file)!r} cannot be read ({exc.strerror or exc}).") from None
    return decode_utf8(raw, f"data file {str(file)!r}", DataError)


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for key, value in pairs:
        if key in record:
            raise _DuplicateKey(f"has the key {key!r} twice; keep one")
        record[key] = value
    return record


def _loads(text: str) -> Any:
    """``json.loads`` that refuses duplicate keys; other failures as :class:`ValueError`
    (too-long integers, nesting too deep) or :class:`json.JSONDecodeError`."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise ValueError("is nested too deeply") from None


def _read_json(file: Path) -> list[Item]:
    """The records of a JSON array file or a JSON Lines file (whatever its ending says)."""
    text = _decoded(file)
    try:
        document = _loads(text)
    except _DuplicateKey as exc:
        if text.lstrip().startswith("["):
            raise DataError(f"data file {str(file)!r}: a record {exc}. Fix the file.") from None
    except json.JSONDecodeError as whole:
        # "Extra data" after a complete first value means JSON Lines; anything else in a
        # JSON array leaves no record to recover.
        if whole.msg != "Extra data" and text.lstrip().startswith("["):
            raise DataError(
                f"data file {str(file)!r} is not valid JSON: line {whole.lineno} column "
                f"{whole.colno}: {whole.msg}. Fix the file.") from None
    except ValueError as exc:  # an integer too long to convert, nesting too deep
        if text.lstrip().startswith("["):
            raise DataError(f"data file {str(file)!r}: a record {_reason(exc)}. Fix the file.") from None
    else:
        if isinstance(document, list):
            return [(f"record {i} (0-based)", _as_record(item)) for i, item in enumerate(document)]
    items: list[Item] = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():  # blank lines hold no record but still count as lines
            try:
                record = _as_record(_loads(line))
            except json.JSONDecodeError as exc:
                # e.g. the last line of a file whose writer was interrupted
                record = Unparsable(f"is not valid JSON ({exc.msg} at column {exc.colno})")
            except ValueError as exc:
                record = Unparsable(_reason(exc))
            items.append((f"line {number}", record))
    return items


def _reason(exc: ValueError) -> str:
    text = str(exc)
    if "integer string conversion" in text:
        return "holds an integer with more digits than Python converts (4300)"
    return text if text.startswith(("has ", "is ", "holds ")) else f"is not usable ({text})"


def _as_record(item: Any) -> dict[str, Any] | Unparsable:
    if isinstance(item, dict):
        if non_unicode_path(item) is not None:
            return Unparsable("holds a lone surrogate escape (such as \\ud800), which is not text")
        return item
    return Unparsable(f"is a JSON {type(item).__name__}, not an object of named fields "
                      f"like {{\"prompt\": ...}}")


def _csv_header(file: Path) -> list[str]:
    text = _decoded(file)  # the whole file: an encoding error anywhere is reported with its line
    header = next(csv.reader(text.splitlines()[:1]), None)
    if not header:
        raise DataError(f"data file {str(file)!r} is empty: a CSV file needs a header row "
                        f"naming its columns")
    twice = sorted({name for name in header if header.count(name) > 1})
    if twice:
        raise DataError(f"data file {str(file)!r}: the header names column(s) {', '.join(map(repr, twice))} "
                        f"more than once; rename them so each column has its own name.")
    return header


def _read_arrow(file: Path) -> pyarrow.Table:
    """An Arrow IPC file in either layout: the stream one ``datasets`` writes, or the
    random-access "file" one (Feather v2, polars ``write_ipc``)."""
    import pyarrow as pa

    try:
        with pa.OSFile(str(file)) as source:
            return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        with pa.OSFile(str(file)) as source:
            return pa.ipc.open_file(source).read_all()
