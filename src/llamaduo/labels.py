"""People's labels of candidates (`labels.jsonl`): read with every problem named, merged under a lock.

A label names one candidate of a round — (round, prompt_id, sample_index) — and gives a 1-100
score, a pass/fail, or both (see `artifacts.Label`). `llamaduo review` writes them one field at
a time; `llamaduo calibrate` reads them. Writes merge by that key (the last write of a field
wins) and rewrite the file atomically under an exclusive lock, so two tabs, or two review
servers, never lose each other's labels.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from llamaduo.artifacts import Label
from llamaduo.files import read_jsonl, write_jsonl
from llamaduo.ingest import DataError, Problem
from llamaduo.store import RunStore

_THREADS = threading.Lock()  # flock is per open file; threads of one process also need to queue


def read_labels(path: Path) -> list[Label]:
    """Every row of a labels file as a `Label`; a `DataError` listing each bad line and field."""
    path = Path(path)
    if not path.exists():
        raise DataError([Problem(source=str(path), message="no such labels file; label candidates with "
                                 "`llamaduo review RUN_DIR` or pass --labels FILE")], str(path))
    problems: list[Problem] = []
    out: list[Label] = []
    n = 0
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError([Problem(source=str(path), message="not UTF-8")], str(path)) from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(Problem(source=str(path), line=n, message=f"not JSON ({e.msg})"))
            continue
        try:
            out.append(Label.model_validate(row))
        except ValidationError as e:
            for err in e.errors():
                field = ".".join(str(x) for x in err.get("loc", ())) or None
                problems.append(Problem(source=str(path), line=n, field=field, message=err.get("msg", "invalid")))
    if problems:
        raise DataError(problems, str(path), records=n)
    return out


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock across threads and processes (fcntl where the OS has it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _THREADS, open(path, "a+b") as fh:
        try:
            import fcntl
        except ImportError:  # no fcntl (Windows): the thread lock alone
            yield
            return
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _key(row: dict[str, Any]) -> tuple[Any, Any, Any]:
    return row.get("round"), row.get("prompt_id"), row.get("sample_index")


def merge_labels(store: RunStore, updates: Iterable[Label | dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge label fields into `store.labels_path` by (round, prompt_id, sample_index); returns all rows.

    A `Label` sets the fields it was given (`model_fields_set`), so a score written after an
    agree keeps the agree. Each merged row is validated before anything is written."""
    with _locked(store.labels_lock):
        rows = read_jsonl(store.labels_path) if store.labels_path.exists() else []
        index = {_key(r): r for r in rows}
        for u in updates:
            fields = u.model_dump(mode="json", include=u.model_fields_set | {"round", "prompt_id", "sample_index"}) \
                if isinstance(u, Label) else dict(u)
            row = index.get(_key(fields))
            if row is None:
                row = index[_key(fields)] = {}
                rows.append(row)
            merged = {**row, **fields}
            Label.model_validate(merged)  # never write a row calibrate would refuse
            row.clear()
            row.update(merged)
        write_jsonl(store.labels_path, rows)
        return rows
