"""Reading user data files record by record: JSONL, JSON, CSV, Parquet and saved HF datasets.

Each record comes back as a `RawRecord` holding its data or the reason it could not be read,
with its place in the file (`coverage.jsonl:7`, `f.csv:row 3`, `f.json[4]`), so validation can
name the file, line and field of every problem.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from llamaduo.errors import UserError

Unit = Literal["line", "row", "index"]


def location(source: str, line: int | None, unit: Unit = "line") -> str:
    """How a position is written: `f.jsonl:7` (line), `f.csv:row 3` (data row), `f.json[4]` (0-based index)."""
    if line is None:
        return source
    if unit == "index":
        return f"{source}[{line}]"
    if unit == "row":
        return f"{source}:row {line}"
    return f"{source}:{line}"


class Problem(BaseModel):
    """One thing wrong with an input: `str()` gives `coverage.jsonl:7: field 'response': missing`."""

    source: str
    line: int | None = None
    field: str | None = None
    message: str
    unit: Unit = "line"

    def __str__(self) -> str:
        field = f" field '{self.field}':" if self.field else ""
        return f"{location(self.source, self.line, self.unit)}:{field} {self.message}"


class DataError(UserError):
    """Every problem found in an input, each naming its file, line (or row) and field."""

    shown = 200  # the first problems are printed; the rest are counted

    def __init__(self, problems: list[Problem], source: str = "", records: int = 0):
        self.problems = problems
        self.source = source
        self.records = records
        n = len(problems)
        super().__init__(f"{source}: {n} problem{'s' if n != 1 else ''} in {records} records")

    def details(self) -> list[str]:
        more = [f"... and {len(self.problems) - self.shown} more"] if len(self.problems) > self.shown else []
        return [str(p) for p in self.problems[: self.shown]] + more


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One input record before mapping, or the reason it could not be read."""

    source: str  # file name, as shown in messages
    line: int  # JSONL: 1-based line; CSV: 1-based data row; JSON/Parquet/HF: 0-based index
    unit: Unit = "line"
    data: Any = None
    error: str | None = None

    @property
    def where(self) -> str:
        return location(self.source, self.line, self.unit)


TOO_DEEP = "bad JSON: nested too deeply to be a record"

_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def detect_format(path: Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "hf"
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        msg = f"unknown format '{suffix}': use .jsonl, .json, .csv, .parquet, a saved HF dataset dir, or set data.format"
        raise DataError([Problem(source=path.name, message=msg)], path.name)
    return _SUFFIXES[suffix]


def _fatal(src: str, message: str) -> DataError:
    return DataError([Problem(source=src, message=message)], src)


def read_records(path: Path, fmt: str = "auto") -> Iterator[RawRecord]:
    """Yield the input's records, each remembering where it came from.

    A bad record is yielded with `error` set (so every one gets reported); only an input that
    cannot be opened at all raises DataError.
    """
    path = Path(path)
    if not path.exists():
        raise _fatal(str(path), "no such file or directory")
    fmt = detect_format(path, fmt)
    reader = {
        "jsonl": _read_jsonl,
        "json": _read_json,
        "csv": _read_csv,
        "parquet": _read_parquet,
        "hf": _read_hf,
    }
    try:
        yield from reader[fmt](path, path.name)
    except IsADirectoryError:
        raise _fatal(str(path), f"is a directory; data.format={fmt} reads a file") from None
    except OSError as e:
        raise _fatal(str(path), f"cannot read ({e.strerror})") from None


def _read_jsonl(path: Path, src: str) -> Iterator[RawRecord]:
    with open(path, "rb") as fh:
        for i, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield RawRecord(src, i, error=f"undecodable bytes (not UTF-8) at column {e.start + 1}")
                continue
            if i == 1:
                text = text.removeprefix("\ufeff")
            if not text.strip():
                continue
            try:
                yield RawRecord(src, i, data=json.loads(text.rstrip("\r\n")))  # columns stay on this line
            except json.JSONDecodeError as e:
                yield RawRecord(src, i, error=f"bad JSON: {e.msg} (column {e.colno})")
            except RecursionError:
                yield RawRecord(src, i, error=TOO_DEEP)


def _bad_utf8_lines(blob: bytes, src: str) -> list[RawRecord]:
    """One record per physical line that is not valid UTF-8, so each gets named."""
    bad = []
    for i, raw in enumerate(blob.split(b"\n"), start=1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad.append(RawRecord(src, i, error=f"undecodable bytes (not UTF-8) at column {e.start + 1}"))
    return bad


def _read_json(path: Path, src: str) -> Iterator[RawRecord]:
    blob = path.read_bytes()
    try:
        items = json.loads(blob.decode("utf-8-sig"))
    except UnicodeDecodeError:
        yield from _bad_utf8_lines(blob, src)
        return
    except json.JSONDecodeError as e:
        yield RawRecord(src, e.lineno, error=f"bad JSON: {e.msg} (column {e.colno})")
        return
    except RecursionError:
        yield RawRecord(src, 1, error=TOO_DEEP)
        return
    if isinstance(items, dict) and isinstance(items.get("data"), list):
        items = items["data"]  # {"data": [...]}, a common export shape
    if not isinstance(items, list):
        yield RawRecord(
            src, 1, error=f"a .json input must be an array of records, got {type(items).__name__}"
        )
        return
    for i, item in enumerate(items):
        yield RawRecord(src, i, unit="index", data=item)


def _read_csv(path: Path, src: str) -> Iterator[RawRecord]:
    blob = path.read_bytes()
    try:
        text = blob.decode("utf-8-sig")
    except UnicodeDecodeError:
        yield from _bad_utf8_lines(blob, src)
        return
    reader = csv.DictReader(io.StringIO(text, newline=""))
    i = 0
    try:
        for i, row in enumerate(reader, start=1):
            if None in row:  # DictReader files surplus cells under the key None
                yield RawRecord(
                    src, i, unit="row", error=f"{len(row[None])} more cell(s) than the header has columns"
                )
                continue
            yield RawRecord(src, i, unit="row", data=row)
    except csv.Error as e:
        yield RawRecord(src, i + 1, unit="row", error=f"bad CSV: {e}")


def _read_parquet(path: Path, src: str) -> Iterator[RawRecord]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise _fatal(src, "reading Parquet needs: pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise _fatal(src, f"not a readable Parquet file: {e}") from None
    for i, row in enumerate(table.to_pylist()):
        yield RawRecord(src, i, unit="index", data=row)


def _read_hf(path: Path, src: str) -> Iterator[RawRecord]:
    try:
        import datasets
    except ImportError:
        raise _fatal(src, "reading a saved HF dataset needs: pip install datasets") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # missing state/info files, wrong directory, ...
        raise _fatal(src, f"not a dataset saved with save_to_disk: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        split_name = "train" if "train" in ds else next(iter(ds))
        src = f"{src}/{split_name}"
        ds = ds[split_name]
    for i, row in enumerate(ds):
        yield RawRecord(src, i, unit="index", data=row)
