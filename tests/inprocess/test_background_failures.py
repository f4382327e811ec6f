"""The store's own background tasks never take the mount down (docs/durability.md, invariant
8): one that fails (a bug, or a journal on a full disk) is logged and started again, while
Orthanc's writes and their uploads go on."""

from __future__ import annotations

import logging
import os
import sqlite3
import uuid as uuid_mod
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from objfs.cache import CHECKPOINT_SECONDS, DOWNLOADS_SYNCED
from objfs.journal import UPLOADED
from objfs.store.state import KEPT_CHANGES_DELAY, KEPT_FAILED_PAUSE
from tests.inprocess.conftest import Rig
from tests.inprocess.test_operations import ops_for, orthanc_read, orthanc_write

Start = Callable[[Rig], Awaitable[None]]


def refuse_kept_commits(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """Make the commit of kept changes (`Journal.apply_kept`) fail as on a full disk; returns
    how many times it was refused so far."""
    refused = 0

    def full_disk() -> None:
        nonlocal refused
        refused += 1
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(rig.journal, "apply_kept", full_disk)
    return lambda: refused


async def still_serving(rig: Rig, tmp_path: Path) -> None:
    """A new attachment is acknowledged, read back and uploaded."""
    ops = ops_for(rig, tmp_path)
    uuid = str(uuid_mod.uuid4())
    data = os.urandom(64 * 1024)
    inode = await orthanc_write(ops, uuid, data)
    assert await orthanc_read(ops, inode) == data
    assert await rig.store.drain(timeout=60)
    row = rig.journal.get(uuid)
    assert row is not None and row.state == UPLOADED


async def test_a_failing_store_task_is_restarted_and_the_store_serves_on(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        running: Start, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rig = rig_factory()
    starts = 0
    watch = rig.store._watch_spare_cpu

    async def failing_once() -> None:
        nonlocal starts
        starts += 1
        if starts == 1:
            raise RuntimeError("a bug in a background task")
        await watch()

    rig.store._watch_spare_cpu = failing_once  # type: ignore[method-assign]
    await running(rig)
    await trio.sleep(5)
    assert starts == 2
    assert "the idle-CPU watch failed; restarting it" in caplog.text
    await still_serving(rig, tmp_path)


async def test_a_journal_that_cannot_record_a_checkpoint_leaves_the_store_running(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        running: Start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "objfs.cache")
    rig = rig_factory()
    set_meta = rig.journal.set_meta
    refused: list[str] = []

    def full_disk(name: str, value: str) -> None:
        if name == DOWNLOADS_SYNCED:
            refused.append(value)
            raise sqlite3.OperationalError("database or disk is full")
        set_meta(name, value)

    monkeypatch.setattr(rig.journal, "set_meta", full_disk)
    await running(rig)
    await trio.sleep(2 * CHECKPOINT_SECONDS + 1)
    assert len(refused) == 2  # the checkpoint task went on after the first refusal
    assert "cannot checkpoint downloaded copies" in caplog.text
    await still_serving(rig, tmp_path)


async def test_a_fetched_copy_the_journal_cannot_record_gives_back_its_space(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        running: Start, monkeypatch: pytest.MonkeyPatch) -> None:
    """A download whose cache flag cannot be kept in memory (`cached_later` refuses: the row
    is not an uploaded one) commits it in a worker thread; when that fails, the copy goes."""
    rig = rig_factory()
    await running(rig)
    uuid, data = str(uuid_mod.uuid4()), os.urandom(300_000)
    await rig.write(uuid, data)
    assert await rig.store.drain(timeout=60)
    assert await rig.tier.evict(10 * 1024 * 1024) == len(data)
    used = rig.tier.used
    set_cached = rig.journal.set_cached
    monkeypatch.setattr(rig.journal, "cached_later", lambda *args: False)

    def full_disk(*args: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(rig.journal, "set_cached", full_disk)
    for _ in range(3):  # each try would have kept the copy's bytes
        with pytest.raises(sqlite3.OperationalError):
            await rig.read(uuid)
        assert rig.tier.used == used
        assert not rig.tier.path(uuid).exists()
    monkeypatch.setattr(rig.journal, "set_cached", set_cached)
    assert await rig.read(uuid) == data
    assert rig.tier.used == used + len(data)


async def test_downloads_whose_flags_cannot_be_committed_are_served_and_recorded_later(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        running: Start, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Downloads keep their cache flags in memory; the task that commits them after a burst
    finds the journal's disk full: they stay kept (the copies are served from the cache, not
    fetched again, and take no more room) and are committed once the journal can write."""
    rig = rig_factory()
    await running(rig)
    written = {str(uuid_mod.uuid4()): os.urandom(100_000) for _ in range(3)}
    for uuid, data in written.items():
        await rig.write(uuid, data)
    assert await rig.store.drain(timeout=60)
    assert await rig.tier.evict(10 * 1024 * 1024) == 300_000
    used = rig.tier.used
    apply_kept = rig.journal.apply_kept
    refused = refuse_kept_commits(rig, monkeypatch)
    for uuid, data in written.items():
        assert await rig.read(uuid) == data
    await trio.sleep(KEPT_CHANGES_DELAY + 1)
    assert refused() == 1 and rig.journal.kept_flags == 3
    assert "cannot record 3 downloaded copies and 0 uploads in the journal yet" in caplog.text
    gets = rig.backend.calls["get"]
    for uuid, data in written.items():
        row = rig.journal.get(uuid)
        assert row is not None and row.cached
        assert await rig.read(uuid) == data
    assert rig.backend.calls["get"] == gets  # served from the cache
    assert rig.tier.used == used + 300_000
    monkeypatch.setattr(rig.journal, "apply_kept", apply_kept)
    rig.store._kept_changes.set()  # as the next download would
    await trio.sleep(KEPT_CHANGES_DELAY + 1)
    assert rig.journal.kept_flags == 0
    assert rig.journal.stats().cached_entries == 3


async def test_upload_ends_that_cannot_be_committed_stay_kept_and_retries_are_paced(
        autojump_clock: trio.testing.MockClock, rig_factory: Callable[..., Rig],
        running: Start, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Upload ends kept in memory whose commit finds the journal's disk full stay kept (the
    attachments read as uploaded); each upload that ends asks for a commit at once, but after
    a failure the next try waits KEPT_FAILED_PAUSE: one warning a second at most, not one per
    upload. Once the journal can write, they are committed."""
    rig = rig_factory(BackgroundHold=0)
    await running(rig)
    apply_kept = rig.journal.apply_kept
    refused = refuse_kept_commits(rig, monkeypatch)
    start = trio.current_time()
    written = [str(uuid_mod.uuid4()) for _ in range(12)]
    for uuid in written:
        await rig.write(uuid, os.urandom(1000))
        await trio.sleep(0.2)  # uploaded meanwhile, Orthanc idle: its end is due at once
        row = rig.journal.get(uuid)
        assert row is not None and row.state == UPLOADED
    took = trio.current_time() - start
    assert rig.journal.kept_uploads == len(written)
    assert 1 <= refused() <= took / KEPT_FAILED_PAUSE + 1
    assert caplog.text.count("cannot record 0 downloaded copies and") == refused()
    monkeypatch.setattr(rig.journal, "apply_kept", apply_kept)
    await rig.write(str(uuid_mod.uuid4()), os.urandom(1000))
    await trio.sleep(KEPT_FAILED_PAUSE + 1)
    assert rig.journal.kept_uploads == 0
    assert rig.journal.stats().uploaded == len(written) + 1
