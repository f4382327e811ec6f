"""The S3 backend's GETs, HEADs, single PUTs, batch deletes and listings without botocore's
request pipeline.

A cold read of a 0.5 MB instance spent 1.6-1.8 ms of CPU in `get_object` (endpoint rules,
event hooks, the signer, urllib3, response parsing) against 0.7 ms for the same GET over
`http.client` with `objfs.sigv4` (sequential GETs against moto, client CPU only); a
`put_object` of the same size 1.4 ms; a `delete_objects` of 1000 keys 22-27 ms, 8 keys for
each deleted attachment; a one-page `list_objects_v2` 2.2 ms (on a SharedBucket, every name
a node does not know costs one). Every one of those milliseconds is taken under the GIL from
the event loop that answers Orthanc.

The contract is botocore's: the same URL (botocore builds it once, virtual-hosted or path
style), the same credentials (botocore's resolved chain, refreshed as it refreshes them), the
same CA bundle and timeouts; a GET asks for the object's checksum (`x-amz-checksum-mode:
ENABLED`) and checks a CRC32C or CRC32 of the whole object when S3 sends one; a PUT, and a
batch delete's XML, send their body unsigned with a signed checksum header that S3 checks, as
botocore does here. A PUT's checksum is a CRC32C (SSE4.2: 0.02 ms per 0.5 MB here, against 0.19
ms for zlib's CRC32, on every upload and again on every download of the object); a store that
refuses that algorithm (501 NotImplemented, or 400 InvalidRequest/InvalidArgument) gets the
PUT from botocore with its CRC32, and CRC32 in every later PUT (`DirectS3.checksum`). Answers
it does not handle itself are left to botocore (`Fallback`, before anything was written):
redirects, 400/403 (wrong region, clock skew, bad credentials, a rejected checksum: botocore
has the logic and the final word), and a fresh connection reset while a body was sent (the
server answered early; botocore waits for `100 Continue` and reads that answer). 404, 429 and
server errors raise botocore's `ClientError` with the code S3 sent, so `S3Backend.translate`
maps both paths alike. It is not used behind an HTTP proxy (botocore honours the proxy
variables, `http.client` does not).

Connections are kept alive in a small pool shared by the backend's worker threads
(`objfs.backends.kept`); a request on a kept connection that the server closed meanwhile is
sent once more on a fresh one.
"""

from __future__ import annotations

import datetime
import http.client
import io
import logging
import re
import urllib.parse
import xml.etree.ElementTree as ElementTree
import zlib
from base64 import b64decode, b64encode
from collections.abc import Callable
from typing import IO, TypeVar
from xml.sax.saxutils import escape, unescape

import botocore.exceptions as bx
import google_crc32c

from objfs import errors, sigv4
from objfs.backends.asyncget import Answer, LoopConnections
from objfs.backends.kept import (
    BUFFER,
    ERROR_BODY_LIMIT,
    Fallback,
    Listed,
    byte_range,
    download_answer,
    head_answer,
    listing_answer,
    origin,
    proxied,
    read_body,
)
from objfs.backends.loopgets import LoopDirect

