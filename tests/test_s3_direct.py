"""The S3 backend's direct GETs, HEADs, PUTs, batch deletes and listings
(objfs.backends.s3direct): what they send and what they do with every kind of answer, against
moto and against a scripted HTTP server on 127.0.0.1."""

from __future__ import annotations

import base64
import datetime
import http.server
import ipaddress
import logging
import re
import ssl
import threading
import time
import urllib.parse
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import botocore.credentials
import google_crc32c
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from objfs import errors
from objfs.backends import asyncget
from objfs.backends.s3 import S3Backend
from objfs.backends.s3direct import bucket_url, listed_objects
from objfs.config import settings_from_tree
from tests.support.emulators import MotoServer
from tests.support.scripted import (
    LISTED_PAGES,
    counting,
    expect_listings_as_the_sdks,
    gets_from,
    listed_names,
    serving,
    worker_thread_calls,
)

BODY = bytes(range(256)) * 2048  # 512 KiB


def backend_at(endpoint: str, bucket: str = "b", **extra: Any) -> S3Backend:
    settings = settings_from_tree({"AwsS3Storage": {
        "BucketName": bucket, "Region": "us-east-1", "Endpoint": endpoint,
        "AccessKey": "a", "SecretKey": "s", "VirtualAddressing": False, "ConnectTimeout": 1,
        "RequestTimeout": 2, "MaxRetries": 0, **extra}})
    assert settings.s3 is not None
    return S3Backend(settings.s3)


def crc32(data: bytes) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def crc32c(data: bytes) -> str:
    return base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()


