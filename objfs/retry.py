"""The one retry policy: jittered exponential backoff under a deadline."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import trio

from objfs.errors import ObjfsError, Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")


class BucketHealth:
    """Whether the bucket answers: failures and successes of every retried call are reported
    here, and background pauses end early when it answers again (so queued uploads resume
    within a probe interval of a recovery instead of after a backoff of up to a minute).
    Owner: the event loop."""

    def __init__(self) -> None:
        self.failing_since: float | None = None  # time.time() of the first failure
        self.last_error: str | None = None
        self._recovered = trio.Event()
        self.failing = trio.Event()  # set while failing

    def failed(self, exc: ObjfsError) -> None:
        if exc.temporary and self.failing_since is None:
            self.failing_since = time.time()
            self.failing.set()
        if exc.temporary:
            self.last_error = str(exc)

    def succeeded(self) -> None:
        if self.failing_since is not None:
            log.info("the bucket answers again (it failed for %.0fs)",
                     time.time() - self.failing_since)
            self.failing_since = None
            self.last_error = None
            self.failing = trio.Event()
            self._recovered.set()
            self._recovered = trio.Event()

    async def pause(self, seconds: float) -> None:
        """Sleep `seconds`, or less if the bucket recovers meanwhile."""
        with trio.move_on_after(seconds):
            await self._recovered.wait()


@dataclass(frozen=True)
class RetryPolicy:
    """Retry failed calls with full-jitter exponential backoff.

    Foreground policies (`persistent` false) retry only temporary errors
    (``exc.temporary``) and stop at `deadline` seconds, raising the last error. Background
    policies (`persistent` true, `deadline` None) retry every `ObjfsError` but a `final` one
    until the call succeeds or the task is cancelled: they serve work whose data stays
    journaled, where a denied request may succeed once an administrator fixes a permission.
    """

    first_delay: float = 0.2
    max_delay: float = 10.0
    deadline: float | None = 30.0
    persistent: bool = False

    def delay(self, attempt: int) -> float:
        return random.uniform(self.first_delay / 2,
                              min(self.max_delay, self.first_delay * 2 ** min(attempt, 30)))

    async def call(self, what: str, fn: Callable[[], Awaitable[T]],
                   on_error: Callable[[ObjfsError], None] | None = None,
                   health: BucketHealth | None = None) -> T:
        """Run `fn` until it succeeds; `on_error` sees every failure that will be retried.

        With a `deadline`, the whole operation (attempts and pauses together) ends by then: a
        call still running at the deadline is cancelled (backends abandon the worker thread)
        and `Unavailable` is raised, naming the last error seen (docs/durability.md,
        invariant 6). An error that retrying cannot fix is raised at once.
        """
        if self.deadline is None:
            return await self._attempts(what, fn, on_error, None, [], health)
        seen: list[ObjfsError] = []
        give_up = trio.current_time() + self.deadline
        with trio.move_on_at(give_up):
            return await self._attempts(what, fn, on_error, give_up, seen, health)
        last = f"; last error: {seen[-1]}" if seen else ""
        log.warning("%s: no answer within %gs%s", what, self.deadline, last)
        raise Unavailable(f"{what}: no answer within {self.deadline:g}s{last}")

    async def _attempts(self, what: str, fn: Callable[[], Awaitable[T]],
                        on_error: Callable[[ObjfsError], None] | None, give_up: float | None,
                        seen: list[ObjfsError], health: BucketHealth | None) -> T:
        attempt = 0
        while True:
            try:
                result = await fn()
            except ObjfsError as exc:
                if health is not None:
                    health.failed(exc)
                if exc.final or not (exc.temporary or self.persistent):
                    raise
                pause = self.delay(attempt)
                if give_up is not None and trio.current_time() + pause >= give_up:
                    raise
                seen.append(exc)
                del seen[:-1]
                if on_error is not None:
                    on_error(exc)
                # Log the first failures and then every 20th, not every retry.
                level = logging.WARNING if attempt < 3 or attempt % 20 == 0 else logging.DEBUG
                log.log(level, "%s failed (attempt %d), retrying in %.1fs: %s",
                        what, attempt + 1, pause, exc)
                attempt += 1
                if health is not None and self.persistent:
                    await health.pause(pause)
                else:
                    await trio.sleep(pause)
            else:
                if health is not None:
                    health.succeeded()
                return result
