"""How commands talk to a person: the two consoles, one-line failures, and the rule that every
`UserError` becomes its message (after its detail lines) and exit code 2 — never a traceback."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from rich.console import Console

from llamaduo.config import Config
from llamaduo.config_file import load_config
from llamaduo.errors import UserError

console = Console()
err = Console(stderr=True)

SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a setting: a.b=value (repeatable).")]  # noqa: UP045


def fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def fail_with(e: UserError) -> NoReturn:
    """Detail lines (e.g. every file:line:field problem of a data file), then the one-line summary."""
    for line in e.details():
        err.print(line, highlight=False, markup=False, soft_wrap=True)
    fail(str(e))


def load_or_exit(path: Path, overrides: list[str] | None) -> Config:
    return call(load_config, path, overrides or [])


def run_dir_config(run_dir: Path, overrides: list[str] | None = None) -> Config:
    from llamaduo.store import RunStore

    store = RunStore(run_dir)
    if not store.config_path.exists():
        fail(f"{run_dir}: not a run directory (no config.yaml); create one with 'llamaduo prepare' or 'llamaduo run'")
    cfg = load_or_exit(store.config_path, overrides)
    # A run directory's config names itself: keep results where they are even if moved.
    return cfg.model_copy(update={"runs_dir": run_dir.parent, "name": run_dir.name})


# What the machine, not the code, got wrong: a full or read-only disk, a file we may not touch.
_DISK_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def call(fn, *args, **kwargs):
    """Call a library function; turn expected user-facing errors into one line + exit 2."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        fail_with(e)
    except KeyboardInterrupt:
        fail("interrupted; rerun the same command to resume", code=130)
    except OSError as e:
        if e.errno not in _DISK_ERRNOS:
            raise
        # Every write is atomic and a stage is done only once recorded: free the space (or fix the
        # permissions) and rerun to resume where this stopped.
        where = f"{e.filename}: " if e.filename else ""
        fail(f"{where}{e.strerror or e}; nothing was left half-written — fix this and rerun to resume")
    except sqlite3.DatabaseError as e:  # a full or read-only disk, or a damaged call log
        fail(f"service.sqlite: {e}; free space, fix permissions or move a damaged file aside, then rerun to resume")


