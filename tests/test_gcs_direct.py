"""The GCS backend's direct requests (objfs.backends.gcsdirect): downloads, uploads, HEADs,
deletes and listings. The URLs are the SDK's, they serve, store, delete and list what the SDK
would against fake-gcs-server, and every other kind of answer is checked, mapped or left to
the SDK, against a scripted HTTP server on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import re
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import google_crc32c
import pytest
import trio

from objfs import errors
from objfs.backends.gcs import GcsBackend
from objfs.config import settings_from_tree
from tests.support.emulators import FakeGcsServer
from tests.support.scripted import (
    BODY,
    LISTED_PAGES,
    ODD_NAMES,
    Answering,
    all_pages,
    counting,
    expect_answers,
    expect_left_to_the_sdk,
    expect_listings_as_the_sdks,
    listed_names,
    listing,
    serving,
    sizing,
    storing,
)


def backend_at(endpoint: str, bucket: str = "b", **extra: Any) -> GcsBackend:
    settings = settings_from_tree({"GoogleCloudStorage": {
        "BucketName": bucket, "Endpoint": endpoint, "Project": "test", "ConnectTimeout": 1,
        "RequestTimeout": 2, "MaxRetries": 0, **extra}})
    assert settings.gcs is not None
    return GcsBackend(settings.gcs)


def crc32c(data: bytes) -> str:
    return base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()


def get(backend: GcsBackend, key: str, path: Path, offset: int = 0,
        length: int | None = None) -> bytes:
    trio.run(backend.get, key, path, offset, length)
    return path.read_bytes()


def test_the_media_url_is_the_sdks() -> None:
    backend = backend_at("http://127.0.0.1:9")
    assert backend.direct is not None
    for name in ODD_NAMES:
        sdk_url = backend.bucket.blob(name)._get_download_url(backend.client)
        assert sdk_url == f"http://127.0.0.1:9{backend.direct.target(name)}", name


def test_no_direct_downloads_when_asked_or_behind_a_proxy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert backend_at("http://127.0.0.1:9", DirectRequests=False).direct is None
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:3128")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert backend_at("http://127.0.0.1:9").direct is None


def test_direct_downloads_serve_what_the_server_holds(fake_gcs: FakeGcsServer,
                                                      tmp_path: Path) -> None:
    bucket = fake_gcs.new_bucket("direct-downloads")
    source = tmp_path / "source"
    source.write_bytes(BODY)
    for name in ODD_NAMES[:4]:
        fake_gcs.raw_put(bucket, name, source)
    backend = backend_at(fake_gcs.endpoint, bucket)
    assert backend.direct is not None
    sent = counting(backend.direct)
    out = tmp_path / "out"
    for name in ODD_NAMES[:4]:
        assert get(backend, name, out) == BODY
    assert get(backend, ODD_NAMES[0], out, 1000, 5000) == BODY[1000:6000]
    assert get(backend, ODD_NAMES[0], out, len(BODY) - 10) == BODY[-10:]
    assert get(backend, ODD_NAMES[0], out, len(BODY) + 10) == b""  # past the end
    with pytest.raises(errors.NotFound):
        get(backend, "no/such/object", out)
    assert trio.run(backend.head, ODD_NAMES[1]).size == len(BODY)
    with pytest.raises(errors.NotFound):
        trio.run(backend.head, "no/such/object")
    assert len(sent) == 10  # every one of them direct, none through the SDK
    # Connections are kept: ten requests, one connection.
    assert len(backend.direct._idle) == 1


def test_direct_uploads_store_what_the_sdk_would(fake_gcs: FakeGcsServer,
                                                tmp_path: Path) -> None:
    """Objects up to ChunkSize go in one direct multipart upload and come out as the SDK's
    do: same bytes, CRC32C and storage class; larger ones are the SDK's resumable uploads."""
    bucket = fake_gcs.new_bucket("direct-uploads")
    backend = backend_at(fake_gcs.endpoint, bucket, StorageClass="NEARLINE", ChunkSize=5)
    assert backend.direct is not None
    sent = counting(backend.direct)
    source = tmp_path / "source"
    bodies = {name: BODY[:1000 * n] for n, name in enumerate(ODD_NAMES[:4])}  # one empty
    for name, body in bodies.items():
        source.write_bytes(body)
        trio.run(backend.put, name, source)
    assert len(sent) == 4
    large = BODY * 10 + b"!"  # more than ChunkSize (5 MiB): the SDK's resumable upload
    source.write_bytes(large)
    trio.run(backend.put, "large", source)
    assert len(sent) == 4
    for name, body in {**bodies, "large": large}.items():
        stored = backend.bucket.get_blob(name)
        assert (stored.crc32c, stored.storage_class) == (crc32c(body), "NEARLINE"), name
        assert stored.download_as_bytes() == body, name
    source.write_bytes(b"replaced")
    trio.run(backend.put, ODD_NAMES[0], source)  # an existing name is replaced
    assert get(backend, ODD_NAMES[0], tmp_path / "out") == b"replaced"


