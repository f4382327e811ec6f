"""Series prefetch: after a read fetched an instance from the bucket, fetch the rest of its
series ahead of the viewer.

A viewer reads a series one instance after the other; from a cold cache each read waits for
one GET. When the store fetched an attachment for Orthanc, it tells the prefetcher
(`Store.on_fetched`). The prefetcher reads the SeriesInstanceUID from the local copy's header
(`objfs.dicomhead`), asks Orthanc (`Objfs.Orthanc.Url`) for the series' instances in viewing
order and their DICOM attachments, and has the store fetch up to `SeriesPrefetchLimit` of
them, PARALLEL at a time, at background priority (the backends' background threads, the
store's turn rule) and only while the cache budget stays half free (`Store.prefetch`).

Rules: one series is prefetched at most once per SEEN_SECONDS; notifications beyond QUEUE
waiting are dropped (prefetch is an optimisation, never a queue that grows); Orthanc or the
bucket failing ends that series' prefetch with a log line, never an error for anyone.
"""

from __future__ import annotations

import logging

import cachetools
import trio

from objfs import errors
from objfs.dicomhead import series_instance_uid
from objfs.sidecar.orthanc import OrthancClient
from objfs.store import Store
from objfs.store.state import FIRST_LOOK

log = logging.getLogger(__name__)

PARALLEL = 8
LOOKUPS_AT_ONCE = 8
QUEUE = 64
SEEN_SECONDS = 600.0


class SeriesPrefetcher:
    """Owned by the daemon's nursery (`run`); `notify` is the store's hook."""

    def __init__(self, store: Store, orthanc: OrthancClient, limit: int) -> None:
        self.store = store
        self.orthanc = orthanc
        self.limit = limit
        self._send, self._receive = trio.open_memory_channel[str](QUEUE)
        # Series already prefetched (owner: `run`, on the event loop).
        self._seen: cachetools.TTLCache[str, bool] = cachetools.TTLCache(4096, SEEN_SECONDS,
                                                                           timer=trio.current_time)
        self.fetched = 0  # attachments fetched ahead, for tests and logs

    def notify(self, uuid: str) -> None:
        """A read fetched `uuid` from the bucket (called on the event loop; never blocks)."""
        try:
            self._send.send_nowait(uuid)
        except trio.WouldBlock:
            pass

    async def run(self) -> None:
        async for uuid in self._receive:
            try:
                await self._series_of(uuid)
            except (errors.ObjfsError, OSError) as exc:
                log.info("series prefetch after %s stopped: %s", uuid, exc)

    async def _series_of(self, uuid: str) -> None:
        path = self.store.local_copy(uuid)
        if path is None:
            return

        def head() -> bytes:
            with open(path, "rb") as f:
                return f.read(FIRST_LOOK)

        uid = series_instance_uid(await trio.to_thread.run_sync(head))
        if uid is None or uid in self._seen:
            return
        self._seen[uid] = True
        series = await self.orthanc.series_id(uid)
        if series is None:
            return
        instances = (await self.orthanc.series_instances(series))[:self.limit]
        wanted, done = trio.open_memory_channel[str](0)
        fetched_before = self.fetched

        async def producer() -> None:
            # Orthanc names one attachment per request: ask PARALLEL at a time, hand them
            # on in viewing order.
            async with wanted:
                for start in range(0, len(instances), LOOKUPS_AT_ONCE):
                    batch = instances[start:start + LOOKUPS_AT_ONCE]
                    found: list[str | None] = [None] * len(batch)

                    async def one(i: int, instance: str, into: list[str | None]) -> None:
                        into[i] = await self.orthanc.dicom_uuid(instance)

                    async with trio.open_nursery() as lookups:
                        for i, instance in enumerate(batch):
                            lookups.start_soon(one, i, instance, found)
                    for attachment in found:
                        if attachment is not None and attachment != uuid:
                            await wanted.send(attachment)

        async def worker(receive: trio.MemoryReceiveChannel[str]) -> None:
            async with receive:
                async for attachment in receive:
                    if await self.store.prefetch(attachment):
                        self.fetched += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(producer)
            for _ in range(PARALLEL):
                nursery.start_soon(worker, done.clone())
            done.close()
        log.info("series %s: %d of its %d instances fetched ahead", uid,
                 self.fetched - fetched_before, len(instances))
