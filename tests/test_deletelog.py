"""The delete log (objfs.deletelog) on its own, and as the journal uses it: what a reopen
finds after appends, resets, torn writes and a damaged header."""

from __future__ import annotations

import os
import sqlite3
import threading
import uuid as uuid_mod
from pathlib import Path

import pytest

from objfs import deletelog
from objfs.deletelog import SLOT, DeleteLog
from objfs.journal import (
    APPLY_BATCH,
    DELETE_LOG,
    PENDING_DELETE,
    PENDING_UPLOAD,
    UPLOADED,
    Journal,
    read_stats,
)


def _uuids(n: int) -> list[str]:
    return [str(uuid_mod.uuid4()) for _ in range(n)]


def pending_after_reopen(path: Path) -> list[str]:
    """What a fresh open of the log at `path` finds in it (as a restart would)."""
    again = DeleteLog(path)
    try:
        return again.pending()
    finally:
        again.close()


def test_logged_uuids_are_found_again_in_order(tmp_path: Path) -> None:
    log = DeleteLog(tmp_path / "d.log")
    uuids = _uuids(5)
    for uuid in uuids:
        assert log.append(uuid)
    log.close()
    again = DeleteLog(tmp_path / "d.log")
    assert again.pending() == uuids
    assert again.count == 5
    again.close()


def test_a_reset_empties_the_log_only_when_nothing_was_appended_since(tmp_path: Path) -> None:
    log = DeleteLog(tmp_path / "d.log")
    first = _uuids(3)
    for uuid in first:
        log.append(uuid)
    later = _uuids(1)[0]
    log.append(later)
    assert not log.reset_if(3)  # the fourth was not covered: it must stay
    assert log.pending() == [*first, later]
    assert log.reset_if(4)
    # Records of the old generation are still on disk in slots 2-4: they must not count.
    newer = _uuids(1)[0]
    log.append(newer)
    log.close()
    assert pending_after_reopen(tmp_path / "d.log") == [newer]


def three_logged_one_spoilt(path: Path, record: int) -> list[str]:
    """A log at `path` holding three uuids (returned), then bytes inside its `record`th
    record (1 to 3) overwritten."""
    log = DeleteLog(path)
    uuids = _uuids(3)
    for uuid in uuids:
        log.append(uuid)
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
    again = DeleteLog(tmp_path / "d.log")
    assert again.pending() == [uuids[0], uuids[2]]
    assert again.count == 3  # the next append goes after the damaged slot's successor
    assert "1 of its records do not verify; the 2 that do are replayed" in caplog.text
    assert (tmp_path / "d.log.damaged").read_bytes() == before
    assert again.append(uuids[1])
    assert again.pending() == [uuids[0], uuids[2], uuids[1]]
    assert again.reset_if(4) and again.pending() == []
    again.close()


def test_a_damaged_header_gives_a_fresh_log(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    log = DeleteLog(tmp_path / "d.log")
    log.append(_uuids(1)[0])
    log.close()
    with open(tmp_path / "d.log", "r+b") as f:
        f.write(b"garbage!")
    before = (tmp_path / "d.log").read_bytes()
    again = DeleteLog(tmp_path / "d.log")
    assert again.pending() == []
    assert os.path.getsize(tmp_path / "d.log") == deletelog.SLOTS * SLOT
    assert again.append(_uuids(1)[0])
    again.close()
    assert "its header does not verify" in caplog.text and "objfs audit" in caplog.text
    assert (tmp_path / "d.log.damaged").read_bytes() == before


def test_a_full_log_refuses_appends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deletelog, "SLOTS", 4)
    log = DeleteLog(tmp_path / "d.log")
    uuids = _uuids(4)
    assert [log.append(u) for u in uuids] == [True, True, True, False]
    assert log.full and log.pending() == uuids[:3]
    assert log.reset_if(3) and not log.full
    log.close()


def test_names_that_are_not_uuids_are_refused(tmp_path: Path) -> None:
    log = DeleteLog(tmp_path / "d.log")
    with pytest.raises(ValueError):
        log.append("x" * 41)
    with pytest.raises(ValueError):
        log.append("é" * 10)
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
    assert journal.logged_deletes == 1
    # What a power loss may leave: the lazy row change lost, the log record durable.
    journal._write("UPDATE attachments SET state=?, cached=1 WHERE uuid=?", (UPLOADED, gone))
    journal.close()
    again = Journal(tmp_path / "journal.sqlite")
    row = again.get(gone)
    assert row is not None and row.state == PENDING_DELETE and not row.cached
    assert again.get(kept).state == UPLOADED  # type: ignore[union-attr]
    assert again.logged_deletes == 0  # replayed durably, then emptied
    again.close()
    assert pending_after_reopen(tmp_path / DELETE_LOG) == []


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
    assert journal.logged_deletes == 1
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
    assert journal.checkpoint_deletes()
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
    assert journal.logged_deletes == 3
    assert journal.checkpoint_deletes()
    assert journal.logged_deletes == 0
    journal.close()
    assert pending_after_reopen(tmp_path / DELETE_LOG) == []
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
    assert reader.checkpoint_deletes() and reader.logged_deletes == 0
    reader.close()
    assert journal.logged_deletes == 1
    journal.close()


class _ResetFirst:
    """The log's lock, with a checkpoint's reset that wins the race for it once: it runs just
    before the next holder (an append) gets the lock."""

    def __init__(self, log: DeleteLog) -> None:
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
    log = DeleteLog(tmp_path / "d.log")
    racing = _ResetFirst(log)
    log._lock = racing  # type: ignore[assignment]
    covered = _uuids(2)
    for uuid in covered:
        log.append(uuid)
    # A checkpoint that made the first two durable resets the log while the third delete,
    # whose row change it may not have covered, is being appended.
    racing.armed = True
    late = _uuids(1)[0]
    assert log.append(late)
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


def test_stats_in_another_process_count_logged_deletes_as_pending(tmp_path: Path) -> None:
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
    assert journal.checkpoint_deletes()
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
    real = journal_module.read_logged

    def then_checkpoint(log: Path) -> list[str]:
        found = real(log)
        assert journal.checkpoint_deletes()  # the daemon, between the reader's two reads
        return found

    monkeypatch.setattr(journal_module, "read_logged", then_checkpoint)
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
            checkpoints.append(journal.checkpoint_deletes())  # the daemon, in between
        return cursor

    monkeypatch.setattr(journal_module._Connection, "execute", execute)
    stats = read_stats(path)
    assert checkpoints == [True]
    assert (stats.pending_deletes, stats.uploaded) == (2, 1)
    journal.close()


def test_reading_a_missing_or_foreign_log_finds_nothing(tmp_path: Path) -> None:
    assert deletelog.read_logged(tmp_path / "none.log") == []
    (tmp_path / "short.log").write_bytes(b"x" * 100)
    assert deletelog.read_logged(tmp_path / "short.log") == []
    log = DeleteLog(tmp_path / "d.log")
    uuids = _uuids(3)
    for uuid in uuids:
        log.append(uuid)
    assert deletelog.read_logged(tmp_path / "d.log") == uuids
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
    assert "1 deletes only in its delete log" in caplog.text
    assert _sql_state(path, gone) == UPLOADED
    again = Journal(path)
    assert again.get(gone).state == PENDING_DELETE  # type: ignore[union-attr]
    again.close()
