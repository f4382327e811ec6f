"""Logging set-up for the command line: journald-friendly under systemd, timestamps elsewhere,
and repeated identical warnings and errors rate-limited.

Under systemd (``$JOURNAL_STREAM`` names our stderr) each line starts with a syslog priority
prefix ``<N>``, which journald turns into the entry's priority, and carries no timestamp
(journald adds its own). Anywhere else lines start with a timestamp and the level name.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import TextIO

# syslog priorities (sd-daemon.h): journald reads them from the "<N>" prefix.
PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
              logging.CRITICAL: 2}
REPEAT_WINDOW = 60.0
MAX_TRACKED = 1024
# The SDKs log every request at INFO.
NOISY = ("azure", "botocore", "boto3", "urllib3", "google")


def under_journald(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """True when $JOURNAL_STREAM is the device:inode of `stream` (systemd's documented test:
    a child whose stderr was redirected must not use the prefixes)."""
    value = environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(stream.fileno())
        return bool(value) and st.st_dev == int(dev) and st.st_ino == int(ino)
    except (ValueError, OSError):
        return False


class JournalFormatter(logging.Formatter):
    """``<priority>logger: message`` per line; continuation lines (tracebacks) get the
    prefix too, so journald keeps them at the same priority."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{PRIORITIES.get(record.levelno, 6)}>"
        text = super().format(record)
        return "\n".join(prefix + line for line in text.splitlines())


class RepeatFilter(logging.Filter):
    """Lets the first of identical WARNING-or-worse messages through, drops repeats for
    `window` seconds, then lets the next one through with the number dropped."""

    def __init__(self, window: float = REPEAT_WINDOW) -> None:
        super().__init__()
        self.window = window
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.levelno, record.getMessage())
        now = time.monotonic()
        first, dropped = self._seen.get(key, (None, 0))
        if first is not None and now - first < self.window:
            self._seen[key] = (first, dropped + 1)
            return False
        if len(self._seen) >= MAX_TRACKED:
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.window}
        self._seen[key] = (now, 0)
        if dropped:
            record.msg = f"{record.getMessage()} (repeated {dropped} more times within " \
                         f"{self.window:g}s)"
            record.args = None
        return True


def setup(level: str, stream: TextIO | None = None,
          environ: Mapping[str, str] | None = None) -> None:
    """Configure the root logger once for a command: `level` is a level name."""
    stream = sys.stderr if stream is None else stream
    environ = os.environ if environ is None else environ
    handler = logging.StreamHandler(stream)
    if under_journald(stream, environ):
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in NOISY:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