class Scripted(http.server.BaseHTTPRequestHandler):
    """Answers by the key's name; records (path, connection, user agent) of every request."""

    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, int, str]]
    puts: list[tuple[dict[str, str], bytes]]  # headers and body of each PUT and POST
    queries: list[tuple[dict[str, list[str]], bool]]  # of each listing; whether botocore's
    connections: Iterator[int]

    def setup(self) -> None:
        super().setup()
        self.number = next(self.connections)

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(headers.pop("length", len(body))))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self) -> None:
        length = int(self.headers["Content-Length"])
        name = self.path.rsplit("/", 1)[-1]
        if name == "reset-early":  # answers (and closes) before reading the body
            self.seen.append((self.path, self.number, self.headers.get("User-Agent", "")))
            self._send(403, b"<Error><Code>AccessDenied</Code></Error>")
            self.close_connection = True
            return
        body = self.rfile.read(length)
        self.seen.append((self.path, self.number, self.headers.get("User-Agent", "")))
        self.puts.append((dict(self.headers.items()), body))
        if name == "slow-down":
            self._send(503, b"<Error><Code>SlowDown</Code></Error>")
        elif name == "too-large":
            self._send(400, b"<Error><Code>EntityTooLarge</Code></Error>")
        elif name.startswith("crc32-only") and "x-amz-checksum-crc32c" in self.headers:
            # A store that knows CRC32 but not CRC32C, answering as the name says.
            self._send(*{"crc32-only-501": (501, b"<Error><Code>NotImplemented</Code></Error>"),
                         "crc32-only-400": (400, b"<Error><Code>InvalidArgument</Code>"
                                                 b"<Message>x-amz-checksum-crc32c</Message>"
                                                 b"</Error>")}[name])
        else:
            self._send(200, b"")

    def do_POST(self) -> None:  # DeleteObjects: answers by the first key named
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.seen.append((self.path, self.number, self.headers.get("User-Agent", "")))
        self.puts.append((dict(self.headers.items()), body))
        keys = re.findall(rb"<Key>([^<]*)</Key>", body)
        if keys[0] == b"slow-down":
            self._send(503, b"<Error><Code>SlowDown</Code></Error>")
        elif keys[0] == b"no-batch":  # a store without DeleteObjects
            self._send(501, b"<Error><Code>NotImplemented</Code></Error>")
        elif keys[0] == b"botocore-only" and "Botocore" not in self.headers.get("User-Agent", ""):
            self._send(400, b"<Error><Code>InvalidRequest</Code></Error>")
        elif keys[0] == b"refused":  # refused; the next one was not there; the rest deleted
            self._send(200, b"<?xml version='1.0' encoding='UTF-8'?><DeleteResult>"
                       b"<Error><Key>refused</Key><Code>AccessDenied</Code><Message>Access "
                       b"&amp; more</Message></Error><Error><Key>gone</Key><Code>NoSuchKey"
                       b"</Code><Message>gone</Message></Error></DeleteResult>")
        else:  # not quiet, as moto: every key deleted named
            self._send(200, b"<DeleteResult>" + b"".join(
                b"<Deleted><Key>" + key + b"</Key></Deleted>" for key in keys)
                + b"</DeleteResult>")

    def do_HEAD(self) -> None:
        self.seen.append((self.path, self.number, self.headers.get("User-Agent", "")))
        name = self.path.rsplit("/", 1)[-1]
        if name == "good":
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
        elif name == "forbidden":
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

    def listing(self) -> None:
        """A ListObjectsV2 answered by its prefix: "good" names one object, its key
        URL-encoded as asked; "unreadable" gives objfs an object without a size (botocore
        the good answer)."""
        query = urllib.parse.parse_qs(self.path.split("?", 1)[1])
        prefix = query.get("prefix", [""])[0]
        botocore = "Botocore" in self.headers.get("User-Agent", "")
        self.queries.append((query, botocore))
        if prefix == "missing":
            self._send(404, b"<Error><Code>NoSuchBucket</Code><Message>no</Message></Error>")
            return
        if prefix == "slow-down":
            self._send(503, b"<Error><Code>SlowDown</Code></Error>")
            return
        if prefix == "botocore-only" and not botocore:
            self._send(400, b"<Error><Code>InvalidRequest</Code></Error>")
            return
        size = "" if prefix == "unreadable" and not botocore else "<Size>3</Size>"
        self._send(200, (
            '<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws'
            f'.com/doc/2006-03-01/"><Name>b</Name><Prefix>{prefix}</Prefix><KeyCount>1'
            f'</KeyCount><MaxKeys>7</MaxKeys><EncodingType>url</EncodingType><IsTruncated>true'
            f'</IsTruncated><Contents><Key>{prefix}%2F1+%26x</Key><LastModified>'
            f'2026-12-04T01:02:03.000Z</LastModified><ETag>"e"</ETag>{size}<StorageClass>'
            'STANDARD</StorageClass></Contents><NextContinuationToken>next'
            '</NextContinuationToken></ListBucketResult>').encode())

    def do_GET(self) -> None:
        self.seen.append((self.path, self.number, self.headers.get("User-Agent", "")))
        if "list-type=2" in self.path:
            self.listing()
            return
        name = self.path.rsplit("/", 1)[-1]
        if name == "good":
            self._send(200, BODY, x_amz_checksum_crc32=crc32(BODY))
        elif name == "good-then-close":  # kept alive by the answer, closed right after
            self._send(200, BODY)
            self.close_connection = True
        elif name == "damaged":
            self._send(200, BODY[:-1] + b"!", x_amz_checksum_crc32=crc32(BODY))
        elif name == "composite":
            self._send(200, BODY, x_amz_checksum_crc32="AAAAAA==-3")
        elif name == "good-crc32c":
            self._send(200, BODY, x_amz_checksum_crc32c=crc32c(BODY))
        elif name == "damaged-crc32c":
            self._send(200, BODY[:-1] + b"!", x_amz_checksum_crc32c=crc32c(BODY))
        elif name == "short":
            self._send(200, BODY[:1000], length=str(len(BODY)))
            self.close_connection = True
        elif name == "chunked":  # no Content-Length: the body in chunked coding
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("x-amz-checksum-crc32", crc32(BODY))
            self.end_headers()
            for start in range(0, len(BODY), 100_000):
                piece = BODY[start:start + 100_000]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        elif name == "stall":  # a head and the first bytes, then nothing for 3 s
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY[:1000])
            self.wfile.flush()
            time.sleep(3)
            self.close_connection = True
        elif name == "slow-down":
            self._send(503, b"<Error><Code>SlowDown</Code><Message>Reduce your request rate"
                       b"</Message></Error>")
        elif name == "moved":
            self._send(301, b"<Error><Code>PermanentRedirect</Code></Error>")
        elif name == "botocore-only":  # refuses what is not botocore's
            if "Botocore" in self.headers.get("User-Agent", ""):
                self._send(200, BODY)
            else:
                self._send(400, b"<Error><Code>InvalidRequest</Code></Error>")
        else:
            self._send(404, b"<Error><Code>NoSuchKey</Code><Message>gone</Message></Error>")


PUTS: list[tuple[dict[str, str], bytes]] = []
QUERIES: list[tuple[dict[str, list[str]], bool]] = []