def test_direct_deletes_and_listings_match_the_sdks(fake_gcs: FakeGcsServer,
                                                    tmp_path: Path) -> None:
    """Listings (prefixes of odd names, pages of every size) give exactly what the SDK's
    give, and deletes remove what the SDK's would, an absent object included; all of them
    direct."""
    bucket = fake_gcs.new_bucket("direct-deletes")
    source = tmp_path / "source"
    for n, name in enumerate(listed_names()):
        source.write_bytes(BODY[:100 * n])
        fake_gcs.raw_put(bucket, name, source)
    backend = backend_at(fake_gcs.endpoint, bucket)
    sdk = backend_at(fake_gcs.endpoint, bucket, DirectRequests=False)
    assert backend.direct is not None and sdk.direct is None
    sent = counting(backend.direct)
    expect_listings_as_the_sdks(backend, sdk)
    assert len(sent) == LISTED_PAGES  # every page direct
    requests = len(sent)
    for name in [*ODD_NAMES, "ab/cd/k0", "no/such/object"]:
        trio.run(backend.delete, name)
    assert len(sent) == requests + len(ODD_NAMES) + 2  # every one direct
    assert [name for name, _, _ in all_pages(sdk, "", 100)] == [f"ab/cd/k{n}" for n in (1, 2, 3, 4)]
    assert backend.direct is not None  # nothing was refused


def test_without_an_upload_url_uploads_are_the_sdks_and_downloads_stay_direct(
        fake_gcs: FakeGcsServer, tmp_path: Path) -> None:
    bucket = fake_gcs.new_bucket("no-upload-url")
    backend = backend_at(fake_gcs.endpoint, bucket)
    assert backend.direct is not None
    backend.direct.upload = None  # as when the SDK's upload URL could not be built
    sent = counting(backend.direct)
    source = tmp_path / "source"
    source.write_bytes(BODY)
    for n in range(4):
        trio.run(backend.put, f"k{n}", source)
    assert sent == [] and backend.direct is not None
    assert get(backend, "k3", tmp_path / "out") == BODY
    assert len(sent) == 1


