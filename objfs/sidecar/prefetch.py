"""Series prefetch: when a read has to fetch an instance from the bucket, fetch the rest of
its series ahead of the viewer.

A viewer reads a series one instance after the other; from a cold cache each read waits for
one GET. Two ways to know the series:
- Uploads note each DICOM attachment's SeriesInstanceUID in the journal (`Journal.note_series`).
  When a read is about to fetch an attachment whose series the journal knows
  (`Store.on_cold`), the other uncached members are fetched from then on, alongside that GET,
  with no Orthanc request.
- Otherwise, once the read fetched the instance (`Store.on_fetched`), the prefetcher reads the
  SeriesInstanceUID from the local copy's header (`objfs.dicomhead`), asks Orthanc
  (`Objfs.Orthanc.Url`) for the series' instances in viewing order and their DICOM
  attachments, fetches them, and notes them in the journal for next time. Orthanc >= 1.12.5
  names them all in one `/tools/find` answer; older versions take a lookup and the series'
  instance list, which names each instance's DICOM attachment (`FileUuid`); a listing that
  did not would take one more request per instance.
Either way up to `SeriesPrefetchLimit` are fetched, PARALLEL at a time, at background priority
(the backends' background slots, the store's turn rule) and within the cache budget: least
recently used copies make room, and what no eviction can free stays within half of it
(`Store.prefetch`).

Rules: one series is prefetched at most once per SEEN_SECONDS; notifications beyond QUEUE
waiting are dropped (prefetch is an optimisation, never a queue that grows); Orthanc or the
bucket failing ends that series' prefetch with a log line, never an error for anyone.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import cachetools
import trio

from objfs import errors
from objfs.sidecar.orthanc import REQUESTS_AT_ONCE, OrthancClient
from objfs.store import Store

log = logging.getLogger(__name__)

PARALLEL = 8
LOOKUPS_AT_ONCE = REQUESTS_AT_ONCE
# The most instances one lookup run names (for a series listing without their attachments), one
# after the other on one connection: about 0.3 ms each, so that Orthanc's thread is free again
# within a few ms.
LOOKUP_RUN = 8
QUEUE = 64
SEEN_SECONDS = 600.0


class SeriesPrefetcher:
    """Owned by the daemon's nursery (`run`); `notify_cold` and `notify` are the store's
    hooks."""

    def __init__(self, store: Store, orthanc: OrthancClient, limit: int) -> None:
        self.store = store
        self.orthanc = orthanc
        self.limit = limit
        # (attachment, its series when the journal knows it, else None)
        self._send, self._receive = trio.open_memory_channel[tuple[str, str | None]](QUEUE)
        # Series already prefetched (owner: `run`, on the event loop).
        self._seen: cachetools.TTLCache[str, bool] = cachetools.TTLCache(4096, SEEN_SECONDS,
                                                                           timer=trio.current_time)
        # Attachments whose series `notify_cold` found in the journal, until their `notify`
        # (owner: the event loop; an entry whose fetch failed ages out).
        self._cold_known: cachetools.TTLCache[str, bool] = cachetools.TTLCache(
            4096, SEEN_SECONDS, timer=trio.current_time)
        # The series of each attachment a prefetch named (uuid -> SeriesInstanceUID; owner:
        # the event loop): while that series counts as seen, a read that fetched one of them
        # itself (it got there before the prefetch) needs no header read to learn it.
        self._members: cachetools.TTLCache[str, str] = cachetools.TTLCache(
            65536, SEEN_SECONDS, timer=trio.current_time)
        self.fetched = 0  # attachments fetched ahead, for tests and logs

    def _offer(self, item: tuple[str, str | None]) -> None:
        try:
            self._send.send_nowait(item)
        except trio.WouldBlock:
            pass

    def notify_cold(self, uuid: str) -> None:
        """A read is about to fetch `uuid` (on the event loop; never blocks): when the journal
        knows its series, the prefetch starts now, alongside that GET."""
        series = self.store.known_series(uuid)
        if series is None:
            return
        self._cold_known[uuid] = True
        if series not in self._seen:
            self._offer((uuid, series))

    def notify(self, uuid: str) -> None:
        """A read fetched `uuid` from the bucket (on the event loop; never blocks). When
        `notify_cold` found its series in the journal before the GET, or a prefetch of its
        series named it, that was enough: its header is not read (and the journal not asked
        again)."""
        if self._cold_known.pop(uuid, False):
            return
        series = self._members.get(uuid)
        if series is not None and series in self._seen:
            return
        self._offer((uuid, None))

    async def run(self) -> None:
        async for uuid, series in self._receive:
            try:
                if series is not None:
                    await self._known_series(uuid, series)
                else:
                    await self._series_of(uuid)
            except (errors.ObjfsError, OSError) as exc:
                log.info("series prefetch after %s stopped: %s", uuid, exc)

    async def _known_series(self, uuid: str, series: str) -> None:
        """Prefetch a series whose members the journal knows: no Orthanc request."""
        if series in self._seen:
            return
        self._seen[series] = True
        members = [m for m in self.store.uncached_members(series, self.limit + 1)
                   if m != uuid][:self.limit]
        fetched = await self._fetch_these(members)
        log.info("series %s: %d of its %d other known instances fetched ahead", series,
                 fetched, len(members))

    async def _series_of(self, uuid: str) -> None:
        """Prefetch the series of a fetched attachment the journal knew no series for: read
        its SeriesInstanceUID, ask Orthanc for the series' instances and their attachments,
        and note them in the journal for next time."""
        uid = await self.store.series_from_copy(uuid)
        if uid is None or uid in self._seen:
            return
        self._seen[uid] = True
        members = [(uuid, uid)]
        named = await self.orthanc.series_dicom_uuids(uid)
        unnamed: list[str] = []
        if named is None:
            named, unnamed = await self._listed(uid)
        if unnamed:
            fetched = await self._fetch_ahead(self._one_by_one(unnamed, uuid, uid, members))
            listed = len(unnamed)
        else:
            # The first SeriesPrefetchLimit in viewing order, the one just read included.
            ahead = [m for m in named[:self.limit] if m != uuid]
            members.extend((m, uid) for m in ahead)
            self._members.update((m, uid) for m in ahead)
            fetched, listed = await self._fetch_these(ahead), len(named[:self.limit])
        await self.store.note_series(members)
        log.info("series %s: %d of its %d instances fetched ahead", uid, fetched, listed)

    async def _listed(self, uid: str) -> tuple[list[str], list[str]]:
        """The series' first SeriesPrefetchLimit instances in viewing order from Orthanc's
        listing of it (an Orthanc before 1.12.5): (their DICOM attachments, []) when the
        listing names every one, else ([], the instance ids, to be asked one by one); both
        empty for a series Orthanc does not have."""
        series = await self.orthanc.series_id(uid)
        if series is None:
            return [], []
        instances = (await self.orthanc.series_instances(series))[:self.limit]
        named = [attachment for _, attachment in instances if attachment is not None]
        if len(named) == len(instances):
            return named, []
        return [], [instance for instance, _ in instances]

    def _one_by_one(self, instances: list[str], uuid: str, uid: str,
                    members: list[tuple[str, str]]
                    ) -> Callable[[trio.MemorySendChannel[str]], Awaitable[None]]:
        """A producer for `_fetch_ahead` over a series listing that did not name the
        attachments, asked one per request: LOOKUPS_AT_ONCE runs at a time
        (`OrthancClient.dicom_uuids`: consecutive instances on one connection), 1 instance long
        at first so that the first answers come at once, then twice as long each round up to
        LOOKUP_RUN; handed on in viewing order (all but `uuid`) and added to `members`."""

        async def produce(wanted: trio.MemorySendChannel[str]) -> None:
            async with wanted:
                start, length = 0, 1
                while start < len(instances):
                    runs = [instances[i:i + length] for i in
                            range(start, min(len(instances), start + length * LOOKUPS_AT_ONCE),
                                  length)]
                    start += length * LOOKUPS_AT_ONCE
                    length = min(2 * length, LOOKUP_RUN)
                    found: list[list[str | None]] = [[] for _ in runs]

                    async def one(i: int, run: list[str], into: list[list[str | None]]) -> None:
                        into[i] = await self.orthanc.dicom_uuids(run)

                    async with trio.open_nursery() as lookups:
                        for i, run in enumerate(runs):
                            lookups.start_soon(one, i, run, found)
                    for attachment in (a for named in found for a in named):
                        if attachment is not None and attachment != uuid:
                            members.append((attachment, uid))
                            self._members[attachment] = uid
                            await wanted.send(attachment)

        return produce

    async def _fetch_these(self, attachments: list[str]) -> int:
        """Prefetch `attachments` in this order; returns how many were fetched."""

        async def produce(wanted: trio.MemorySendChannel[str]) -> None:
            async with wanted:
                for attachment in attachments:
                    await wanted.send(attachment)

        return await self._fetch_ahead(produce)

    async def _fetch_ahead(self, produce: Callable[[trio.MemorySendChannel[str]],
                                                   Awaitable[None]]) -> int:
        """Prefetch what `produce` sends, PARALLEL at a time; returns how many were fetched."""
        wanted, receive = trio.open_memory_channel[str](0)
        before = self.fetched

        async def worker(receive: trio.MemoryReceiveChannel[str]) -> None:
            async with receive:
                async for attachment in receive:
                    if await self.store.prefetch(attachment):
                        self.fetched += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce, wanted)
            for _ in range(PARALLEL):
                nursery.start_soon(worker, receive.clone())
            receive.close()
        return self.fetched - before
