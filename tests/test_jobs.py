"""The move-storage job runner: priority order, persistence, resume, cancel, failures (pure
logic over stand-ins for the store and Orthanc; the real thing runs in test_hybrid)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import trio

from objfs import errors
from objfs.journal import Journal
from objfs.sidecar.jobs import FAILURE, PENDING, RUNNING, SUCCESS, Job, Jobs


class FakeOrthanc:
    async def attachment_uuids(self, level: str, resource: str) -> list[str]:
        return [f"{resource}-a", f"{resource}-b"]


class FakeStore:
    def __init__(self) -> None:
        self.moved: list[tuple[str, str]] = []
        self.fail: set[str] = set()
        self.block = trio.Event()
        self.blocking: set[str] = set()

    async def _move(self, target: str, uuid: str) -> bool:
        if uuid in self.blocking:
            await self.block.wait()
        if uuid in self.fail:
            raise errors.Corrupt("does not read back as written")
        self.moved.append((target, uuid))
        return not uuid.endswith("-b")

    async def move_to_file_system(self, uuid: str) -> bool:
        return await self._move("fs", uuid)

    async def move_to_object_storage(self, uuid: str) -> bool:
        return await self._move("os", uuid)


def make(tmp_path: Path, store: FakeStore | None = None) -> tuple[Jobs, FakeStore]:
    store = store or FakeStore()
    jobs = Jobs(Journal(tmp_path / "journal.sqlite"), cast(Any, store), cast(Any, FakeOrthanc()))
    return jobs, store


async def test_higher_priority_runs_first_then_submission_order(tmp_path: Path) -> None:
    jobs, store = make(tmp_path)
    low = await jobs.submit("file-system", [("Study", "low")], -1)
    first = await jobs.submit("object-storage", [("Patient", "p1")], 0)
    high = await jobs.submit("file-system", [("Series", "high")], 5)
    second = await jobs.submit("object-storage", [("Instance", "p2")], 0)
    async with trio.open_nursery() as nursery:
        await nursery.start(jobs.run)
        for job in (low, first, high, second):
            await jobs.wait(job.id)
        nursery.cancel_scope.cancel()
    order = [uuid.split("-")[0] for _, uuid in store.moved[::2]]
    assert order == ["high", "p1", "p2", "low"]
    assert high.describe()["Content"] == {"Series": ["high"], "TargetStorage": "file-system",
                                          "MovedAttachments": 1, "SkippedAttachments": 1}
    assert all(j.state == SUCCESS and j.progress == 100 for j in (low, first, high, second))


async def test_failure_names_the_attachment_and_cancel(tmp_path: Path) -> None:
    jobs, store = make(tmp_path)
    store.fail.add("bad-a")
    failing = await jobs.submit("file-system", [("Study", "bad")], 0)
    store.blocking.add("slow-a")
    slow = await jobs.submit("file-system", [("Study", "slow")], 0)
    never = await jobs.submit("file-system", [("Study", "never")], -5)
    async with trio.open_nursery() as nursery:
        await nursery.start(jobs.run)
        await jobs.wait(failing.id)
        with trio.fail_after(5):
            while slow.state != RUNNING:
                await trio.sleep(0.01)
        await jobs.cancel(never.id)
        await jobs.cancel(slow.id)
        with trio.fail_after(5):
            await jobs.wait(slow.id)
        nursery.cancel_scope.cancel()
    assert failing.state == FAILURE
    assert failing.error == "attachment bad-a: does not read back as written"
    assert slow.state == FAILURE and "canceled" in (slow.error or "")
    assert never.state == FAILURE and never.error == "canceled before it started"
    assert ("fs", "never-a") not in store.moved


async def test_a_cancel_as_the_job_starts_is_not_lost(tmp_path: Path) -> None:
    """A cancel that arrives while the job is being recorded as Running (its journal write
    in a worker thread) stops it; it used to be dropped, and the job ran on."""
    jobs, store = make(tmp_path)
    store.blocking.add("late-a")
    job = await jobs.submit("file-system", [("Study", "late")], 0)
    saving, release = trio.Event(), trio.Event()
    save = jobs._save

    async def slow_save(saved: Job, durable: bool = True) -> None:
        if saved.state == RUNNING and not release.is_set():
            saving.set()
            await release.wait()
        await save(saved, durable)

    jobs._save = slow_save  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        await nursery.start(jobs.run)
        await saving.wait()
        assert job.state == RUNNING
        await jobs.cancel(job.id)
        release.set()
        with trio.fail_after(5):
            await jobs.wait(job.id)
        nursery.cancel_scope.cancel()
    assert job.state == FAILURE and "canceled" in (job.error or "")
    assert store.moved == []


async def test_jobs_persist_and_an_interrupted_job_runs_again(tmp_path: Path) -> None:
    jobs, store = make(tmp_path)
    store.blocking.add("p-a")
    job = await jobs.submit("object-storage", [("Patient", "p")], 3)
    async with trio.open_nursery() as nursery:
        await nursery.start(jobs.run)
        with trio.fail_after(5):
            while job.state != RUNNING:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()  # the daemon stops mid-job
    jobs.journal.close()
    again, store = make(tmp_path)
    resumed = again.jobs[job.id]
    assert isinstance(resumed, Job) and resumed.state == PENDING and resumed.priority == 3
    async with trio.open_nursery() as nursery:
        await nursery.start(again.run)
        await again.wait(job.id)
        nursery.cancel_scope.cancel()
    assert resumed.state == SUCCESS and store.moved == [("os", "p-a"), ("os", "p-b")]


async def test_an_unexpected_error_fails_the_job_and_the_runner_goes_on(
        tmp_path: Path) -> None:
    """Issue 12, finding 3: a non-JSON 200 from Orthanc (here a ValueError) or a bug in a
    move ends that job as Failure with the reason; the next job still runs."""
    class BrokenOrthanc(FakeOrthanc):
        async def attachment_uuids(self, level: str, resource: str) -> list[str]:
            if resource == "garbled":
                raise ValueError("Expecting value: line 1 column 1 (char 0)")
            return await super().attachment_uuids(level, resource)

    store = FakeStore()
    jobs = Jobs(Journal(tmp_path / "journal.sqlite"), cast(Any, store),
                cast(Any, BrokenOrthanc()))
    async with trio.open_nursery() as nursery:
        await nursery.start(jobs.run)
        bad = await jobs.submit("file-system", [("Study", "garbled")], 0)
        await jobs.wait(bad.id)
        assert bad.state == FAILURE
        assert bad.error == "unexpected ValueError: Expecting value: line 1 column 1 (char 0)"

        async def explode(uuid: str) -> bool:
            raise KeyError(uuid)

        store.move_to_object_storage = explode  # type: ignore[method-assign]
        buggy = await jobs.submit("object-storage", [("Series", "s1")], 0)
        await jobs.wait(buggy.id)
        assert buggy.state == FAILURE and "unexpected KeyError" in (buggy.error or "")
        good = await jobs.submit("file-system", [("Series", "s2")], 0)
        await jobs.wait(good.id)
        assert good.state == SUCCESS
        nursery.cancel_scope.cancel()
    assert Job.from_record(jobs.journal.job_records()[0]).state in (FAILURE, SUCCESS)
