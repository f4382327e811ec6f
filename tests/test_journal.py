"""The journal's schema and state transitions."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import objfs.journal as journal_module
from objfs.errors import JournalDamaged
from objfs.journal import PENDING_DELETE, PENDING_UPLOAD, UPLOADED, Journal, Row


def test_journal_of_an_earlier_version_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE attachments (uuid TEXT PRIMARY KEY, state TEXT NOT NULL,
            size INTEGER NOT NULL, key TEXT, cached INTEGER NOT NULL DEFAULT 0,
            created REAL NOT NULL, atime REAL NOT NULL DEFAULT 0, last_error TEXT)
            WITHOUT ROWID;
        INSERT INTO attachments(uuid, state, size, key, cached, created)
            VALUES ('u1', 'pending-upload', 5, NULL, 1, 1.0);
    """)
    old.commit()
    old.close()
    journal = Journal(path)
    row = journal.get("u1")
    assert row is not None and row.state == PENDING_UPLOAD and not row.sealed
    assert [r.uuid for r in journal.in_state(PENDING_UPLOAD)] == ["u1"]
    journal.close()


def test_state_transitions_and_stats(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite")
    journal.put_pending("a", 10)
    journal.put_pending("b", 20, key="b.dcm.enc", sealed=True)
    stats = journal.stats()
    assert (stats.pending_uploads, stats.pending_upload_bytes, stats.cached_bytes) == (2, 30, 30)
    journal.mark_uploaded("a", "a.dcm")
    journal.mark_pending_delete("b")
    a, b = journal.get("a"), journal.get("b")
    assert a is not None and (a.state, a.key) == (UPLOADED, "a.dcm")
    assert b is not None and (b.state, b.cached, b.sealed) == (PENDING_DELETE, False, True)
    assert journal.children("a") == ["a"] and journal.children("b") == []
    journal.add_remote([("a", "other", 1), ("c", "c.dcm", 7)])  # known rows are kept
    a = journal.get("a")
    assert a is not None and a.key == "a.dcm"
    assert journal.eviction_candidates(10) == [("a", 10)]
    readonly = Journal(tmp_path / "j.sqlite", readonly=True)
    assert readonly.stats().uploaded == 2
    readonly.close()
    journal.close()


def test_series_members_are_uploaded_uncached_in_stored_order(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite")
    for name in ("a", "b", "c"):
        journal.put_pending(name, 1)
        journal.mark_uploaded(name, f"{name}.dcm", "S")
    for name in ("d", "e"):
        journal.put_pending(name, 1)
        journal.mark_uploaded(name, f"{name}.dcm")
    journal.put_pending("pending", 1)  # not in the bucket yet: nothing to fetch
    journal.note_series([("d", "S"), ("pending", "S"), ("e", "T")])
    journal.set_cached("a", False)
    journal.set_cached("b", False)
    journal.set_cached("d", False)
    journal.set_cached("e", False)
    assert journal.series_of("c") == "S" and journal.series_of("x") is None
    assert journal.series_members("S", 10) == ["a", "b", "d"]  # c is cached
    assert journal.series_members("S", 2) == ["a", "b"]
    journal.remove("b")
    journal.mark_pending_delete("d")
    journal.forget_deleted(["d"])
    assert journal.series_members("S", 10) == ["a"]
    assert journal.series_of("b") is None and journal.series_of("d") is None
    journal.close()


class Fetched:
    """A query's result, read before a concurrent write committed."""

    def __init__(self, rows: list[Any]) -> None:
        self.rows = rows

    def fetchone(self) -> Any:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[Any]:
        return self.rows


class CountingReader:
    """Wraps the journal's read connection, counting queries; `meanwhile` runs after a query
    has read its result (a writer that commits while a read is under way)."""

    def __init__(self, real: sqlite3.Connection) -> None:
        self.real = real
        self.queries = 0
        self.meanwhile: Callable[[], None] | None = None

    def execute(self, sql: str, args: tuple[object, ...] = ()) -> sqlite3.Cursor | Fetched:
        self.queries += 1
        cursor = self.real.execute(sql, args)
        if self.meanwhile is None:
            return cursor
        result = Fetched(cursor.fetchall())
        self.meanwhile()
        self.meanwhile = None
        return result

    def close(self) -> None:
        self.real.close()


def counting(journal: Journal) -> CountingReader:
    reader = CountingReader(journal._reader)
    journal._reader = reader  # type: ignore[assignment]
    return reader


def test_a_write_that_must_not_wait_gives_way_to_another_writer(tmp_path: Path) -> None:
    """The event loop's durable record of a write (`wait=False`) records nothing and says so
    while another thread holds the journal, and records as usual once it is free."""
    journal = Journal(tmp_path / "j.sqlite")
    holding, answered = threading.Event(), threading.Event()

    def writer() -> None:  # another thread in the middle of a write, for at most 5 s
        with journal._lock:
            holding.set()
            answered.wait(5)

    other = threading.Thread(target=writer)
    other.start()
    assert holding.wait(5)
    try:
        # A call that waited would get the journal once the writer gives up, and record.
        assert journal.put_pending("b", 5, wait=False) is False
    finally:
        answered.set()
        other.join()
    assert journal.get("b") is None
    assert journal.put_pending("b", 5, wait=False) is True
    row = journal.get("b")
    assert row is not None and row.state == PENDING_UPLOAD and row.size == 5
    journal.close()


def test_rows_are_kept_until_a_write_changes_them(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite")
    reader = counting(journal)
    assert journal.get("a") is None
    assert journal.get("a") is None  # an absent row is kept too
    assert reader.queries == 1
    # Every write that changes a row makes the next `get` see the change.
    changes: list[tuple[Callable[[], None], Callable[[Row | None], bool]]] = [
        (lambda: journal.put_pending("a", 10),
         lambda r: r is not None and r.state == PENDING_UPLOAD and r.size == 10),
        (lambda: journal.set_key("a", "a.dcm"), lambda r: r is not None and r.key == "a.dcm"),
        (lambda: journal.set_error("a", "503"), lambda r: r is not None and r.last_error == "503"),
        (lambda: journal.mark_uploaded("a", "a2.dcm", "1.2.3"),
         lambda r: r is not None and (r.state, r.key, r.last_error) == (UPLOADED, "a2.dcm", None)),
        (lambda: journal.set_cached("a", False), lambda r: r is not None and not r.cached),
        (lambda: journal.set_cached("a", True, sealed=True),
         lambda r: r is not None and r.cached and r.sealed),
        (lambda: journal.uncache(["a"]), lambda r: r is not None and not r.cached),
        (lambda: journal.mark_pending_delete("a"),
         lambda r: r is not None and r.state == PENDING_DELETE),
        (lambda: journal.forget_deleted(["a"]), lambda r: r is None),
        (lambda: journal.add_remote([("a", "a.dcm", 7)]),
         lambda r: r is not None and (r.state, r.size) == (UPLOADED, 7)),
        (lambda: journal.put_uploaded("a", "a3.dcm", 8),
         lambda r: r is not None and (r.key, r.size) == ("a3.dcm", 8)),
        (lambda: journal.forget_all_clean(), lambda r: r is None),
        (lambda: journal.put_written_through("a", "a4.dcm", 9, durable=True),
         lambda r: r is not None and (r.state, r.cached, r.size) == (UPLOADED, True, 9)),
        (lambda: journal.remove("a"), lambda r: r is None),
    ]
    for change, expected in changes:
        journal.get("a")  # kept, present or absent
        change()
        assert expected(journal.get("a")), change
    # Writes that change no row leave the kept ones in place.
    journal.put_pending("b", 1)
    journal.get("b")
    before = reader.queries
    journal.touch({"b": 5.0})
    journal.note_series([("b", "1.2")])
    journal.set_meta("x", "y")
    journal.barrier()
    assert journal.get("b") is not None and reader.queries == before
    journal.close()


def test_a_read_that_raced_a_write_does_not_keep_what_it_read(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite")
    journal.put_pending("a", 10)
    reader = counting(journal)
    reader.meanwhile = lambda: journal.mark_pending_delete("a")
    row = journal.get("a")  # read before the write committed: the old state
    assert row is not None and row.state == PENDING_UPLOAD
    row = journal.get("a")  # not kept: read again
    assert row is not None and row.state == PENDING_DELETE
    assert reader.queries == 2
    journal.close()


def test_the_kept_rows_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal_module, "ROW_CACHE", 4)
    journal = Journal(tmp_path / "j.sqlite")
    for i in range(10):
        journal.get(f"u{i}")
        assert len(journal._rows) <= 4
    journal.close()


def test_damage_found_while_running_is_noted_once_and_checked_at_the_next_open(
        tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    journal = Journal(path)
    for i in range(400):
        journal.put_uploaded(f"u{i:04}", f"u{i:04}.dcm", 100)
    journal.close()
    sound = path.read_bytes()
    journal = Journal(path)
    with open(path, "r+b") as damaged:  # every b-tree page but the first: a bad page type
        for offset in range(4096, len(sound), 4096):
            damaged.seek(offset)
            damaged.write(b"\x77")
    for attempt in range(2):
        with pytest.raises(JournalDamaged) as found:
            journal.get(f"u{attempt:04}")
        assert "is damaged (database disk image is malformed)" in str(found.value)
    assert journal.damage is not None and "Stop objfs, move it aside" in journal.damage
    mark = tmp_path / journal_module.DAMAGE_MARK
    assert "objfs does not start on it" in mark.read_text()
    with pytest.raises(JournalDamaged):  # `objfs status`, another process, reads the mark
        journal_module.read_stats(path)
    journal.close()

    with pytest.raises(JournalDamaged) as refused:  # the next start checks the whole file
        Journal(path)
    assert "objfs does not start on it" in str(refused.value) and mark.exists()
    path.write_bytes(sound)  # put back in order
    journal = Journal(path)
    assert journal.get("u0001") is not None and journal.damage is None
    assert not mark.exists()
    journal.close()
    mark.write_text("found damaged\n")
    for name in ("journal.sqlite", "journal.sqlite-wal", "journal.sqlite-shm"):
        (tmp_path / name).unlink(missing_ok=True)  # moved aside: the mark is old news
    with pytest.raises(sqlite3.OperationalError):  # no journal (`objfs status` says so)
        journal_module.read_stats(path)
    Journal(path).close()  # a new journal is built
    assert not mark.exists()


def uploaded_uncached(journal: Journal, *names: str) -> None:
    for name in names:
        journal.put_pending(name, 10)
        journal.mark_uploaded(name, f"{name}.dcm", "S")
        journal.set_cached(name, False)


def sql_cached(path: Path, uuid: str) -> tuple[int, int] | None:
    """(cached, sealed) as SQLite has them, read by another connection (another process)."""
    db = sqlite3.connect(path)
    try:
        found = db.execute("SELECT cached, sealed FROM attachments WHERE uuid=?",
                           (uuid,)).fetchone()
        return None if found is None else (int(found[0]), int(found[1]))
    finally:
        db.close()


def test_a_kept_cache_flag_is_seen_at_once_and_committed_with_the_next_write(
        tmp_path: Path) -> None:
    """`cached_later` keeps a download's flag in memory: every read of the journal sees it at
    once (the row, the cached rows, the eviction order, a series' uncached members), SQLite
    only after `apply_kept` or any other write, which commits it first."""
    path = tmp_path / "j.sqlite"
    journal = Journal(path)
    uploaded_uncached(journal, "a", "b", "c")
    journal.set_cached("c", True)
    assert journal.cached_later("a", sealed=True)
    assert journal.kept_flags == 1
    a = journal.get("a")
    assert a is not None and (a.state, a.cached, a.sealed) == (UPLOADED, True, True)
    assert sql_cached(path, "a") == (0, 0)
    assert sorted(row.uuid for row in journal.cached_rows()) == ["a", "c"]
    assert [uuid for uuid, _ in journal.eviction_candidates(10)] == ["c", "a"]  # a: newest
    assert journal.eviction_candidates(1) == [("c", 10)]
    assert journal.series_members("S", 10) == ["b"]
    assert {row.uuid: row.cached for row in journal.in_state(UPLOADED)} == \
        {"a": True, "b": False, "c": True}
    assert journal.stats().cached_entries == 1  # SQL's count: behind until applied
    journal.set_error("b", "x")  # any write commits the kept flags before its own change
    assert journal.kept_flags == 0 and sql_cached(path, "a") == (1, 1)
    assert journal.stats().cached_entries == 2
    assert journal.cached_later("b")
    journal.apply_kept()
    assert journal.kept_flags == 0 and sql_cached(path, "b") == (1, 0)
    b = journal.get("b")
    assert b is not None and b.cached
    journal.close()


def test_a_cache_flag_is_kept_only_for_an_uploaded_row(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite")
    journal.put_pending("p", 10)
    uploaded_uncached(journal, "d")
    journal.mark_pending_delete("d")
    assert not journal.cached_later("p")
    assert not journal.cached_later("d")
    assert not journal.cached_later("missing")
    assert journal.kept_flags == 0
    journal.close()
    readonly = Journal(tmp_path / "j.sqlite", readonly=True)
    assert not readonly.cached_later("p")
    readonly.close()


def test_a_delete_after_a_kept_cache_flag_wins(tmp_path: Path) -> None:
    """A delete, logged or committed, after a kept flag leaves the row deleted and uncached:
    never an attachment that looks alive again."""
    path = tmp_path / "j.sqlite"
    journal = Journal(path)
    uploaded_uncached(journal, "logged", "committed")
    assert journal.cached_later("logged") and journal.cached_later("committed")
    assert journal.delete_logged("logged")
    journal.mark_pending_delete("committed")
    for name in ("logged", "committed"):
        row = journal.get(name)
        assert row is not None and (row.state, row.cached) == (PENDING_DELETE, False)
        assert name not in {r.uuid for r in journal.cached_rows()}
    journal.apply_kept()
    assert sql_cached(path, "logged") == (0, 0) and sql_cached(path, "committed") == (0, 0)
    assert journal.eviction_candidates(10) == []
    journal.close()


def test_a_flag_kept_while_another_thread_commits_that_row_does_not_override_it(
        tmp_path: Path) -> None:
    """A write in a worker thread that names a row drops a flag kept for it meanwhile: the
    write decided what the row is (here: deleted), and the flag must not make it look
    uploaded and cached again."""
    journal = Journal(tmp_path / "j.sqlite")
    uploaded_uncached(journal, "x")
    journal.get("x")  # kept, as the event loop keeps rows
    commit = journal._db.execute
    flagged = []

    def flag_meanwhile(sql: str, *args: Any) -> Any:
        result = commit(sql, *args)
        if sql.startswith("UPDATE attachments SET state"):
            # The loop, reading the row it kept, flags it while the delete commits.
            flagged.append(journal.cached_later("x"))
        return result

    journal._db.execute = flag_meanwhile  # type: ignore[method-assign]
    journal.mark_pending_delete("x")  # a durable commit, through `_db`
    assert flagged == [True]
    row = journal.get("x")
    assert row is not None and (row.state, row.cached) == (PENDING_DELETE, False)
    assert journal.kept_flags == 0
    journal.close()


def test_kept_cache_flags_reach_sqlite_at_close(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    journal = Journal(path)
    uploaded_uncached(journal, "a")
    assert journal.cached_later("a")
    journal.close()
    assert sql_cached(path, "a") == (1, 0)


def sql_row(path: Path, uuid: str) -> tuple[str, str | None, str | None] | None:
    """(state, key, series) as SQLite has them, read by another connection."""
    db = sqlite3.connect(path)
    try:
        found = db.execute("SELECT a.state, a.key, m.series FROM attachments a LEFT JOIN "
                           "series_members m ON m.uuid = a.uuid WHERE a.uuid=?",
                           (uuid,)).fetchone()
        return None if found is None else (str(found[0]), found[1], found[2])
    finally:
        db.close()


def test_a_kept_upload_end_is_seen_at_once_and_committed_with_the_next_write(
        tmp_path: Path) -> None:
    """`uploaded_later` keeps an upload's end in memory: `get`, the state and cached-row
    queries, the eviction order (as the newest copy) and the series see it at once; SQLite
    and the counts (another process's view) once it is applied, by `apply_kept` or by any
    other write, which commits it first."""
    path = tmp_path / "j.sqlite"
    journal = Journal(path)
    uploaded_uncached(journal, "old")
    journal.set_cached("old", True)
    journal.put_pending("a", 10)
    journal.put_pending("b", 20)
    journal.set_error("a", "timed out")
    assert journal.uploaded_later("a", "a.dcm", "S")
    assert journal.kept_uploads == 1
    a = journal.get("a")
    assert a is not None and (a.state, a.key, a.cached, a.last_error) == \
        (UPLOADED, "a.dcm", True, None)
    assert sql_row(path, "a") == (PENDING_UPLOAD, None, None)
    assert [row.uuid for row in journal.in_state(PENDING_UPLOAD)] == ["b"]
    assert sorted(row.uuid for row in journal.in_state(UPLOADED)) == ["a", "old"]
    assert sorted(row.uuid for row in journal.cached_rows()) == ["a", "b", "old"]
    assert journal.eviction_candidates(10) == [("old", 10), ("a", 10)]
    assert journal.series_of("a") == "S"
    assert journal.stats().pending_uploads == 2  # SQL's count: behind until applied
    journal.touch({"b": 1.0})  # any write commits the kept ends before its own change
    assert journal.kept_uploads == 0 and sql_row(path, "a") == (UPLOADED, "a.dcm", "S")
    assert journal.stats().pending_uploads == 1
    assert journal.uploaded_later("b", "b.dcm")
    journal.apply_kept()
    assert journal.kept_uploads == 0 and sql_row(path, "b") == (UPLOADED, "b.dcm", None)
    journal.close()


def test_an_upload_end_is_kept_only_for_a_pending_upload(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite")
    uploaded_uncached(journal, "done", "d")
    journal.mark_pending_delete("d")
    assert not journal.uploaded_later("done", "done.dcm")
    assert not journal.uploaded_later("d", "d.dcm")
    assert not journal.uploaded_later("missing", "missing.dcm")
    assert journal.kept_uploads == 0
    journal.put_pending("p", 10)
    journal.close()
    readonly = Journal(tmp_path / "j.sqlite", readonly=True)
    assert not readonly.uploaded_later("p", "p.dcm")
    readonly.close()


def test_an_upload_end_after_a_logged_put_hides_it_and_a_delete_after_it_wins(
        tmp_path: Path) -> None:
    """A put kept in memory (intent log), its upload's end, then a delete: each reader sees
    the latest; applied together they leave SQLite as the three commits one by one would
    (the put's row, uploaded with its key, then pending delete, the key kept for the
    bucket's delete)."""
    path = tmp_path / "j.sqlite"
    journal = Journal(path)
    for uuid in ("kept", "deleted"):
        assert journal.put_logged(uuid, 10)
        assert journal.uploaded_later(uuid, f"{uuid}.dcm", "S")
    kept = journal.get("kept")
    assert kept is not None and (kept.state, kept.key) == (UPLOADED, "kept.dcm")
    assert journal.in_state(PENDING_UPLOAD) == []
    assert journal.children("ke") == ["kept"]
    assert journal.delete_logged("deleted")
    deleted = journal.get("deleted")
    assert deleted is not None and (deleted.state, deleted.key, deleted.cached) == \
        (PENDING_DELETE, "deleted.dcm", False)
    assert journal.children("de") == [] and not journal.has_children("de")
    assert [row.uuid for row in journal.in_state(PENDING_DELETE)] == ["deleted"]
    assert journal.eviction_candidates(10) == [("kept", 10)]
    assert sql_row(path, "kept") is None  # nothing in SQLite yet
    journal.apply_kept()
    assert sql_row(path, "kept") == (UPLOADED, "kept.dcm", "S")
    assert sql_row(path, "deleted") == (PENDING_DELETE, "deleted.dcm", "S")
    journal.close()


def test_an_upload_end_kept_while_another_thread_commits_that_row_is_dropped(
        tmp_path: Path) -> None:
    """A write in a worker thread that names a row drops an upload's end kept for it
    meanwhile (here the row was deleted): the row must not look alive again. A dropped end
    only means the upload is repeated."""
    journal = Journal(tmp_path / "j.sqlite")
    journal.put_pending("x", 10)
    journal.get("x")
    commit = journal._db.execute
    ended = []

    def end_meanwhile(sql: str, *args: Any) -> Any:
        result = commit(sql, *args)
        if sql.startswith("UPDATE attachments SET state"):
            ended.append(journal.uploaded_later("x", "x.dcm"))
        return result

    journal._db.execute = end_meanwhile  # type: ignore[method-assign]
    journal.mark_pending_delete("x")
    assert ended == [True]
    row = journal.get("x")
    assert row is not None and row.state == PENDING_DELETE
    assert journal.kept_uploads == 0
    journal.close()


def test_a_kept_upload_end_reaches_sqlite_before_an_eviction_and_at_close(
        tmp_path: Path) -> None:
    """The barrier an eviction takes before it unlinks a copy commits kept upload ends
    first (docs/durability.md, invariant 2); closing the journal commits the rest."""
    path = tmp_path / "j.sqlite"
    journal = Journal(path)
    journal.put_pending("a", 10)
    journal.put_pending("b", 10)
    assert journal.uploaded_later("a", "a.dcm")
    journal.barrier()
    assert sql_row(path, "a") == (UPLOADED, "a.dcm", None)
    assert journal.uploaded_later("b", "b.dcm")
    journal.close()
    assert sql_row(path, "b") == (UPLOADED, "b.dcm", None)


def test_kept_upload_ends_count_towards_the_batch_a_logged_change_applies(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal_module, "APPLY_BATCH", 3)
    path = tmp_path / "j.sqlite"
    journal = Journal(path)
    journal.put_pending("a", 10)
    journal.put_pending("b", 10)
    assert journal.uploaded_later("a", "a.dcm") and journal.uploaded_later("b", "b.dcm")
    assert journal.put_logged("c", 10)  # the third kept change: all three applied
    assert journal.kept_uploads == 0
    assert sql_row(path, "a") == (UPLOADED, "a.dcm", None)
    assert sql_row(path, "c") == (PENDING_UPLOAD, None, None)
    journal.close()
