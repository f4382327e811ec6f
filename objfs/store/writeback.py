"""Writing and deleting: the write-back cache, its upload and delete queues, drain."""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import trio

from objfs import codec, errors
from objfs.dicomhead import series_instance_uid
from objfs.errnos import is_disk_full
from objfs.fsutil import fd_path, fsync_path
from objfs.journal import PENDING_DELETE, PENDING_UPLOAD, Row
from objfs.retry import RetryPolicy
from objfs.store.fetch import Fetch
from objfs.store.state import (
    BACKGROUND_RETRY,
    BUSY_WINDOW,
    COMMIT_ROOM,
    DELETE_GATHER,
    DELETE_GATHER_MAX,
    DISK_FULL_PAUSE,
    INLINE_SYNC_BYTES,
    INLINE_SYNC_MAX,
    INTENT_LOG_CHECKPOINT,
    INTENT_LOG_HALF,
    ROOM_MADE_PAUSE,
    SLOW_LOG_WRITE,
    SLOW_LOG_WRITES,
    SPARE_CPUS,
    SPARE_SAMPLE,
    SPARE_WINDOW,
    SYNC_AVERAGE_WEIGHT,
    DeleteRecord,
    WriteHandle,
)
from objfs.tally import error_class
from objfs.testhooks import crash_point

log = logging.getLogger(__name__)


