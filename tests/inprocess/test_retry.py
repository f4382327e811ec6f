"""The one retry policy under a mock clock: backoff, deadlines that hold whatever the call does."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing

from objfs import errors
from objfs.retry import RetryPolicy


async def test_temporary_errors_are_retried_with_growing_jittered_pauses(
        autojump_clock: trio.testing.MockClock) -> None:
    moments: list[float] = []

    async def flaky() -> str:
        moments.append(trio.current_time())
        if len(moments) < 6:
            raise errors.Unavailable("503")
        return "done"

    policy = RetryPolicy(first_delay=1.0, max_delay=8.0, deadline=None, persistent=False)
    assert await policy.call("flaky", flaky) == "done"
    pauses = [b - a for a, b in itertools.pairwise(moments)]
    assert len(pauses) == 5
    for attempt, pause in enumerate(pauses):
        assert 0.5 <= pause <= min(8.0, 2 ** attempt) + 1e-9


async def test_an_error_retrying_cannot_fix_is_raised_at_once(
        autojump_clock: trio.testing.MockClock) -> None:
    calls = 0

    async def denied() -> None:
        nonlocal calls
        calls += 1
        raise errors.Denied("403")

    start = trio.current_time()
    with pytest.raises(errors.Denied):
        await RetryPolicy(deadline=60).call("denied", denied)
    assert calls == 1 and trio.current_time() == start


async def test_a_503_storm_ends_by_the_deadline(autojump_clock: trio.testing.MockClock) -> None:
    seen: list[errors.ObjfsError] = []

    async def storm() -> None:
        raise errors.Throttled("503 SlowDown")

    start = trio.current_time()
    with pytest.raises(errors.Unavailable):
        await RetryPolicy(deadline=20).call("storm", storm, seen.append)
    assert trio.current_time() - start <= 20
    assert len(seen) >= 3


async def test_a_hanging_call_ends_at_the_deadline_with_unavailable(
        autojump_clock: trio.testing.MockClock) -> None:
    """The deadline covers the call itself, not only the pauses between attempts."""
    async def hang() -> None:
        await trio.sleep_forever()

    start = trio.current_time()
    with pytest.raises(errors.Unavailable, match="no answer within 15s"):
        await RetryPolicy(deadline=15).call("get ab/cd", hang)
    assert trio.current_time() - start == pytest.approx(15)


async def test_a_slow_call_after_failures_names_the_last_error(
        autojump_clock: trio.testing.MockClock) -> None:
    attempts = 0

    async def fail_then_hang() -> None:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise errors.Unavailable("connection reset")
        await trio.sleep(3600)

    with pytest.raises(errors.Unavailable, match="last error: connection reset"):
        await RetryPolicy(deadline=30).call("get x", fail_then_hang)


async def test_background_policy_retries_until_success(
        autojump_clock: trio.testing.MockClock) -> None:
    failures = 0

    async def later() -> int:
        nonlocal failures
        if failures < 40:
            failures += 1
            raise errors.Denied("until an administrator fixes the policy")
        return 7

    policy = RetryPolicy(first_delay=0.5, max_delay=60.0, deadline=None, persistent=True)
    start = trio.current_time()
    assert await policy.call("upload", later) == 7
    # 40 pauses, most of them capped at 60 s: far longer than any test could wait for real.
    assert trio.current_time() - start > 600


async def test_a_final_error_ends_even_a_background_policy_at_once(
        autojump_clock: trio.testing.MockClock) -> None:
    """`Unsupported` (a store without batch deletes): retrying never helps, the caller falls
    back to another request instead."""
    calls = 0

    async def refused() -> None:
        nonlocal calls
        calls += 1
        raise errors.Unsupported("DeleteObjects: NotImplemented")

    policy = RetryPolicy(deadline=None, persistent=True)
    start = trio.current_time()
    with pytest.raises(errors.Unsupported):
        await policy.call("delete batch", refused)
    assert calls == 1 and trio.current_time() == start