class Scripted(Answering):
    """Answers a media GET, a metadata GET, a multipart upload, a DELETE or a listing by the
    object's name (a listing: by its prefix); keeps the target, headers and body of each
    upload and the target of each other JSON API request."""

    uploads: list[tuple[str, dict[str, str], bytes]]
    targets: list[str]  # of each metadata GET, DELETE and listing

    def metadata(self) -> None:
        """An object's metadata, as the JSON API answers it; the SDK's own request must ask
        what objfs' asks (the same target)."""
        sdk = "x-goog-api-client" in self.headers
        name = urllib.parse.unquote(self.path.split("?", 1)[0].rsplit("/o/", 1)[-1])
        self.seen.append((name, sdk))
        self.targets.append(self.path)
        resource = json.dumps({"kind": "storage#object", "name": name, "bucket": "b",
                               "size": str(len(BODY)), "generation": "1"}).encode()
        self.answer(name, sdk, resource, content_type="application/json")

    def answer(self, name: str, sdk: bool, body: bytes, **headers: str) -> None:
        """`body` with `headers` for "good" (and for the SDK's "forbidden-direct"), else
        the answer the name asks for."""
        if name == "good" or (name == "forbidden-direct" and sdk):
            self.send(200, body, **headers)
        elif name == "forbidden-direct":
            self.send(403, b'{"error": {"code": 403, "message": "no"}}')
        elif name == "missing":
            self.send(404, b"Not Found")
        elif name == "throttled":
            self.send(429, b"slow down")
        else:
            self.send(503, b"backend error")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        sdk = "x-goog-api-client" in self.headers
        found = re.search(rb"\r\n\r\n(\{.*?\})\r\n", body)
        name = json.loads(found.group(1))["name"] if found else ""
        self.seen.append((name, sdk))
        self.uploads.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        self.answer(name, sdk, json.dumps({"name": name, "bucket": "b", "size": "0"}).encode(),
                    content_type="application/json")

    def do_DELETE(self) -> None:
        sdk = "x-goog-api-client" in self.headers
        name = urllib.parse.unquote(self.path.split("?", 1)[0].rsplit("/o/", 1)[-1])
        self.seen.append((name, sdk))
        self.targets.append(self.path)
        if name == "good":
            self.send(204, b"")
        else:
            self.answer(name, sdk, b"")

    def listing(self) -> None:
        """A listing, answered by its prefix: "good" names one object, "unreadable" gives
        objfs an object without a size (the SDK the good answer)."""
        sdk = "x-goog-api-client" in self.headers
        query = urllib.parse.parse_qs(self.path.split("?", 1)[1])
        prefix = query.get("prefix", [""])[0]
        self.seen.append((prefix, sdk))
        self.targets.append(self.path)
        item = {"name": f"{prefix}/1", "bucket": "b", "size": "3",
                "updated": "2026-12-04T01:02:03.456Z"}
        if prefix == "unreadable":
            if not sdk:
                del item["size"]
            prefix = "good"
        page = json.dumps({"kind": "storage#objects", "items": [item],
                           "nextPageToken": "next"}).encode()
        self.answer(prefix, sdk, page, content_type="application/json")

    def do_GET(self) -> None:
        if self.path.startswith("/storage/v1/b/b/o?"):
            self.listing()
            return
        if not self.path.startswith("/download/"):
            self.metadata()
            return
        sdk = "x-goog-api-client" in self.headers
        name = self.note(sdk)
        if name == "damaged":
            self.send(200, BODY[:-1] + b"!", x_goog_hash=f"crc32c={crc32c(BODY)}")
        else:
            self.answer(name, sdk, BODY, x_goog_hash=f"crc32c={crc32c(BODY)},md5=AAAA")


# (endpoint, the requests seen, the uploads received, the targets of the metadata GETs)
Script = tuple[str, list[tuple[str, bool]], list[tuple[str, dict[str, str], bytes]], list[str]]


def test_each_kind_of_answer_to_a_head(scripted: Script) -> None:
    endpoint, seen, _, targets = scripted
    backend = backend_at(endpoint)
    size = sizing(backend)
    expect_answers(size, {"good": b"%d" % len(BODY), "missing": (errors.NotFound, None),
                          "throttled": (errors.Throttled, None),
                          "failing": (errors.Unavailable, None)},
                   seen)
    expect_left_to_the_sdk(size, backend, b"%d" % len(BODY), seen)
    # objfs' requests and the SDK's asked for the same target.
    asked = {target for target in targets if "/o/forbidden-direct?" in target}
    assert len(asked) == 1 and "projection=noAcl" in asked.pop()


def test_each_kind_of_answer_to_a_delete(scripted: Script) -> None:
    endpoint, seen, _, targets = scripted
    backend = backend_at(endpoint)

    def delete(name: str) -> bytes:
        trio.run(backend.delete, name)
        return b"deleted"

    expect_answers(delete, {"good": b"deleted", "missing": b"deleted",  # gone already
                            "throttled": (errors.Throttled, None),
                            "failing": (errors.Unavailable, None)},
                   seen)
    expect_left_to_the_sdk(delete, backend, b"deleted", seen)
    asked = {target for target in targets if "/o/forbidden-direct" in target}
    assert len(asked) == 1  # objfs' DELETE and the SDK's: the same target


