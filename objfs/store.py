"""What an attachment operation means: the local tier, the journal, the bucket.

Durability contract (docs/durability.md; numbers are its invariants), as this module keeps it:
1. `sync` (Orthanc's fdatasync and close) returns only after the data file is fdatasynced and
   its ``pending-upload`` row is committed; in write-through mode, only after the object is in
   the bucket.
2. A dirty copy leaves the local disk only when its upload is confirmed, or when Orthanc
   deletes the attachment.
3. `start` re-queues every ``pending-upload`` and ``pending-delete`` row; files that never got
   a row (never acknowledged) were removed by `LocalTier.recover`.
4. `drain` waits for the queues up to a deadline; what is left stays journaled.
7. Objects are only ever created under the attachment's own key.

Uploads and deletes retry forever in the background (the data stays journaled); reads retry
temporary errors until `ReadTimeout`, then fail.

HybridMode adds the file-system tier (`objfs.fstier`): WriteToFileSystem writes there and reads
there first; WriteToObjectStorage writes through the write-back cache and reads the bucket
first. A delete removes both copies. A move between the tiers copies, verifies, records the
new place durably, and only then deletes the source: a crash leaves one or two good copies.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import cachetools
import trio

from objfs import codec, errors
from objfs.backends.base import Backend, ObjectInfo
from objfs.cache import LocalTier
from objfs.config import HybridMode, Settings, WriteMode
from objfs.fstier import FileSystemTier
from objfs.fsutil import fd_path, fsync_path, sha256_file
from objfs.journal import PENDING_DELETE, PENDING_UPLOAD, Journal, Row, Stats, read_stats
from objfs.keylocks import KeyedLocks
from objfs.layout import DETECT_BYTES, Layout, detect_kind
from objfs.retry import BucketHealth, RetryPolicy
from objfs.tally import Tally, error_class
from objfs.testhooks import crash_point

log = logging.getLogger(__name__)
T = TypeVar("T")

NEGATIVE_TTL = 2.0
INVENTORY_META = "inventory"
INVENTORY_COMPLETE = "complete"
FIRST_LOOK = 64 * 1024
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian
# While Orthanc writes or deletes, background requests yield the CPU to it (on a small host
# the SDK's request signing and checksums compete with ingest): at most BUSY_REQUESTS run until
# Orthanc pauses for BUSY_WINDOW seconds, or until the cache budget is half full.
BUSY_WINDOW = 0.5
BUSY_REQUESTS = 1
PROBE_INTERVAL = 5.0
BACKGROUND_RETRY = RetryPolicy(first_delay=0.5, max_delay=60.0, deadline=None, persistent=True)


@dataclass
class WriteHandle:
    """A new attachment being written. `size` is the end of the furthest write."""

    uuid: str
    fd: int
    size: int = 0
    reserved: int = 0
    dirty: bool = False
    durable: bool = False
    error: Exception | None = None  # the first failure; sync and close report it again
    unlinked: bool = False
    fs: bool = False  # written to the file-system tier (HybridMode WriteToFileSystem)
    placed: bool = False  # the fs-tier file behind `fd` has its final name


@dataclass(frozen=True)
class CacheSpace:
    """The local tier's budget as the fs layer (statfs), metrics and STATUS= show it."""

    root: Path
    capacity: int
    used: int
    evicted_files: int
    evicted_bytes: int


@dataclass
class _SharedPlain:
    """The decrypted copy of one attachment that its readers share."""

    fd: int  # the O_TMPFILE; each reader has its own fd opened on it
    readers: int
    give_back: Callable[[], None]  # its share of the cache budget


@dataclass
class _Fetch:
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None


