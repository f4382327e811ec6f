"""The exception -> errno table of docs/design.md."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

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
    (errors.JournalDamaged("x"), errno.EIO),
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


def test_a_full_journal_disk_is_enospc_and_other_journal_errors_eio(tmp_path: Path) -> None:
    """SQLite's own "database or disk is full" (SQLITE_FULL, here from a page limit rather than
    a full file system: the same result code) is ENOSPC for Orthanc; any other SQLite error
    stays EIO."""
    db = sqlite3.connect(tmp_path / "journal.sqlite")
    db.execute("PRAGMA max_page_count = 4")
    db.execute("CREATE TABLE t (b BLOB)")
    with pytest.raises(sqlite3.OperationalError) as full:
        db.execute("INSERT INTO t VALUES (?)", (b"x" * 100_000,))
    assert errno_for(full.value) == errno.ENOSPC
    with pytest.raises(sqlite3.OperationalError) as other:
        db.execute("SELECT * FROM no_such_table")
    assert errno_for(other.value) == errno.EIO
    db.close()
