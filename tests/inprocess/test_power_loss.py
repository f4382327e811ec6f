"""Power-loss simulations (issue 12, finding 4): a journal that lost its last lazy commits, a
local copy cut short. The attachment is fetched again or answers EIO, never short data; a
deleted one is never served again."""

from __future__ import annotations

import os
import time
import uuid as uuid_mod
from collections.abc import Callable

import pytest
import trio
import trio.testing

from objfs import errors
from objfs.cache import MTIME_SLACK
from objfs.journal import PENDING_DELETE, PENDING_UPLOAD, UPLOADED
from tests.inprocess.conftest import Rig


async def _drained(rig: Rig) -> None:
    """Run the rig's workers until every journaled upload and delete is done."""
    async with trio.open_nursery() as nursery:
        await nursery.start(rig.store.run)
        assert await rig.store.drain(timeout=60)
        nursery.cancel_scope.cancel()


async def _pending_delete_until_drained(rig: Rig, uuid: str) -> None:
    """After a restart: `uuid` is a pending delete, never readable, and neither in the
    journal nor in the bucket once the rig's workers have drained."""
    row = rig.journal.get(uuid)
    assert row is not None and row.state == PENDING_DELETE
    with pytest.raises(errors.NotFound):
        await rig.read(uuid)
    await _drained(rig)
    assert rig.journal.get(uuid) is None and rig.bucket_files() == {}
    assert not rig.tier.path(uuid).exists()


async def test_a_deleted_copy_leaves_its_place_before_its_row_goes(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig]) -> None:
    """A delete leaves the copy in place for after Orthanc's burst. When the row goes first
    (the object's delete is done) while the put is still in the intent log, the copy must be
    gone from data/ already: the replay makes a logged put with no row and a copy in place a
    pending upload, and the deleted attachment would be served and uploaded again."""
    rig = rig_factory()
    uuid = str(uuid_mod.uuid4())
    await rig.write(uuid, os.urandom(5000))  # no worker runs: no checkpoint empties the log
    rig.store._log_deletes = False  # a slow disk: the delete commits in SQLite, not logged
    await rig.store.unlink(uuid)
    assert rig.tier.path(uuid).exists()  # left for after the burst
    await rig.store._delete_remote(uuid)  # the delete worker's step: the row goes
    assert rig.journal.get(uuid) is None
    assert rig.journal.logged_intents == 1  # the put, still in the log
    assert not rig.tier.path(uuid).exists()
    rig = rig.restarted()
    assert rig.journal.get(uuid) is None
    with pytest.raises(errors.NotFound):
        await rig.read(uuid)
    assert list(rig.tier.data.iterdir()) == [] and rig.tier.used == 0


async def _written_and_uploaded(rig: Rig, data: bytes) -> str:
    """A new attachment, uploaded; its put checkpointed out of the intent log."""
    uuid = str(uuid_mod.uuid4())
    await rig.write(uuid, data)
    await _drained(rig)
    assert rig.journal.checkpoint_log()
    return uuid


