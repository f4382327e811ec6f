"""Races between upload, eviction, delete, fetch and move, reproduced deterministically by
holding one step with an Event (issue 12, findings 5, 6 and 8)."""

from __future__ import annotations

import os
import uuid as uuid_mod
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from objfs import errors
from tests.inprocess.conftest import Rig
from tests.inprocess.faults import Mode

Start = Callable[[Rig], Awaitable[None]]
GatedRig = Callable[..., Awaitable[Rig]]
Holds = dict[str, trio.Event]


def on_disk(rig: Rig) -> int:
    return sum(p.stat().st_size for p in rig.tier.data.iterdir())


async def test_eviction_during_a_delete_gives_the_space_back_once(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        running: Start, holds: Holds) -> None:
    """Finding 6: the delete read its row, then eviction removed the copy while the delete
    waited for its journal write; the space was given back twice. (Since the delete of an
    uploaded attachment gives the copy up while its commit runs, eviction no longer chooses
    it then; the space is still given back once.)"""
    rig = rig_factory()
    await running(rig)
    gone = str(uuid_mod.uuid4())
    await rig.write(gone, os.urandom(300_000))
    assert await rig.store.drain(timeout=60)  # uploaded, clean, evictable
    rig.backend.set(Mode.GATED, "put")
    dirty = str(uuid_mod.uuid4())
    await rig.write(dirty, os.urandom(200_000))  # stays pending: never evictable
    holds["mark_pending_delete"] = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rig.store.unlink, gone)
        await trio.sleep(1)  # the delete now waits on its journal write
        assert await rig.tier.evict(1) == 0  # given up while the commit waits
        holds["mark_pending_delete"].set()
    assert rig.tier.used == on_disk(rig) == 200_000


async def test_a_download_that_ends_after_a_delete_leaves_no_copy(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        running: Start) -> None:
    """Finding 6: the copy appeared after the delete, counted and never evictable."""
    rig = rig_factory()
    await running(rig)
    uuid = str(uuid_mod.uuid4())
    await rig.write(uuid, os.urandom(100_000))
    assert await rig.store.drain(timeout=60)
    await rig.tier.evict(1 << 30)
    rig.backend.set(Mode.GATED, "get")
    outcome: list[BaseException] = []

    async def reader() -> None:
        try:
            await rig.read(uuid)
        except errors.ObjfsError as exc:
            outcome.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.sleep(1)  # the download waits at the bucket
        await rig.store.unlink(uuid)
        rig.backend.gate.set()
    assert len(outcome) == 1 and isinstance(outcome[0], errors.NotFound)
    assert not rig.tier.path(uuid).exists()
    assert rig.tier.used == on_disk(rig) == 0
    assert await rig.store.drain(timeout=60)
    assert rig.bucket_files() == {}


async def test_a_move_that_starts_during_a_delete_does_not_resurrect_it(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        running: Start, holds: Holds, tmp_path: Path) -> None:
    """Finding 5: unlink did not register against moves; a move to the file-system tier
    started in the middle of the delete brought the attachment back there."""
    rig = rig_factory("hybrid", HybridMode="WriteToObjectStorage",
                      FileSystemDirectory=str(tmp_path / "fs-tier"))
    assert rig.store.fs is not None
    rig.store.fs.prepare()
    await running(rig)
    uuid = str(uuid_mod.uuid4())
    await rig.write(uuid, os.urandom(50_000))
    assert await rig.store.drain(timeout=60)
    holds["mark_pending_delete"] = trio.Event()
    moved: list[object] = []

    async def move() -> None:
        try:
            moved.append(await rig.store.move_to_file_system(uuid))
        except errors.NotFound as exc:
            moved.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(rig.store.unlink, uuid)
        await trio.sleep(1)  # the delete waits on its journal write
        nursery.start_soon(move)
        await trio.sleep(1)
        holds["mark_pending_delete"].set()
    assert rig.store.fs.stat(uuid) is None
    assert await rig.store.size_of(uuid) is None
    assert len(moved) == 1 and isinstance(moved[0], errors.NotFound)
    assert await rig.store.drain(timeout=60)
    assert rig.bucket_files() == {}


def test_temporary_names_never_collide(rig_factory: Callable[..., Rig]) -> None:
    """Finding 8: a download and a tier move of one attachment shared a temporary name."""
    rig = rig_factory()
    uuid = str(uuid_mod.uuid4())
    names = {rig.tier.tmp_path(uuid, purpose) for purpose in ("plain", "plain", "download")}
    names |= {rig.tier.tmp_path(uuid, "plain") for _ in range(100)}
    assert len(names) == 103
    assert all(n.parent == rig.tier.tmp and n.name.startswith(uuid) for n in names)


@pytest.mark.parametrize("step", ["mark_pending_delete", "remove"])
async def test_unlink_of_a_fresh_write_during_its_upload_leaves_nothing(
        autojump_clock: trio.testing.MockClock, gated_rig: GatedRig, holds: Holds,
        step: str) -> None:
    rig = await gated_rig()
    uuid = str(uuid_mod.uuid4())
    await rig.write(uuid, os.urandom(10_000))
    await trio.sleep(1)  # the upload has started and waits at the bucket
    holds[step] = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rig.store.unlink, uuid)
        await trio.sleep(1)
        rig.backend.gate.set()
        await trio.sleep(1)
        holds[step].set()
    assert await rig.store.drain(timeout=120)
    assert rig.bucket_files() == {}
    assert rig.tier.used == on_disk(rig) == 0
