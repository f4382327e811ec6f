"""systemd's service notification protocol (``sd_notify``) over ``$NOTIFY_SOCKET``.

A datagram of ``KEY=value`` lines to the socket systemd names in the environment: a path, or
an abstract socket when it starts with ``@``. Without the variable every call is a no-op, so
the daemon runs the same under systemd, in a container or in a terminal. A failed send is
logged once and never raised: systemd then only sees the service as slow to start.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends READY/STATUS/STOPPING messages to the service manager, if there is one."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        self._failed = False
        if self.address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields: str | int) -> None:
        """Send one message, e.g. ``send(READY=1, STATUS="...")``."""
        if self._sock is None:
            return
        message = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            self._sock.sendto(message, self.address)
        except OSError as exc:
            if not self._failed:
                log.warning("cannot notify the service manager at %s: %s",
                            self.address.replace("\0", "@"), exc)
                self._failed = True

    def ready(self, status: str) -> None:
        self.send(READY=1, STATUS=status, MAINPID=os.getpid())

    def status(self, text: str) -> None:
        self.send(STATUS=text)

    def stopping(self, status: str) -> None:
        self.send(STOPPING=1, STATUS=status)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
