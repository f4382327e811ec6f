"""SharedBucket: two stores (two nodes) on one local bucket, each with its own cache and
journal; the cluster lease; the job runner's cluster lock."""

from __future__ import annotations

import contextlib
import errno
import os
import uuid as uuid_mod
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pyfuse3
import pytest
import trio
import trio.testing

from objfs import codec, errors
from objfs.backends.local import LocalBackend
from objfs.clusterlock import LEASE_SECONDS, BucketLease, LockHeld, keep
from objfs.fstier import FileSystemTier
from objfs.journal import UPLOADED
from objfs.sidecar.jobs import Jobs
from objfs.sidecar.orthanc import OrthancClient
from objfs.store.state import SHARED_CONFIRM_TTL, SHARED_NEGATIVE_TTL
from tests.inprocess.conftest import Rig, move_cut_after_its_put, move_cut_at
from tests.inprocess.faults import Mode
from tests.inprocess.test_operations import CTX, mkdirs, ops_for

Start = Callable[[Rig], Awaitable[None]]


def _uuid() -> str:
    return str(uuid_mod.uuid4())


def _pair(rig_factory: Callable[..., Rig], tmp_path: Path, **objfs: object) -> tuple[Rig, Rig]:
    bucket = str(tmp_path / "shared-bucket")
    return (rig_factory("a", SharedBucket=True, NodeName="node-a", LocalBucket=bucket, **objfs),
            rig_factory("b", SharedBucket=True, NodeName="node-b", LocalBucket=bucket, **objfs))


async def _running_pair(rig_factory: Callable[..., Rig], tmp_path: Path,
                        running: Start) -> tuple[Rig, Rig]:
    a, b = _pair(rig_factory, tmp_path)
    await running(a)
    await running(b)
    return a, b


def _hybrid_pair(rig_factory: Callable[..., Rig], tmp_path: Path, mode: str,
                 **objfs: object) -> tuple[Rig, Rig]:
    """Two nodes in HybridMode `mode` on one shared file-system tier, made ready."""
    a, b = _pair(rig_factory, tmp_path, HybridMode=mode,
                 FileSystemDirectory=str(tmp_path / "fs-tier"), SharedFileSystemTier=True,
                 **objfs)
    for rig in (a, b):
        assert rig.store.fs is not None
        rig.store.fs.prepare()
    return a, b


async def _moved_back_while_down(down: Rig, other: Rig, uuid: str, data: bytes) -> None:
    """`other` moves `uuid` to the bucket while node `down` is stopped; then `down` starts
    again and drains: both nodes must read `data`, and the bucket hold it alone."""
    async with trio.open_nursery() as nursery:
        await nursery.start(other.store.run)
        assert await other.store.move_to_object_storage(uuid)
        await nursery.start(down.store.run)
        assert await down.store.drain(timeout=60)
        for rig in (down, other):
            assert await rig.read(uuid) == data
        nursery.cancel_scope.cancel()
    assert list(other.bucket_files().values()) == [data]


async def test_an_acknowledged_write_reads_at_once_on_the_other_node(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        tmp_path: Path, running: Start) -> None:
    a, b = await _running_pair(rig_factory, tmp_path, running)
    assert a.store.write_through and b.store.write_through
    uuid = _uuid()
    await a.write(uuid, b"dicom" * 1000)
    # No time passes: the object was in the bucket when close() returned.
    assert await b.store.size_of(uuid) == 5000
    assert await b.read(uuid) == b"dicom" * 1000


async def test_an_unknown_name_is_asked_again_after_the_negative_bound(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        tmp_path: Path, running: Start) -> None:
    a, b = await _running_pair(rig_factory, tmp_path, running)
    uuid = _uuid()
    assert await b.store.size_of(uuid) is None  # Orthanc's stat before a create: ENOENT
    lists = b.backend.calls["list"]
    assert await b.store.size_of(uuid) is None  # remembered: no second request
    assert b.backend.calls["list"] == lists
    await a.write(uuid, b"x" * 10)
    await trio.sleep(SHARED_NEGATIVE_TTL + 0.01)
    assert await b.store.size_of(uuid) == 10
    assert b.tally.bucket_lookups >= 2


