"""HybridMode: moves between the file-system tier and the bucket, and where-is."""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from typing import NoReturn

import trio

from objfs import codec, errors
from objfs.fstier import FileSystemTier
from objfs.fsutil import fd_path, sha256_file
from objfs.journal import PENDING_DELETE, PENDING_UPLOAD, UPLOADED, Row
from objfs.store.state import TOMBSTONE_PRUNE_INTERVAL, TOMBSTONE_SECONDS
from objfs.store.writeback import Writeback
from objfs.testhooks import crash_point

log = logging.getLogger(__name__)


class Hybrid(Writeback):
    """Tier moves (the sidecar's move-storage jobs)."""

    def _require_fs(self) -> FileSystemTier:
        if self.fs is None:
            raise errors.ConfigError("HybridMode is Disabled: there is no file-system tier")
        return self.fs

    async def move_to_object_storage(self, uuid: str) -> bool:
        """Move an attachment from the file-system tier to the bucket: upload its bytes (the
        A1 file as it is when encryption is on, else encrypted now), read the object back and
        compare checksums, journal it durably, then delete the file. Returns False when it
        was already in the bucket only. Raises NotFound (neither tier), Corrupt, Unavailable
        (after ReadTimeout); on any failure the file is left as it was, and an object this
        move put in the bucket is deleted again: no row would claim it, and the attachment's
        later delete would not find it. So before its PUT the move journals that object's
        delete (`Journal.put_move_target`), which its record replaces on success; a failure
        sends it at once, or leaves it to the delete worker when the bucket refuses it, and
        a crash leaves it for the next start. (Not with SharedBucket, where another node may
        move the attachment while this one is down: there a crash between the PUT and the
        record leaves the object for `objfs audit --delete-orphans`.) A move cut short by a
        stop or crash is run again by its job."""
        fs = self._require_fs()
        async with self.locks.hold(uuid):
            while (handle := self.writing.get(uuid)) is not None:
                await handle.closed.wait()  # Orthanc is closing it: moments away
            where = await self._where_is(uuid, functools.partial(self._stat_fs, fs, uuid), True)
            if where is None:
                raise errors.NotFound(f"attachment {uuid} is in neither tier")
            if isinstance(where, Row):
                return False  # in the bucket only
            await self._settle_earlier_object(uuid)
            names = [self.tier.tmp_path(uuid, f"move-{n}") for n in ("plain", "body", "check")]
            plain, body, check = names
            st = fs.stat(uuid)
            # Two scratch copies at most (plaintext or body, and the read-back check).
            give_back = await self.tier.take_scratch(
                2 * ((st.st_size if st is not None else 0) + codec.OVERHEAD))
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
                # No row: an object under this name is this move's (else a row claims it).
                own_object = self.journal.get(uuid) is None
                # Not with SharedBucket: while this node is down another may move the
                # attachment, and the delete its start resumed would remove that object.
                journaled = own_object and not self.shared
                if journaled:
                    self._moving.add(uuid)
                try:
                    try:
                        if journaled:
                            await self._j(self.journal.put_move_target, uuid, key, size)
                        await self._retry(self.read_retry, f"upload {key}",
                                          lambda: self.backend.put(key, upload))
                        await self._retry(self.read_retry, f"read back {key}",
                                          lambda: self.backend.get(key, check))
                        got = await trio.to_thread.run_sync(sha256_file, check)
                        if got != expected:
                            raise errors.Corrupt(f"object {key} does not read back as "
                                                 f"uploaded ({got[0]} bytes, expected "
                                                 f"{expected[0]})")
                        crash_point("mid-move-to-bucket")
                        old = self.journal.get(uuid)
                        await self._j(self.journal.put_uploaded, uuid, key, size)
                    finally:
                        # Recorded, or failed: the delete workers may see its row again.
                        self._moving.discard(uuid)
                except errors.ObjfsError:
                    if own_object:
                        await self._take_back(uuid, key, journaled)
                    raise
                except BaseException:
                    if journaled:
                        self._queue_delete(uuid)  # stopped: the delete worker sends it
                    raise
                if old is not None and old.cached:
                    self.tier.path(uuid).unlink(missing_ok=True)
                    self.tier.release(old.size)
                if self.shared and fs.deleted(uuid):
                    await self._deleted_meanwhile(uuid)
                self._negative.pop(uuid, None)
                await trio.to_thread.run_sync(fs.remove, uuid, True)
            except FileNotFoundError as exc:
                if fs.stat(uuid) is not None:
                    raise
                # Deleted through another node (SharedBucket) while it was read here.
                raise errors.NotFound(f"attachment {uuid} was deleted while it was "
                                      "moved") from exc
            finally:
                for name in names:
                    name.unlink(missing_ok=True)
                give_back()
        return True

    async def _settle_earlier_object(self, uuid: str) -> None:
        """Before a move puts `uuid`'s object: end the delete of the object an earlier move
        to the file-system tier left (it would remove the new one, and drop its row). Waits
        for a delete under way, else sends a pending one itself, until neither is left at
        once: a delete worker that found the row pending while the move's own delete dropped
        it is still to be waited for. Raises Unavailable when the bucket does not take it
        within ReadTimeout (the move is tried again later)."""
        deadline = self.read_retry.deadline
        while True:
            with trio.move_on_after(deadline if deadline is not None else math.inf) as waited:
                await self.wait_deletes_ended(uuid)
            if waited.cancelled_caught:
                raise errors.Unavailable(f"attachment {uuid}: the delete of its earlier "
                                         f"object did not end within {deadline}s")
            # No await from here to the return: a worker that checks the row later finds it
            # gone (or the move's own record, `_moving`).
            row = self.journal.get(uuid)
            if row is None or row.state != PENDING_DELETE:
                return
            await self._delete_remote(uuid, self.read_retry)
            if self.journal.get(uuid) is not None:
                raise errors.Unavailable(f"attachment {uuid}: the delete of its earlier "
                                         "object has not reached the bucket yet")

    async def _take_back(self, uuid: str, key: str, journaled: bool) -> None:
        """Delete the object a failed move may have put in the bucket: its `journaled` delete
        (`Journal.put_move_target`), which the delete worker sends later when the bucket
        refuses it; else (SharedBucket) the key itself, and when the bucket refuses that, a
        warning names it for `objfs audit --delete-orphans`. Never raises (logged)."""
        if not journaled:
            try:
                await self._retry(self.read_retry, f"delete {key}",
                                  lambda: self.backend.delete(key))
            except errors.ObjfsError as exc:
                log.warning("the failed move of attachment %s to the bucket may have left "
                            "object %s there (deleting it failed: %s); no row claims it: "
                            "`objfs audit --delete-orphans` removes it", uuid, key, exc)
            return
        try:
            await self._delete_remote(uuid, self.read_retry)
        except errors.ObjfsError as exc:
            log.warning("the failed move of attachment %s to the bucket may have left object "
                        "%s there (deleting it failed: %s); its delete is retried in the "
                        "background", uuid, key, exc)
            self._queue_delete(uuid)
        except BaseException:
            self._queue_delete(uuid)
            raise

    async def move_to_file_system(self, uuid: str) -> bool:
        """Move an attachment from the bucket to the file-system tier: write the plaintext
        (encrypted when EncryptFileSystemTier) durably, read it back and compare checksums,
        then delete the object. Returns False when it was already in the file-system tier
        only. Raises like `move_to_object_storage`; a failure leaves both copies. When the
        bucket refuses the delete, the delete worker sends it later; with SharedBucket the
        move fails instead, the attachment in both tiers (`_end_shared_move`)."""
        fs = self._require_fs()
        async with self.locks.hold(uuid):
            where = await self._where_is(uuid, functools.partial(self._stat_fs, fs, uuid), False)
            if where is None:
                raise errors.NotFound(f"attachment {uuid} is in neither tier")
            if not isinstance(where, Row):
                return False  # in the file-system tier only
            try:
                fd = await self.open_read(uuid, objects_only=True)
            except errors.NotFound:
                if not self.shared or fs.stat(uuid) is None:
                    raise
                # The objects went in an earlier run of this move, cut before it forgot the
                # row (`_end_shared_move`), or by another node's; the read forgot the row.
                return False
            try:
                await trio.to_thread.run_sync(fs.write_copy, fd_path(fd), uuid)
                crash_point("mid-move-to-fs")
            finally:
                self.close_read(uuid, fd)
            while (settled := self.inflight.get(uuid)) is not None:
                await settled.wait()  # an upload of it is running: let it settle first
            row = self._live_row(uuid)
            if row is None:
                return True
            if self.shared:
                if fs.deleted(uuid):
                    await self._deleted_meanwhile(uuid)
                await self._end_shared_move(row)
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

    @staticmethod
    async def _stat_fs(fs: FileSystemTier, uuid: str) -> os.stat_result | None:
        """The file-system tier's file of `uuid`, for `_where_is`."""
        return fs.stat(uuid)

    async def _deleted_meanwhile(self, uuid: str) -> NoReturn:
        """SharedBucket: another node deleted `uuid` while this one moved it, and its delete
        may have looked at the tiers before this move's step (its tombstone, found after that
        step, says so). Undo what the move left: the file-system copy, and the object and
        row (its delete journaled: the attachment is gone for good, nobody moves it back).
        Raises NotFound."""
        assert self.fs is not None
        row = self.journal.get(uuid)
        if row is not None and row.state != PENDING_DELETE:
            await self._forget_object(uuid, row)
        await trio.to_thread.run_sync(self.fs.remove, uuid, True)
        raise errors.NotFound(f"attachment {uuid} was deleted while it was moved")

    async def prune_tombstones(self) -> None:
        """SharedBucket with a file-system tier: every TOMBSTONE_PRUNE_INTERVAL, remove the
        tombstones older than TOMBSTONE_SECONDS (`FileSystemTier.prune_tombstones`)."""
        fs = self._require_fs()
        while True:
            removed = await trio.to_thread.run_sync(fs.prune_tombstones,
                                                    time.time() - TOMBSTONE_SECONDS)
            if removed:
                log.info("removed %d delete tombstones older than %.0f s from the "
                         "file-system tier", removed, TOMBSTONE_SECONDS)
            await trio.sleep(TOMBSTONE_PRUNE_INTERVAL)

    async def _end_shared_move(self, row: Row) -> None:
        """SharedBucket: end a move to the file-system tier (its copy there durable) by
        deleting the attachment's objects first, then forgetting its row and local copy, with
        no delete journaled at any point: while this node is down another may move the
        attachment back to the bucket, and a delete resumed at this node's start would
        remove that object. A crash or stop before the row goes leaves the row as it was:
        a read confirms the object (gone: the row is forgotten and the file-system copy
        read), and the job runs the move again. Raises Unavailable, the row as it was and
        the attachment in both tiers, when the bucket does not take the deletes, or when the
        attachment's upload has not ended (run the move again later)."""
        uuid = row.uuid
        if row.state != UPLOADED:
            raise errors.Unavailable(f"attachment {uuid}: its upload has not ended; it stays "
                                     "in both tiers, and the move is to be run again")
        try:
            with self._removing_objects([uuid]):
                await self._delete_objects(uuid, row.key, self.read_retry)
        except errors.ObjfsError as exc:
            raise errors.Unavailable(f"attachment {uuid}: the delete of its object failed "
                                     f"({exc}); it stays in both tiers, and the move is to be "
                                     "run again") from exc
        await self._forget_uploaded(row)

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
        row = self._live_row(uuid)
        if row is not None:
            facts["ObjectStorage"] = {"Key": row.key, "Uploaded": row.state != PENDING_UPLOAD,
                                      "PendingUpload": row.state == PENDING_UPLOAD,
                                      "Cached": row.cached, "LastError": row.last_error}
            facts["Size"] = row.size
        return facts if len(facts) > 1 else None
