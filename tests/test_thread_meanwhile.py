"""`objfs.store.core.thread_meanwhile`: a journal commit in a worker thread and loop work at the
same time (the delete of an uploaded attachment drops its copy while its row commits). Real
threads here; the in-process tier runs this inline."""

from __future__ import annotations

import threading

import pytest
import trio

from objfs.store.core import thread_meanwhile


def test_both_run_at_the_same_time() -> None:
    loop_ran = threading.Event()
    seen: list[bool] = []

    def commit() -> None:
        # Only a real overlap lets this see the loop's step before its own end.
        seen.append(loop_ran.wait(5))

    async def main() -> None:
        await thread_meanwhile(commit, loop_ran.set, trio.CapacityLimiter(1))

    trio.run(main)
    assert seen == [True]


def test_the_commits_error_is_raised_after_the_loop_step() -> None:
    steps: list[str] = []

    def commit() -> None:
        raise OSError(28, "No space left on device")

    async def main() -> None:
        await thread_meanwhile(commit, lambda: steps.append("loop"), trio.CapacityLimiter(1))

    with pytest.raises(OSError, match="No space"):
        trio.run(main)
    assert steps == ["loop"]


def test_a_failing_loop_step_still_waits_for_the_commit() -> None:
    committed = threading.Event()
    release = threading.Event()

    def commit() -> None:
        release.wait(5)
        committed.set()

    def loop_step() -> None:
        release.set()
        raise FileNotFoundError("copy")

    async def main() -> None:
        await thread_meanwhile(commit, loop_step, trio.CapacityLimiter(1))

    with pytest.raises(FileNotFoundError):
        trio.run(main)
    assert committed.is_set()


def test_cancelled_after_the_start_the_commit_still_ends_first() -> None:
    committed = threading.Event()
    release = threading.Event()
    cancelled: list[bool] = []
    ended: list[bool] = []

    def commit() -> None:
        release.wait(5)
        committed.set()

    async def main() -> None:
        with trio.CancelScope() as scope:
            def loop_step() -> None:
                scope.cancel()
                release.set()

            await thread_meanwhile(commit, loop_step, trio.CapacityLimiter(1))
            ended.append(committed.is_set())
            await trio.sleep(0)  # the cancellation lands at the next checkpoint
        cancelled.append(scope.cancelled_caught)

    trio.run(main)
    assert ended == [True] and cancelled == [True]
