"""The journal: one SQLite row per attachment the local tier knows about.

States (`RowState`; docs/durability.md):
- ``pending-upload``: acknowledged to Orthanc, durable locally, not yet confirmed in the bucket;
- ``uploaded``: in the bucket; a clean local copy may exist (``cached``);
- ``pending-delete``: Orthanc deleted it; the object may still exist in the bucket.
Files still being written (never acknowledged) have no row: a crash discards them.

WAL with ``synchronous=FULL``: a write method returns after its change is on disk. Writes go
through one connection under a lock and may run in worker threads, to keep fsync latency off
the event loop; reads use a second connection and must come from the thread that opened the
journal (the event loop), where they never wait for a writer's fsync.

`get` keeps the rows it read (and the absence of a row) in memory until a write changes them:
Orthanc's requests look up the same attachment several times (lookup, create, getattr, open,
unlink), and a query costs more than the rest of such a request. Rule: a write forgets the
kept rows after its commit, whether or not it succeeded: every one unless it names the
attachment rows it changes (`rows=`; empty when it changes none).

New attachments (`put_logged`) and deletes of uploaded attachments, and of pending uploads not
yet sent (`delete_logged`), are made durable through the intent log (`objfs.intentlog`,
``intents.log`` beside the database) instead of a WAL fsync: one synchronous write of an
intent, with the row change kept in memory (`_unapplied`, which every read of this journal
takes into account); the kept changes reach SQLite in one lazy transaction, before any other
write, every APPLY_BATCH changes, and at a checkpoint; `checkpoint_log` makes those rows
durable with one fsync and empties the log; opening the journal replays what the log holds, in
order (durably), and empties it. A read-only journal (another process: `objfs status`,
`objfs audit`) sees the logged changes the same way, as the replay would make them.

A download's "the copy is cached" (`cached_later`) is kept in memory the same way (`_marked`),
without a commit or a worker thread: it reaches SQLite with the next write, or when the store
calls `apply_kept` (a short while after a burst of downloads). Losing it in a crash loses
nothing: start-up recovery removes a copy no row claims, and the bucket has the object. So is
an upload's "now in the bucket" (`uploaded_later`, `_uploaded`): losing it in a crash repeats
the upload.

A name written again after its attachment was deleted (Orthanc never does; a copy put back
through the mount can) must not meet what the log or a lazy commit still says of the deleted
attachment: its logged put would be replayed with the old size, its logged delete onto the
new row, and a kept put of the new one is not applied over a stale row. `settle_before_rewrite`
makes every change durable and empties the log first, for names deleted since the last
checkpoint (`_gone`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from objfs.errnos import is_damaged_database
from objfs.errors import JournalDamaged
from objfs.fsutil import fsync_path
from objfs.intentlog import Intent, IntentLog, Kind, legacy_deletes, read_intents

log = logging.getLogger(__name__)

# The intent log's file name, beside the database.
INTENT_LOG = "intents.log"
# The delete log of objfs before 2026-12-05, replayed once and removed.
LEGACY_DELETE_LOG = "deletes.log"
# Written beside the database when SQLite found it damaged while objfs ran: the next start
# checks the whole file (`PRAGMA quick_check`) before it uses it.
DAMAGE_MARK = "journal-damaged"
# Where `LocalTier.recover` puts the local copies a new journal cannot place.
LOST_AND_FOUND = "lost+found"
# A delete's row change (state, uuid): by a durable commit, a lazy one, or a replay.
_MARK_DELETED = "UPDATE attachments SET state=?, cached=0 WHERE uuid=?"
# A kept change's row inserted unless there is one (uuid, state, size, key, sealed, created,
# atime): a logged put's, or that of a delete logged before its put's row was applied.
_INSERT_NEW = ("INSERT INTO attachments(uuid, state, size, key, cached, sealed, created, atime) "
               "VALUES (?, ?, ?, ?, 1, ?, ?, ?) ON CONFLICT(uuid) DO NOTHING")
# A download's cache flag (sealed, atime, uuid, state): kept by `cached_later`, applied lazily.
_MARK_CACHED = "UPDATE attachments SET cached=1, sealed=?, atime=? WHERE uuid=? AND state=?"
# An upload's end (state, key, atime, uuid, state before): by `mark_uploaded`, or kept by
# `uploaded_later` and applied lazily.
_MARK_UPLOADED = ("UPDATE attachments SET state=?, key=?, last_error=NULL, atime=? "
                  "WHERE uuid=? AND state=?")
# The series an uploaded attachment belongs to (uuid, series).
_NOTE_SERIES = "INSERT OR REPLACE INTO series_members(uuid, series) VALUES (?, ?)"
# An attachment's rows dropped (uuid): by `remove`, or lazily by `delete_logged`.
_FORGET_SERIES = "DELETE FROM series_members WHERE uuid=?"
_FORGET_ROW = "DELETE FROM attachments WHERE uuid=?"


class RowState(enum.StrEnum):
    """An attachment's journaled state (stored as its string in the ``state`` column)."""

    PENDING_UPLOAD = "pending-upload"
    UPLOADED = "uploaded"
    PENDING_DELETE = "pending-delete"


PENDING_UPLOAD = RowState.PENDING_UPLOAD
UPLOADED = RowState.UPLOADED
PENDING_DELETE = RowState.PENDING_DELETE

