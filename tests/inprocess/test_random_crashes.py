"""Random runs of Orthanc's writes, reads and deletes with the store's background work
(uploads, deletes, checkpoints of the intent log, evictions, removal of deleted copies)
interleaved, each run ended by a crash: the process' memory is lost (the journal's kept
changes, the tier's pending removals, the queues), the disk stays as the process left it.
After each restart: every acknowledged attachment not deleted since reads back identical
and reaches the bucket, no deleted one is served or left in the bucket, and the cache's
accounting equals the bytes in `data/`.

The crash here comes between two of Orthanc's calls, at any point of the background work
(cancelled where it stood: trio runs its `finally` blocks, so this is gentler than SIGKILL,
which tests/test_crash_points.py sends at named points). What it covers is the order of the
durable and the kept steps across features that each keep something in memory: puts and
deletes in the intent log, upload ends and cache flags kept for a batch, deleted copies left
in place until the burst ends. Two variants go through `fs.Operations` (one in HybridMode) with
several clients at once and a model of the kernel's side (`Kernel`): the inodes it holds, and the
FORGETs it sends late."""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import os
import random
import sqlite3
import uuid as uuid_mod
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import pyfuse3
import pytest
import trio
import trio.testing

import objfs.store.core
from objfs import codec, errnos, errors, fs, intentlog
from objfs.cache import CLEAN, DOWNLOADS_SYNCED
from objfs.journal import Journal, Row
from objfs.store.state import SHARED_CONFIRM_TTL, WriteHandle
from tests.inprocess.conftest import Rig
from tests.inprocess.faults import Mode
from tests.inprocess.test_operations import CTX

# Seeds per variant; OBJFS_TEST_SEEDS asks for more (a longer hunt than CI's).
SEEDS = range(int(os.environ.get("OBJFS_TEST_SEEDS", "8")))
# How many of the model's last calls a failure prints (OBJFS_TEST_LOG_LINES: more, to see
# a name's whole history).
LOG_LINES = int(os.environ.get("OBJFS_TEST_LOG_LINES", "60"))
RUNS = 3  # crashes per seed
STEPS = 40  # of Orthanc's calls per run
# Sizes of new attachments, bytes.
SIZES = [1, 700, 4096, 70_000, 400_000, 1_500_000, 3_000_000]


# How long a worker thread's call takes in the runs with slow threads, seconds (mock clock).
THREAD_DELAYS = [0, 0, 0, 0.0002, 0.002, 0.02, 0.2]


def slow_threads(monkeypatch: pytest.MonkeyPatch, rnd: random.Random) -> None:
    """Worker-thread calls that take time, as on a real machine (the in-process tests
    otherwise run them at once on the loop): each holds its `CapacityLimiter` token while it
    runs, and the journal's calls run one at a time (its connection's lock), so a slow
    commit holds up the journal calls of other tasks behind it. As with trio, a call whose
    caller is cancelled (a deadline, the crash) runs to its end, unless it was started with
    `abandon_on_cancel` (then it is cut short before it ran: the crash came first). What a
    task does on the loop while its call runs (`thread_meanwhile`'s `meanwhile`) comes
    first."""
    locks: dict[int, trio.Lock] = {}

    async def call(fn: Callable[[], object], limiter: trio.CapacityLimiter | None,
                   abandon: bool) -> object:
        owner = getattr(getattr(fn, "func", fn), "__self__", None)
        serial = locks.setdefault(id(owner), trio.Lock()) if isinstance(owner, Journal) \
            else None
        async with contextlib.AsyncExitStack() as stack:
            if limiter is not None:
                await stack.enter_async_context(limiter)
            if serial is not None:
                await stack.enter_async_context(serial)
            with trio.CancelScope(shield=not abandon):
                await trio.sleep(rnd.choice(THREAD_DELAYS))
                return fn()

    async def run_sync(fn: Callable[..., object], *args: object,
                       limiter: trio.CapacityLimiter | None = None,
                       abandon_on_cancel: bool = False) -> object:
        return await call(functools.partial(fn, *args) if args else fn, limiter,
                          abandon_on_cancel)

    async def meanwhile_too(fn: Callable[[], None], meanwhile: Callable[[], None],
                            limiter: trio.CapacityLimiter) -> None:
        async with limiter:
            meanwhile()
            await call(fn, None, False)

    monkeypatch.setattr(trio.to_thread, "run_sync", run_sync)
    monkeypatch.setattr(objfs.store.core, "thread_meanwhile", meanwhile_too)