async def test_the_kernel_is_never_told_to_keep_an_absent_name(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        tmp_path: Path, running: Start) -> None:
    # A single node answers absent names with an entry the kernel keeps for a second
    # (`KERNEL_ABSENT_TTL`); a shared node must not, or the kernel would hide a name another node
    # created beyond the store's own bound.
    a, b = await _running_pair(rig_factory, tmp_path, running)
    uuid = _uuid()
    ops = ops_for(b, tmp_path)
    folder = await mkdirs(ops, uuid)
    with pytest.raises(pyfuse3.FUSEError) as absent:
        await ops.lookup(folder, uuid.encode(), CTX)
    assert absent.value.errno == errno.ENOENT
    assert b.tally.fuse_ops["lookup", "ENOENT"] == 1
    await a.write(uuid, b"x" * 10)
    await trio.sleep(SHARED_NEGATIVE_TTL + 0.01)
    assert (await ops.lookup(folder, uuid.encode(), CTX)).st_size == 10


async def test_a_delete_on_one_node_is_seen_by_the_other_within_the_bound(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        tmp_path: Path, running: Start) -> None:
    a, b = await _running_pair(rig_factory, tmp_path, running)
    uuid = _uuid()
    await a.write(uuid, b"y" * 100)
    assert await a.read(uuid) == b"y" * 100  # A has it cached
    # B never saw it; its delete finds the object in the bucket and removes it.
    await b.store.unlink(uuid)
    await b.store.drain(30)
    assert a.bucket_files() == {}
    await trio.sleep(SHARED_CONFIRM_TTL + 0.01)
    with pytest.raises(errors.NotFound):
        await a.read(uuid)
    assert a.journal.get(uuid) is None
    assert not a.tier.path(uuid).exists()
    await a.tier.doomed_removed()  # the copy's bytes come back once it is unlinked
    assert a.tier.used == 0 and not list(a.tier.tmp.iterdir())


async def test_within_the_bound_a_cached_copy_is_served_without_a_request(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        tmp_path: Path, running: Start) -> None:
    a, _ = _pair(rig_factory, tmp_path)
    await running(a)
    uuid = _uuid()
    await a.write(uuid, b"z" * 10)
    heads = a.backend.calls["head"]
    assert await a.read(uuid) == b"z" * 10
    assert a.backend.calls["head"] == heads
    await trio.sleep(SHARED_CONFIRM_TTL + 0.01)
    assert await a.read(uuid) == b"z" * 10
    assert a.backend.calls["head"] == heads + 1


async def test_a_reader_confirmed_after_another_fetched_the_copy_does_not_fetch_it_again(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        tmp_path: Path, running: Start) -> None:
    """A reader whose HEAD (confirming the journal's row of an uncached attachment) is
    answered after another reader fetched the copy uses that copy. It used to fetch the
    attachment again over it, each copy taking the budget, which was given back only once
    (found by the two-node random crash test with A1)."""
    a, b = await _running_pair(rig_factory, tmp_path, running)
    uuid = _uuid()
    data = b"dicom" * 8000
    await a.write(uuid, data)
    assert await b.read(uuid) == data  # b knows the row now
    await b.tier.evict(1 << 30)
    await trio.sleep(SHARED_CONFIRM_TTL + 0.01)
    gets = b.backend.calls["get"]
    b.backend.set(Mode.GATED, "head")
    got: list[bytes] = []

    async def first_reader() -> None:
        got.append(await b.read(uuid))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first_reader)
        while not b.backend.calls["head"]:
            await trio.sleep(0.01)
        gate = b.backend.gate
        b.backend.set(Mode.OK, "head")  # the first reader's HEAD still waits at `gate`
        assert await b.read(uuid) == data
        gate.set()
    assert got == [data]
    assert b.backend.calls["get"] == gets + 1
    assert b.tier.used == len(data)
    assert await b.store.drain(timeout=30)