def test_each_kind_of_answer_to_a_listing(scripted: Script) -> None:
    endpoint, seen, _, targets = scripted
    backend = backend_at(endpoint)
    expect_answers(listing(backend, 1796346123.456),
                   {"good": b"good/1=3", "missing": (errors.BucketMissing, None),
                    "throttled": (errors.Throttled, None), "failing": (errors.Unavailable, None)},
                   seen)
    expect_left_to_the_sdk(listing(backend, 1796346123.456), backend, b"forbidden-direct/1=3", seen)
    # objfs' listing asked what the SDK's asked (the same parameters, in another order).
    asked = [urllib.parse.parse_qs(target.split("?", 1)[1]) for target in targets
             if "prefix=forbidden-direct" in target]
    assert len(asked) >= 2 and all(query == asked[0] for query in asked)
    assert asked[0]["maxResults"] == ["7"] and asked[0]["projection"] == ["noAcl"]
    # An answer objfs cannot read is the SDK's to read.
    seen.clear()
    unreadable = backend_at(endpoint)
    page, _ = trio.run(unreadable.list_page, "unreadable", None, 7)
    assert [(info.key, info.size) for info in page] == [("unreadable/1", 3)]
    assert [request for request in seen if request[0] == "unreadable"] == [
        ("unreadable", False), ("unreadable", True)]


@pytest.fixture
def scripted() -> Iterator[Script]:
    uploads: list[tuple[str, dict[str, str], bytes]] = []
    targets: list[str] = []
    with serving(Scripted, uploads=uploads, targets=targets) as (url, seen):
        yield url, seen, uploads, targets


def test_each_kind_of_answer(scripted: Script, tmp_path: Path) -> None:
    endpoint, seen, _, _ = scripted
    backend = backend_at(endpoint)
    out = tmp_path / "out"

    def fetch(name: str) -> bytes:
        return get(backend, name, out)

    expect_answers(fetch, {"good": BODY, "damaged": (errors.Unavailable, "CRC32C"),
                           "missing": (errors.NotFound, None),
                           "throttled": (errors.Throttled, None),
                           "failing": (errors.Unavailable, None)},
                   seen)
    expect_left_to_the_sdk(fetch, backend, BODY, seen)


def test_each_kind_of_answer_to_an_upload(scripted: Script, tmp_path: Path) -> None:
    endpoint, seen, uploads, _ = scripted
    backend = backend_at(endpoint, StorageClass="COLDLINE")
    store = storing(backend, tmp_path / "source")
    expect_answers(store, {"good": BODY, "missing": (errors.BucketMissing, None),
                           "throttled": (errors.Throttled, None),
                           "failing": (errors.Unavailable, None)},
                   seen)
    target, headers, body = uploads[0]
    boundary = re.fullmatch(r'multipart/related; boundary="(.+)"', headers["content-type"])
    assert boundary is not None
    head, _, rest = body.partition(b"\r\n\r\n" + BODY)
    assert rest == f"\r\n--{boundary.group(1)}--".encode()
    assert json.loads(head.split(b"\r\n\r\n")[1].split(b"\r\n")[0]) == {
        "name": "good", "storageClass": "COLDLINE", "crc32c": crc32c(BODY)}
    expect_left_to_the_sdk(store, backend, BODY, seen)
    sdk_target = next(t for t, h, _ in uploads if "x-goog-api-client" in h)
    assert target == sdk_target  # the SDK's own upload URL


def test_servers_are_verified_with_the_ca_bundle_requests_would_use(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from objfs.backends.kept import requests_ca_bundle

    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    assert Path(requests_ca_bundle()).is_file()
    monkeypatch.setenv("CURL_CA_BUNDLE", str(tmp_path / "curl.pem"))
    assert requests_ca_bundle() == str(tmp_path / "curl.pem")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "requests.pem"))
    assert requests_ca_bundle() == str(tmp_path / "requests.pem")
