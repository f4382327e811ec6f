"""objfs' own exceptions.

Backends translate SDK exceptions into these; the cache and store raise them; `objfs.errnos`
maps them to errno values in one place. `temporary` says whether retrying may help soon;
`final` that it never will, not even for background work that retries everything else.
"""

from __future__ import annotations

import sqlite3


class ObjfsError(Exception):
    """Base class of every error objfs raises on purpose."""

    temporary = False
    final = False


class ConfigError(ObjfsError):
    """The configuration is invalid: one or more problems, each naming its JSON path (the
    message has one per line)."""

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


class BackendError(ObjfsError):
    """A backend call failed."""


class NotFound(BackendError):
    """The object (or attachment) does not exist."""


class BucketMissing(BackendError):
    """The bucket or container does not exist: a configuration problem, not a missing file."""


class Denied(BackendError):
    """The backend refused the credentials or the operation (HTTP 401/403)."""


class Unavailable(BackendError):
    """The backend could not be reached, timed out or answered a server error."""

    temporary = True


class Throttled(Unavailable):
    """The backend asked us to slow down (HTTP 429/503 SlowDown)."""


class Unsupported(BackendError):
    """The store does not implement an optional request (a batch delete on some
    S3-compatible servers); the caller falls back to plain requests."""

    final = True


class TooLarge(BackendError):
    """The object exceeds what the backend accepts in one object."""


class Corrupt(ObjfsError):
    """Stored bytes failed an integrity, size or decryption check."""


class CacheFull(ObjfsError):
    """The local cache budget is full of data that is not yet in the bucket."""


class LocalDiskFull(ObjfsError):
    """A download found no room on the cache directory's disk for the local file it writes:
    the disk's condition, not the bucket's (never retried as a bucket failure)."""


class JournalDamaged(ObjfsError, sqlite3.DatabaseError):
    """The journal's SQLite file is damaged (not a database, or malformed). Also an
    `sqlite3.DatabaseError`, which it replaces: code that copes with a failing journal
    (a full disk) copes with this one the same way."""


class Immutable(ObjfsError):
    """An attempt to change an attachment after it was written."""


class InvalidName(ObjfsError):
    """A path that is neither an attachment nor a pass-through name."""


class OrthancUnavailable(ObjfsError):
    """Orthanc's REST API (used to resolve resources to attachments) failed or is unreachable."""

    temporary = True
