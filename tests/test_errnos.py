"""The exception -> errno table of docs/design.md."""

from __future__ import annotations

import errno

import pytest

from objfs import errors
from objfs.errnos import errno_for


@pytest.mark.parametrize(("exc", "code"), [
    (errors.NotFound("x"), errno.ENOENT),
    (errors.Denied("x"), errno.EACCES),
    (errors.Unavailable("x"), errno.EIO),
    (errors.Throttled("x"), errno.EIO),
    (errors.BucketMissing("x"), errno.EIO),
    (errors.Corrupt("x"), errno.EIO),
    (errors.CacheFull("x"), errno.ENOSPC),
    (errors.TooLarge("x"), errno.EFBIG),
    (errors.Immutable("x"), errno.EPERM),
    (errors.InvalidName("x"), errno.EPERM),
    (errors.BackendError("x"), errno.EIO),
    (OSError(errno.ENOSPC, "disk full"), errno.ENOSPC),
    (OSError(errno.ENOTEMPTY, "x"), errno.ENOTEMPTY),
    (RuntimeError("bug"), errno.EIO),
])
def test_errno_table(exc: BaseException, code: int) -> None:
    assert errno_for(exc) == code


def test_throttling_is_temporary_and_never_enoent() -> None:
    assert errors.Throttled.temporary and errors.Unavailable.temporary
    assert not errors.NotFound.temporary and not errors.Denied.temporary
    assert errno_for(errors.Throttled("slow down")) != errno.ENOENT