class PowerLoss:
    """A power loss: the journal's WAL as it stood after the last commit that was synced (on
    the journal's durable connection, `synchronous=FULL`), the lazy commits after it
    (`synchronous=NORMAL`: written, never synced) lost; auto-checkpoints are off, so the WAL
    only grows and its synced part is a prefix. The intent log's writes are synchronous
    (`O_DSYNC`) and kept; so are the local copies Orthanc's fsync made durable. A download's
    copy is synced by the tier's next checkpoint only (`LocalTier.checkpoint`): one placed
    since the last checkpoint the synced journal records comes back zero-filled, its size and
    time kept (its blocks never written)."""

    def __init__(self, rig: Rig) -> None:
        journal = rig.journal
        self.path = journal.path
        self.wal = journal.path.with_name(journal.path.name + "-wal")
        for db in {journal._db, journal._lazy}:
            db.execute("PRAGMA wal_autocheckpoint=0")
        self.synced = self._size()
        durable = journal._db
        plain, many = durable.execute, durable.executemany

        def execute(sql: str, parameters: object = (), /) -> sqlite3.Cursor:
            cursor = plain(sql, parameters)
            self.synced = self._size()
            return cursor

        def executemany(sql: str, parameters: object, /) -> sqlite3.Cursor:
            cursor = many(sql, parameters)
            self.synced = self._size()
            return cursor

        durable.execute = execute  # type: ignore[method-assign]
        durable.executemany = executemany  # type: ignore[method-assign]
        self.rig = rig
        # Copies placed by downloads: uuid -> the file's inode. A later write of the name
        # makes a file of its own, which Orthanc's fsync syncs: it forgets the download.
        self.downloaded: dict[str, int] = {}
        download, create = rig.store._download, rig.store.create

        async def noted(row: Row, background: bool = False) -> None:
            await download(row, background)
            self.downloaded[row.uuid] = rig.tier.path(row.uuid).stat().st_ino

        async def created(uuid: str) -> WriteHandle:
            self.downloaded.pop(uuid, None)
            return await create(uuid)

        rig.store._download = noted  # type: ignore[method-assign]
        rig.store.create = created  # type: ignore[method-assign]

    def _size(self) -> int:
        return self.wal.stat().st_size if self.wal.exists() else 0

    def lose_power(self) -> Rig:
        """`Rig.crashed`, with the WAL cut back to its synced part (closing the connections
        would checkpoint it into the database: the files are put back as they were)."""
        database = self.path.read_bytes()
        wal = self.wal.read_bytes()[:self.synced] if self.wal.exists() else b""

        def put_back() -> None:
            self.path.write_bytes(database)
            self.wal.write_bytes(wal)
            self.path.with_name(self.path.name + "-shm").unlink(missing_ok=True)
            self._lose_downloads()

        return self.rig.crashed(put_back)

    def _lose_downloads(self) -> None:
        """Zero-fill the downloaded copies placed since the synced journal's last checkpoint
        of the tier (by their time, as `LocalTier.recover` tells them)."""
        db = sqlite3.connect(self.path)
        try:
            found = db.execute("SELECT value FROM meta WHERE name=?",
                               (DOWNLOADS_SYNCED,)).fetchone()
        finally:
            db.close()
        if found is None or found[0] == CLEAN:
            return
        for uuid, inode in self.downloaded.items():
            copy = self.rig.tier.path(uuid)
            try:
                st = copy.stat()
            except FileNotFoundError:
                continue
            if st.st_ino == inode and st.st_mtime >= float(found[0]):
                copy.write_bytes(bytes(st.st_size))
                os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))


class Calls(Protocol):
    """Orthanc's calls for one attachment, as the store sees them or through `fs.Operations`."""

    rig: Rig

    async def write(self, uuid: str, data: bytes) -> None: ...

    async def read(self, uuid: str) -> bytes: ...

    async def unlink(self, uuid: str) -> None: ...


