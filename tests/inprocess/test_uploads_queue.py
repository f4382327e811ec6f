"""objfs.store.uploads.LargestFirst: the order uploads are handed to the workers."""

from __future__ import annotations

import trio
import trio.testing

from objfs.store.uploads import LargestFirst


async def test_largest_first_and_equal_sizes_in_arrival_order() -> None:
    queue = LargestFirst()
    for uuid, size in (("a", 10), ("b", 30), ("c", 20), ("d", 30), ("e", 5)):
        queue.put(uuid, size)
    assert len(queue) == 5
    assert [(await queue.get()).uuid for _ in range(5)] == ["b", "d", "c", "a", "e"]
    assert len(queue) == 0


async def test_a_waiting_worker_gets_what_is_put_later(
        autojump_clock: trio.testing.MockClock) -> None:
    queue = LargestFirst()
    got: list[str] = []

    async def worker() -> None:
        got.append((await queue.get()).uuid)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker)
        nursery.start_soon(worker)
        await trio.sleep(1)
        assert got == []
        queue.put("x", 1)
        queue.put("y", 2)
    assert sorted(got) == ["x", "y"]


async def test_get_can_be_cancelled_while_it_waits(
        autojump_clock: trio.testing.MockClock) -> None:
    queue = LargestFirst()
    with trio.move_on_after(1) as scope:
        await queue.get()
    assert scope.cancelled_caught
    queue.put("z", 1)
    assert await queue.get() == ("z", 1)
