"""`objfs.sidecar.orthanc.OrthancClient` against a small HTTP server on 127.0.0.1 that answers
as a given Orthanc version would: the series prefetch's one-request path (Orthanc >= 1.12.5),
its fallback, and answers that are not JSON. The real Orthanc versions are in
tests/test_prefetch.py."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from objfs.config.settings import OrthancSettings
from objfs.errors import OrthancUnavailable
from objfs.sidecar.orthanc import OrthancClient


class FakeOrthanc:
    """Answers every request with `body` (bytes, sent as is) and logs (method, path)."""

    def __init__(self) -> None:
        self.body = b"[]"
        self.requests: list[tuple[str, str]] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                fake.requests.append((self.command, self.path))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(fake.body)))
                self.end_headers()
                self.wfile.write(fake.body)

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
        try:
            return [await client.series_dicom_uuids("1.2.3") for _ in range(times)]
        finally:
            await client.aclose()

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


def test_an_unknown_series_is_empty(fake: FakeOrthanc) -> None:
    assert ask(fake) == [[]]


def test_an_answer_that_is_not_json_is_orthanc_unavailable(fake: FakeOrthanc) -> None:
    fake.body = b"<html>proxy error</html>"
    with pytest.raises(OrthancUnavailable, match="not JSON"):
        ask(fake)
