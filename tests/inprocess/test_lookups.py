"""Never ENOENT for an attachment that exists (issue 12, finding 1; docs/durability.md,
invariant 9): before the first inventory the bucket decides, and a bucket that cannot answer
gives EIO; once an inventory is complete (kept across restarts) an unknown name is new."""

from __future__ import annotations

import errno
import os
import uuid as uuid_mod
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import pytest
import trio
import trio.testing

from objfs import errors
from objfs.fs import Operations
from tests.inprocess.conftest import Rig
from tests.inprocess.faults import Mode

CTX = pyfuse3.RequestContext()


async def _seed(rig: Rig, count: int) -> dict[str, bytes]:
    """Attachments written, uploaded and then forgotten locally, as on a new host."""
    made = {str(uuid_mod.uuid4()): os.urandom(2000) for _ in range(count)}
    async with trio.open_nursery() as nursery:
        await nursery.start(rig.store.run)
        for uuid, data in made.items():
            await rig.write(uuid, data)
        assert await rig.store.drain(timeout=60)
        nursery.cancel_scope.cancel()
    return made


def _new_host(rig: Rig, rig_factory: Callable[..., Rig], name: str) -> Rig:
    """Another cache directory (a lost cache volume, a new host) on the same bucket."""
    return rig_factory(name, LocalBucket=str(rig.settings.local_bucket))


async def test_first_start_with_the_bucket_down_answers_eio_never_enoent(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        tmp_path: Path) -> None:
    seeded = await _seed(rig_factory("first"), 3)
    rig = _new_host(rig_factory("first"), rig_factory, "second")
    assert not rig.store.inventory_done
    rig.backend.set(Mode.UNAVAILABLE, "list")
    (tmp_path / "pass").mkdir()
    ops = Operations(rig.store, tmp_path / "pass", 0, 0, 0o755, rig.tally)
    for uuid in [*seeded, str(uuid_mod.uuid4())]:
        start = trio.current_time()
        with pytest.raises(errors.Unavailable):
            await rig.store.size_of(uuid)
        assert trio.current_time() - start <= rig.settings.read_timeout + 1e-6
    # Through the FUSE layer: the directories exist (virtual), the attachment is EIO.
    uuid = next(iter(seeded))
    ab = await ops.lookup(pyfuse3.ROOT_INODE, uuid[:2].encode(), CTX)
    cd = await ops.lookup(ab.st_ino, uuid[2:4].encode(), CTX)
    with pytest.raises(pyfuse3.FUSEError) as failed:
        await ops.lookup(cd.st_ino, uuid.encode(), CTX)
    assert failed.value.errno == errno.EIO
    # The bucket answers again: the same names are found, with no one acting.
    rig.backend.set(Mode.OK, "list")
    for uuid, data in seeded.items():
        assert await rig.store.size_of(uuid) == len(data)
        assert await rig.read(uuid) == data
    assert await rig.store.size_of(str(uuid_mod.uuid4())) is None


async def test_after_a_complete_inventory_unknown_names_are_new_at_once(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig]) -> None:
    seeded = await _seed(rig_factory("first"), 3)
    rig = _new_host(rig_factory("first"), rig_factory, "second")
    async with trio.open_nursery() as nursery:
        await nursery.start(rig.store.run)
        with trio.fail_after(30):
            while not rig.store.inventory_done:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    rig = rig.restarted()
    assert rig.store.inventory_done  # kept in the journal
    rig.backend.set(Mode.UNAVAILABLE)
    lists = rig.backend.calls["list"]
    start = trio.current_time()
    assert await rig.store.size_of(str(uuid_mod.uuid4())) is None
    for uuid, data in seeded.items():
        assert await rig.store.size_of(uuid) == len(data)
    assert trio.current_time() == start and rig.backend.calls["list"] == lists
    # Ingest goes on while the bucket is down (write-back), and nothing is re-listed.
    async with trio.open_nursery() as nursery:
        await nursery.start(rig.store.run)
        await rig.write(str(uuid_mod.uuid4()), b"new while down")
        nursery.cancel_scope.cancel()
    assert rig.backend.calls["list"] == lists
