"""`objfs rekey`: re-encrypt every object of the bucket under the current master key.

For each attachment object whose master key id is not the current one (or that is not
encrypted at all, when asked): decrypt, encrypt under the current key, write it to a temporary
key under ``RootPath/.objfs-rekey/`` (outside every attachment's prefix), read it back and
compare, copy it over the final key, verify that too, then remove the temporary object (and, in
the flat layout, the old unencrypted name). An interruption at any point leaves a readable
object; a rerun skips what is done and removes leftover temporary objects, so it is resumable.
It can run while objfs serves the bucket: objfs keeps plaintext copies locally and finds a
renamed object by listing.

An object deleted while it is rewritten (Orthanc deleted the attachment, or a HybridMode move
took it to the file-system tier) is left deleted: it is looked up again right before the copy
over its final key, and one found gone then, or at any earlier step, is counted as `vanished`,
its temporary object removed, never as a failure. A delete that lands between that last look
and the copy's end (one request's time) leaves the rewritten object behind, unreferenced:
`objfs audit --delete-orphans` removes it.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from objfs import codec, errors
from objfs.backends import open_backend
from objfs.backends.base import Backend
from objfs.clusterlock import LockHeld, keep, open_lock
from objfs.codec import KeyRing
from objfs.config import Settings
from objfs.fsutil import sha256_file
from objfs.layout import Kind, Layout
from objfs.retry import RetryPolicy

log = logging.getLogger(__name__)

TEMP_DIR = ".objfs-rekey/"
PARALLEL = 4
RETRY = RetryPolicy(deadline=120)


@dataclass
class Summary:
    scanned: int = 0
    current: int = 0  # already under the current key
    unencrypted_skipped: int = 0
    rewritten: int = 0
    failed: int = 0
    vanished: int = 0  # deleted (by Orthanc, or moved away) while rekey looked at it

    def line(self, dry_run: bool) -> str:
        verb = "to rewrite" if dry_run else "rewritten"
        return (f"scanned {self.scanned}, {verb} {self.rewritten}, failed {self.failed}, "
                f"already current {self.current}, unencrypted left {self.unencrypted_skipped}, "
                f"deleted meanwhile {self.vanished}")


class Rekeyer:
    def __init__(self, backend: Backend, layout: Layout, ring: KeyRing, workdir: Path,
                 include_unencrypted: bool, dry_run: bool) -> None:
        self.backend = backend
        self.layout = layout
        self.ring = ring
        self.workdir = workdir
        self.include_unencrypted = include_unencrypted
        self.dry_run = dry_run
        self.summary = Summary()
        self.temp_prefix = layout.root_prefix() + TEMP_DIR

    async def _get(self, key: str, path: Path, length: int | None = None) -> None:
        await RETRY.call(f"download {key}", lambda: self.backend.get(key, path, 0, length))

    async def _plaintext(self, key: str, fetched: Path, out: Path) -> Path:
        with open(fetched, "rb") as f:
            encrypted = codec.is_encrypted(f.read(2))
        if not encrypted:
            return fetched
        await trio.to_thread.run_sync(codec.decrypt_file, fetched, out, self.ring)
        return out

    async def _verify(self, key: str, expected: str, scratch: Path) -> None:
        fetched, plain = scratch / "verify", scratch / "verify.plain"
        await self._get(key, fetched)
        plaintext = await self._plaintext(key, fetched, plain)
        _, got = await trio.to_thread.run_sync(sha256_file, plaintext)
        if got != expected:
            raise errors.Corrupt(f"{key}: read-back does not match the original")

    async def _exists(self, key: str) -> bool:
        try:
            await RETRY.call(f"look up {key}", lambda: self.backend.head(key))
        except errors.NotFound:
            return False
        return True

    async def one(self, key: str) -> None:
        """Rewrite the object `key` under the current key if it needs it. Failures are counted
        and logged, not raised; an object found deleted is counted as vanished."""
        info = self.layout.parse_key(key)
        if info is None:
            return
        self.summary.scanned += 1
        scratch = Path(tempfile.mkdtemp(dir=self.workdir))
        temp_key = self.temp_prefix + info.uuid
        temp_may_exist = False
        try:
            head = scratch / "head"
            await self._get(key, head, 6)
            key_id = codec.key_id_of(head.read_bytes())
            if key_id == self.ring.current_id:
                self.summary.current += 1
                return
            if key_id is None and not self.include_unencrypted:
                self.summary.unencrypted_skipped += 1
                return
            if self.dry_run:
                self.summary.rewritten += 1
                return
            fetched, plain, sealed = scratch / "old", scratch / "plain", scratch / "new"
            await self._get(key, fetched)
            source = await self._plaintext(key, fetched, plain)
            _, digest = await trio.to_thread.run_sync(sha256_file, source)
            await trio.to_thread.run_sync(codec.encrypt_file, source, sealed, self.ring)
            temp_may_exist = True
            await RETRY.call(f"upload {temp_key}", lambda: self.backend.put(temp_key, sealed))
            await self._verify(temp_key, digest, scratch)
            # The rewrite took a while (a download, two cipher passes, an upload and its
            # read-back): the copy must not bring back an object deleted meanwhile.
            if not await self._exists(key):
                raise errors.NotFound(f"{key}: deleted while it was rewritten")
            final = self.layout.object_key(info.uuid, info.kind or Kind.UNKNOWN, True) \
                if not self.layout.legacy else key
            await RETRY.call(f"copy to {final}", lambda: self.backend.copy(temp_key, final))
            await self._verify(final, digest, scratch)
            await self._remove(temp_key)
            temp_may_exist = False
            if final != key:
                await self._remove(key)
            self.summary.rewritten += 1
        except errors.ObjfsError as exc:
            # Not found: the object, unless something else went missing (it is still there).
            gone = isinstance(exc, errors.NotFound) and not await self._exists_quietly(key)
            if gone:
                self.summary.vanished += 1
                log.info("%s was deleted while rekey rewrote it (%s): left deleted", key, exc)
            else:
                self.summary.failed += 1
                log.error("rekey of %s failed: %s", key, exc)
            if temp_may_exist:
                await self._remove_temp(temp_key)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    async def _exists_quietly(self, key: str) -> bool:
        """`_exists`, True when the bucket cannot say (the failure is then counted)."""
        try:
            return await self._exists(key)
        except errors.ObjfsError:
            return True

    async def _remove(self, key: str) -> None:
        """Delete `key`; one already gone is fine."""
        try:
            await RETRY.call(f"delete {key}", lambda: self.backend.delete(key))
        except errors.NotFound:
            pass

    async def _remove_temp(self, temp_key: str) -> None:
        """Remove the temporary object of a rewrite given up; a failure here is logged (the
        next run removes it)."""
        try:
            await self._remove(temp_key)
        except errors.ObjfsError as exc:
            log.warning("cannot remove %s (%s): the next rekey removes it", temp_key, exc)

    async def run(self, progress: Callable[[Summary], None]) -> Summary:
        async for leftover in self.backend.list(self.temp_prefix):
            if not self.dry_run:
                log.info("removing %s left by an interrupted rekey", leftover.key)
                await self.backend.delete(leftover.key)
        send, receive = trio.open_memory_channel[str](PARALLEL * 2)

        async def worker(items: trio.MemoryReceiveChannel[str]) -> None:
            async with items:
                async for key in items:
                    await self.one(key)
                    progress(self.summary)

        async with trio.open_nursery() as nursery:
            for _ in range(PARALLEL):
                nursery.start_soon(worker, receive.clone())
            receive.close()
            async with send:
                async for info in self.backend.list(self.layout.root_prefix()):
                    if not info.key.startswith(self.temp_prefix):
                        await send.send(info.key)
        return self.summary


async def rekey(settings: Settings, dry_run: bool, include_unencrypted: bool,
                progress: Callable[[Summary], None]) -> Summary:
    """Run a rekey over the configured bucket, calling `progress` after each object; raises
    ConfigError without encryption keys."""
    if settings.encryption is None:
        raise errors.ConfigError("rekey needs StorageEncryption enabled with a MasterKey")
    settings.cache_directory.mkdir(parents=True, exist_ok=True)
    backend = open_backend(settings)
    workdir = Path(tempfile.mkdtemp(prefix="rekey-", dir=settings.cache_directory))
    lock = None if dry_run else open_lock(settings, backend, "rekey")
    try:
        worker = Rekeyer(backend, settings.layout, settings.encryption.ring, workdir,
                         include_unencrypted, dry_run)
        if lock is None:
            return await worker.run(progress)
        holder = await lock.try_acquire()
        if holder is not None:
            raise LockHeld("objfs rekey", holder)
        log.info("cluster lock rekey taken by node %s", lock.node)
        lost = False

        def on_lost() -> None:
            nonlocal lost
            lost = True
            nursery.cancel_scope.cancel()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep, lock, on_lost)
                summary = await worker.run(progress)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await lock.release()
        if lost:
            raise errors.Unavailable("objfs rekey stopped: the cluster lock was lost; run it "
                                     "again (objects already rekeyed are skipped)")
        return summary
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        await backend.aclose()
