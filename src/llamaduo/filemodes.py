"""File modes that follow the user's umask.

`tempfile.mkstemp`/`mkdtemp` (behind every atomic write and staging directory) create 0600/0700,
so a run directory or an export would be unreadable by the service account that serves it.
"""

from __future__ import annotations

import os
from pathlib import Path


def umask_mode(directory: bool = False) -> int:
    """The mode a plain open()/mkdir() would give under the current umask."""
    mask = os.umask(0o022)  # reading the umask means setting it; it is put back at once
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def apply_umask(tree: Path) -> None:
    """Give a directory tree the modes the umask allows (libraries that save via temp files leave 0600)."""
    tree.chmod(umask_mode(directory=True))
    for p in tree.rglob("*"):
        if not p.is_symlink():
            p.chmod(umask_mode(directory=p.is_dir()))
