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

from objfs import codec, errors
from tests.inprocess.conftest import Rig, hybrid_rig, move_cut_after_its_put, moved_in_the_end
from tests.inprocess.faults import Mode
from tests.inprocess.test_budget import encrypted

Start = Callable[[Rig], Awaitable[None]]
GatedRig = Callable[..., Awaitable[Rig]]
Holds = dict[str, trio.Event]


def on_disk(rig: Rig) -> int:
    return sum(p.stat().st_size for p in rig.tier.data.iterdir())


async def read_into(rig: Rig, uuid: str, got: list[bytes | BaseException]) -> None:
    """A reader for a nursery: what `rig.read` returned or raised (an ObjfsError) goes to
    `got`."""
    try:
        got.append(await rig.read(uuid))
    except errors.ObjfsError as exc:
        got.append(exc)


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
    rig = hybrid_rig(rig_factory, tmp_path, "WriteToObjectStorage")
    assert rig.store.fs is not None
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


async def test_a_read_during_a_move_to_the_file_system_reads_the_moved_file(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        running: Start, holds: Holds, tmp_path: Path) -> None:
    """A reader that finds the attachment in the bucket while a move to the file-system tier
    forgets the object (its local copy already given up, the journal commit still running)
    fetched an object that is no longer the attachment's, and got NotFound (ENOENT: Orthanc
    serves 404) although the file-system tier held the attachment all along. It now reads the
    moved file."""
    rig = hybrid_rig(rig_factory, tmp_path, "WriteToObjectStorage")
    assert rig.store.fs is not None
    await running(rig)
    uuid, data = str(uuid_mod.uuid4()), os.urandom(80_000)
    await rig.write(uuid, data)
    assert await rig.store.drain(timeout=60)
    rig.store._log_deletes = False  # a slow disk: the forget commits in a worker thread
    holds["mark_pending_delete"] = trio.Event()
    got: list[bytes | BaseException] = []

    async with trio.open_nursery() as nursery:
        nursery.start_soon(rig.store.move_to_file_system, uuid)
        await trio.sleep(1)  # the move has written the file and waits on its journal write
        assert rig.store.fs.stat(uuid) is not None and not rig.tier.path(uuid).exists()
        rig.backend.set(Mode.GATED, "get")
        nursery.start_soon(read_into, rig, uuid, got)
        await trio.sleep(1)  # its download waits at the bucket
        holds["mark_pending_delete"].set()
        await trio.sleep(1)  # the move is done: the object is deleted
        rig.backend.gate.set()
    assert got == [data]
    assert await rig.store.drain(timeout=60)
    assert rig.bucket_files() == {} and await rig.read(uuid) == data


async def out_of_the_bucket_with_its_delete_left(rig: Rig, size: int) -> tuple[str, bytes]:
    """A new attachment of `size` bytes in the file-system tier of running HybridMode `rig`,
    moved to the bucket and back with the bucket's deletes held at its gate: the move back
    gives up on the object's delete after ReadTimeout and leaves it to the delete worker."""
    uuid, data = str(uuid_mod.uuid4()), os.urandom(size)
    await rig.write(uuid, data)
    assert await rig.store.move_to_object_storage(uuid)
    rig.backend.set(Mode.GATED, "delete")
    assert await rig.store.move_to_file_system(uuid)
    return uuid, data


@pytest.mark.parametrize("batches", [True, False], ids=["batch-delete", "one-by-one"])
async def test_a_move_back_to_the_bucket_waits_for_the_delete_of_the_earlier_object(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        running: Start, tmp_path: Path, batches: bool) -> None:
    """A move to the file-system tier whose object delete failed leaves that delete to the
    background worker. A move back to the bucket while the worker's request was under way
    put the same key again; the worker's delete then removed the new object and dropped its
    row, and the file-system copy was gone already: the attachment was lost. The move back
    now waits for that delete to end (and sends it itself when it is still pending)."""
    rig = hybrid_rig(rig_factory, tmp_path, "WriteToFileSystem")
    assert rig.store.fs is not None
    rig.backend.refuse_batches = not batches
    await running(rig)
    uuid, data = await out_of_the_bucket_with_its_delete_left(rig, 60_000)
    moved: list[bool] = []

    async def move_back() -> None:
        moved.append(await rig.store.move_to_object_storage(uuid))

    async with trio.open_nursery() as nursery:
        await trio.sleep(5)  # the worker's delete waits at the bucket
        nursery.start_soon(move_back)
        await trio.sleep(5)
        rig.backend.gate.set()
    assert moved == [True]
    assert await rig.store.drain(timeout=60)
    assert await rig.read(uuid) == data
    assert rig.attachments_in_bucket() == {uuid: data} and rig.store.fs.stat(uuid) is None


