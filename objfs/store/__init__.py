"""What an attachment operation means: the local tier, the journal, the bucket, HybridMode.

The store is one class built in layers, one concern per module, each using the ones before it:
`core` (shared state, accessors, retries) -> `names` (lookups, directories, inventory, bucket
health) -> `fetch` (reads) -> `writeback` (writes, deletes, uploads, drain) -> `hybrid` (tier
moves) -> `Store` (the background workers' lifetime). `state` holds the constants and records.

One attachment's state machine
------------------------------
Journal states (`objfs.journal.RowState`) and the operations that move between them::

    (none) --create--> WRITING (a WriteHandle, no row; a crash discards it)
    WRITING --sync: fdatasync + row committed--> PENDING-UPLOAD (cached)      [invariant 1]
    WRITING --close without a successful sync--> (none), file removed
    PENDING-UPLOAD --upload: PUT ok--> UPLOADED (cached)                      [invariant 2]
    UPLOADED (cached) --evict: barrier, unlink--> UPLOADED (not cached)       [invariants 2, 5]
    UPLOADED (not cached) --fetch: GET, verify, fsync, rename--> UPLOADED (cached)
    PENDING-UPLOAD | UPLOADED --unlink--> PENDING-DELETE --every object of the uuid deleted-->
        (none)
    PENDING-UPLOAD never sent (fresh) --unlink--> (none)
    file-system tier <--move--> UPLOADED (HybridMode; copy, verify, record, then remove)

Who may act on one uuid at a time, and what protects it (all on the event loop):
- `writing[uuid]`: one open write; reads of it use its own file; unlink marks it `unlinked`.
- `inflight` and `_unlinking`: an upload does not send a uuid being unlinked, and a delete of
  a uuid being uploaded is queued after the upload settles.
- `locks.hold(uuid)` (`objfs.keylocks`): unlink and the tier moves hold it for their whole
  length, so a delete and a move never interleave and a deleted attachment never comes back.
- `_deleting[uuid]`: a delete of the uuid's objects under way; a move to the bucket waits
  for it (and sends a pending one itself) before it puts the same key again.
- `_fetches[uuid]`: one download per uuid however many readers wait; a download that ends
  after its attachment was deleted discards its copy.
- `tier.opened(uuid)`: an open copy is never evicted; `tier.reserve`/`take_scratch` give
  every byte on disk a place in the budget, given back exactly once (a deleted copy's once
  `tier.remove_doomed` has unlinked it, after Orthanc's burst).
- `_plain[(uuid, device, inode)]`: one decrypted copy per A1 file, shared by its readers (a
  name written again is another file).

Uploads and deletes retry until they succeed, their data journaled; reads and lookups retry
temporary errors until `ReadTimeout`, then fail (EIO); a bucket that cannot say whether a name
exists never makes it "absent" (invariant 9). The invariants are those of
docs/durability.md.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import trio

from objfs import errors
from objfs.journal import PENDING_DELETE, PENDING_UPLOAD, Journal
from objfs.store.hybrid import Hybrid
from objfs.store.state import (
    BACKGROUND_RETRY,
    INVENTORY_COMPLETE,
    INVENTORY_META,
    PROBE_INTERVAL,
    CacheSpace,
    WriteHandle,
)
from objfs.supervise import supervised

log = logging.getLogger(__name__)

__all__ = ["BACKGROUND_RETRY", "INVENTORY_COMPLETE", "INVENTORY_META", "PROBE_INTERVAL",
           "CacheSpace", "Store", "WriteHandle", "check_bucket_identity"]


class Store(Hybrid):
    """Attachment operations for the fs layer. Every method runs on the event loop."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Upload and delete workers plus the bucket inventory; re-queues journaled work. Each
        task runs `supervised`: one that fails is logged and started again, never taking the
        mount down (docs/durability.md, invariant 8)."""
        async with trio.open_nursery() as nursery:
            for _ in range(self.upload_concurrency):
                nursery.start_soon(supervised, "an upload worker", self._upload_worker)
            for _ in range(max(2, self.upload_concurrency // 2)):
                # A fresh clone at each start: a worker that ends closes its own.
                nursery.start_soon(supervised, "a delete worker",
                                   lambda: self._delete_worker(self._delete_recv.clone()))
            pending = self.journal.in_state(PENDING_UPLOAD)
            deletes = self.journal.in_state(PENDING_DELETE)
            if pending or deletes:
                log.info("resuming %d pending uploads and %d pending deletes from the journal",
                         len(pending), len(deletes))
            for row in pending:
                self._queue_upload(row.uuid, row.size)
            for row in deletes:
                self._queue_delete(row.uuid)
            nursery.start_soon(supervised, "the cache checkpoint", self.tier.checkpoints)
            nursery.start_soon(supervised, "the intent-log checkpoint", self._checkpoint_log)
            nursery.start_soon(supervised, "the record of downloaded copies and uploads",
                               self._record_kept)
            nursery.start_soon(supervised, "the removal of deleted copies",
                               partial(self.tier.remove_doomed, self._turn))
            nursery.start_soon(supervised, "the bucket inventory", self._inventory)
            nursery.start_soon(supervised, "the bucket watch", self._watch_bucket)
            nursery.start_soon(supervised, "the idle-CPU watch", self._watch_spare_cpu)
            if self.shared and self.fs is not None:
                nursery.start_soon(supervised, "the pruning of delete tombstones",
                                   self.prune_tombstones)
            task_status.started()


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
