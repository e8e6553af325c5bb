"""One file at a time: atomic writes, JSON and JSONL, and typed reads that fail in one line.

Every write goes to a temporary sibling, is fsynced and renamed over the target, so a killed
process never leaves a half-written file that a later run would trust. `read_model` / `read_rows`
parse a file as a pydantic type; a missing, corrupt or foreign file is a `UserError` naming the
file (and line), the field and what to rerun. `store` names the files; this module never does.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from llamaduo.errors import UserError
from llamaduo.filemodes import umask_mode


# ------------------------------------------------------------------ atomic file I/O
def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write_chunks(path, (data,))


def atomic_write_chunks(path: Path, chunks: Iterable[bytes]) -> None:
    """Write `chunks` one after another (never all in memory at once), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, umask_mode())  # mkstemp makes 0600; the file should read as the user's umask says
        with os.fdopen(fd, "wb") as fh:
            for data in chunks:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def jsonl_line(row: Any) -> str:
    """One row (a dict or a pydantic model) as the JSONL line `write_jsonl` writes, newline excluded."""
    if hasattr(row, "model_dump"):
        row = row.model_dump(mode="json", exclude_none=True)
    return json.dumps(row, ensure_ascii=False, default=str)


def write_jsonl(path: Path, rows: Iterable[Any]) -> int:
    """Write rows (dicts, pydantic models, or lines already made by `jsonl_line`) as JSONL
    atomically, streaming; returns the count."""
    count = 0

    def chunks():
        nonlocal count
        buf: list[str] = []
        for row in rows:
            buf.append((row if isinstance(row, str) else jsonl_line(row)) + "\n")
            count += 1
            if len(buf) >= 4096:
                yield "".join(buf).encode("utf-8")
                buf.clear()
        if buf:
            yield "".join(buf).encode("utf-8")

    atomic_write_chunks(path, chunks())
    return count


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                out.append(json.loads(line))
    return out


# ------------------------------------------------------------------- typed reads
M = TypeVar("M", bound=BaseModel)


def _problem(e: ValidationError) -> str:
    first = e.errors()[0]
    loc = ".".join(str(x) for x in first.get("loc", ()))
    return (f"field '{loc}': " if loc else "") + first.get("msg", "invalid")


def read_model(path: Path, model: type[M], rerun: str) -> M:
    """One JSON file as `model`; a missing, corrupt or foreign file is a one-line UserError."""
    try:
        return model.model_validate_json(Path(path).read_bytes())
    except FileNotFoundError:
        raise UserError(f"{path}: missing; {rerun}") from None
    except ValidationError as e:
        raise UserError(f"{path}: {_problem(e)}; {rerun}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror}); {rerun}") from None


def read_rows(path: Path, model: type[M], rerun: str) -> list[M]:
    """A JSONL file as rows of `model`, each problem named by its line."""
    out: list[M] = []
    try:
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        out.append(model.model_validate_json(line))
                    except ValidationError as e:
                        raise UserError(f"{path}:{n}: {_problem(e)}; {rerun}") from None
    except FileNotFoundError:
        raise UserError(f"{path}: missing; {rerun}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8; {rerun}") from None
    return out


