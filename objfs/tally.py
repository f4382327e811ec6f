"""Plain counters that the store and the FUSE layer bump on the event loop.

A leaf module (no Prometheus, no store): `objfs.metrics` reads the counters at scrape time.
Owner: the event-loop thread; nothing else writes them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from objfs.errors import ObjfsError


@dataclass
class Tally:
    """Counters since the daemon started."""

    uploads: int = 0
    bucket_lookups: int = 0  # lookups of names the journal did not know (LIST or HEAD)
    upload_errors: Counter[str] = field(default_factory=Counter)  # by error class
    fuse_ops: Counter[tuple[str, str]] = field(default_factory=Counter)  # (op, errno name)
    # pyfuse3's waits for /dev/fuse (`objfs.fuseloop`): "ready" (a request was queued, read at
    # once) or "parked" (the loop waited through trio)
    fuse_waits: Counter[str] = field(default_factory=Counter)


def error_class(exc: BaseException) -> str:
    """The label for a failure: the objfs error class, or ``Other``."""
    return type(exc).__name__ if isinstance(exc, ObjfsError) else "Other"