async def test_a_move_back_to_the_bucket_waits_for_the_earlier_delete_at_most_read_timeout(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        running: Start, tmp_path: Path) -> None:
    """The worker retries a delete for as long as the bucket refuses it; a move that waits
    for it gives up after ReadTimeout (Unavailable, its job tries again), the file left in
    place."""
    rig = hybrid_rig(rig_factory, tmp_path, "WriteToFileSystem")
    assert rig.store.fs is not None
    await running(rig)
    uuid, data = await out_of_the_bucket_with_its_delete_left(rig, 20_000)
    await trio.sleep(5)  # the worker's delete waits at the bucket
    started = trio.current_time()
    with pytest.raises(errors.Unavailable, match=r"did not end within 20\.0s"):
        await rig.store.move_to_object_storage(uuid)
    assert trio.current_time() - started == pytest.approx(20, abs=1)
    assert rig.store.fs.stat(uuid) is not None and await rig.read(uuid) == data
    rig.backend.gate.set()
    assert await rig.store.move_to_object_storage(uuid)
    assert await rig.store.drain(timeout=60)
    assert rig.attachments_in_bucket() == {uuid: data} and rig.store.fs.stat(uuid) is None


async def test_a_move_back_to_the_bucket_waits_for_every_delete_of_the_earlier_object(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        running: Start, holds: Holds, tmp_path: Path) -> None:
    """Two deletes of one uuid's objects may overlap: a move's own, and the background
    worker's for the same pending delete (queued at a start, say). A move back to the bucket
    must wait for both, not only for the first: the worker's batch delete, ending after the
    move's, removed the new object."""
    rig = hybrid_rig(rig_factory, tmp_path, "WriteToFileSystem")
    assert rig.store.fs is not None
    await running(rig)
    uuid, data = str(uuid_mod.uuid4()), os.urandom(60_000)
    await rig.write(uuid, data)
    assert await rig.store.move_to_object_storage(uuid)
    holds["_delete_sync"] = trio.Event()  # the move's own delete, one key at a time
    holds["_delete_many_sync"] = trio.Event()  # the worker's, in a batch
    moved: list[bool] = []

    async def move(to_bucket: bool) -> None:
        store = rig.store
        moved.append(await (store.move_to_object_storage(uuid) if to_bucket
                            else store.move_to_file_system(uuid)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(move, False)
        await trio.sleep(1)  # the move's delete waits at the bucket
        rig.store._queue_delete(uuid)  # as a start queues every pending delete
        await trio.sleep(1)  # the worker's batch waits at the bucket too
        holds["_delete_sync"].set()
        await trio.sleep(1)
        assert moved == [True]  # moved to the file-system tier; the worker still deleting
        nursery.start_soon(move, True)
        await trio.sleep(1)
        holds["_delete_many_sync"].set()
    assert moved == [True, True]
    assert await rig.store.drain(timeout=60)
    assert await rig.read(uuid) == data
    assert rig.attachments_in_bucket() == {uuid: data} and rig.store.fs.stat(uuid) is None


async def test_a_read_that_looks_in_the_bucket_during_a_move_there_reads_the_moved_object(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        tmp_path: Path) -> None:
    """Before the first inventory a name the journal does not know is looked up in the
    bucket. A reader whose listing was answered "absent" just before a move to the bucket
    put the object, and who then found the file-system tier empty (the move had removed the
    file meanwhile), answered ENOENT for an attachment that was in the bucket."""
    rig = hybrid_rig(rig_factory, tmp_path, "WriteToObjectStorage")
    assert rig.store.fs is not None
    uuid, data = str(uuid_mod.uuid4()), os.urandom(30_000)
    rig.store.fs.write_copy(_file(tmp_path, data), uuid)  # written in a HybridMode past
    assert not rig.store.inventory_done
    rig.backend.set(Mode.ANSWER_GATED, "list")
    got: list[bytes | BaseException] = []

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_into, rig, uuid, got)
        await trio.sleep(1)  # listed ("absent"), the answer on its way
        rig.backend.set(Mode.OK, "list")
        assert await rig.store.move_to_object_storage(uuid)
        rig.backend.gate.set()
    assert got == [data]


def _file(directory: Path, data: bytes) -> Path:
    path = directory / "source"
    path.write_bytes(data)
    return path


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


async def delete_everywhere(rig: Rig, uuid: str) -> None:
    """Orthanc's delete of `uuid`, then the wait for its object's delete to reach the bucket
    (the name may be written again from then on; other background work goes on)."""
    await rig.store.unlink(uuid)
    for _ in range(600):
        if not rig.bucket_files():
            return
        await trio.sleep(0.1)
    raise AssertionError(f"the object of {uuid} is still in the bucket")


def _sealed(rig_factory: Callable[..., Rig], tmp_path: Path) -> Rig:
    return rig_factory(EncryptLocalCache=True, **encrypted(tmp_path))


async def test_a_sealed_copy_decrypted_while_its_name_is_written_again_is_the_old_one(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        running: Start, holds: Holds, tmp_path: Path) -> None:
    """A reader of a sealed copy waits (for budget, for a worker thread) between finding the
    copy and decrypting it; meanwhile the name is deleted and written again. The reader
    decrypts the file it found (the old one: its open came first), and never takes the new
    file for a damaged old copy: that would have removed the new attachment's only copy."""
    rig = _sealed(rig_factory, tmp_path)
    await running(rig)
    uuid, old, new = str(uuid_mod.uuid4()), os.urandom(300_000), os.urandom(7_000)
    await rig.write(uuid, old)
    assert await rig.store.drain(timeout=60)  # uploaded, its sealed copy cached
    holds["decrypt_file"] = trio.Event()
    got: list[bytes] = []

    async def reader() -> None:
        got.append(await rig.read(uuid))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.sleep(1)  # the reader waits to decrypt
        await rig.store.unlink(uuid)
        assert await rig.store.drain(timeout=60)  # the object's delete done: the name is free
        await rig.write(uuid, new)
        holds["decrypt_file"].set()
    assert got == [old]
    assert await rig.read(uuid) == new
    assert await rig.store.drain(timeout=60)
    assert [codec.is_encrypted(data[:2]) for data in rig.bucket_files().values()] == [True]
    assert rig.attachments_in_bucket() == {uuid: new}


async def test_a_reader_of_a_name_written_again_never_gets_the_old_files_plaintext(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        running: Start, tmp_path: Path) -> None:
    """Readers of one sealed copy share its decrypted copy. A reader still holding the old
    file's, when the name was deleted and written again, shares it with no reader of the new
    file."""
    rig = _sealed(rig_factory, tmp_path)
    await running(rig)
    uuid, old, new = str(uuid_mod.uuid4()), os.urandom(300_000), os.urandom(7_000)
    await rig.write(uuid, old)
    assert await rig.store.drain(timeout=60)
    held = await rig.store.open_read(uuid)
    try:
        await rig.store.unlink(uuid)
        assert await rig.store.drain(timeout=60)
        await rig.write(uuid, new)
        assert await rig.store.drain(timeout=60)  # uploaded: its sealed copy is what is read
        assert await rig.read(uuid) == new
        assert os.pread(held, len(old) + 1, 0) == old
    finally:
        rig.store.close_read(uuid, held)
    assert await rig.read(uuid) == new


async def test_a_damaged_sealed_copy_found_after_its_name_was_written_again_spares_the_new(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        running: Start, holds: Holds, tmp_path: Path) -> None:
    """A reader finds a sealed copy damaged only after the name was deleted and written again
    while it waited: the damaged file went with the delete, and the reader leaves the new
    attachment's copy alone (dropping the copy "found damaged" by its name would have removed
    an acknowledged write's only copy) and reads the name afresh."""
    rig = _sealed(rig_factory, tmp_path)
    await running(rig)
    uuid, old, new = str(uuid_mod.uuid4()), os.urandom(300_000), os.urandom(7_000)
    await rig.write(uuid, old)
    assert await rig.store.drain(timeout=60)
    with open(rig.tier.path(uuid), "r+b") as copy:  # damaged in place: same inode
        copy.seek(1000)
        copy.write(bytes(b ^ 0xFF for b in copy.read(16)))
    holds["decrypt_file"] = trio.Event()
    rig.backend.set(Mode.GATED, "put")  # the new attachment's copy is its only one
    got: list[bytes] = []

    async def reader() -> None:
        got.append(await rig.read(uuid))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.sleep(1)
        await delete_everywhere(rig, uuid)
        await rig.write(uuid, new)
        holds["decrypt_file"].set()
    assert got == [new]
    rig.backend.set(Mode.OK)
    assert await rig.store.drain(timeout=60)
    assert await rig.read(uuid) == new
    assert rig.attachments_in_bucket() == {uuid: new}


@pytest.mark.parametrize("uploaded", [False, True], ids=["new-pending", "new-uploaded"])
async def test_a_download_that_ends_after_its_name_was_written_again_leaves_the_new_copy(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        running: Start, uploaded: bool) -> None:
    """A reader's download has the old object's bytes when the name is deleted (the object's
    delete done) and written again: the download must not put the old bytes in place of the
    new attachment's copy: its only one until it is uploaded; once it is, a copy of the same
    size would be served as the new attachment."""
    rig = rig_factory()
    await running(rig)
    uuid, old = str(uuid_mod.uuid4()), os.urandom(300_000)
    new = os.urandom(len(old) if uploaded else 7_000)
    await rig.write(uuid, old)
    assert await rig.store.drain(timeout=60)
    assert await rig.tier.evict(1 << 30) == len(old)
    fetched, go_on = trio.Event(), trio.Event()
    get = rig.backend.get

    async def slow_get(*args: object, **kwargs: object) -> int:
        got = await get(*args, **kwargs)  # type: ignore[arg-type]
        fetched.set()
        await go_on.wait()  # the answer's bytes are in; the reader is slow to go on
        return got

    rig.backend.get = slow_get  # type: ignore[method-assign]
    results: list[bytes | Exception] = []

    async def reader() -> None:
        try:
            results.append(await rig.read(uuid))
        except errors.NotFound as exc:
            results.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await fetched.wait()
        rig.backend.get = get  # type: ignore[method-assign]
        await delete_everywhere(rig, uuid)
        if uploaded:
            await rig.write(uuid, new)
            assert await rig.store.drain(timeout=60)
        else:
            rig.backend.set(Mode.GATED, "put")  # the new copy stays the only one
            await rig.write(uuid, new)
        go_on.set()
    assert results[0] == old or isinstance(results[0], errors.NotFound), results
    assert await rig.read(uuid) == new
    rig.backend.set(Mode.OK)
    assert await rig.store.drain(timeout=60)
    assert list(rig.bucket_files().values()) == [new]


async def test_an_eviction_under_way_never_removes_the_copy_of_a_name_written_again(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        running: Start, holds: Holds) -> None:
    """An eviction chooses a clean copy, then unlinks it in a worker thread; meanwhile the
    name is deleted and written again. The new write waits for that eviction: the thread
    would otherwise unlink the new attachment's copy, its only one until it is uploaded."""
    rig = rig_factory()
    await running(rig)
    uuid, old, new = str(uuid_mod.uuid4()), os.urandom(300_000), os.urandom(7_000)
    await rig.write(uuid, old)
    assert await rig.store.drain(timeout=60)
    holds["_remove_copies"] = trio.Event()
    written = trio.Event()

    async def write_again() -> None:
        await rig.write(uuid, new)
        written.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(rig.tier.evict, 1 << 30)
        try:
            await trio.sleep(1)  # the eviction chose the copy; its thread waits
            await delete_everywhere(rig, uuid)
            rig.backend.set(Mode.GATED, "put")  # the new copy stays the only one
            nursery.start_soon(write_again)
            await trio.sleep(1)
            assert not written.is_set()  # waits for the eviction
        finally:
            holds["_remove_copies"].set()
    assert await rig.read(uuid) == new
    rig.backend.set(Mode.OK)
    assert await rig.store.drain(timeout=60)
    assert list(rig.bucket_files().values()) == [new]


async def test_a_move_back_to_the_bucket_waits_for_a_delete_that_began_during_its_own(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        holds: Holds, tmp_path: Path) -> None:
    """A move to the bucket sends a pending delete of the attachment's object itself, then
    puts the object. A delete worker that found the row still pending while the move's own
    delete dropped it went on to delete the new object once the move had put it (the move
    had stopped waiting for deletes before that one began): the file-system copy was gone,
    and the attachment lost (found by `test_random_crashes.py`: a move cut by a crash, run
    again by its job while the start resumed the delete it had journaled). The move now
    waits until no delete is under way and the row is no longer pending, together."""
    uuid, data = str(uuid_mod.uuid4()), os.urandom(30_000)
    # The journaled delete of the object the move put is left.
    rig = await move_cut_after_its_put(hybrid_rig(rig_factory, tmp_path, "WriteToFileSystem"),
                                       uuid, data)
    assert rig.store.fs is not None
    holds["remove"] = trio.Event()  # the move's own delete drops the row slowly
    holds["_delete_many_sync"] = trio.Event()  # the worker's delete waits at the bucket
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rig.store.move_to_object_storage, uuid)  # its job, run again
        await trio.sleep(1)
        await nursery.start(rig.store.run)  # resumes that delete
        await trio.sleep(5)
        holds["remove"].set()
        await trio.sleep(5)
        holds["_delete_many_sync"].set()
        await moved_in_the_end(rig, uuid, data)
        nursery.cancel_scope.cancel()
    assert rig.attachments_in_bucket() == {uuid: data}
