"""Small local-filesystem helpers shared by the local tier, the file-system tier, the local
backend and rekey."""

from __future__ import annotations

import ctypes
import hashlib
import os
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by path (a directory, after a rename into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(path: Path) -> None:
    """Write out everything buffered for the file system holding `path` (syncfs(2)): one
    call makes every earlier write on it durable. Raises OSError."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"syncfs {path}: {os.strerror(code)}")
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