async def test_journal_that_lost_uploaded_after_eviction_reads_from_the_bucket(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    data = os.urandom(70_000)
    uuid = await _written_and_uploaded(rig, data)
    # What a power loss could leave before the fix: the copy evicted (unlinked) while the
    # journal on disk still said pending-upload.
    rig.journal._write("UPDATE attachments SET state=?, cached=1 WHERE uuid=?",
                       (PENDING_UPLOAD, uuid))
    rig.tier.path(uuid).unlink()
    rig = rig.restarted()
    assert await rig.read(uuid) == data
    row = rig.journal.get(uuid)
    assert row is not None and row.state == UPLOADED
    # The upload worker meets the same row without spinning: it adopts the bucket's object.
    async with trio.open_nursery() as nursery:
        await nursery.start(rig.store.run)
        assert await rig.store.drain(timeout=60)
        nursery.cancel_scope.cancel()


async def test_pending_upload_whose_copy_is_lost_and_not_in_the_bucket_gives_eio(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    uuid, data = str(uuid_mod.uuid4()), os.urandom(5000)
    await rig.write(uuid, data)  # acknowledged, never uploaded (no workers running)
    rig.tier.path(uuid).write_bytes(data[:100])  # the disk lost the end of it
    rig = rig.restarted()
    with pytest.raises(errors.Corrupt):
        await rig.read(uuid)


async def test_a_short_cached_copy_is_dropped_at_start_and_fetched_again(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    data = os.urandom(90_000)
    uuid = await _written_and_uploaded(rig, data)
    with open(rig.tier.path(uuid), "r+b") as f:
        f.truncate(1000)
    rig = rig.restarted()
    assert not rig.tier.path(uuid).exists()
    assert rig.tier.used == 0
    assert await rig.read(uuid) == data


async def test_a_copy_cut_short_while_running_is_fetched_again(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    data = os.urandom(90_000)
    uuid = await _written_and_uploaded(rig, data)
    with open(rig.tier.path(uuid), "r+b") as f:
        f.truncate(10)
    assert await rig.read(uuid) == data


async def test_eviction_makes_uploaded_durable_before_unlinking(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        monkeypatch: pytest.MonkeyPatch) -> None:
    rig = rig_factory()
    uuid = await _written_and_uploaded(rig, os.urandom(30_000))
    present_at_barrier: list[bool] = []
    barrier = rig.journal.barrier

    def spy() -> None:
        present_at_barrier.append(rig.tier.path(uuid).exists())
        barrier()

    monkeypatch.setattr(rig.journal, "barrier", spy)
    assert await rig.tier.evict(1) == 30_000
    assert present_at_barrier == [True]
    assert not rig.tier.path(uuid).exists()


async def _fetched_copy(rig: Rig, data: bytes) -> str:
    """An uploaded attachment whose local copy was evicted and then fetched by a read."""
    uuid = await _written_and_uploaded(rig, data)
    assert await rig.tier.evict(len(data)) == len(data)
    rig.tier.checkpoint()  # the eviction and everything before it are on disk
    rig.backend.calls.clear()
    assert await rig.read(uuid) == data
    assert rig.backend.calls["get"] == 1 and rig.tier.path(uuid).exists()
    return uuid


async def test_a_copy_fetched_after_the_last_checkpoint_is_fetched_again_after_a_crash(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig]) -> None:
    """Downloads are not fsynced one by one: after a power loss a copy fetched since the last
    checkpoint may hold anything of its size. It is dropped at start, never served."""
    rig = rig_factory()
    data = os.urandom(60_000)
    uuid = await _fetched_copy(rig, data)
    rig.tier.path(uuid).write_bytes(bytes(len(data)))  # right size, data never written
    os.utime(rig.tier.path(uuid))
    rig = rig.restarted()  # no checkpoint since the download: an unclean stop
    assert not rig.tier.path(uuid).exists() and rig.tier.used == 0
    rig.backend.calls.clear()
    assert await rig.read(uuid) == data
    assert rig.backend.calls["get"] == 1


async def test_a_copy_whose_cached_flag_was_lost_in_a_crash_is_removed_and_fetched_again(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig]) -> None:
    """A download's "cached" flag waits in memory for its burst's commit
    (`Journal.cached_later`): a crash before it leaves a copy no row claims. The start
    removes it, gives nothing of the budget to it, and the next read fetches it again."""
    rig = rig_factory()
    data = os.urandom(60_000)
    uuid = await _fetched_copy(rig, data)
    assert rig.journal.kept_flags == 1  # no store task runs here: not committed yet
    rig.journal._marked.clear()  # lost with the process
    rig = rig.restarted()
    assert not rig.tier.path(uuid).exists() and rig.tier.used == 0
    rig.backend.calls.clear()
    assert await rig.read(uuid) == data
    assert rig.backend.calls["get"] == 1


@pytest.mark.parametrize("final", [False, True])
async def test_a_checkpoint_keeps_fetched_copies_across_a_restart(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        final: bool) -> None:
    """A periodic checkpoint keeps what was fetched before it; the one at a clean stop keeps
    everything, even a copy fetched a moment before."""
    rig = rig_factory()
    data = os.urandom(60_000)
    uuid = await _fetched_copy(rig, data)
    if not final:
        await trio.to_thread.run_sync(time.sleep, MTIME_SLACK + 0.1)  # past the slack
    rig.tier.checkpoint(final)
    rig = rig.restarted()
    assert rig.tier.path(uuid).exists() and rig.tier.used == len(data)
    rig.backend.calls.clear()
    assert await rig.read(uuid) == data
    assert rig.backend.calls["get"] == 0


async def test_an_acknowledged_delete_whose_row_change_was_lost_is_not_served_again(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    data = os.urandom(5000)
    uuid = await _written_and_uploaded(rig, data)
    await rig.store.unlink(uuid)  # acknowledged; no worker runs, so the object stays
    assert rig.journal.logged_intents == 1
    # A power loss before the next durable commit: the lazy row change is gone, the intent
    # log's record is not.
    rig.journal._write("UPDATE attachments SET state=?, cached=0 WHERE uuid=?", (UPLOADED, uuid))
    assert rig.bucket_files()  # the object is still there to be served
    rig = rig.restarted()
    with pytest.raises(errors.NotFound):
        await rig.read(uuid)
    row = rig.journal.get(uuid)
    assert row is not None and row.state == PENDING_DELETE
    await _drained(rig)  # and the object delete is resumed
    assert rig.bucket_files() == {}


async def test_an_acknowledged_delete_of_a_write_never_uploaded_is_not_uploaded_after_a_crash(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        caplog: pytest.LogCaptureFixture) -> None:
    """Orthanc unlinks every duplicate it receives right after writing it. That delete drops
    the row lazily and is made durable by the intent log: a power loss that brings the row
    back as a pending upload (its local copy still in place: it is removed after the burst)
    ends in a delete, never in an upload or a "data lost" error."""
    rig = rig_factory()
    uuid = str(uuid_mod.uuid4())
    await rig.write(uuid, os.urandom(5000))  # no worker runs: it is never sent
    await rig.store.unlink(uuid)
    assert rig.journal.get(uuid) is None
    assert rig.journal.logged_intents == 2  # its put, then its delete
    assert rig.tier.path(uuid).exists()
    rig.journal.put_pending(uuid, 5000)  # the lazy change lost, the log record durable
    rig = rig.restarted()
    with pytest.raises(errors.NotFound):
        await rig.read(uuid)
    await _drained(rig)
    assert rig.journal.get(uuid) is None and rig.bucket_files() == {}
    assert rig.backend.calls["put"] == 0
    assert "data lost" not in caplog.text


def _lazy_commits_lost(rig: Rig) -> None:
    """What a power loss takes from the journal: the row changes kept in memory, and those
    committed lazily since the last durable commit (here: none reached SQLite)."""
    rig.journal._unapplied.clear()
    rig.journal._marked.clear()


async def test_an_acknowledged_write_whose_row_was_only_logged_is_uploaded_after_a_crash(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    data = os.urandom(5000)
    uuid = str(uuid_mod.uuid4())
    await rig.write(uuid, data)  # acknowledged: its put is in the intent log
    assert rig.journal.logged_intents == 1
    _lazy_commits_lost(rig)
    rig = rig.restarted()
    row = rig.journal.get(uuid)
    assert row is not None and row.state == PENDING_UPLOAD
    assert await rig.read(uuid) == data
    await _drained(rig)
    assert list(rig.bucket_files().values()) == [data]


async def test_a_deleted_attachment_whose_put_is_still_logged_does_not_come_back(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Written, uploaded, deleted and the delete done in the bucket, all before the intent
    log was checkpointed: the replay of its put finds no copy and brings nothing back; its
    logged delete leaves a pending delete (the replay cannot tell this from a delete whose
    row changes were all lost: the next test), whose needless object delete drops it."""
    rig = rig_factory()
    monkeypatch.setattr(rig.journal, "checkpoint_log", lambda: False)  # never emptied
    uuid = str(uuid_mod.uuid4())
    await rig.write(uuid, os.urandom(5000))
    await _drained(rig)
    await rig.store.unlink(uuid)
    await _drained(rig)
    assert rig.journal.logged_intents == 2 and rig.bucket_files() == {}
    rig = rig.restarted()
    await _pending_delete_until_drained(rig, uuid)
    assert rig.backend.calls["put"] == 0


async def test_an_uploaded_attachment_deleted_before_its_rows_were_committed_leaves_the_bucket(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Written (its put logged), uploaded (its end kept in memory), deleted (logged), and a
    crash before any of those row changes reached SQLite (the CI's SIGKILL at
    "after-object-delete" found such an object left in the bucket): the replay finds the
    put's copy gone and its delete logged, and repeats the object's delete."""
    rig = rig_factory()
    # Every row change stays kept in memory until the crash; the log is never emptied.
    monkeypatch.setattr(rig.journal, "_apply_locked", lambda: None)
    monkeypatch.setattr(rig.journal, "checkpoint_log", lambda: False)
    uuid = str(uuid_mod.uuid4())
    async with trio.open_nursery() as nursery:
        await nursery.start(rig.store.run)
        await rig.write(uuid, os.urandom(5000))
        while (row := rig.journal.get(uuid)) is None or row.state != UPLOADED:
            await trio.sleep(0.01)
        assert len(rig.bucket_files()) == 1
        nursery.cancel_scope.cancel()
    await rig.store.unlink(uuid)
    assert _sql_state_of(rig, uuid) is None  # put, end and delete: all kept in memory
    rig.journal._unapplied.clear()  # the crash loses them
    rig.journal._uploaded.clear()
    await _pending_delete_until_drained(rig.restarted(), uuid)


async def test_a_write_deleted_while_the_intent_log_is_full_stays_deleted_after_a_crash(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Orthanc's duplicate, written while the log had room and deleted once it was full:
    the delete commits durably as a pending delete, not as a dropped row, so that a crash
    before its copy is gone cannot have the replay of its put upload it."""
    rig = rig_factory()
    uuid = str(uuid_mod.uuid4())
    await rig.write(uuid, os.urandom(5000))
    monkeypatch.setattr(rig.journal, "delete_logged", lambda uuid, forget=False: False)
    await rig.store.unlink(uuid)
    assert _sql_state_of(rig, uuid) == PENDING_DELETE
    rig = rig.restarted()
    with pytest.raises(errors.NotFound):
        await rig.read(uuid)
    await _drained(rig)
    assert rig.journal.get(uuid) is None and rig.backend.calls["put"] == 0


def _sql_state_of(rig: Rig, uuid: str) -> str | None:
    found = rig.journal._reader.execute("SELECT state FROM attachments WHERE uuid=?",
                                        (uuid,)).fetchone()
    return None if found is None else str(found[0])


async def test_copies_a_damaged_intent_log_no_longer_places_go_to_lost_and_found(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        caplog: pytest.LogCaptureFixture) -> None:
    rig = rig_factory()
    data = os.urandom(5000)
    uuid = str(uuid_mod.uuid4())
    await rig.write(uuid, data)
    _lazy_commits_lost(rig)
    log_path = rig.journal._intents.path  # type: ignore[union-attr]
    rig.journal.close()
    with open(log_path, "r+b") as f:
        f.write(b"garbage!")
    rig = Rig(rig.root, rig.objfs)
    assert rig.journal.get(uuid) is None
    assert (rig.tier.root / "lost+found" / uuid).read_bytes() == data
    assert "a damaged intent log, but 1 local copies" in caplog.text
