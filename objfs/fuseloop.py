"""How pyfuse3's request loop waits for ``/dev/fuse``: a queued request is read at once.

pyfuse3 (3.3 to 3.5) serves each request the same way: take its read lock, ``await
trio.lowlevel.wait_readable(fd)``, read one request, run its handler. trio waits through a
one-shot epoll registration, so every request costs an ``epoll_ctl``, a park of the task and a
pass of the scheduler before it is read, even when it is already queued, which it mostly is
while several Orthanc threads call the mount at once. `install` gives pyfuse3 (and only it) a
``trio`` whose ``lowlevel.wait_readable`` first asks ``poll`` with a zero timeout whether the
descriptor has input, and returns at once if so; otherwise, and whenever ``poll`` reports
anything but input (an error or hang-up at unmount, a closed descriptor), it waits as trio
does, so unmount and ``notify_closing`` behave as before. The fast path is not a checkpoint:
pyfuse3 takes its lock (a checkpoint) right before it, so its loop still yields to the other
tasks once per request. Measured: docs/performance.md, "2026-12-05, 02:15".

Replacing pyfuse3's module-level ``trio`` is the hook pyfuse3's own asyncio mode uses
(``pyfuse3.asyncio.enable`` puts a stand-in module there). Nothing else changes: if a pyfuse3
release waits some other way, the shim is simply unused, which the mount test in
tests/test_fuseloop.py would report (no wait counted as ready).
"""

from __future__ import annotations

import select
from typing import Any

import pyfuse3
import trio

from objfs.tally import Tally


class ReadyFirstLowlevel:
    """``trio.lowlevel`` with a `wait_readable` that returns at once for a descriptor that has
    input; every other name is trio's own. One poll object per descriptor, made on first use
    and kept: pyfuse3 waits on one descriptor for the life of the mount. Counts its waits in
    `tally` (``fuse_waits``: "ready", "parked"), on the event loop."""

    def __init__(self, tally: Tally) -> None:
        self._pollers: dict[int, select.poll] = {}
        self.tally = tally

    def __getattr__(self, name: str) -> Any:
        return getattr(trio.lowlevel, name)

    async def wait_readable(self, fd: int | Any) -> None:
        """Return when `fd` is readable, without a trip through trio if it already is;
        raises what ``trio.lowlevel.wait_readable`` raises when it waits."""
        number = fd if isinstance(fd, int) else fd.fileno()
        poller = self._pollers.get(number)
        if poller is None:
            poller = self._pollers[number] = select.poll()
            poller.register(number, select.POLLIN)
        events = poller.poll(0)
        if events and events[0][1] == select.POLLIN:
            self.tally.fuse_waits["ready"] += 1
            return
        self.tally.fuse_waits["parked"] += 1
        await trio.lowlevel.wait_readable(fd)


class TrioForPyfuse3:
    """The ``trio`` module as pyfuse3 sees it once `install` ran: trio itself, but for
    ``lowlevel``."""

    def __init__(self, tally: Tally) -> None:
        self.lowlevel = ReadyFirstLowlevel(tally)

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)


def install(tally: Tally) -> ReadyFirstLowlevel:
    """Point pyfuse3's module-level ``trio`` at a `TrioForPyfuse3` counting in `tally` (a
    later call replaces it: one mount per process). Call before ``pyfuse3.main``."""
    shim = TrioForPyfuse3(tally)
    setattr(pyfuse3, "trio", shim)  # noqa: B010 - pyfuse3's stub does not declare the name
    return shim.lowlevel
