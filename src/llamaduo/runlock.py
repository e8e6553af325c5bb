"""One process at a time per run directory: an advisory `flock` on the run's lock file.

`hold(store, what)` takes the lock for a command (`run`, a stage command, `deploy`) or raises
`RunLocked` naming the holder (pid, host, command, since when). The kernel releases a flock
when its process dies, however it dies, so a lock left by a killed run is simply taken over;
the pid and host written into the file are there for the message only. `held(store)` tells
`llamaduo runs` whether a run whose manifest says "running" is really running.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from llamaduo.errors import UserError
from llamaduo.store import RunStore

T = TypeVar("T")


class RunLocked(UserError):
    """Another process holds the run directory."""


def _describe(info: dict[str, Any]) -> str:
    if not info:
        return "another process"
    return (f"pid {info.get('pid', '?')} on {info.get('host', '?')} ({info.get('command', '?')}, "
            f"since {info.get('since', '?')})")


def holder(store: RunStore) -> dict[str, Any]:
    """What the lock file says about its (last) holder; {} when unknown."""
    try:
        info = json.loads(store.lock_path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


@contextlib.contextmanager
def hold(store: RunStore, what: str) -> Iterator[None]:
    """Hold the run directory's lock while the block runs; `RunLocked` at once if someone else does."""
    path = store.lock_path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"{path}: cannot create the run's lock file ({e.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunLocked(
                f"{store.root}: in use by {_describe(holder(store))}; wait for it to finish or stop it, then rerun"
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": what,
                "argv": " ".join(sys.argv[1:])[:200], "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with contextlib.suppress(OSError):  # the holder's name is for messages; the flock is the lock
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def locked(store: RunStore, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` while holding the run directory (e.g. `deploy` from the CLI)."""
    with hold(store, what):
        return fn(*args, **kwargs)


def held(store: RunStore) -> bool:
    """Whether some process holds the run directory's lock right now."""
    try:
        fd = os.open(store.lock_path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)
