"""objfs.keylocks: one lock per uuid, made on demand and dropped when nobody needs it."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from objfs.keylocks import KeyedLocks


async def test_holders_of_one_key_take_turns_and_other_keys_do_not_wait(
        autojump_clock: trio.testing.MockClock) -> None:
    locks = KeyedLocks()
    events: list[str] = []

    async def hold(key: str, name: str, seconds: float) -> None:
        async with locks.hold(key):
            events.append(f"{name} in")
            await trio.sleep(seconds)
            events.append(f"{name} out")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, "a", "first", 1.0)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(hold, "a", "second", 1.0)
        nursery.start_soon(hold, "b", "other", 0.5)
    assert events == ["first in", "other in", "other out", "first out", "second in",
                      "second out"]
    assert trio.current_time() == pytest.approx(2.0)
    assert locks._locks == {}


async def test_a_cancelled_waiter_and_a_failing_holder_leave_nothing_behind(
        autojump_clock: trio.testing.MockClock) -> None:
    locks = KeyedLocks()
    entered = trio.Event()

    async def failing() -> None:
        async with locks.hold("a"):
            entered.set()
            await trio.sleep(1.0)
            raise RuntimeError("the holder's work failed")

    async def waiter(scope_out: list[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            scope_out.append(scope)
            async with locks.hold("a"):
                raise AssertionError("a cancelled waiter never holds the key")

    scopes: list[trio.CancelScope] = []
    with pytest.raises(ExceptionGroup) as raised:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(failing)
            await entered.wait()
            nursery.start_soon(waiter, scopes)
            await trio.testing.wait_all_tasks_blocked()
            assert locks._locks["a"][1] == 2  # the holder and the waiter
            scopes[0].cancel()
    assert raised.group_contains(RuntimeError, match="the holder's work failed")
    assert locks._locks == {}
    async with locks.hold("a"):  # free again, at once
        assert trio.current_time() == pytest.approx(1.0)
