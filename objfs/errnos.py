"""The one exception -> errno table (docs/design.md, "Errno table").

FUSE handlers call `errno_for` at the syscall boundary and nowhere else decides an errno.
"""

from __future__ import annotations

import errno

from objfs import errors

_TABLE: tuple[tuple[type[BaseException], int], ...] = (
    (errors.NotFound, errno.ENOENT),
    (errors.Denied, errno.EACCES),
    (errors.BucketMissing, errno.EIO),
    (errors.Unavailable, errno.EIO),  # Throttled included: retried first, never ENOENT
    (errors.Corrupt, errno.EIO),
    (errors.CacheFull, errno.ENOSPC),
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
    return errno.EIO
