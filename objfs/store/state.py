"""The store's constants and the records it keeps per attachment (see `objfs.store` for the
state machine they take part in)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import trio

from objfs.intentlog import SLOTS
from objfs.retry import RetryPolicy

T = TypeVar("T")

NEGATIVE_TTL = 2.0
# SharedBucket (docs/scale-out.md): another node may create or delete any attachment, so an
# absent name is remembered for at most SHARED_NEGATIVE_TTL seconds, and a copy known here is
# served without asking the bucket for at most SHARED_CONFIRM_TTL seconds after the bucket
# last confirmed its object (the bound after which a deletion by another node is seen).
SHARED_NEGATIVE_TTL = 1.0
SHARED_CONFIRM_TTL = 1.0
# How long the kernel may keep a single node's "absent" answer for an attachment name
# (`Store.kernel_absent_ttl`): Orthanc stats a new attachment's path, then opens it with
# O_CREAT, and a kept answer saves that open's second LOOKUP. Safe where every name is created
# through this mount (the create replaces the kept answer) and no longer than the store itself
# believes an absent name (NEGATIVE_TTL). With SharedBucket another node may create any name:
# the kernel keeps nothing (0).
KERNEL_ABSENT_TTL = 1.0
INVENTORY_META = "inventory"
INVENTORY_COMPLETE = "complete"
FIRST_LOOK = 64 * 1024
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian
# While Orthanc writes or deletes, background requests yield the CPU to it (on a small host
# the SDK's request signing and checksums compete with ingest): none in the first
# `BackgroundHold` seconds of a burst, then one at a time, until Orthanc pauses for
# BUSY_WINDOW seconds, or until data not yet uploaded fills half the cache budget.
BUSY_WINDOW = 0.5
# The pause in new attachments and deletes (seconds) after which the intent log
# (`objfs.intentlog`) is emptied by a checkpoint (one WAL fsync for the burst's puts and
# deletes), or the intents it holds when that is done without a pause: half its room, so that
# a long burst never fills it.
INTENT_LOG_CHECKPOINT = 0.5
INTENT_LOG_HALF = (SLOTS - 1) // 2
# A delete's intent log write runs on the event loop, which it stalls: after SLOW_LOG_WRITES
# writes in a row that each took more than SLOW_LOG_WRITE seconds (a rotating disk), deletes
# go back to durable journal commits in a worker thread for the rest of the process.
SLOW_LOG_WRITE = 0.002
SLOW_LOG_WRITES = 3
# ... or until Orthanc paused for SPARE_WINDOW seconds while the machine had at least SPARE_CPUS
# idle CPUs over the last SPARE_SAMPLE seconds (`objfs.cpuload`): then Orthanc has stopped, not
# gone on to receive the next file's body (which makes no file-system request but keeps the CPUs
# busy), and the backlog may use what it leaves.
SPARE_WINDOW = 0.1
SPARE_CPUS = 0.75
SPARE_SAMPLE = 0.05
# Orthanc's fsync of an attachment up to INLINE_SYNC_BYTES is made durable on the event loop
# when no other request is in flight (`Writeback.sync`): handing it to a worker thread and back
# cost about 0.35 ms of CPU per small instance on a 2-core host (`ab_revisions.py`), the
# fdatasync of a 0.5 MB file and the journal commit together about 0.55 ms alone, 0.75 ms
# median and 1.6 ms p90 under 4-client ingest. The loop runs one such sync at a time where
# worker threads would overlap them: while the syncs' moving average (SYNC_AVERAGE_WEIGHT of
# each new one, inline or in a thread) exceeds INLINE_SYNC_MAX seconds (a slow or busy
# disk), they go to worker threads, and come back once it falls below.
INLINE_SYNC_BYTES = 1024 * 1024
INLINE_SYNC_MAX = 0.002
SYNC_AVERAGE_WEIGHT = 0.2
# A batch of deletes is sent once no further delete came for DELETE_GATHER seconds, or
# DELETE_GATHER_MAX seconds after its first (objfs.store.writeback `_gather`).
DELETE_GATHER = 0.05
DELETE_GATHER_MAX = 1.0
PROBE_INTERVAL = 5.0
# A shared file-system tier's tombstones (`FileSystemTier.mark_deleted`) are kept this long,
# far past any move of one attachment, and pruned every TOMBSTONE_PRUNE_INTERVAL by each node.
TOMBSTONE_SECONDS = 24 * 3600.0
TOMBSTONE_PRUNE_INTERVAL = 3600.0
BACKGROUND_RETRY = RetryPolicy(first_delay=0.5, max_delay=60.0, deadline=None, persistent=True)
# An upload the journal could not record (the cache directory's disk full) is tried again
# after this pause; the series prefetch, which found the disk full, stays off for as long.
DISK_FULL_PAUSE = 10.0
# A download's cache flag is kept in memory (`Journal.cached_later`), and so is an upload's
# end (`Journal.uploaded_later`); both are committed with the burst's others this many seconds
# after the burst's first (`Fetch._record_kept`); the upload ends at once when the last
# outstanding upload ended while Orthanc was not writing, or when KEPT_APPLY_SOON row changes
# are kept.
KEPT_CHANGES_DELAY = 0.25
# Kept row changes (logged puts and deletes, upload ends) that `_record_kept` commits at once in
# a worker thread: half the batch that `put_logged` or `delete_logged` would otherwise apply on
# the thread of Orthanc's fsync or unlink.
KEPT_APPLY_SOON = 32
# After a commit of kept changes failed (other than for a full disk: DISK_FULL_PAUSE), the next
# try waits this long whatever is kept meanwhile: one message a second at most, no thread round
# trip per change; then it tries again by itself (the uploads count as pending until then).
KEPT_FAILED_PAUSE = 1.0
# Downloads, in all, of a reader's copy that finds the disk full (a clean copy evicted before
# each new try): enough for the series prefetch's downloads under way when it paused to end.
DISK_FULL_TRIES = 4
# ... or after this one, when evicting clean copies made room for its journal commit.
ROOM_MADE_PAUSE = 0.1
# Disk room asked of `LocalTier.make_disk_room` when a new attachment's journal commit found the
# disk full: a few pages of the write-ahead log, generously.
COMMIT_ROOM = 256 * 1024


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
    sent: bool = False  # write-through: a PUT was started (the object may be in the bucket)
    fs: bool = False  # written to the file-system tier (HybridMode WriteToFileSystem)
    placed: bool = False  # the fs-tier file behind `fd` has its final name
    closed: trio.Event = field(default_factory=trio.Event)  # set by close_write


@dataclass(frozen=True)
class CacheSpace:
    """The local tier's budget as the fs layer (statfs), metrics and STATUS= show it."""

    root: Path
    capacity: int
    used: int
    evicted_files: int
    evicted_bytes: int


@dataclass
class SharedPlain:
    """The decrypted copy of one attachment that its readers share."""

    fd: int  # the O_TMPFILE; each reader has its own fd opened on it
    readers: int
    give_back: Callable[[], None]  # its share of the cache budget
    # The A1 file it was decrypted from, held open: while it is, no other file can take that
    # file's inode number, which is part of this copy's key (`PlainKey`).
    source: int = -1


# A shared decrypted copy's key: the attachment and the device and inode of the A1 file it was
# decrypted from. A name deleted and written again is another file: its readers never share the
# copy that readers of the old file still hold.
PlainKey = tuple[str, int, int]


@dataclass
class DeleteRecord:
    """Deletes of one uuid's objects under way (`StoreCore._deleting`): how many, and the
    Event set when the last of them ends."""
    running: int = 0
    ended: trio.Event = field(default_factory=trio.Event)


@dataclass
class FetchRecord:
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None
    # Deleted while it downloaded (`_forget_object`): its copy must not take the place of the
    # name's next file, whatever the journal says by then.
    gone: bool = False