_SCHEMA = """
CREATE TABLE IF NOT EXISTS attachments (
    uuid TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    size INTEGER NOT NULL,
    key TEXT,
    cached INTEGER NOT NULL DEFAULT 0,
    sealed INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    atime REAL NOT NULL DEFAULT 0,
    last_error TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS attachments_state ON attachments(state, created);
CREATE INDEX IF NOT EXISTS attachments_lru ON attachments(atime)
    WHERE state = 'uploaded' AND cached = 1;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
-- Which series an attachment belongs to (its SeriesInstanceUID), for series prefetch.
CREATE TABLE IF NOT EXISTS series_members (uuid TEXT PRIMARY KEY, series TEXT NOT NULL)
    WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS series_members_series ON series_members(series);
CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, record TEXT NOT NULL) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class Row:
    uuid: str
    state: RowState
    size: int
    key: str | None
    cached: bool
    created: float
    last_error: str | None = None
    sealed: bool = False  # the local copy is A1 ciphertext (Objfs.EncryptLocalCache)


@dataclass(frozen=True)
class Stats:
    pending_uploads: int
    pending_upload_bytes: int
    oldest_pending: float | None  # creation time of the oldest pending upload
    pending_deletes: int
    uploaded: int
    cached_entries: int
    cached_bytes: int
    failing: int  # pending uploads whose last attempt failed


_COLUMNS = "uuid, state, size, key, cached, created, last_error, sealed"
# Rows `get` keeps at most; the whole cache is dropped when it is full (simple, and a query
# refills what is in use).
ROW_CACHE = 16384
# Logged changes (puts and deletes) and kept upload ends that `put_logged` and `delete_logged`
# apply in one transaction (when no other thread holds the journal): more only cost memory and
# the readers' filtering; fewer cost a commit's overhead per few changes.
APPLY_BATCH = 64
# Names `_gone` holds at most; past it the set is dropped and every new write settles
# (`settle_before_rewrite`) until a checkpoint: bounded memory in an endless delete burst.
GONE_LIMIT = 65536


def _row(values: tuple[Any, ...]) -> Row:
    uuid, state, size, key, cached, created, last_error, sealed = values
    return Row(uuid, RowState(state), size, key, bool(cached), created, last_error,
               bool(sealed))


def damaged_text(path: Path, problem: object, running: bool = False) -> str:
    """What a damaged journal at `path` means and the way out (README, "A damaged journal"),
    at a start or (`running`) found while objfs runs."""
    what = (f"the journal {path} is damaged ({problem}): requests that need its damaged part "
            "fail with EIO. Stop objfs, move" if running else
            f"the journal {path} is damaged ({problem}); objfs does not start on it. Move")
    return (f"{what} it aside with its -wal and -shm files, then start objfs again: it "
            "rebuilds the journal from the bucket and keeps the local copies it can no longer "
            f"place in {path.parent / LOST_AND_FOUND} (README, \"A damaged journal\")")


class _Connection(sqlite3.Connection):
    """A journal connection on which every statement and every fetch that SQLite answers
    "damaged" (SQLITE_CORRUPT, SQLITE_NOTADB) raises JournalDamaged through `on_damage`,
    whatever the thread; other errors pass unchanged."""

    on_damage: Callable[[sqlite3.DatabaseError], JournalDamaged] | None = None

    def damaged(self, exc: sqlite3.DatabaseError) -> BaseException:
        if self.on_damage is None or not is_damaged_database(exc):
            return exc
        return self.on_damage(exc)

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        try:
            return self.cursor(_Cursor).execute(sql, parameters)
        except sqlite3.DatabaseError as exc:
            raise self.damaged(exc) from exc

    def executemany(self, sql: str, parameters: Any, /) -> sqlite3.Cursor:
        try:
            return self.cursor(_Cursor).executemany(sql, parameters)
        except sqlite3.DatabaseError as exc:
            raise self.damaged(exc) from exc


class _Cursor(sqlite3.Cursor):
    """The rows of a `_Connection` query: SQLite reads further pages as they are fetched."""

    def _damaged(self, exc: sqlite3.DatabaseError) -> BaseException:
        connection = self.connection
        return connection.damaged(exc) if isinstance(connection, _Connection) else exc

    def fetchone(self) -> Any:
        try:
            return super().fetchone()
        except sqlite3.DatabaseError as exc:
            raise self._damaged(exc) from exc

    def fetchall(self) -> list[Any]:
        try:
            return super().fetchall()
        except sqlite3.DatabaseError as exc:
            raise self._damaged(exc) from exc

    def __next__(self) -> Any:
        try:
            return super().__next__()
        except sqlite3.DatabaseError as exc:
            raise self._damaged(exc) from exc


@contextlib.contextmanager
def _atomic(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One transaction on `db`: committed when the block ends, rolled back when it raises
    (the block's error is the one raised, whatever the rollback meets)."""
    db.execute("BEGIN")
    try:
        yield db
    except BaseException:
        with contextlib.suppress(Exception):
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


