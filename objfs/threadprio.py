"""The event loop's scheduling priority.

Orthanc waits for every FUSE reply, and one thread, the event loop's, gives them all. On a busy
machine that thread, woken by the kernel, can wait behind Orthanc's own threads and the daemon's
workers before it runs. A lower nice value for it alone shortens that wait; the workers
(uploads, journal commits, GCS and ranged downloads) keep the priority they had.

Linux keeps the nice value per thread, and a new thread inherits its creator's. The event loop
starts the daemon's worker threads (trio's thread cache), so a hook that every thread started
through `threading` runs first (`threading.setprofile`) puts each new thread back to the
former value and removes itself. SCHED_RESET_ON_FORK would do that in the kernel, but
systemd's `RestrictRealtime=` refuses any `sched_setscheduler` call that sets it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

MIN_NICE = -20


def prioritize_this_thread(nice: int) -> Callable[[], None] | None:
    """Give the calling thread nice value `nice` (MIN_NICE..0); threads started through
    `threading` from then on run at the value the calling thread had before.

    Returns a function that undoes both, or None when nothing changed: `nice` is not below
    the current value, or the process may not lower it (no CAP_SYS_NICE, as in a container
    without it). That case is logged at INFO, never raised: the daemon serves at the
    priority it had. Raises ValueError for a value outside MIN_NICE..0.
    """
    if not MIN_NICE <= nice <= 0:
        raise ValueError(f"nice value {nice} is not within {MIN_NICE}..0")
    tid = threading.get_native_id()
    former = os.getpriority(os.PRIO_PROCESS, tid)
    if nice >= former:
        return None
    try:
        os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError as exc:
        log.info("the event loop stays at nice %d, not %d (%s): the daemon needs CAP_SYS_NICE "
                 "to lower it", former, nice, exc.strerror)
        return None

    def back_to_former(frame: FrameType, event: str, arg: Any) -> None:
        # The first event of a new thread: its nice value, inherited from the event loop,
        # goes back to `former` (raising it needs no privilege), and the hook goes.
        sys.setprofile(None)
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), former)
        except OSError as exc:  # cannot happen for the process' own threads; never fatal
            log.warning("a worker thread keeps the event loop's nice value: %s", exc)

    threading.setprofile(back_to_former)

    def restore() -> None:
        threading.setprofile(None)
        os.setpriority(os.PRIO_PROCESS, tid, former)

    return restore
