"""Background tasks that never take the mount down (docs/durability.md, invariant 8).

Every long-lived background task of the daemon and of the store runs under `supervised`: an
exception it raises (a bug, a journal on a full disk) is logged with its traceback and the task
starts again after a pause that doubles up to `MAX_DELAY`. Cancellation passes through.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger(__name__)

FIRST_DELAY = 1.0
MAX_DELAY = 60.0


async def supervised(what: str, fn: Callable[[], Awaitable[None]]) -> None:
    """Run `fn` until it returns; each time it raises an Exception, log it and run it again
    after FIRST_DELAY, then twice as long each time up to MAX_DELAY."""
    delay = FIRST_DELAY
    while True:
        try:
            await fn()
            return
        except Exception:
            log.exception("%s failed; restarting it in %.0fs", what, delay)
        await trio.sleep(delay)
        delay = min(MAX_DELAY, delay * 2)
