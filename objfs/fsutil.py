"""Small local-filesystem helpers shared by the local tier, the file-system tier and the local
backend."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by path (a directory, after a rename into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fd_path(fd: int) -> Path:
    """A path that opens the file behind `fd` (even if it was unlinked or replaced)."""
    return Path(f"/proc/self/fd/{fd}")
