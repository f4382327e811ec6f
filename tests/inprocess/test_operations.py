"""The FUSE `Operations` object called in-process, as the kernel would for Orthanc's
syscall sequence (see docs/design.md): errno mapping, immutability, exact sizes."""

from __future__ import annotations

import errno
import os
import stat
import time
import uuid as uuid_mod
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio
import trio.testing

from objfs.fs import CLOCK_REALTIME_COARSE, Operations
from objfs.store.state import KERNEL_ABSENT_TTL
from tests.inprocess.conftest import Rig
from tests.inprocess.faults import Mode

CTX = pyfuse3.RequestContext()
Start = Callable[[Rig], Awaitable[None]]


def ops_for(rig: Rig, tmp_path: Path) -> Operations:
    passthrough = tmp_path / "passthrough"
    passthrough.mkdir(exist_ok=True)
    return Operations(rig.store, passthrough, os.getuid(), os.getgid(), 0o750, rig.tally)


async def mkdirs(ops: Operations, uuid: str) -> int:
    """Orthanc's lookup-then-mkdir of ab/ and ab/cd/; returns the inode of ab/cd."""
    parent = pyfuse3.ROOT_INODE
    for part in (uuid[:2], uuid[2:4]):
        try:
            entry = await ops.lookup(parent, part.encode(), CTX)
        except pyfuse3.FUSEError as exc:
            assert exc.errno == errno.ENOENT
            entry = await ops.mkdir(parent, part.encode(), 0o777, CTX)
        parent = entry.st_ino
    return parent


async def assert_absent(ops: Operations, folder: int, uuid: str) -> None:
    """The lookup's answer for a name that does not exist on a single node: inode 0, which the
    kernel keeps for KERNEL_ABSENT_TTL seconds, counted as ENOENT."""
    before = ops.tally.fuse_ops["lookup", "ENOENT"]
    entry = await ops.lookup(folder, uuid.encode(), CTX)
    assert entry.st_ino == 0 and entry.entry_timeout == KERNEL_ABSENT_TTL
    assert ops.tally.fuse_ops["lookup", "ENOENT"] == before + 1


async def orthanc_write(ops: Operations, uuid: str, data: bytes) -> int:
    """stat (ENOENT), mkdirs, create, write in 4 KiB pieces, fdatasync, close; the inode."""
    folder = await mkdirs(ops, uuid)
    await assert_absent(ops, folder, uuid)
    info, entry = await ops.create(folder, uuid.encode(), 0o666,
                                   os.O_WRONLY | os.O_CREAT | os.O_TRUNC, CTX)
    for off in range(0, len(data), 4096):
        assert await ops.write(info.fh, off, data[off:off + 4096]) == len(data[off:off + 4096])
    await ops.fsync(info.fh, True)
    await ops.flush(info.fh)
    await ops.release(info.fh)
    return entry.st_ino


async def orthanc_read(ops: Operations, inode: int) -> bytes:
    attr = await ops.getattr(inode, CTX)
    info = await ops.open(inode, os.O_RDONLY, CTX)
    try:
        return await ops.read(info.fh, 0, attr.st_size + 8191)
    finally:
        await ops.release(info.fh)


async def test_orthanc_write_read_delete_sequence(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        running: Start, tmp_path: Path) -> None:
    rig = rig_factory()
    await running(rig)
    ops = ops_for(rig, tmp_path)
    uuid, data = str(uuid_mod.uuid4()), os.urandom(20_000)
    inode = await orthanc_write(ops, uuid, data)
    attr = await ops.getattr(inode, CTX)
    assert stat.S_ISREG(attr.st_mode) and attr.st_size == len(data)
    assert await orthanc_read(ops, inode) == data
    folder = await mkdirs(ops, uuid)
    await ops.unlink(folder, uuid.encode(), CTX)
    await assert_absent(ops, folder, uuid)
    ab = await ops.lookup(pyfuse3.ROOT_INODE, uuid[:2].encode(), CTX)
    await ops.rmdir(ab.st_ino, uuid[2:4].encode(), CTX)
    assert rig.tally.fuse_ops["create", "OK"] == 1
    assert rig.tally.fuse_ops["lookup", "ENOENT"] >= 2


