"""The store's shared state, its narrow accessors, and the helpers every part uses."""

from __future__ import annotations

import collections
import functools
import logging
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

import cachetools
import trio

from objfs import codec, errors
from objfs.backends.base import Backend
from objfs.cache import LocalTier
from objfs.config import HybridMode, Settings, WriteMode
from objfs.cpuload import IdleCpus
from objfs.fstier import FileSystemTier
from objfs.journal import Journal, Stats, read_stats
from objfs.keylocks import KeyedLocks
from objfs.layout import DETECT_BYTES, Layout, detect_kind
from objfs.retry import BucketHealth, RetryPolicy
from objfs.store.state import (
    BUSY_WINDOW,
    DISK_FULL_PAUSE,
    FIRST_LOOK,
    INVENTORY_COMPLETE,
    INVENTORY_META,
    KEPT_APPLY_SOON,
    KERNEL_ABSENT_TTL,
    NEGATIVE_TTL,
    PIXEL_DATA_TAG,
    SHARED_CONFIRM_TTL,
    SHARED_NEGATIVE_TTL,
    CacheSpace,
    DeleteRecord,
    FetchRecord,
    PlainKey,
    SharedPlain,
    T,
    WriteHandle,
)
from objfs.store.uploads import LargestFirst
from objfs.tally import Tally

log = logging.getLogger(__name__)


class _Outcome(Protocol):
    """What `trio.lowlevel.start_thread_soon` hands back (an `outcome.Outcome`)."""

    def unwrap(self) -> None: ...


async def thread_meanwhile(fn: Callable[[], None], meanwhile: Callable[[], None],
                           limiter: trio.CapacityLimiter) -> None:
    """Run `fn` in a worker thread (holding a token of `limiter`) and, at the same time,
    `meanwhile` on the event loop: for a journal commit, which mostly waits for the disk,
    and loop work that Orthanc's request waits for as well. `fn` runs to its end even if
    `meanwhile` raises or the caller is cancelled; then `fn`'s exception is raised, else the
    one `meanwhile` raised."""
    async with limiter:
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        result: list[_Outcome] = []

        def deliver(got: _Outcome) -> None:
            result.append(got)
            token.run_sync_soon(done.set)

        trio.lowlevel.start_thread_soon(fn, deliver)
        try:
            meanwhile()
        finally:
            with trio.CancelScope(shield=True):
                await done.wait()
            result[0].unwrap()


