"""The journal's schema and state transitions."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from objfs.journal import PENDING_DELETE, PENDING_UPLOAD, UPLOADED, Journal


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