class StoreCalls:
    """The store's own calls (`Rig.write`, `Rig.read`, `Store.unlink`)."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig

    async def write(self, uuid: str, data: bytes) -> None:
        await self.rig.write(uuid, data)

    async def read(self, uuid: str) -> bytes:
        return await self.rig.read(uuid)

    async def unlink(self, uuid: str) -> None:
        await self.rig.store.unlink(uuid)


def errno_of(exc: BaseException) -> int | None:
    """The errno Orthanc would see for a failed call of either kind of `Calls`."""
    if isinstance(exc, pyfuse3.FUSEError | OSError):
        return exc.errno
    if isinstance(exc, errors.ObjfsError):
        return errnos.errno_for(exc)
    return None


class Model:
    """What Orthanc was told: acknowledged contents by uuid, and the deleted uuids; each call
    is noted in `log`, prefixed by `who` (a node or a client). Names in `busy` have a write,
    delete or move under way (Orthanc's database never has two at once on one attachment;
    reads may overlap them, as a download does a delete). `versions` counts each name's writes
    and deletes. `weather` counts the starts and ends of bucket outages; `outage` is held by
    the one under way."""

    def __init__(self) -> None:
        self.live: dict[str, bytes] = {}
        self.deleted: set[str] = set()
        self.log: list[str] = []
        self.failed: set[str] = set()  # writes not acknowledged
        # With `forgets_failed_deletes`, names whose delete failed: Orthanc forgets an
        # attachment whatever its unlink answers (its file an orphan), so nothing may ask for
        # them again; they may stay in either tier, or go (a move that finds the delete's
        # tombstone undoes itself: docs/scale-out.md).
        self.forgets_failed_deletes = False
        self.abandoned: set[str] = set()
        # Writes, deletes and moves under way: ("write", data), ("unlink", None) or (a move,
        # None) by name. A crash in the middle leaves them to `resolve`.
        self.inflight: dict[str, tuple[str, bytes | None]] = {}
        self.steps = 0  # calls begun, by all clients
        # The step at which a crash is set off in the middle of calls, and what sets it off.
        self.crash_at: tuple[int, Callable[[], None]] | None = None
        self.busy: set[str] = set()
        self.versions: collections.Counter[str] = collections.Counter()
        self.weather = 0
        self.outage = trio.Lock()

    def pick(self, rnd: random.Random, names: Iterable[str]) -> str | None:
        """A random name of `names` with no call under way, claimed (`busy`), or None."""
        free = sorted(set(names) - self.busy)
        if not free:
            return None
        uuid = rnd.choice(free)
        self.busy.add(uuid)
        return uuid

    def release(self, uuid: str) -> None:
        """The call on `uuid` ended: its name is free again, unless the crash cut it short
        (still in `inflight`): then it stays claimed until `resolve`, so that no other
        client's call, begun before the crash reached it, takes the record of the cut one."""
        if uuid not in self.inflight:
            self.busy.discard(uuid)

    async def resolve(self, rig: Rig) -> None:
        """After a crash that came in the middle of writes, deletes or moves: a write or delete
        reads back whole or not at all (never cut short), and the model takes what it finds; a
        move reads back whole and is run again, as its job would be."""
        for uuid, (kind, data) in sorted(self.inflight.items()):
            try:
                found: bytes | None = await rig.read(uuid)
            except errors.NotFound:
                found = None
            if kind.startswith("move"):
                # The job that was moving it runs again after the restart.
                assert found == self.live[uuid], f"{uuid}, moved when the crash came"
                await _move(rig, kind, uuid)
                self.log.append(f"{kind} of {uuid} cut by the crash: done again")
                continue
            if kind == "write":
                assert found is None or found == data, (
                    f"{uuid}, written when the crash came: {len(found)} of {len(data or b'')} "
                    "bytes, or others")
                if found is not None:
                    self.live[uuid] = found
                    self.deleted.discard(uuid)
                elif uuid not in self.deleted:
                    self.failed.add(uuid)
            else:
                assert found is None or found == self.live[uuid], (
                    f"{uuid}, deleted when the crash came")
                if found is None:
                    del self.live[uuid]
                    self.deleted.add(uuid)
            self.versions[uuid] += 1
            self.log.append(f"{kind} of {uuid} cut by the crash: "
                            f"{'absent' if found is None else 'present'}")
        self.busy -= set(self.inflight)
        self.inflight.clear()

    def stormy(self, since: int) -> bool:
        """Whether an outage was under way at some point since `weather` was `since`."""
        return self.outage.locked() or self.weather != since

    async def write(self, calls: Calls, data: bytes, who: str = "") -> None:
        """A new attachment. One that fails is noted in `failed` (it must leave nothing).
        While the bucket is down, ENOSPC is expected (the cache fills with what cannot be
        uploaded, and CacheFullTimeout ends the wait for room), and so is EIO until the first
        inventory is done (a name the journal does not know is looked up in the bucket)."""
        uuid = str(uuid_mod.uuid4())
        self.busy.add(uuid)
        self.inflight[uuid] = ("write", data)
        since, listed = self.weather, calls.rig.store.inventory_done
        try:
            await calls.write(uuid, data)
        except trio.Cancelled:
            raise  # the crash came in the middle: `resolve` finds out what it left
        except BaseException as exc:
            del self.inflight[uuid]
            self.failed.add(uuid)
            code = errno_of(exc)
            if code == errno.ENOSPC and self.stormy(since):
                self.log.append(f"{who}write {uuid} {len(data)}: ENOSPC in an outage")
                return
            if code == errno.EIO and self.stormy(since) and not listed:
                self.log.append(f"{who}write {uuid} {len(data)}: EIO in an outage, unlisted")
                return
            raise
        else:
            del self.inflight[uuid]
        finally:
            self.release(uuid)
        self.live[uuid] = data
        self.versions[uuid] += 1
        self.log.append(f"{who}write {uuid} {len(data)}")

    async def unlink(self, calls: Calls, rnd: random.Random, who: str = "") -> None:
        uuid = self.pick(rnd, self.live)
        if uuid is None:
            return
        self.inflight[uuid] = ("unlink", None)
        since, listed = self.weather, calls.rig.store.inventory_done
        try:
            await calls.unlink(uuid)
        except trio.Cancelled:
            raise
        except BaseException as exc:
            del self.inflight[uuid]
            if errno_of(exc) == errno.EIO and self.stormy(since) and not listed:
                # Until the first inventory is done only the bucket can tell whether it
                # holds an object of the name too (docs/durability.md, invariant 9): the
                # delete fails, having removed nothing.
                self.log.append(f"{who}unlink {uuid}: EIO in an outage, unlisted")
                self.delete_failed(uuid)
                return
            raise
        else:
            del self.inflight[uuid]
        finally:
            self.release(uuid)
        del self.live[uuid]
        self.deleted.add(uuid)
        self.versions[uuid] += 1
        self.log.append(f"{who}unlink {uuid}")

    def delete_failed(self, uuid: str) -> None:
        """Orthanc's delete of live `uuid` failed: with `forgets_failed_deletes` it is
        `abandoned`, else it stays live (the stricter check: a failed delete removed
        nothing)."""
        if self.forgets_failed_deletes:
            del self.live[uuid]
            self.abandoned.add(uuid)

    async def read(self, calls: Calls, rnd: random.Random, who: str = "") -> None:
        """A read of a live name; another client may delete it meanwhile (and write it
        again): then the read finds it gone (also while that delete has yet to return: the
        two calls overlap, and either may come first), or reads the old file or the new one
        whole."""
        uuid = rnd.choice(sorted(self.live))
        expected, version, since = self.live[uuid], self.versions[uuid], self.weather
        try:
            data = await calls.read(uuid)
        except (errors.ObjfsError, pyfuse3.FUSEError) as exc:
            code = errno_of(exc)
            deleting = self.inflight.get(uuid, ("", None))[0] == "unlink"
            if code == errno.ENOENT and (self.versions[uuid] != version or deleting):
                self.log.append(f"{who}read {uuid}: ENOENT, deleted meanwhile")
                return
            # Another client's outage: a copy not cached cannot be read meanwhile.
            assert code == errno.EIO and self.stormy(since), f"{who}read {uuid}: {exc!r}"
            self.log.append(f"{who}read {uuid}: EIO in an outage")
            return
        assert data == expected or (self.versions[uuid] != version and
                                    data == self.live.get(uuid)), f"{who}read {uuid}"
        self.log.append(f"{who}read {uuid}")


