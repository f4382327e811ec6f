"""Small local-filesystem helpers shared by the local tier, the file-system tier, the local
backend and rekey."""

from __future__ import annotations

import hashlib
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


def sha256_file(path: Path) -> tuple[int, str]:
    """(size, hex sha256) of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()