@pytest.fixture
def scripted() -> Iterator[tuple[str, list[tuple[str, int, str]]]]:
    PUTS.clear()
    QUERIES.clear()
    with serving(Scripted, puts=PUTS, queries=QUERIES,
                 connections=iter(range(1, 1_000_000))) as server:
        yield server


@pytest.mark.parametrize("where", ["loop", "threads"])
async def test_answers_are_read_checked_and_connections_kept(
        scripted: tuple[str, list[tuple[str, int, str]]], tmp_path: Path, where: str) -> None:
    endpoint, seen = scripted
    backend = gets_from(backend_at(endpoint), where)
    assert backend.direct is not None
    out = tmp_path / "o"
    for _ in range(3):
        assert await backend.get("ab/good", out) == len(BODY)
        assert out.read_bytes() == BODY
    assert await backend.get("composite", out) == len(BODY)  # per-part sums: not checked
    assert [path for path, _, _ in seen] == ["/b/ab/good"] * 3 + ["/b/composite"]
    assert {connection for _, connection, _ in seen} == {1}  # one kept connection
    assert all("Botocore" not in agent for _, _, agent in seen)
    with pytest.raises(errors.Unavailable, match="CRC32"):
        await backend.get("damaged", out)
    with pytest.raises(errors.Unavailable):
        await backend.get("short", out)
    with pytest.raises(errors.Throttled, match="SlowDown"):
        await backend.get("slow-down", out)
    with pytest.raises(errors.NotFound, match="NoSuchKey"):
        await backend.get("missing", out)
    await backend.get("ab/good", out)
    # Error answers read to their end keep the connection (a throttled bucket is not also
    # sent new handshakes); the short answer's, which the server closed, is not reused.
    assert [(path.removeprefix("/b/"), connection) for path, connection, _ in seen[4:]] == [
        ("damaged", 1), ("short", 1), ("slow-down", 2), ("missing", 2), ("ab/good", 2)]
    await backend.aclose()  # the kept connection closes; none is kept after
    await backend.get("ab/good", out)
    assert seen[-1][1] != seen[-2][1]
    streams = backend._loop_streams
    assert backend.direct._idle == [] and streams is not None and streams._idle == []


async def test_whole_gets_take_no_worker_thread(
        scripted: tuple[str, list[tuple[str, int, str]]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole object comes on the event loop, through a transform (decryption) too; a range
    still takes a worker thread."""
    endpoint, seen = scripted
    backend = backend_at(endpoint)
    threaded = worker_thread_calls(backend, monkeypatch)
    out = tmp_path / "o"
    assert await backend.get("ab/good", out) == len(BODY)
    assert out.read_bytes() == BODY

    class Marking:
        """Each piece received, counted; "end" at the end."""

        pieces = 0

        def update(self, data: bytes) -> bytes:
            self.pieces += 1
            return bytes(data)

        def finalize(self) -> bytes:
            return b"end"

    marking = Marking()
    assert await backend.get("ab/good", out, transform=marking) == len(BODY)
    assert out.read_bytes() == BODY + b"end" and marking.pieces >= 1
    assert threaded == []
    await backend.get("ab/good", out, offset=10, length=5)  # (this server sends it all)
    assert threaded == ["ab/good"]
    assert [path for path, _, _ in seen] == ["/b/ab/good"] * 3


async def test_a_stalled_answer_times_out_and_a_cancelled_get_closes_its_connection(
        scripted: tuple[str, list[tuple[str, int, str]]], tmp_path: Path) -> None:
    """On the event loop as in a thread: an answer that stops coming raises Unavailable after
    the read timeout (2 s here; the server holds it 3 s), and a GET cancelled meanwhile does
    not leave its connection to the next one."""
    endpoint, seen = scripted
    backend = backend_at(endpoint)
    out = tmp_path / "o"
    with pytest.raises(errors.Unavailable, match=r"no answer within 2"):
        await backend.get("stall", out)
    with trio.move_on_after(0.5) as scope:
        await backend.get("stall", out)
    assert scope.cancelled_caught
    assert backend._loop_streams is not None and backend._loop_streams._idle == []
    assert await backend.get("ab/good", out) == len(BODY)
    assert [connection for _, connection, _ in seen] == [1, 2, 3]


async def test_an_answer_without_a_length_sends_gets_to_threads(
        scripted: tuple[str, list[tuple[str, int, str]]], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """A store that streams an object in chunked coding: the GET is sent again from a worker
    thread (direct, not botocore: nothing was refused), and later GETs go there first."""
    caplog.set_level(logging.INFO, "objfs.backends.loopgets")
    endpoint, seen = scripted
    backend = backend_at(endpoint)
    out = tmp_path / "o"
    assert await backend.get("ab/chunked", out) == len(BODY)
    assert out.read_bytes() == BODY
    assert backend.direct is not None and backend.direct.loop is None
    assert "worker threads from now on" in caplog.text
    assert await backend.get("ab/good", out) == len(BODY)
    assert [path for path, _, _ in seen] == ["/b/ab/chunked"] * 2 + ["/b/ab/good"]
    assert all("Botocore" not in agent for _, _, agent in seen)


async def test_credentials_botocore_refreshes_keep_gets_in_threads(
        scripted: tuple[str, list[tuple[str, int, str]]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A refresh of a role's credentials is a blocking request: with such credentials no GET
    runs on the event loop, and the direct path still serves them from threads."""
    endpoint, seen = scripted
    expiry = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)).isoformat()
    metadata = {"access_key": "a", "secret_key": "s", "token": None, "expiry_time": expiry}
    refreshable = botocore.credentials.RefreshableCredentials.create_from_metadata(
        metadata, lambda: metadata, "test")
    monkeypatch.setattr("boto3.session.Session.get_credentials", lambda self: refreshable)
    backend = backend_at(endpoint)
    assert backend.direct is not None and backend.direct.loop is None
    assert await backend.get("ab/good", tmp_path / "o") == len(BODY)
    assert all("Botocore" not in agent for _, _, agent in seen)


