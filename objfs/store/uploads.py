"""The queue of uploads waiting for a worker: the largest first.

Orthanc stores a study's small instances and then its multi-frame files; in a plain
first-in-first-out queue the largest objects would start last, after the backlog of small
ones, and their upload would end the drain alone (measured in docs/design.md, "Performance
shape"). Largest first, they start as soon as they are acknowledged and the small ones fill
the other workers meanwhile.
"""

from __future__ import annotations

import heapq
import itertools
from typing import NamedTuple

import trio


class Queued(NamedTuple):
    uuid: str
    size: int


class LargestFirst:
    """Uuids with their sizes; `get` returns the largest waiting (equal sizes in the order
    they came). Owner: the event loop (no locking); `put` never blocks."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, str]] = []
        self._order = itertools.count()
        self._lot = trio.lowlevel.ParkingLot()

    def __len__(self) -> int:
        return len(self._heap)

    def put(self, uuid: str, size: int) -> None:
        heapq.heappush(self._heap, (-size, next(self._order), uuid))
        self._lot.unpark()

    async def get(self) -> Queued:
        """The largest waiting upload; waits while none is (cancellable)."""
        await trio.lowlevel.checkpoint()
        while not self._heap:
            await self._lot.park()
        size, _, uuid = heapq.heappop(self._heap)
        return Queued(uuid, -size)