async def test_create_stamps_the_kernels_clock(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        running: Start, tmp_path: Path) -> None:
    """create's reply carries mtime and ctime from CLOCK_REALTIME_COARSE, the clock the
    kernel compares a written inode's times with (a writeback-cache mount sends a SETATTR
    when they differ)."""
    rig = rig_factory()
    await running(rig)
    ops = ops_for(rig, tmp_path)
    uuid = str(uuid_mod.uuid4())
    folder = await mkdirs(ops, uuid)
    earliest = time.clock_gettime_ns(CLOCK_REALTIME_COARSE)
    info, entry = await ops.create(folder, uuid.encode(), 0o666,
                                   os.O_WRONLY | os.O_CREAT | os.O_TRUNC, CTX)
    latest = time.clock_gettime_ns(CLOCK_REALTIME_COARSE)
    await ops.release(info.fh)
    assert earliest <= entry.st_mtime_ns == entry.st_ctime_ns <= latest
    # The coarse clock lags the fine one by at most a tick (10 ms at HZ=100).
    assert 0 <= time.time_ns() - entry.st_mtime_ns < 1_000_000_000


async def test_attachments_are_write_once(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        running: Start, tmp_path: Path) -> None:
    rig = rig_factory()
    await running(rig)
    ops = ops_for(rig, tmp_path)
    uuid = str(uuid_mod.uuid4())
    inode = await orthanc_write(ops, uuid, b"x" * 100)
    folder = await mkdirs(ops, uuid)
    with pytest.raises(pyfuse3.FUSEError) as again:
        await ops.create(folder, uuid.encode(), 0o666, os.O_WRONLY | os.O_CREAT, CTX)
    assert again.value.errno == errno.EPERM
    with pytest.raises(pyfuse3.FUSEError) as rw:
        await ops.open(inode, os.O_RDWR, CTX)
    assert rw.value.errno == errno.EPERM
    with pytest.raises(pyfuse3.FUSEError) as bad:
        await ops.lookup(folder, b"not-an-attachment", CTX)
    assert bad.value.errno == errno.ENOENT


async def test_a_bucket_that_cannot_answer_gives_eio_at_open_never_short_data(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        running: Start, tmp_path: Path) -> None:
    rig = rig_factory(ReadTimeout=10)
    await running(rig)
    ops = ops_for(rig, tmp_path)
    uuid, data = str(uuid_mod.uuid4()), os.urandom(30_000)
    inode = await orthanc_write(ops, uuid, data)
    assert await rig.store.drain(timeout=60)
    await rig.tier.evict(1 << 30)
    rig.backend.set(Mode.HANG, "get")
    start = trio.current_time()
    with pytest.raises(pyfuse3.FUSEError) as failed:
        await ops.open(inode, os.O_RDONLY, CTX)
    assert failed.value.errno == errno.EIO
    assert trio.current_time() - start <= 10 + 1e-6
    assert rig.tally.fuse_ops["open", "EIO"] == 1
    rig.backend.set(Mode.OK, "get")
    assert await orthanc_read(ops, inode) == data


async def test_write_into_a_full_cache_reports_enospc_at_write_and_close(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        running: Start, tmp_path: Path) -> None:
    rig = rig_factory(CacheSize=16, CacheFullTimeout=5)
    rig.backend.set(Mode.UNAVAILABLE, "put")
    await running(rig)
    ops = ops_for(rig, tmp_path)
    await orthanc_write(ops, str(uuid_mod.uuid4()), os.urandom(15 * 1024 * 1024))
    uuid = str(uuid_mod.uuid4())
    folder = await mkdirs(ops, uuid)
    info, _ = await ops.create(folder, uuid.encode(), 0o666, os.O_WRONLY | os.O_CREAT, CTX)
    with pytest.raises(pyfuse3.FUSEError) as full:
        await ops.write(info.fh, 0, os.urandom(2 * 1024 * 1024))
    assert full.value.errno == errno.ENOSPC
    with pytest.raises(pyfuse3.FUSEError) as at_close:
        await ops.flush(info.fh)
    assert at_close.value.errno == errno.ENOSPC


