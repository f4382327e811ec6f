"""The FUSE loop's wait for ``/dev/fuse`` (`objfs.fuseloop`): a queued request is read without a
trip through trio, an empty or closing descriptor is waited for as trio does, and on a live mount
pyfuse3 really waits through it."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyfuse3
import pytest
import trio

from objfs import fuseloop
from objfs.tally import Tally
from tests.conftest import local_config
from tests.support.daemon import Objfs
from tests.support.metrics import scrape, total
from tests.test_hybrid import at, uuid_for, write


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_end, write_end = os.pipe()
    yield read_end, write_end
    for fd in (read_end, write_end):
        try:
            os.close(fd)
        except OSError:
            pass


def test_a_readable_descriptor_returns_at_once_without_a_checkpoint(
        pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    tally = Tally()
    lowlevel = fuseloop.ReadyFirstLowlevel(tally)
    os.write(write_end, b"x")

    async def main() -> None:
        # A cancelled scope: trio's own wait would raise Cancelled at once; the fast path
        # never enters trio, so it returns.
        with trio.CancelScope() as scope:
            scope.cancel()
            await lowlevel.wait_readable(read_end)
            await lowlevel.wait_readable(read_end)
        assert not scope.cancelled_caught

    trio.run(main)
    assert tally.fuse_waits == {"ready": 2}


def test_an_empty_descriptor_waits_through_trio_until_input_comes(
        pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    tally = Tally()
    lowlevel = fuseloop.ReadyFirstLowlevel(tally)

    async def main() -> float:
        async def write_later() -> None:
            await trio.sleep(0.2)
            os.write(write_end, b"x")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_later)
            start = trio.current_time()
            await lowlevel.wait_readable(read_end)
            return trio.current_time() - start

    waited = trio.run(main)
    assert waited >= 0.15
    assert tally.fuse_waits == {"parked": 1}


def test_a_hung_up_or_closing_descriptor_is_left_to_trio(pipe: tuple[int, int]) -> None:
    """poll reports POLLHUP (a writer gone, as /dev/fuse reports an error at unmount), not
    input alone: trio's wait decides, which returns for a hung-up pipe; and a descriptor that
    trio is told is closing raises ClosedResourceError as pyfuse3 expects at shutdown."""
    read_end, write_end = pipe
    tally = Tally()
    lowlevel = fuseloop.ReadyFirstLowlevel(tally)
    os.close(write_end)

    async def hung_up() -> None:
        with trio.fail_after(5):
            await lowlevel.wait_readable(read_end)

    trio.run(hung_up)
    assert tally.fuse_waits == {"parked": 1}

    other_read, other_write = os.pipe()
    try:
        async def closing() -> None:
            async with trio.open_nursery() as nursery:
                async def close_soon() -> None:
                    await trio.sleep(0.1)
                    trio.lowlevel.notify_closing(other_read)

                nursery.start_soon(close_soon)
                with pytest.raises(trio.ClosedResourceError):
                    await lowlevel.wait_readable(other_read)

        trio.run(closing)
    finally:
        os.close(other_read)
        os.close(other_write)


def test_install_gives_pyfuse3_alone_the_shim() -> None:
    original = pyfuse3.__dict__["trio"]
    try:
        tally = Tally()
        lowlevel = fuseloop.install(tally)
        seen = pyfuse3.__dict__["trio"]
        assert isinstance(seen, fuseloop.TrioForPyfuse3)
        assert seen.lowlevel is lowlevel and lowlevel.tally is tally
        # Everything else is trio's own; trio itself is untouched.
        assert seen.Lock is trio.Lock
        assert seen.lowlevel.current_task is trio.lowlevel.current_task
        assert trio.lowlevel.wait_readable is not lowlevel.wait_readable
    finally:
        setattr(pyfuse3, "trio", original)  # noqa: B010


def test_a_mount_under_parallel_load_reads_queued_requests_at_once(
        tmp_path: Path, objfs_factory: Callable[..., Objfs]) -> None:
    """pyfuse3 waits through the shim on a live mount: with four threads calling it, some
    requests are found queued (and the mount still answers every call correctly)."""
    daemon = objfs_factory(local_config(tmp_path)).start()
    files = [at(daemon.mountpoint, uuid_for(n)) for n in range(16)]
    for n, path in enumerate(files):
        write(path, bytes([n]) * 4096)
    before = scrape(daemon)
    errors: list[BaseException] = []

    def reader(k: int) -> None:
        try:
            deadline = time.monotonic() + 2
            n = 0
            while time.monotonic() < deadline:
                index = (k * 5 + n) % len(files)
                os.stat(files[index])
                assert files[index].read_bytes() == bytes([index]) * 4096
                n += 1
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    after = scrape(daemon)
    ready = (total(after, "objfs_fuse_request_waits_total", outcome="ready")
             - total(before, "objfs_fuse_request_waits_total", outcome="ready"))
    parked = (total(after, "objfs_fuse_request_waits_total", outcome="parked")
              - total(before, "objfs_fuse_request_waits_total", outcome="parked"))
    assert ready > 100, (ready, parked)
    assert parked > 0, (ready, parked)
