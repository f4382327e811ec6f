"""The intent log (objfs.intentlog) on its own, and as the journal uses it: what a reopen
finds after appends, resets, torn writes and a damaged header; deletes and puts logged, kept
in memory, replayed, checkpointed and counted."""

from __future__ import annotations

import os
import sqlite3
import threading
import uuid as uuid_mod
from pathlib import Path

import pytest

import objfs.journal as journal_module
from objfs import intentlog
from objfs.intentlog import SLOT, Intent, IntentLog, Kind
from objfs.journal import (
    APPLY_BATCH,
    INTENT_LOG,
    LEGACY_DELETE_LOG,
    PENDING_DELETE,
    PENDING_UPLOAD,
    UPLOADED,
    Journal,
    read_stats,
)
from tests.support.crash import abandon


def _uuids(n: int) -> list[str]:
    return [str(uuid_mod.uuid4()) for _ in range(n)]


def uuids_of(intents: list[Intent]) -> list[str]:
    return [intent.uuid for intent in intents]


def pending_after_reopen(path: Path) -> list[str]:
    """The uuids a fresh open of the log at `path` finds in it (as a restart would)."""
    again = IntentLog(path)
    try:
        return uuids_of(again.pending())
    finally:
        again.close()


def test_logged_uuids_are_found_again_in_order(tmp_path: Path) -> None:
    log = IntentLog(tmp_path / "d.log")
    uuids = _uuids(5)
    for uuid in uuids:
        assert log.append_delete(uuid)
    log.close()
    again = IntentLog(tmp_path / "d.log")
    assert uuids_of(again.pending()) == uuids
    assert again.count == 5
    again.close()


def test_a_reset_empties_the_log_only_when_nothing_was_appended_since(tmp_path: Path) -> None:
    log = IntentLog(tmp_path / "d.log")
    first = _uuids(3)
    for uuid in first:
        log.append_delete(uuid)
    later = _uuids(1)[0]
    log.append_delete(later)
    assert not log.reset_if(3)  # the fourth was not covered: it must stay
    assert uuids_of(log.pending()) == [*first, later]
    assert log.reset_if(4)
    # Records of the old generation are still on disk in slots 2-4: they must not count.
    newer = _uuids(1)[0]
    log.append_delete(newer)
    log.close()
    assert pending_after_reopen(tmp_path / "d.log") == [newer]


def three_logged_one_spoilt(path: Path, record: int) -> list[str]:
    """A log at `path` holding three uuids (returned), then bytes inside its `record`th
    record (1 to 3) overwritten."""
    log = IntentLog(path)
    uuids = _uuids(3)
    for uuid in uuids:
        log.append_delete(uuid)
    log.close()
    with open(path, "r+b") as f:
        f.seek(record * SLOT + 20)
        f.write(b"\xff" * 8)
    return uuids


def test_a_torn_record_ends_the_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    uuids = three_logged_one_spoilt(tmp_path / "d.log", 3)  # an append cut short by a crash
    assert pending_after_reopen(tmp_path / "d.log") == uuids[:2]
    assert not caplog.records and not (tmp_path / "d.log.damaged").exists()