async def test_heads_tell_the_size_on_a_kept_connection(
        scripted: tuple[str, list[tuple[str, int, str]]], tmp_path: Path) -> None:
    endpoint, seen = scripted
    backend = backend_at(endpoint)
    for _ in range(2):
        assert (await backend.head("ab/good")).size == len(BODY)
    with pytest.raises(errors.NotFound):
        await backend.head("ab/missing")
    assert [(path, connection) for path, connection, _ in seen] == [("/b/ab/good", 1)] * 2 + [
        ("/b/ab/missing", 1)]
    with pytest.raises(errors.Denied):  # botocore's answer, after the direct HEAD's 403
        await backend.head("forbidden")
    agents = [agent for path, _, agent in seen if path == "/b/forbidden"]
    assert len(agents) >= 2 and "Botocore" not in agents[0] and "Botocore" in agents[1]


@pytest.mark.parametrize("where", ["loop", "threads"])
async def test_a_kept_connection_the_server_closed_is_retried_once(
        scripted: tuple[str, list[tuple[str, int, str]]], tmp_path: Path, where: str) -> None:
    endpoint, seen = scripted
    backend = gets_from(backend_at(endpoint), where)
    out = tmp_path / "o"
    await backend.get("good-then-close", out)
    assert await backend.get("good", out) == len(BODY)
    assert [(path, connection) for path, connection, _ in seen] == [
        ("/b/good-then-close", 1), ("/b/good", 2)]


@pytest.mark.parametrize("where", ["loop", "threads"])
async def test_answers_it_does_not_handle_go_to_botocore(
        scripted: tuple[str, list[tuple[str, int, str]]], tmp_path: Path, where: str) -> None:
    endpoint, seen = scripted
    backend = gets_from(backend_at(endpoint), where)
    with pytest.raises(errors.ObjfsError):
        await backend.get("moved", tmp_path / "o")
    agents = [agent for path, _, agent in seen if path == "/b/moved"]
    assert len(agents) == 2 and "Botocore" not in agents[0] and "Botocore" in agents[1]


@pytest.mark.parametrize("where", ["loop", "threads"])
async def test_direct_requests_end_when_botocore_keeps_succeeding_where_they_fail(
        scripted: tuple[str, list[tuple[str, int, str]]], tmp_path: Path,
        caplog: pytest.LogCaptureFixture, where: str) -> None:
    endpoint, seen = scripted
    backend = gets_from(backend_at(endpoint), where)
    out = tmp_path / "o"
    await backend.get("ab/good", out)
    for _ in range(2):
        assert await backend.get("ab/botocore-only", out) == len(BODY)
    await backend.get("ab/good", out)  # a direct success: the count starts again
    for _ in range(2):
        await backend.get("ab/botocore-only", out)
    assert backend.direct is not None
    await backend.get("ab/botocore-only", out)
    assert backend.direct is None
    assert "every request goes through botocore from now on" in caplog.text
    before = len(seen)
    assert await backend.get("ab/botocore-only", out) == len(BODY)
    assert out.read_bytes() == BODY
    assert [agent for _, _, agent in seen[before:]] != [] and all(
        "Botocore" in agent for _, _, agent in seen[before:])