async def test_a_write_through_that_fails_is_not_acknowledged_and_leaves_no_object(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        tmp_path: Path, running: Start) -> None:
    a, _ = _pair(rig_factory, tmp_path)
    await running(a)
    uuid = _uuid()
    handle = await a.store.create(uuid)
    await a.store.write(handle, 0, b"q" * 10)
    a.backend.set(Mode.UNAVAILABLE, "put")
    start = trio.current_time()
    with pytest.raises(errors.Unavailable):
        await a.store.sync(handle)
    assert trio.current_time() - start <= a.settings.read_timeout + 1
    assert not await a.store.close_write(handle)
    a.backend.set(Mode.OK)
    await a.store.drain(60)
    assert a.bucket_files() == {}
    assert a.journal.get(uuid) is None


async def test_no_inventory_with_a_shared_bucket(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        tmp_path: Path, running: Start) -> None:
    a, b = _pair(rig_factory, tmp_path)
    await running(a)
    uuid = _uuid()
    await a.write(uuid, b"1")
    await running(b)
    await trio.sleep(5)
    assert not b.store.inventory_done
    assert b.journal.get(uuid) is None  # nothing listed; asked when Orthanc asks
    assert await b.store.size_of(uuid) == 1


def test_each_node_cleans_only_its_own_temporary_files(tmp_path: Path) -> None:
    shared = tmp_path / "fs-tier"
    a = FileSystemTier(shared, None, False, node="node-a")
    b = FileSystemTier(shared, None, False, node="node-b")
    a.prepare()
    a.partial_path("x").write_bytes(b"being written on A")
    b.prepare()
    assert a.partial_path("x").read_bytes() == b"being written on A"
    assert a.tmp != b.tmp and a.tmp.parent == b.tmp.parent


# --- the cluster lease ----------------------------------------------------------------------


async def test_a_lease_has_one_holder_expires_and_is_taken_over(
        autojump_clock: trio.testing.MockClock, tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "bucket")
    a = BucketLease("rekey", "node-a", backend, "objfs-locks/rekey", clock=trio.current_time)
    b = BucketLease("rekey", "node-b", backend, "objfs-locks/rekey", clock=trio.current_time)
    assert await a.try_acquire() is None
    assert await b.try_acquire() == "node-a"
    assert await a.renew()
    assert await b.try_acquire() == "node-a"
    # A stops renewing (it died): once the lease expired, B takes it, and A knows it lost it.
    await trio.sleep(LEASE_SECONDS + 1)
    assert await b.try_acquire() is None
    assert not await a.renew()
    await a.release()  # not A's any more: leaves B's lease alone
    assert await a.try_acquire() == "node-b"
    await b.release()
    assert await a.try_acquire() is None


async def test_keep_renews_and_reports_a_lost_lease(
        autojump_clock: trio.testing.MockClock, tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "bucket")
    a = BucketLease("move-storage", "node-a", backend, "locks/m", clock=trio.current_time)
    b = BucketLease("move-storage", "node-b", backend, "locks/m", clock=trio.current_time)
    assert await a.try_acquire() is None
    lost = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep, a, lost.set)
        await trio.sleep(LEASE_SECONDS * 3)  # kept alive by renewals
        assert await b.try_acquire() == "node-a"
        # Someone removes the lease behind A's back (an operator); B takes it.
        _, version = await backend.read_versioned("locks/m")
        assert await backend.delete_if("locks/m", version)
        assert await b.try_acquire() is None
        with trio.fail_after(LEASE_SECONDS):
            await lost.wait()


async def test_a_second_node_asked_to_move_answers_with_the_holder(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        tmp_path: Path) -> None:
    a, b = _pair(rig_factory, tmp_path)
    locks = [BucketLease("move-storage", r.settings.node_name, r.local, "objfs-locks/move",
                         clock=trio.current_time) for r in (a, b)]
    orthanc = OrthancClient(a.settings.orthanc)
    jobs_a = Jobs(a.journal, a.store, orthanc, locks[0])
    jobs_b = Jobs(b.journal, b.store, orthanc, locks[1])
    await jobs_a.submit("file-system", [], 0)
    assert jobs_a.held_locks == ["move-storage"]
    with pytest.raises(LockHeld) as refused:
        await jobs_b.submit("file-system", [], 0)
    assert refused.value.holder == "node-a"
    assert "node-a" in str(refused.value)
    assert jobs_b.held_locks == [] and not jobs_b.jobs