class Journal:
    """The attachment journal in ``<CacheDirectory>/journal.sqlite``.

    Damage: SQLite's answer that the file is damaged raises JournalDamaged, at open and on any
    later statement. The first one while running sets `damage` (the sidecar's /health reports
    it), is logged as critical, and writes DAMAGE_MARK beside the file; a start that finds the
    mark checks the whole file (`PRAGMA quick_check`, proportional to its size) and refuses it
    unless SQLite finds it sound (repaired meanwhile), or the journal is new (moved aside)."""

    def __init__(self, path: Path, readonly: bool = False, heed_mark: bool = True,
                 copies: Path | None = None) -> None:
        """Open (or create) the journal. Raises JournalDamaged when SQLite finds the file
        damaged, or when it was found damaged while objfs ran and still is; `created` says
        whether this call created it, `lost_intents` whether the intent log was found damaged
        (acknowledged writes may then have local copies no row claims). `copies`: the
        directory of the local copies (the cache's ``data/``), where the replay of a logged
        put looks for its copy (None: every logged put without a row is replayed)."""
        self.created = not readonly and not path.exists()
        self.lost_intents = False
        self._copies = copies
        self.damage: str | None = None
        self._damage_lock = threading.Lock()
        mark = path.with_name(DAMAGE_MARK)
        if readonly and heed_mark and mark.exists() and path.exists():
            # `objfs status`: the file's check is the next start's (a whole-file scan). (No
            # journal: moved aside, and the next start removes the mark.)
            raise JournalDamaged(self._mark_text(mark))
        try:
            self._open(path, readonly)
            if not readonly and mark.exists():
                self._check_marked(mark)
        except JournalDamaged:  # (first: it is a DatabaseError too)
            self.close()
            raise
        except sqlite3.DatabaseError as exc:
            if not is_damaged_database(exc):
                raise
            raise JournalDamaged(damaged_text(path, exc)) from exc
        # From here on, damage is news: noted, logged, marked (at open it is only raised, and
        # a read-only reader, `objfs status`, only reports it).
        if not readonly:
            for db in {self._db, self._lazy, self._reader}:
                db.on_damage = self.note_damage

    @staticmethod
    def _mark_text(mark: Path) -> str:
        try:
            return mark.read_text().strip() or f"{mark} exists"
        except OSError as exc:
            return f"{mark}: {exc}"

    def _check_marked(self, mark: Path) -> None:
        """The journal was found damaged while objfs ran (`mark`): refuse it unless it is new
        or SQLite's quick_check now finds it sound."""
        if not self.created:
            problems = [str(r[0]) for r in self._reader.execute("PRAGMA quick_check(5)")]
            if problems != ["ok"]:
                raise JournalDamaged(damaged_text(self.path, "; ".join(problems)))
            log.warning("the journal %s was found damaged while objfs ran (%s); SQLite's check "
                        "finds it sound now: using it", self.path, self._mark_text(mark))
        mark.unlink(missing_ok=True)

    def note_damage(self, exc: sqlite3.DatabaseError) -> JournalDamaged:
        """SQLite found the file damaged (`exc`) while objfs ran: note the first such news
        (`damage`, a critical log line, DAMAGE_MARK) and return the error to raise. Any
        thread."""
        text = damaged_text(self.path, exc, running=True)
        with self._damage_lock:
            first, self.damage = self.damage is None, self.damage or text
        if first:
            log.critical("%s", text)
            try:
                self.path.with_name(DAMAGE_MARK).write_text(
                    damaged_text(self.path, exc) + "\n")
            except OSError as mark_failed:
                log.error("cannot record the damage in %s: %s",
                          self.path.with_name(DAMAGE_MARK), mark_failed)
        return JournalDamaged(f"the journal {self.path} is damaged ({exc})")

    def _open(self, path: Path, readonly: bool) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._intents: IntentLog | None = None  # set once replayed; None when read-only
        # Rows read by `get`, by uuid (None: no row). Filled by `get` on the reading thread;
        # writers (any thread) drop what they changed after their commit and bump
        # `_generation`, so that a read that raced a write never keeps what it read. Both
        # under `_cache_lock`, which is held only for dictionary operations.
        self._rows: dict[str, Row | None] = {}
        self._generation = 0
        self._cache_lock = threading.Lock()
        # Row changes of logged puts and deletes not yet in SQLite, by uuid: the row as the
        # change leaves it (None: the row goes). Rule: `put_logged` (any thread) and
        # `delete_logged` (the event loop) add one before its intent is appended, so every
        # intent a checkpoint counts has its change here or in SQLite; `_apply_locked` (under
        # `_lock`, any thread) removes those it has committed. Readers (the event loop) see
        # through it: `get` answers from it, queries leave out, replace or add its uuids. In a
        # read-only journal: the logged changes its opening found, as the replay would make
        # them. Under `_cache_lock`, held only for dict operations.
        self._unapplied: dict[str, Row | None] = {}
        # Cache flags of downloads not yet in SQLite, by uuid: (the row as the flag leaves it,
        # its atime). Rule: `cached_later` (the event loop) adds one only to an uploaded row;
        # `_apply_locked` (under `_lock`, any thread) commits them before the deletes' changes
        # and removes those it committed; a write naming a uuid drops its flag after the
        # commit (`_forget_rows`: the write decided what the row is, and a flag added while
        # it committed must not override it). `get` answers from it; `cached_rows`,
        # `eviction_candidates`, `in_state` and `series_members` take it into account;
        # `stats` (a SQL count) lags until it is applied. Under `_cache_lock`.
        self._marked: dict[str, tuple[Row, float]] = {}
        # Upload ends not yet in SQLite, by uuid: (the row as the end leaves it, its atime,
        # the attachment's series or None). Rule: `uploaded_later` (the event loop) adds one
        # only to a pending-upload row; `_apply_locked` (under `_lock`, any thread) commits
        # them after the kept puts' rows and before the deletes' changes (a delete comes
        # later and wins) and removes those it committed; a write naming a uuid drops its
        # end after the commit, as it drops a flag (losing one repeats the upload). An
        # upload's end always follows its put: it hides a kept pending-upload row of its
        # uuid in `_unapplied`, and nothing else there (`_seen`). `get` and every query see
        # through it; `stats` (a SQL count) lags until it is applied. Under `_cache_lock`.
        self._uploaded: dict[str, tuple[Row, float, str | None]] = {}
        # Names marked pending-delete or whose rows were dropped since the rows were last made
        # durable with the log emptied: the log, or a lazy commit not yet on disk, may still
        # speak of the deleted attachment (`settle_before_rewrite`). Rule: each method that
        # marks or drops rows (`delete_logged`, `mark_pending_delete`, `put_move_target`, `remove`,
        # `forget_deleted`) adds their uuids before it changes anything; a checkpoint that
        # emptied the log after its barrier removes those it saw before the barrier (and the
        # overflow it saw). Past GONE_LIMIT the set is dropped and `_gone_overflow` set: then
        # every new write settles. Under `_cache_lock`.
        self._gone: set[str] = set()
        self._gone_overflow = False
        uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
        self._reader = self._connect(uri)
        # A read-only journal reads the intent log at its first `get` or query (`_logged`).
        self._unread_log = readonly
        if readonly:
            self._db = self._lazy = self._reader  # never written through
            return
        self._db = self._connect(uri, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._migrate()
        # Changes whose loss in a crash is harmless (a repeated upload, a stale recency or
        # cache flag that start-up recovery checks) skip the fsync: the next durable commit
        # writes them out along with itself, in order.
        self._lazy = self._connect(uri, check_same_thread=False)
        self._lazy.execute("PRAGMA synchronous=NORMAL")
        intents = IntentLog(path.with_name(INTENT_LOG))
        self.lost_intents = intents.damaged
        try:
            self._replay(intents)
        except BaseException:
            intents.close()
            raise
        self._intents = intents

    def _connect(self, uri: str, check_same_thread: bool = True) -> _Connection:
        db = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=30,
                             check_same_thread=check_same_thread, factory=_Connection)
        assert isinstance(db, _Connection)
        return db

    def _replay(self, intents: IntentLog) -> None:
        """Apply the changes the log holds, in order (a crash may have lost their lazy row
        changes), and those of an earlier objfs' delete log before them, durably
        (`_as_replayed`, then a barrier); then empty the log and remove the old one."""
        legacy = self.path.with_name(LEGACY_DELETE_LOG)
        logged = [Intent(Kind.DELETE, uuid) for uuid in legacy_deletes(legacy)]
        changed = self._as_replayed(logged + intents.pending(), self._reader, self._copies)
        if changed:
            with self._cache_lock:
                self._unapplied = changed
            self.barrier()  # applies them first
        if legacy.exists():
            legacy.unlink()
            fsync_path(legacy.parent)
        intents.reset_if(intents.count)  # damaged slots included (nothing appends meanwhile)

    @staticmethod
    def _as_replayed(intents: list[Intent], db: sqlite3.Connection,
                     copies: Path | None = None) -> dict[str, Row | None]:
        """What replaying `intents` makes of the rows they name, where that differs from
        what `db` holds now: a put makes a pending-upload row unless there is a row
        (committed since) or its local copy is not in `copies` (the attachment was deleted
        since, and must not come back; None: taken to be there, as a reader in another
        process does); a delete marks the row pending-delete, and makes a pending-delete
        row for a put whose copy was gone: deleted before any of its row changes reached
        SQLite, it may have been uploaded meanwhile (its end kept in memory too), so its
        object's delete is repeated (needless when it was never sent, or when the delete
        had reached the bucket and the row was dropped). A reader reads the intents before
        the rows: a change applied and its log emptied in between is then in the rows."""
        changed: dict[str, Row | None] = {}
        gone: dict[str, int] = {}  # puts whose copy was not in `copies`: their sizes
        for intent in intents:
            if intent.uuid in changed:
                row = changed[intent.uuid]
            else:
                found = db.execute(f"SELECT {_COLUMNS} FROM attachments WHERE uuid=?",
                                   (intent.uuid,)).fetchone()
                row = None if found is None else _row(found)
            if intent.kind == Kind.PUT:
                if row is not None:
                    continue
                if copies is None or (copies / intent.uuid).exists():
                    changed[intent.uuid] = Row(intent.uuid, PENDING_UPLOAD, intent.size, None,
                                               True, time.time())
                else:
                    gone[intent.uuid] = intent.size
            elif row is not None and row.state != PENDING_DELETE:
                changed[intent.uuid] = dataclasses.replace(row, state=PENDING_DELETE,
                                                           cached=False)
            elif row is None and intent.uuid in gone:
                changed[intent.uuid] = Row(intent.uuid, PENDING_DELETE, gone[intent.uuid],
                                           None, False, time.time())
        return changed

    def _migrate(self) -> None:
        """Bring a journal made by an earlier objfs to the current schema."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(attachments)")}
        if "sealed" not in columns:  # before Objfs.EncryptLocalCache
            self._db.execute("ALTER TABLE attachments ADD COLUMN sealed INTEGER NOT NULL "
                             "DEFAULT 0")

    def close(self) -> None:
        with self._lock:
            try:
                if self._intents is not None:
                    # Lazily: until the next open replays it, the log holds them durably.
                    self._apply_locked()
            except sqlite3.Error as exc:
                log.warning("the journal closes with %d changes only in its intent log (%s): "
                            "the next start replays them; %d downloaded copies not recorded "
                            "(it removes them), %d uploads not recorded (it repeats them)",
                            len(self._unapplied), exc, len(self._marked), len(self._uploaded))
            finally:
                for db in {self._db, self._lazy, self._reader}:
                    db.close()
                if self._intents is not None:
                    self._intents.close()
                    self._intents = None

    def _write(self, sql: str, args: Iterable[object] = (), durable: bool = True,
               rows: Iterable[str] | None = None, wait: bool = True) -> bool:
        """One statement (its own transaction); `rows`: the attachments it changes (None:
        any; empty: none). With `wait` False nothing is done, and False returned, when
        another thread is writing (for callers on the event loop, which must not wait)."""
        if not self._lock.acquire(blocking=wait):
            return False
        try:
            self._apply_locked()
            (self._db if durable else self._lazy).execute(sql, tuple(args))
        finally:
            self._lock.release()
            self._forget_rows(rows)
        return True

    @contextlib.contextmanager
    def _transaction(self, durable: bool = True,
                     rows: Iterable[str] | None = None) -> Iterator[sqlite3.Connection]:
        """One transaction on the durable or the lazy connection: committed when the block
        ends, rolled back if it raises. The kept copies of `rows` (None: every row) are
        forgotten afterwards either way."""
        db = self._db if durable else self._lazy
        try:
            with self._lock:
                self._apply_locked()
                with _atomic(db):
                    yield db
        finally:
            self._forget_rows(rows)

    def _many(self, sql: str, args: Iterable[tuple[object, ...]], durable: bool = True,
              rows: Iterable[str] | None = None) -> None:
        with self._transaction(durable, rows) as db:
            db.executemany(sql, args)

    def _apply_locked(self) -> None:
        """Commit the kept cache flags and row changes of logged puts and deletes (one lazy
        transaction), so that the write that follows, or a checkpoint's fsync, comes after
        them. Caller holds `_lock`."""
        if not self._unapplied and not self._marked and not self._uploaded:
            # One added meanwhile goes with the next write; whatever a checkpoint counted
            # was added before it counted.
            return
        with self._cache_lock:
            batch = dict(self._unapplied)
            marked = dict(self._marked)
            uploaded = dict(self._uploaded)
        forgotten = [(uuid,) for uuid, row in batch.items() if row is None]
        kept = [row for row in batch.values() if row is not None]
        with _atomic(self._lazy) as db:
            # A delete or an upload's end kept after a put that was never applied needs the
            # put's row first.
            db.executemany(_INSERT_NEW, ((row.uuid, PENDING_UPLOAD, row.size, row.key,
                                          int(row.sealed), row.created, row.created)
                                         for row in kept))
            db.executemany(_MARK_UPLOADED, ((UPLOADED, row.key, atime, uuid, PENDING_UPLOAD)
                                            for uuid, (row, atime, _) in uploaded.items()))
            db.executemany(_NOTE_SERIES, ((uuid, series)
                                          for uuid, (_, _, series) in uploaded.items()
                                          if series is not None))
            # Flags before deletes: a delete kept after one (or committed later) clears it.
            db.executemany(_MARK_CACHED, ((int(row.sealed), atime, uuid, UPLOADED)
                                          for uuid, (row, atime) in marked.items()))
            db.executemany(_MARK_DELETED, ((PENDING_DELETE, row.uuid)
                                           for row in kept if row.state == PENDING_DELETE))
            db.executemany(_FORGET_SERIES, forgotten)
            db.executemany(_FORGET_ROW, forgotten)
        with self._cache_lock:
            self._generation += 1
            for uuid, row in batch.items():
                if uuid in self._unapplied and self._unapplied[uuid] is row:  # not replaced
                    del self._unapplied[uuid]
                self._rows.pop(uuid, None)
            for uuid, flag in marked.items():
                if self._marked.get(uuid) is flag:  # not replaced
                    del self._marked[uuid]
                self._rows.pop(uuid, None)
            for uuid, end in uploaded.items():
                if self._uploaded.get(uuid) is end:
                    del self._uploaded[uuid]
                self._rows.pop(uuid, None)

    def apply_kept(self) -> None:
        """Commit the row changes kept in memory (`cached_later`, `uploaded_later`,
        `put_logged`, `delete_logged`) in one lazy transaction. Any thread; it waits for
        another thread's write."""
        with self._lock:
            self._apply_locked()

    @property
    def kept_flags(self) -> int:
        """Cache flags kept in memory (`cached_later`), not yet in SQLite."""
        return len(self._marked)

    @property
    def kept_uploads(self) -> int:
        """Upload ends kept in memory (`uploaded_later`), not yet in SQLite."""
        return len(self._uploaded)

    def kept_upload(self) -> str | None:
        """One of the uploads whose end is kept in memory (`uploaded_later`), if any."""
        with self._cache_lock:
            return next(iter(self._uploaded), None)

    @property
    def kept_changes(self) -> int:
        """Row changes of logged puts and deletes and upload ends kept in memory: at
        APPLY_BATCH the next `put_logged` or `delete_logged` applies them."""
        return len(self._unapplied) + len(self._uploaded)

    def _flagged(self) -> dict[str, Row]:
        """A copy of the kept cache flags' rows, for a query to see through."""
        with self._cache_lock:
            return {uuid: row for uuid, (row, _) in self._marked.items()} if self._marked \
                else {}

    def _logged(self) -> None:
        """In a read-only journal, once: keep what the replay would make of the changes in
        the intent log (`_as_replayed`), for `get` and the queries to see through."""
        self._unread_log = False
        self._unapplied = self._as_replayed(read_intents(self.path.with_name(INTENT_LOG)),
                                            self._reader)

    def _hidden(self) -> dict[str, Row | None]:
        """A copy of the kept row changes of logged puts and deletes and of upload ends, as
        `get` sees them (`_seen`), for a query to see through."""
        if self._unread_log:
            self._logged()
        with self._cache_lock:
            if not self._uploaded:
                return dict(self._unapplied) if self._unapplied else {}
            hidden = dict(self._unapplied)
            for uuid in self._uploaded:
                hidden[uuid] = self._seen(uuid)
            return hidden

    def _seen(self, uuid: str) -> Row | None:
        """The kept row of `uuid` in `_unapplied` or `_uploaded` (it must be in one): an
        upload's end hides a kept put's pending-upload row, which it follows, and nothing
        else. Caller holds `_cache_lock`."""
        ended = self._uploaded.get(uuid)
        if uuid in self._unapplied:
            row = self._unapplied[uuid]
            if ended is None or row is None or row.state != PENDING_UPLOAD:
                return row
        assert ended is not None
        return ended[0]

    def _forget_rows(self, uuids: Iterable[str] | None) -> None:
        """Drop the kept rows of `uuids` (None: every row), after a commit."""
        if uuids is not None:
            uuids = tuple(uuids)
            if not uuids:
                return  # no attachment row changed
        with self._cache_lock:
            self._generation += 1
            if uuids is None:
                self._rows.clear()
                self._marked.clear()
                self._uploaded.clear()
            else:
                for uuid in uuids:
                    self._rows.pop(uuid, None)
                    self._marked.pop(uuid, None)
                    self._uploaded.pop(uuid, None)

    # --- meta ---------------------------------------------------------------------------------

    def get_meta(self, name: str) -> str | None:
        found = self._reader.execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()
        return None if found is None else str(found[0])

    def set_meta(self, name: str, value: str) -> None:
        self._write("INSERT OR REPLACE INTO meta(name, value) VALUES (?, ?)", (name, value),
                    rows=())

    # --- jobs (the sidecar's move-storage jobs, as JSON records) -------------------------------

    def put_job(self, job_id: str, record: str, durable: bool = True) -> None:
        self._write("INSERT OR REPLACE INTO jobs(id, record) VALUES (?, ?)", (job_id, record),
                    durable, rows=())

    def job_records(self) -> list[str]:
        return [str(r[0]) for r in self._reader.execute("SELECT record FROM jobs")]

    # --- attachments --------------------------------------------------------------------------

    def get(self, uuid: str) -> Row | None:
        if self._unread_log:
            self._logged()
        with self._cache_lock:
            if uuid in self._unapplied or uuid in self._uploaded:
                return self._seen(uuid)
            if uuid in self._marked:
                return self._marked[uuid][0]
            if uuid in self._rows:
                return self._rows[uuid]
            generation = self._generation
        found = self._reader.execute(f"SELECT {_COLUMNS} FROM attachments WHERE uuid=?",
                                     (uuid,)).fetchone()
        row = None if found is None else _row(found)
        with self._cache_lock:
            if generation == self._generation:  # no write committed since the query began
                if len(self._rows) >= ROW_CACHE:
                    self._rows.clear()
                self._rows[uuid] = row
        return row

    def put_pending(self, uuid: str, size: int, key: str | None = None,
                    sealed: bool = False, wait: bool = True) -> bool:
        """Record an acknowledged write (durable when this returns True). With `wait` False:
        False, with nothing recorded, when another thread is writing the journal."""
        now = time.time()
        return self._write(
            "INSERT INTO attachments(uuid, state, size, key, cached, sealed, created, atime) "
            "VALUES (?, ?, ?, ?, 1, ?, ?, ?) ON CONFLICT(uuid) DO UPDATE SET "
            "size=excluded.size, key=excluded.key, sealed=excluded.sealed",
            (uuid, PENDING_UPLOAD, size, key, int(sealed), now, now), rows=(uuid,), wait=wait)

    def put_logged(self, uuid: str, size: int) -> bool:
        """`put_pending(uuid, size)` for an attachment that has no row, made durable by the
        intent log instead of a WAL fsync: one synchronous write on the calling thread (any),
        which never waits for another thread's commit; the row is kept in memory for readers
        (`_unapplied`) and reaches SQLite with a batch of others (`_apply_locked`). False,
        with nothing changed, when the log is full (or the journal is read-only): then
        `put_pending`. Call it only after the caller saw no row (`get`, on the readers'
        thread): a row committed meanwhile is kept as it is. Raises OSError when the log
        cannot be written (the row is then still kept, and applied, but may be lost in a
        crash: the write must not be acknowledged)."""
        if self._intents is None or self._intents.full:
            return False
        now = time.time()
        with self._cache_lock:
            self._unapplied[uuid] = Row(uuid, PENDING_UPLOAD, size, None, True, now)
            self._kept_row_changed(uuid)
        logged = self._intents.append_put(uuid, size)
        if not logged:  # filled by another thread meanwhile: the caller commits durably
            with self._cache_lock:
                self._unapplied.pop(uuid, None)
                self._generation += 1
            return False
        self._apply_if_batch()
        return True

    def _apply_if_batch(self) -> None:
        """Apply the kept changes once APPLY_BATCH are kept, unless another thread writes."""
        if len(self._unapplied) + len(self._uploaded) >= APPLY_BATCH \
                and self._lock.acquire(blocking=False):
            try:
                self._apply_locked()
            finally:
                self._lock.release()

    def put_uploaded(self, uuid: str, key: str, size: int) -> None:
        """Record an object put in the bucket by a move, with no local copy (durable). A name
        whose earlier object's delete the log still holds (moved to the file-system tier and
        back) is settled first (`settle_before_rewrite`): replayed, that delete would mark
        this row deleted. Blocks: for a worker thread."""
        self.settle_before_rewrite(uuid)
        self._put_moved(uuid, UPLOADED, key, size)

    def _put_moved(self, uuid: str, state: RowState, key: str, size: int) -> None:
        """A move's row for the object under `key`, with no local copy (durable)."""
        now = time.time()
        self._write(
            "INSERT INTO attachments(uuid, state, size, key, cached, sealed, created, atime) "
            "VALUES (?, ?, ?, ?, 0, 0, ?, ?) ON CONFLICT(uuid) DO UPDATE SET state=excluded.state, "
            "size=excluded.size, key=excluded.key, cached=0, sealed=0, last_error=NULL",
            (uuid, state, size, key, now, now), rows=(uuid,))

    def put_move_target(self, uuid: str, key: str, size: int) -> None:
        """Record, durably, the object a move to the bucket is about to put under `key`, as a
        pending delete: until the move records it (`put_uploaded`), no attachment claims that
        object, so a crash in between must leave its delete behind (the start resumes it).
        Blocks: for a worker thread."""
        self._note_gone((uuid,))
        self._put_moved(uuid, PENDING_DELETE, key, size)

    def put_written_through(self, uuid: str, key: str, size: int, durable: bool) -> None:
        """Record a write whose object is already in the bucket, with its local copy (start-up
        recovery drops a copy that a power loss left short: it is fetched again). `durable`
        False is for a shared bucket, where names the journal lost are asked of the bucket."""
        now = time.time()
        self._write(
            "INSERT INTO attachments(uuid, state, size, key, cached, sealed, created, atime) "
            "VALUES (?, ?, ?, ?, 1, 0, ?, ?) ON CONFLICT(uuid) DO UPDATE SET state=excluded.state, "
            "size=excluded.size, key=excluded.key, cached=1, sealed=0, last_error=NULL",
            (uuid, UPLOADED, size, key, now, now), durable=durable, rows=(uuid,))

    def set_key(self, uuid: str, key: str) -> None:
        self._write("UPDATE attachments SET key=? WHERE uuid=?", (key, uuid), durable=False,
                    rows=(uuid,))

    def set_error(self, uuid: str, error: str | None) -> None:
        self._write("UPDATE attachments SET last_error=? WHERE uuid=?", (error, uuid),
                    durable=False, rows=(uuid,))

    def mark_uploaded(self, uuid: str, key: str, series: str | None = None) -> None:
        """Not durable on its own: after a crash the upload is simply repeated. `series`: the
        attachment's SeriesInstanceUID, noted in the same transaction (`note_series`)."""
        with self._transaction(durable=False, rows=(uuid,)) as db:
            db.execute(_MARK_UPLOADED, (UPLOADED, key, time.time(), uuid, PENDING_UPLOAD))
            if series is not None:
                db.execute(_NOTE_SERIES, (uuid, series))

    def uploaded_later(self, uuid: str, key: str, series: str | None = None) -> bool:
        """`mark_uploaded(uuid, key, series)` kept in memory (`_uploaded`) rather than
        committed: no SQLite work, no worker thread; every read of this journal sees it at
        once, SQLite with the next write, APPLY_BATCH kept changes or `apply_kept` (until
        then `stats`, and other processes, count the upload as pending). For the event loop
        (readers' thread). False, with nothing changed, when the row is not pending upload
        (or there is none, or the journal is read-only): then `mark_uploaded`."""
        row = self._to_keep(uuid, PENDING_UPLOAD)
        if row is None:
            return False
        with self._cache_lock:
            self._uploaded[uuid] = (dataclasses.replace(row, state=UPLOADED, key=key,
                                                        last_error=None), time.time(), series)
            self._kept_row_changed(uuid)
        return True

    def _to_keep(self, uuid: str, state: RowState) -> Row | None:
        """For a change kept in memory (`uploaded_later`, `cached_later`): the row of `uuid`
        when it is in `state` and this journal writes, else None."""
        if self._db is self._reader:
            return None
        row = self.get(uuid)
        return row if row is not None and row.state == state else None

    def _kept_row_changed(self, uuid: str) -> None:
        """After a change of `uuid`'s row was kept: a `get` under way must not keep what it
        read. Caller holds `_cache_lock`."""
        self._generation += 1
        self._rows.pop(uuid, None)

    def mark_pending_delete(self, uuid: str) -> None:
        self._note_gone((uuid,))
        self._write(_MARK_DELETED, (PENDING_DELETE, uuid), rows=(uuid,))

    def delete_logged(self, uuid: str, forget: bool = False) -> bool:
        """`mark_pending_delete` (or, with `forget`, `remove`), made durable by the intent log
        instead of a WAL fsync: the uuid is logged with one synchronous write, on the calling
        thread (the event loop: the row change is kept for its readers, `_unapplied`), which
        never waits for another thread's commit; the row change reaches SQLite with a batch
        of others (`_apply_locked`). False, with nothing changed, when the log is full or the
        journal has no row for `uuid`: then commit durably with `mark_pending_delete` or
        `remove` (in a worker thread). Raises OSError when the log cannot be written (the row
        change is then still kept, and applied, but may be lost in a crash: the delete must
        not be acknowledged).

        `forget` is for an attachment that never reached the bucket: its row goes. A crash
        before that change is committed leaves the row as it was, and the replay marks it
        pending-delete: one needless delete request to the bucket, never a revived file."""
        if self._intents is None or self._intents.full:
            return False
        row = self.get(uuid)
        if row is None:
            return False
        # What `_MARK_DELETED` (or, forgotten, `_FORGET_ROW`) will make of the row.
        changed = None if forget else dataclasses.replace(row, state=PENDING_DELETE,
                                                          cached=False)
        self._note_gone((uuid,))
        with self._cache_lock:
            self._unapplied[uuid] = changed
            self._kept_row_changed(uuid)
        logged = self._intents.append_delete(uuid)
        self._apply_if_batch()
        return logged

    @property
    def logged_intents(self) -> int:
        """Puts and deletes in the intent log, not yet covered by a checkpoint."""
        return 0 if self._intents is None else self._intents.count

    def checkpoint_log(self) -> bool:
        """Make the rows of every logged put and delete durable (one WAL fsync) and empty
        the log, unless one was logged meanwhile (then it stays for the next checkpoint).
        Names deleted before the fsync are settled then (`_gone`; a fsync for them alone
        when the log is empty). Returns whether the log is empty. May run in any thread."""
        if self._intents is None:
            return True
        upto = self._intents.count
        seen = self._gone_seen()
        if upto == 0 and not seen[0] and not seen[1]:
            return True
        self.barrier()
        if not self._intents.reset_if(upto):
            return False
        self._settled(seen)
        return True

    def _note_gone(self, uuids: Iterable[str]) -> None:
        """`uuids` are being marked deleted or their rows dropped (`_gone`)."""
        with self._cache_lock:
            self._gone.update(uuids)
            if len(self._gone) > GONE_LIMIT:
                self._gone.clear()
                self._gone_overflow = True

    def _gone_seen(self) -> tuple[set[str], bool]:
        """What `_gone` holds now, for `_settled` once a barrier made it durable."""
        with self._cache_lock:
            return set(self._gone), self._gone_overflow

    def _settled(self, seen: tuple[set[str], bool]) -> None:
        """The names in `seen` were made durable by a barrier and the log emptied after it."""
        with self._cache_lock:
            self._gone -= seen[0]
            if seen[1]:
                self._gone_overflow = False

    def unsettled(self, uuid: str) -> bool:
        """Whether a new write of `uuid` must call `settle_before_rewrite` first (cheap)."""
        if self._intents is None:
            return False
        with self._cache_lock:
            return uuid in self._gone or self._gone_overflow

    def settle_before_rewrite(self, uuid: str) -> None:
        """Call before a new write of `uuid` (before its data is acknowledged). When that
        name was deleted since the last checkpoint, make every change durable (the kept ones
        applied, one WAL fsync) and empty the intent log, with appends to the log held
        meanwhile so that it empties even in a burst (an append waits a WAL fsync at most):
        the replay of the deleted attachment's put would make the new attachment's row with
        the old size, that of its delete would mark the new row deleted, a kept put of the new
        one is not applied over a row still committed, and a power loss could undo a lazily
        committed drop of the old row. Nothing to do for other names, the usual case. Blocks:
        for a worker thread. Raises what the commit or the log's write raises."""
        intents = self._intents
        if intents is None or not self.unsettled(uuid):
            return
        seen = self._gone_seen()
        intents.reset_after(self.barrier)
        self._settled(seen)

    def cached_later(self, uuid: str, sealed: bool = False) -> bool:
        """`set_cached(uuid, True, sealed)` for an uploaded row, kept in memory (`_marked`)
        rather than committed: no SQLite work, no worker thread; every read of this journal
        sees it at once, SQLite with the next write or `apply_kept`. For the event loop
        (readers' thread). False, with nothing changed, when the row is not uploaded (or
        there is none, or the journal is read-only): then `set_cached`."""
        row = self._to_keep(uuid, UPLOADED)
        if row is None:
            return False
        with self._cache_lock:
            self._marked[uuid] = (dataclasses.replace(row, cached=True, sealed=sealed),
                                  time.time())
            self._kept_row_changed(uuid)
        return True

    def set_cached(self, uuid: str, cached: bool, sealed: bool = False) -> None:
        """Not durable on its own: start-up recovery checks cached rows against the files."""
        self._write("UPDATE attachments SET cached=?, sealed=?, atime=? WHERE uuid=?",
                    (int(cached), int(sealed), time.time(), uuid), durable=False,
                    rows=(uuid,))

    def uncache(self, uuids: Iterable[str]) -> None:
        """Record that the local copies of `uuids` were removed (one transaction)."""
        uuids = list(uuids)
        self._many("UPDATE attachments SET cached=0 WHERE uuid=?", ((u,) for u in uuids),
                   durable=False, rows=uuids)

    def remove(self, uuid: str) -> None:
        self._note_gone((uuid,))
        with self._transaction(rows=(uuid,)) as db:
            db.execute(_FORGET_SERIES, (uuid,))
            db.execute(_FORGET_ROW, (uuid,))

    def note_series(self, entries: Iterable[tuple[str, str]]) -> None:
        """Record (uuid, SeriesInstanceUID) pairs. Not durable on its own: a lost entry only
        means a later prefetch of that series asks Orthanc."""
        self._many(_NOTE_SERIES, entries, durable=False, rows=())

    def series_of(self, uuid: str) -> str | None:
        with self._cache_lock:
            if uuid in self._unapplied and self._unapplied[uuid] is None:
                return None  # forgotten, series and all
            ended = self._uploaded.get(uuid)
            if ended is not None and ended[2] is not None:
                return ended[2]
        found = self._reader.execute("SELECT series FROM series_members WHERE uuid=?",
                                     (uuid,)).fetchone()
        return None if found is None else str(found[0])

    def series_members(self, series: str, limit: int) -> list[str]:
        """Uploaded attachments of `series` not cached locally, oldest first (the order they
        were stored, which is usually the order a modality sent them), at most `limit`."""
        hidden = {**self._hidden(), **self._flagged()}  # flagged: cached
        found = self._reader.execute(
            "SELECT a.uuid FROM series_members m JOIN attachments a ON a.uuid = m.uuid "
            "WHERE m.series=? AND a.state=? AND a.cached=0 ORDER BY a.created, a.uuid LIMIT ?",
            (series, UPLOADED, limit + len(hidden)))
        return [str(row[0]) for row in found if row[0] not in hidden][:limit]

    def forget_deleted(self, uuids: Iterable[str]) -> None:
        """Drop the rows of deletes the bucket confirmed (one transaction). Not durable on its
        own: after a crash those deletes are repeated, which is harmless."""
        uuids = list(uuids)
        self._note_gone(uuids)
        with self._transaction(durable=False, rows=uuids) as db:
            db.executemany("DELETE FROM series_members WHERE uuid=?", ((u,) for u in uuids))
            db.executemany("DELETE FROM attachments WHERE uuid=? AND state=?",
                           ((u, PENDING_DELETE) for u in uuids))

    def add_remote(self, entries: Iterable[tuple[str, str, int]]) -> None:
        """Record attachments found in the bucket: (uuid, key, size); known ones are kept."""
        now = time.time()
        entries = list(entries)
        self._many("INSERT OR IGNORE INTO attachments(uuid, state, size, key, cached, created) "
                   "VALUES (?, 'uploaded', ?, ?, 0, ?)",
                   ((uuid, size, key, now) for uuid, key, size in entries), durable=False,
                   rows=[uuid for uuid, _, _ in entries])

    def touch(self, atimes: dict[str, float]) -> None:
        """Record access times (not part of a `Row`: kept rows stay valid)."""
        self._many("UPDATE attachments SET atime=? WHERE uuid=?",
                   ((t, u) for u, t in atimes.items()), durable=False, rows=())

    def in_state(self, state: RowState) -> list[Row]:
        hidden = self._hidden()
        flagged = self._flagged()
        rows = self._reader.execute(f"SELECT {_COLUMNS} FROM attachments WHERE state=? "
                                    "ORDER BY created", (state,)).fetchall()
        found = [flagged.get(r[0]) or _row(r) for r in rows if r[0] not in hidden]
        kept = [row for row in hidden.values() if row is not None and row.state == state]
        if kept:
            found += kept
            found.sort(key=lambda row: row.created)
        return found

    def cached_rows(self) -> list[Row]:
        """Every row that claims a local copy (dirty or clean)."""
        hidden = self._hidden()  # deletes say uncached, puts cached
        flagged = self._flagged()  # read before the query: one applied meanwhile is not lost
        rows = self._reader.execute(f"SELECT {_COLUMNS} FROM attachments WHERE cached=1")
        return [_row(r) for r in rows.fetchall() if r[0] not in hidden and r[0] not in flagged] \
            + [row for uuid, row in flagged.items() if uuid not in hidden] \
            + [row for row in hidden.values() if row is not None and row.cached]

    def barrier(self) -> None:
        """Make every change committed so far durable, lazy ones included (one WAL fsync):
        call it before acting on a lazily recorded state, e.g. unlinking a copy whose row
        says uploaded (docs/durability.md, invariant 2)."""
        self._write("INSERT OR REPLACE INTO meta(name, value) VALUES ('barrier', ?)",
                    (str(time.time()),), rows=())

    def eviction_candidates(self, limit: int) -> list[tuple[str, int]]:
        """Least recently used clean local copies: (uuid, size). Copies whose cache flag or
        upload's end is kept in memory (`cached_later`, `uploaded_later`) are the newest:
        they come after the others."""
        hidden = self._hidden()
        flagged = self._flagged()
        rows = self._reader.execute(
            "SELECT uuid, size FROM attachments WHERE state='uploaded' AND cached=1 "
            "ORDER BY atime LIMIT ?", (limit + len(hidden) + len(flagged),)).fetchall()
        found = [(str(u), int(s)) for u, s in rows if u not in hidden and u not in flagged]
        ended = [(uuid, row.size) for uuid, row in hidden.items()
                 if row is not None and row.state == UPLOADED and row.cached]
        return (found + [(uuid, row.size) for uuid, row in flagged.items()
                         if uuid not in hidden] + ended)[:limit]

    def children(self, prefix: str) -> list[str]:
        """Uuids (not pending delete) that start with `prefix`, in order."""
        upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        hidden = self._hidden()
        rows = self._reader.execute(
            "SELECT uuid FROM attachments WHERE uuid >= ? AND uuid < ? AND state != ? "
            "ORDER BY uuid", (prefix, upper, PENDING_DELETE)).fetchall()
        kept = [uuid for uuid, row in hidden.items() if uuid.startswith(prefix)
                and row is not None and row.state != PENDING_DELETE]
        found = [str(r[0]) for r in rows if r[0] not in hidden]
        return sorted(found + kept) if kept else found

    def has_children(self, prefix: str) -> bool:
        upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        hidden = self._hidden()
        if any(uuid.startswith(prefix) and row is not None and row.state != PENDING_DELETE
               for uuid, row in hidden.items()):
            return True  # a logged put not yet in SQLite
        # Enough rows that one is not a delete kept in memory, if there is one (Orthanc
        # removes a directory right after deleting a file in it: usually one is hidden).
        skip = sum(1 for uuid in hidden if uuid.startswith(prefix))
        found = self._reader.execute(
            "SELECT uuid FROM attachments WHERE uuid >= ? AND uuid < ? AND state != ? LIMIT ?",
            (prefix, upper, PENDING_DELETE, skip + 1)).fetchall()
        return any(r[0] not in hidden for r in found)

    def stats(self) -> Stats:
        """The counters, consistent with one moment although another process (the daemon)
        changes the journal meanwhile: the intent log is read first, then every count comes
        from one read transaction. (Read the other way round, a change logged but not yet
        in the rows when the counts were taken, whose rows changed and whose log was reset
        before the log was read, would be counted nowhere: a daemon with uploads or deletes
        to do would look idle.)"""
        logged = read_intents(self.path.with_name(INTENT_LOG))
        with _atomic(self._reader) as db:
            pending = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(created), "
                "COALESCE(SUM(last_error IS NOT NULL), 0) FROM attachments WHERE state=?",
                (PENDING_UPLOAD,)).fetchone()
            deletes = db.execute("SELECT COUNT(*) FROM attachments WHERE state=?",
                                 (PENDING_DELETE,)).fetchone()[0]
            uploaded = db.execute("SELECT COUNT(*) FROM attachments WHERE state=?",
                                  (UPLOADED,)).fetchone()[0]
            cached = db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM attachments "
                                "WHERE cached=1").fetchone()
            stats = Stats(pending_uploads=pending[0], pending_upload_bytes=pending[1],
                          oldest_pending=pending[2], pending_deletes=deletes,
                          uploaded=uploaded, cached_entries=cached[0], cached_bytes=cached[1],
                          failing=pending[3])
            return self._with_logged(stats, logged, db)

    def _with_logged(self, stats: Stats, logged: list[Intent], db: sqlite3.Connection) -> Stats:
        """`stats` counting the puts and deletes in the intent log (`logged`) whose rows do
        not say so yet (their changes kept in memory by the process that logged them) as
        what the replay makes of them. (The oldest pending upload and the failing count are
        left as they are.)"""
        counts = dataclasses.asdict(stats)
        changed = self._as_replayed(logged, db)
        named = list(changed)
        for start in range(0, len(named), 500):
            chunk = named[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for values in db.execute(f"SELECT {_COLUMNS} FROM attachments WHERE uuid IN "
                                     f"({marks})", chunk):
                _count(counts, _row(values), -1)
        for row in changed.values():
            if row is not None:
                _count(counts, row, 1)
        return Stats(**counts)

    def forget_all_clean(self) -> None:
        """Drop every uploaded row (used when the cache directory changes buckets)."""
        self._write("DELETE FROM attachments WHERE state=?", (UPLOADED,))


def _count(counts: dict[str, Any], row: Row, sign: int) -> None:
    """Add `row` to (`sign` 1) or take it from (-1) the counters of `Stats` in `counts`."""
    if row.state == PENDING_DELETE:
        counts["pending_deletes"] += sign
    elif row.state == UPLOADED:
        counts["uploaded"] += sign
    else:
        counts["pending_uploads"] += sign
        counts["pending_upload_bytes"] += sign * row.size
    if row.cached:
        counts["cached_entries"] += sign
        counts["cached_bytes"] += sign * row.size


def read_stats(path: Path, owner: Journal | None = None) -> Stats:
    """`Journal.stats` on a read-only connection of its own, so that any thread may call it
    (the counts scan the table: about 0.1 s per million attachments). Raises JournalDamaged
    when SQLite finds the file damaged (noted by `owner`, the daemon's open journal, when
    given), or, in another process, when the daemon found it damaged (DAMAGE_MARK)."""
    journal = Journal(path, readonly=True, heed_mark=owner is None)
    try:
        return journal.stats()
    except sqlite3.DatabaseError as exc:
        if not is_damaged_database(exc):
            raise
        if owner is not None:
            raise owner.note_damage(exc) from exc
        raise JournalDamaged(f"the journal {path} is damaged ({exc})") from exc
    finally:
        journal.close()
