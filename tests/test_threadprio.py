"""objfs.threadprio: the event loop thread's nice value, and the worker threads it starts.

Runs as root, as the whole suite does; the cases without CAP_SYS_NICE run in a subprocess
that `setpriv` has taken it from.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from objfs.threadprio import prioritize_this_thread
from tests.conftest import local_config
from tests.support.daemon import Objfs
from tests.test_mount import att, orthanc_write

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent


def nice_of(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


def in_new_thread(fn: Callable[[], T]) -> T:
    """Run `fn` in a thread of its own: the test process' threads keep their priority."""
    result: list[T] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def test_the_thread_takes_the_value_and_threads_it_starts_do_not() -> None:
    def body() -> tuple[int, int, int]:
        me = threading.get_native_id()
        restore = prioritize_this_thread(-7)
        assert restore is not None
        started: list[int] = []
        child = threading.Thread(target=lambda: started.append(
            nice_of(threading.get_native_id())))
        child.start()
        child.join()
        during = nice_of(me)
        restore()
        return during, started[0], nice_of(me)

    assert in_new_thread(body) == (-7, 0, 0)


def test_zero_or_a_value_not_below_the_current_one_changes_nothing() -> None:
    def body() -> tuple[object, object, int]:
        first = prioritize_this_thread(0)
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), -3)
        second = prioritize_this_thread(-2)
        return first, second, nice_of(threading.get_native_id())

    assert in_new_thread(body) == (None, None, -3)


@pytest.mark.parametrize("nice", [-21, 1, 19])
def test_values_outside_the_range_are_refused(nice: int) -> None:
    with pytest.raises(ValueError, match=r"not within -20\.\.0"):
        prioritize_this_thread(nice)


PROBE = """
import logging, os, sys, threading
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(message)s")
from objfs.threadprio import prioritize_this_thread
restore = prioritize_this_thread(-10)
print("changed" if restore else "unchanged", os.getpriority(os.PRIO_PROCESS, 0))
"""


def probe_without_cap_sys_nice() -> str:
    """Run PROBE without CAP_SYS_NICE, and with a nice limit that allows nothing either."""
    command = ["prlimit", "--nice=0:0", "--", "setpriv", "--inh-caps=-sys_nice",
               "--bounding-set=-sys_nice", sys.executable, "-c", PROBE]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_without_cap_sys_nice_or_a_limit_it_stays_and_says_why() -> None:
    out = probe_without_cap_sys_nice()
    assert out.splitlines()[-1] == "unchanged 0"
    assert "INFO the event loop stays at nice 0, not -10" in out
    assert "needs CAP_SYS_NICE" in out


def test_the_mounted_daemon_runs_its_event_loop_thread_alone_at_event_loop_nice(
        tmp_path: Path, objfs_factory: Callable[..., Objfs]) -> None:
    daemon = objfs_factory(local_config(tmp_path, EventLoopNice=-6)).start()
    orthanc_write(att(daemon.mountpoint, "0b7f5b6e-4a51-4bd5-9f3a-2f0c5d4e6a01"),
                  os.urandom(100_000))
    # The upload runs in a worker thread; trio keeps an idle worker for a while, so at least
    # one is alive afterwards (the journal's commit may have reused the same thread).
    daemon.wait_uploaded()
    assert daemon.process is not None
    pid = daemon.process.pid
    nices = {int(task.name): nice_of(int(task.name))
             for task in Path(f"/proc/{pid}/task").iterdir()}
    assert nices.pop(pid) == -6  # trio runs on the main thread
    assert nices and set(nices.values()) == {0}, nices
