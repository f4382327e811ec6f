"""The Azure backend's direct requests (objfs.backends.azuredirect): downloads, uploads, HEADs
and listings. The URL is the SDK's, Azurite accepts their signature and serves, stores and
lists what the SDK would, and every other kind of answer is mapped or left to the SDK,
against a scripted HTTP server on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from objfs import errors
from objfs.backends.azure import AzureBackend
from objfs.backends.azuredirect import listed_blobs
from objfs.config import settings_from_tree
from tests.support.emulators import AZ_ACCOUNT, AZ_KEY, AzuriteServer
from tests.support.scripted import (
    BODY,
    LISTED_PAGES,
    ODD_NAMES,
    Answering,
    counting,
    expect_answers,
    expect_left_to_the_sdk,
    expect_listings_as_the_sdks,
    gets_from,
    listed_names,
    listing,
    serving,
    sizing,
    storing,
    worker_thread_calls,
)


def backend(connection_string: str, container: str = "c", **extra: Any) -> AzureBackend:
    settings = settings_from_tree({"AzureBlobStorage": {
        "ConnectionString": connection_string, "ContainerName": container,
        "CreateContainerIfNotExists": False, "ConnectTimeout": 1, "RequestTimeout": 2,
        "MaxRetries": 0, **extra}})
    assert settings.azure is not None
    return AzureBackend(settings.azure)


def connection_string(endpoint: str, key: str = AZ_KEY) -> str:
    return (f"DefaultEndpointsProtocol=http;AccountName={AZ_ACCOUNT};AccountKey={key};"
            f"BlobEndpoint={endpoint};")


def get(azure: AzureBackend, key: str, path: Path, offset: int = 0,
        length: int | None = None) -> bytes:
    trio.run(azure.get, key, path, offset, length)
    return path.read_bytes()


def test_the_blob_url_is_the_sdks() -> None:
    azure = backend(connection_string(f"http://127.0.0.1:9/{AZ_ACCOUNT}"))
    assert azure.direct is not None
    for name in ODD_NAMES:
        sdk_url = azure.container.get_blob_client(name).url
        assert sdk_url == f"http://127.0.0.1:9{azure.direct.path(name)}", name


def test_no_direct_downloads_without_an_account_key_when_asked_or_behind_a_proxy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = f"http://127.0.0.1:9/{AZ_ACCOUNT}"
    sas = f"BlobEndpoint={endpoint};SharedAccessSignature=sv=2021-08-06&sig=abc"
    assert backend(sas).direct is None
    assert backend(connection_string(endpoint), DirectRequests=False).direct is None
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:3128")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert backend(connection_string(endpoint)).direct is None


@pytest.mark.parametrize("where", ["loop", "threads"])
def test_direct_downloads_serve_what_azurite_holds(azurite: AzuriteServer,
                                                   tmp_path: Path, where: str) -> None:
    """Whole blobs come on the event loop (or, "threads", from worker threads as ranges
    always do), every request direct and signed as Azurite wants, on kept connections."""
    container = azurite.new_bucket(f"direct-downloads-{where}")
    source = tmp_path / "source"
    source.write_bytes(BODY)
    for name in ODD_NAMES[:4]:
        azurite.raw_put(container, name, source)
    azure = gets_from(backend(azurite.connection_string(), container), where)
    assert azure.direct is not None
    sent = counting(azure.direct)
    out = tmp_path / "out"
    for name in ODD_NAMES[:4]:
        assert get(azure, name, out) == BODY
    assert get(azure, ODD_NAMES[0], out, 1000, 5000) == BODY[1000:6000]
    assert get(azure, ODD_NAMES[0], out, len(BODY) + 10, 10) == b""  # past the end
    with pytest.raises(errors.NotFound):
        get(azure, "no/such/blob", out)
    assert len(sent) == 7  # every one of them direct (signed as Azurite wants)
    # Seven requests, one kept connection (the ranges' and, in threads, the others').
    assert len(azure.direct._idle) == 1
    # Ranges open at the end, and blobs larger than the SDK's 4 MiB chunk (which it would
    # fetch in parallel ranges), are one direct GET as well.
    assert get(azure, ODD_NAMES[0], out, len(BODY) - 10) == BODY[-10:]
    assert get(azure, ODD_NAMES[0], out, len(BODY)) == b""
    large = (BODY * (5 * 1024 * 1024 // len(BODY) + 1))[:5 * 1024 * 1024 + 7]
    source.write_bytes(large)
    azurite.raw_put(container, "large", source)
    assert get(azure, "large", out) == large
    assert get(azure, "large", out, 4 * 1024 * 1024 - 3, 1024 * 1024 + 5) == \
        large[4 * 1024 * 1024 - 3:5 * 1024 * 1024 + 2]
    source.write_bytes(b"")
    azurite.raw_put(container, "empty", source)
    assert get(azure, "empty", out) == b""
    assert len(sent) == 12
    # HEADs: the size, or NotFound (a missing blob, not a missing container).
    assert trio.run(azure.head, "large").size == len(large)
    assert trio.run(azure.head, "empty").size == 0
    with pytest.raises(errors.NotFound):
        trio.run(azure.head, "no/such/blob")
    assert len(sent) == 15
    assert len(azure.direct._idle) == 1


async def test_whole_blobs_come_on_the_event_loop_over_a_kept_stream(
        azurite: AzuriteServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole blob comes on the event loop, without a worker thread, every one over the
    same kept stream; a range still takes a worker thread; closing the backend closes the
    stream."""
    container = azurite.new_bucket("loop-downloads")
    source = tmp_path / "source"
    source.write_bytes(BODY)
    azurite.raw_put(container, "blob", source)
    azure = backend(azurite.connection_string(), container)
    threaded = worker_thread_calls(azure, monkeypatch)
    out = tmp_path / "out"
    for _ in range(3):
        assert await azure.get("blob", out) == len(BODY)
        assert out.read_bytes() == BODY
    assert threaded == []
    streams = azure._loop_streams
    assert streams is not None and len(streams._idle) == 1
    assert await azure.get("blob", out, 10, 5) == 5
    assert out.read_bytes() == BODY[10:15] and threaded == ["blob"]
    await azure.aclose()
    assert streams._idle == []


