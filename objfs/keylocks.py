"""One lock per attachment uuid, made on demand and dropped when nobody holds or awaits it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import trio


class KeyedLocks:
    """`hold(key)` serializes the tasks that change one attachment's placement (unlink, tier
    moves). Owner: the event loop. Not reentrant: a holder must not ask for its own key."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[trio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = trio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)