@pytest.mark.parametrize("where", ["loop", "threads"])
async def test_gets_check_a_crc32c_too(scripted: tuple[str, list[tuple[str, int, str]]],
                                       tmp_path: Path, where: str) -> None:
    """An object stored with a CRC32C (objfs' own PUTs) comes with that checksum: checked."""
    endpoint, seen = scripted
    backend = gets_from(backend_at(endpoint), where)
    out = tmp_path / "o"
    assert await backend.get("good-crc32c", out) == len(BODY)
    assert out.read_bytes() == BODY
    with pytest.raises(errors.Unavailable, match="CRC32C does not match"):
        await backend.get("damaged-crc32c", out)
    assert all("Botocore" not in agent for _, _, agent in seen)


async def test_puts_send_an_unsigned_body_with_its_crc32c_and_the_objects_headers(
        scripted: tuple[str, list[tuple[str, int, str]]], tmp_path: Path) -> None:
    endpoint, seen = scripted
    backend = backend_at(endpoint, StorageClass="STANDARD_IA", ServerSideEncryption="aws:kms",
                         SseKmsKeyId="key-1", ObjectAcl="bucket-owner-full-control",
                         Tags={"site": "a b", "kind": "dicom"})
    source = tmp_path / "src"
    source.write_bytes(BODY)
    for _ in range(2):
        await backend.put("ab/k.dcm", source)
    assert [(path, connection) for path, connection, _ in seen] == [("/b/ab/k.dcm", 1)] * 2
    headers, body = PUTS[0]
    assert body == BODY
    lower = {k.lower(): v for k, v in headers.items()}
    assert lower["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
    assert lower["x-amz-checksum-crc32c"] == crc32c(BODY)
    assert lower["x-amz-sdk-checksum-algorithm"] == "CRC32C"
    assert "x-amz-checksum-crc32" not in lower
    assert lower["x-amz-storage-class"] == "STANDARD_IA"
    assert lower["x-amz-server-side-encryption"] == "aws:kms"
    assert lower["x-amz-server-side-encryption-aws-kms-key-id"] == "key-1"
    assert lower["x-amz-acl"] == "bucket-owner-full-control"
    assert lower["x-amz-tagging"] == "site=a+b&kind=dicom"
    signed = lower["authorization"].split("SignedHeaders=")[1].split(",")[0].split(";")
    assert {"x-amz-checksum-crc32c", "x-amz-storage-class", "x-amz-tagging",
            "host"} <= set(signed)
    with pytest.raises(errors.Throttled):
        await backend.put("slow-down", source)
    # What the direct PUT leaves to botocore: a 400, and an answer before the body was read.
    for name, error in (("too-large", errors.TooLarge), ("reset-early", errors.Denied)):
        before = len(seen)
        with pytest.raises(error):
            await backend.put(name, source)
        agents = [agent for path, _, agent in seen[before:] if path == f"/b/{name}"]
        assert "Botocore" not in agents[0] and all("Botocore" in a for a in agents[1:]), agents
        assert len(agents) >= 2
    # A 400 that is not about the checksum leaves the algorithm as it was.
    assert backend.direct is not None and backend.direct.checksum == "CRC32C"


@pytest.mark.parametrize("name", ["crc32-only-501", "crc32-only-400"])
async def test_a_store_refusing_crc32c_gets_crc32_from_then_on(
        name: str, scripted: tuple[str, list[tuple[str, int, str]]], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """A store that does not know CRC32C (501 NotImplemented, or 400 InvalidArgument) gets
    that PUT from botocore (CRC32), and CRC32 in every direct PUT after it, with a warning;
    nothing fails and nothing is sent twice more."""
    endpoint, seen = scripted
    backend = backend_at(endpoint)
    source = tmp_path / "src"
    source.write_bytes(BODY)
    await backend.put(name, source)
    agents = ["Botocore" in agent for _, _, agent in seen]
    assert agents == [False, True]
    assert [{k.lower() for k in headers} & {"x-amz-checksum-crc32", "x-amz-checksum-crc32c"}
            for headers, _ in PUTS] == [{"x-amz-checksum-crc32c"}, {"x-amz-checksum-crc32"}]
    assert "PUTs send a CRC32 from now on" in caplog.text
    for _ in range(2):
        await backend.put(name, source)
    assert ["Botocore" in agent for _, _, agent in seen] == [False, True, False, False]
    for headers, body in PUTS[2:]:
        lower = {k.lower(): v for k, v in headers.items()}
        assert (lower["x-amz-checksum-crc32"], lower["x-amz-sdk-checksum-algorithm"],
                body) == (crc32(BODY), "CRC32", BODY)


async def test_batch_deletes_send_one_quiet_request_and_read_only_the_errors(
        scripted: tuple[str, list[tuple[str, int, str]]]) -> None:
    endpoint, seen = scripted
    backend = backend_at(endpoint)
    keys = ["ab/k.dcm", "ab/a&b<c>.dcm", "ab/k.dcm.enc"]
    for _ in range(2):
        await backend.delete_many(keys)
    # Where botocore sends it in path style: the bucket's path, no trailing slash.
    assert [(path, connection) for path, connection, _ in seen] == [("/b?delete", 1)] * 2
    assert all("Botocore" not in agent for _, _, agent in seen)
    headers, body = PUTS[0]
    assert body == (b'<?xml version="1.0" encoding="UTF-8"?><Delete xmlns="http://s3.amazonaws'
                    b'.com/doc/2006-03-01/"><Quiet>true</Quiet><Object><Key>ab/k.dcm</Key>'
                    b'</Object><Object><Key>ab/a&amp;b&lt;c&gt;.dcm</Key></Object><Object><Key>'
                    b'ab/k.dcm.enc</Key></Object></Delete>')
    lower = {k.lower(): v for k, v in headers.items()}
    assert lower["x-amz-checksum-crc32"] == crc32(body)
    assert lower["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
    signed = lower["authorization"].split("SignedHeaders=")[1].split(",")[0].split(";")
    assert {"x-amz-checksum-crc32", "content-type", "host"} <= set(signed)
    # A key that was not there is deleted; one the store refused fails the batch.
    with pytest.raises(errors.Denied, match=r"b/refused: AccessDenied Access & more \(1 of 3"):
        await backend.delete_many(["refused", "gone", "x"])
    with pytest.raises(errors.Throttled):
        await backend.delete_many(["slow-down"])
    with pytest.raises(errors.Unsupported):
        await backend.delete_many(["no-batch", "x"])
    before = len(seen)
    await backend.delete_many(["botocore-only", "x"])  # a 400: botocore's turn, which succeeds
    agents = [agent for _, _, agent in seen[before:]]
    assert len(agents) == 2 and "Botocore" not in agents[0] and "Botocore" in agents[1]


async def test_listings_read_each_kind_of_answer(
        scripted: tuple[str, list[tuple[str, int, str]]]) -> None:
    endpoint, seen = scripted
    backend = backend_at(endpoint)
    page, token = await backend.list_page("good", None, 7)
    assert [(info.key, info.size, info.modified) for info in page] == [
        ("good/1 &x", 3, 1796346123.0)]  # decoded, as asked with encoding-type=url
    assert token == "next"
    await backend.list_page("good", "next", 7)
    asked = [query for query, _ in QUERIES]
    assert all(path.startswith("/b?") for path, _, _ in seen)  # botocore's path
    assert asked[0] == {"list-type": ["2"], "prefix": ["good"], "max-keys": ["7"],
                        "encoding-type": ["url"]}
    assert asked[1] == {**asked[0], "continuation-token": ["next"]}
    with pytest.raises(errors.BucketMissing):
        await backend.list_page("missing", None, 7)
    with pytest.raises(errors.Throttled):
        await backend.list_page("slow-down", None, 7)
    assert all("Botocore" not in agent for _, _, agent in seen)
    # A 400 and an answer objfs cannot read are botocore's, which asks the same.
    for prefix in ("botocore-only", "unreadable"):
        QUERIES.clear()
        page, _ = await backend.list_page(prefix, None, 7)
        assert [(info.key, info.size) for info in page] == [(f"{prefix}/1 &x", 3)]
        assert [botocore for _, botocore in QUERIES] == [False, True]
        assert QUERIES[0][0] == QUERIES[1][0]


def test_keys_not_encoded_are_read_as_they_are() -> None:
    """A store that ignores encoding-type=url (no EncodingType in its answer) sends keys as
    they are; botocore then decodes nothing either. A token on a page that says it is the
    last one is not followed (botocore's rule)."""
    answer = (b"<ListBucketResult><IsTruncated>false</IsTruncated><Contents><Key>a+b%20c"
              b"</Key><Size>0</Size></Contents><NextContinuationToken>t</NextContinuationToken>"
              b"</ListBucketResult>")
    assert listed_objects(answer) == ([("a+b%20c", 0, None)], None)


async def test_objects_are_stored_with_their_crc32c(moto: MotoServer, tmp_path: Path) -> None:
    """The store keeps a direct PUT's CRC32C as the object's checksum (what botocore asks
    for says so) and sends it back with the object, which reads back intact."""
    backend = backend_at(moto.endpoint, "direct-crc32c")
    backend.client.create_bucket(Bucket="direct-crc32c")
    source = tmp_path / "src"
    source.write_bytes(BODY)
    await backend.put("ab/k.dcm", source)
    head = backend.client.head_object(Bucket="direct-crc32c", Key="ab/k.dcm",
                                      ChecksumMode="ENABLED")
    assert head.get("ChecksumCRC32C") == crc32c(BODY) and "ChecksumCRC32" not in head
    out = tmp_path / "o"
    assert await backend.get("ab/k.dcm", out) == len(BODY)
    assert out.read_bytes() == BODY


def test_listings_match_botocores(moto: MotoServer) -> None:
    """Listings (prefixes of odd names, pages of every size) give exactly what botocore's
    give, all of them direct."""
    backend = backend_at(moto.endpoint, "direct-listings")
    plain = backend_at(moto.endpoint, "direct-listings", DirectRequests=False)
    assert backend.direct is not None and plain.direct is None
    backend.client.create_bucket(Bucket="direct-listings")
    for n, name in enumerate(listed_names()):
        backend.client.put_object(Bucket="direct-listings", Key=name, Body=BODY[:100 * n])
    sent = counting(backend.direct)
    expect_listings_as_the_sdks(backend, plain)
    assert len(sent) == LISTED_PAGES  # every page direct
    assert backend.direct is not None  # nothing was refused


async def test_moto_checks_the_signature(tmp_path: Path) -> None:
    """With signatures enforced, direct PUTs and GETs with the right keys store and read,
    whole or in part; wrong keys are Denied (botocore's answer, after the direct GET's
    403)."""
    moto = MotoServer(tmp_path, env={"INITIAL_NO_AUTH_ACTION_COUNT": "4"})
    try:
        good = moto.user_keys()
        backend = backend_at(moto.endpoint, "direct-authed", **good)
        backend.client.create_bucket(Bucket="direct-authed")
        source = tmp_path / "src"
        source.write_bytes(BODY)
        await backend.put("ab/k.dcm", source)  # direct, signature checked
        stored = backend.client.get_object(Bucket="direct-authed", Key="ab/k.dcm")
        assert stored["Body"].read() == BODY
        out = tmp_path / "o"
        assert backend.direct is not None
        with open(out, "wb") as f:  # the direct path itself, no fallback possible
            assert backend.direct.get("ab/k.dcm", f, 0, None) == len(BODY)
        assert out.read_bytes() == BODY
        assert (await backend.head("ab/k.dcm")).size == len(BODY)
        assert await backend.get("ab/k.dcm", out, 1000, 24) == 24
        assert out.read_bytes() == BODY[1000:1024]
        assert await backend.get("ab/k.dcm", out, len(BODY) + 5) == 0
        with pytest.raises(errors.NotFound):
            await backend.get("ab/none.dcm", out)
        wrong = backend_at(moto.endpoint, "direct-authed", **{**good, "SecretKey": "nope"})
        with pytest.raises(errors.Denied):
            await wrong.get("ab/k.dcm", out)
        with pytest.raises(errors.Denied):
            await wrong.put("ab/k2.dcm", source)
        with pytest.raises(errors.Denied):
            await wrong.head("ab/k.dcm")
        with pytest.raises(errors.BucketMissing):
            await backend_at(moto.endpoint, "no-such-direct", **good).get("k", out)
        await backend.put("ab/a&b<c> d.dcm", source)
        with pytest.raises(errors.Denied):
            await wrong.delete_many(["ab/k.dcm"])
        listed, _ = backend.direct.list_page("ab/a&b", None, 10)  # a signed query
        assert [key for key, _, _ in listed] == ["ab/a&b<c> d.dcm"]
        with pytest.raises(errors.Denied):
            await wrong.list_page("ab/", None, 10)
        assert backend.direct.delete_many(["ab/k.dcm", "ab/a&b<c> d.dcm", "ab/none.dcm"]) == []
        assert backend.client.list_objects_v2(Bucket="direct-authed")["KeyCount"] == 0
    finally:
        moto.stop()


def test_off_by_option_or_behind_a_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    assert backend_at("http://127.0.0.1:9", DirectRequests=False).direct is None
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:3128")
    monkeypatch.setenv("no_proxy", "")
    assert backend_at("http://10.1.2.3:9000").direct is None
    monkeypatch.setenv("no_proxy", "10.1.2.3")
    assert backend_at("http://10.1.2.3:9000").direct is not None


@pytest.mark.parametrize(("endpoint", "bucket", "virtual", "expected"), [
    ("https://s3.eu-west-1.amazonaws.com", "my-bucket", True,
     ("https", "my-bucket.s3.eu-west-1.amazonaws.com", 443, "")),
    ("https://s3.eu-west-1.amazonaws.com", "my.dotted.bucket", True,
     ("https", "s3.eu-west-1.amazonaws.com", 443, "/my.dotted.bucket")),
    (None, "my-bucket", True, ("https", "my-bucket.s3.eu-west-1.amazonaws.com", 443, "")),
    ("https://minio.example.org:9000", "b1x", False,
     ("https", "minio.example.org", 9000, "/b1x")),
    ("http://minio.local:9000", "my.bucket", True,
     ("http", "my.bucket.minio.local", 9000, "")),
    ("http://127.0.0.1:9000", "bucket", True, ("http", "127.0.0.1", 9000, "/bucket")),
    ("http://gw.example.org/s3/", "bucket", False, ("http", "gw.example.org", 80, "/s3/bucket")),
])
def test_bucket_urls_are_botocores(endpoint: str | None, bucket: str, virtual: bool,
                                   expected: tuple[str, str, int, str]) -> None:
    settings = settings_from_tree({"AwsS3Storage": {
        "BucketName": bucket, "Region": "eu-west-1", "AccessKey": "a", "SecretKey": "s",
        "VirtualAddressing": virtual, **({"Endpoint": endpoint} if endpoint else {})}})
    assert settings.s3 is not None
    direct = S3Backend(settings.s3).direct
    assert direct is not None
    assert (direct.scheme, direct.host, direct.port, direct.prefix) == expected


def test_a_bucket_url_is_an_objects_url_less_the_key() -> None:
    assert bucket_url("https://h.example/p%20q/b/a%20b/%C3%A9", "a b/é") == (
        "https", "h.example", 443, "/p q/b")
    with pytest.raises(ValueError, match="not the URL"):
        bucket_url("https://h.example/b/other", "k")


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (its own CA) and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "objfs test bucket")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


@pytest.mark.parametrize("where", ["loop", "threads"])
async def test_https_with_the_ca_bundle_botocore_uses(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Over TLS the direct requests trust what botocore trusts (AWS_CA_BUNDLE here): with the
    server's CA they read; without it the certificate is refused (Unavailable), never read."""
    cert, key = self_signed(tmp_path)
    PUTS.clear()
    handler = type("Handler", (Scripted,), {"seen": [], "puts": PUTS,
                                            "connections": iter(range(1, 1000))})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"https://127.0.0.1:{server.server_address[1]}"
    out = tmp_path / "o"
    source = tmp_path / "src"
    source.write_bytes(BODY)
    try:
        monkeypatch.setenv("AWS_CA_BUNDLE", str(cert))
        trusted = gets_from(backend_at(endpoint), where)
        assert trusted.direct is not None and trusted.direct.context is not None
        for _ in range(2):
            assert await trusted.get("ab/good", out) == len(BODY)
            assert out.read_bytes() == BODY
        await trusted.put("ab/k.dcm", source)
        assert PUTS[-1][1] == BODY
        monkeypatch.delenv("AWS_CA_BUNDLE")
        out.unlink()
        with pytest.raises(errors.Unavailable, match=r"(?i)certificate"):
            await gets_from(backend_at(endpoint), where).get("ab/good", out)
        assert out.read_bytes() == b""
    finally:
        server.shutdown()
        server.server_close()


def test_an_answer_keeps_its_connection_as_http_says() -> None:
    """HTTP/1.1 keeps a connection unless the answer says "close"; HTTP/1.0 only when it says
    "keep-alive"."""
    def answer(version: str, **headers: str) -> asyncget.Answer:
        return asyncget.Answer(version, 200, "OK", headers, b"")

    assert asyncget._keeps(answer("HTTP/1.1"))
    assert asyncget._keeps(answer("HTTP/1.1", connection="Keep-Alive"))
    assert not asyncget._keeps(answer("HTTP/1.1", connection="Close"))
    assert not asyncget._keeps(answer("HTTP/1.0"))
    assert asyncget._keeps(answer("HTTP/1.0", connection="keep-alive"))