def test_direct_uploads_store_what_the_sdk_would(azurite: AzuriteServer,
                                                tmp_path: Path) -> None:
    """Blobs up to ChunkSize go in one direct Put Blob (Azurite checks the signature and the
    MD5) and come out as the SDK's do: same bytes, content type, MD5 and access tier; larger
    ones are staged by the SDK."""
    container = azurite.new_bucket("direct-uploads")
    source = tmp_path / "source"
    azure = backend(azurite.connection_string(), container, AccessTier="Cool", ChunkSize=5)
    assert azure.direct is not None
    sent = counting(azure.direct)
    bodies = {name: BODY[:1000 * n] for n, name in enumerate(ODD_NAMES[:4])}  # one empty
    for name, body in bodies.items():
        source.write_bytes(body)
        trio.run(azure.put, name, source)
    assert len(sent) == 4
    large = BODY * 10 + b"!"  # more than ChunkSize (5 MiB): the SDK's blocks
    source.write_bytes(large)
    trio.run(azure.put, "large", source)
    assert len(sent) == 4
    client = azurite.service().get_container_client(container)
    for name, body in bodies.items():
        assert bytes(client.download_blob(name).readall()) == body, name
        props = client.get_blob_client(name).get_blob_properties()
        assert props.content_settings.content_type == "application/octet-stream"
        assert bytes(props.content_settings.content_md5) == hashlib.md5(body).digest()
        assert props.blob_tier == "Cool"
    assert bytes(client.download_blob("large").readall()) == large
    source.write_bytes(b"replaced")
    trio.run(azure.put, ODD_NAMES[0], source)  # an existing name is replaced
    assert get(azure, ODD_NAMES[0], tmp_path / "out") == b"replaced"


def test_a_wrong_key_is_refused_both_ways(azurite: AzuriteServer, tmp_path: Path) -> None:
    """Azurite checks the signature: a direct request signed with another key is refused,
    left to the SDK, refused again, and reported as a refusal."""
    container = azurite.new_bucket("wrong-key")
    source = tmp_path / "source"
    source.write_bytes(b"x")
    azurite.raw_put(container, "blob", source)
    other_key = base64.b64encode(b"k" * 64).decode()
    azure = backend(azurite.connection_string(other_key), container)
    assert azure.direct is not None
    with pytest.raises(errors.Denied):
        get(azure, "blob", tmp_path / "out")
    with pytest.raises(errors.Denied):
        trio.run(azure.put, "other", source)