async def test_a_bucket_that_cannot_answer_gives_eio_never_absent(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        tmp_path: Path, running: Start) -> None:
    """Even with a journal full of earlier knowledge (a former single-node inventory), an
    unknown name is asked of the bucket; while it cannot answer: Unavailable (EIO) after
    ReadTimeout, and a cached copy older than the bound is not served either."""
    a, b = _pair(rig_factory, tmp_path)
    b.journal.set_meta("inventory", "complete")  # left by a single-node past: not trusted
    b = b.restarted()
    await running(a)
    await running(b)
    known = _uuid()
    await b.write(known, b"k" * 10)
    uuid = _uuid()
    await a.write(uuid, b"n" * 10)
    b.backend.set(Mode.UNAVAILABLE, "list", "head")
    start = trio.current_time()
    with pytest.raises(errors.Unavailable):
        await b.store.size_of(uuid)
    assert trio.current_time() - start <= b.settings.read_timeout + 1
    await trio.sleep(SHARED_CONFIRM_TTL + 0.01)
    with pytest.raises(errors.Unavailable):
        await b.read(known)
    b.backend.set(Mode.OK)
    assert await b.store.size_of(uuid) == 10
    assert await b.read(known) == b"k" * 10
    # Turned back to one node later, it lists the bucket again rather than trust the past.
    assert not b.journal.get_meta("inventory")