__all__ = ["DirectS3", "Fallback", "bucket_url", "byte_range", "proxied"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_TAG = re.compile(rb"<(Code|Message)>([^<]*)</\1>")
_ERROR = re.compile(rb"<Error>(.*?)</Error>", re.DOTALL)
_ERROR_TAG = re.compile(rb"<(Key|Code|Message)>([^<]*)</\1>")
_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"

CRC32C = "CRC32C"
CRC32 = "CRC32"
# What a store that does not know a checksum algorithm may answer a PUT carrying one.
_CHECKSUM_REFUSED = {"NotImplemented", "InvalidRequest", "InvalidArgument"}


def listed_objects(answer: bytes) -> Listed:
    """The objects of a ListObjectsV2 answer, [(key, size, modification time)], and the next
    page's continuation token (None on the last page). Keys are decoded when the answer says
    they were URL-encoded (`EncodingType` url, as botocore decodes them). Raises ValueError
    (ElementTree's ParseError is one) for an answer without a usable key or size."""
    root = ElementTree.fromstring(answer)
    ns = _NS if root.tag.startswith(_NS) else ""
    encoded = root.findtext(f"{ns}EncodingType") == "url"
    found: list[tuple[str, int, float | None]] = []
    for item in root.iterfind(f"{ns}Contents"):
        key = item.findtext(f"{ns}Key")
        size = item.findtext(f"{ns}Size")
        if key is None or size is None:
            raise ValueError("an object without a key or a size")
        modified = item.findtext(f"{ns}LastModified")
        found.append((urllib.parse.unquote_plus(key) if encoded else key, int(size),
                      datetime.datetime.fromisoformat(modified).timestamp() if modified
                      else None))
    more = root.findtext(f"{ns}IsTruncated") == "true"
    return found, (root.findtext(f"{ns}NextContinuationToken") or None) if more else None


def bucket_url(object_url: str, key: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path prefix) of a bucket from the URL botocore builds for its
    object `key` (virtual-hosted or path style, by botocore's own rules)."""
    scheme, host, port, quoted, _ = origin(object_url)
    path = urllib.parse.unquote(quoted)
    if not path.endswith("/" + key):
        raise ValueError(f"{object_url}: not the URL of object {key}")
    return scheme, host, port, path[:-len(key) - 1]


class DirectS3(LoopDirect):
    """GETs, HEADs, single PUTs and batch deletes of one bucket's objects over `http.client`,
    and whole-object GETs from the event loop (`get_on_loop`); thread-safe."""

    def __init__(self, base: tuple[str, str, int, str], region: str,
                 credentials: Callable[[], sigv4.Credentials], connect_timeout: float,
                 read_timeout: float, ca_bundle: str | None, pool_size: int,
                 loop_gets: bool = True) -> None:
        """`base`: the bucket's (scheme, host, port, path prefix), from `bucket_url`;
        `loop_gets`: whole-object GETs may run on the event loop (`get_on_loop`)."""
        scheme, host, port, self.prefix = base
        super().__init__(scheme, host, port, connect_timeout, read_timeout, ca_bundle,
                         pool_size)
        self.region = region
        self.credentials = credentials
        self.keys = sigv4.SigningKeys()
        # The algorithm of a PUT's checksum: CRC32C until the store refuses one, then CRC32
        # for good (the only transition). Worker threads read it once per PUT; one that
        # read CRC32C before the change sends that PUT with it, which is harmless.
        self.checksum = CRC32C
        # Whole-object GETs from the event loop (`LoopDirect.loop`); None with credentials
        # that botocore may refresh (a refresh is a blocking request: it stays in the worker
        # threads).
        self.loop = LoopConnections(host, port, connect_timeout, read_timeout, self.context,
                                    pool_size) if loop_gets else None

    def get(self, key: str, out: IO[bytes], offset: int, length: int | None) -> int:
        """Write the object (or range) into `out`; returns the bytes received, 0 for a range
        past the end. Raises Fallback, botocore's ClientError (404, 429, 5xx), Unavailable
        (a short or damaged answer), ConnectionError or TimeoutError."""
        wanted = byte_range(offset, length)
        ranged = wanted is not None
        extra = {"range": wanted} if wanted is not None else {"x-amz-checksum-mode": "ENABLED"}

        return self._exchange("GET", key, extra, None, download_answer(
            lambda response: self._body(response, key, out, ranged),
            lambda response: _refused(response, "GetObject")))

    async def get_on_loop(self, key: str, write: Callable[[bytes], None]) -> int:
        """The whole object, handed to `write` as it arrives, from the event loop
        (`objfs.backends.asyncget`): what `get` does for it, without a worker thread. Raises
        Fallback (nothing written), botocore's ClientError (404, 429, 5xx), Unavailable (a
        damaged answer: checked after the last byte was written), ConnectionError,
        TimeoutError, or what `write` raises."""
        assert self.loop is not None
        path = self._path(key)
        headers = sigv4.sign("GET", self.host_header, path, {"x-amz-checksum-mode": "ENABLED"},
                             self.credentials(), self.region,
                             datetime.datetime.now(datetime.UTC), keys=self.keys)
        found: list[_Checksum] = []

        def check(answer: Answer) -> Callable[[bytes], None] | None:
            found.append(_Checksum(answer.headers.get))
            return found[0].update if found[0].expected is not None else None

        copied = await self.loop.get(path, headers, write, check, lambda answer, body: _refusal(
            answer.status, answer.reason, body, "GetObject"))
        found[0].verify(key)
        return copied

    def head(self, key: str) -> int:
        """The object's size. Raises Fallback, botocore's ClientError ("404", 429, 5xx),
        ConnectionError or TimeoutError."""
        return self._exchange("HEAD", key, {}, None,
                              head_answer(lambda response: _refused(response, "HeadObject")))

    def put(self, key: str, body: IO[bytes], size: int, headers: dict[str, str]) -> None:
        """Store `size` bytes of `body` (a file at offset 0) as `key` in one request, with
        `headers` (lower-case names: storage class, server-side encryption, ACL, tagging)
        signed, and the body's checksum (`checksum`). Raises Fallback (`body` may have been
        read; also when the store refused a CRC32C, after which PUTs send CRC32), botocore's
        ClientError (404, 429, 5xx), ConnectionError or TimeoutError."""
        algorithm = self.checksum
        crc = 0
        while chunk := body.read(BUFFER):
            crc = _extend(algorithm, crc, chunk)
        extra = {**headers,
                 f"x-amz-checksum-{algorithm.lower()}":
                     b64encode(crc.to_bytes(4, "big")).decode(),
                 "x-amz-sdk-checksum-algorithm": algorithm}

        def answer(response: http.client.HTTPResponse) -> None:
            if 200 <= response.status < 300:
                response.read()
                return
            if algorithm == CRC32C and response.status in (400, 501):
                error = response.read(ERROR_BODY_LIMIT)
                code = _tags(error).get("Code", "")
                if response.status == 501 or code in _CHECKSUM_REFUSED:
                    self._refused_crc32c(key, response.status, code)
                    raise Fallback(f"HTTP {response.status} {code} to a CRC32C checksum")
                raise _refused(response, "PutObject", error)
            raise _refused(response, "PutObject")

        self._exchange("PUT", key, extra, (body, size), answer)

    def _refused_crc32c(self, key: str, status: int, code: str) -> None:
        if self.checksum == CRC32C:
            self.checksum = CRC32
            log.warning("%s (%s): the store refused a PUT with a CRC32C checksum (HTTP %d %s); "
                        "PUTs send a CRC32 from now on", key, self.host, status, code)

    def delete_many(self, keys: list[str]) -> list[tuple[str, str, str]]:
        """Delete `keys` (at most 1000) in one quiet DeleteObjects request: S3 answers only
        for the keys it did not delete. Returns their (key, code, message); a key that did
        not exist counts as deleted. Raises Fallback, botocore's ClientError (404, 429, 5xx:
        a store without DeleteObjects answers 501), ConnectionError or TimeoutError."""
        xml = "".join(["<?xml version=\"1.0\" encoding=\"UTF-8\"?>",
                       "<Delete xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">",
                       "<Quiet>true</Quiet>",
                       *(f"<Object><Key>{escape(key)}</Key></Object>" for key in keys),
                       "</Delete>"]).encode()
        extra = {"content-type": "application/xml",
                 "x-amz-checksum-crc32": b64encode(zlib.crc32(xml).to_bytes(4, "big")).decode(),
                 "x-amz-sdk-checksum-algorithm": "CRC32"}

        def answer(response: http.client.HTTPResponse) -> list[tuple[str, str, str]]:
            if response.status != 200:
                raise _refused(response, "DeleteObjects")
            # Some servers answer every deleted key even when asked to be quiet: only the
            # <Error> elements are read.
            found = []
            for error in _ERROR.findall(response.read()):
                tags = {name: unescape(value) for name, value in _tags(error, _ERROR_TAG).items()}
                found.append((tags.get("Key", ""), tags.get("Code", ""),
                              tags.get("Message", "")))
            return found

        return self._exchange("POST", "", extra, (io.BytesIO(xml), len(xml)), answer,
                              query={"delete": ""})

    def list_page(self, prefix: str, token: str | None, limit: int) -> Listed:
        """One page of at most `limit` objects whose keys start with `prefix`, after page
        `token` (ListObjectsV2 with botocore's parameters, keys URL-encoded in the answer):
        ([(key, size, modification time)], the next page's token or None). Raises Fallback
        (an answer it cannot read), botocore's ClientError (404 NoSuchBucket, 429, 5xx),
        ConnectionError or TimeoutError."""
        query = {"list-type": "2", "max-keys": str(limit), "encoding-type": "url"}
        if prefix:
            query["prefix"] = prefix
        if token:
            query["continuation-token"] = token

        return self._exchange("GET", "", {}, None, listing_answer(
            listed_objects, lambda response: _refused(response, "ListObjectsV2"), self.host),
            query=query)

    def _exchange(self, method: str, key: str, extra: dict[str, str],
                  body: tuple[IO[bytes], int] | None,
                  answer: Callable[[http.client.HTTPResponse], T],
                  query: dict[str, str] | None = None) -> T:
        """Send one signed request on a kept or new connection and hand the response to
        `answer`; the connection is kept only when the answer was read to its end, whatever
        `answer` returned or raised. `key` "" with a `query` is a request on the bucket, sent
        where botocore sends it: `/bucket?...` in path style, `/?...` on a bucket's host."""
        path = self._path(key)
        headers = sigv4.sign(method, self.host_header, path, extra, self.credentials(),
                             self.region, datetime.datetime.now(datetime.UTC), query=query,
                             keys=self.keys,
                             payload_hash=sigv4.EMPTY_SHA256 if body is None
                             else sigv4.UNSIGNED_PAYLOAD)
        # Sent as botocore sends it ("?delete", no "="); signed in canonical form.
        target = path if not query else path + "?" + "&".join(
            urllib.parse.quote(name, safe="-_.~") + (
                "=" + urllib.parse.quote(value, safe="-_.~") if value else "")
            for name, value in sorted(query.items()))
        return self.exchange(method, target, headers, body, answer)

    def _path(self, key: str) -> str:
        """The encoded path of `key`, or of the bucket for "" (`_exchange`)."""
        return sigv4.uri_path(f"{self.prefix}/{key}" if key or not self.prefix else self.prefix)

    def _body(self, response: http.client.HTTPResponse, key: str, out: IO[bytes],
              ranged: bool) -> int:
        # A range's answer carries no checksum of its own.
        check = _Checksum(response.getheader if not ranged else lambda _: None)
        copied = read_body(response, out, key, self.host,
                           check.update if check.expected is not None else None)
        check.verify(key)
        return copied


class _Checksum:
    """The whole object's checksum an answer announces (`x-amz-checksum-crc32c`, else
    `-crc32`; none for a composite, per-part one), computed over the body as it arrives
    (`update`) and compared once it has all come (`verify`)."""

    def __init__(self, header: Callable[[str], str | None]) -> None:
        self.algorithm, expected = CRC32C, header("x-amz-checksum-crc32c")
        if expected is None:
            self.algorithm, expected = CRC32, header("x-amz-checksum-crc32")
        self.expected = None if expected is None or "-" in expected else expected
        self.crc = 0

    def update(self, chunk: bytes | memoryview) -> None:
        self.crc = _extend(self.algorithm, self.crc, chunk)

    def verify(self, key: str) -> None:
        """Raises Unavailable when the body does not match the announced checksum."""
        if self.expected is not None and self.crc.to_bytes(4, "big") != b64decode(self.expected):
            raise errors.Unavailable(f"{key}: the answer's {self.algorithm} does not match the "
                                     f"object's ({self.expected}): damaged in transit")


def _extend(algorithm: str, crc: int, chunk: bytes | memoryview) -> int:
    """`crc` (CRC32C or CRC32) extended over `chunk`."""
    if algorithm == CRC32C:
        # google_crc32c takes only immutable bytes: a memoryview's chunk is copied once (copy
        # and CRC32C 0.04 ms per 0.5 MB here, zlib's CRC32 alone 0.19 ms).
        return int(google_crc32c.extend(crc, bytes(chunk)))
    return zlib.crc32(chunk, crc)


def _tags(body: bytes, pattern: re.Pattern[bytes] = _TAG) -> dict[str, str]:
    """The elements `pattern` names in an S3 error answer's body (by default its Code and
    Message), decoded."""
    return {name.decode(): value.decode("utf-8", "replace")
            for name, value in pattern.findall(body)}


def _refused(response: http.client.HTTPResponse, operation: str,
             body: bytes | None = None) -> Exception:
    """What a non-success answer raises (`_refusal`). `body`: the answer's body when the
    caller has read it already."""
    if body is None:
        body = response.read(ERROR_BODY_LIMIT)
    return _refusal(response.status, response.reason, body, operation)


def _refusal(status: int, reason: str, body: bytes, operation: str) -> Exception:
    """What a non-success answer raises: botocore's ClientError with S3's code for 404, 429
    and server errors (read as botocore reads them), else Fallback."""
    if status in (404, 429) or status >= 500:
        tags = _tags(body)
        error: Exception = bx.ClientError(
            {"Error": {"Code": tags.get("Code", str(status)),
                       "Message": tags.get("Message", reason)},
             "ResponseMetadata": {"HTTPStatusCode": status}}, operation)
        return error
    return Fallback(f"HTTP {status}")