class Kernel:
    """Orthanc's syscalls as the kernel passes them to `fs.Operations`, with the kernel's
    state that matters for them: the dentry cache (a name's inode, kept until the name is
    unlinked or the cache drops it), each inode's lookup count and open handles, and FORGETs,
    which the kernel queues and sends later (`send_forgets`). Directories always exist and are
    never counted. The writeback cache sends a file's data at the fsync, in large pieces.

    It checks what would confuse the real kernel: a reply that names an inode the kernel still
    holds for another file (it would reuse that inode, its size and its cached pages)."""

    def __init__(self, rig: Rig, passthrough: Path, rnd: random.Random) -> None:
        passthrough.mkdir(exist_ok=True)
        self.rig = rig
        self.ops = fs.Operations(rig.store, passthrough, os.getuid(), os.getgid(), 0o750,
                                 rig.tally)
        self.rnd = rnd
        self.dentries: dict[str, int] = {}
        self.held: dict[int, str] = {}  # inode -> the name it was given for
        self.gone: set[int] = set()  # held inodes whose file is gone (unlinked, replaced)
        self.lookups: dict[int, int] = {}
        self.opened: dict[int, int] = {}
        self.forgets: list[tuple[int, int]] = []
        # A directory's i_rwsem: its LOOKUPs, CREATEs and UNLINKs one at a time (the kernel
        # lets lookups share it; one at a time is stricter, never looser).
        self.dir_locks: collections.defaultdict[str, trio.Lock] = collections.defaultdict(
            trio.Lock)

    def _took(self, uuid: str, entry: pyfuse3.EntryAttributes) -> int:
        inode = entry.st_ino
        assert inode not in self.gone and self.held.get(inode, uuid) == uuid, (
            f"inode {inode} given for {uuid} while the kernel holds it for "
            f"{'the gone file' if inode in self.gone else 'the file'} {self.held[inode]}")
        self.held[inode] = uuid
        self.lookups[inode] = self.lookups.get(inode, 0) + 1
        self.dentries[uuid] = inode
        return inode

    def _let_go(self, inode: int) -> None:
        """The kernel drops an inode neither named nor open: its FORGET is queued."""
        if self.opened.get(inode) or (
                inode not in self.gone and self.dentries.get(self.held[inode]) == inode):
            return
        del self.held[inode]
        self.gone.discard(inode)
        self.forgets.append((inode, self.lookups.pop(inode)))

    def drop_dentries(self) -> None:
        """Memory pressure: some cached names are dropped."""
        for uuid, inode in sorted(self.dentries.items()):
            if self.rnd.random() < 0.3:
                del self.dentries[uuid]
                self._let_go(inode)

    def invalidate(self, parent: int, name: bytes, ignore_enoent: bool = False) -> None:
        """`pyfuse3.invalidate_entry_async`: the kernel drops a cached name (a failed write
        left no file)."""
        inode = self.dentries.pop(name.decode(), None)
        if inode is not None:
            self.gone.add(inode)
            self._let_go(inode)

    async def send_forgets(self) -> None:
        forgets, self.forgets = self.forgets, []
        if forgets:
            await self.ops.forget(forgets)

    @staticmethod
    def _folder(uuid: str) -> int:
        return fs._dir_inode(uuid[:4])

    async def write(self, uuid: str, data: bytes) -> None:
        folder = self._folder(uuid)
        if uuid not in self.dentries:  # Orthanc's stat: the name is new
            async with self.dir_locks[uuid[:4]]:
                entry = await self.ops.lookup(folder, uuid.encode(), CTX)
            assert entry.st_ino == 0, f"{uuid} exists before its write"
        async with self.dir_locks[uuid[:4]]:
            info, entry = await self.ops.create(folder, uuid.encode(), 0o666,
                                                os.O_WRONLY | os.O_CREAT | os.O_TRUNC, CTX)
        stale = self.dentries.pop(uuid, None)
        if stale is not None:  # deleted elsewhere: the cached name made way for the new file
            self.gone.add(stale)
            self._let_go(stale)
        inode = self._took(uuid, entry)
        self.opened[inode] = self.opened.get(inode, 0) + 1
        try:
            piece = self.rnd.choice([4096, 131_072, 1 << 20])
            for off in range(0, len(data), piece):
                assert await self.ops.write(info.fh, off, data[off:off + piece]) == len(
                    data[off:off + piece])
            await self.ops.fsync(info.fh, True)
            await self.ops.flush(info.fh)
        finally:
            await self.ops.release(info.fh)
            self.opened[inode] -= 1
            self._let_go(inode)

    async def read(self, uuid: str) -> bytes:
        inode = self.dentries.get(uuid)
        if inode is None:
            async with self.dir_locks[uuid[:4]]:
                entry = await self.ops.lookup(self._folder(uuid), uuid.encode(), CTX)
            if entry.st_ino == 0:
                raise pyfuse3.FUSEError(errno.ENOENT)
            inode = self._took(uuid, entry)
        # From the path walk on, the open holds the inode (an unlink or a dropped name
        # meanwhile does not let it go).
        self.opened[inode] = self.opened.get(inode, 0) + 1
        try:
            info = await self.ops.open(inode, os.O_RDONLY, CTX)
        except BaseException:
            self.opened[inode] -= 1
            self._let_go(inode)
            raise
        try:
            chunks = []
            while chunk := await self.ops.read(info.fh, sum(map(len, chunks)), 131_072):
                chunks.append(chunk)
                if self.rnd.random() < 0.1:  # a slow HTTP client: the file stays open
                    await trio.sleep(self.rnd.choice([0.5, 3.0, 10.0]))
            return b"".join(chunks)
        finally:
            await self.ops.release(info.fh)
            self.opened[inode] -= 1
            self._let_go(inode)

    async def unlink(self, uuid: str) -> None:
        """Orthanc's delete: the file, then its two directories if they are empty."""
        async with self.dir_locks[uuid[:4]]:
            await self.ops.unlink(self._folder(uuid), uuid.encode(), CTX)
            inode = self.dentries.pop(uuid, None)
        if inode is not None:
            self.gone.add(inode)
            self._let_go(inode)
        for parent, name in ((fs._dir_inode(uuid[:2]), uuid[2:4]),
                             (pyfuse3.ROOT_INODE, uuid[:2])):
            try:
                await self.ops.rmdir(parent, name.encode(), CTX)
            except pyfuse3.FUSEError as exc:
                assert exc.errno == errno.ENOTEMPTY, exc