class Store:
    """Attachment operations for the fs layer. Every method runs on the event loop."""

    def __init__(self, settings: Settings, backend: Backend, journal: Journal,
                 tier: LocalTier, tally: Tally) -> None:
        self.layout: Layout = settings.layout
        self.tally = tally
        self.backend = backend
        self.journal = journal
        self.tier = tier
        self.write_through = settings.write_mode == WriteMode.WRITE_THROUGH
        self.upload_concurrency = settings.upload_concurrency
        self.encryption = settings.encryption
        self.allow_unencrypted_reads = settings.allow_unencrypted_reads
        self.seal_local = settings.encrypt_local_cache
        # Each encryption or decryption holds one chunk in memory: bound how many run at once.
        self._crypto_limiter = trio.CapacityLimiter(
            max(1, settings.encryption.max_concurrent_input // codec.CHUNK)
            if settings.encryption else 1)
        self.read_retry = RetryPolicy(deadline=settings.read_timeout)
        # Every retried call reports here; background pauses end when the bucket is back.
        self.health = BucketHealth()
        self.writing: dict[str, WriteHandle] = {}
        self.inflight: set[str] = set()
        # Written by this process and not yet handed to an upload: they cannot be in the
        # bucket, so a delete only has to forget them locally.
        self._fresh: set[str] = set()
        # Uuids being unlinked while their journal change is committed in a worker thread:
        # an upload that starts meanwhile must not send them to the bucket.
        self._unlinking: set[str] = set()
        # True once one complete listing of the bucket is in the journal (kept across
        # restarts): from then on every attachment is known here, so an unknown name is new.
        self.inventory_done = journal.get_meta(INVENTORY_META) == INVENTORY_COMPLETE
        self._lookup_failures: cachetools.TTLCache[str, bool] = cachetools.TTLCache(4096, 600)
        self._deleted_during_inventory: set[str] = set()
        self._dirs: set[str] = set()  # known to exist: made by mkdir or seen holding files
        self._negative: cachetools.TTLCache[str, bool] = cachetools.TTLCache(65536, NEGATIVE_TTL)
        self._fetches: dict[str, _Fetch] = {}
        # Decrypted copies shared by their readers (owner: the event loop): by uuid, the
        # readers' fds, and decryptions under way.
        self._plain: dict[str, _SharedPlain] = {}
        self._plain_fds: dict[int, str] = {}
        self._plain_pending: dict[str, trio.Event] = {}
        # Unbounded on purpose: what waits here is bounded by the cache budget (dirty data
        # cannot exceed CacheSize) and an entry is one uuid.
        self._upload_send, self._upload_recv = trio.open_memory_channel[str](math.inf)
        self._delete_send, self._delete_recv = trio.open_memory_channel[str](math.inf)
        self._outstanding: set[str] = set()
        self._idle = trio.Event()
        self._idle.set()
        self._journal_limiter = trio.CapacityLimiter(4)
        self._last_foreground = -math.inf
        self._background = 0
        self.hybrid_mode = settings.hybrid_mode
        self.fs: FileSystemTier | None = None
        if settings.fs_directory is not None:
            ring = settings.encryption.ring if settings.encryption else None
            self.fs = FileSystemTier(settings.fs_directory, ring, settings.encrypt_fs_tier)
        self.fs_first = settings.hybrid_mode == HybridMode.WRITE_TO_FILE_SYSTEM
        # Per-uuid lock taken by unlink and by the tier moves, so that a delete and a move
        # of one attachment never interleave (a deleted attachment must not come back).
        self.locks = KeyedLocks()

    async def _retry(self, policy: RetryPolicy, what: str, fn: Callable[[], Awaitable[T]],
                     on_error: Callable[[errors.ObjfsError], None] | None = None) -> T:
        """`policy.call`, reporting to (and, in the background, woken by) `self.health`."""
        return await policy.call(what, fn, on_error, self.health)

    async def _j(self, fn: object, *args: object) -> None:
        """Run a journal write (it fsyncs) in a worker thread."""
        await trio.to_thread.run_sync(fn, *args, limiter=self._journal_limiter)  # type: ignore[arg-type]

    # --- lifecycle ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Upload and delete workers plus the bucket inventory; re-queues journaled work."""
        async with trio.open_nursery() as nursery:
            for _ in range(self.upload_concurrency):
                nursery.start_soon(self._upload_worker, self._upload_recv.clone())
            for _ in range(max(2, self.upload_concurrency // 2)):
                nursery.start_soon(self._delete_worker, self._delete_recv.clone())
            pending = self.journal.in_state(PENDING_UPLOAD)
            deletes = self.journal.in_state(PENDING_DELETE)
            if pending or deletes:
                log.info("resuming %d pending uploads and %d pending deletes from the journal",
                         len(pending), len(deletes))
            for row in pending:
                self._queue_upload(row.uuid)
            for row in deletes:
                self._queue_delete(row.uuid)
            nursery.start_soon(self._inventory)
            nursery.start_soon(self._watch_bucket)
            task_status.started()

    async def _watch_bucket(self) -> None:
        """While the bucket fails, ask it every PROBE_INTERVAL seconds (one cheap listing);
        its first answer ends every background pause at once."""
        while True:
            await self.health.failing.wait()
            await trio.sleep(PROBE_INTERVAL)
            try:
                await self.backend.list_page(self.layout.root_prefix(), None, 1)
            except errors.ObjfsError:
                continue
            self.health.succeeded()

    async def drain(self, timeout: float) -> bool:
        """Wait until no upload or delete is queued or running, at most `timeout` seconds.

        Returns True when everything is done; otherwise logs what stays journaled. Call it
        after unmounting: acknowledged files whose release the kernel had not yet sent are
        queued here too.
        """
        for row in self.journal.in_state(PENDING_UPLOAD):
            if row.uuid not in self._outstanding:
                self._queue_upload(row.uuid)
        with trio.move_on_after(timeout):
            await self._idle.wait()
            return True
        stats = self.journal.stats()
        log.warning("shutdown deadline (%ss) reached: %d uploads (%d bytes) and %d deletes stay "
                    "journaled and resume at the next start", timeout, stats.pending_uploads,
                    stats.pending_upload_bytes, stats.pending_deletes)
        return False

    async def stats(self) -> Stats:
        """The journal's counters, counted in a worker thread: the event loop keeps serving
        Orthanc meanwhile."""
        return await trio.to_thread.run_sync(read_stats, self.journal.path)

    def _queue_upload(self, uuid: str) -> None:
        self._track(uuid)
        self._upload_send.send_nowait(uuid)

    def _queue_delete(self, uuid: str) -> None:
        self._track(uuid)
        self._delete_send.send_nowait(uuid)

    def _track(self, uuid: str) -> None:
        self._outstanding.add(uuid)
        if self._idle.is_set():
            self._idle = trio.Event()

    def _untrack(self, uuid: str) -> None:
        self._outstanding.discard(uuid)
        if not self._outstanding:
            self._idle.set()

    # --- narrow accessors for the fs layer, metrics, the sidecar and the daemon --------------

    def write_handle(self, uuid: str) -> WriteHandle | None:
        """The open write of `uuid`, if Orthanc is writing it now."""
        return self.writing.get(uuid)

    @property
    def uploads_in_progress(self) -> int:
        return len(self.inflight)

    def cache_space(self) -> CacheSpace:
        tier = self.tier
        return CacheSpace(tier.root, tier.capacity, tier.used, tier.evicted_files,
                          tier.evicted_bytes)

    async def probe_bucket(self) -> None:
        """One cheap request (a one-key listing of the root prefix); raises what it raises."""
        await self.backend.list_page(self.layout.root_prefix(), None, 1)

    # --- lookups and directories --------------------------------------------------------------

    async def size_of(self, uuid: str) -> int | None:
        """The attachment's exact size, or None when it does not exist in any tier."""
        handle = self.writing.get(uuid)
        if handle is not None:
            return None if handle.unlinked else handle.size
        if self.fs is not None and self.fs_first:
            size = self.fs.size(uuid)
            if size is not None:
                return size
        row = await self._row(uuid)
        if row is not None:
            return row.size
        return None if self.fs is None or self.fs_first else self.fs.size(uuid)

    async def _row(self, uuid: str) -> Row | None:
        row = self.journal.get(uuid)
        if row is not None:
            return None if row.state == PENDING_DELETE else row
        if self.inventory_done or uuid in self._negative:
            return None
        return await self._find_remote(uuid)

    async def _remote_listing(self, prefix: str, limit: int) -> list[ObjectInfo]:
        """One listing for a name the journal does not know, retried up to `ReadTimeout`.

        Before the first inventory has completed only the bucket can tell a new name from an
        existing one, so a bucket that cannot answer makes this raise `Unavailable` (EIO),
        never answer "absent": Orthanc would serve HTTP 500 for an existing attachment, and
        its delete would skip the unlink and leak the object (docs/durability.md, invariant 9).
        """
        try:
            page, _ = await self._retry(
                self.read_retry, f"look up {prefix}",
                lambda: self.backend.list_page(prefix, None, limit))
        except errors.Unavailable as exc:
            if prefix not in self._lookup_failures:
                self._lookup_failures[prefix] = True
                log.warning("cannot tell whether %s exists: the bucket did not answer (%s); "
                            "answering EIO until it does", prefix, exc)
            raise
        return page

    async def _find_remote(self, uuid: str) -> Row | None:
        found = await self._locate(uuid)
        if found is None:
            self._negative[uuid] = True
            return None
        key, size = found
        await self._j(self.journal.add_remote, [(uuid, key, await self._plain_size(key, size))])
        return self.journal.get(uuid)

    async def _locate(self, uuid: str) -> tuple[str, int] | None:
        """The attachment's object key and stored size, by one prefix listing."""
        page = await self._remote_listing(self.layout.lookup_prefix(uuid), 16)
        key = self.layout.choose_key(uuid, [o.key for o in page],
                                     prefer_encrypted=self.encryption is not None)
        return None if key is None else (key, next(o.size for o in page if o.key == key))

    async def _plain_size(self, key: str, stored: int) -> int:
        """The attachment's size from its object's: flat names say whether it is encrypted;
        legacy names do not, so with encryption on the header is read (2 bytes)."""
        info = self.layout.parse_key(key)
        encrypted = info.encrypted if info is not None else None
        if encrypted is None and self.encryption is not None:
            probe = self.tier.tmp_path("header", "probe")
            try:
                await self._retry(self.read_retry, f"read header of {key}",
                                  lambda: self.backend.get(key, probe, 0, 2))
                encrypted = codec.is_encrypted(probe.read_bytes())
            finally:
                probe.unlink(missing_ok=True)
        return codec.plaintext_size(stored) if encrypted else stored

    async def dir_exists(self, name: str) -> bool:
        """Whether Orthanc directory `name` ("ab" or "abcd") exists: made by mkdir since the
        daemon started, or holding an attachment. Empty directories are not kept across
        restarts (a bucket has none); Orthanc makes them again as it needs them."""
        if name in self._dirs:
            return True
        if self._has_files(name):
            self._dirs.add(name)
            return True
        if self.fs is not None and self.fs.has_dir(name):
            return True
        if self.inventory_done or name in self._negative:
            return False
        if await self._remote_listing(self.layout.dir_prefix(name), 1):
            self._dirs.add(name)
            return True
        self._negative[name] = True
        return False

    def _has_files(self, prefix: str) -> bool:
        return self.journal.has_children(prefix) or any(
            u.startswith(prefix) and not h.unlinked for u, h in self.writing.items()) or (
            self.fs is not None and self.fs.has_files(prefix))

    def _in_fs_dirs(self, name: str) -> bool:
        return self.fs is not None and self.fs.has_dir(name)

    def make_dir(self, name: str) -> None:
        """mkdir: EEXIST when the directory exists (the kernel asked `dir_exists` just before,
        so no second look in the bucket)."""
        if name in self._dirs or self._has_files(name) or self._in_fs_dirs(name):
            raise OSError(errno.EEXIST, f"{name} exists")
        self._dirs.add(name)

    def remove_dir(self, name: str) -> None:
        in_fs = self._in_fs_dirs(name)
        if name not in self._dirs and not in_fs and not self._has_files(name):
            raise errors.NotFound(name)
        if self._has_files(name) or (len(name) == 2 and any(
                name + f"{i:02x}" in self._dirs for i in range(256))):
            raise OSError(errno.ENOTEMPTY, f"{name} is not empty")
        if in_fs:
            assert self.fs is not None
            self.fs.remove_dir(name)
        self._dirs.discard(name)

    def list_dir(self, name: str) -> list[str]:
        """Children of root (""), a first-level or a second-level directory, as known locally."""
        if len(name) == 4:
            found = set(self.journal.children(name))
            found.update(u for u, h in self.writing.items()
                         if u.startswith(name) and not h.unlinked)
            if self.fs is not None:
                found.update(self.fs.children(name))
            return sorted(found)
        return [d for d in (f"{i:02x}" for i in range(256))
                if any(k.startswith(name + d) for k in self._dirs) or self._has_files(name + d)
                or self._in_fs_dirs(name + d)]

    # --- writing ------------------------------------------------------------------------------

    async def create(self, uuid: str) -> WriteHandle:
        """Start a new attachment. Raises Immutable when it exists already."""
        if await self.size_of(uuid) is not None:
            raise errors.Immutable(f"attachment {uuid} exists; attachments are write-once")
        if self.fs is not None and self.fs_first:
            fd = os.open(self.fs.partial_path(uuid), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            handle = WriteHandle(uuid, fd, fs=True)
        else:
            fd = os.open(self.tier.path(uuid), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            handle = WriteHandle(uuid, fd)
            self._fresh.add(uuid)
        self.writing[uuid] = handle
        self._negative.pop(uuid, None)
        self.tier.opened(uuid)
        return handle

    async def write(self, handle: WriteHandle, offset: int, data: bytes) -> int:
        """Write into the local copy, taking cache budget first (may wait, then CacheFull);
        the file-system tier has no budget."""
        self._last_foreground = trio.current_time()
        end = offset + len(data)
        if end > handle.reserved and not handle.fs:
            try:
                await self.tier.reserve(end - handle.reserved)
            except errors.CacheFull as exc:
                handle.error = exc
                raise
            handle.reserved = end
        try:
            written = os.pwrite(handle.fd, data, offset)
        except OSError as exc:
            handle.error = exc
            raise
        handle.size = max(handle.size, offset + written)
        handle.dirty = True
        return written

    async def truncate(self, handle: WriteHandle, size: int) -> None:
        if size > handle.reserved and not handle.fs:
            await self.tier.reserve(size - handle.reserved)
            handle.reserved = size
        os.ftruncate(handle.fd, size)
        handle.size = size
        handle.dirty = True

    async def sync(self, handle: WriteHandle) -> None:
        """Make what was written durable (fsync/flush). Errors here reach Orthanc's close()."""
        if handle.error is not None:
            raise handle.error
        if handle.unlinked or (handle.durable and not handle.dirty):
            return
        handle.dirty = False
        if handle.fs:
            assert self.fs is not None
            try:
                handle.placed = await trio.to_thread.run_sync(
                    self.fs.commit, handle.fd, handle.uuid, handle.placed,
                    limiter=self._journal_limiter)
            except Exception as exc:
                handle.error = exc
                raise
            handle.durable = True
            return
        try:
            await trio.to_thread.run_sync(self._make_durable, handle.fd, handle.uuid, handle.size,
                                          limiter=self._journal_limiter)
        except Exception as exc:
            handle.error = exc
            raise
        handle.durable = True
        if self.write_through:
            try:
                await self._upload(handle.uuid, self.read_retry)
            except Exception as exc:
                handle.error = exc
                raise

    def _make_durable(self, fd: int, uuid: str, size: int) -> None:
        """Runs in a worker thread. With EncryptLocalCache the complete file is sealed (A1,
        exactly the object to upload) and replaces the plaintext before the row commits."""
        os.fdatasync(fd)
        crash_point("after-data-fsync")
        if not self.seal_local:
            self.journal.put_pending(uuid, size)
            crash_point("after-journal-commit")
            return
        assert self.encryption is not None
        key = self._choose_key(uuid, size, fd_path(fd))
        sealed = self.tier.tmp_path(uuid, "seal")
        codec.encrypt_file(fd_path(fd), sealed, self.encryption.ring)
        fsync_path(sealed)
        os.replace(sealed, self.tier.path(uuid))
        fsync_path(self.tier.data)  # the rename must be durable before the row says sealed
        self.journal.put_pending(uuid, size, key, sealed=True)

    async def close_write(self, handle: WriteHandle) -> bool:
        """Release a write handle: queue the upload, or discard a write that failed.

        Returns False when the file was discarded (the caller drops the kernel's entry).
        """
        os.close(handle.fd)
        self.writing.pop(handle.uuid, None)
        self.tier.closed(handle.uuid)
        if handle.fs:
            return await self._close_fs_write(handle)
        if handle.error is not None or handle.unlinked or not handle.durable:
            if not handle.unlinked:
                log.warning("attachment %s: discarding a write that was not acknowledged",
                            handle.uuid)
            self._fresh.discard(handle.uuid)
            await self._discard_local(handle.uuid, handle.reserved)
            return False
        self.tier.release(handle.reserved - handle.size)
        row = self.journal.get(handle.uuid)
        if row is not None and row.state == PENDING_UPLOAD:
            self._queue_upload(handle.uuid)
        return True

    async def _close_fs_write(self, handle: WriteHandle) -> bool:
        assert self.fs is not None
        fs = self.fs
        keep = handle.error is None and not handle.unlinked and handle.durable
        if not keep and not handle.unlinked:
            log.warning("attachment %s: discarding a write that was not acknowledged",
                        handle.uuid)

        def finish() -> None:
            fs.discard_partial(handle.uuid)
            if not keep and handle.durable:
                fs.remove(handle.uuid)

        await trio.to_thread.run_sync(finish)
        return keep

    async def _discard_local(self, uuid: str, size: int) -> None:
        self.tier.path(uuid).unlink(missing_ok=True)
        self.tier.release(size)
        if self.journal.get(uuid) is not None:
            await self._j(self.journal.remove, uuid)

    # --- reading ------------------------------------------------------------------------------

    async def open_read(self, uuid: str, objects_only: bool = False) -> int:
        """An fd on a complete local copy, fetching (and verifying) it first if needed; in
        HybridMode the file-system tier is tried first or last (unless `objects_only`).

        Every failure surfaces here (Orthanc ignores read errors): NotFound, Unavailable
        after `ReadTimeout`, Corrupt, CacheFull. Callers must `close_read` the uuid.
        """
        fs = None if objects_only else self.fs
        self.tier.opened(uuid)
        try:
            while True:
                handle = self.writing.get(uuid)
                if handle is not None:  # its own (plaintext) file, even if sealed meanwhile
                    return os.open(fd_path(handle.fd), os.O_RDONLY)
                if fs is not None and self.fs_first:
                    fd = await self._open_fs(uuid)
                    if fd is not None:
                        return fd
                row = await self._row(uuid)
                if row is None:
                    if fs is not None and not self.fs_first:
                        fd = await self._open_fs(uuid)
                        if fd is not None:
                            return fd
                    raise errors.NotFound(f"attachment {uuid}")
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
                await self._fetch(row)
        except BaseException:
            self.tier.closed(uuid)
            raise

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
        return fd

    async def _open_fs(self, uuid: str) -> int | None:
        """An fd on the file-system tier's plaintext of `uuid` (decrypted into an O_TMPFILE
        when the file is A1), or None when the file is not there. Raises Corrupt."""
        assert self.fs is not None
        path = self.fs.path(uuid)
        try:
            if not self.fs.encrypted(uuid):
                return os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            return await self._shared_plain(uuid, path, None)
        except FileNotFoundError:
            return None
        except errors.Corrupt as exc:
            log.error("attachment %s: cannot read %s: %s", uuid, path, exc)
            raise

    async def _unseal(self, row: Row) -> int:
        """An fd on the decrypted, verified copy of a sealed local file."""
        return await self._shared_plain(row.uuid, self.tier.path(row.uuid), row.size)

    async def _shared_plain(self, uuid: str, source: Path, size: int | None) -> int:
        """A reader's fd on the plaintext of A1 file `source`: one decrypted copy per
        attachment (an O_TMPFILE, never linked into a directory, counted in the cache budget
        by `take_scratch`), shared by every reader that has it open and freed when the last
        one closes. Raises Corrupt (authentication failed, or not `size` bytes),
        FileNotFoundError."""
        while (pending := self._plain_pending.get(uuid)) is not None:
            await pending.wait()
        shared = self._plain.get(uuid)
        if shared is None:
            assert self.encryption is not None
            done = self._plain_pending[uuid] = trio.Event()
            try:
                shared = await self._decrypt_shared(source, size)
                self._plain[uuid] = shared
            finally:
                del self._plain_pending[uuid]
                done.set()
        fd = os.open(fd_path(shared.fd), os.O_RDONLY)
        shared.readers += 1
        self._plain_fds[fd] = uuid
        return fd

    async def _decrypt_shared(self, source: Path, size: int | None) -> _SharedPlain:
        assert self.encryption is not None
        expected = size if size is not None else max(0, source.stat().st_size - codec.OVERHEAD)
        give_back = await self.tier.take_scratch(expected)
        fd = -1
        try:
            fd = os.open(self.tier.tmp, os.O_TMPFILE | os.O_RDWR, 0o600)
            async with self._crypto_limiter:
                await trio.to_thread.run_sync(codec.decrypt_file, source, fd_path(fd),
                                              self.encryption.ring)
            got = os.fstat(fd).st_size
            if size is not None and got != size:
                raise errors.Corrupt(f"{got} bytes, expected {size}")
        except BaseException:
            if fd >= 0:
                os.close(fd)
            give_back()
            raise
        return _SharedPlain(fd, 0, give_back)

    def close_read(self, uuid: str, fd: int) -> None:
        os.close(fd)
        self.tier.closed(uuid)
        shared_uuid = self._plain_fds.pop(fd, None)
        if shared_uuid is not None:
            shared = self._plain[shared_uuid]
            shared.readers -= 1
            if shared.readers == 0:
                del self._plain[shared_uuid]
                os.close(shared.fd)
                shared.give_back()

    async def _fetch(self, row: Row) -> None:
        """Download `row` once however many readers ask at the same time; raises what the
        download raised. A download cancelled in its own task (its reader gave up) is not an
        error for the others: the next waiter downloads it itself, so another task's
        `trio.Cancelled` never escapes into a FUSE handler."""
        while (running := self._fetches.get(row.uuid)) is not None:
            await running.done.wait()
            if running.error is None:
                return
            if isinstance(running.error, Exception):
                raise running.error
        fetch = self._fetches[row.uuid] = _Fetch()
        try:
            await self._download(row)
        except BaseException as exc:
            fetch.error = exc
            raise
        finally:
            fetch.done.set()
            del self._fetches[row.uuid]

    async def _download(self, row: Row) -> None:
        """Fetch, decrypt and verify an object into the local tier; the copy appears only
        when every check passed."""
        assert row.key is not None
        key = row.key
        await self.tier.reserve(row.size)
        tmp = self.tier.tmp_path(row.uuid, "download")
        plain = self.tier.tmp_path(row.uuid, "plain")
        # With encryption the fetched ciphertext and its plaintext coexist for a moment.
        give_back: Callable[[], None] = lambda: None  # noqa: E731 - a no-op by default
        if self.encryption is not None:
            try:
                give_back = await self.tier.take_scratch(row.size + codec.OVERHEAD)
            except BaseException:
                self.tier.release(row.size)
                raise
        try:
            try:
                await self._retry(self.read_retry, f"download {key}",
                                  lambda: self.backend.get(key, tmp))
            except errors.NotFound:
                # Renamed since we learnt its key (re-encrypted by `objfs rekey`, or rewritten
                # by the plugin): one listing finds the current name.
                found = await self._locate(row.uuid)
                if found is None or found[0] == key:
                    raise
                key = found[0]
                await self._j(self.journal.set_key, row.uuid, key)
                await self._retry(self.read_retry, f"download {key}",
                                  lambda: self.backend.get(key, tmp))
            crash_point("mid-download")
            source = await self._decode(key, tmp, plain)
            got = source.stat().st_size
            if got != row.size:
                raise errors.Corrupt(f"{got} bytes, expected {row.size}")
            if self.seal_local:
                source = await self._seal(source, tmp, plain)
            # Durable before it is marked cached: after a power loss a cached row never
            # points at a short file (recovery also checks sizes).
            await trio.to_thread.run_sync(fsync_path, source)
            current = self.journal.get(row.uuid)
            deleted = current is None or current.state == PENDING_DELETE
            if not deleted:  # no await since the check: atomic on the event loop
                os.replace(source, self.tier.path(row.uuid))
        except errors.NotFound:
            log.error("attachment %s: object %s is missing from the bucket", row.uuid, key)
            self.tier.release(row.size)
            raise
        except BaseException as exc:
            if isinstance(exc, errors.ObjfsError):
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
        await self._j(self.journal.set_cached, row.uuid, True, self.seal_local)

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
        with open(fetched, "rb") as f:
            head = f.read(2)
        info = self.layout.parse_key(key)
        encrypted = info.encrypted if info is not None and info.encrypted is not None \
            else codec.is_encrypted(head)
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

    # --- deleting -----------------------------------------------------------------------------

    async def unlink(self, uuid: str) -> None:
        """Delete an attachment everywhere (both tiers in HybridMode). Readers that have it
        open keep reading. Raises NotFound when no tier has it."""
        handle = self.writing.get(uuid)
        if handle is not None:
            handle.unlinked = True
            return
        async with self.locks.hold(uuid):
            await self._unlink_locked(uuid)

    async def _unlink_locked(self, uuid: str) -> None:
        in_fs = self.fs is not None and self.fs.stat(uuid) is not None
        row = await self._row(uuid)
        if row is None and not in_fs:
            raise errors.NotFound(f"attachment {uuid}")
        self._last_foreground = trio.current_time()
        if in_fs:
            assert self.fs is not None
            await trio.to_thread.run_sync(self.fs.remove, uuid, limiter=self._journal_limiter)
        if row is not None:
            await self._forget_object(uuid, row)

    async def _forget_object(self, uuid: str, row: Row, queue: bool = True) -> None:
        """Delete the bucket side of an attachment: durably journaled, the object's delete
        queued (unless `queue` is False: the caller deletes it), the local copy removed."""
        self._negative[uuid] = True
        if not self.inventory_done:
            self._deleted_during_inventory.add(uuid)
        self._unlinking.add(uuid)
        try:
            if row.state == PENDING_UPLOAD and uuid in self._fresh:
                # Never sent to the bucket: forgetting it locally is the whole delete.
                await self._j(self.journal.remove, uuid)
            else:
                await self._j(self.journal.mark_pending_delete, uuid)
                crash_point("after-delete-journaled")
                if uuid not in self.inflight and queue:
                    self._queue_delete(uuid)
        finally:
            self._unlinking.discard(uuid)
            self._fresh.discard(uuid)
        # Decided now, not from `row` (read before the awaits above): eviction may have
        # removed the copy meanwhile, and its space must be given back exactly once.
        self._drop_local(uuid, row.size)

    def _drop_local(self, uuid: str, size: int) -> None:
        """Remove the local copy of `uuid` if there is one and give back its budget (no
        await between the check and the release: atomic on the event loop)."""
        path = self.tier.path(uuid)
        if path.exists():
            path.unlink()
            self.tier.release(size)

    # --- moving between tiers (HybridMode) ----------------------------------------------------

    def _require_fs(self) -> FileSystemTier:
        if self.fs is None:
            raise errors.ConfigError("HybridMode is Disabled: there is no file-system tier")
        return self.fs

    async def move_to_object_storage(self, uuid: str) -> bool:
        """Move an attachment from the file-system tier to the bucket: upload its bytes (the
        A1 file as it is when encryption is on, else encrypted now), read the object back and
        compare checksums, journal it durably, then delete the file. Returns False when it
        was already in the bucket only. Raises NotFound (neither tier), Corrupt, Unavailable
        (after ReadTimeout); on any failure both copies are left as they were."""
        fs = self._require_fs()
        async with self.locks.hold(uuid):
            while uuid in self.writing:  # Orthanc is closing it: moments away
                await trio.sleep(0.05)
            if fs.stat(uuid) is None:
                if await self._row(uuid) is not None:
                    return False
                raise errors.NotFound(f"attachment {uuid} is in neither tier")
            names = [self.tier.tmp_path(uuid, f"move-{n}") for n in ("plain", "body", "check")]
            plain, body, check = names
            try:
                source = fs.path(uuid)
                encrypted = fs.encrypted(uuid)
                if encrypted:
                    assert self.encryption is not None
                    async with self._crypto_limiter:  # also verifies the file's tag
                        await trio.to_thread.run_sync(codec.decrypt_file, source, plain,
                                                      self.encryption.ring)
                upload = source
                if self.encryption is not None and not encrypted:
                    async with self._crypto_limiter:
                        await trio.to_thread.run_sync(codec.encrypt_file, source, body,
                                                      self.encryption.ring)
                    upload = body
                plaintext = plain if encrypted else source
                size = plaintext.stat().st_size
                key = self._choose_key(uuid, size, plaintext)
                expected = await trio.to_thread.run_sync(sha256_file, upload)
                await self._retry(self.read_retry, f"upload {key}",
                                  lambda: self.backend.put(key, upload))
                await self._retry(self.read_retry, f"read back {key}",
                                  lambda: self.backend.get(key, check))
                got = await trio.to_thread.run_sync(sha256_file, check)
                if got != expected:
                    raise errors.Corrupt(f"object {key} does not read back as uploaded ({got[0]} "
                                         f"bytes, expected {expected[0]})")
                crash_point("mid-move-to-bucket")
                old = self.journal.get(uuid)
                await self._j(self.journal.put_uploaded, uuid, key, size)
                if old is not None and old.cached:
                    self.tier.path(uuid).unlink(missing_ok=True)
                    self.tier.release(old.size)
                self._negative.pop(uuid, None)
                await trio.to_thread.run_sync(fs.remove, uuid, True)
            finally:
                for name in names:
                    name.unlink(missing_ok=True)
        return True

    async def move_to_file_system(self, uuid: str) -> bool:
        """Move an attachment from the bucket to the file-system tier: write the plaintext
        (encrypted when EncryptFileSystemTier) durably, read it back and compare checksums,
        then delete the object. Returns False when it was already in the file-system tier
        only. Raises like `move_to_object_storage`; a failure leaves both copies."""
        fs = self._require_fs()
        async with self.locks.hold(uuid):
            row = await self._row(uuid)
            if row is None:
                if fs.stat(uuid) is not None:
                    return False
                raise errors.NotFound(f"attachment {uuid} is in neither tier")
            fd = await self.open_read(uuid, objects_only=True)
            try:
                await trio.to_thread.run_sync(fs.write_copy, fd_path(fd), uuid)
                crash_point("mid-move-to-fs")
            finally:
                self.close_read(uuid, fd)
            while uuid in self.inflight:  # an upload of it is running: let it settle first
                await trio.sleep(0.05)
            row = self.journal.get(uuid)
            if row is None or row.state == PENDING_DELETE:
                return True
            await self._forget_object(uuid, row, queue=False)
            try:
                await self._delete_remote(uuid, self.read_retry)
            except errors.ObjfsError as exc:
                log.warning("attachment %s is in the file-system tier; deleting its object "
                            "failed (%s) and is retried in the background", uuid, exc)
                self._queue_delete(uuid)
            except BaseException:
                self._queue_delete(uuid)
                raise
        return True

    def placement(self, uuid: str) -> dict[str, object] | None:
        """Where an attachment is, for the REST API; None when no tier has it."""
        facts: dict[str, object] = {"Uuid": uuid}
        handle = self.writing.get(uuid)
        if handle is not None and not handle.unlinked:
            facts["BeingWritten"] = True
            facts["Size"] = handle.size
        if self.fs is not None:
            st = self.fs.stat(uuid)
            try:
                if st is not None:
                    facts["FileSystem"] = {"Path": str(self.fs.path(uuid)),
                                           "StoredSize": st.st_size,
                                           "Encrypted": self.fs.encrypted(uuid)}
                    facts["Size"] = self.fs.size(uuid)
            except FileNotFoundError:  # moved or deleted this very moment
                facts.pop("FileSystem", None)
        row = self.journal.get(uuid)
        if row is not None and row.state != PENDING_DELETE:
            facts["ObjectStorage"] = {"Key": row.key, "Uploaded": row.state != PENDING_UPLOAD,
                                      "PendingUpload": row.state == PENDING_UPLOAD,
                                      "Cached": row.cached, "LastError": row.last_error}
            facts["Size"] = row.size
        return facts if len(facts) > 1 else None

    # --- background work ----------------------------------------------------------------------

    async def _upload_worker(self, receive: trio.MemoryReceiveChannel[str]) -> None:
        async with receive:
            async for uuid in receive:
                try:
                    async with self._turn():
                        await self._upload(uuid, BACKGROUND_RETRY)
                except Exception:
                    log.exception("upload of attachment %s failed; it stays journaled and is "
                                  "retried at the next start", uuid)
                finally:
                    self._untrack(uuid)

    @contextlib.asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        """A background request's turn; Orthanc's own requests come first (BUSY_WINDOW)."""
        while self._background >= BUSY_REQUESTS \
                and trio.current_time() - self._last_foreground < BUSY_WINDOW \
                and self.tier.used < self.tier.capacity // 2:
            await trio.sleep(BUSY_WINDOW / 5)
        self._background += 1
        try:
            yield
        finally:
            self._background -= 1

    async def _upload(self, uuid: str, policy: RetryPolicy) -> None:
        row = self.journal.get(uuid)
        if row is None or row.state != PENDING_UPLOAD or uuid in self._unlinking:
            return
        self.inflight.add(uuid)
        self._fresh.discard(uuid)
        try:
            if not self.tier.path(uuid).exists():
                lost = row
                adopted = await self._retry(policy, f"look up {uuid}",
                                            lambda: self._adopt_uploaded(lost))
                if not adopted:
                    log.error("attachment %s: its acknowledged local copy is missing and the "
                              "bucket has no complete object: data lost", uuid)
                    self.journal.set_error(uuid, "local copy missing, not in the bucket")
                return
            key = row.key or self._choose_key(uuid, row.size)
            path = self.tier.path(uuid)
            sealed = self.tier.tmp_path(uuid, "enc")
            give_back: Callable[[], None] = lambda: None  # noqa: E731 - a no-op by default
            if self.encryption is not None and not row.sealed:
                give_back = await self.tier.take_scratch(row.size + codec.OVERHEAD)
                try:
                    async with self._crypto_limiter:
                        await trio.to_thread.run_sync(codec.encrypt_file, path, sealed,
                                                      self.encryption.ring)
                except BaseException:
                    sealed.unlink(missing_ok=True)
                    give_back()
                    raise
                path = sealed

            async def put() -> None:
                current = self.journal.get(uuid)
                if current is None or current.state != PENDING_UPLOAD \
                        or uuid in self._unlinking:
                    return  # deleted meanwhile: nothing to upload
                await self.backend.put(key, path)

            def record(exc: errors.ObjfsError) -> None:
                self.tally.upload_errors[error_class(exc)] += 1
                self.journal.set_error(uuid, str(exc))

            try:
                await self._retry(policy, f"upload {key}", put, record)
                crash_point("after-put")
            finally:
                sealed.unlink(missing_ok=True)
                give_back()
        finally:
            self.inflight.discard(uuid)
        row = self.journal.get(uuid)
        if row is not None and row.state == PENDING_DELETE:
            await self._j(self.journal.set_key, uuid, key)
            self._queue_delete(uuid)
        elif row is not None:
            await self._j(self.journal.mark_uploaded, uuid, key)
            self.tally.uploads += 1
            self.tier.space_changed()

    def _choose_key(self, uuid: str, size: int, source: Path | None = None) -> str:
        """Name the object from the first bytes of its plaintext (a local page-cache read,
        done inline).

        The name is journaled only with the upload's success: a row without one that was
        not written by this process may have reached the bucket, and a delete then lists it.
        """
        with open(source or self.tier.path(uuid), "rb") as f:
            head = f.read(FIRST_LOOK)
            if len(head) == FIRST_LOOK and PIXEL_DATA_TAG not in head:
                head += f.read(DETECT_BYTES - FIRST_LOOK)  # a long header, or compressed
        return self.layout.object_key(uuid, detect_kind(head, size),
                                      encrypted=self.encryption is not None)

    async def _delete_worker(self, receive: trio.MemoryReceiveChannel[str]) -> None:
        async with receive:
            async for uuid in receive:
                try:
                    async with self._turn():
                        await self._delete_remote(uuid)
                except Exception:
                    log.exception("delete of attachment %s failed; it stays journaled and is "
                                  "retried at the next start", uuid)
                finally:
                    self._untrack(uuid)

    async def _delete_remote(self, uuid: str, policy: RetryPolicy = BACKGROUND_RETRY) -> None:
        row = self.journal.get(uuid)
        if row is None or row.state != PENDING_DELETE or uuid in self.inflight:
            return
        # Every object of the uuid, not only the journaled key: `objfs rekey` renames X.dcm to
        # X.dcm.enc, and a plugin may have written a sibling (.dcm.head, .json).
        prefix = self.layout.lookup_prefix(uuid)
        page, _ = await self._retry(
            policy, f"list {prefix}", lambda: self.backend.list_page(prefix, None, 16))
        keys = {o.key for o in page if (info := self.layout.parse_key(o.key))
                and info.uuid == uuid}
        if row.key is not None:
            keys.add(row.key)
        for key in sorted(keys):
            await self._retry(policy, f"delete {key}", functools.partial(self.backend.delete, key))
            crash_point("after-object-delete")
        await self._j(self.journal.remove, uuid)

    async def _inventory(self) -> None:
        """List the bucket once so lookups never need the network afterwards.

        Until it finishes (or if it cannot), names the journal does not know are looked up
        in the bucket.
        """
        if self.inventory_done:
            log.info("the journal holds a complete inventory of the bucket: unknown names are "
                     "new")
            return
        prefix = self.layout.root_prefix()
        count, skipped = 0, 0
        token: str | None = None
        try:
            while True:
                page, token = await self._retry(
                    BACKGROUND_RETRY, f"inventory of {prefix or 'the bucket'}",
                    functools.partial(self.backend.list_page, prefix, token, 1000))
                batch = []
                for info in page:
                    parsed = self.layout.parse_key(info.key)
                    if parsed is None or parsed.uuid in self._deleted_during_inventory \
                            or self.journal.get(parsed.uuid) is not None:
                        continue
                    try:
                        size = await self._plain_size(info.key, info.size)
                    except errors.ObjfsError as exc:
                        log.error("inventory: cannot size %s (%s); it is looked up again "
                                  "when Orthanc asks for it", info.key, exc)
                        skipped += 1
                        continue
                    batch.append((parsed.uuid, info.key, size))
                if batch:
                    await self._j(self.journal.add_remote, batch)
                    count += len(batch)
                if token is None:
                    break
        except Exception:
            log.exception("inventory of the bucket failed; unknown names will be looked up in "
                          "the bucket")
            return
        self._deleted_during_inventory.clear()
        if skipped:
            log.warning("inventory: %d objects could not be sized", skipped)
            return
        await self._j(self.journal.set_meta, INVENTORY_META, INVENTORY_COMPLETE)
        self.inventory_done = True
        log.info("inventory complete: %d attachments found in the bucket under %r", count,
                 prefix)


# --- bucket identity ---------------------------------------------------------------------------


def check_bucket_identity(journal: Journal, identity: str, tier_root: Path) -> None:
    """Refuse a cache directory that holds unfinished work for another bucket or layout.

    A cache that only holds clean copies of another bucket is reset instead.
    """
    known = journal.get_meta("bucket")
    if known == identity:
        return
    if known is not None:
        stats = journal.stats()
        if stats.pending_uploads or stats.pending_deletes:
            raise errors.ConfigError(
                f"cache directory {tier_root} holds {stats.pending_uploads} pending uploads and "
                f"{stats.pending_deletes} pending deletes for {known!r}, not {identity!r}; "
                "mount it with its former configuration until they finish")
        log.warning("cache directory %s was used for %r; forgetting its clean copies",
                    tier_root, known)
        journal.forget_all_clean()
        journal.set_meta(INVENTORY_META, "")  # it listed the other bucket
    journal.set_meta("bucket", identity)