def test_direct_listings_match_the_sdks(azurite: AzuriteServer) -> None:
    """Listings (prefixes of odd names, pages of every size) give exactly what the SDK's
    give, all of them direct: Azurite checks their signature."""
    container = azurite.new_bucket("direct-listings")
    azure = backend(azurite.connection_string(), container)
    sdk = backend(azurite.connection_string(), container, DirectRequests=False)
    assert azure.direct is not None and sdk.direct is None
    for n, name in enumerate(listed_names()):
        azure.container.upload_blob(name, BODY[:100 * n])
    sent = counting(azure.direct)
    expect_listings_as_the_sdks(azure, sdk)
    assert len(sent) == LISTED_PAGES  # every page direct
    assert azure.direct is not None  # nothing was refused


def test_names_the_service_encoded_are_decoded() -> None:
    """Names XML cannot carry come percent-encoded (`Encoded="true"`), as the SDK reads
    them; a blob without a size is an answer objfs does not read."""
    page = (b'<?xml version="1.0" encoding="utf-8"?><EnumerationResults><Blobs>'
            b'<Blob><Name Encoded="true">ctl%01name</Name><Properties>'
            b'<Last-Modified>Fri, 04 Dec 2026 01:02:03 GMT</Last-Modified>'
            b'<Content-Length>7</Content-Length></Properties></Blob>'
            b'<Blob><Name>plain%01</Name><Properties><Content-Length>0</Content-Length>'
            b'</Properties></Blob></Blobs><NextMarker/></EnumerationResults>')
    assert listed_blobs(page) == ([("ctl\x01name", 7, 1796346123.0), ("plain%01", 0, None)],
                                  None)
    with pytest.raises(ValueError):
        listed_blobs(page.replace(b"<Content-Length>7</Content-Length>", b""))


class Scripted(Answering):
    """Answers a blob GET, PUT or HEAD by its name, a listing by its prefix; keeps the
    headers and body of each direct PUT it stores, and the query of each listing."""

    stored: list[tuple[dict[str, str], bytes]]
    queries: list[tuple[dict[str, list[str]], bool]]

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        sdk = "x-ms-client-request-id" in self.headers
        name = self.note(sdk)
        if name == "good" or (name == "forbidden-direct" and sdk):
            if not sdk:
                self.stored.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send(201, b"", content_md5=self.headers["content-md5"])
        else:
            self.fail(name)

    def listing(self, sdk: bool) -> None:
        """A List Blobs answered by its prefix: "good" names one blob; "unreadable" gives
        objfs a blob without a size (the SDK the good answer)."""
        query = urllib.parse.parse_qs(self.path.split("?", 1)[1])
        prefix = query.get("prefix", [""])[0]
        self.seen.append((prefix, sdk))
        self.queries.append((query, sdk))
        if prefix not in ("good", "unreadable") and not (prefix == "forbidden-direct" and sdk):
            self.fail(prefix)
            return
        size = "" if prefix == "unreadable" and not sdk else "<Content-Length>3</Content-Length>"
        page = (f'<?xml version="1.0" encoding="utf-8"?><EnumerationResults '
                f'ServiceEndpoint="http://127.0.0.1/{AZ_ACCOUNT}" ContainerName="c">'
                f"<Prefix>{prefix}</Prefix><MaxResults>7</MaxResults><Blobs><Blob>"
                f"<Name>{prefix}/1</Name><Properties>"
                f"<Last-Modified>Fri, 04 Dec 2026 01:02:03 GMT</Last-Modified>{size}"
                f"<BlobType>BlockBlob</BlobType></Properties></Blob></Blobs>"
                f"<NextMarker>next</NextMarker></EnumerationResults>").encode()
        self.send(200, page, content_type="application/xml")

    def do_GET(self) -> None:
        sdk = "x-ms-client-request-id" in self.headers
        if "comp=list" in self.path:
            self.listing(sdk)
            return
        name = self.note(sdk)
        if name == "good":
            self.send(200, BODY)
        elif name == "short":
            self.send(200, BODY[:1000], length=len(BODY))
            self.close_connection = True
        elif name == "forbidden-direct" and sdk:  # its first request asks for a range
            self.send(206, BODY, x_ms_blob_type="BlockBlob",
                      content_range=f"bytes 0-{len(BODY) - 1}/{len(BODY)}")
        else:
            self.fail(name)

    def do_HEAD(self) -> None:
        sdk = "x-ms-client-request-id" in self.headers
        name = self.note(sdk)
        if name == "good" or (name == "forbidden-direct" and sdk):
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.send_header("x-ms-blob-type", "BlockBlob")
            self.end_headers()
        else:
            self.fail(name)

    def fail(self, name: str) -> None:
        """The answer a name asks for when it is not served: objfs' requests for
        "forbidden-direct" are refused (the SDK's are served)."""
        if name == "forbidden-direct":
            self.send(403, b"", x_ms_error_code="AuthorizationFailure")
        elif name == "missing":
            self.send(404, b"", x_ms_error_code="BlobNotFound")
        elif name == "no-container":
            self.send(404, b"", x_ms_error_code="ContainerNotFound")
        elif name == "busy":
            self.send(503, b"", x_ms_error_code="ServerBusy")
        else:
            self.send(500, b"", x_ms_error_code="InternalError")


