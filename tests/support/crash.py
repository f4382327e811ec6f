"""A process crash as the journal sees it, for in-process tests."""

from __future__ import annotations

from collections.abc import Callable

from objfs.journal import Journal


def abandon(journal: Journal, meanwhile: Callable[[], None] | None = None) -> None:
    """Close `journal` as a dying process leaves it: what it kept in memory is lost (its
    SQLite commits and the intent log's writes are in the files). `meanwhile` runs once the
    SQLite connections are closed (to put the files back as a power loss would leave them)."""
    with journal._cache_lock:
        journal._unapplied.clear()
        journal._marked.clear()
        journal._uploaded.clear()
    for db in {journal._db, journal._lazy, journal._reader}:
        db.close()
    if meanwhile is not None:
        meanwhile()
    if journal._intents is not None:
        journal._intents.close()
        journal._intents = None