async def test_statfs_shows_the_cache_budget(
        rig_factory: Callable[..., Rig], tmp_path: Path) -> None:
    rig = rig_factory(CacheSize=64)
    ops = ops_for(rig, tmp_path)
    st = await ops.statfs(CTX)
    assert st.f_blocks * st.f_frsize == 64 * 1024 * 1024
    assert st.f_bavail <= st.f_blocks


async def test_a_handler_bug_answers_eio_and_the_next_request_is_served(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        running: Start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 12, finding 3: any exception in a handler is EIO for that call only."""
    rig = rig_factory()
    await running(rig)
    ops = ops_for(rig, tmp_path)
    uuid, data = str(uuid_mod.uuid4()), os.urandom(1000)
    inode = await orthanc_write(ops, uuid, data)

    async def bug(*args: object, **kwargs: object) -> int:
        raise KeyError("a bug in the store")

    with monkeypatch.context() as patch:
        patch.setattr(rig.store, "open_read", bug)
        with pytest.raises(pyfuse3.FUSEError) as failed:
            await ops.open(inode, os.O_RDONLY, CTX)
        assert failed.value.errno == errno.EIO
    assert await orthanc_read(ops, inode) == data
    assert rig.tally.fuse_ops["open", "EIO"] == 1


async def test_a_reader_that_gives_up_does_not_fail_the_others(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        running: Start) -> None:
    """Issue 12, finding 3: the download belongs to the first reader; when that reader is
    cancelled, a reader waiting on the same download fetches it itself instead of receiving
    the other task's Cancelled."""
    rig = rig_factory()
    await running(rig)
    uuid, data = str(uuid_mod.uuid4()), os.urandom(40_000)
    await rig.write(uuid, data)
    assert await rig.store.drain(timeout=60)
    await rig.tier.evict(1 << 30)
    rig.backend.set(Mode.GATED, "get")
    results: list[bytes] = []

    async def impatient() -> None:
        with trio.move_on_after(1):
            await rig.read(uuid)

    async def patient() -> None:
        await trio.sleep(0.5)  # the impatient reader's download has begun (and hangs)
        assert rig.backend.calls["get"] == 1
        results.append(await rig.read(uuid))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(impatient)
        nursery.start_soon(patient)
        await trio.sleep(5)
        rig.backend.gate.set()
    assert results == [data]
    assert rig.backend.calls["get"] == 2  # the patient reader fetched it itself


async def test_fsync_says_whether_it_is_the_only_request_in_flight(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rig = rig_factory()
    ops = ops_for(rig, tmp_path)
    first, second = str(uuid_mod.uuid4()), str(uuid_mod.uuid4())
    seen: list[tuple[str, bool]] = []
    go_on = trio.Event()
    sync = rig.store.sync

    async def recorded(handle: Any, alone: bool = False) -> None:
        seen.append((handle.uuid, alone))
        if handle.uuid == first:
            await go_on.wait()  # still in its FSYNC handler while the second one comes
        await sync(handle, alone)

    monkeypatch.setattr(rig.store, "sync", recorded)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(orthanc_write, ops, first, os.urandom(5000))
        await trio.testing.wait_all_tasks_blocked()
        await orthanc_write(ops, second, os.urandom(5000))
        go_on.set()
    # the fsync and then close's flush of each: the second's while the first's is in flight
    assert seen == [(first, True), (second, False), (second, False), (first, True)]
    assert ops.in_flight == 0


@pytest.mark.parametrize("alone", [True, False])
async def test_a_failed_fdatasync_is_eio_at_fsync_and_close_and_leaves_nothing(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, alone: bool) -> None:
    """On the event loop (`alone`) or in a worker thread, a disk error while making a new
    attachment durable reaches Orthanc's fsync and close, and no trace of it is kept."""
    rig = rig_factory()
    ops = ops_for(rig, tmp_path)
    uuid = str(uuid_mod.uuid4())
    folder = await mkdirs(ops, uuid)
    info, _ = await ops.create(folder, uuid.encode(), 0o666,
                               os.O_WRONLY | os.O_CREAT | os.O_TRUNC, CTX)
    assert await ops.write(info.fh, 0, os.urandom(5000)) == 5000

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "disk error")

    monkeypatch.setattr(os, "fdatasync", failing)
    if not alone:
        ops.in_flight += 1  # as if another request were in flight
    for call in (lambda: ops.fsync(info.fh, True), lambda: ops.flush(info.fh)):
        with pytest.raises(pyfuse3.FUSEError) as failed:
            await call()
        assert failed.value.errno == errno.EIO
    monkeypatch.undo()
    await ops.release(info.fh)
    if not alone:
        ops.in_flight -= 1
    assert rig.journal.get(uuid) is None
    assert not rig.store.tier.path(uuid).exists()
    assert uuid not in rig.store.writing


async def test_a_name_written_again_gets_a_new_inode_while_the_kernel_holds_the_old(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        running: Start, tmp_path: Path) -> None:
    """The kernel holds an unlinked file's inode until its last handle closes and its FORGET
    (queued) arrives. A file created under the same name meanwhile gets an inode of its own:
    given the old number, the kernel would take the new file for the old one (same node id,
    same generation: it keeps the old inode's size and cached pages), and the old FORGET would
    drop the new file's node."""
    rig = rig_factory()
    await running(rig)
    ops = ops_for(rig, tmp_path)
    uuid = str(uuid_mod.uuid4())
    old = await orthanc_write(ops, uuid, b"a" * 5000)
    reader = await ops.open(old, os.O_RDONLY, CTX)
    folder = await mkdirs(ops, uuid)
    await ops.unlink(folder, uuid.encode(), CTX)
    assert await rig.store.drain(timeout=60)  # its bucket delete done: the name is free again
    new = await orthanc_write(ops, uuid, b"b" * 100)
    assert new != old
    assert (await ops.getattr(old, CTX)).st_nlink == 0
    with pytest.raises(pyfuse3.FUSEError) as reopened:
        await ops.open(old, os.O_RDONLY, CTX)
    assert reopened.value.errno == errno.ENOENT
    assert await ops.read(reader.fh, 0, 8192) == b"a" * 5000
    await ops.release(reader.fh)
    await ops.forget([(old, 1)])
    attr = await ops.getattr(new, CTX)
    assert (attr.st_nlink, attr.st_size) == (1, 100)
    assert await orthanc_read(ops, new) == b"b" * 100
    entry = await ops.lookup(folder, uuid.encode(), CTX)
    assert entry.st_ino == new


async def test_a_name_deleted_behind_the_kernels_back_gets_a_new_inode_when_made_again(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        running: Start, tmp_path: Path) -> None:
    """A name whose file went without an unlink through this mount (another node of a
    SharedBucket deleted it; here the store is told directly) and is then created again: the
    create gives a new inode too, and the old inode's FORGET leaves the new file alone."""
    rig = rig_factory()
    await running(rig)
    ops = ops_for(rig, tmp_path)
    uuid = str(uuid_mod.uuid4())
    old = await orthanc_write(ops, uuid, b"a" * 5000)
    await rig.store.unlink(uuid)
    assert await rig.store.drain(timeout=60)
    new = await orthanc_write(ops, uuid, b"b" * 100)
    assert new != old
    await ops.forget([(old, 1)])
    assert (await ops.getattr(new, CTX)).st_size == 100
    assert await orthanc_read(ops, new) == b"b" * 100