async def test_a_job_submitted_while_the_runner_gives_the_lock_back_runs(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner finished its jobs and gives the lease back (a bucket round trip, slow
    here); a new job arrives meanwhile. It is accepted (not LockHeld by this very node), it
    runs without waiting for yet another submit, and the lease it runs under is this node's
    own (its token not wiped by the release that finished after the submit)."""
    a, _ = _pair(rig_factory, tmp_path)
    lock = BucketLease("move-storage", "node-a", a.local, "objfs-locks/move",
                       clock=trio.current_time)
    release = lock.release
    releasing = trio.Event()

    async def slow_release() -> None:
        releasing.set()
        await trio.sleep(5)
        await release()

    monkeypatch.setattr(lock, "release", slow_release)
    jobs = Jobs(a.journal, a.store, OrthancClient(a.settings.orthanc), lock)
    async with trio.open_nursery() as nursery:
        await nursery.start(jobs.run)
        first = await jobs.submit("file-system", [], 0)
        with trio.fail_after(30):
            await jobs.wait(first.id)
            await releasing.wait()
        second = await jobs.submit("file-system", [], 0)
        with trio.fail_after(30):
            assert (await jobs.wait(second.id)).state.value == "Success"
        assert await lock.renew()  # the lease in the bucket is the one this node holds
        nursery.cancel_scope.cancel()


async def test_a_move_cut_by_a_crash_on_one_node_leaves_the_same_move_on_another_alone(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        tmp_path: Path) -> None:
    """A move to the bucket cut by a crash between its PUT and its record, then the same
    attachment moved by another node while the first was down. Nothing the first node kept
    of its move (a journaled delete of the object it was putting, as a single node keeps)
    may remove the other node's object when it starts again."""
    a, b = _hybrid_pair(rig_factory, tmp_path, "WriteToFileSystem")
    uuid, data = _uuid(), b"dicom" * 8000
    a = await move_cut_after_its_put(a, uuid, data)
    await _moved_back_while_down(a, b, uuid, data)


async def test_a_failed_move_to_the_bucket_takes_its_object_back(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        tmp_path: Path, running: Start) -> None:
    """SharedBucket journals no delete for the object a move puts (above): a move that fails
    after its PUT deletes the key itself."""
    a, _ = _hybrid_pair(rig_factory, tmp_path, "WriteToFileSystem")
    assert a.store.fs is not None
    await running(a)
    uuid, data = _uuid(), b"dicom" * 8000
    await a.write(uuid, data)
    a.backend.set(Mode.UNAVAILABLE, "get")
    with pytest.raises(errors.Unavailable):
        await a.store.move_to_object_storage(uuid)
    assert a.backend.calls["put"] >= 1 and a.bucket_files() == {}
    a.backend.set(Mode.OK)
    assert await a.read(uuid) == data
    assert await a.store.move_to_object_storage(uuid)
    assert list(a.bucket_files().values()) == [data] and a.store.fs.stat(uuid) is None


async def test_a_move_to_the_file_system_whose_object_delete_fails_leaves_no_delete_behind(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        tmp_path: Path) -> None:
    """A move to the file-system tier whose delete of the bucket object fails, on a node that
    then stops; another node moves the attachment back to the bucket meanwhile. A delete the
    first node had left journaled removed that object when it started again, and the
    file-system copy was gone: the attachment was lost. The move now fails instead, with the
    attachment in both tiers and the row as it was (its job runs it again)."""
    a, b = _hybrid_pair(rig_factory, tmp_path, "WriteToObjectStorage")
    uuid, data = _uuid(), b"dicom" * 8000
    async with trio.open_nursery() as nursery:
        await nursery.start(a.store.run)
        await a.write(uuid, data)
        a.backend.set(Mode.UNAVAILABLE, "delete")
        with pytest.raises(errors.Unavailable, match="stays in both tiers"):
            await a.store.move_to_file_system(uuid)
        assert a.store.fs is not None and a.store.fs.stat(uuid) is not None
        row = a.journal.get(uuid)
        assert row is not None and row.state == UPLOADED
        nursery.cancel_scope.cancel()
    a = a.crashed()  # stopped before the bucket took deletes again
    await _moved_back_while_down(a, b, uuid, data)


@pytest.mark.parametrize("mode", [Mode.GATED, Mode.ANSWER_GATED])
async def test_a_move_to_the_file_system_cut_during_its_object_delete_leaves_no_delete_behind(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        tmp_path: Path, mode: Mode) -> None:
    """A node that dies while the bucket has its move's object delete (not yet done, or done
    and not yet answered); another node moves the attachment back to the bucket meanwhile.
    A delete the first node had journaled before its request resumed when it started again
    and removed that object, the file-system copy gone with the move back: the attachment
    was lost. The move now deletes the objects before it changes the row, so the start finds
    the row as it was, and the other node's object is confirmed, not deleted."""
    a, b = _hybrid_pair(rig_factory, tmp_path, "WriteToObjectStorage")
    uuid, data = _uuid(), b"dicom" * 8000
    a = await move_cut_at(a, uuid, data, "move_to_file_system", "delete", mode)
    assert a.store.fs is not None and a.store.fs.stat(uuid) is not None
    assert (a.bucket_files() == {}) is (mode is Mode.ANSWER_GATED)
    await _moved_back_while_down(a, b, uuid, data)


async def test_a_move_to_the_file_system_cut_after_its_object_delete_ends_when_run_again(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        tmp_path: Path) -> None:
    """The same cut, with the object deleted and its answer lost, and nobody moving the
    attachment meanwhile: the row the node finds at its start names an object that is gone,
    and the move's job, run again, finds the attachment in the file-system tier alone."""
    a, b = _hybrid_pair(rig_factory, tmp_path, "WriteToObjectStorage")
    uuid, data = _uuid(), b"dicom" * 8000
    a = await move_cut_at(a, uuid, data, "move_to_file_system", "delete", Mode.ANSWER_GATED)
    row = a.journal.get(uuid)
    assert row is not None and row.state == UPLOADED and a.bucket_files() == {}
    async with trio.open_nursery() as nursery:
        for rig in (a, b):
            await nursery.start(rig.store.run)
        assert not await a.store.move_to_file_system(uuid)
        assert a.journal.get(uuid) is None
        for rig in (a, b):
            assert await rig.read(uuid) == data
        nursery.cancel_scope.cancel()


async def _delete_on_b_during_a_move(a: Rig, b: Rig, uuid: str, data: bytes, move: str,
                                     held: str, holds: dict[str, trio.Event]) -> None:
    """Orthanc deletes `uuid` through node `b` while node `a` moves it (`move`), the move's
    worker-thread step `held` waiting until the delete is done; then the attachment must be
    gone from both tiers and served by neither node."""
    async with trio.open_nursery() as nursery:
        for rig in (a, b):
            await nursery.start(rig.store.run)
        await a.write(uuid, data)
        holds[held] = trio.Event()
        outcome: list[BaseException | bool] = []

        async def run_move() -> None:
            try:
                outcome.append(await getattr(a.store, move)(uuid))
            except errors.ObjfsError as exc:
                outcome.append(exc)

        async with trio.open_nursery() as moving:
            moving.start_soon(run_move)
            await trio.sleep(1)  # the move runs up to its held step
            assert not outcome
            await b.store.unlink(uuid)
            assert await b.store.drain(timeout=60)
            holds.pop(held).set()
        assert isinstance(outcome[0], errors.NotFound), outcome
        assert "deleted while it was moved" in str(outcome[0])
        for rig in (a, b):
            assert await rig.store.drain(timeout=60)
        await trio.sleep(SHARED_CONFIRM_TTL + 0.01)
        for rig in (a, b):
            with pytest.raises(errors.NotFound):
                await rig.read(uuid)
        nursery.cancel_scope.cancel()
    assert a.store.fs is not None and a.store.fs.stat(uuid) is None
    assert a.bucket_files() == {}
    for rig in (a, b):
        assert rig.journal.get(uuid) is None


async def test_a_delete_on_one_node_during_a_move_to_the_file_system_on_another_leaves_nothing(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        tmp_path: Path, holds: dict[str, trio.Event]) -> None:
    """The delete looks at both tiers after the move fetched the object and before it wrote
    the file-system copy: it finds the file-system tier empty and deletes the object. The
    move then published its copy and deleted nothing (the object was gone), and the copy of
    a deleted attachment stayed in the file-system tier for good. The delete now leaves a
    tombstone first; the move, its copy written, finds it and removes the copy."""
    a, b = _hybrid_pair(rig_factory, tmp_path, "WriteToObjectStorage")
    await _delete_on_b_during_a_move(a, b, _uuid(), b"dicom" * 8000, "move_to_file_system",
                                     "write_copy", holds)


@pytest.mark.parametrize("sealed_file", [False, True])
async def test_a_delete_on_one_node_during_a_move_to_the_bucket_on_another_leaves_nothing(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        tmp_path: Path, holds: dict[str, trio.Event], sealed_file: bool) -> None:
    """The delete looks at both tiers after the move read the plaintext file (its encrypted
    body ready) and before its PUT: it removes the file and finds no object. The move then
    put the object and recorded it, so the bucket kept a deleted attachment, which the
    moving node served. The move now finds the delete's tombstone after its record, and
    deletes the object and the row. When the file is already A1 (`sealed_file`), the move
    sends the file itself, which is gone: NotFound, not an unexpected FileNotFoundError."""
    key = tmp_path / "master.key"
    codec.write_key_file(key)
    a, b = _hybrid_pair(rig_factory, tmp_path, "WriteToFileSystem",
                        StorageEncryption={"MasterKey": [1, str(key)]},
                        EncryptFileSystemTier=sealed_file)
    await _delete_on_b_during_a_move(a, b, _uuid(), b"dicom" * 8000, "move_to_object_storage",
                                     "sha256_file", holds)


def test_tombstones_are_pruned_by_age(tmp_path: Path) -> None:
    tier = FileSystemTier(tmp_path, None, False, "node-a")
    old, new = _uuid(), _uuid()
    for uuid in (old, new):
        tier.mark_deleted(uuid)
    os.utime(tier._tombstone(old), (1000.0, 1000.0))
    assert tier.deleted(old) and tier.deleted(new)
    assert tier.prune_tombstones(older_than=2000.0) == 1
    assert not tier.deleted(old) and tier.deleted(new)
    assert tier.children("") == []  # never shown as an Orthanc directory


async def test_a_delete_right_after_another_node_moved_the_attachment_to_the_bucket_finds_it(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        tmp_path: Path) -> None:
    """Node b read the attachment from the file-system tier, its bucket lookup remembered
    as absent (SHARED_NEGATIVE_TTL); node a then moved it to the bucket, and Orthanc deleted
    it through b within that bound: b found it in neither tier (ENOENT to Orthanc) and the
    object stayed. A delete asks the bucket afresh."""
    a, b = _hybrid_pair(rig_factory, tmp_path, "WriteToObjectStorage")
    uuid, data = _uuid(), b"dicom" * 8000
    async with trio.open_nursery() as nursery:
        for rig in (a, b):
            await nursery.start(rig.store.run)
        await a.write(uuid, data)
        assert await a.store.move_to_file_system(uuid)
        assert await b.read(uuid) == data
        assert await a.store.move_to_object_storage(uuid)
        await b.store.unlink(uuid)
        for rig in (a, b):
            assert await rig.store.drain(timeout=60)
        nursery.cancel_scope.cancel()
    assert a.store.fs is not None and a.store.fs.stat(uuid) is None
    assert a.bucket_files() == {}


@contextlib.asynccontextmanager
async def _moved_back_by_the_other(a: Rig, b: Rig, mode: str) -> AsyncIterator[tuple[str, bytes]]:
    """Both nodes running: an attachment written through node a, moved to the file-system
    tier by a (which then remembers its object absent for SHARED_NEGATIVE_TTL), and moved
    back to the bucket by node b at once; yields its uuid and data."""
    uuid, data = _uuid(), b"dicom" * 8000
    async with trio.open_nursery() as nursery:
        for rig in (a, b):
            await nursery.start(rig.store.run)
        await a.write(uuid, data)
        if mode == "WriteToFileSystem":
            assert await a.store.move_to_object_storage(uuid)
        assert await a.store.move_to_file_system(uuid)
        assert await b.store.move_to_object_storage(uuid)
        yield uuid, data
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("mode", ["WriteToObjectStorage", "WriteToFileSystem"])
async def test_a_node_finds_what_another_moved_back_right_after_it_moved_it_away(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        tmp_path: Path, mode: str) -> None:
    """Node a moved the attachment to the file-system tier (its bucket object gone, which it
    remembered for SHARED_NEGATIVE_TTL), node b moved it back to the bucket at once, and a
    looked it up and read it within that bound: a found it in neither tier (ENOENT to
    Orthanc) until the bound ran out. A node now looks again before it answers absent."""
    a, b = _hybrid_pair(rig_factory, tmp_path, mode)
    async with _moved_back_by_the_other(a, b, mode) as (uuid, data):
        assert await a.store.size_of(uuid) == len(data)
        assert await a.read(uuid) == data


@pytest.mark.parametrize("mode", ["WriteToObjectStorage", "WriteToFileSystem"])
async def test_a_move_right_after_another_node_moved_the_attachment_back_finds_it(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        tmp_path: Path, mode: str) -> None:
    """The same moves, then node a's move job asked again within the bound: its move to the
    file-system tier, and its move to the bucket, found the attachment in neither tier
    (NotFound: the job failed). They now look again as a lookup does: the move to the
    file-system tier moves it, the move to the bucket finds it there already."""
    a, b = _hybrid_pair(rig_factory, tmp_path, mode)
    async with _moved_back_by_the_other(a, b, mode) as (uuid, data):
        assert await a.store.move_to_file_system(uuid)
        assert await b.store.move_to_object_storage(uuid)
        assert not await a.store.move_to_object_storage(uuid)
        assert a.store.fs is not None and a.store.fs.stat(uuid) is None
        for rig in (a, b):
            assert await rig.read(uuid) == data
    assert list(a.bucket_files().values()) == [data]


@pytest.mark.parametrize("mode", [None, "WriteToObjectStorage", "WriteToFileSystem"])
async def test_a_new_attachment_costs_one_bucket_listing(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        tmp_path: Path, mode: str | None) -> None:
    """Orthanc's store of a new attachment: two lookups of the absent name (its `stat`, then
    the kernel's before the create), then the create, write and close. One LIST in every
    mode (docs/scale-out.md, "Requests"): in HybridMode the second look at the bucket that
    settles an absent name (`Names._found_on_second_look`) is saved by looking at the
    file-system tier first for a name the journal does not know."""
    a, _ = _pair(rig_factory, tmp_path) if mode is None else \
        _hybrid_pair(rig_factory, tmp_path, mode)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.store.run)
        for _ in range(5):
            uuid = _uuid()
            for _ in range(2):
                assert await a.store.size_of(uuid) is None
            await a.write(uuid, b"dicom" * 200)
        assert a.backend.calls["list"] == 5
        nursery.cancel_scope.cancel()
