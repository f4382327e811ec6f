"""`objfs.sidecar.orthanc.OrthancClient` against a small HTTP server on 127.0.0.1 that answers
as a given Orthanc version would: the series prefetch's one-request path (Orthanc >= 1.12.5),
its fallback, and answers that are not JSON. The real Orthanc versions are in
tests/test_prefetch.py."""

from __future__ import annotations

import base64
import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from objfs.config.settings import OrthancSettings
from objfs.errors import OrthancUnavailable
from objfs.sidecar.orthanc import REQUESTS_AT_ONCE, OrthancClient


class FakeOrthanc:
    """Answers every request with `body` (bytes, sent as is) after `delay` seconds, and logs
    (method, path) and the Authorization header. Like Orthanc, it keeps a connection (and
    the thread serving it) open for the client's next request unless the client asks to
    close it; it counts the connections open and the most requests served at once."""

    def __init__(self) -> None:
        self.body = b"[]"
        self.delay = 0.0
        self.requests: list[tuple[str, str]] = []
        self.authorization: list[str | None] = []
        self.open_connections = 0
        self.connections = 0  # opened in all
        self.missing: set[str] = set()  # paths answered 404
        self.close_always = False  # like an Orthanc with KeepAlive false
        self.busy = self.most_busy = 0
        lock = threading.Lock()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive unless "Connection: close"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with lock:
                    fake.open_connections += 1
                    fake.connections += 1

            def finish(self) -> None:
                super().finish()
                with lock:
                    fake.open_connections -= 1

            def _any(self) -> None:
                with lock:
                    fake.busy += 1
                    fake.most_busy = max(fake.most_busy, fake.busy)
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                fake.requests.append((self.command, self.path))
                fake.authorization.append(self.headers.get("Authorization"))
                time.sleep(fake.delay)
                with lock:
                    fake.busy -= 1
                body = b"{}" if self.path in fake.missing else fake.body
                self.send_response(404 if self.path in fake.missing else 200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if fake.close_always:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def fake() -> Iterator[FakeOrthanc]:
    server = FakeOrthanc()
    yield server
    server.server.shutdown()
    server.server.server_close()


def ask(fake: FakeOrthanc, times: int = 1) -> list[list[str] | None]:
    async def main() -> list[list[str] | None]:
        client = OrthancClient(OrthancSettings(url=fake.url, timeout=5))
        return [await client.series_dicom_uuids("1.2.3") for _ in range(times)]

    return trio.run(main)


def instance(index: str | None, number: str | None, *attachments: tuple[int, str]
             ) -> dict[str, Any]:
    return {"ID": f"i{index}-{number}", "Type": "Instance",
            "Metadata": {} if index is None else {"IndexInSeries": index},
            "MainDicomTags": {} if number is None else {"InstanceNumber": number},
            "Attachments": [{"ContentType": t, "Uuid": u} for t, u in attachments]}


def test_one_find_names_the_dicom_attachments_in_viewing_order(fake: FakeOrthanc) -> None:
    fake.body = json.dumps([
        instance("10", "1", (1, "u10")),
        instance("2", "7", (1, "u2"), (3, "until-pixel-data-2")),
        instance(None, "3", (1, "no-index-3")),
        instance(None, None, (1, "nothing")),
        instance("1", "9", (1, "u1")),
        instance(None, "2", (1, "no-index-2")),
    ]).encode()
    assert ask(fake) == [["u1", "u2", "u10", "no-index-2", "no-index-3", "nothing"]]
    method, path = fake.requests[0]
    assert (method, path) == ("POST", "/tools/find")


def test_an_orthanc_before_1_12_5_is_asked_the_find_once(fake: FakeOrthanc) -> None:
    fake.body = json.dumps(["a-b-c-d-e", "f-g-h-i-j"]).encode()  # ResponseContent ignored
    assert ask(fake, times=2) == [None, None]
    assert fake.requests == [("POST", "/tools/find")]


def test_a_series_listing_names_each_dicom_attachment(fake: FakeOrthanc) -> None:
    """Orthanc 1.10 lists a series' instances with their DICOM attachment as `FileUuid`, in
    any order: they come back in viewing order; an entry without it names None."""
    fake.body = json.dumps([
        {"ID": "i3", "IndexInSeries": 3, "FileUuid": "u3", "MainDicomTags": {}},
        {"ID": "i1", "IndexInSeries": 1, "FileUuid": "u1", "MainDicomTags": {}},
        {"ID": "i2", "IndexInSeries": 2, "MainDicomTags": {}},
    ]).encode()

    async def main() -> list[tuple[str, str | None]]:
        client = OrthancClient(OrthancSettings(url=fake.url, timeout=5))
        return await client.series_instances("s-1")

    assert trio.run(main) == [("i1", "u1"), ("i2", None), ("i3", "u3")]
    assert fake.requests == [("GET", "/series/s-1/instances")]


def test_an_unknown_series_is_empty(fake: FakeOrthanc) -> None:
    assert ask(fake) == [[]]


def test_an_answer_that_is_not_json_is_orthanc_unavailable(fake: FakeOrthanc) -> None:
    fake.body = b"<html>proxy error</html>"
    with pytest.raises(OrthancUnavailable, match="not JSON"):
        ask(fake)


def test_no_connection_stays_open_after_its_answer(fake: FakeOrthanc) -> None:
    """Orthanc gives every open connection one of its HttpThreadsCount threads until its
    KeepAliveTimeout: a connection kept for objfs' next request would take it from Orthanc's
    own clients (reads through Orthanc stalled for 2 s while the prefetch's were open)."""

    async def main() -> None:
        client = OrthancClient(OrthancSettings(url=fake.url, timeout=5))
        for _ in range(3):
            assert await client.series_dicom_uuids("1.2.3") == []
            with trio.fail_after(2):
                while fake.open_connections:
                    await trio.sleep(0.01)

    trio.run(main)
    assert len(fake.requests) == 3


def lookup_run(fake: FakeOrthanc, instances: list[str]) -> list[str | None]:
    async def main() -> list[str | None]:
        client = OrthancClient(OrthancSettings(url=fake.url, timeout=5))
        return await client.dicom_uuids(instances)

    return trio.run(main)


@pytest.mark.parametrize("close_always", [False, True])
def test_a_run_of_lookups_shares_one_connection_closed_with_the_last_answer(
        fake: FakeOrthanc, close_always: bool) -> None:
    """An Orthanc before 1.12.5 names one instance's attachment per request: a run of them
    goes on one connection, which is not left open; an Orthanc that closes every connection
    (`KeepAlive` false) gets a new one for each."""
    fake.body = json.dumps({"Uuid": "u"}).encode()
    fake.close_always = close_always
    fake.missing.add("/instances/gone/attachments/dicom/info")
    assert lookup_run(fake, ["a", "gone", "b"]) == ["u", None, "u"]
    assert [path for _, path in fake.requests] == [
        f"/instances/{i}/attachments/dicom/info" for i in ("a", "gone", "b")]
    assert fake.connections == (3 if close_always else 1)
    deadline = time.monotonic() + 2
    while fake.open_connections and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake.open_connections == 0


def test_a_run_answered_with_something_else_is_orthanc_unavailable(fake: FakeOrthanc) -> None:
    fake.body = b"<html>proxy error</html>"
    with pytest.raises(OrthancUnavailable, match="not JSON"):
        lookup_run(fake, ["a", "b"])


def test_requests_at_once_are_bounded(fake: FakeOrthanc) -> None:
    """However many tasks ask at the same time, at most REQUESTS_AT_ONCE of Orthanc's HTTP
    threads serve objfs."""
    fake.delay = 0.05

    async def main() -> None:
        client = OrthancClient(OrthancSettings(url=fake.url, timeout=5))
        async with trio.open_nursery() as nursery:
            for n in range(4 * REQUESTS_AT_ONCE):
                nursery.start_soon(client.dicom_uuids, [f"instance-{n}"])

    fake.body = json.dumps({"Uuid": "u"}).encode()
    trio.run(main)
    assert len(fake.requests) == 4 * REQUESTS_AT_ONCE
    assert 1 < fake.most_busy <= REQUESTS_AT_ONCE


def test_credentials_and_a_path_prefix_reach_orthanc(fake: FakeOrthanc) -> None:
    """Orthanc behind a reverse proxy's path, with a user: every request carries the prefix
    and HTTP basic authentication."""

    async def main() -> str | None:
        client = OrthancClient(OrthancSettings(url=fake.url + "/pacs/", username="objfs",
                                               password="s3cret:x", timeout=5))
        return (await client.dicom_uuids(["abc"]))[0]

    fake.body = json.dumps({"Uuid": "the-uuid"}).encode()
    assert trio.run(main) == "the-uuid"
    assert fake.requests == [("GET", "/pacs/instances/abc/attachments/dicom/info")]
    assert fake.authorization == ["Basic " + base64.b64encode(b"objfs:s3cret:x").decode()]


def test_an_orthanc_that_is_not_listening_is_orthanc_unavailable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once closed

    async def main() -> None:
        client = OrthancClient(OrthancSettings(url=f"http://127.0.0.1:{port}", timeout=5))
        await client.series_id("1.2.3")

    with pytest.raises(OrthancUnavailable, match=f"Orthanc at http://127.0.0.1:{port} is "
                                                 "unreachable"):
        trio.run(main)
