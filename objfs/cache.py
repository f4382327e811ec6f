"""The local tier's files and its space budget.

``<CacheDirectory>/data/<uuid>`` holds every local copy: dirty ones (journal state
``pending-upload``) and clean ones (``uploaded`` with ``cached``). ``tmp/`` holds downloads in
progress. The budget (``CacheSize``) counts both and is checked when space is taken:
`reserve` evicts least-recently-used clean copies that nobody has open, then waits for uploads
to make more copies clean, then raises `CacheFull` (ENOSPC). Eviction never touches a dirty
copy (docs/durability.md, invariants 2 and 5).
"""

from __future__ import annotations

import itertools
import logging
import os
import sqlite3
import time
import uuid as uuid_mod
from collections.abc import Callable, Iterable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import trio

from objfs import codec
from objfs.errnos import is_disk_full
from objfs.errors import CacheFull
from objfs.fsutil import syncfs
from objfs.journal import LOST_AND_FOUND, PENDING_UPLOAD, Journal, Row
from objfs.testhooks import crash_point

log = logging.getLogger(__name__)

EVICTION_BATCH = 64
# Copies given up by deletes leave data/ after Orthanc's burst (`LocalTier.remove_doomed`):
# renamed on the event loop TAKE_OUT_BATCH at a time (a checkpoint between: about 2 ms of
# renames), and unlinked in a worker thread DOOMED_BATCH at a time.
TAKE_OUT_BATCH = 32
DOOMED_BATCH = 1024
# A reservation short of space evicts this much more than it needs (at most; 1/128 of
# CacheSize).
EVICT_AHEAD_MAX = 8 * 1024 * 1024
# Downloaded copies are not fsynced one by one (a cold read would wait for it): the tier
# checkpoints them with one syncfs every CHECKPOINT_SECONDS and at a clean stop, recording when
# (journal meta DOWNLOADS_SYNCED). After a crash, clean copies modified since the last
# checkpoint, less MTIME_SLACK (file times come from the kernel's coarse clock), are dropped at
# start and fetched again: their data may not have reached the disk (docs/durability.md,
# invariant 2).
CHECKPOINT_SECONDS = 30.0
DISK_RESERVE_MIN = 16 * 1024 * 1024
DISK_RESERVE_MAX = 1024 * 1024 * 1024
DOWNLOADS_SYNCED = "downloads-synced"
# Disk space held for the journal (a preallocated file in the cache directory, part of
# `disk_reserve`): when something else fills the disk, the journal cannot record an eviction,
# and only an eviction could give the disk back (`_remove`).
JOURNAL_ROOM = 1024 * 1024
JOURNAL_ROOM_FILE = "journal-room"
DISK_FULL_LOG_EVERY = 60.0
CLEAN = "clean"
MTIME_SLACK = 0.1


