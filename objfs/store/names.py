"""Names: which attachments and directories exist (journal, bucket, inventory, health)."""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from objfs import codec, errors
from objfs.backends.base import ObjectInfo
from objfs.journal import PENDING_DELETE, UPLOADED, Row
from objfs.store.core import StoreCore
from objfs.store.state import BACKGROUND_RETRY, INVENTORY_COMPLETE, INVENTORY_META, PROBE_INTERVAL

log = logging.getLogger(__name__)

T = TypeVar("T")


class Names(StoreCore):
    """Lookups, directories and the bucket inventory."""

    async def size_of(self, uuid: str) -> int | None:
        """The attachment's exact size, or None when it does not exist in any tier."""
        handle = self.writing.get(uuid)
        if handle is not None:
            return None if handle.unlinked else handle.size
        fs = self.fs

        async def in_fs() -> int | None:
            assert fs is not None
            return fs.size(uuid)

        found = await self._where_is(uuid, None if fs is None else in_fs, self._fs_first_for(uuid))
        return found.size if isinstance(found, Row) else found

    async def _where_is(self, uuid: str, in_fs: Callable[[], Awaitable[T | None]] | None,
                        fs_first: bool) -> Row | T | None:
        """Where attachment `uuid` is: its live row (the journal's, or the bucket's answer for
        a name the journal does not know, as `_row`), or what `in_fs` found in the
        file-system tier (not None), or None when it is in neither tier. `in_fs` None leaves
        the file-system tier out; `fs_first` looks there before the bucket (which of two
        copies a caller gets when an attachment is in both tiers, as a move leaves it for a
        moment). With SharedBucket HybridMode absence is settled by
        `_found_on_second_look`, as another node's move may cross these looks. Raises
        Unavailable (the bucket did not answer) and whatever `in_fs` raises."""
        while True:
            if in_fs is not None and fs_first:
                found = await in_fs()
                if found is not None:
                    return found
            row, asked = await self._row_asked(uuid)
            if row is not None:
                return row
            if in_fs is None:
                return None
            if not fs_first:
                found = await in_fs()
                if found is not None:
                    return found
            if not await self._found_on_second_look(uuid, fs_first and asked):
                return None

    def _fs_first_for(self, uuid: str) -> bool:
        """Whether a lookup or open looks for `uuid` in the file-system tier before the
        bucket: in HybridMode WriteToFileSystem, and with SharedBucket for a name the journal
        does not know (the bucket is then asked after the file-system tier, which saves the
        second look of `_found_on_second_look`)."""
        return self.fs is not None and (
            self.fs_first or (self.shared and self.journal.get(uuid) is None))

    async def _found_on_second_look(self, uuid: str, bucket_after_fs: bool) -> bool:
        """SharedBucket HybridMode, for `uuid` found in neither tier: whether looking again
        finds it (then look once more from the start). Another node's move may have crossed
        the looks: it copies before it removes (to the bucket its PUT, then the file's unlink;
        to the file-system tier the file published, then the objects' delete), so a bucket
        look that finds nothing, made after a file-system look that found nothing, and a
        file-system look after it that finds nothing settle absence. The bucket is asked
        afresh unless it was asked after the file-system look already (`bucket_after_fs`),
        or this node settled the name absent within SHARED_NEGATIVE_TTL (`_absent`). False
        at once without SharedBucket (moves then hold this node's lock on the name), and for
        a name whose delete is journaled here."""
        assert self.fs is not None
        if (row := self.journal.get(uuid)) is not None:
            return row.state != PENDING_DELETE  # known meanwhile
        if not self.shared or uuid in self._absent:
            return False
        if not bucket_after_fs:
            self._negative.pop(uuid, None)
            if await self._find_remote(uuid) is not None:
                return True
        if self.fs.stat(uuid) is not None:
            return True
        self._absent[uuid] = True
        return False

    def _live_row(self, uuid: str) -> Row | None:
        """The journal's row of `uuid`, unless it is a delete still to reach the bucket; the
        bucket is not asked (`_row` asks it for a name the journal does not know)."""
        row = self.journal.get(uuid)
        return None if row is None or row.state == PENDING_DELETE else row

    async def _row(self, uuid: str) -> Row | None:
        """The live row of `uuid` (`_row_asked`)."""
        return (await self._row_asked(uuid))[0]

    async def _row_asked(self, uuid: str) -> tuple[Row | None, bool]:
        """The journal's row of `uuid` unless it is a delete still to reach the bucket; for a
        name the journal does not know, the bucket's answer (one listing, recorded as a row),
        unless the inventory is complete or the bucket showed no object within the negative
        TTL (`_negative`). Also whether the bucket was asked. Raises Unavailable."""
        row = self.journal.get(uuid)
        if row is not None:
            return (None if row.state == PENDING_DELETE else row), False
        if self.inventory_done or uuid in self._negative:
            return None, False
        return await self._find_remote(uuid), True

    async def _confirm(self, row: Row) -> bool:
        """SharedBucket: whether the object behind journaled `row` is still in the bucket (one
        HEAD unless the bucket showed it within SHARED_CONFIRM_TTL). When another node deleted
        it, the row and any local copy are forgotten and False is returned. Raises
        Unavailable after `ReadTimeout` (EIO: never serve what may have been deleted)."""
        uuid = row.uuid
        if uuid in self._confirmed or row.key is None:
            return True
        key = row.key
        self.tally.bucket_lookups += 1
        try:
            await self._retry(self.read_retry, f"confirm {key}", lambda: self.backend.head(key))
        except errors.NotFound:
            found = await self._locate(uuid)  # renamed by `objfs rekey`?
            if found is None:
                await self._forget_gone(row)
                return False
            await self._j(self.journal.set_key, uuid, found[0])
        self._confirmed[uuid] = True
        return True

    async def _forget_gone(self, row: Row) -> None:
        """Another node deleted `row`'s attachment: forget it here (row, local copy)."""
        if await self._forget_uploaded(row):
            log.info("attachment %s: deleted by another node; forgot it here", row.uuid)

    async def _forget_uploaded(self, row: Row) -> bool:
        """SharedBucket: the objects of `row`'s attachment are gone from the bucket (deleted
        by another node, or by a move to the file-system tier). Forget its row and local copy
        here, with no delete journaled; returns False (nothing done) when the journal no
        longer holds it as uploaded."""
        current = self.journal.get(row.uuid)
        if current is None or current.state != UPLOADED:
            return False
        self._negative[row.uuid] = True
        self._confirmed.pop(row.uuid, None)
        self._drop_local(row.uuid, current.size)
        await self._drop_rows([row.uuid], pending_delete_only=False)
        return True

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
        self._confirmed[uuid] = True
        return self.journal.get(uuid)

    async def _locate(self, uuid: str) -> tuple[str, int] | None:
        """The attachment's object key and stored size, by one prefix listing."""
        self.tally.bucket_lookups += 1
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
        """Whether Orthanc directory `name` ("ab" or "abcd") exists: always.

        Directories are virtual (a bucket has none), so every one of Orthanc's 256 + 65,536
        directories exists. Orthanc 1.10 creates a missing one with a check-then-create that
        fails an upload ("Unable to create a subdirectory or a file in the file storage")
        when two concurrent uploads need the same new directory; through FUSE that window was
        wide enough to hit. Existing always, they are never created, and a directory lookup
        never needs the bucket. `list_dir` still lists only those holding something or made
        by mkdir, so a listing shows what is stored."""
        return True

    def _has_files(self, prefix: str) -> bool:
        return self.journal.has_children(prefix) or any(
            u.startswith(prefix) and not h.unlinked for u, h in self.writing.items()) or (
            self.fs is not None and self.fs.has_files(prefix))

    def _in_fs_dirs(self, name: str) -> bool:
        return self.fs is not None and self.fs.has_dir(name)

    def make_dir(self, name: str) -> None:
        """mkdir: makes the directory appear in listings; EEXIST when it is listed already.
        (Orthanc never asks: it finds every directory existing.)"""
        if name in self._dirs or self._has_files(name) or self._in_fs_dirs(name):
            raise OSError(errno.EEXIST, f"{name} exists")
        self._dirs.add(name)

    def remove_dir(self, name: str) -> None:
        """rmdir: ENOTEMPTY while it holds attachments (or directories, for "ab"); otherwise
        it leaves listings, and still exists (`dir_exists`)."""
        in_fs = self._in_fs_dirs(name)
        if self._has_files(name) or (len(name) == 2 and self._has_made_subdir(name)):
            raise OSError(errno.ENOTEMPTY, f"{name} is not empty")
        if in_fs:
            assert self.fs is not None
            self.fs.remove_dir(name)
        self._dirs.discard(name)

    def _has_made_subdir(self, name: str) -> bool:
        """Whether mkdir made a directory under first-level `name` that is still listed."""
        # Orthanc never calls mkdir (every directory exists), so `_dirs` is usually empty:
        # scanning it beats formatting 256 names on every rmdir of a first-level directory.
        if len(self._dirs) < 256:
            return any(len(d) == 4 and d.startswith(name) for d in self._dirs)
        return any(name + f"{i:02x}" in self._dirs for i in range(256))

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

    async def _inventory(self) -> None:
        """List the bucket once so lookups never need the network afterwards.

        Until it finishes (or if it cannot), names the journal does not know are looked up
        in the bucket.
        """
        if self.shared:
            log.info("SharedBucket: no inventory; names this node does not know are looked up "
                     "in the bucket")
            # Other nodes change the bucket from now on: should SharedBucket be turned off
            # later, an inventory recorded before today must not be trusted then.
            if self.journal.get_meta(INVENTORY_META):
                await self._j(self.journal.set_meta, INVENTORY_META, "")
            return
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
