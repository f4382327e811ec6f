"""Whole-object GETs on the event loop (the S3 and Azure direct paths', through
`objfs.backends.loopgets`): HTTP/1.1 over trio streams, without a worker thread.

Why: a download in a worker thread hands the GIL back and forth with the event loop that
answers Orthanc. In a cold series read (one reader, eight prefetch downloads at a time) the
loop's thread waited for the GIL about 0.7 ms per instance, and the handoffs took about a
fifth of its CPU (perf: futex waits and wakeups). As trio tasks, the same downloads cost the
daemon 2.5 instead of 3.0 ms of CPU per cold read of a 0.5 MB instance (2.8 instead of 3.5
with A1 decryption), and Orthanc's cold reads went 10-18 % faster (docs/performance.md,
2026-12-04). A download yields to Orthanc's requests at every receive of at most STEP bytes,
which it checksums, decrypts if asked and writes to the local file (the page cache, as the
FUSE handlers' own writes) before the next.

`LoopConnections.get` sends one GET on a kept or new stream and reads the answer: a 200 with
a Content-Length is handed to the caller chunk by chunk; any other answer is handed to the
caller's `refused` after its body (when short) was read, and what that returns is raised. A
kept stream that the server closed while idle (nothing of the answer came) is replaced once
by a new one, as `objfs.backends.kept` does for threads. Network failures raise TimeoutError
(no answer within the read timeout, per receive as a socket timeout would) or
ConnectionError; what the caller's writer raises goes through unchanged. Cancellation closes
the stream in use. One owner: the event loop; no lock (every method runs on it).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable

import trio

from objfs.backends.kept import ERROR_BODY_LIMIT

# The most an answer's status line and headers may take.
HEAD_LIMIT = 64 * 1024
# The most one receive takes: what a step of a download does on the event loop (the copy to
# the page cache, the checksum, a decryption) stays around a tenth of a millisecond, the
# longest a FUSE request waits for it.
STEP = 256 * 1024


class Answer:
    """An answer's status, reason, headers (names lower-cased) and the bytes of its body that
    arrived with the head."""

    def __init__(self, version: str, status: int, reason: str, headers: dict[str, str],
                 rest: bytes) -> None:
        self.version = version
        self.status = status
        self.reason = reason
        self.headers = headers
        self.rest = rest


class NotOnLoop(Exception):
    """A success answer this module does not read (no Content-Length: chunked, or ended by
    closing): nothing was written, the stream is closed; the caller sends the request again
    through `objfs.backends.kept`, which reads any HTTP/1.1 answer."""


class _Stale(Exception):
    """A kept stream gave nothing of the answer: the server closed it while it was idle."""


class LoopConnections:
    """Kept-alive streams to one server, for whole-object GETs from the event loop."""

    def __init__(self, host: str, port: int, connect_timeout: float, read_timeout: float,
                 context: ssl.SSLContext | None, pool_size: int) -> None:
        """`context`: TLS with it (https), or plain TCP when None."""
        self.host, self.port = host, port
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.context = context
        self.pool_size = pool_size
        self._idle: list[trio.abc.Stream] = []
        self._closed = False

    async def get(self, target: str, headers: dict[str, str], write: Callable[[bytes], None],
                  check: Callable[[Answer], Callable[[bytes], None] | None],
                  refused: Callable[[Answer, bytes], Exception]) -> int:
        """GET `target` with `headers` (Host among them); a 200 answer's body is handed to
        `write` as it arrives and its length returned. `check` sees a 200 answer's head
        before any byte is written and returns what each chunk is also given to first (a
        checksum), or None; any other answer raises `refused(answer, its body)`. Raises
        NotOnLoop for a 200 without a Content-Length, ConnectionError for an answer shorter
        than its Content-Length, and what `write` raises, as it is."""
        request = "".join([f"GET {target} HTTP/1.1\r\n",
                           *(f"{name}: {value}\r\n" for name, value in headers.items()),
                           "\r\n"]).encode("latin-1")
        for attempt in (0, 1):
            kept = bool(self._idle)
            stream = self._idle.pop() if kept else await self._open()
            reusable = False
            try:
                try:
                    await self._send(stream, request)
                    answer = await self._head(stream)
                except _Stale:
                    if kept and attempt == 0:
                        continue  # closed by the server while idle: once more on a new one
                    raise ConnectionError(f"{self.host}: connection closed without an "
                                          "answer") from None
                length = _length(answer)
                if answer.status != 200:
                    body = answer.rest
                    if length is not None and len(body) <= length <= ERROR_BODY_LIMIT:
                        body = await self._rest(stream, body, length)
                        reusable = _keeps(answer)
                    raise refused(answer, body)
                if length is None:
                    raise NotOnLoop(f"{self.host}: a {answer.status} answer without a length")
                update = check(answer)
                copied = await self._copy(stream, answer.rest, length, write, update)
                # Bytes past the body (none from a sound server) would be read as the next
                # answer: such a stream is not kept.
                reusable = _keeps(answer) and len(answer.rest) <= length
                return copied
            finally:
                if reusable and not self._closed and len(self._idle) < self.pool_size:
                    self._idle.append(stream)
                else:
                    await trio.aclose_forcefully(stream)
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        """Close the idle streams; none is kept after (those in use close when their GET
        ends)."""
        self._closed = True
        idle, self._idle = self._idle, []
        for stream in idle:
            await trio.aclose_forcefully(stream)

    async def _open(self) -> trio.abc.Stream:
        try:
            with trio.fail_after(self.connect_timeout):
                stream: trio.abc.Stream = await self._connect()
                if self.context is not None:
                    tls = trio.SSLStream(stream, self.context, server_hostname=self.host,
                                         https_compatible=True)
                    try:
                        await tls.do_handshake()
                    except BaseException:
                        await trio.aclose_forcefully(tls)
                        raise
                    stream = tls
                return stream
        except trio.TooSlowError:
            raise TimeoutError(f"{self.host}: no connection within "
                               f"{self.connect_timeout}s") from None
        except (OSError, trio.BrokenResourceError) as exc:
            raise _network(exc, self.host) from exc

    async def _connect(self) -> trio.SocketStream:
        """A TCP stream to the first of the host's addresses that accepts one, tried in the
        order the resolver gives them (as `http.client` connects); one after the other
        rather than `trio.open_tcp_stream`'s staggered attempts, whose nursery costs more CPU
        than the rest of a GET's setup, and servers that close every connection after one
        answer (moto) make a GET pay it each time."""
        found = await trio.socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        failure: OSError | None = None
        for family, kind, proto, _, address in found:
            sock = trio.socket.socket(family, kind, proto)
            try:
                await sock.connect(address)
            except OSError as exc:
                sock.close()
                failure = exc
                continue
            except BaseException:
                sock.close()
                raise
            return trio.SocketStream(sock)
        raise failure or OSError(f"{self.host}: no address to connect to")

    async def _send(self, stream: trio.abc.Stream, data: bytes) -> None:
        try:
            with trio.fail_after(self.read_timeout):
                await stream.send_all(data)
        except trio.TooSlowError:
            raise TimeoutError(f"{self.host}: request not taken within "
                               f"{self.read_timeout}s") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _Stale() from exc

    async def _receive(self, stream: trio.abc.Stream, size: int) -> bytes:
        """Up to `size` bytes; b"" at the end of the stream."""
        try:
            with trio.fail_after(self.read_timeout):
                return bytes(await stream.receive_some(size))
        except trio.TooSlowError:
            raise TimeoutError(f"{self.host}: no answer within {self.read_timeout}s") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _network(exc, self.host) from exc

    async def _head(self, stream: trio.abc.Stream) -> Answer:
        data = b""
        while (end := data.find(b"\r\n\r\n")) < 0:
            if len(data) > HEAD_LIMIT:
                raise ConnectionError(f"{self.host}: an answer head over {HEAD_LIMIT} bytes")
            try:
                got = await self._receive(stream, STEP)
            except ConnectionError:
                if not data:
                    raise _Stale() from None
                raise
            if not got:
                if not data:
                    raise _Stale()
                raise ConnectionError(f"{self.host}: the answer ended in its head")
            data += got
        lines = data[:end].decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise ConnectionError(f"{self.host}: not an HTTP answer: {lines[0][:100]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return Answer(version, int(code), reason, headers, data[end + 4:])

    async def _rest(self, stream: trio.abc.Stream, body: bytes, length: int) -> bytes:
        while len(body) < length:
            got = await self._receive(stream, length - len(body))
            if not got:
                raise ConnectionError(f"{self.host}: an answer shorter than announced")
            body += got
        return body

    async def _copy(self, stream: trio.abc.Stream, first: bytes, length: int,
                    write: Callable[[bytes], None], update: Callable[[bytes], None] | None) -> int:
        copied = 0
        chunk = first[:length]
        while True:
            if chunk:
                if update is not None:
                    update(chunk)
                write(chunk)
                copied += len(chunk)
            if copied >= length:
                return copied
            chunk = await self._receive(stream, min(STEP, length - copied))
            if not chunk:
                raise ConnectionError(f"{self.host}: short answer ({copied} bytes of "
                                      f"{length})")


def _length(answer: Answer) -> int | None:
    """The body's announced length; None when it has none (or chunked coding)."""
    if "chunked" in answer.headers.get("transfer-encoding", "").lower():
        return None
    value = answer.headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None


def _keeps(answer: Answer) -> bool:
    """Whether the server keeps the connection open after `answer` (HTTP/1.0: only when it
    says so)."""
    connection = answer.headers.get("connection", "").lower()
    if answer.version == "HTTP/1.0":
        return connection == "keep-alive"
    return connection != "close"


def _network(exc: BaseException, host: str) -> ConnectionError:
    """A network failure as `objfs.backends.kept.network_error` words it; trio's "broken
    stream" is worded by its cause (a reset, a certificate refused)."""
    if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None:
        exc = exc.__cause__
    return ConnectionError(f"{host}: {type(exc).__name__}: {exc}")
