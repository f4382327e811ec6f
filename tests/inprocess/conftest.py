"""The in-process tier: the store, the local tier and the FUSE `Operations` object driven
directly under trio, with the local backend. No FUSE, no subprocess: these run where
/dev/fuse is absent.

Time is trio's `MockClock(autojump_threshold=0)` (pytest-trio's `autojump_clock`): a backoff,
a deadline or a write-back delay of minutes passes at once, and happens at the same virtual
moment on every run. For that, worker-thread hops run inline here (`inline_threads`): a real
thread would leave the run loop idle while it works, and the clock would jump past deadlines
that real work never reaches.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import objfs.store.core
from objfs import codec
from objfs.backends.local import LocalBackend
from objfs.cache import LocalTier
from objfs.config import Settings, settings_from_tree
from objfs.journal import Journal
from objfs.store import Store
from objfs.tally import Tally
from tests.inprocess.faults import FaultyBackend, Mode
from tests.support.crash import abandon

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

# Worker-thread calls to hold: function name -> an Event the call waits for before it runs.
# Races are reproduced by holding one step while another task acts.
HOLDS: dict[str, trio.Event] = {}


async def _inline(fn: Callable[..., Any], *args: Any, **_: Any) -> Any:
    hold = HOLDS.get(getattr(fn, "__name__", ""))
    if hold is not None:
        await hold.wait()
    await trio.lowlevel.checkpoint()
    return fn(*args)


async def _inline_meanwhile(fn: Callable[[], None], meanwhile: Callable[[], None],
                            limiter: trio.CapacityLimiter) -> None:
    """`thread_meanwhile` inline: `meanwhile` first (it runs while the real thread commits),
    then `fn`, held like any worker-thread call."""
    meanwhile()
    name = getattr(getattr(fn, "func", fn), "__name__", "")
    hold = HOLDS.get(name)
    if hold is not None:
        await hold.wait()
    await trio.lowlevel.checkpoint()
    fn()


@pytest.fixture
def holds() -> Iterator[dict[str, trio.Event]]:
    """Hold worker-thread steps by function name, e.g. ``holds["mark_pending_delete"]``."""
    yield HOLDS
    for event in HOLDS.values():
        event.set()
    HOLDS.clear()


REAL_SECONDS_PER_TEST = 60


class Hung(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise Hung(f"in-process test still running after {REAL_SECONDS_PER_TEST} real seconds: "
               "a wait that no deadline ends")


@pytest.fixture(autouse=True)
def watchdog() -> Iterator[None]:
    """A test that would wait forever (a missing deadline) fails instead of hanging the run."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(REAL_SECONDS_PER_TEST)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(autouse=True)
def inline_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trio.to_thread, "run_sync", _inline)
    monkeypatch.setattr(objfs.store.core, "thread_meanwhile", _inline_meanwhile)


class Rig:
    """A store on a local bucket behind a fault-injecting wrapper, with its parts."""

    def __init__(self, root: Path, objfs: dict[str, Any]) -> None:
        self.root = root
        self.objfs = objfs
        tree = {"Objfs": {"CacheDirectory": str(root / "cache"),
                          "LocalBucket": str(root / "bucket"), "CacheSize": 16,
                          "ReadTimeout": 20, "CacheFullTimeout": 30, **objfs}}
        self.settings: Settings = settings_from_tree(tree)
        cache = self.settings.cache_directory
        cache.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(cache / "journal.sqlite", copies=cache / LocalTier.DATA)
        self.tier = LocalTier(cache, self.settings.cache_size, self.journal,
                              self.settings.cache_full_timeout)
        self.tier.recover()
        self.local = LocalBackend(self.settings.local_bucket)
        self.backend = FaultyBackend(self.local)
        self.tally = Tally()
        # Idle CPUs the store's watcher sees at each sample (`objfs.cpuload`): none by default,
        # so that background work yields to Orthanc by time alone unless a test says so.
        self.idle_cpus: float | None = 0.0
        self.store = Store(self.settings, self.backend, self.journal, self.tier, self.tally,
                           idle_cpus=lambda: self.idle_cpus)

    def restarted(self) -> Rig:
        """The same directories opened again, as after a stop or crash (the caller's
        background workers must be stopped first)."""
        self.journal.close()
        return Rig(self.root, self.objfs)

    def crashed(self, meanwhile: Callable[[], None] | None = None) -> Rig:
        """The same directories opened again after the process died: what the journal kept
        in memory is lost (its SQLite commits and the intent log's writes are in the files),
        and so is the rest of the store's memory (the caller's background workers must be
        stopped first). `meanwhile` runs once the journal's connections are closed (to put
        its files back as a power loss would leave them)."""
        abandon(self.journal, meanwhile)
        return Rig(self.root, self.objfs)

    def bucket_files(self) -> dict[str, bytes]:
        bucket = self.settings.local_bucket
        return {str(p.relative_to(bucket)): p.read_bytes() for p in bucket.rglob("*")
                if p.is_file() and ".objfs-tmp" not in p.parts}

    def attachments_in_bucket(self) -> dict[str, bytes]:
        """The attachments in the bucket by uuid, as plaintext (A1 objects decrypted)."""
        found: dict[str, bytes] = {}
        encryption = self.settings.encryption
        for key, data in self.bucket_files().items():
            match = UUID.search(key)
            assert match is not None, key
            assert match.group(0) not in found, f"two objects for {match.group(0)}"
            if encryption is not None and codec.is_encrypted(data[:2]):
                sealed, plain = self.root / "sealed", self.root / "plain"
                sealed.write_bytes(data)
                codec.decrypt_file(sealed, plain, encryption.ring)
                data = plain.read_bytes()
            found[match.group(0)] = data
        return found

    async def write(self, uuid: str, data: bytes) -> None:
        """Orthanc's create, write, fdatasync and close of one attachment."""
        handle = await self.store.create(uuid)
        await self.store.write(handle, 0, data)
        await self.store.sync(handle)
        assert await self.store.close_write(handle)

    async def read(self, uuid: str) -> bytes:
        fd = await self.store.open_read(uuid)
        try:
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            self.store.close_read(uuid, fd)