class StoreCore:
    """State shared by the parts of the store; every method runs on the event loop."""

    def __init__(self, settings: Settings, backend: Backend, journal: Journal,
                 tier: LocalTier, tally: Tally,
                 idle_cpus: Callable[[], float | None] | None = None) -> None:
        self.layout: Layout = settings.layout
        self.tally = tally
        self.backend = backend
        self.journal = journal
        self.tier = tier
        tier.unsent = self._unsent_total
        self.write_through = settings.write_mode == WriteMode.WRITE_THROUGH
        self.upload_concurrency = settings.upload_concurrency
        self.background_hold = settings.background_hold
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
        # Uploads running, each with the Event set when it settles (owner: the upload).
        self.inflight: dict[str, trio.Event] = {}
        # Written by this process and not yet handed to an upload: they cannot be in the
        # bucket, so a delete only has to forget them locally.
        self._fresh: set[str] = set()
        # Uuids being unlinked while their journal change is committed in a worker thread:
        # an upload that starts meanwhile must not send them to the bucket.
        self._unlinking: set[str] = set()
        # Set when a put or a delete was logged in the intent log; `_checkpoint_log` (its one
        # waiter) replaces it with a fresh Event before it empties the log.
        self._intents_logged = trio.Event()
        # Set when a download kept its cache flag in memory or an upload its end
        # (`Journal.cached_later`, `uploaded_later`); `_kept_due` when those should be
        # committed at once. `Fetch._record_kept` (their one waiter) replaces both with fresh
        # Events before it commits them.
        self._kept_changes = trio.Event()
        self._kept_due = trio.Event()
        # Whether deletes use the intent log, and how many of its writes in a row were slow
        # (SLOW_LOG_WRITE); owner: `Writeback._log_delete`, on the event loop.
        self._log_deletes = True
        self._slow_log_writes = 0
        # The moving average of syncs' seconds (fdatasync and journal commit), which decides
        # whether a lone small one runs on the event loop (`Writeback._inline_syncs`); owner:
        # `Writeback.sync`, on the event loop.
        self._sync_seconds = 0.0
        # Set once the bucket refused a batch delete: deletes go one object at a time.
        self._no_batch_delete = False
        # Held by the one delete worker gathering a batch (`_gather`).
        self._delete_gathering = trio.Lock()
        # True once one complete listing of the bucket is in the journal (kept across
        # restarts): from then on every attachment is known here, so an unknown name is new.
        # With SharedBucket other nodes change the bucket: no listing stays true, lookups of
        # unknown names always ask the bucket, and known copies are confirmed (`_confirmed`).
        self.shared = settings.shared_bucket
        # Seconds the kernel may keep an "absent" lookup answer (KERNEL_ABSENT_TTL; 0: never).
        self.kernel_absent_ttl = 0.0 if self.shared else KERNEL_ABSENT_TTL
        self.inventory_done = not self.shared and \
            journal.get_meta(INVENTORY_META) == INVENTORY_COMPLETE
        self._lookup_failures: cachetools.TTLCache[str, bool] = cachetools.TTLCache(4096, 600)
        self._deleted_during_inventory: set[str] = set()
        self._dirs: set[str] = set()  # known to exist: made by mkdir or seen holding files
        # Trio's clock (used only on the event loop): tests run these bounds on a mock clock.
        self._negative: cachetools.TTLCache[str, bool] = cachetools.TTLCache(
            65536, SHARED_NEGATIVE_TTL if self.shared else NEGATIVE_TTL, timer=trio.current_time)
        # SharedBucket HybridMode: uuids found in neither tier by looks that no move of
        # another node can have crossed (`Names._found_on_second_look`), for
        # SHARED_NEGATIVE_TTL. `_negative` says only that the bucket had no object.
        self._absent: cachetools.TTLCache[str, bool] = cachetools.TTLCache(
            65536, SHARED_NEGATIVE_TTL, timer=trio.current_time)
        # SharedBucket: uuids whose object the bucket showed within SHARED_CONFIRM_TTL.
        self._confirmed: cachetools.TTLCache[str, bool] = cachetools.TTLCache(
            65536, SHARED_CONFIRM_TTL, timer=trio.current_time)
        self._fetches: dict[str, FetchRecord] = {}
        # Series prefetch stays off until this time (trio clock; owner: the event loop) after
        # anything found the cache directory's disk full (`_pause_prefetch`): its GETs would
        # be thrown away, or take the room Orthanc's reads and writes need.
        self._prefetch_resumes = -math.inf
        # Decrypted copies shared by their readers (owner: the event loop): by the file they
        # were decrypted from, the readers' fds, and decryptions under way.
        self._plain: dict[PlainKey, SharedPlain] = {}
        self._plain_fds: dict[int, PlainKey] = {}
        self._plain_pending: dict[PlainKey, trio.Event] = {}
        # Unbounded on purpose: what waits here is bounded by the cache budget (dirty data
        # cannot exceed CacheSize) and an entry is one uuid.
        self._uploads = LargestFirst()
        # Bytes of the uploads in `_uploads` or taken by an upload worker and not finished:
        # with the open writes, what only uploads can free in the cache (clean copies are
        # evicted instead). Owner: the event loop; `_queue_upload` adds, the worker that took
        # the upload subtracts when done with it, whatever the outcome.
        self._unsent_bytes = 0
        self._delete_send, self._delete_recv = trio.open_memory_channel[str](math.inf)
        # Uuids whose objects deletes may be removing now (`Writeback._removing_objects`:
        # each from its row check until its rows are dropped or it failed; a worker's and a
        # move's may overlap). Owner: the event loop. A move to the bucket waits until none
        # is left before it puts the same key again (a delete would remove the new object).
        self._deleting: dict[str, DeleteRecord] = {}
        # Uuids a move to the bucket is putting an object for, from its journaled delete of
        # that object (`Journal.put_move_target`) until its record replaced it or the move
        # failed (then the move sends that delete itself). Owner: the move (the event loop).
        # The delete workers skip them, as they skip uploads running (`inflight`): a delete
        # queued earlier would remove the object being moved and drop its record.
        self._moving: set[str] = set()
        # Uploads and deletes queued, running or waiting to be tried again, by uuid: how many
        # (a delete may be queued twice); `drain` waits until none is left (`_idle`).
        self._outstanding: collections.Counter[str] = collections.Counter()
        self._idle = trio.Event()
        self._idle.set()
        self._journal_limiter = trio.CapacityLimiter(4)
        # Background requests running, when Orthanc last wrote or deleted, when its current
        # burst of writes and deletes began (`_note_foreground`), and the event that `_turn`
        # waiters wait on (replaced by `_wake_turns`, see there).
        self._last_foreground = -math.inf
        self._busy_since = -math.inf
        self._background = 0
        self._turn_changed = trio.Event()
        # Idle CPUs since the previous call (`objfs.cpuload`; tests give their own), when a
        # sample last found CPU to spare while Orthanc paused (owner: `_watch_spare_cpu`),
        # and the event that wakes the watcher when a task starts waiting in `_turn` (the
        # tasks waiting are those of `_turn_changed`).
        self._idle_cpus = idle_cpus if idle_cpus is not None else IdleCpus().sample
        self._spare_seen = -math.inf
        self._waiter_arrived = trio.Event()
        self.hybrid_mode = settings.hybrid_mode
        self.fs: FileSystemTier | None = None
        if settings.fs_directory is not None:
            ring = settings.encryption.ring if settings.encryption else None
            self.fs = FileSystemTier(settings.fs_directory, ring, settings.encrypt_fs_tier,
                                     settings.node_name if settings.shared_bucket else None)
        self.fs_first = settings.hybrid_mode == HybridMode.WRITE_TO_FILE_SYSTEM
        # Told (on the event loop, must not block) of every attachment a read had to fetch
        # from the bucket: series prefetch (objfs.sidecar.prefetch) hooks in here.
        self.on_fetched: Callable[[str], None] | None = None
        # Told (same rules) of every attachment a read is about to fetch, before the GET.
        self.on_cold: Callable[[str], None] | None = None
        # Uploads note each DICOM attachment's series in the journal (`Journal.note_series`),
        # so that a later prefetch of that series needs no header and no Orthanc request.
        self.record_series = settings.series_prefetch and not settings.encrypt_local_cache
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

    async def _j_meanwhile(self, meanwhile: Callable[[], None], fn: Callable[..., None],
                           *args: object) -> None:
        """`_j(fn, *args)`, with `meanwhile` run on the event loop while the worker thread
        commits (`thread_meanwhile`)."""
        await thread_meanwhile(functools.partial(fn, *args), meanwhile, self._journal_limiter)

    async def stats(self) -> Stats:
        """The journal's counters, counted in a worker thread: the event loop keeps serving
        Orthanc meanwhile."""
        return await trio.to_thread.run_sync(read_stats, self.journal.path, self.journal)

    def _queue_upload(self, uuid: str, size: int) -> None:
        """Queue the upload of `uuid`, unless it is outstanding already (queued, running, or
        waiting to be tried again): two workers must never upload one attachment at once, and
        the scans of pending rows (at the start, at the drain) meet uploads a close queued."""
        if uuid in self._outstanding:
            return
        self._track(uuid)
        self._unsent_bytes += size
        self._uploads.put(uuid, size)

    def _unsent_total(self) -> int:
        """Bytes of the cache only uploads can free: queued or running uploads, and the open
        writes' reservations (`LocalTier.unsent` calls it too)."""
        writing = sum(h.reserved for h in self.writing.values() if not h.fs)
        return self._unsent_bytes + writing

    @property
    def _unsent_past_share(self) -> bool:
        """Whether data only uploads can free fills the part of the cache that background
        work may use (half): then uploads stop yielding to Orthanc. Clean copies do not
        count: eviction frees them."""
        return self._unsent_total() >= self.tier.background_share

    def _queue_delete(self, uuid: str) -> None:
        self._track(uuid)
        self._delete_send.send_nowait(uuid)

    def _note_kept(self, now: bool = False) -> None:
        """The journal kept a row change in memory. `_record_kept` commits the kept ones in a
        worker thread: at once when `now` or when KEPT_APPLY_SOON are kept (before a full
        batch is applied on Orthanc's path), otherwise after KEPT_CHANGES_DELAY (a logged
        put's or delete's, whose checkpoint commits it anyway, does not start that delay)."""
        if now or self.journal.kept_changes >= KEPT_APPLY_SOON:
            self._kept_changes.set()
            self._kept_due.set()

    def _track(self, uuid: str) -> None:
        self._outstanding[uuid] += 1
        if self._idle.is_set():
            self._idle = trio.Event()

    def _untrack(self, uuid: str) -> None:
        if self._outstanding[uuid] <= 1:
            self._outstanding.pop(uuid, None)
        else:
            self._outstanding[uuid] -= 1
        if not self._outstanding:
            self._idle.set()

    def _note_foreground(self) -> None:
        """Orthanc writes or deletes now. A pause of BUSY_WINDOW or more before it ends the
        previous burst: a new one begins (`_turn`'s BackgroundHold counts from there)."""
        now = trio.current_time()
        if now - self._last_foreground >= BUSY_WINDOW:
            self._busy_since = now
        self._last_foreground = now

    def _pause_prefetch(self, exc: BaseException) -> None:
        """No series prefetch starts for DISK_FULL_PAUSE: something found the cache
        directory's disk full (`exc`), and prefetched copies would take the room."""
        if trio.current_time() >= self._prefetch_resumes:
            self._prefetch_resumes = trio.current_time() + DISK_FULL_PAUSE
            log.warning("series prefetch paused for %.0fs: the disk of the cache directory %s "
                        "is full (%s)", DISK_FULL_PAUSE, self.tier.root, exc)

    async def _make_disk_room(self, nbytes: int, exc: BaseException) -> bool:
        """`LocalTier.make_disk_room` for `nbytes`, for a request that found the cache
        directory's disk full (`exc`) while the budget had room; the series prefetch pauses
        first, so that its downloads do not take the room the eviction makes."""
        self._pause_prefetch(exc)
        return await self.tier.make_disk_room(nbytes)

    def _drop_local(self, uuid: str, size: int) -> None:
        """Give up the local copy of `uuid`, if there is one: it stays in data/ until Orthanc's
        burst has paused (or the name is written again, or the row is about to go), and its
        budget comes back once the tier's background worker has unlinked it
        (`LocalTier.doom`, `LocalTier.remove_doomed`). Call it only once nothing serves the
        copy any more (the delete is durable, or being committed while Orthanc waits)."""
        self.tier.doom(uuid, size)

    async def _drop_rows(self, uuids: list[str], pending_delete_only: bool = True) -> None:
        """Remove the journal rows of deleted attachments (only those still pending delete,
        or, with `pending_delete_only` False, whatever they say). The copies their deletes
        gave up leave data/ first (`LocalTier.take_out`): the intent log's replay makes a
        pending upload of a logged put that has no row and a copy in data/."""
        self.tier.take_out(uuids)
        if pending_delete_only:
            await self._j(self.journal.forget_deleted, uuids)
        else:
            for uuid in uuids:
                await self._j(self.journal.remove, uuid)

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

    def _head(self, uuid: str, source: Path | None = None) -> bytes:
        """The first bytes of a plaintext local copy: enough to name its object and find its
        series (a local page-cache read, done inline)."""
        with open(source or self.tier.path(uuid), "rb") as f:
            head = f.read(FIRST_LOOK)
            if len(head) == FIRST_LOOK and PIXEL_DATA_TAG not in head:
                head += f.read(DETECT_BYTES - FIRST_LOOK)  # a long header, or compressed
        return head

    def _choose_key(self, uuid: str, size: int, source: Path | None = None,
                    head: bytes | None = None) -> str:
        """Name the object from the first bytes of its plaintext (`head`, read if not given).

        The name is journaled only with the upload's success: a row without one that was
        not written by this process may have reached the bucket, and a delete then lists it.
        """
        if head is None:
            head = self._head(uuid, source)
        return self.layout.object_key(uuid, detect_kind(head, size),
                                      encrypted=self.encryption is not None)