def disk_reserve(fs_size: int) -> int:
    """Bytes of the cache directory's file system left out of the budget for the journal, its
    write-ahead log and the intent log: 5 % of the file system, at least DISK_RESERVE_MIN and
    at most DISK_RESERVE_MAX."""
    return max(DISK_RESERVE_MIN, min(DISK_RESERVE_MAX, fs_size // 20))


def stored_size(row: Row) -> int:
    """The bytes a local copy of `row` takes on disk: its size, or the A1 size when sealed."""
    return row.size + codec.OVERHEAD if row.sealed else row.size


class LocalTier:
    """Budgeted local copies. Methods run on the event loop; `recover` runs before it starts."""

    # The copies' directory under the cache directory (the journal's replay looks there too).
    DATA = "data"

    def __init__(self, root: Path, capacity: int, journal: Journal, full_timeout: float) -> None:
        self.root = root
        self.data = root / self.DATA
        self.tmp = root / "tmp"
        self.capacity = capacity
        self.journal = journal
        self.full_timeout = full_timeout
        self.used = 0
        self.evicted_files = 0  # since start, for the metrics
        self.evicted_bytes = 0
        self.open_counts: dict[str, int] = {}
        self._atimes: dict[str, float] = {}
        self._space_freed = trio.Event()
        # The one temporary copy allowed beyond CacheSize (a Semaphore: whoever is done with
        # the copy gives it back, not necessarily the task that took it).
        self._overflow = trio.Semaphore(1)
        # Copies given up by deletes (`doom`) and still in data/: uuid -> their bytes, still
        # in `used`. Rule: `doom` adds; `_take_out` (a batch in `remove_doomed`'s turn, all of
        # them in `_unlink_doomed_now`, one in `claim`, those whose rows are about to go in
        # `take_out`, called by the store's `_drop_rows`) renames the copy into tmp/ and
        # moves it to `_doomed`; nothing else changes it. Owner: the event loop.
        self._doom_later: dict[str, int] = {}
        # Copies taken out of data/ and not yet handed to a worker thread to unlink: renamed
        # into tmp/, their bytes still in `used`, until `remove_doomed` (or a reservation short
        # of space) unlinks them and gives the bytes back. Owner: the event loop.
        self._doomed: list[tuple[Path, int]] = []
        # Set while `_doom_later` or `_doomed` is not empty (the event loop sets and replaces
        # it).
        self._doomed_arrived = trio.Event()
        # Copies given up and not yet unlinked (in data/, listed or being unlinked);
        # `_doomed_settled` is set while there are none.
        self._doomed_pending = 0
        self._doomed_settled = trio.Event()
        self._doomed_settled.set()
        # Copies an `evict` is removing (owner: the event loop), and an Event set (and
        # replaced) each time an eviction's batch is done.
        self._evicting: set[str] = set()
        self._batch_evicted = trio.Event()
        self._evict_ahead = min(capacity // 128, EVICT_AHEAD_MAX)
        # Budget held by background work that no eviction can free yet: temporary copies
        # (upload bodies, tier moves) until given back, prefetched copies until their download
        # ends. Owner: the event loop.
        self.background_held = 0
        # Bytes only uploads can free (data not yet uploaded, open writes): the store sets
        # this. With `background_held` they stay within `background_share` when background
        # work takes budget.
        self.unsent: Callable[[], int] = lambda: 0
        self._room = root / JOURNAL_ROOM_FILE
        # Whether `journal-room` is set aside (owner: the event loop; `fit_to_disk` first).
        self._room_kept = False
        # One `make_disk_room` at a time (owner: the event loop): the next caller finds the
        # room the first made, instead of evicting again.
        self._disk_room_lock = trio.Lock()
        self._disk_full_logged = -DISK_FULL_LOG_EVERY

    def path(self, uuid: str) -> Path:
        return self.data / uuid

    def claim(self, uuid: str) -> Path:
        """`path(uuid)` for a new copy of `uuid` (a write of the name): a copy a delete gave up
        (`doom`) that still has the name is taken out of data/ first, so that neither is
        mistaken for the other. Event loop only."""
        if uuid in self._doom_later:
            self._take_out(uuid)
        return self.data / uuid

    def tmp_path(self, uuid: str, purpose: str = "part") -> Path:
        """A scratch file name in ``tmp/`` that no other caller gets: concurrent operations on
        one attachment (a download and a tier move, say) never share a temporary file."""
        return self.tmp / f"{uuid}.{purpose}.{uuid_mod.uuid4().hex[:12]}"

    def recover(self) -> None:
        """Reconcile files with the journal after any stop, clean or not.

        Files no row claims were never acknowledged, or belong to deleted attachments (a
        delete leaves its copy for after Orthanc's burst, `doom`): removed. Rows whose clean
        copy is gone, has the wrong size, or was modified after the last `checkpoint` are
        marked uncached (the copy is removed; the bucket has the object). A dirty row whose
        file is gone is data loss (the disk lost an acknowledged file): logged as an error and
        kept in the journal for the administrator.
        """
        for directory in (self.data, self.tmp):
            directory.mkdir(parents=True, exist_ok=True)
        for entry in self.tmp.iterdir():
            entry.unlink()
        claimed = {row.uuid: row for row in self.journal.cached_rows()}
        synced = self.journal.get_meta(DOWNLOADS_SYNCED)
        # None: a cache from before checkpoints, whose downloads were each fsynced; CLEAN: the
        # last stop synced everything after the mount was gone.
        since = float(synced) - MTIME_SLACK if synced not in (None, CLEAN) else None
        unplaced = [found for found in os.scandir(self.data) if found.name not in claimed]
        if unplaced and (self.journal.created or self.journal.lost_intents):
            # A new journal beside old copies (the former journal was lost or moved aside),
            # or a damaged intent log, whose lost puts leave acknowledged copies no row
            # claims: some of these may be acknowledged data not yet in the bucket, kept for
            # the administrator, never removed (README, "A damaged journal").
            lost_and_found = self.root / LOST_AND_FOUND
            lost_and_found.mkdir(exist_ok=True)
            for found in unplaced:
                os.replace(found.path, lost_and_found / found.name)
            log.warning("%s, but %d local copies in %s: moved to %s (those the bucket lacks "
                        "may be attachments Orthanc was told are stored; copy them back in "
                        "through the mount)", "a new journal" if self.journal.created else
                        "a damaged intent log", len(unplaced), self.data, lost_and_found)
            unplaced = []
        for found in unplaced:
            log.info("removing %s: no row claims it (never acknowledged, or deleted)",
                     found.path)
            os.unlink(found.path)
        lost = []
        for uuid, row in claimed.items():
            try:
                st = os.stat(self.path(uuid))
                size, mtime = st.st_size, st.st_mtime
            except FileNotFoundError:
                size, mtime = None, 0.0
            if size == stored_size(row):
                if since is None or row.state == PENDING_UPLOAD or mtime < since:
                    continue
                log.info("attachment %s: copy made after the last cache checkpoint, before an "
                         "unclean stop: dropped (the bucket has the object)", uuid)
                os.unlink(self.path(uuid))
                lost.append(uuid)
                continue
            if row.state == PENDING_UPLOAD:
                # Invariant 1 fsyncs the file before its row commits: only a failing disk gets
                # here. The row stays (reads answer EIO, never short data) for the operator.
                log.error("attachment %s: acknowledged data file %s is %s; it cannot be "
                          "uploaded", uuid, self.path(uuid),
                          "missing" if size is None else f"{size} bytes, not {stored_size(row)}")
                continue
            if size is not None:
                log.warning("attachment %s: cached copy is %d bytes, not %d: dropped (the "
                            "bucket has the object)", uuid, size, stored_size(row))
                os.unlink(self.path(uuid))
            lost.append(uuid)
        self.journal.uncache(lost)
        # Every copy left is on disk (older than the checkpoint, or synced at a clean stop):
        # from now on only copies made by this run are in doubt.
        self.journal.set_meta(DOWNLOADS_SYNCED, str(time.time()))
        # The budget counts plaintext sizes, as `reserve` does when the copy is made.
        self.used = sum(row.size for uuid, row in claimed.items() if uuid not in lost)

    def fit_to_disk(self) -> None:
        """Lower the budget to what the cache directory's file system can hold when CacheSize
        is larger (logged as a warning): the copies already counted plus the free space, less
        `disk_reserve` for the journal, its write-ahead log and the intent log. Otherwise the
        disk would fill before the budget does, and writes would fail with ENOSPC although
        clean copies could have been evicted. Also sets aside the journal's room
        (`keep_journal_room`). Run after `recover`, before the event loop."""
        self._room_kept = self.keep_journal_room()
        if not self._room_kept:
            log.warning("no room for the journal's reserve (%d MiB) in %s: if the disk fills "
                        "up, clean copies cannot be evicted to make room", JOURNAL_ROOM >> 20,
                        self.root)
        st = os.statvfs(self.root)
        reserve = disk_reserve(st.f_blocks * st.f_frsize)
        fitted = max(0, self.used + st.f_bavail * st.f_frsize - reserve)
        if fitted >= self.capacity:
            return
        log.warning("Objfs.CacheSize is %d MiB, but the file system of the cache directory %s "
                    "has room for %d MiB of copies (%d MiB already held, the rest free, less "
                    "%d MiB kept for the journal): the cache uses %d MiB", self.capacity >> 20,
                    self.root, fitted >> 20, self.used >> 20, reserve >> 20, fitted >> 20)
        self.capacity = fitted
        self._evict_ahead = min(fitted // 128, EVICT_AHEAD_MAX)

    def checkpoint(self, final: bool = False) -> None:
        """Make every copy written so far durable with one syncfs, then record when, durably
        (`final`: at a stop, once nothing can write any more, so every copy is on disk).
        Blocking (run it in a thread, or at stop). Raises OSError, or sqlite3.Error when the
        journal cannot record it (its disk full): the last recorded checkpoint then stands."""
        started = time.time()
        syncfs(self.data)
        self.journal.set_meta(DOWNLOADS_SYNCED, CLEAN if final else str(started))

    async def checkpoints(self) -> None:
        """`checkpoint` every CHECKPOINT_SECONDS, for the store's lifetime."""
        while True:
            await trio.sleep(CHECKPOINT_SECONDS)
            try:
                await trio.to_thread.run_sync(self.checkpoint)
            except (OSError, sqlite3.Error) as exc:  # a full disk: the journal cannot record
                log.error("cannot checkpoint downloaded copies in %s: %s (copies made since "
                          "the last checkpoint are fetched again after a crash)", self.data, exc)

    # --- the disk under the budget ------------------------------------------------------------

    def keep_journal_room(self) -> bool:
        """Set aside JOURNAL_ROOM bytes of the disk for the journal (the file `journal-room`,
        allocated), unless already done; returns whether it is set aside. Blocking. On a
        full disk nothing is left half allocated (that would hold space for nothing)."""
        try:
            if self._room.stat().st_blocks * 512 >= JOURNAL_ROOM:
                return True
        except FileNotFoundError:
            pass
        try:
            fd = os.open(self._room, os.O_WRONLY | os.O_CREAT, 0o600)
        except OSError:
            return False
        try:
            os.posix_fallocate(fd, 0, JOURNAL_ROOM)
            return True
        except OSError:
            self._room.unlink(missing_ok=True)
            return False
        finally:
            os.close(fd)

    async def _remove(self, victims: list[tuple[str, int]], want: int) -> tuple[list[str], int]:
        """`_remove_copies` in a worker thread. When the journal finds the disk full, its room
        is given to it and the eviction tried once more (its unlinks then free the disk);
        otherwise the error is raised. After an eviction the room is set aside again if it
        is not."""
        try:
            done = await trio.to_thread.run_sync(
                _remove_copies, self.journal, self.data, victims, want)
        except Exception as exc:
            if not is_disk_full(exc) or not self._room_kept:
                raise
            self._room.unlink(missing_ok=True)
            self._room_kept = False
            log.warning("the disk of the cache directory %s is full: the journal takes its "
                        "reserve to record an eviction", self.root)
            done = await trio.to_thread.run_sync(
                _remove_copies, self.journal, self.data, victims, want)
        if not self._room_kept:
            self._room_kept = await trio.to_thread.run_sync(self.keep_journal_room)
            if not self._room_kept:
                log.warning("no room to set aside the journal's reserve in %s: tried again "
                            "at the next eviction", self.root)
        return done

    async def make_disk_room(self, nbytes: int) -> bool:
        """The cache directory's disk is full although objfs' budget may not be (something
        else uses the disk): evict least recently used clean copies for `nbytes` and the usual
        margin. Returns whether the disk may now have room for `nbytes` (the caller tries
        once more); False when nothing could be evicted or the eviction failed (logged). One
        caller at a time: the next finds the room the first made."""
        async with self._disk_room_lock:
            st = await trio.to_thread.run_sync(os.statvfs, self.root)
            if st.f_bavail * st.f_frsize >= nbytes + JOURNAL_ROOM:
                return True  # another caller made room meanwhile
            try:
                freed = await self.evict(nbytes + self._evict_ahead)
            except (OSError, sqlite3.Error) as exc:
                log.error("the disk of the cache directory %s is full and no clean copy could "
                          "be evicted: %s", self.root, exc)
                return False
            if freed:
                now = trio.current_time()
                # Once a minute: while the disk stays full, every new copy evicts.
                warn = now - self._disk_full_logged >= DISK_FULL_LOG_EVERY
                if warn:
                    self._disk_full_logged = now
                log.log(logging.WARNING if warn else logging.DEBUG,
                        "the disk of the cache directory %s is full with %d of the cache's %d "
                        "MiB in use (something else uses it): evicted %d KiB of clean copies",
                        self.root, self.used >> 20, self.capacity >> 20, freed >> 10)
            return freed > 0

    # --- budget -------------------------------------------------------------------------------

    async def reserve(self, nbytes: int) -> None:
        """Take `nbytes` of the budget, evicting or waiting as needed.

        Raises CacheFull when `CacheFullTimeout` passes with the budget still full of dirty
        copies or open files.
        """
        if self.used + nbytes <= self.capacity:
            self.used += nbytes
            return
        with trio.move_on_after(self.full_timeout):
            while True:
                # Taken before `_make_room`, which may wait for worker threads: a copy that
                # becomes clean meanwhile sets this event, and the next round evicts it (taken
                # after, that wakeup was lost and the write waited out CacheFullTimeout).
                event = self._space_freed
                await self._make_room(nbytes)
                if self.used + nbytes <= self.capacity:
                    self.used += nbytes
                    return
                log.warning("cache full (%d of %d bytes, none evictable): waiting for uploads",
                            self.used, self.capacity)
                await event.wait()
        raise CacheFull(f"local cache full: {self.used} of {self.capacity} bytes hold data not "
                        "yet in the bucket or open files")

    async def _make_room(self, nbytes: int) -> None:
        """Free what the budget lacks for `nbytes`, if it lacks any: deleted copies first
        (garbage), then least recently used clean copies, a little more than needed (the
        journal barrier and the candidates query are then paid once for several
        reservations). The disk work runs in worker threads; whatever cannot be freed stays."""
        if self.used + nbytes > self.capacity:
            await self._unlink_doomed_now()
        if self.used + nbytes > self.capacity:
            await self.evict(self.used + nbytes - self.capacity + self._evict_ahead)

    async def _try_reserve(self, nbytes: int) -> bool:
        """Take `nbytes` for one of Orthanc's reads if the budget allows (`_make_room`);
        never waits for space."""
        await self._make_room(nbytes)
        if self.used + nbytes > self.capacity:
            return False
        self.used += nbytes
        return True

    @property
    def background_share(self) -> int:
        """Half the budget: once data not yet uploaded fills it, uploads stop yielding to
        Orthanc (objfs.store.writeback `_turn`); background copies are taken only while they
        and that data stay within it (`_try_reserve_background`). Orthanc's writers keep the
        rest, free or evictable."""
        return self.capacity // 2

    def _background_fits(self, nbytes: int) -> bool:
        return self.unsent() + self.background_held + nbytes <= self.background_share

    async def _try_reserve_background(self, nbytes: int) -> bool:
        """Take `nbytes` for background work, counted in `background_held`, if what no
        eviction can free (data not yet uploaded, open writes, background copies in the
        making) then stays within `background_share` and the whole budget within `CacheSize`:
        Orthanc's writers always find the other half free or evictable. Least recently used
        clean copies are evicted for it (`_make_room`), only as many as it needs, never to
        empty half the cache for one copy. Never waits for space."""
        if not self._background_fits(nbytes):
            return False
        await self._make_room(nbytes)
        # Checked again: other reservations ran during the awaits.
        if self.used + nbytes > self.capacity or not self._background_fits(nbytes):
            return False
        self.used += nbytes
        self.background_held += nbytes
        return True

    async def try_reserve_background(self, nbytes: int) -> Callable[[], None] | None:
        """Take `nbytes` for a copy nobody asked for yet (series prefetch), within the rules
        of `_try_reserve_background`; never waits for space. None when refused; else the
        function to call exactly once when the download has ended, whatever its outcome (the
        copy then keeps the budget as any clean copy, or the caller released it)."""
        if not await self._try_reserve_background(nbytes):
            return None

        def settle() -> None:
            self.background_held -= nbytes

        return settle

    async def take_scratch(self, nbytes: int, foreground: bool = False) -> Callable[[], None]:
        """Budget for a temporary copy (an encrypted upload body, a download's ciphertext, a
        decrypted copy that readers share); returns the function that gives it back (call it
        exactly once, from any task).

        Background copies (upload bodies, tier moves) are taken from `CacheSize` while what no
        eviction can free stays within half of it (`_try_reserve_background`): Orthanc's
        writers keep the other half. Orthanc's reads (`foreground`) may use all of it. Both
        evict the least recently used clean copies they need. Otherwise the copy waits for the
        one over-budget slot, so the cache directory holds at most `CacheSize` plus one
        temporary copy. Never raises CacheFull (a temporary copy is what lets uploads empty a
        full cache); callers bound foreground waits with their deadline
        (docs/durability.md, invariants 5 and 6)."""
        if foreground:
            if await self._try_reserve(nbytes):
                return lambda: self.release(nbytes)
        elif await self._try_reserve_background(nbytes):
            def give_back() -> None:
                self.background_held -= nbytes
                self.release(nbytes)

            return give_back
        await self._overflow.acquire()
        return self._overflow.release

    def release(self, nbytes: int) -> None:
        """Give back budget (a copy was removed or a reservation was not used)."""
        self.used = max(0, self.used - nbytes)
        self.space_changed()

    def space_changed(self) -> None:
        """Wake writers waiting for space (a copy became clean or was removed)."""
        self._space_freed.set()
        self._space_freed = trio.Event()

    async def evict(self, need: int) -> int:
        """Remove clean copies, least recently used first, until `need` bytes are freed.
        Returns the bytes freed: a copy already gone counts nothing (rule: whoever removes a
        copy gives its space back). The disk work (the journal barrier, the unlinks: 0.2-0.4
        ms each for a copy on disk here) runs in a worker thread, so that the event loop
        serves other requests meanwhile. Copies chosen by one call are not chosen by another
        running at the same time (`_evicting`). Not cancellable midway: the accounting always
        follows the unlinks."""
        self.flush_atimes()
        freed = 0
        skip: set[str] = set()
        while freed < need:
            victims = self._victims(skip, need - freed)
            if not victims:
                break
            chosen = {uuid for uuid, _ in victims}
            self._evicting |= chosen
            try:
                with trio.CancelScope(shield=True):
                    removed, got = await self._remove(victims, need - freed)
                    self._evicted(removed, got)
            finally:
                self._evicting -= chosen
                self._batch_evicted.set()
                self._batch_evicted = trio.Event()
            skip.update(removed)
            freed += got
        return freed

    def evicting(self, uuid: str) -> bool:
        """Whether an eviction is removing `uuid`'s copy."""
        return uuid in self._evicting

    async def wait_evicted(self, uuid: str) -> None:
        """Return once no eviction is about to unlink `uuid`'s copy. A new write of the name
        waits for this: the eviction's thread unlinks by name, and would take the new file."""
        while uuid in self._evicting:
            await self._batch_evicted.wait()

    def _victims(self, skip: set[str], want: int) -> list[tuple[str, int]]:
        """Least recently used clean copies nobody has open, enough for `want` bytes (as far
        as there are); `skip` and those another eviction is removing left out."""
        chosen: list[tuple[str, int]] = []
        total = 0
        for uuid, size in self.journal.eviction_candidates(
                EVICTION_BATCH + len(skip) + len(self._evicting)):
            if total >= want:
                break
            if uuid not in skip and uuid not in self.open_counts \
                    and uuid not in self._evicting and uuid not in self._doom_later:
                chosen.append((uuid, size))
                total += size
        return chosen

    def _evicted(self, removed: list[str], freed: int) -> None:
        self.evicted_files += len(removed)
        if freed:
            log.debug("evicted %d bytes of clean cached copies", freed)
            self.evicted_bytes += freed
            # `release` also wakes the other writers waiting for space: an eviction frees a
            # little more than its caller needs (`_evict_ahead`, whole copies), and nothing
            # else would wake them if no upload is left to finish.
            self.release(freed)

    # --- copies given up by deletes -----------------------------------------------------------

    def doom(self, uuid: str, nbytes: int) -> None:
        """Give up `uuid`'s copy (`nbytes` of budget), if there is one: it is removed after
        Orthanc's burst (`remove_doomed`), and its bytes come back then. Nothing touches the
        disk now. The caller has made the delete durable, so nothing serves the copy again: a
        reader that has it open keeps reading, and the name's next write takes it out first
        (`claim`).

        Orthanc waits for each delete. Unlinking a file whose blocks are on disk waits for the
        file system (0.2-0.4 ms each on ext4 with online discard, and a journal commit running
        beside it takes twice as long); even a rename into tmp/ (about 0.06 ms with its tmp
        name) left Orthanc's delete 0.18 ms slower, the calls after it included
        (docs/performance.md, 2026-12-05 11:00). A crash leaves the copy in data/ with no row
        claiming it (the delete was durable first), which `recover` removes."""
        if uuid in self._doom_later:
            return  # given up already: one copy, one debt
        self._doom_later[uuid] = nbytes
        self._doomed_arrived.set()
        self._doomed_pending += 1
        if self._doomed_pending == 1:
            self._doomed_settled = trio.Event()

    def take_out(self, uuids: Iterable[str]) -> None:
        """Take the copies of `uuids` that deletes gave up (`doom`) out of data/ now: before
        a deleted attachment's row goes. The intent log's replay brings back a logged put
        whose copy is still in data/ and which has no row (docs/durability.md, invariant 1),
        so no copy of a deleted attachment may outlive its row there. Event loop only."""
        for uuid in uuids:
            if uuid in self._doom_later:
                self._take_out(uuid)

    def _take_out(self, uuid: str) -> None:
        """Rename the copy `doom` gave up into tmp/, for a worker thread to unlink."""
        nbytes = self._doom_later.pop(uuid)
        doomed = self.tmp_path(uuid, "deleted")
        try:
            os.rename(self.data / uuid, doomed)
        except OSError as exc:
            if not isinstance(exc, FileNotFoundError):
                log.error("cannot remove the deleted copy %s: %s (it is removed at the next "
                          "start)", self.data / uuid, exc)
                self.release(nbytes)
            # else gone already: whoever removed it (an eviction under way) gave its space back.
            self._doomed_pending -= 1
            if not self._doomed_pending:
                self._doomed_settled.set()
            return
        self._doomed.append((doomed, nbytes))

    async def _take_out_some(self, limit: int) -> None:
        """Take up to `limit` given-up copies out of data/, oldest first: renames on the event
        loop, TAKE_OUT_BATCH at a time with a checkpoint between, so that Orthanc's requests
        are not held up long."""
        while self._doom_later and limit > 0:
            chunk = list(itertools.islice(self._doom_later, min(limit, TAKE_OUT_BATCH)))
            for uuid in chunk:
                if uuid in self._doom_later:  # not claimed during the checkpoint
                    self._take_out(uuid)
            limit -= len(chunk)
            await trio.lowlevel.checkpoint()

    def _take_batch(self) -> list[tuple[Path, int]]:
        """The copies taken out of data/, for a worker thread to unlink."""
        batch, self._doomed = self._doomed, []
        self._doomed_arrived = trio.Event()
        if self._doom_later:
            self._doomed_arrived.set()
        return batch

    async def doomed_removed(self) -> None:
        """Return once no doomed copy is left on disk (at once when there is none)."""
        await self._doomed_settled.wait()

    async def _unlink_doomed_now(self) -> None:
        """Remove every copy given up by deletes that `remove_doomed` has not taken yet, at
        once (renamed out of data/, then unlinked in a worker thread, not cancellable
        midway): for a reservation short of space (`_make_room`), which would otherwise
        wait for Orthanc to pause."""
        await self._take_out_some(len(self._doom_later))
        if not self._doomed:
            return
        batch = self._take_batch()
        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(_unlink_all, [path for path, _ in batch])
            finally:
                self._settled(batch)

    async def remove_doomed(self, turn: Callable[[], AbstractAsyncContextManager[object]]
                            ) -> None:
        """For the store's lifetime: unlink doomed copies (in a worker thread, a batch at a
        time, each batch inside a `turn`: background work that waits for Orthanc's burst to
        end), then give their bytes back. A copy that cannot be unlinked is logged and its
        bytes given back all the same: `recover` removes it at the next start."""
        while True:
            await self._doomed_arrived.wait()
            async with turn():
                await self._take_out_some(DOOMED_BATCH)
                batch = self._take_batch()
                if not batch:
                    continue  # a reservation short of space unlinked them meanwhile
                try:
                    await trio.to_thread.run_sync(_unlink_all, [path for path, _ in batch])
                finally:
                    self._settled(batch)

    def _settled(self, batch: list[tuple[Path, int]]) -> None:
        self.release(sum(nbytes for _, nbytes in batch))
        self._doomed_pending -= len(batch)
        if not self._doomed_pending:
            self._doomed_settled.set()

    # --- open files and recency ---------------------------------------------------------------

    def opened(self, uuid: str) -> None:
        self.open_counts[uuid] = self.open_counts.get(uuid, 0) + 1
        self._atimes[uuid] = time.time()

    def closed(self, uuid: str) -> None:
        left = self.open_counts.get(uuid, 0) - 1
        if left > 0:
            self.open_counts[uuid] = left
        else:
            self.open_counts.pop(uuid, None)

    def flush_atimes(self) -> None:
        """Write access times gathered since the last call. They only steer eviction: a
        journal that cannot take them (its disk full) loses them, with a warning."""
        if self._atimes:
            try:
                self.journal.touch(self._atimes)
            except sqlite3.Error as exc:
                log.warning("cannot record when %d copies were last read (%s): eviction may "
                            "take them earlier than their use deserves", len(self._atimes), exc)
            self._atimes = {}


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.error("cannot remove the deleted copy %s: %s (it is removed at the next "
                      "start)", path, exc)


def _remove_copies(journal: Journal, data: Path, victims: list[tuple[str, int]],
                   want: int) -> tuple[list[str], int]:
    """Unlink `victims`' copies in order until `want` bytes are freed and record them
    uncached; returns (uuids handled, bytes freed). A copy already gone is handled but frees
    nothing here: whoever removed it gave its space back (a delete drops the copy of an
    uploaded attachment while its commit, which uncaches the row, runs). Blocking."""
    # Their "uploaded" state may still be a lazy commit: make it durable before the only
    # local copy goes (docs/durability.md, invariant 2).
    journal.barrier()
    removed: list[str] = []
    freed = 0
    for uuid, size in victims:
        if freed >= want:
            break
        try:
            os.unlink(data / uuid)
        except FileNotFoundError:
            removed.append(uuid)
            continue
        crash_point("mid-eviction")
        removed.append(uuid)
        freed += size
    try:
        journal.uncache(removed)
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        journal.uncache(removed)  # the unlinks above gave the disk some room
    return removed, freed
