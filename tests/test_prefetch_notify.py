"""`objfs.sidecar.prefetch.SeriesPrefetcher` in process, between a stand-in store and a
stand-in Orthanc client that record what they are asked: which reads make it read a header
and ask Orthanc. The real daemon, Orthanc and bucket are in tests/test_prefetch.py."""

from __future__ import annotations

from typing import Any, cast

import trio
import trio.testing

from objfs.sidecar.prefetch import SeriesPrefetcher

SERIES_UID = "1.2.3.4"


class Store:
    """What the prefetcher uses of `objfs.store.Store`: every attachment is in `SERIES_UID`,
    known to the journal only when listed in `journal`."""

    def __init__(self, journal: dict[str, str] | None = None) -> None:
        self.journal = journal or {}
        self.headers_read: list[str] = []
        self.prefetched: list[str] = []
        self.noted: list[tuple[str, str]] = []

    def known_series(self, uuid: str) -> str | None:
        return self.journal.get(uuid)

    def uncached_members(self, series: str, limit: int) -> list[str]:
        return [u for u, s in self.journal.items() if s == series][:limit]

    async def series_from_copy(self, uuid: str) -> str | None:
        self.headers_read.append(uuid)
        return SERIES_UID

    async def prefetch(self, uuid: str) -> bool:
        self.prefetched.append(uuid)
        return True

    async def note_series(self, members: list[tuple[str, str]]) -> None:
        self.noted.extend(members)


class Orthanc:
    """An Orthanc that names the series' attachments in one find answer (>= 1.12.5); with
    `listed`, in its listing of the series (1.10); with `per_instance`, one per request (a
    listing without them)."""

    def __init__(self, attachments: list[str], per_instance: bool = False,
                 listed: bool = False) -> None:
        self.attachments = attachments
        self.per_instance = per_instance
        self.listed = listed
        self.asked: list[str] = []
        self.runs: list[int] = []  # the length of each lookup run

    async def series_dicom_uuids(self, uid: str) -> list[str] | None:
        self.asked.append("find")
        return None if self.per_instance or self.listed else list(self.attachments)

    async def series_id(self, uid: str) -> str | None:
        self.asked.append("lookup")
        return "series-id"

    async def series_instances(self, series: str) -> list[tuple[str, str | None]]:
        self.asked.append("instances")
        return [(f"instance-{a}", a if self.listed else None) for a in self.attachments]

    async def dicom_uuids(self, instances: list[str]) -> list[str | None]:
        self.asked.extend(instances)
        self.runs.append(len(instances))
        return [i.removeprefix("instance-") for i in instances]


async def settle(prefetcher: SeriesPrefetcher) -> None:
    """Let `run` take every queued notification and finish with it."""
    for _ in range(50):
        await trio.sleep(0)
    await trio.testing.wait_all_tasks_blocked()


async def read_the_series(per_instance: bool) -> tuple[Store, Orthanc]:
    """The first read of a 5-instance series notifies the prefetcher; then the reader, ahead
    of the prefetch, fetches the other four itself."""
    names = [f"a{i}" for i in range(5)]
    store, orthanc = Store(), Orthanc(names, per_instance)
    prefetcher = SeriesPrefetcher(cast(Any, store), cast(Any, orthanc), limit=500)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(prefetcher.run)
        prefetcher.notify_cold("a0")
        prefetcher.notify("a0")
        await settle(prefetcher)
        for name in names[1:]:
            prefetcher.notify_cold(name)
            prefetcher.notify(name)
        await settle(prefetcher)
        nursery.cancel_scope.cancel()
    return store, orthanc


async def first_read(orthanc: Orthanc, limit: int = 500) -> Store:
    """One cold read of the series' first instance ("a0"), and what the prefetch then did."""
    store = Store()
    prefetcher = SeriesPrefetcher(cast(Any, store), cast(Any, orthanc), limit=limit)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(prefetcher.run)
        prefetcher.notify("a0")
        await settle(prefetcher)
        nursery.cancel_scope.cancel()
    return store


async def test_a_member_named_by_the_prefetch_needs_no_header_read() -> None:
    store, orthanc = await read_the_series(per_instance=False)
    assert store.headers_read == ["a0"]
    assert orthanc.asked == ["find"]
    assert store.prefetched == ["a1", "a2", "a3", "a4"]
    assert sorted(store.noted) == [(f"a{i}", SERIES_UID) for i in range(5)]


async def test_the_same_with_an_orthanc_that_names_one_attachment_per_request() -> None:
    store, orthanc = await read_the_series(per_instance=True)
    assert store.headers_read == ["a0"]
    assert orthanc.asked[:3] == ["find", "lookup", "instances"]
    assert sorted(orthanc.asked[3:]) == [f"instance-a{i}" for i in range(5)]
    assert store.prefetched == ["a1", "a2", "a3", "a4"]


async def test_a_listing_that_names_the_attachments_needs_no_request_per_instance() -> None:
    """Orthanc 1.10's listing of a series names each instance's DICOM attachment: a lookup
    and the listing, then the prefetch, in viewing order, up to the limit."""
    names = [f"a{i}" for i in range(10)]
    orthanc = Orthanc(names, listed=True)
    store = await first_read(orthanc, limit=6)
    assert orthanc.asked == ["find", "lookup", "instances"]
    assert store.prefetched == names[1:6]
    assert sorted(store.noted) == [(f"a{i}", SERIES_UID) for i in range(6)]


async def test_unnamed_attachments_are_asked_in_runs_that_grow() -> None:
    """A listing that does not name the attachments: one request per instance, in runs of
    consecutive instances on one connection, 1 long at first (the first answers come at
    once), then 2, 4, up to 8."""
    names = [f"a{i}" for i in range(40)]
    orthanc = Orthanc(names, per_instance=True)
    store = await first_read(orthanc)
    # (the runs of a round are asked at the same time: in any order)
    assert sorted(orthanc.runs) == sorted([1] * 4 + [2] * 4 + [4] * 4 + [8, 4])
    assert store.prefetched == names[1:]  # in viewing order


async def test_a_read_of_another_series_still_reads_its_header() -> None:
    names = ["a0", "a1"]
    store, orthanc = Store(), Orthanc(names)
    prefetcher = SeriesPrefetcher(cast(Any, store), cast(Any, orthanc), limit=500)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(prefetcher.run)
        prefetcher.notify("a0")
        await settle(prefetcher)
        prefetcher.notify("b0")  # not named by any prefetch: its header tells its series
        await settle(prefetcher)
        nursery.cancel_scope.cancel()
    assert store.headers_read == ["a0", "b0"]
    assert orthanc.asked == ["find"]  # b0's series is the same one, already prefetched


async def test_the_journal_knows_the_series_no_header_no_orthanc() -> None:
    journal = {f"a{i}": SERIES_UID for i in range(3)}
    store, orthanc = Store(journal), Orthanc(list(journal))
    prefetcher = SeriesPrefetcher(cast(Any, store), cast(Any, orthanc), limit=500)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(prefetcher.run)
        for name in journal:
            prefetcher.notify_cold(name)
            prefetcher.notify(name)
            await settle(prefetcher)
        nursery.cancel_scope.cancel()
    assert store.headers_read == []
    assert orthanc.asked == []
    assert store.prefetched == ["a1", "a2"]