def hybrid_rig(rig_factory: Callable[..., Rig], tmp_path: Path, mode: str) -> Rig:
    """A rig in HybridMode `mode`, its file-system tier under `tmp_path`, made ready."""
    rig = rig_factory("hybrid", HybridMode=mode, FileSystemDirectory=str(tmp_path / "fs-tier"))
    assert rig.store.fs is not None
    rig.store.fs.prepare()
    return rig


async def move_cut_after_its_put(rig: Rig, uuid: str, data: bytes) -> Rig:
    """`data` written as `uuid` by HybridMode `rig` (WriteToFileSystem), then moved to the
    bucket with a crash once the move's PUT is done (its read-back held at the gate): the
    rig opened again, its workers not started."""
    rig = await move_cut_at(rig, uuid, data, "move_to_object_storage", "get", Mode.GATED)
    assert data in rig.bucket_files().values()
    return rig


async def move_cut_at(rig: Rig, uuid: str, data: bytes, move: str, op: str,
                      mode: Mode) -> Rig:
    """`data` written as `uuid` by HybridMode `rig`, then moved by its store's method `move`
    with a crash once the move's first bucket call `op` is under way (`mode`: GATED, not yet
    done; ANSWER_GATED, done, its answer held): the rig opened again, its workers not
    started."""
    async with trio.open_nursery() as nursery:
        await nursery.start(rig.store.run)
        await rig.write(uuid, data)
        rig.backend.set(mode, op)
        nursery.start_soon(getattr(rig.store, move), uuid)
        while not rig.backend.calls[op]:
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    return rig.crashed()


async def moved_in_the_end(rig: Rig, uuid: str, data: bytes) -> None:
    """Wait until a move of `uuid` to the bucket by running HybridMode `rig` removed its
    file-system copy; then it must read back as `data`, and the drain end."""
    assert rig.store.fs is not None
    while rig.store.fs.stat(uuid) is not None:
        await trio.sleep(0.01)
    assert await rig.read(uuid) == data
    assert await rig.store.drain(timeout=60)


@pytest.fixture
def rig_factory(tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def make(name: str = "rig", **objfs: Any) -> Rig:
        rig = Rig(tmp_path / name, objfs)
        made.append(rig)
        return rig

    yield make
    for rig in made:
        with contextlib.suppress(Exception):
            rig.journal.close()


@pytest.fixture
async def running(nursery: trio.Nursery) -> AsyncIterator[Callable[[Rig], Awaitable[None]]]:
    """Start a rig's background workers (uploads, deletes, inventory) in the test's nursery."""

    async def start(rig: Rig) -> None:
        await nursery.start(rig.store.run)

    yield start
    nursery.cancel_scope.cancel()


@pytest.fixture
def gated_rig(rig_factory: Callable[..., Rig],
              running: Callable[[Rig], Awaitable[None]]) -> Callable[..., Awaitable[Rig]]:
    """A running rig whose uploads wait for `rig.backend.gate` (writes are acknowledged
    locally; nothing reaches the bucket until the test opens the gate)."""

    async def make(**objfs: Any) -> Rig:
        rig = rig_factory(**objfs)
        rig.backend.set(Mode.GATED, "put")
        await running(rig)
        return rig

    return make