async def _step(rig: Rig, calls: Calls, model: Model, rnd: random.Random,
                who: str = "") -> None:
    """One of Orthanc's calls (or a pause that lets background work run), by client `who`."""
    model.steps += 1
    if model.crash_at is not None and model.steps == model.crash_at[0]:
        model.crash_at[1]()
        model.crash_at = None
    choice = rnd.random()
    if choice < 0.45 or not model.live:
        await model.write(calls, rnd.randbytes(rnd.choice(SIZES)), who)
    elif choice < 0.65:
        await model.unlink(calls, rnd, who)
    elif choice < 0.80:
        await model.read(calls, rnd, who)
    elif choice < 0.85 and model.deleted:
        # Orthanc never writes a name twice; a copy put back through the mount can.
        uuid = model.pick(rnd, model.deleted)
        if uuid is None:
            return
        data, since = rnd.randbytes(5000), model.weather
        model.inflight[uuid] = ("write", data)
        try:
            await calls.write(uuid, data)
        except trio.Cancelled:
            raise
        except (OSError, errors.ObjfsError, pyfuse3.FUSEError) as exc:
            del model.inflight[uuid]
            # EBUSY: its bucket delete is still to come.
            assert errno_of(exc) == errno.EBUSY or (
                errno_of(exc) == errno.ENOSPC and model.stormy(since)), exc
            model.log.append(f"{who}rewrite {uuid}: {errno.errorcode[errno_of(exc) or 0]}")
        else:
            del model.inflight[uuid]
            model.deleted.discard(uuid)
            model.live[uuid] = data
            model.versions[uuid] += 1
            model.log.append(f"{who}rewrite {uuid}")
        finally:
            model.release(uuid)
    elif choice < 0.87 and rig.store.fs is not None:
        uuid = model.pick(rnd, model.live)
        if uuid is None:
            return
        kind = "move to the bucket" if rig.store.fs.stat(uuid) is not None else \
            "move to the file-system tier"
        model.inflight[uuid] = (kind, None)
        since = model.weather
        try:
            try:
                await _move(rig, kind, uuid)
            except errors.Unavailable:
                # Another client's outage: the job fails (both copies as they were), and the
                # administrator runs it again once the bucket is back.
                assert model.stormy(since)
                model.log.append(f"{who}{kind} {uuid}: Unavailable")
                async with model.outage:
                    await _move(rig, kind, uuid)
        except trio.Cancelled:
            raise  # the crash came in the middle: its job runs again after the restart
        else:
            del model.inflight[uuid]
        finally:
            model.release(uuid)
        model.log.append(f"{who}{kind} {uuid}")
    elif choice < 0.90 and not model.outage.locked():
        async with model.outage:
            await _outage(rig, calls, model, rnd, who)
    elif isinstance(calls, Kernel) and choice < 0.95:
        if rnd.random() < 0.3:
            calls.drop_dentries()
            model.log.append(f"{who}kernel drops cached names")
        await calls.send_forgets()
    else:
        pause = rnd.choice([0.01, 0.2, 0.6, 3.0])
        await trio.sleep(pause)
        model.log.append(f"{who}pause {pause}")


async def _move(rig: Rig, kind: str, uuid: str) -> None:
    if kind == "move to the bucket":
        await rig.store.move_to_object_storage(uuid)
    else:
        await rig.store.move_to_file_system(uuid)


async def _outage(rig: Rig, calls: Calls, model: Model, rnd: random.Random, who: str) -> None:
    """The bucket down for a while: writes and deletes go on locally, the background work
    fails or times out, and retries. (No read here: one of a copy not cached would fail;
    other clients' reads may, and say EIO.)"""
    model.weather += 1
    if rnd.random() < 0.5:
        rig.backend.set(Mode.UNAVAILABLE)
        model.log.append(f"{who}outage begins (errors)")
    else:
        # Reads that never answer (the callers' deadlines end them; a real backend's
        # request timeout ends every call, which this stand-in has not), writes failing.
        rig.backend.set(Mode.HANG, "get", "head", "list")
        rig.backend.set(Mode.UNAVAILABLE, "put", "delete", "copy")
        model.log.append(f"{who}outage begins (hung reads)")
    try:
        for _ in range(rnd.randrange(1, 6)):
            if model.live and rnd.random() < 0.3:
                await model.unlink(calls, rnd, who)
            else:
                await model.write(calls, rnd.randbytes(rnd.choice([10, 90_000])), who)
            await trio.sleep(rnd.choice([0, 0.5, 2.0]))
    finally:
        rig.backend.set(Mode.OK)
        model.weather += 1
    model.log.append(f"{who}outage ends")