# (endpoint, the requests seen, the direct PUTs stored)
Script = tuple[str, list[tuple[str, bool]], list[tuple[dict[str, str], bytes]]]
QUERIES: list[tuple[dict[str, list[str]], bool]] = []  # of the listings, by `scripted`


@pytest.fixture
def scripted() -> Iterator[Script]:
    stored: list[tuple[dict[str, str], bytes]] = []
    QUERIES.clear()
    with serving(Scripted, stored=stored, queries=QUERIES) as (url, seen):
        yield f"{url}/{AZ_ACCOUNT}", seen, stored


@pytest.mark.parametrize("where", ["loop", "threads"])
def test_each_kind_of_answer(scripted: Script, tmp_path: Path, where: str) -> None:
    endpoint, seen, _ = scripted
    azure = gets_from(backend(connection_string(endpoint)), where)
    out = tmp_path / "out"

    def fetch(name: str) -> bytes:
        return get(azure, name, out)

    short = "short answer" if where == "loop" else "short read"
    expect_answers(fetch, {"good": BODY, "short": (errors.Unavailable, short),
                           "missing": (errors.NotFound, None),
                           "no-container": (errors.BucketMissing, None),
                           "busy": (errors.Throttled, None), "failing": (errors.Unavailable, None)},
                   seen)
    expect_left_to_the_sdk(fetch, azure, BODY, seen)


def test_each_kind_of_answer_to_an_upload(scripted: Script, tmp_path: Path) -> None:
    endpoint, seen, stored = scripted
    azure = backend(connection_string(endpoint), AccessTier="Hot")
    assert azure.direct is not None
    store = storing(azure, tmp_path / "source")
    expect_answers(store, {"good": BODY, "missing": (errors.NotFound, None),
                           "no-container": (errors.BucketMissing, None),
                           "busy": (errors.Throttled, None), "failing": (errors.Unavailable, None)},
                   seen)
    headers, body = stored[0]
    assert body == BODY
    assert headers["content-md5"] == base64.b64encode(hashlib.md5(BODY).digest()).decode()
    assert (headers["content-type"], headers["x-ms-blob-type"], headers["x-ms-access-tier"]) \
        == ("application/octet-stream", "BlockBlob", "Hot")
    expect_left_to_the_sdk(store, azure, BODY, seen)


def test_each_kind_of_answer_to_a_head(scripted: Script) -> None:
    endpoint, seen, _ = scripted
    azure = backend(connection_string(endpoint))
    size = sizing(azure)
    expect_answers(size, {"good": b"%d" % len(BODY), "missing": (errors.NotFound, None),
                          "no-container": (errors.BucketMissing, None),
                          "busy": (errors.Throttled, None), "failing": (errors.Unavailable, None)},
                   seen)
    expect_left_to_the_sdk(size, azure, b"%d" % len(BODY), seen)


def test_each_kind_of_answer_to_a_listing(scripted: Script) -> None:
    endpoint, seen, _ = scripted
    azure = backend(connection_string(endpoint))
    expect_answers(listing(azure, 1796346123.0),
                   {"good": b"good/1=3", "no-container": (errors.BucketMissing, None),
                    "busy": (errors.Throttled, None), "failing": (errors.Unavailable, None)},
                   seen)
    expect_left_to_the_sdk(listing(azure, 1796346123.0), azure, b"forbidden-direct/1=3", seen)
    # objfs' listing asked what the SDK's asked.
    asked = {sdk: query for query, sdk in QUERIES if query.get("prefix") == ["forbidden-direct"]}
    assert asked[False] == asked[True]
    assert asked[False]["comp"] == ["list"] and asked[False]["maxresults"] == ["7"]
    # An answer objfs cannot read is the SDK's to read.
    seen.clear()
    unreadable = backend(connection_string(endpoint))
    page, _ = trio.run(unreadable.list_page, "unreadable", None, 7)
    assert [(info.key, info.size) for info in page] == [("unreadable/1", 3)]
    assert seen == [("unreadable", False), ("unreadable", True)]