class Writeback(Fetch):
    """New attachments, deletes, and the background work that sends both to the bucket."""

    async def create(self, uuid: str) -> WriteHandle:
        """Start a new attachment. Raises Immutable when it exists already, and OSError
        EBUSY when it was deleted and its object's delete is still to reach the bucket (or
        still under way: `_deleting`): that delete, and the row's removal after it, would
        take the new attachment with them. A
        name deleted since the journal's last checkpoint first waits for one WAL fsync
        (`Journal.settle_before_rewrite`); raises what that raises. One whose old copy an
        eviction is removing waits for that eviction (`LocalTier.wait_evicted`)."""
        while True:
            if self.tier.evicting(uuid):
                await self.tier.wait_evicted(uuid)
                continue
            if await self.size_of(uuid) is not None:
                raise errors.Immutable(f"attachment {uuid} exists; attachments are write-once")
            row = self.journal.get(uuid)
            # A delete of its objects may outlive the row: another one of the same uuid (it
            # was queued twice) drops the row while this one still sends its requests.
            if (row is not None and row.state == PENDING_DELETE) or uuid in self._deleting:
                raise OSError(errno.EBUSY, f"attachment {uuid} was deleted and the delete of "
                              "its object has not reached the bucket yet; write it again once "
                              "it has (objfs status: no pending deletes)")
            if not self.journal.unsettled(uuid):
                break
            # Deleted lately: what the journal still holds of that attachment must not meet
            # the new one (`Journal.settle_before_rewrite`). Then check again.
            await trio.to_thread.run_sync(self.journal.settle_before_rewrite, uuid,
                                          limiter=self._journal_limiter)
        if self.fs is not None and self.fs_first:
            fd = os.open(self.fs.partial_path(uuid), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            handle = WriteHandle(uuid, fd, fs=True)
        else:
            fd = os.open(self.tier.claim(uuid), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            handle = WriteHandle(uuid, fd)
            self._fresh.add(uuid)
        self.writing[uuid] = handle
        self._negative.pop(uuid, None)
        self._absent.pop(uuid, None)
        self.tier.opened(uuid)
        return handle

    async def write(self, handle: WriteHandle, offset: int, data: bytes) -> int:
        """Write into the local copy, taking cache budget first (may wait, then CacheFull);
        the file-system tier has no budget."""
        self._note_foreground()
        end = offset + len(data)
        if end > handle.reserved and not handle.fs:
            try:
                await self._reserve_to(handle, end)
            except errors.CacheFull as exc:
                handle.error = exc
                raise
            if self._unsent_past_share:
                self._wake_turns()  # uploads stop yielding to Orthanc: see `_turn`
        try:
            try:
                written = os.pwrite(handle.fd, data, offset)
            except OSError as exc:
                # Full although the budget had room: something else fills the disk.
                if handle.fs or not is_disk_full(exc) \
                        or not await self._make_disk_room(len(data), exc):
                    raise
                written = os.pwrite(handle.fd, data, offset)
        except OSError as exc:
            handle.error = exc
            raise
        handle.size = max(handle.size, offset + written)
        handle.dirty = True
        return written

    async def _reserve_to(self, handle: WriteHandle, end: int) -> None:
        """Take the budget for `handle`'s copy to reach `end` bytes (may wait, then
        CacheFull). Several writes of one file may wait at once (the kernel's writeback cache
        sends them in parallel): what another took for the same range meanwhile is given
        back, so each byte of the file is counted once."""
        before = handle.reserved
        await self.tier.reserve(end - before)
        overlap = min(end, handle.reserved) - before
        if overlap > 0:
            self.tier.release(overlap)
        handle.reserved = max(handle.reserved, end)

    async def truncate(self, handle: WriteHandle, size: int) -> None:
        if size > handle.reserved and not handle.fs:
            await self._reserve_to(handle, size)
        os.ftruncate(handle.fd, size)
        handle.size = size
        handle.dirty = True

    async def sync(self, handle: WriteHandle, alone: bool = False) -> None:
        """Make what was written durable (fsync/flush). Errors here reach Orthanc's close().
        `alone`: no other file-system request is in flight, so a small attachment's sync may
        run on the event loop (`_inline_syncs`) rather than in a worker thread."""
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
        if self.write_through and not self.seal_local:
            try:
                await self._write_through(handle)
            except Exception as exc:
                handle.error = exc
                raise
            handle.durable = True
            return
        # A first sync's row may go to the intent log (`Journal.put_logged`), which needs to
        # know that there is no row; a later one (more was written since) commits durably.
        new = self.journal.get(handle.uuid) is None
        try:
            took = None
            try:
                if alone and self._inline_syncs and handle.size <= INLINE_SYNC_BYTES:
                    # On the event loop, which never waits for the journal's lock: None when
                    # another thread holds it (the data is synced; the thread below commits).
                    took = self._timed_make_durable(handle.fd, handle.uuid, handle.size, False,
                                                    new)
                if took is None:
                    took = await trio.to_thread.run_sync(
                        self._timed_make_durable, handle.fd, handle.uuid, handle.size, True,
                        new, limiter=self._journal_limiter)
            except Exception as exc:
                # The journal's commit found the disk full (SQLITE_FULL): evicting clean
                # copies may give it room. Nothing was recorded; the retry starts afresh.
                if not is_disk_full(exc) or not await self._make_disk_room(COMMIT_ROOM, exc):
                    raise
                took = await trio.to_thread.run_sync(
                    self._timed_make_durable, handle.fd, handle.uuid, handle.size,
                    limiter=self._journal_limiter)
            assert took is not None  # a worker thread waits for the lock
            self._timed_sync(took)
        except Exception as exc:
            handle.error = exc
            raise
        if new:
            self._intents_logged.set()  # the checkpoint empties the log once writes pause
            self._note_kept()
        handle.durable = True
        if self.write_through:
            handle.sent = True
            try:
                await self._upload(handle.uuid, self.read_retry)
            except Exception as exc:
                handle.error = exc
                raise

    async def _write_through(self, handle: WriteHandle) -> None:
        """WriteMode write-through (and SharedBucket): PUT the local copy, then record it as
        uploaded and cached in one journal commit. No fdatasync: once the PUT succeeded the
        bucket holds the attachment (close() returns only then), and until it succeeds
        nothing is acknowledged. With SharedBucket the commit is lazy too (unknown names are
        asked of the bucket); on one node it is durable, as the journal then says which
        names exist (invariant 9). Raises what the PUT raised after `ReadTimeout`;
        `handle.sent` tells close_write that the object may exist."""
        uuid = handle.uuid
        key = self._choose_key(uuid, handle.size)
        sealed = self.tier.tmp_path(uuid, "enc")
        body, give_back = await self._upload_body(uuid, handle.size, sealed, foreground=True)
        self._fresh.discard(uuid)  # from now on a delete must reach the bucket
        handle.sent = True
        self.inflight[uuid] = settled = trio.Event()

        def record(exc: errors.ObjfsError) -> None:
            self.tally.upload_errors[error_class(exc)] += 1

        try:
            await self._retry(self.read_retry, f"upload {key}",
                              lambda: self.backend.put(key, body), record)
            crash_point("after-put")
        finally:
            sealed.unlink(missing_ok=True)
            give_back()
            del self.inflight[uuid]
            settled.set()
        await self._j(self.journal.put_written_through, uuid, key, handle.size,
                      not self.shared)
        self._confirmed[uuid] = True
        self.tally.uploads += 1
        self.tier.space_changed()

    async def _upload_body(self, uuid: str, size: int, sealed: Path,
                           foreground: bool) -> tuple[Path, Callable[[], None]]:
        """What to PUT for the plaintext local copy of `uuid`: the copy itself, or with
        encryption its A1 form written to `sealed` (budget taken as a temporary copy, for
        Orthanc's request when `foreground`). Returns the body and the function that gives
        the budget back; the caller removes `sealed`."""
        path = self.tier.path(uuid)
        if self.encryption is None:
            return path, lambda: None
        give_back = (await self._scratch_for_reader(size + codec.OVERHEAD) if foreground
                     else await self.tier.take_scratch(size + codec.OVERHEAD))
        try:
            async with self._crypto_limiter:
                await trio.to_thread.run_sync(codec.encrypt_file, path, sealed,
                                              self.encryption.ring)
        except BaseException:
            sealed.unlink(missing_ok=True)
            give_back()
            raise
        return sealed, give_back

    @property
    def _inline_syncs(self) -> bool:
        """Whether a lone sync of a small attachment may run on the event loop: the moving
        average of syncs' seconds is within INLINE_SYNC_MAX, and nothing is sealed (sealing
        encrypts the whole file)."""
        return self._sync_seconds <= INLINE_SYNC_MAX and not self.seal_local

    def _timed_make_durable(self, fd: int, uuid: str, size: int, wait: bool = True,
                            new: bool = False) -> float | None:
        """`_make_durable`: the seconds it took, or None when it recorded nothing."""
        started = time.perf_counter()
        if not self._make_durable(fd, uuid, size, wait, new):
            return None
        return time.perf_counter() - started

    def _timed_sync(self, took: float) -> None:
        """Count one sync's seconds in the moving average that decides whether lone syncs
        run on the event loop (INLINE_SYNC_MAX); a change is logged."""
        before = self._inline_syncs
        self._sync_seconds += SYNC_AVERAGE_WEIGHT * (took - self._sync_seconds)
        inline = self._inline_syncs
        if inline == before:
            return
        if inline:
            log.info("syncs of new attachments take %.1f ms on average: small ones run on "
                     "the event loop again", self._sync_seconds * 1000)
        else:
            log.info("syncs of new attachments take %.1f ms on average (more than %.1f ms): "
                     "they run in worker threads until that falls", self._sync_seconds * 1000,
                     INLINE_SYNC_MAX * 1000)

    def _make_durable(self, fd: int, uuid: str, size: int, wait: bool = True,
                      new: bool = False) -> bool:
        """fdatasync, then the journal's durable row; True once recorded. For a `new` row
        (the caller saw none) that is an intent in the intent log (`Journal.put_logged`: one
        small synchronous write instead of a WAL commit and its fsync) when the log has room.
        In a worker thread, or on the event loop with `wait` False (`sync`), which never
        waits for the journal's lock: False, with the data synced and nothing recorded, when
        another thread holds it. With EncryptLocalCache (worker thread only) the complete file
        is sealed (A1, exactly the object to upload) and replaces the plaintext before the
        row commits."""
        os.fdatasync(fd)
        crash_point("after-data-fsync")
        if not self.seal_local:
            if new and self.journal.put_logged(uuid, size):
                crash_point("after-journal-commit")
                return True
            if not self.journal.put_pending(uuid, size, wait=wait):
                return False
            crash_point("after-journal-commit")
            return True
        assert self.encryption is not None
        key = self._choose_key(uuid, size, fd_path(fd))
        sealed = self.tier.tmp_path(uuid, "seal")
        codec.encrypt_file(fd_path(fd), sealed, self.encryption.ring)
        fsync_path(sealed)
        os.replace(sealed, self.tier.path(uuid))
        fsync_path(self.tier.data)  # the rename must be durable before the row says sealed
        return self.journal.put_pending(uuid, size, key, sealed=True)

    async def close_write(self, handle: WriteHandle) -> bool:
        """Release a write handle: queue the upload, or discard a write that failed.

        Returns False when the file was discarded (the caller drops the kernel's entry).
        """
        os.close(handle.fd)
        self.writing.pop(handle.uuid, None)
        handle.closed.set()
        self.tier.closed(handle.uuid)
        if handle.fs:
            return await self._close_fs_write(handle)
        row = self.journal.get(handle.uuid)
        if handle.sent and (handle.error is not None or handle.unlinked):
            # A write-through PUT was sent and the write failed or was unlinked: the object
            # may be in the bucket, so the uuid's objects are deleted like any delete
            # (journaled, retried).
            if handle.error is not None:
                log.warning("attachment %s: write-through upload failed (%s); not "
                            "acknowledged, its objects are deleted", handle.uuid, handle.error)
            self._fresh.discard(handle.uuid)
            if row is None:
                await self._j(self.journal.put_pending, handle.uuid, handle.size)
                row = self.journal.get(handle.uuid)
                assert row is not None
            self.tier.release(handle.reserved - handle.size)
            await self._forget_object(handle.uuid, row)
            return False
        if handle.error is not None or handle.unlinked or not handle.durable:
            if not handle.unlinked:
                log.warning("attachment %s: discarding a write that was not acknowledged",
                            handle.uuid)
            self._fresh.discard(handle.uuid)
            await self._discard_local(handle.uuid, handle.reserved)
            return False
        self.tier.release(handle.reserved - handle.size)
        if row is not None and row.state == PENDING_UPLOAD:
            self._queue_upload(handle.uuid, handle.size)
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
        if self.shared and self.fs is not None:
            # Before either tier is looked at: a move of the attachment by another node then
            # finds the tombstone once its step is done and undoes it, or its step is done
            # before the looks below, which then find it (the bucket asked afresh).
            await trio.to_thread.run_sync(self.fs.mark_deleted, uuid,
                                          limiter=self._journal_limiter)
            self._negative.pop(uuid, None)
        in_fs = self.fs is not None and self.fs.stat(uuid) is not None
        row = await self._row(uuid)
        if row is None and not in_fs:
            raise errors.NotFound(f"attachment {uuid}")
        self._note_foreground()
        if in_fs:
            assert self.fs is not None
            await trio.to_thread.run_sync(self.fs.remove, uuid, limiter=self._journal_limiter)
        if row is not None:
            await self._forget_object(uuid, row)

    async def _forget_object(self, uuid: str, row: Row, queue: bool = True) -> None:
        """Delete the bucket side of an attachment: durably journaled, the object's delete
        queued (unless `queue` is False: the caller deletes it), the local copy removed."""
        self._negative[uuid] = True
        self._confirmed.pop(uuid, None)
        fetch = self._fetches.get(uuid)
        if fetch is not None:
            fetch.gone = True
        if not self.inventory_done and not self.shared:
            self._deleted_during_inventory.add(uuid)
        self._unlinking.add(uuid)
        dropped = False  # the copy left data/ with nothing awaited since
        try:
            # Never sent to the bucket: forgetting it locally is the whole delete (Orthanc does
            # this to every duplicate it receives: it writes the file first). When that cannot
            # be logged, it is deleted like any pending upload, not `remove`d: its put may
            # still be in the intent log, and a crash before its copy is gone would have the
            # replay bring it back; its row goes once the (needless) object delete is done.
            forgotten = row.state == PENDING_UPLOAD and uuid in self._fresh \
                and self._log_delete(uuid, forget=True)
            if not forgotten:
                if row.state == PENDING_UPLOAD:
                    # The local copy may be the only one: it goes once the delete is durable.
                    await self._j(self.journal.mark_pending_delete, uuid)
                else:
                    # The bucket has the object, so the copy is only a cache: given up
                    # (`LocalTier.doom`, which leaves it in place for after the burst) once the
                    # delete is durable in the intent log, or while the durable commit waits
                    # for the disk when the log is full.
                    def drop_copy() -> None:
                        self._drop_local(uuid, row.size)
                        crash_point("after-copy-dropped")

                    if self._log_delete(uuid):
                        drop_copy()
                        dropped = True
                    else:
                        await self._j_meanwhile(drop_copy, self.journal.mark_pending_delete,
                                                uuid)
                crash_point("after-delete-journaled")
                if uuid not in self.inflight and queue:
                    self._queue_delete(uuid)
        finally:
            self._unlinking.discard(uuid)
            self._fresh.discard(uuid)
        # Decided now, not from `row` (read before the awaits above): eviction may have
        # removed the copy meanwhile, and its space must be given back exactly once (a copy
        # already dropped during the commit is not there any more).
        if not dropped:
            self._drop_local(uuid, row.size)

    def _log_delete(self, uuid: str, forget: bool = False) -> bool:
        """`journal.delete_logged` (durable when True), unless this disk proved too slow for
        a synchronous write on the event loop: then False, and the caller commits durably in
        a worker thread."""
        if not self._log_deletes:
            return False
        started = time.perf_counter()
        logged = self.journal.delete_logged(uuid, forget)
        took = time.perf_counter() - started
        if logged:
            self._intents_logged.set()
            self._note_kept()
        self._slow_log_writes = self._slow_log_writes + 1 if took > SLOW_LOG_WRITE else 0
        if self._slow_log_writes >= SLOW_LOG_WRITES:
            self._log_deletes = False
            log.warning("intent log writes of deletes take %.1f ms on this disk (more than "
                        "%.1f ms %d times in a row): deletes commit in a worker thread from now "
                        "on",
                        took * 1000, SLOW_LOG_WRITE * 1000, SLOW_LOG_WRITES)
        return logged

    async def _checkpoint_log(self) -> None:
        """Empty the intent log once Orthanc's writes and deletes pause (nothing logged for
        INTENT_LOG_CHECKPOINT seconds) or it is half full (`journal.checkpoint_log`: one WAL
        fsync for the burst's puts and deletes). Not inside a burst: the checkpoint holds the
        journal during its fsync, and the writes and deletes meanwhile fall back to durable
        commits in a worker thread, as they do when the log is full."""
        while True:
            await self._intents_logged.wait()
            while True:
                self._intents_logged = trio.Event()
                with trio.move_on_after(INTENT_LOG_CHECKPOINT):
                    await self._intents_logged.wait()
                if not self._intents_logged.is_set() \
                        or self.journal.logged_intents >= INTENT_LOG_HALF:
                    break
            while not await trio.to_thread.run_sync(self.journal.checkpoint_log,
                                                    limiter=self._journal_limiter):
                await trio.sleep(INTENT_LOG_CHECKPOINT)

    async def _upload_worker(self) -> None:
        """Take queued uploads one at a time. An upload that failed because the cache
        directory's disk is full (its encrypted body, or the journal's record of an end that
        could not be kept in memory: `Journal.uploaded_later`) is tried again after
        ROOM_MADE_PAUSE when evicting clean copies made room (`make_disk_room`), else after
        DISK_FULL_PAUSE, still counted as unsent and outstanding (a drain waits for it); any
        other failure (the bucket's are retried inside `_upload`) leaves it journaled for the
        next start."""
        while True:
            uuid, size = await self._uploads.get()
            limit = self.backend.single_request_limit
            # Sent in parts several at a time: it waits for Orthanc to pause (`_turn`).
            parallel = limit is not None and size > limit
            again, pause = False, DISK_FULL_PAUSE
            try:
                async with self._turn(parallel):
                    await self._upload(uuid, BACKGROUND_RETRY)
            except Exception as exc:
                again = is_disk_full(exc)
                if again:
                    # Clean copies may make room (something else filled the disk): then the
                    # upload is tried again after a moment (never a busy loop on a disk that
                    # keeps refusing), not after the full pause.
                    made_room = await self._make_disk_room(COMMIT_ROOM, exc)
                    pause = ROOM_MADE_PAUSE if made_room else DISK_FULL_PAUSE
                    if not made_room:
                        log.error("upload of attachment %s: no space left on the local disk "
                                  "(%s); trying again in %.0fs", uuid, exc, pause)
                elif isinstance(exc, errors.JournalDamaged):  # said once, critically
                    log.error("upload of attachment %s failed: %s; it stays on the local "
                              "disk", uuid, exc)
                else:
                    log.exception("upload of attachment %s failed; it stays journaled and is "
                                  "retried at the next start", uuid)
            finally:
                if not again:
                    self._unsent_bytes -= size
                    self._untrack(uuid)
            if again:
                await trio.sleep(pause)
                self._uploads.put(uuid, size)

    @contextlib.asynccontextmanager
    async def _turn(self, parallel: bool = False) -> AsyncIterator[None]:
        """A background request's turn. Orthanc's own requests come first: while it wrote or
        deleted within BUSY_WINDOW, none runs in the first `background_hold` seconds of its
        burst (`Objfs.BackgroundHold`), then one at a time, and never one that is `parallel`
        (an upload in parts sent several at a time); unless Orthanc has stopped (paused for
        SPARE_WINDOW, then CPU to spare: `_watch_spare_cpu`) or data not yet uploaded fills
        half the cache budget (`_unsent_past_share`: then the uploads that free it must not
        wait; clean copies do not count, eviction frees them)."""
        while not self._unsent_past_share:
            now = trio.current_time()
            hold_ends = self._busy_since + self.background_hold
            if not parallel and self._background < (1 if now >= hold_ends else 0):
                break
            spare_from = self._last_foreground + SPARE_WINDOW
            quiet_from = self._last_foreground + BUSY_WINDOW
            if now >= quiet_from or self._spare_seen >= spare_from:
                break
            # Until the pause reaches BUSY_WINDOW, the hold ends, or `_wake_turns`: a turn
            # ended, unsent data passed half the budget, or the watcher found CPU to spare. The
            # loop checks again.
            self._waiter_arrived.set()
            with trio.move_on_at(min(quiet_from, hold_ends) if now < hold_ends else quiet_from):
                await self._turn_changed.wait()
        self._background += 1
        try:
            yield
        finally:
            self._background -= 1
            self._wake_turns()

    def _wake_turns(self) -> None:
        """Let every task waiting in `_turn` check its condition again."""
        self._turn_changed.set()
        self._turn_changed = trio.Event()

    async def _watch_spare_cpu(self) -> None:
        """While background requests wait for their turn, sample the idle CPUs every
        SPARE_SAMPLE seconds. A sample that found SPARE_CPUS unused and ended SPARE_WINDOW
        or more after Orthanc's last write or delete means Orthanc has stopped: it sets
        `_spare_seen` (which lets every background request run until Orthanc is busy
        again) and wakes the waiters. Sleeps on an event while nobody waits; counters that
        cannot be read leave the decision to time alone (BUSY_WINDOW)."""
        while True:
            if not self._turn_changed.statistics().tasks_waiting:
                self._waiter_arrived = trio.Event()
                await self._waiter_arrived.wait()
                self._idle_cpus()  # the interval starts now
            await trio.sleep(SPARE_SAMPLE)
            idle = self._idle_cpus()
            now = trio.current_time()
            if idle is not None and idle >= SPARE_CPUS \
                    and now >= self._last_foreground + SPARE_WINDOW:
                self._spare_seen = now
                self._wake_turns()

    async def _upload(self, uuid: str, policy: RetryPolicy) -> None:
        row = self.journal.get(uuid)
        if row is None or row.state != PENDING_UPLOAD or uuid in self._unlinking:
            return
        self.inflight[uuid] = settled = trio.Event()
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
            head = None if row.sealed else self._head(uuid)
            key = row.key or self._choose_key(uuid, row.size, head=head)
            sealed = self.tier.tmp_path(uuid, "enc")
            give_back: Callable[[], None] = lambda: None  # noqa: E731 - a no-op by default
            path = self.tier.path(uuid)
            if not row.sealed:
                path, give_back = await self._upload_body(uuid, row.size, sealed,
                                                          foreground=False)

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
            del self.inflight[uuid]
            settled.set()
        row = self.journal.get(uuid)
        if row is not None and row.state == PENDING_DELETE:
            await self._j(self.journal.set_key, uuid, key)
            self._queue_delete(uuid)
        elif row is not None:
            series = series_instance_uid(head) if head and self.record_series else None
            if self.journal.uploaded_later(uuid, key, series):
                # Committed with others (`_record_kept`): at once when this was the last
                # upload and Orthanc is not writing (the journal then says all is in the
                # bucket; during a burst more are about to end).
                self._kept_changes.set()
                self._note_kept(len(self._outstanding) <= 1 and trio.current_time()
                                >= self._last_foreground + SPARE_WINDOW)
            else:
                await self._j(self.journal.mark_uploaded, uuid, key, series)
            self._confirmed[uuid] = True
            self.tally.uploads += 1
            self.tier.space_changed()

    async def _delete_worker(self, receive: trio.MemoryReceiveChannel[str]) -> None:
        """Send journaled deletes to the bucket: in batches (one request for up to
        `batch_delete_limit` keys) when the backend has a batch delete, else one by one."""
        async with receive:
            async for uuid in receive:
                batch = [uuid]
                per_request = self._uuids_per_batch(uuid)
                try:
                    # Inside the `try`: a worker stopped while it gathers still counts the
                    # deletes it took out of the queue as no longer outstanding (their rows
                    # stay pending, and the next start queues them again).
                    if per_request > 1:
                        await self._gather(receive, batch, per_request)
                    async with self._turn():
                        if per_request > 1:
                            await self._delete_batch(batch)
                        else:
                            await self._delete_remote(uuid)
                except Exception:
                    log.exception("delete of %d attachments (%s, ...) failed; they stay "
                                  "journaled and are retried at the next start", len(batch), uuid)
                finally:
                    for done in batch:
                        self._untrack(done)

    async def _gather(self, receive: trio.MemoryReceiveChannel[str], batch: list[str],
                      limit: int) -> None:
        """Add to `batch` the deletes that follow within DELETE_GATHER of each other, up to
        `limit` and for at most DELETE_GATHER_MAX: Orthanc deletes a patient's or a study's
        attachments one after the other, and the burst becomes a few requests. One worker
        gathers at a time, so the burst is not split between them."""
        async with self._delete_gathering:
            end = trio.current_time() + DELETE_GATHER_MAX
            while len(batch) < limit:
                with trio.move_on_at(min(end, trio.current_time() + DELETE_GATHER)):
                    batch.append(await receive.receive())
                    continue
                return

    def _uuids_per_batch(self, uuid: str) -> int:
        """Attachments per batch request (each sends every name it could have); 1: none."""
        if self._no_batch_delete:
            return 1
        return self.backend.batch_delete_limit // len(self.layout.possible_keys(uuid))

    @contextlib.contextmanager
    def _removing_objects(self, uuids: list[str]) -> Iterator[None]:
        """Count in `_deleting` that the objects of `uuids` may be being deleted, until the
        block ends. Enter it with no await since the rows were checked."""
        records = [self._deleting.setdefault(uuid, DeleteRecord()) for uuid in uuids]
        for record in records:
            record.running += 1
        try:
            yield
        finally:
            for uuid, record in zip(uuids, records, strict=True):
                record.running -= 1
                if not record.running:
                    del self._deleting[uuid]
                    record.ended.set()

    async def wait_deletes_ended(self, uuid: str) -> None:
        """Return once no delete of `uuid`'s objects is under way (`_deleting`)."""
        while (deleting := self._deleting.get(uuid)) is not None:
            await deleting.ended.wait()

    async def _delete_batch(self, uuids: list[str]) -> None:
        """Delete the objects of journaled deletes `uuids` in one request per
        `batch_delete_limit` keys: every name the layout could have given each uuid, so no
        listing is needed. Falls back to `_delete_remote` for a store that refuses batches."""
        rows = [row for u in uuids if (row := self._delete_due(u)) is not None]
        if not rows:
            return
        keys = sorted({k for row in rows for k in self.layout.possible_keys(row.uuid)}
                      | {row.key for row in rows if row.key is not None})
        limit = self.backend.batch_delete_limit
        try:
            with self._removing_objects([row.uuid for row in rows]):
                for start in range(0, len(keys), limit):
                    chunk = keys[start:start + limit]
                    await self._retry(BACKGROUND_RETRY,
                                      f"delete {len(chunk)} keys ({chunk[0]}, ...)",
                                      functools.partial(self.backend.delete_many, chunk))
                crash_point("after-object-delete")
                await self._drop_rows([row.uuid for row in rows])
        except errors.Unsupported as exc:  # `final`: the retry policy gives it back at once
            log.warning("the bucket refuses batch deletes (%s): deleting one object at a time",
                        exc)
            self._no_batch_delete = True
            for row in rows:
                await self._delete_remote(row.uuid)

    def _delete_due(self, uuid: str) -> Row | None:
        """`uuid`'s row when its objects are to be deleted now: pending delete, and neither
        an upload (`inflight`) nor a move to the bucket (`_moving`) is putting its object;
        else None. The one check before every delete of objects (`_removing_objects`)."""
        row = self.journal.get(uuid)
        if row is None or row.state != PENDING_DELETE or uuid in self.inflight \
                or uuid in self._moving:
            return None
        return row

    async def _delete_remote(self, uuid: str, policy: RetryPolicy = BACKGROUND_RETRY) -> None:
        row = self._delete_due(uuid)
        if row is None:
            return
        with self._removing_objects([uuid]):
            await self._delete_objects(uuid, row.key, policy)
            await self._drop_rows([uuid], pending_delete_only=False)

    async def _delete_objects(self, uuid: str, key: str | None, policy: RetryPolicy) -> None:
        """Delete every object of `uuid` in the bucket, `key` included: not only the
        journaled key, since `objfs rekey` renames X.dcm to X.dcm.enc and a plugin may have
        written a sibling (.dcm.head, .json). Call it inside `_removing_objects`. Raises what
        `policy` gives up with; the objects deleted so far stay deleted."""
        prefix = self.layout.lookup_prefix(uuid)
        page, _ = await self._retry(
            policy, f"list {prefix}", lambda: self.backend.list_page(prefix, None, 16))
        keys = {o.key for o in page if (info := self.layout.parse_key(o.key))
                and info.uuid == uuid}
        if key is not None:
            keys.add(key)
        for name in sorted(keys):
            await self._retry(policy, f"delete {name}",
                              functools.partial(self.backend.delete, name))
            crash_point("after-object-delete")

    async def drain(self, timeout: float) -> bool:
        """Wait until no upload or delete is queued or running and every deleted copy is
        unlinked, at most `timeout` seconds.

        Returns True when everything is done; otherwise logs what stays journaled. Call it
        after unmounting: acknowledged files whose release the kernel had not yet sent are
        queued here too.
        """
        for row in self.journal.in_state(PENDING_UPLOAD):
            self._queue_upload(row.uuid, row.size)
        with trio.move_on_after(timeout):
            await self._idle.wait()
            await self.tier.doomed_removed()
            return True
        stats = self.journal.stats()
        log.warning("shutdown deadline (%ss) reached: %d uploads (%d bytes) and %d deletes stay "
                    "journaled and resume at the next start", timeout, stats.pending_uploads,
                    stats.pending_upload_bytes, stats.pending_deletes)
        return False