def test_a_damaged_record_is_reported_and_the_others_still_count(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    uuids = three_logged_one_spoilt(tmp_path / "d.log", 2)  # a sound third after it
    before = (tmp_path / "d.log").read_bytes()
    again = IntentLog(tmp_path / "d.log")
    assert uuids_of(again.pending()) == [uuids[0], uuids[2]]
    assert again.count == 3  # the next append goes after the damaged slot's successor
    assert "1 of its records do not verify; the 2 that do are replayed" in caplog.text
    assert (tmp_path / "d.log.damaged").read_bytes() == before
    assert again.append_delete(uuids[1])
    assert uuids_of(again.pending()) == [uuids[0], uuids[2], uuids[1]]
    assert again.reset_if(4) and uuids_of(again.pending()) == []
    again.close()


def test_a_damaged_header_gives_a_fresh_log(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    log = IntentLog(tmp_path / "d.log")
    log.append_delete(_uuids(1)[0])
    log.close()
    with open(tmp_path / "d.log", "r+b") as f:
        f.write(b"garbage!")
    before = (tmp_path / "d.log").read_bytes()
    again = IntentLog(tmp_path / "d.log")
    assert uuids_of(again.pending()) == []
    assert os.path.getsize(tmp_path / "d.log") == intentlog.SLOTS * SLOT
    assert again.append_delete(_uuids(1)[0])
    again.close()
    assert "its header does not verify" in caplog.text and "objfs audit" in caplog.text
    assert (tmp_path / "d.log.damaged").read_bytes() == before


def test_a_full_log_refuses_appends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(intentlog, "SLOTS", 4)
    log = IntentLog(tmp_path / "d.log")
    uuids = _uuids(4)
    assert [log.append_delete(u) for u in uuids] == [True, True, True, False]
    assert log.full and uuids_of(log.pending()) == uuids[:3]
    assert log.reset_if(3) and not log.full
    log.close()


def test_names_that_are_not_uuids_are_refused(tmp_path: Path) -> None:
    log = IntentLog(tmp_path / "d.log")
    with pytest.raises(ValueError):
        log.append_delete("x" * 41)
    with pytest.raises(ValueError):
        log.append_delete("é" * 10)
    assert log.count == 0
    log.close()


def test_the_journal_replays_deletes_whose_row_change_was_lost(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite")
    kept, gone = _uuids(2)
    for uuid in (kept, gone):
        journal.put_pending(uuid, 10)
        journal.mark_uploaded(uuid, f"{uuid}.dcm")
        journal.set_cached(uuid, True)
    assert journal.delete_logged(gone)
    assert journal.get(gone).state == PENDING_DELETE  # type: ignore[union-attr]
    assert journal.logged_intents == 1
    # What a power loss may leave: the lazy row change lost, the log record durable.
    journal._write("UPDATE attachments SET state=?, cached=1 WHERE uuid=?", (UPLOADED, gone))
    journal.close()
    again = Journal(tmp_path / "journal.sqlite")
    row = again.get(gone)
    assert row is not None and row.state == PENDING_DELETE and not row.cached
    assert again.get(kept).state == UPLOADED  # type: ignore[union-attr]
    assert again.logged_intents == 0  # replayed durably, then emptied
    again.close()
    assert pending_after_reopen(tmp_path / INTENT_LOG) == []


def test_a_forgotten_pending_upload_whose_row_came_back_is_replayed_as_a_delete(
        tmp_path: Path) -> None:
    """`forget`: a pending upload never sent loses its row at once; a power loss that undoes
    that lazy change leaves a row the replay turns into a pending delete, not an upload."""
    journal = Journal(tmp_path / "journal.sqlite")
    gone, = _uuids(1)
    journal.put_pending(gone, 10)
    journal.note_series([(gone, "1.2.3")])
    assert journal.delete_logged(gone, forget=True)
    assert journal.get(gone) is None and journal.series_of(gone) is None
    assert journal.logged_intents == 1
    journal.put_pending(gone, 10)  # what a power loss may leave
    journal.close()
    again = Journal(tmp_path / "journal.sqlite")
    row = again.get(gone)
    assert row is not None and row.state == PENDING_DELETE
    assert again.in_state(PENDING_UPLOAD) == []
    again.close()


def test_a_checkpoint_makes_a_forgotten_row_stay_gone(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite")
    gone, = _uuids(1)
    journal.put_pending(gone, 10)
    assert journal.delete_logged(gone, forget=True)
    assert journal.checkpoint_log()
    journal.close()
    again = Journal(tmp_path / "journal.sqlite")
    assert again.get(gone) is None
    again.close()


def test_a_checkpoint_makes_the_rows_durable_and_empties_the_log(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite")
    uuids = _uuids(3)
    for uuid in uuids:
        journal.put_pending(uuid, 10)
        journal.mark_uploaded(uuid, f"{uuid}.dcm")
        assert journal.delete_logged(uuid)
    assert journal.logged_intents == 3
    assert journal.checkpoint_log()
    assert journal.logged_intents == 0
    journal.close()
    assert pending_after_reopen(tmp_path / INTENT_LOG) == []
    again = Journal(tmp_path / "journal.sqlite")
    assert all(again.get(u).state == PENDING_DELETE for u in uuids)  # type: ignore[union-attr]
    again.close()


def test_a_read_only_journal_leaves_the_log_alone(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite")
    uuid = _uuids(1)[0]
    journal.put_pending(uuid, 10)
    journal.mark_uploaded(uuid, f"{uuid}.dcm")
    assert journal.delete_logged(uuid)
    reader = Journal(tmp_path / "journal.sqlite", readonly=True)
    assert not reader.delete_logged(_uuids(1)[0])
    assert reader.checkpoint_log() and reader.logged_intents == 0
    reader.close()
    assert journal.logged_intents == 1
    journal.close()


class _ResetFirst:
    """The log's lock, with a checkpoint's reset that wins the race for it once: it runs just
    before the next holder (an append) gets the lock."""

    def __init__(self, log: IntentLog) -> None:
        self.inner = threading.Lock()
        self.log = log
        self.armed = False

    def __enter__(self) -> None:
        if self.armed:
            self.armed = False
            assert self.log.reset_if(self.log.count)
        self.inner.acquire()

    def __exit__(self, *exc: object) -> None:
        self.inner.release()


def test_an_append_that_loses_the_race_to_a_reset_lands_in_the_new_generation(
        tmp_path: Path) -> None:
    log = IntentLog(tmp_path / "d.log")
    racing = _ResetFirst(log)
    log._lock = racing  # type: ignore[assignment]
    covered = _uuids(2)
    for uuid in covered:
        log.append_delete(uuid)
    # A checkpoint that made the first two durable resets the log while the third delete,
    # whose row change it may not have covered, is being appended.
    racing.armed = True
    late = _uuids(1)[0]
    assert log.append_delete(late)
    log.close()
    assert pending_after_reopen(tmp_path / "d.log") == [late]


def _uploaded(journal: Journal, uuids: list[str], series: str = "1.2.3") -> None:
    for uuid in uuids:
        journal.put_pending(uuid, 10)
        journal.mark_uploaded(uuid, f"{uuid}.dcm", series)
        journal.set_cached(uuid, True)


def _sql_state(path: Path, uuid: str) -> str | None:
    """The row's state as SQLite has it (a connection of its own: no kept changes)."""
    reader = Journal(path, readonly=True)
    try:
        found = reader._reader.execute("SELECT state FROM attachments WHERE uuid=?",
                                       (uuid,)).fetchone()
        return None if found is None else str(found[0])
    finally:
        reader.close()


def test_every_read_sees_a_logged_delete_before_its_row_changes(tmp_path: Path) -> None:
    """A logged delete's row change waits in memory for a batch; meanwhile no query of the
    journal that logged it shows the attachment as stored, listed, cached or evictable."""
    path = tmp_path / "journal.sqlite"
    journal = Journal(path)
    kept, gone = sorted(_uuids(2))
    gone = kept[:4] + gone[4:]  # same directory, so that listings must tell them apart
    _uploaded(journal, [kept, gone])
    assert journal.delete_logged(gone)
    assert _sql_state(path, gone) == UPLOADED  # not applied yet: that is the point
    row = journal.get(gone)
    assert row is not None and row.state == PENDING_DELETE and not row.cached
    assert journal.children(kept[:4]) == [kept]
    assert journal.has_children(kept[:4])
    assert [r.uuid for r in journal.in_state(UPLOADED)] == [kept]
    assert [r.uuid for r in journal.in_state(PENDING_DELETE)] == [gone]
    assert [r.uuid for r in journal.cached_rows()] == [kept]
    assert journal.eviction_candidates(10) == [(kept, 10)]
    journal.set_cached(kept, False)
    assert journal.series_members("1.2.3", 10) == [kept]
    # Directory empty once its last file is deleted, before any row changes.
    journal.delete_logged(kept)
    assert not journal.has_children(kept[:4]) and journal.children(kept[:4]) == []
    journal.close()


def test_logged_row_changes_reach_sqlite_in_batches_and_before_any_other_write(
        tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    journal = Journal(path)
    uuids = _uuids(APPLY_BATCH + 1)
    _uploaded(journal, uuids)
    for uuid in uuids[:APPLY_BATCH - 1]:
        assert journal.delete_logged(uuid)
    assert _sql_state(path, uuids[0]) == UPLOADED
    assert journal.delete_logged(uuids[APPLY_BATCH - 1])  # the batch is full: one commit
    assert {_sql_state(path, u) for u in uuids[:APPLY_BATCH]} == {PENDING_DELETE}
    assert journal.delete_logged(uuids[-1], forget=True)
    assert _sql_state(path, uuids[-1]) == UPLOADED
    journal.touch({uuids[0]: 1.0})  # any write commits the kept changes first
    assert _sql_state(path, uuids[-1]) is None
    journal.close()


def test_stats_in_another_process_count_logged_intents_as_pending(tmp_path: Path) -> None:
    """`objfs status` and the tests' wait for an idle daemon read the journal read-only: a
    delete logged a moment ago counts as pending there too, not as stored."""
    path = tmp_path / "journal.sqlite"
    journal = Journal(path)
    uploaded, fresh = _uuids(2)
    _uploaded(journal, [uploaded])
    journal.put_pending(fresh, 7)
    journal.set_cached(fresh, True)
    assert journal.delete_logged(uploaded)
    assert journal.delete_logged(fresh, forget=True)
    for stats in (read_stats(path), journal.stats()):
        assert (stats.pending_deletes, stats.uploaded, stats.pending_uploads,
                stats.pending_upload_bytes, stats.cached_entries) == (2, 0, 0, 0, 0)
    assert journal.checkpoint_log()
    stats = read_stats(path)
    assert (stats.pending_deletes, stats.uploaded, stats.pending_uploads) == (1, 0, 0)
    journal.close()


def _two_of_three_deleted(tmp_path: Path) -> tuple[Path, Journal]:
    """A journal of three uploaded attachments, two of whose deletes are logged only (their
    row changes kept in memory): what stats must count as 2 pending deletes and 1 uploaded."""
    path = tmp_path / "journal.sqlite"
    journal = Journal(path)
    uuids = _uuids(3)
    _uploaded(journal, uuids)
    for uuid in uuids[:2]:
        assert journal.delete_logged(uuid)
    return path, journal


def test_stats_count_a_delete_whose_rows_change_while_they_are_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon may commit a logged delete's row change and reset its log while another
    process reads the counters: the delete is still counted (once), so that a wait for an
    idle daemon does not end while the object is still in the bucket."""
    from objfs import journal as journal_module

    path, journal = _two_of_three_deleted(tmp_path)
    real = journal_module.read_intents

    def then_checkpoint(log: Path) -> list[Intent]:
        found = real(log)
        assert journal.checkpoint_log()  # the daemon, between the reader's two reads
        return found

    monkeypatch.setattr(journal_module, "read_intents", then_checkpoint)
    stats = read_stats(path)
    assert (stats.pending_deletes, stats.uploaded) == (2, 1)
    journal.close()


def test_stats_count_a_delete_whose_rows_change_between_two_counts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same checkpoint, run between the reader's count of pending deletes and its count
    of uploaded rows: every count comes from one snapshot, so the deletes are still found."""
    from objfs import journal as journal_module

    path, journal = _two_of_three_deleted(tmp_path)
    real = journal_module._Connection.execute
    checkpoints = []

    def execute(db: journal_module._Connection, sql: str, parameters: object = ()) -> object:
        cursor = real(db, sql, parameters)
        if not checkpoints and parameters == (PENDING_DELETE,) and "COUNT" in sql:
            checkpoints.append(journal.checkpoint_log())  # the daemon, in between
        return cursor

    monkeypatch.setattr(journal_module._Connection, "execute", execute)
    stats = read_stats(path)
    assert checkpoints == [True]
    assert (stats.pending_deletes, stats.uploaded) == (2, 1)
    journal.close()


def test_reading_a_missing_or_foreign_log_finds_nothing(tmp_path: Path) -> None:
    assert intentlog.read_intents(tmp_path / "none.log") == []
    (tmp_path / "short.log").write_bytes(b"x" * 100)
    assert intentlog.read_intents(tmp_path / "short.log") == []
    log = IntentLog(tmp_path / "d.log")
    uuids = _uuids(3)
    for uuid in uuids:
        log.append_delete(uuid)
    assert intentlog.read_intents(tmp_path / "d.log") == [Intent(Kind.DELETE, u) for u in uuids]
    log.close()


def test_a_journal_that_cannot_apply_its_kept_deletes_still_closes_and_replays_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "journal.sqlite"
    journal = Journal(path)
    gone, = _uuids(1)
    _uploaded(journal, [gone])
    assert journal.delete_logged(gone)

    def disk_full() -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(journal, "_apply_locked", disk_full)
    journal.close()
    assert "1 changes only in its intent log" in caplog.text
    assert _sql_state(path, gone) == UPLOADED
    again = Journal(path)
    assert again.get(gone).state == PENDING_DELETE  # type: ignore[union-attr]
    again.close()


def test_puts_and_deletes_are_found_again_in_order_with_their_kind_and_size(
        tmp_path: Path) -> None:
    log = IntentLog(tmp_path / "i.log")
    first, second = _uuids(2)
    assert log.append_put(first, 1234) and log.append_put(second, 5)
    assert log.append_delete(first)
    log.close()
    again = IntentLog(tmp_path / "i.log")
    assert again.pending() == [Intent(Kind.PUT, first, 1234), Intent(Kind.PUT, second, 5),
                               Intent(Kind.DELETE, first, 0)]
    again.close()


def _logged_put(path: Path, size: int = 10) -> tuple[Journal, str]:
    """A journal at `path` with one put logged and kept (no row in SQLite yet)."""
    journal = Journal(path)
    uuid, = _uuids(1)
    assert journal.get(uuid) is None
    assert journal.put_logged(uuid, size)
    assert _sql_state(path, uuid) is None  # kept in memory: that is the point
    return journal, uuid


def test_every_read_sees_a_logged_put_before_its_row_is_committed(tmp_path: Path) -> None:
    """A new attachment acknowledged through the intent log is stored, listed, pending
    upload and cached for every query of the journal that logged it, and its directory is
    not empty, before SQLite has its row."""
    path = tmp_path / "journal.sqlite"
    journal, uuid = _logged_put(path)
    row = journal.get(uuid)
    assert row is not None and row.state == PENDING_UPLOAD and row.size == 10 and row.cached
    assert journal.children(uuid[:4]) == [uuid]
    assert journal.has_children(uuid[:4]) and journal.has_children(uuid[:2])
    assert [r.uuid for r in journal.in_state(PENDING_UPLOAD)] == [uuid]
    assert [r.uuid for r in journal.cached_rows()] == [uuid]
    assert journal.eviction_candidates(10) == []  # not uploaded: never evicted
    assert journal.logged_intents == 1
    journal.touch({uuid: 1.0})  # any write commits the kept rows first
    assert _sql_state(path, uuid) == PENDING_UPLOAD
    journal.mark_uploaded(uuid, f"{uuid}.dcm")
    assert journal.get(uuid).state == UPLOADED  # type: ignore[union-attr]
    journal.close()


def test_a_logged_put_whose_row_was_lost_is_replayed_while_its_copy_is_there(
        tmp_path: Path) -> None:
    """A power loss that loses the lazy commit of a logged put: the replay makes the row
    again (a pending upload), from the intent, when its local copy is there, and not when
    the copy is gone (the attachment was deleted, and its row dropped, since)."""
    copies = tmp_path / "data"
    copies.mkdir()
    path = tmp_path / "journal.sqlite"
    journal = Journal(path, copies=copies)
    kept, gone = _uuids(2)
    (copies / kept).write_bytes(b"x" * 10)
    for uuid in (kept, gone):
        assert journal.put_logged(uuid, 10)
    # No commit: closing applies the kept rows lazily; a power loss may undo that.
    journal._unapplied.clear()
    journal.close()
    assert _sql_state(path, kept) is None
    again = Journal(path, copies=copies)
    row = again.get(kept)
    assert row is not None and row.state == PENDING_UPLOAD and row.size == 10
    assert again.get(gone) is None
    assert again.logged_intents == 0  # replayed durably, then emptied
    again.close()
    assert pending_after_reopen(tmp_path / INTENT_LOG) == []


def test_a_logged_put_whose_copy_is_gone_and_its_logged_delete_replay_as_a_pending_delete(
        tmp_path: Path) -> None:
    """Both row changes lost in a crash: the put's copy is gone (the delete took it), so no
    pending upload comes back; the delete after it leaves a pending delete, since the
    attachment may have reached the bucket in between (an object delete that is needless
    when it had not). A put whose copy is gone with no delete after it leaves nothing."""
    copies = tmp_path / "data"
    copies.mkdir()
    path = tmp_path / "journal.sqlite"
    journal = Journal(path, copies=copies)
    deleted, discarded = _uuids(2)
    assert journal.put_logged(deleted, 10) and journal.put_logged(discarded, 20)
    assert journal.delete_logged(deleted)
    journal._unapplied.clear()  # lost in the crash
    journal.close()
    again = Journal(path, copies=copies)
    row = again.get(deleted)
    assert row is not None and (row.state, row.size, row.cached) == (PENDING_DELETE, 10, False)
    assert again.get(discarded) is None
    again.close()
    assert _sql_state(path, deleted) == PENDING_DELETE


def test_a_replayed_put_keeps_a_row_that_was_committed_and_changed_since(
        tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    journal, uuid = _logged_put(path)
    journal.apply_kept()
    journal.mark_uploaded(uuid, f"{uuid}.dcm")
    journal.barrier()
    journal.close()  # the log still holds the put: no checkpoint ran
    again = Journal(path)
    row = again.get(uuid)
    assert row is not None and row.state == UPLOADED and row.key == f"{uuid}.dcm"
    again.close()


def test_a_put_and_its_delete_both_kept_reach_sqlite_as_a_pending_delete(
        tmp_path: Path) -> None:
    """Orthanc may delete an attachment before its logged put was applied: the delete's
    kept row must bring the put's row along, and a replay of both ends in a delete too."""
    path = tmp_path / "journal.sqlite"
    journal, uuid = _logged_put(path)
    assert journal.delete_logged(uuid)
    journal.apply_kept()
    assert _sql_state(path, uuid) == PENDING_DELETE
    assert [r.uuid for r in journal.in_state(PENDING_DELETE)] == [uuid]
    assert journal.in_state(PENDING_UPLOAD) == []
    journal._write("DELETE FROM attachments WHERE uuid=?", (uuid,))  # a lost lazy commit
    journal.close()
    again = Journal(path)
    row = again.get(uuid)
    assert row is not None and row.state == PENDING_DELETE
    again.close()


def test_stats_and_reads_in_another_process_see_logged_puts(tmp_path: Path) -> None:
    """`objfs status` counts a put logged a moment ago as a pending upload, and `objfs audit`
    (a read-only journal) finds its row: neither sees an attachment missing."""
    path = tmp_path / "journal.sqlite"
    journal, uuid = _logged_put(path, size=7)
    stats = read_stats(path)
    assert (stats.pending_uploads, stats.pending_upload_bytes, stats.cached_entries,
            stats.cached_bytes) == (1, 7, 1, 7)
    reader = Journal(path, readonly=True)
    row = reader.get(uuid)
    assert row is not None and row.state == PENDING_UPLOAD
    reader.close()
    assert journal.delete_logged(uuid, forget=True)
    # What the replay makes of a put and its delete, until a checkpoint empties the log: a
    # pending delete (one needless request to the bucket), neither an upload nor a copy.
    stats = read_stats(path)
    assert (stats.pending_uploads, stats.pending_deletes, stats.cached_entries) == (0, 1, 0)
    assert journal.checkpoint_log()
    stats = read_stats(path)
    assert (stats.pending_uploads, stats.pending_deletes, stats.cached_entries) == (0, 0, 0)
    journal.close()


def test_an_earlier_objfs_delete_log_is_replayed_once_and_removed(tmp_path: Path) -> None:
    """The delete log of objfs before the intent log (``deletes.log``: magic OBJFSDL1,
    records of generation and uuid) still holds acknowledged deletes after an upgrade."""
    import struct
    import zlib

    path = tmp_path / "journal.sqlite"
    journal = Journal(path)
    gone, kept = _uuids(2)
    _uploaded(journal, [gone, kept])
    journal.close()

    def slot(body: bytes) -> bytes:
        return (body + struct.pack("<I", zlib.crc32(body))).ljust(SLOT, b"\0")

    legacy = bytearray(SLOT * intentlog.SLOTS)
    legacy[:SLOT] = slot(struct.pack("<8sQ", b"OBJFSDL1", 3))
    legacy[SLOT:2 * SLOT] = slot(struct.pack("<Q40s", 3, gone.encode()))
    legacy[2 * SLOT:3 * SLOT] = slot(struct.pack("<Q40s", 2, kept.encode()))  # stale
    (tmp_path / LEGACY_DELETE_LOG).write_bytes(bytes(legacy))
    assert intentlog.legacy_deletes(tmp_path / LEGACY_DELETE_LOG) == [gone]
    again = Journal(path)
    assert again.get(gone).state == PENDING_DELETE  # type: ignore[union-attr]
    assert again.get(kept).state == UPLOADED  # type: ignore[union-attr]
    assert not (tmp_path / LEGACY_DELETE_LOG).exists()
    again.close()


def test_a_damaged_intent_log_is_reported_to_the_journal(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Puts only a damaged log held leave copies no row claims: the journal says so
    (`lost_intents`), and start-up recovery keeps such copies in lost+found."""
    path = tmp_path / "journal.sqlite"
    journal, _ = _logged_put(path)
    journal._unapplied.clear()
    journal.close()
    with open(tmp_path / INTENT_LOG, "r+b") as f:
        f.write(b"garbage!")
    again = Journal(path)
    assert again.lost_intents
    assert "lost+found" in caplog.text
    again.close()
    third = Journal(path)
    assert not third.lost_intents  # a fresh log since
    third.close()


def test_a_damaged_delete_log_of_an_earlier_objfs_is_kept_aside(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "journal.sqlite"
    Journal(path).close()
    (tmp_path / LEGACY_DELETE_LOG).write_bytes(b"garbage!" * 100)
    journal = Journal(path)
    assert not (tmp_path / LEGACY_DELETE_LOG).exists()
    assert (tmp_path / (LEGACY_DELETE_LOG + ".damaged")).read_bytes() == b"garbage!" * 100
    assert "is not of its format" in caplog.text and "objfs audit" in caplog.text
    journal.close()


def test_a_reset_after_a_barrier_holds_appends_until_it_is_done(tmp_path: Path) -> None:
    """`reset_after` empties the log even while appends keep coming: one that arrives while
    the barrier runs waits, and lands in the new generation."""
    log = IntentLog(tmp_path / "d.log")
    covered, late = _uuids(2)
    log.append_put(covered, 10)
    appended = threading.Event()
    appender = threading.Thread(target=lambda: (log.append_delete(late), appended.set()))

    def barrier() -> None:
        appender.start()
        assert not appended.wait(0.2)  # held by the reset

    log.reset_after(barrier)
    appender.join(10)
    assert appended.is_set()
    log.close()
    assert pending_after_reopen(tmp_path / "d.log") == [late]


def test_a_reset_whose_barrier_fails_leaves_the_log_as_it_was(tmp_path: Path) -> None:
    log = IntentLog(tmp_path / "d.log")
    uuid = _uuids(1)[0]
    log.append_delete(uuid)

    def failing() -> None:
        raise sqlite3.OperationalError("disk I/O error")

    with pytest.raises(sqlite3.OperationalError):
        log.reset_after(failing)
    log.close()
    assert pending_after_reopen(tmp_path / "d.log") == [uuid]


@pytest.mark.parametrize("applied", [False, True], ids=["kept", "committed"])
def test_a_name_written_again_after_its_delete_settles_the_journal_first(
        tmp_path: Path, applied: bool) -> None:
    """A put, its delete (the row dropped: never uploaded), and a put of the same name
    again, all before a checkpoint. Settling first (`settle_before_rewrite`, which the store
    calls before a new write of a name deleted since the last checkpoint) empties the log
    and commits the drop: the new row has the new size, in memory and in SQLite, and a crash
    replays the new put alone."""
    copies = tmp_path / "data"
    copies.mkdir()
    path = tmp_path / "journal.sqlite"
    journal = Journal(path, copies=copies)
    uuid = _uuids(1)[0]
    assert journal.put_logged(uuid, 10)
    if applied:
        journal.apply_kept()  # the first put's row committed, as a batch would
    assert journal.delete_logged(uuid, forget=True)
    assert journal.get(uuid) is None and journal.unsettled(uuid)
    journal.settle_before_rewrite(uuid)
    assert not journal.unsettled(uuid) and journal.logged_intents == 0
    (copies / uuid).write_bytes(b"n" * 20)
    assert journal.put_logged(uuid, 20)
    journal.apply_kept()
    row = journal.get(uuid)
    assert row is not None and (row.state, row.size) == (PENDING_UPLOAD, 20)
    journal._rows.clear()
    row = journal.get(uuid)  # from SQLite
    assert row is not None and row.size == 20
    abandon(journal)  # the process dies
    again = Journal(path, copies=copies)
    row = again.get(uuid)
    assert row is not None and (row.state, row.size) == (PENDING_UPLOAD, 20)
    again.close()


def test_names_deleted_since_the_last_checkpoint_are_unsettled_until_the_next(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every way a row is marked deleted or dropped counts; a checkpoint settles them, even
    with nothing in the log (a lazy drop made durable by its barrier); past GONE_LIMIT every
    name is unsettled until one."""
    journal = Journal(tmp_path / "journal.sqlite")
    logged, marked, removed, forgotten, other = _uuids(5)
    for uuid in (logged, marked, removed, forgotten):
        journal.put_pending(uuid, 10)
    assert journal.checkpoint_log()
    assert journal.delete_logged(logged)
    journal.mark_pending_delete(marked)
    journal.remove(removed)
    journal.forget_deleted([forgotten])
    assert [journal.unsettled(u) for u in (logged, marked, removed, forgotten, other)] == \
        [True, True, True, True, False]
    assert journal.checkpoint_log()
    assert not any(journal.unsettled(u) for u in (logged, marked, removed, forgotten))
    journal.forget_deleted([logged])  # no intent: the log stays empty
    assert journal.logged_intents == 0 and journal.unsettled(logged)
    assert journal.checkpoint_log() and not journal.unsettled(logged)
    monkeypatch.setattr(journal_module, "GONE_LIMIT", 2)
    journal.forget_deleted(_uuids(3))
    assert journal.unsettled(other)
    journal.settle_before_rewrite(other)
    assert not journal.unsettled(other)
    journal.close()
