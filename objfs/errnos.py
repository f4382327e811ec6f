"""The one exception -> errno table (docs/design.md, "Errno table").

FUSE handlers call `errno_for` at the syscall boundary and nowhere else decides an errno.
"""

from __future__ import annotations

import errno
import sqlite3

from objfs import errors

# SQLite's primary result codes (extended codes keep them in the low byte): "database or disk
# is full", a malformed database, a file that is not one.
SQLITE_FULL = 13
SQLITE_CORRUPT = 11
SQLITE_NOTADB = 26

_TABLE: tuple[tuple[type[BaseException], int], ...] = (
    (errors.NotFound, errno.ENOENT),
    (errors.Denied, errno.EACCES),
    (errors.BucketMissing, errno.EIO),
    (errors.Unavailable, errno.EIO),  # Throttled included: retried first, never ENOENT
    (errors.Corrupt, errno.EIO),
    (errors.CacheFull, errno.ENOSPC),
    (errors.LocalDiskFull, errno.ENOSPC),
    (errors.TooLarge, errno.EFBIG),
    (errors.Immutable, errno.EPERM),
    (errors.InvalidName, errno.EPERM),
)


def errno_for(exc: BaseException) -> int:
    """The errno a failed filesystem call reports for `exc` (EIO for anything unexpected)."""
    for cls, code in _TABLE:
        if isinstance(exc, cls):
            return code
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    if is_disk_full(exc):
        return errno.ENOSPC  # the journal's disk is full: no room to record a new file
    return errno.EIO


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` says the disk is full: ENOSPC, SQLite's SQLITE_FULL, or LocalDiskFull."""
    if isinstance(exc, errors.LocalDiskFull):
        return True
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    return _sqlite_result(exc) == SQLITE_FULL


def is_damaged_database(exc: BaseException) -> bool:
    """Whether `exc` is SQLite saying the file is not a database or is malformed."""
    return _sqlite_result(exc) in (SQLITE_CORRUPT, SQLITE_NOTADB)


def _sqlite_result(exc: BaseException) -> int | None:
    """SQLite's primary result code of `exc`, None for anything but an sqlite3.Error."""
    if not isinstance(exc, sqlite3.Error):
        return None
    return (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
