"""Store.prefetch: a copy nobody asked for yet, within the budget, shared with a reader
that asks meanwhile, and never an error for anyone."""

from __future__ import annotations

import os
import uuid as uuid_mod
from collections.abc import Awaitable, Callable
from typing import cast

import pytest
import trio
import trio.testing

from objfs import errors
from objfs.sidecar.orthanc import OrthancClient
from objfs.sidecar.prefetch import SeriesPrefetcher
from tests.inprocess.conftest import Rig
from tests.inprocess.faults import Mode

Start = Callable[[Rig], Awaitable[None]]
MIB = 1024 * 1024


async def _uploaded_and_evicted(rig: Rig, count: int, size: int) -> list[str]:
    uuids = [str(uuid_mod.uuid4()) for _ in range(count)]
    for uuid in uuids:
        await rig.write(uuid, os.urandom(size))
    assert await rig.store.drain(60)
    await rig.tier.evict(rig.tier.capacity)
    assert rig.tier.used == 0
    return uuids


async def _one_evicted(rig_factory: Callable[..., Rig], start: Start) -> tuple[Rig, str]:
    """A running rig (ReadTimeout 5 s) with one uploaded 1 MiB attachment, not cached."""
    rig = rig_factory(CacheSize=64, ReadTimeout=5)
    await start(rig)
    (uuid,) = await _uploaded_and_evicted(rig, 1, MIB)
    return rig, uuid


async def test_prefetch_stays_within_the_budget_evicting_only_what_it_needs(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        running: Start) -> None:
    rig = rig_factory(CacheSize=16)
    await running(rig)
    uuids = await _uploaded_and_evicted(rig, 6, 3 * MIB)
    fetched = [await rig.store.prefetch(u) for u in uuids]
    assert fetched == [True] * 6
    # 18 MiB do not fit in 16: the least recently used copy (the first prefetched) made room.
    assert rig.tier.used == 15 * MIB
    assert [rig.journal.get(u).cached for u in uuids] == [False] + [True] * 5  # type: ignore[union-attr]
    assert rig.tier.background_held == 0
    assert not await rig.store.prefetch(uuids[-1])  # already cached
    big = await _uploaded_and_evicted(rig, 1, 9 * MIB)
    assert not await rig.store.prefetch(big[0])  # more than half the cache: never
    assert not await rig.store.prefetch(str(uuid_mod.uuid4()))  # unknown


async def test_a_prefetch_in_a_full_cache_evicts_one_copy_not_half_the_cache(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        running: Start) -> None:
    """A site's cache is full of clean copies: a prefetch takes the room of the least
    recently used ones it needs, as a read would, and the rest stay (an earlier rule kept
    background copies within half the budget, so the first prefetch emptied half the
    cache)."""
    rig = rig_factory(CacheSize=16)
    await running(rig)
    (wanted,) = await _uploaded_and_evicted(rig, 1, MIB)
    kept = await _uploaded_and_evicted(rig, 8, 2 * MIB)
    for uuid in kept:
        assert len(await rig.read(uuid)) == 2 * MIB
    assert rig.tier.used == rig.tier.capacity
    assert await rig.store.prefetch(wanted)
    cached = [rig.journal.get(u).cached for u in kept]  # type: ignore[union-attr]
    assert cached == [False] + [True] * 7
    assert rig.tier.used == 15 * MIB
    assert rig.tier.background_held == 0


