"""Fault hooks for the crash and failure tests. Inert unless ``OBJFS_TEST_HOOKS=1``.

- ``OBJFS_CRASH_AT=point[,point...]``: the daemon kills itself with SIGKILL when it reaches a
  named point (`crash_point`), as a power cut or the OOM killer would: nothing is cleaned up.
- ``OBJFS_FAIL_AT=point[@seconds][,...]``: `fail_point` raises `InjectedFailure` there (after
  `seconds` when the point is a timer, `failure_delay`), to show what a bug does.

Points are named where they are called (``grep -n crash_point objfs``). Production code calls
them at the moments that matter for durability; with the variables unset they cost one
dictionary lookup.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)


class InjectedFailure(RuntimeError):
    """Raised by `fail_point`: stands for a bug at that point."""


def _points(variable: str) -> dict[str, float]:
    if os.environ.get("OBJFS_TEST_HOOKS") != "1":
        return {}
    found: dict[str, float] = {}
    for item in os.environ.get(variable, "").split(","):
        name, _, delay = item.strip().partition("@")
        if name:
            found[name] = float(delay or 0)
    return found


_CRASH = _points("OBJFS_CRASH_AT")
_FAIL = _points("OBJFS_FAIL_AT")


def crash_point(name: str) -> None:
    """SIGKILL this process if the tests asked for a crash at `name`."""
    if name in _CRASH:
        log.critical("test hook: crashing at %s", name)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


def fail_point(name: str) -> None:
    """Raise InjectedFailure if the tests asked for a failure at `name`."""
    if name in _FAIL:
        raise InjectedFailure(f"test hook: injected failure at {name}")


def failure_delay(name: str) -> float | None:
    """Seconds after which timed failure point `name` fires, None when it is not armed."""
    return _FAIL.get(name)
