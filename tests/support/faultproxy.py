"""A fault-injecting HTTP proxy between objfs and an S3 server (moto), on 127.0.0.1; it also
logs each request (method and path), so it can count what objfs asks of Orthanc.

Each S3 request is classified as GET (an object), LIST (a bucket listing), PUT (PUT or POST:
single and multipart uploads), DELETE or HEAD, and handled by the mode set for that operation,
switchable while running:

- ``ok``: forwarded;
- ``503``: answered ``503 SlowDown`` (what S3 says when it throttles);
- ``500``: answered ``500 InternalError``;
- ``reset``: the connection is reset (RST) without an answer;
- ``hang``: the request is accepted and never answered (until the mode changes or the proxy
  stops, when the connection is closed);
- ``trickle``: forwarded, and the answer's body sent at one byte per second.

Runs in a thread of the test process (a `ThreadingHTTPServer`); every loop is bounded by the
proxy's lifetime.
"""

from __future__ import annotations

import http.client
import http.server
import socket
import struct
import threading
import time
import urllib.parse
from collections import Counter
from typing import Any

MODES = ("ok", "503", "500", "reset", "hang", "trickle")
OPERATIONS = ("GET", "LIST", "PUT", "DELETE", "HEAD")
_ERRORS = {"503": (503, "SlowDown", "Please reduce your request rate."),
           "500": (500, "InternalError", "We encountered an internal error.")}


def classify(method: str, target: str) -> str:
    """The S3 operation of one request."""
    url = urllib.parse.urlsplit(target)
    query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
    path = [p for p in url.path.split("/") if p]
    if method == "GET":
        return "LIST" if len(path) <= 1 or "list-type" in query else "GET"
    if method in ("PUT", "POST"):
        return "PUT"
    return method if method in ("DELETE", "HEAD") else "GET"


class FaultProxy:
    """The proxy; `endpoint` is its URL. Use `set` to change modes, `stop` at the end."""

    def __init__(self, upstream: str) -> None:
        target = urllib.parse.urlsplit(upstream)
        self.upstream = (target.hostname or "127.0.0.1", target.port or 80)
        self.modes: dict[str, str] = dict.fromkeys(OPERATIONS, "ok")
        self.seen: Counter[tuple[str, str]] = Counter()  # (operation, mode)
        self.requests: list[tuple[str, str]] = []  # (method, path) of each, in order
        self.stopping = threading.Event()
        self._changed = threading.Condition()
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def set(self, mode: str, *operations: str) -> None:
        """Apply `mode` to `operations` (all of them when none is named)."""
        assert mode in MODES, mode
        with self._changed:
            for op in operations or OPERATIONS:
                assert op in OPERATIONS, op
                self.modes[op] = mode
            self._changed.notify_all()

    def wait_for_change(self, op: str, mode: str, timeout: float) -> bool:
        """Block a handler while `op` is still in `mode`; True when it changed."""
        with self._changed:
            return self._changed.wait_for(
                lambda: self.modes[op] != mode or self.stopping.is_set(), timeout)

    def stop(self) -> None:
        self.stopping.set()
        with self._changed:
            self._changed.notify_all()
        self.server.shutdown()
        self.server.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _any(self) -> None:
        proxy = self.owner
        op = classify(self.command, self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        mode = proxy.modes[op]
        proxy.seen[op, mode] += 1
        proxy.requests.append((self.command, self.path))
        if mode == "hang":
            # Accepted, never answered; the bound is the proxy's life (a test's teardown).
            while not proxy.wait_for_change(op, "hang", 1.0):
                pass
            self.close_connection = True
            return
        if mode == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        if mode in _ERRORS:
            status, code, message = _ERRORS[mode]
            payload = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                       f"<Message>{message}</Message></Error>").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            return
        self._forward(body, trickle=mode == "trickle")

    def _forward(self, body: bytes, trickle: bool) -> None:
        upstream = http.client.HTTPConnection(*self.owner.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in ("connection", "keep-alive", "expect")}
            upstream.request(self.command, self.path, body=body, headers=headers)
            answer = upstream.getresponse()
            data = answer.read()
        finally:
            upstream.close()
        self.send_response(answer.status, answer.reason)
        for key, value in answer.getheaders():
            if key.lower() not in ("connection", "keep-alive", "transfer-encoding",
                                   "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if not trickle:
            self.wfile.write(data)
            return
        for i in range(len(data)):
            if self.owner.stopping.is_set():
                self.close_connection = True
                return
            self.wfile.write(data[i:i + 1])
            self.wfile.flush()
            time.sleep(1.0)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any