async def test_a_prefetch_that_waited_for_room_leaves_what_a_reader_fetched_meanwhile(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        running: Start, holds: dict[str, trio.Event]) -> None:
    """A prefetch that must evict first waits for the eviction's worker thread; a reader that
    starts fetching the same attachment meanwhile is not followed by a second download, and
    the budget still matches the files on disk."""
    rig = rig_factory(CacheSize=16)
    await running(rig)
    (wanted,) = await _uploaded_and_evicted(rig, 1, MIB)
    for uuid in await _uploaded_and_evicted(rig, 4, 4 * MIB):
        assert len(await rig.read(uuid)) == 4 * MIB  # a full cache of clean copies
    holds["_remove_copies"] = gate = trio.Event()
    gets = rig.backend.calls["get"]
    async with trio.open_nursery() as nursery:
        outcome: list[bool] = []

        read: list[bytes] = []

        async def prefetch() -> None:
            outcome.append(await rig.store.prefetch(wanted))

        async def reader() -> None:
            read.append(await rig.read(wanted))

        nursery.start_soon(prefetch)
        await trio.sleep(1)  # the prefetch waits for its eviction (of one 4 MiB copy)
        nursery.start_soon(reader)
        await trio.sleep(1)  # the reader's fetch is announced; it waits for its own eviction
        assert wanted in rig.store._fetches and outcome == []
        gate.set()
    assert outcome == [False] and len(read[0]) == MIB
    assert rig.backend.calls["get"] == gets + 1
    on_disk = sum(p.stat().st_size for p in rig.tier.data.iterdir())
    assert rig.tier.used == on_disk


async def test_a_reader_waits_for_the_prefetch_instead_of_fetching_again(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        running: Start) -> None:
    rig = rig_factory(CacheSize=64)
    await running(rig)
    (uuid,) = await _uploaded_and_evicted(rig, 1, MIB)
    rig.backend.set(Mode.GATED, "get")
    gets = rig.backend.calls["get"]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rig.store.prefetch, uuid)
        await trio.sleep(1)
        read: list[bytes] = []

        async def reader() -> None:
            read.append(await rig.read(uuid))

        nursery.start_soon(reader)
        await trio.sleep(1)
        rig.backend.gate.set()
    assert len(read[0]) == MIB
    assert rig.backend.calls["get"] == gets + 1


async def test_a_failed_prefetch_is_nobodys_error(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        running: Start) -> None:
    rig, uuid = await _one_evicted(rig_factory, running)
    rig.backend.set(Mode.UNAVAILABLE, "get")
    assert not await rig.store.prefetch(uuid)
    assert rig.tier.used == 0
    rig.backend.set(Mode.OK)
    assert len(await rig.read(uuid)) == MIB


async def test_a_reader_behind_a_hanging_prefetch_ends_by_its_own_deadline(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        running: Start) -> None:
    """The reader waits for the prefetch of its attachment, but never longer than ReadTimeout
    from its own open: not the prefetch's deadline plus a download of its own."""
    rig, uuid = await _one_evicted(rig_factory, running)
    rig.backend.set(Mode.HANG, "get")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rig.store.prefetch, uuid)
        await trio.sleep(3)
        start = trio.current_time()
        with pytest.raises(errors.Unavailable):
            await rig.read(uuid)
        assert trio.current_time() - start <= 5.0 + 1e-6
    rig.backend.set(Mode.OK)
    assert len(await rig.read(uuid)) == MIB


async def test_no_prefetch_while_the_bucket_fails(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        running: Start) -> None:
    rig, uuid = await _one_evicted(rig_factory, running)
    rig.backend.set(Mode.UNAVAILABLE, "get")
    with pytest.raises(errors.Unavailable):
        await rig.read(uuid)  # the bucket is now known to fail
    rig.backend.set(Mode.OK)
    gets = rig.backend.calls["get"]
    assert not await rig.store.prefetch(uuid)
    assert rig.backend.calls["get"] == gets


async def test_a_fetched_attachment_of_a_known_series_is_not_read_for_its_series(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        running: Start) -> None:
    """After a fetch the prefetcher reads the copy's header for its series only when the
    journal does not know it (a known one went through `notify_cold` before the GET, as the
    store calls them)."""
    rig = rig_factory()
    await running(rig)
    known, unknown = str(uuid_mod.uuid4()), str(uuid_mod.uuid4())
    await rig.store.note_series([(known, "1.2.3")])
    prefetcher = SeriesPrefetcher(rig.store, cast(OrthancClient, None), 10)
    for uuid in (known, unknown):
        prefetcher.notify_cold(uuid)
    assert prefetcher._receive.receive_nowait() == (known, "1.2.3")
    prefetcher.notify(known)
    prefetcher.notify(unknown)
    assert prefetcher._receive.receive_nowait() == (unknown, None)
    with pytest.raises(trio.WouldBlock):
        prefetcher._receive.receive_nowait()
