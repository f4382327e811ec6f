"""A scripted HTTP server on 127.0.0.1 for the backends' direct-path tests: a handler class
answers by the object's name, and records (name, whether the request came from the SDK)."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

# What the direct-path tests store and fetch: 512 KiB, and names that need quoting.
BODY = bytes(range(256)) * 2048
ODD_NAMES = ["ab/cd/plain", "a b+c&d=e?f#g", "tilde~and%percent", "ünïcødé/名前", "x" * 300]


class Answering(http.server.BaseHTTPRequestHandler):
    """Base of a scripted handler: HTTP/1.1 (kept connections), quiet, `seen` filled by
    `note`."""

    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, bool]]

    def log_message(self, *args: object) -> None:
        pass

    def note(self, from_sdk: bool) -> str:
        """Record this request; returns the object's name (the path's last segment)."""
        name = self.path.split("?", 1)[0].rsplit("/", 1)[-1]
        self.seen.append((name, from_sdk))
        return name

    def send(self, status: int, body: bytes, length: int | None = None, **headers: str) -> None:
        """Answer with `body` (announced as `length` bytes when given); header names with
        ``_`` for ``-``."""
        self.send_response(status)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)


@contextmanager
def serving(handler: type[http.server.BaseHTTPRequestHandler],
            **attributes: Any) -> Iterator[tuple[str, list[Any]]]:
    """Serve `handler` on a free port, given `attributes` and a new `seen` list as class
    attributes: (``http://127.0.0.1:PORT``, `seen`, which the handler fills)."""
    seen: list[Any] = []
    bound = type("Handler", (handler,), {**attributes, "seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), bound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def counting(direct: Any) -> list[str]:
    """Count the requests a backend's direct path sends: its `exchange` (worker threads) and
    its loop streams' `get` (whole-object GETs on the event loop, when it has them) wrapped to
    note each request's target in the list returned."""
    sent: list[str] = []
    exchange = direct.exchange

    def counted(method: str, target: str, *args: Any) -> Any:
        sent.append(target)
        return exchange(method, target, *args)

    direct.exchange = counted
    loop = getattr(direct, "loop", None)
    if loop is not None:
        loop_get = loop.get

        async def counted_on_loop(target: str, *args: Any) -> Any:
            sent.append(target)
            return await loop_get(target, *args)

        loop.get = counted_on_loop
    return sent


B = TypeVar("B")


def worker_thread_calls(backend: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The keys of the calls `backend` sends to worker threads (its `_run`), in a list that
    grows as they are made."""
    threaded: list[str] = []
    run = backend._run

    async def counted(op: str, key: str, *args: Any) -> Any:
        threaded.append(key)
        return await run(op, key, *args)

    monkeypatch.setattr(backend, "_run", counted)
    return threaded


def gets_from(backend: B, where: str) -> B:
    """`backend` with its whole-object GETs on the event loop (as built, "loop") or in worker
    threads ("threads": as with credentials its SDK refreshes)."""
    direct = getattr(backend, "direct", None)
    assert direct is not None and direct.loop is not None
    if where == "threads":
        direct.loop = None
    return backend


# A name's bytes, or the error it raises and a pattern of its message (None: any).
Expected = bytes | tuple[type[Exception], str | None]


def expect_answers(fetch: Callable[[str], bytes], expected: dict[str, Expected],
                   seen: list[tuple[str, bool]]) -> None:
    """Fetch each name in turn: its bytes, or the (error, message pattern) it must raise;
    every one of them sent direct and none again through the SDK. Empties `seen`."""
    for name, want in expected.items():
        if isinstance(want, bytes):
            assert fetch(name) == want, name
        else:
            error, match = want
            with pytest.raises(error, match=match):
                fetch(name)
    assert [sdk for _, sdk in seen] == [False] * len(expected)  # all direct, none sent again
    seen.clear()


def expect_left_to_the_sdk(fetch: Callable[[str], bytes], backend: Any, body: bytes,
                           seen: list[tuple[str, bool]], name: str = "forbidden-direct") -> None:
    """`name`, refused to the direct path and served to the SDK: the SDK has the last word,
    and three such refusals in a row end the backend's direct path."""
    assert fetch(name) == body
    assert seen[0] == (name, False)
    assert (name, True) in seen[1:]
    assert backend.direct is not None
    for _ in range(2):
        assert fetch(name) == body
    assert backend.direct is None  # three refusals in a row: the SDK's from now on


def storing(backend: Any, source: Path) -> Callable[[str], bytes]:
    """A `fetch` for `expect_answers` that uploads BODY (written into `source`) under each
    name through `backend`; returns BODY when it was stored."""
    source.write_bytes(BODY)

    def store(name: str) -> bytes:
        trio.run(backend.put, name, source)
        return BODY

    return store


def sizing(backend: Any) -> Callable[[str], bytes]:
    """A `fetch` for `expect_answers` that asks `backend` for each name's size (HEAD);
    returns it as ASCII digits."""
    return lambda name: b"%d" % trio.run(backend.head, name).size


def listing(backend: Any, modified: float) -> Callable[[str], bytes]:
    """A `fetch` for `expect_answers` that lists one page (at most 7) of each prefix through
    `backend`, whose scripted answer names blobs modified at `modified` and a next page
    ("next"); returns ``name=size`` of each, joined by ``|``."""

    def fetch(prefix: str) -> bytes:
        page, token = trio.run(backend.list_page, prefix, None, 7)
        assert token == "next"
        assert [info.modified for info in page] == [modified] * len(page)
        return b"|".join(f"{info.key}={info.size}".encode() for info in page)

    return fetch


def all_pages(backend: Any, prefix: str, limit: int) -> list[tuple[str, int, float]]:
    """Every object `backend` lists under `prefix`, page after page of `limit`: (name, size,
    modification time)."""
    found: list[tuple[str, int, float]] = []
    token = None
    while True:
        page, token = trio.run(backend.list_page, prefix, token, limit)
        found.extend((info.key, info.size, info.modified or 0.0) for info in page)
        if token is None:
            return found


# (prefix, page size) of the listings the direct-path tests compare with the SDK's: pages of
# every size, odd names, nothing; `LISTED_PAGES` pages over the objects of `listed_names`.
LISTINGS = [("", 1000), ("", 3), ("ab/cd/", 2), ("ab/cd/k", 1), ("a b+c", 5), ("ünïcødé/", 5),
            ("x" * 300, 5), ("no/such/prefix", 5)]
LISTED_PAGES = 1 + 4 + 3 + 5 + 1 + 1 + 1 + 1


def listed_names() -> list[str]:
    """The names stored for `expect_listings_as_the_sdks`: ODD_NAMES and five more."""
    return [*ODD_NAMES, *(f"ab/cd/k{n}" for n in range(5))]


def expect_listings_as_the_sdks(backend: Any, sdk: Any) -> None:
    """Each of LISTINGS through `backend` gives exactly what it gives through `sdk`: the
    names of `listed_names` under the prefix, in order, with a modification time."""
    names = listed_names()
    for prefix, limit in LISTINGS:
        listed = all_pages(backend, prefix, limit)
        assert listed == all_pages(sdk, prefix, limit), (prefix, limit)
        assert [name for name, _, _ in listed] == sorted(
            name for name in names if name.startswith(prefix)), prefix
        assert all(modified > 0 for _, _, modified in listed), prefix
