"""Requests over `http.client` on kept connections, for the backends' direct paths
(`objfs.backends.s3direct`, `objfs.backends.azuredirect`, `objfs.backends.gcsdirect`), which
skip their SDK's request pipeline for the few requests a cold read or an upload makes.

`KeptConnections.exchange` sends one prepared request on an idle kept connection or a new one
and hands the response to the caller's `answer`; the connection is kept only when the answer
was read to its end; `download_answer` and `head_answer` are the GET and HEAD answers every
direct path shares. A request on a kept connection that the server closed meanwhile is sent
once more on a fresh one. What a direct path does not handle itself it raises as `Fallback`,
before anything was written into the caller's stream: the backend then sends the request
through its SDK, which has the last word.
"""

from __future__ import annotations

import http.client
import logging
import os
import socket
import ssl
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import IO, Generic, TypeVar, cast

from objfs import errors
from objfs.backends.base import ObjectInfo

log = logging.getLogger(__name__)

T = TypeVar("T")

BUFFER = 1024 * 1024
ERROR_BODY_LIMIT = 64 * 1024
# Errors kept connections show when the server closed them while idle.
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
          ConnectionAbortedError)


class Fallback(Exception):
    """A request left to the SDK (nothing was written into the caller's stream)."""


def origin(url: str) -> tuple[str, str, int, str, str]:
    """(scheme, host, port, path, query) of a URL an SDK built; the port is the scheme's
    default when the URL names none, the scheme https when it names none."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme or "https"
    port = parts.port or (443 if scheme == "https" else 80)
    return scheme, parts.hostname or "", port, parts.path, parts.query


def byte_range(offset: int, length: int | None) -> str | None:
    """The Range header of a part of an object (`length` None: to its end); None for the
    whole object."""
    if not offset and length is None:
        return None
    return f"bytes={offset}-{'' if length is None else offset + length - 1}"


def proxied(scheme: str, host: str) -> bool:
    """Whether the environment sends requests to `host` through a proxy."""
    return bool(urllib.request.getproxies().get(scheme)) and not urllib.request.proxy_bypass(host)


def requests_ca_bundle() -> str:
    """The CA bundle `requests` verifies servers with (the Azure and GCS SDKs' transport):
    ``REQUESTS_CA_BUNDLE`` or ``CURL_CA_BUNDLE`` when set, else certifi's."""
    from requests.utils import DEFAULT_CA_BUNDLE_PATH

    return (os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
            or DEFAULT_CA_BUNDLE_PATH)


def network_error(exc: BaseException, host: str) -> BaseException:
    """A network failure as the backends' `translate` reads it: timeouts and connection
    errors as they are, anything else (DNS, TLS, a malformed answer) as a ConnectionError.
    Errors writing the local copy never pass through here."""
    if isinstance(exc, TimeoutError | ConnectionError):
        return exc
    return ConnectionError(f"{host}: {type(exc).__name__}: {exc}")


def read_body(response: http.client.HTTPResponse, out: IO[bytes], key: str, host: str,
              update: Callable[[memoryview], None] | None = None) -> int:
    """Copy a success answer's body into `out` (each chunk also to `update`, for a checksum);
    returns the bytes copied. Raises Unavailable when fewer came than the answer announced,
    and the network's errors as `network_error` gives them."""
    expected = response.length
    copied = 0
    buffer = bytearray(min(BUFFER, expected) if expected else BUFFER)
    view = memoryview(buffer)
    while True:
        try:
            got = response.readinto(view)
        except (OSError, http.client.HTTPException) as exc:
            raise network_error(exc, host) from exc
        if not got:
            break
        chunk = view[:got]
        if update is not None:
            update(chunk)
        out.write(chunk)
        copied += got
    if expected is not None and copied != expected:
        raise errors.Unavailable(f"{key}: short read ({copied} bytes of {expected})")
    return copied


def download_answer(body: Callable[[http.client.HTTPResponse], int],
                    refused: Callable[[http.client.HTTPResponse], Exception],
                    ) -> Callable[[http.client.HTTPResponse], int]:
    """The `answer` of a GET, the same on every direct path: a success (200 or 206) is read by
    `body`, which returns the bytes copied; a range that starts past the end (416) is 0
    bytes; anything else raises what `refused` makes of it."""

    def answer(response: http.client.HTTPResponse) -> int:
        if response.status in (200, 206):
            return body(response)
        if response.status == 416:
            response.read(ERROR_BODY_LIMIT)
            return 0
        raise refused(response)

    return answer


def read_whole(response: http.client.HTTPResponse, host: str) -> bytes:
    """A success answer's whole body (a resource or a listing); the network's errors as
    `network_error` gives them (a timeout or a cut connection: Unavailable)."""
    try:
        return response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise network_error(exc, host) from exc


# A listing page: [(name, size, modification time)] and the next page's token (None: the last).
Listed = tuple[list[tuple[str, int, float | None]], str | None]


def as_objects(listed: Listed) -> tuple[list[ObjectInfo], str | None]:
    """A listing page as `Backend.list_page` returns it."""
    found, following = listed
    return [ObjectInfo(name, size, modified) for name, size, modified in found], following


def listing_answer(parse: Callable[[bytes], Listed],
                   refused: Callable[[http.client.HTTPResponse], Exception], host: str,
                   ) -> Callable[[http.client.HTTPResponse], Listed]:
    """The `answer` of a listing, the same on every direct path: a 200's whole body read by
    `parse` (a body it cannot read, raising ValueError, KeyError, TypeError or
    AttributeError, is Fallback: the SDK reads it); anything else raises what `refused`
    makes of it."""

    def answer(response: http.client.HTTPResponse) -> Listed:
        if response.status != 200:
            raise refused(response)
        body = read_whole(response, host)
        try:
            return parse(body)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise Fallback(f"a listing that cannot be read ({exc!r})") from exc

    return answer


def head_answer(refused: Callable[[http.client.HTTPResponse], Exception],
                ) -> Callable[[http.client.HTTPResponse], int]:
    """The `answer` of a HEAD: the object's size from the Content-Length of a 200; Fallback
    for a 200 without a usable one; anything else raises what `refused` makes of it."""

    def answer(response: http.client.HTTPResponse) -> int:
        if response.status != 200:
            raise refused(response)
        response.read()  # nothing: an answer to HEAD has no body
        length = response.getheader("content-length")
        if length is None or not length.isdigit():
            raise Fallback(f"HEAD answer without a usable Content-Length ({length!r})")
        return int(length)

    return answer


class KeptConnections:
    """Kept-alive connections to one server, shared by a backend's worker threads;
    thread-safe."""

    def __init__(self, scheme: str, host: str, port: int, connect_timeout: float,
                 read_timeout: float, ca_bundle: str | None, pool_size: int) -> None:
        self.scheme, self.host, self.port = scheme, host, port
        default_port = 443 if scheme == "https" else 80
        self.host_header = host if port == default_port else f"{host}:{port}"
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.context = (ssl.create_default_context(cafile=ca_bundle)
                        if scheme == "https" else None)
        self.pool_size = pool_size
        # Idle kept connections; after `close`, none is kept (both guarded by _lock).
        self._idle: list[http.client.HTTPConnection] = []
        self._closed = False
        self._lock = threading.Lock()

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """An idle kept connection (True) or a new one (False)."""
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        if self.context is not None:
            return http.client.HTTPSConnection(self.host, self.port, context=self.context,
                                               timeout=self.connect_timeout,
                                               blocksize=BUFFER), False
        return http.client.HTTPConnection(self.host, self.port, timeout=self.connect_timeout,
                                          blocksize=BUFFER), False

    def _keep(self, connection: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self.pool_size:
                self._idle.append(connection)
                return
        connection.close()

    def close(self) -> None:
        """Close the idle connections; those in use close when their request ends."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def exchange(self, method: str, target: str, headers: dict[str, str],
                 body: tuple[IO[bytes], int] | None,
                 answer: Callable[[http.client.HTTPResponse], T]) -> T:
        """Send one request (`body`: a file at offset 0 and its size) and hand the response
        to `answer`. A fresh connection reset while a body went out raises Fallback (the
        server answered early; the SDK reads that answer); other network failures raise as
        `network_error` gives them."""
        if body is not None:
            headers = {**headers, "content-length": str(body[1])}
        for attempt in (0, 1):
            connection, kept = self._connection()
            try:
                if connection.sock is None:
                    connection.connect()  # within the connect timeout; then the read timeout
                    cast(socket.socket, connection.sock).settimeout(self.read_timeout)
                if body is not None:
                    body[0].seek(0)
                connection.request(method, target, body=None if body is None else body[0],
                                   headers=headers)
                response = connection.getresponse()
            except _STALE as exc:
                connection.close()
                if kept and attempt == 0:
                    continue  # closed by the server while idle: once more on a new one
                if body is not None and isinstance(exc, BrokenPipeError | ConnectionResetError):
                    raise Fallback(f"connection reset while sending: {exc}") from exc
                raise network_error(exc, self.host) from exc
            except (OSError, http.client.HTTPException) as exc:
                connection.close()
                raise network_error(exc, self.host) from exc
            except BaseException:
                connection.close()
                raise
            try:
                return answer(response)
            finally:
                # Kept whenever the answer was read to its end, an error answer too (404,
                # 503 SlowDown): a throttled bucket is not also sent new TLS handshakes.
                if response.will_close or not response.isclosed():  # closed, or unread bytes
                    connection.close()
                else:
                    self._keep(connection)
        raise AssertionError("unreachable")


# The SDK carrying out this many requests in a row that the direct path was refused ends the
# direct path.
DIRECT_GIVE_UP = 3
D = TypeVar("D", bound=KeptConnections)


class DirectFirst(Generic[D]):
    """For a backend with a direct path: `direct` (None: every request through the SDK) and
    `_either`, which tries it first. Subclasses set `direct`, and for the log name their SDK
    and option (`sdk_name`, `direct_option`) and where their objects are (`where`, e.g.
    ``s3://bucket/``)."""

    direct: D | None = None
    sdk_name = "the SDK"
    direct_option = "DirectRequests"
    where = ""
    _discrepancies = 0

    def _either(self, method: str, key: str, direct_call: Callable[[D], T],
                sdk_call: Callable[[], T]) -> T:
        """`direct_call` on the direct path, or `sdk_call` without one or when the direct
        path left the request to the SDK (`Fallback`). When the SDK then carries out
        DIRECT_GIVE_UP such requests in a row (a redirect to another region, an endpoint that
        wants something else), every request goes through the SDK from then on. Worker
        threads race on the count; a lost update only delays that."""
        direct = self.direct
        if direct is None:
            return sdk_call()
        try:
            result = direct_call(direct)
        except Fallback as refused:
            return self._after_refusal(direct, method, key, refused, sdk_call)
        self._discrepancies = 0
        return result

    def _after_refusal(self, direct: D, method: str, key: str, refused: Fallback,
                       sdk_call: Callable[[], T]) -> T:
        """`sdk_call` for a request that `direct` was refused, counted towards
        DIRECT_GIVE_UP (`_either`); also for direct requests made elsewhere (the S3 backend's
        GETs on the event loop), whose successes reset the count as `_either`'s do."""
        result = sdk_call()
        self._discrepancies += 1
        log.info("%s: %s carried out a %s the direct path was refused (%s)",
                 self.where + key, self.sdk_name, method, refused)
        if self._discrepancies >= DIRECT_GIVE_UP and self.direct is direct:
            self.direct = None
            direct.close()
            log.warning("%s carried out %d requests in a row that were refused to objfs' "
                        "direct requests (last: %s of %s: %s); every request goes "
                        "through %s from now on (set %s to false to skip the attempt at "
                        "start)", self.sdk_name, self._discrepancies, method,
                        self.where + key, refused, self.sdk_name, self.direct_option)
        return result