async def _run(rig: Rig, calls: Calls, model: Model, rnd: random.Random,
               clients: int = 1) -> None:
    """STEPS calls by `clients` clients at once with the store's workers running, then the
    crash: the workers are cancelled wherever they stand, once the clients are done or, in a
    third of the runs, at a random point that may be in the middle of their calls."""

    async def client(number: int) -> None:
        for _ in range(STEPS // clients):
            await _step(rig, calls, model, rnd, f"client {number}: " if clients > 1 else "")

    async def crash_mid_call() -> None:
        # Some scheduling points later: within the call that just began (or the next ones),
        # wherever it stands then.
        for _ in range(rnd.randrange(25)):
            await trio.lowlevel.checkpoint()
        model.log.append(f"the crash comes with {sorted(model.inflight)} under way")
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        await nursery.start(rig.store.run)
        if rnd.random() < 1 / 3:
            model.crash_at = (model.steps + rnd.randrange(STEPS),
                              lambda: nursery.start_soon(crash_mid_call))
        async with trio.open_nursery() as orthanc:
            for number in range(clients):
                orthanc.start_soon(client, number)
        # Let the background reach a random point of its work before the crash.
        await trio.sleep(rnd.choice([0, 0.001, 0.05, 0.3, 1.0]))
        nursery.cancel_scope.cancel()


def _copies_bytes(rig: Rig) -> int:
    """The bytes of the local copies as the budget counts them: plaintext sizes (a sealed
    copy takes A1's overhead more on disk)."""
    total = 0
    for path in rig.tier.data.iterdir():
        row = rig.journal.get(path.name)
        sealed = row is not None and row.sealed
        total += path.stat().st_size - (codec.OVERHEAD if sealed else 0)
    return total


async def _check(rig: Rig, model: Model) -> None:
    """What a restart must show, before and after its workers drained."""
    assert rig.tier.used == _copies_bytes(rig), "cache accounting after the restart"
    async with trio.open_nursery() as nursery:
        # Workers running: a read of an evicted copy may need room that only uploads make.
        await nursery.start(rig.store.run)
        await model.resolve(rig)
        for uuid, data in model.live.items():
            assert await rig.read(uuid) == data, f"acknowledged {uuid} after the restart"
        for uuid in model.deleted | model.failed:
            with pytest.raises(errors.NotFound):
                await rig.read(uuid)
        assert await rig.store.drain(timeout=120)
        nursery.cancel_scope.cancel()
    bucket = rig.attachments_in_bucket()
    tier = rig.store.fs
    if tier is None:
        assert set(bucket) == set(model.live), "the bucket after the drain"
    else:
        # HybridMode: each live attachment in the bucket or the file-system tier (both
        # after a crash in the middle of a move), no deleted one in either.
        assert set(bucket) <= set(model.live), "the bucket after the drain"
        assert not [u for u in model.deleted if tier.stat(u) is not None]
        assert not [u for u in model.live if u not in bucket and tier.stat(u) is None]
    for uuid, data in bucket.items():
        assert data == model.live[uuid], uuid
    assert rig.tier.used == _copies_bytes(rig), "cache accounting after the drain"


@pytest.mark.parametrize("variant", ["plain", "encrypted", "sealed", "hybrid", "hybrid-bucket",
                                     "hybrid-encrypted", "fuse", "fuse-hybrid"])
@pytest.mark.parametrize("seed", SEEDS)
async def test_a_crash_at_a_random_point_loses_nothing_acknowledged(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, seed: int, variant: str) -> None:
    """Objects stored as they are, with A1 encryption, with the local copies sealed too
    (EncryptLocalCache), in HybridMode (new attachments in the file-system tier, or in the
    bucket in "hybrid-bucket"; moves between the tiers among the calls; in "hybrid-encrypted"
    A1 in the bucket and in the file-system tier, EncryptFileSystemTier), and through
    `fs.Operations` with a model of the kernel's inodes (`Kernel`; "fuse-hybrid" in HybridMode,
    new attachments in the file-system tier). One client calls at a
    time in the plain runs, two at once in the others, three through `fs.Operations`. Every
    third seed with an intent log of 8
    slots (it fills: durable commits instead, checkpoints because it is half full); in a random
    third of the runs deletes commit in SQLite instead of the log (what a slow disk makes the
    store do). In the odd seeds, worker-thread calls take time (`slow_threads`)."""
    rnd = random.Random(f"{variant} {seed}")
    if seed % 3 == 0:
        monkeypatch.setattr(intentlog, "SLOTS", 8)
    if seed % 2 == 1:
        slow_threads(monkeypatch, random.Random(f"threads {variant} {seed}"))
    options: dict[str, object] = {}
    hybrid = "hybrid" in variant
    if hybrid:
        options.update(HybridMode="WriteToObjectStorage" if variant == "hybrid-bucket"
                       else "WriteToFileSystem", FileSystemDirectory=str(tmp_path / "fs-tier"))
    if variant in ("encrypted", "sealed", "hybrid-encrypted"):
        key = tmp_path / "master.key"
        codec.write_key_file(key)
        options["StorageEncryption"] = {"MasterKey": [1, str(key)]}
        options["EncryptLocalCache"] = variant == "sealed"
    # 16 MiB of cache: the runs' copies outgrow it, so eviction runs too.
    rig = rig_factory(**options)
    if rig.store.fs is not None:
        rig.store.fs.prepare()
    model = Model()
    for run in range(RUNS):
        try:
            rig.store._log_deletes = rnd.random() >= 1 / 3
            model.log.append(f"run {run}, deletes logged: {rig.store._log_deletes}")
            power = not hybrid and rnd.random() < 0.5
            wal = PowerLoss(rig) if power else None
            if variant.startswith("fuse"):
                kernel = Kernel(rig, tmp_path / "passthrough", rnd)
                monkeypatch.setattr(pyfuse3, "invalidate_entry_async", kernel.invalidate)
                await _run(rig, kernel, model, rnd, 3)
            else:
                await _run(rig, StoreCalls(rig), model, rnd, 1 if variant == "plain" else 2)
            rig = wal.lose_power() if wal is not None else rig.crashed()
            model.log.append(f"{'power loss' if power else 'crash'} {run}")
            await _check(rig, model)
        except BaseException:
            print(f"seed {seed}, run {run}:", *model.log[-LOG_LINES:], sep="\n  ")
            raise


class Mover:
    """HybridMode: the move-storage job of a SharedBucket pair, one attachment at a time on
    one node (the cluster lock), in the background of Orthanc's calls, which may delete the
    attachment it moves through either node meanwhile. A crash cuts the move where it stood
    (its job is not run again here)."""

    def __init__(self, nursery: trio.Nursery, model: Model) -> None:
        self.nursery = nursery
        self.model = model
        self.running = False

    def start(self, rig: Rig, uuid: str, who: str) -> None:
        assert rig.store.fs is not None
        kind = "move to the bucket" if rig.store.fs.stat(uuid) is not None else \
            "move to the file-system tier"
        self.running = True
        self.model.log.append(f"{who}{kind} {uuid} begins")
        self.nursery.start_soon(self._run, rig, kind, uuid, who)

    async def _run(self, rig: Rig, kind: str, uuid: str, who: str) -> None:
        try:
            await _move(rig, kind, uuid)
        except (errors.NotFound, errors.Unavailable) as exc:
            # Deleted through either node meanwhile (or before it began); the bucket down.
            gone = self.model.deleted | self.model.abandoned
            assert isinstance(exc, errors.Unavailable) or uuid in gone or \
                self.model.inflight.get(uuid, ("", None))[0] == "unlink", f"{kind} {uuid}: {exc!r}"
            self.model.log.append(f"{who}{kind} {uuid}: {type(exc).__name__}")
        else:
            self.model.log.append(f"{who}{kind} {uuid} ends")
        finally:
            self.running = False


async def _node_step(nodes: list[Rig], model: Model, rnd: random.Random,
                     mover: Mover | None = None) -> None:
    """One of Orthanc's calls on a random node of a SharedBucket pair (Orthanc's database is
    shared: a name deleted on one node is never asked for again on either), or with a
    `mover`, now and then the start of a move."""
    at = rnd.randrange(len(nodes))
    rig = nodes[at]
    choice = rnd.random()
    who = f"node {at}: "
    if mover is not None and not mover.running and model.live and choice > 0.9:
        mover.start(rig, rnd.choice(sorted(model.live)), who)
        return
    if choice < 0.45 or not model.live:
        # Written through: in the bucket once acknowledged.
        await model.write(StoreCalls(rig), rnd.randbytes(rnd.choice(SIZES[:-1])), who)
    elif choice < 0.65:
        await model.unlink(StoreCalls(rig), rnd, who)
    elif choice < 0.87:
        await model.read(StoreCalls(rig), rnd, who)
    elif choice < 0.92:
        await _shared_outage(nodes, model, rnd)
    else:
        pause = rnd.choice([0.01, 0.6, 3.0])
        await trio.sleep(pause)
        model.log.append(f"pause {pause}")


async def _shared_outage(nodes: list[Rig], model: Model, rnd: random.Random) -> None:
    """The shared bucket down for a while, for both nodes. A write fails (written through: it
    needs the bucket) and must leave nothing behind; a delete may fail (the name must be
    looked up) or be journaled; either way Orthanc learns which."""
    for rig in nodes:
        rig.backend.set(Mode.UNAVAILABLE)
    model.log.append("outage begins")
    for _ in range(rnd.randrange(1, 5)):
        at = rnd.randrange(len(nodes))
        rig, who = nodes[at], f"node {at}: "
        if model.live and rnd.random() < 0.4:
            uuid = rnd.choice(sorted(model.live))
            model.inflight[uuid] = ("unlink", None)
            try:
                await rig.store.unlink(uuid)
            except errors.Unavailable:
                model.log.append(f"{who}unlink {uuid}: Unavailable")
                model.delete_failed(uuid)
            else:
                del model.live[uuid]
                model.deleted.add(uuid)
                model.log.append(f"{who}unlink {uuid}")
            finally:
                del model.inflight[uuid]
        else:
            uuid = str(uuid_mod.uuid4())
            with pytest.raises(errors.Unavailable):
                handle = await rig.store.create(uuid)
                try:
                    await rig.store.write(handle, 0, b"w" * 5000)
                    await rig.store.sync(handle)
                finally:
                    # Orthanc's close fails; the kernel still sends RELEASE.
                    await rig.store.close_write(handle)
            model.log.append(f"{who}write {uuid}: Unavailable")
        await trio.sleep(rnd.choice([0, 0.5, 2.0]))
    for rig in nodes:
        rig.backend.set(Mode.OK)
    model.log.append("outage ends")


@pytest.mark.parametrize("variant", ["objects", "sealed", "hybrid", "hybrid-encrypted"])
@pytest.mark.parametrize("seed", range(len(SEEDS) + 4))
async def test_two_nodes_on_one_bucket_lose_nothing_when_one_crashes(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, seed: int, variant: str) -> None:
    """SharedBucket: two nodes write, read and delete at random, the bucket goes down now and
    then, one of the nodes crashes now and then and starts again. Every acknowledged
    attachment reads back identical on both; once both have drained and the bound on cached
    copies (SHARED_CONFIRM_TTL) has passed, none deleted on either is served by either, and
    the bucket holds exactly the live ones. In HybridMode (one shared file-system tier;
    WriteToObjectStorage in the even seeds, WriteToFileSystem in the odd ones) a move job
    runs on one node at a time in the background, and Orthanc deletes what it moves through
    either node now and then: no tier keeps a deleted attachment, and every live one is in
    one. In "hybrid-encrypted" A1 in the bucket, and in the file-system tier in the seeds
    divisible by 4 (EncryptFileSystemTier), the other seeds' files there stored as they are;
    in "sealed" (no HybridMode) A1 in the bucket and in the local caches (EncryptLocalCache).
    In the odd seeds, worker-thread calls take time (`slow_threads`)."""
    hybrid = variant.startswith("hybrid")
    rnd = random.Random(f"shared {'' if variant == 'objects' else variant + ' '}{seed}")
    if seed % 2 == 1:
        slow_threads(monkeypatch, random.Random(f"threads shared {seed}"))
    bucket = str(tmp_path / "shared-bucket")
    options: dict[str, object] = {}
    if hybrid:
        options.update(HybridMode="WriteToFileSystem" if seed % 2 else "WriteToObjectStorage",
                       FileSystemDirectory=str(tmp_path / "fs-tier"),
                       SharedFileSystemTier=True)
    if variant in ("sealed", "hybrid-encrypted"):
        key = tmp_path / "master.key"
        codec.write_key_file(key)
        options["StorageEncryption"] = {"MasterKey": [1, str(key)]}
    if variant == "sealed":
        options["EncryptLocalCache"] = True
    if variant == "hybrid-encrypted":
        options["EncryptFileSystemTier"] = seed % 4 == 0
    nodes = [rig_factory(name, SharedBucket=True, NodeName=f"node-{name}", LocalBucket=bucket,
                         **options) for name in ("a", "b")]
    model = Model()
    model.forgets_failed_deletes = hybrid

    def prepared(rig: Rig) -> Rig:
        if rig.store.fs is not None:
            rig.store.fs.prepare()  # as the daemon's start does
        return rig

    for rig in nodes:
        prepared(rig)
    for run in range(RUNS):
        try:
            async with trio.open_nursery() as nursery:
                for rig in nodes:
                    await nursery.start(rig.store.run)
                mover = Mover(nursery, model) if hybrid else None
                for _ in range(STEPS):
                    await _node_step(nodes, model, rnd, mover)
                await trio.sleep(rnd.choice([0, 0.001, 0.3]))
                nursery.cancel_scope.cancel()
            crashed = rnd.randrange(len(nodes))
            nodes[crashed] = prepared(nodes[crashed].crashed())
            model.log.append(f"node {crashed} crashes")
            async with trio.open_nursery() as nursery:
                for rig in nodes:
                    await nursery.start(rig.store.run)
                for at, rig in enumerate(nodes):
                    for uuid, data in model.live.items():
                        assert await rig.read(uuid) == data, f"node {at}: {uuid}"
                for rig in nodes:
                    assert await rig.store.drain(timeout=120)
                # The other node serves a copy it has until its delete reached the bucket,
                # and a cached one for SHARED_CONFIRM_TTL more.
                await trio.sleep(SHARED_CONFIRM_TTL + 0.01)
                for rig in nodes:
                    for uuid in model.deleted:
                        with pytest.raises(errors.NotFound):
                            await rig.read(uuid)
                for rig in nodes:
                    # The copies those reads gave up are unlinked (and their budget given
                    # back) by the tier's worker: let it finish before the accounting check.
                    await rig.tier.doomed_removed()
                nursery.cancel_scope.cancel()
            in_bucket = set(nodes[0].attachments_in_bucket())
            fs_tier = nodes[0].store.fs
            if fs_tier is None:
                assert in_bucket == set(model.live), "the bucket after the drain"
            else:
                # A move cut by the crash may leave a live attachment in both tiers.
                in_fs = {uuid for first in fs_tier.children("") for second in
                         fs_tier.children(first) for uuid in fs_tier.children(first + second)}
                assert (in_bucket | in_fs) - model.abandoned == set(model.live), (
                    "the tiers after the drain")
            for rig in nodes:
                assert rig.tier.used == _copies_bytes(rig), "cache accounting"
        except BaseException:
            print(f"seed {seed}, run {run}:", *model.log[-LOG_LINES:], sep="\n  ")
            raise
