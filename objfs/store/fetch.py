"""Reading: local copies, downloads with decryption and verification, shared decrypted copies."""

from __future__ import annotations

import functools
import logging
import math
import os
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from objfs import codec, errors
from objfs.dicomhead import series_instance_uid
from objfs.errnos import is_disk_full
from objfs.fsutil import fd_path
from objfs.journal import PENDING_UPLOAD, UPLOADED, Row
from objfs.store.names import Names
from objfs.store.state import (
    COMMIT_ROOM,
    DISK_FULL_PAUSE,
    DISK_FULL_TRIES,
    KEPT_CHANGES_DELAY,
    KEPT_FAILED_PAUSE,
    ROOM_MADE_PAUSE,
    FetchRecord,
    SharedPlain,
)
from objfs.testhooks import crash_point

log = logging.getLogger(__name__)


class DamagedFile(errors.Corrupt):
    """Corrupt, naming the file found damaged by its device and inode: a reader that waited
    before reading it may find its name given to another file since."""

    def __init__(self, message: str, file: tuple[int, int]) -> None:
        super().__init__(message)
        self.file = file


class Fetch(Names):
    """Opening attachments for Orthanc's reads."""

    async def open_read(self, uuid: str, objects_only: bool = False) -> int:
        """An fd on a complete local copy, fetching (and verifying) it first if needed; in
        HybridMode the file-system tier is tried first or last (unless `objects_only`).

        Every failure surfaces here (Orthanc ignores read errors): NotFound, Unavailable
        after `ReadTimeout`, Corrupt, CacheFull. Callers must `close_read` the uuid.
        """
        fs = None if objects_only else self.fs
        deadline = self.read_retry.deadline
        # One bound for every wait for a copy, however often the loop below goes round (a
        # prefetch that failed meanwhile, a copy that turned out damaged).
        until = trio.current_time() + (deadline if deadline is not None else math.inf)
        self.tier.opened(uuid)
        try:
            while True:
                handle = self.writing.get(uuid)
                if handle is not None:  # its own (plaintext) file, even if sealed meanwhile
                    return os.open(fd_path(handle.fd), os.O_RDONLY)
                found = await self._where_is(
                    uuid, None if fs is None else functools.partial(self._open_fs, uuid),
                    self._fs_first_for(uuid))
                if found is None:
                    raise errors.NotFound(f"attachment {uuid}")
                if not isinstance(found, Row):
                    return found  # an fd on the file-system tier's copy
                row = found
                if self.shared and row.state != PENDING_UPLOAD and not await self._confirm(row):
                    continue  # deleted by another node: perhaps moved to the shared fs tier
                if row.cached or row.state == PENDING_UPLOAD:
                    try:
                        if row.sealed:
                            return await self._unseal(row)
                        return self._open_local(row)
                    except FileNotFoundError:
                        if row.state == PENDING_UPLOAD:
                            if await self._adopt_uploaded(row):
                                continue
                            raise errors.Corrupt(f"attachment {uuid}: journaled local copy "
                                                 "is missing") from None
                        await self._j(self.journal.set_cached, uuid, False)
                    except errors.Corrupt as exc:
                        if not self._still_named(uuid, exc):
                            # Deleted and written again while this reader waited: the damaged
                            # file went with its delete; the new one is another matter.
                            continue
                        if row.state == PENDING_UPLOAD:
                            if await self._adopt_uploaded(row):
                                continue
                            raise
                        # The bucket holds a good copy: drop the damaged one and fetch again.
                        log.error("attachment %s: local copy is damaged (%s); "
                                  "fetching it again", uuid, exc)
                        self.tier.path(uuid).unlink(missing_ok=True)
                        self.tier.release(row.size)
                        await self._j(self.journal.set_cached, uuid, False)
                if self.on_cold is not None and not objects_only:
                    self.on_cold(uuid)
                try:
                    await self._fetch(row, until)
                except errors.NotFound:
                    if fs is not None and self._live_row(uuid) is None:
                        # Moved to the file-system tier (or deleted) while it was fetched:
                        # the loop looks there again.
                        continue
                    if not self.shared:
                        raise
                    await self._forget_gone(row)
                    continue
                if self.on_fetched is not None and not objects_only:
                    self.on_fetched(uuid)
        except BaseException:
            self.tier.closed(uuid)
            raise

    def _still_named(self, uuid: str, exc: errors.Corrupt) -> bool:
        """Whether the local copy found damaged is still the one named `uuid` (always, for a
        copy checked with no wait in between)."""
        if not isinstance(exc, DamagedFile):
            return True
        try:
            st = os.stat(self.tier.path(uuid))
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == exc.file

    async def _adopt_uploaded(self, row: Row) -> bool:
        """A pending upload whose local copy is gone or damaged (a power loss undid the
        journal's "uploaded" after the copy was evicted, or the disk failed): when the bucket
        holds its object with the right size, record it as uploaded and uncached, durably, and
        return True; otherwise (data loss) return False."""
        found = await self._locate(row.uuid)
        if found is None:
            return False
        key, stored = found
        if await self._plain_size(key, stored) != row.size:
            return False
        log.warning("attachment %s: local copy lost, but object %s in the bucket is complete; "
                    "reading from there", row.uuid, key)
        self.tier.path(row.uuid).unlink(missing_ok=True)
        await self._j(self.journal.put_uploaded, row.uuid, key, row.size)
        self.tier.release(row.size)
        return True

    def _open_local(self, row: Row) -> int:
        """An fd on the local plaintext copy of `row`, whose size must be the row's: Orthanc
        would serve a short copy padded with zeros. Raises Corrupt (a clean copy is then
        fetched again), FileNotFoundError."""
        fd = os.open(self.tier.path(row.uuid), os.O_RDONLY)
        size = os.fstat(fd).st_size
        if size != row.size:
            os.close(fd)
            raise errors.Corrupt(f"local copy is {size} bytes, expected {row.size}")
        # Start reading the whole copy from the disk now (this call does not wait): the
        # handlers read inline on the event loop, so without it the readers of copies that
        # are not in the page cache would wait for the disk one after the other.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        return fd

    async def _open_fs(self, uuid: str) -> int | None:
        """An fd on the file-system tier's plaintext of `uuid` (decrypted into an O_TMPFILE
        when the file is A1), or None when the file is not there. Raises Corrupt."""
        assert self.fs is not None
        path = self.fs.path(uuid)
        try:
            if not self.fs.encrypted(uuid):
                return os.open(path, os.O_RDONLY)
            source = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            return await self._shared_plain(uuid, source, None)
        except errors.Corrupt as exc:
            log.error("attachment %s: cannot read %s: %s", uuid, path, exc)
            raise
        finally:
            os.close(source)

    async def _unseal(self, row: Row) -> int:
        """An fd on the decrypted, verified copy of a sealed local file. The copy is opened
        before anything is awaited: the file decrypted is the one `row` describes, even if
        the name is deleted and written again while this reader waits. Raises
        FileNotFoundError when the copy is gone, DamagedFile when it does not verify."""
        source = os.open(self.tier.path(row.uuid), os.O_RDONLY)
        try:
            return await self._shared_plain(row.uuid, source, row.size)
        finally:
            os.close(source)

    async def _shared_plain(self, uuid: str, source: int, size: int | None) -> int:
        """A reader's fd on the plaintext of the A1 file open as `source` (the caller's, left
        open): one decrypted copy per file (an O_TMPFILE, never linked into a directory,
        counted in the cache budget by `take_scratch`), shared by every reader that has it
        open and freed when the last one closes. Raises DamagedFile (authentication failed,
        or not `size` bytes)."""
        st = os.fstat(source)
        key = (uuid, st.st_dev, st.st_ino)
        while (pending := self._plain_pending.get(key)) is not None:
            await pending.wait()
        shared = self._plain.get(key)
        if shared is None:
            assert self.encryption is not None
            done = self._plain_pending[key] = trio.Event()
            try:
                shared = await self._decrypt_shared(source, size)
                self._plain[key] = shared
            except errors.Corrupt as exc:
                raise DamagedFile(str(exc), (st.st_dev, st.st_ino)) from exc
            finally:
                del self._plain_pending[key]
                done.set()
        fd = os.open(fd_path(shared.fd), os.O_RDONLY)
        shared.readers += 1
        self._plain_fds[fd] = key
        return fd

    async def _scratch_for_reader(self, nbytes: int) -> Callable[[], None]:
        """Budget for a reader's temporary copy, waited for at most `ReadTimeout`."""
        deadline = self.read_retry.deadline
        with trio.move_on_after(deadline if deadline is not None else math.inf):
            return await self.tier.take_scratch(nbytes, foreground=True)
        raise errors.Unavailable(f"no room for a {nbytes}-byte temporary copy in the cache "
                                 f"within {deadline}s")

    async def _decrypt_shared(self, source: int, size: int | None) -> SharedPlain:
        assert self.encryption is not None
        expected = size if size is not None else max(0, os.fstat(source).st_size -
                                                     codec.OVERHEAD)
        give_back = await self._scratch_for_reader(expected)
        fd = held = -1
        try:
            fd = os.open(self.tier.tmp, os.O_TMPFILE | os.O_RDWR, 0o600)
            held = os.dup(source)
            async with self._crypto_limiter:
                await trio.to_thread.run_sync(codec.decrypt_file, fd_path(source), fd_path(fd),
                                              self.encryption.ring)
            got = os.fstat(fd).st_size
            if size is not None and got != size:
                raise errors.Corrupt(f"{got} bytes, expected {size}")
        except BaseException:
            for opened in (fd, held):
                if opened >= 0:
                    os.close(opened)
            give_back()
            raise
        return SharedPlain(fd, 0, give_back, held)

    def close_read(self, uuid: str, fd: int) -> None:
        os.close(fd)
        self.tier.closed(uuid)
        key = self._plain_fds.pop(fd, None)
        if key is not None:
            shared = self._plain[key]
            shared.readers -= 1
            if shared.readers == 0:
                del self._plain[key]
                os.close(shared.fd)
                os.close(shared.source)
                shared.give_back()

    async def _fetch(self, row: Row, until: float) -> None:
        """Download `row` once however many readers ask at the same time (at once when the
        journal says a copy is cached by now: the caller looks again); raises what the
        download raised. A download cancelled in its own task (its reader gave up) is not an
        error for the others: the next waiter downloads it itself, so another task's
        `trio.Cancelled` never escapes into a FUSE handler.

        Every wait, for another task's download (a prefetch) and then for its own, ends at
        `until` (Unavailable): a reader never waits a prefetch's deadline plus its own.
        A download that finds the disk full is tried again after `_make_disk_room` (which
        pauses the series prefetch), up to DISK_FULL_TRIES times in all (the disk's error is
        raised once an eviction frees nothing); its waiters then fetch for themselves (each
        with the same chances).
        """
        deadline = self.read_retry.deadline
        with trio.move_on_at(until):
            for tries_left in range(DISK_FULL_TRIES - 1, -1, -1):
                # Another task's download, begun before this one or while it made room.
                while (running := self._fetches.get(row.uuid)) is not None:
                    await running.done.wait()
                    if running.error is None:
                        return
                    if isinstance(running.error, Exception) and not is_disk_full(running.error):
                        raise running.error
                current = self.journal.get(row.uuid)
                if current is not None and current.cached:
                    # Fetched by another reader since the caller read `row` (it waited for
                    # a HEAD, say): its copy serves. Fetched again, the copy would replace
                    # that one, each taking the budget, given back once.
                    return
                try:
                    await self._recorded_download(row)
                    return
                except Exception as exc:
                    # The disk is full although the budget let the copy in: something else
                    # uses it. Evicting clean copies may make room, as for a full budget.
                    # Prefetches that were under way may take that room first (CI, once): they
                    # end, paused, as clean copies that the next eviction frees.
                    if not is_disk_full(exc) or not tries_left \
                            or not await self._make_disk_room(row.size, exc):
                        raise
        last = self.health.last_error
        raise errors.Unavailable(f"attachment {row.uuid}: not fetched within {deadline}s"
                                 + (f"; last error: {last}" if last else ""))

    async def _recorded_download(self, row: Row, background: bool = False) -> None:
        """`_download`, announced in `_fetches` so that readers of the uuid wait for it. A
        prefetch's (`background`) failure is not recorded for them: they fetch for
        themselves."""
        fetch = self._fetches[row.uuid] = FetchRecord()
        try:
            await self._download(row, background)
        except BaseException as exc:
            if not background or not isinstance(exc, Exception):
                fetch.error = exc
            raise
        finally:
            fetch.done.set()
            del self._fetches[row.uuid]

    # --- series, for prefetch (objfs.sidecar.prefetch) ---------------------------------------

    def known_series(self, uuid: str) -> str | None:
        """The SeriesInstanceUID the journal noted for `uuid` (at its upload), or None."""
        return self.journal.series_of(uuid)

    def uncached_members(self, series: str, limit: int) -> list[str]:
        """Uploaded, uncached attachments of `series` in the order they were stored."""
        return self.journal.series_members(series, limit)

    async def note_series(self, members: list[tuple[str, str]]) -> None:
        """Record (uuid, SeriesInstanceUID) pairs learnt elsewhere (from Orthanc)."""
        await self._j(self.journal.note_series, members)

    async def series_from_copy(self, uuid: str) -> str | None:
        """The SeriesInstanceUID in the header of `uuid`'s plaintext local copy; None when
        there is no such copy (not cached, or sealed) or the header does not tell."""
        row = self.journal.get(uuid)
        if row is None or not row.cached or row.sealed:
            return None
        try:
            head = await trio.to_thread.run_sync(self._head, uuid)
        except FileNotFoundError:
            return None  # evicted meanwhile
        return series_instance_uid(head)

    async def prefetch(self, uuid: str) -> bool:
        """Fetch `uuid` into the cache ahead of a read (series prefetch), at background
        priority: only when it is known, uploaded, not cached and not being fetched, and
        while what no eviction can free stays within half the budget (least recently used
        clean copies make room; never waits for space). A reader that opens it
        meanwhile waits for this download instead of starting its own. Returns whether a
        copy was fetched; failures are logged, never raised (nobody asked for it yet). A
        disk found full (something else uses it: the budget let the copy in) stops every
        prefetch for DISK_FULL_PAUSE: Orthanc's own reads and writes need the room, and
        each GET meanwhile would be thrown away."""
        if uuid in self.writing or uuid in self._fetches or self.health.failing.is_set():
            return False  # never adds to the load of a bucket that is failing
        if trio.current_time() < self._prefetch_resumes:
            return False
        try:
            row = await self._row(uuid)
        except errors.ObjfsError:
            return False
        if row is None or row.cached or row.state != UPLOADED or uuid in self._fetches:
            return False
        settle = await self.tier.try_reserve_background(row.size)
        if settle is None:
            return False
        try:
            current = self.journal.get(uuid)
            if uuid in self._fetches or uuid in self.writing or current is None \
                    or current.cached or current.state != UPLOADED:
                self.tier.release(row.size)  # a reader fetched it (or it went) while we evicted
                return False
            try:
                await self._recorded_download(row, background=True)
            except Exception as exc:
                if not is_disk_full(exc):
                    log.info("prefetch of attachment %s failed: %s", uuid, exc)
                else:
                    self._pause_prefetch(exc)
                return False
            return True
        finally:
            settle()

    async def _download(self, row: Row, background: bool = False) -> None:
        """Fetch, decrypt and verify an object into the local tier; the copy appears only
        when every check passed. `background` (prefetch): the caller took the budget for the
        copy, and temporary copies wait for space rather than evict."""
        assert row.key is not None
        key = row.key
        if not background:
            await self.tier.reserve(row.size)
        tmp = self.tier.tmp_path(row.uuid, "download")
        plain = self.tier.tmp_path(row.uuid, "plain")
        streamed = self._decrypts_on_arrival(key)
        give_back: Callable[[], None] = lambda: None  # noqa: E731 - a no-op by default
        try:
            if self.encryption is not None and not streamed:
                give_back = await self._decrypt_scratch(row.size, background)
            try:
                await self._retry(self.read_retry, f"download {key}",
                                  lambda: self._get_object(key, tmp, streamed))
            except errors.NotFound:
                # Renamed since we learnt its key (re-encrypted by `objfs rekey`, or rewritten
                # by the plugin): one listing finds the current name.
                found = await self._locate(row.uuid)
                if found is None or found[0] == key:
                    raise
                key = found[0]
                await self._j(self.journal.set_key, row.uuid, key)
                if streamed and not self._decrypts_on_arrival(key):
                    streamed = False
                    give_back = await self._decrypt_scratch(row.size, background)
                await self._retry(self.read_retry, f"download {key}",
                                  lambda: self._get_object(key, tmp, streamed))
            crash_point("mid-download")
            source = tmp if streamed else await self._decode(key, tmp, plain)
            got = source.stat().st_size
            if got != row.size:
                raise errors.Corrupt(f"{got} bytes, expected {row.size}")
            if self.seal_local:
                source = await self._seal(source, tmp, plain)
            # No fsync here (a reader waits for this): the tier's next checkpoint makes the
            # copy durable, and a crash before it drops the copy at start (`LocalTier`).
            # A row in another state than the one downloaded, or a delete while it downloaded:
            # the attachment went (and its name may be another file's by now).
            current = self.journal.get(row.uuid)
            fetch = self._fetches.get(row.uuid)
            deleted = current is None or current.state != UPLOADED or (
                fetch is not None and fetch.gone)
            if not deleted:  # no await since the check: atomic on the event loop
                os.replace(source, self.tier.claim(row.uuid))
        except errors.NotFound:
            log.error("attachment %s: object %s is missing from the bucket", row.uuid, key)
            self.tier.release(row.size)
            raise
        except BaseException as exc:
            if isinstance(exc, errors.ObjfsError) and not isinstance(exc, errors.LocalDiskFull):
                log.error("attachment %s: cannot read object %s: %s", row.uuid, key, exc)
            self.tier.release(row.size)
            raise
        finally:
            tmp.unlink(missing_ok=True)
            plain.unlink(missing_ok=True)
            give_back()
        if deleted:
            # Deleted while it downloaded: the copy must not appear (it would be counted and
            # never evicted).
            self.tier.release(row.size)
            raise errors.NotFound(f"attachment {row.uuid} was deleted while it was fetched")
        if self.journal.cached_later(row.uuid, self.seal_local):
            self._kept_changes.set()  # `_record_kept` commits it with the burst's others
            self._confirmed[row.uuid] = True
            return
        try:
            await self._j(self.journal.set_cached, row.uuid, True, self.seal_local)
        except Exception:
            # Not recorded (the journal's disk full): a copy no row claims would keep its
            # budget and its disk space until the next start, and each new try take more.
            self.tier.path(row.uuid).unlink(missing_ok=True)
            self.tier.release(row.size)
            raise
        self._confirmed[row.uuid] = True

    async def _record_kept(self) -> None:
        """Commit the cache flags downloads kept in memory (`Journal.cached_later`) and the
        ends uploads kept (`uploaded_later`) KEPT_CHANGES_DELAY seconds after the first of a
        burst, or as soon as `_kept_due` is set, all in one transaction in a worker thread:
        one thread round trip for the burst instead of one per download or upload (each
        cost the daemon 0.1-0.15 ms of CPU and a GIL handoff with the loop). A commit that
        finds the journal's disk full evicts clean copies to make room, as an upload's own
        commit did, and tries again ROOM_MADE_PAUSE later; with nothing to evict they stay
        kept (read as they are: served, uploaded) and it tries again DISK_FULL_PAUSE later
        (logged each time, as an upload whose record found the disk full always was), after
        any other failure KEPT_FAILED_PAUSE later; sooner with the next write. Until then
        `objfs status` counts those uploads as pending."""
        while True:
            await self._kept_changes.wait()
            with trio.move_on_after(KEPT_CHANGES_DELAY):
                await self._kept_due.wait()
            self._kept_changes = trio.Event()
            self._kept_due = trio.Event()
            try:
                await self._j(self.journal.apply_kept)
            except sqlite3.Error as exc:
                full = is_disk_full(exc)
                if full and await self._make_disk_room(COMMIT_ROOM, exc):
                    pause = ROOM_MADE_PAUSE
                else:
                    self._say_not_recorded(exc)
                    pause = DISK_FULL_PAUSE if full else KEPT_FAILED_PAUSE
                await trio.sleep(pause)
                self._kept_changes.set()
                self._kept_due.set()

    def _say_not_recorded(self, exc: sqlite3.Error) -> None:
        """Log that the kept changes could not be committed (`exc`): for an upload, in the
        words an upload whose record found the disk full has always used."""
        ended = self.journal.kept_upload()
        if ended is not None and is_disk_full(exc):
            log.error("upload of attachment %s: no space left on the local disk (%s); it is "
                      "in the bucket, and the journal records it (with %d more uploads and %d "
                      "downloaded copies) once there is room", ended, exc,
                      self.journal.kept_uploads - 1, self.journal.kept_flags)
            return
        log.warning("cannot record %d downloaded copies and %d uploads in the journal yet: %s",
                    self.journal.kept_flags, self.journal.kept_uploads, exc)

    def _decrypts_on_arrival(self, key: str) -> bool:
        """Whether a download of `key` is decrypted as its bytes arrive (no ciphertext copy on
        disk, no second pass): its name says A1 and the cache keeps plaintext. Otherwise
        `_decode` decrypts the fetched file (legacy names, which only the header tells apart;
        `EncryptLocalCache`, which keeps the ciphertext itself: `_seal`)."""
        if self.encryption is None or self.seal_local:
            return False
        info = self.layout.parse_key(key)
        return info is not None and info.encrypted is True

    def _get_object(self, key: str, path: Path, streamed: bool) -> Awaitable[int]:
        """One attempt at downloading `key` into `path`: its plaintext when `streamed` (a
        fresh decryptor each attempt; Corrupt when it does not verify), else as stored."""
        if not streamed:
            return self.backend.get(key, path)
        assert self.encryption is not None
        return self.backend.get(key, path, transform=codec.StreamDecryptor(self.encryption.ring))

    async def _decrypt_scratch(self, size: int, background: bool) -> Callable[[], None]:
        """Budget for a fetched A1 object whose plaintext is decrypted from it afterwards: for a
        moment both are on disk. Returns the function that gives it back."""
        if background:
            return await self.tier.take_scratch(size + codec.OVERHEAD)
        return await self._scratch_for_reader(size + codec.OVERHEAD)

    async def _seal(self, plaintext: Path, fetched: Path, scratch: Path) -> Path:
        """The sealed form of a verified download: the fetched object when it is already A1
        under our keys (verification just decrypted it), else a fresh encryption."""
        assert self.encryption is not None
        if plaintext != fetched:
            return fetched
        async with self._crypto_limiter:
            await trio.to_thread.run_sync(codec.encrypt_file, plaintext, scratch,
                                          self.encryption.ring)
        return scratch

    async def _decode(self, key: str, fetched: Path, plain: Path) -> Path:
        """The plaintext of a fetched object: `fetched` itself, or `plain` after decryption.
        Raises Corrupt for an object that cannot or must not be used."""
        info = self.layout.parse_key(key)
        encrypted = info.encrypted if info is not None else None
        if encrypted is None:  # a legacy name: only the header tells
            with open(fetched, "rb") as f:
                encrypted = codec.is_encrypted(f.read(2))
        if not encrypted:
            if self.encryption is not None and not self.allow_unencrypted_reads:
                raise errors.Corrupt("not encrypted (no A1 header) while StorageEncryption is "
                                     "enabled; set Objfs.AllowUnencryptedReads to accept it")
            return fetched
        if self.encryption is None:
            raise errors.Corrupt("the object is encrypted but StorageEncryption is not enabled")
        ring = self.encryption.ring
        async with self._crypto_limiter:
            await trio.to_thread.run_sync(codec.decrypt_file, fetched, plain, ring)
        return plain
