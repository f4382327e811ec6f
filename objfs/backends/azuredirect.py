"""The Azure backend's downloads, single-request uploads, property reads (HEAD) and listings
without azure-storage-blob's request pipeline.

A 0.5 MB GET through `ContainerClient.download_blob` took 3.5 ms of client CPU against
Azurite (300 in a row), against 1.5 ms for the S3 backend's direct GET: the SDK's downloader,
its policies, `requests` and urllib3 and its response deserializer, all under the GIL beside
the event loop that answers Orthanc. Larger blobs too: the SDK asks for the first 4 MiB, then
the rest in 4 MiB ranges four at a time; one direct GET of a 31 or 79 MB blob took 3 to 7x less
wall time and 3 to 8x less client CPU against Azurite. So every download is one GET, ranged
only when a range is asked for, as the S3 and GCS backends' downloads are; a whole blob's is
a trio task on the event loop (`get_on_loop`, `objfs.backends.loopgets`), as S3's are: the
Shared Key signature needs nothing that blocks.

A blob up to `ChunkSize` is stored by one Put Blob: 4.5 to 4.7 ms of client CPU per 0.5 MB
through `upload_blob`, 1.8 to 2.2 direct (its MD5 0.8 of that), 200 in a row against Azurite.
The request carries what the SDK's does: the block blob type, `application/octet-stream`, the
body's MD5 (`validate_content`, which the service checks) and the access tier when one is set.
Larger blobs stay with the SDK (blocks staged in parallel).

A one-page listing (List Blobs) took 2.2 to 2.7 ms of client CPU through the SDK (200 in a
row): on a SharedBucket every name this node does not know costs one, and the inventory at
the first start one per 1,000 blobs. Direct, the answer's XML is read with ElementTree; a
name the service sent percent-encoded (`Encoded="true"`, for characters XML cannot carry) is
decoded, as the SDK decodes it.

The contract is the SDK's: the same blob URL (the SDK's container URL, the name quoted as the
SDK quotes it), the same service version, signed with the account key of the connection
string (`objfs.azsign`, checked against the SDK's policy); only for a Shared Key credential
(SAS tokens and Entra ID stay with the SDK). As the SDK does by default, a download is not
checked against a stored MD5; its length is. 404, 429 and server errors raise the
`azure.core` exceptions the SDK raises, with the service's error code, so
`AzureBackend.translate` maps both paths alike; any other answer (403, redirects, 400) is left
to the SDK (`Fallback`, before anything was written), which has the last word, as is an
upload whose fresh connection was reset while its body went out. It is not used behind an
HTTP proxy.
"""

from __future__ import annotations

import datetime
import email.utils
import hashlib
import http.client
import urllib.parse
import xml.etree.ElementTree as ElementTree
from base64 import b64encode
from collections.abc import Callable
from typing import IO

from azure.core import exceptions as ax

from objfs import azsign
from objfs.backends.asyncget import LoopConnections
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
    read_body,
    requests_ca_bundle,
)
from objfs.backends.loopgets import LoopDirect


def container_url(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path) of a container from the URL the SDK gives it."""
    scheme, host, port, path, _ = origin(url)
    return scheme, host, port, path.rstrip("/")


def listed_blobs(answer: bytes) -> Listed:
    """The blobs of a List Blobs answer, [(name, size, modification time)], and its
    NextMarker (None on the last page). Raises ValueError (ElementTree's ParseError is one)
    or TypeError for an answer without a usable name, size or date."""
    root = ElementTree.fromstring(answer)
    found: list[tuple[str, int, float | None]] = []
    for blob in root.iterfind("Blobs/Blob"):
        name = blob.find("Name")
        if name is None or name.text is None:
            raise ValueError("a blob without a name")
        text = urllib.parse.unquote(name.text) if name.get("Encoded") == "true" else name.text
        length = blob.findtext("Properties/Content-Length")
        if length is None:
            raise ValueError(f"blob {text!r} without a Content-Length")
        modified = blob.findtext("Properties/Last-Modified")
        found.append((text, int(length), email.utils.parsedate_to_datetime(modified).timestamp()
                      if modified else None))
    return found, root.findtext("NextMarker") or None


class DirectAzure(LoopDirect):
    """Downloads, single-request uploads, HEADs and listings of one container's blobs over
    `http.client`, and whole-blob downloads from the event loop (`get_on_loop`);
    thread-safe."""

    def __init__(self, url: tuple[str, str, int, str], account: str, account_key: str,
                 api_version: str, connect_timeout: float, read_timeout: float,
                 pool_size: int) -> None:
        """`url`: from `container_url`; `account_key`: base64, from the connection string."""
        scheme, host, port, self.prefix = url
        super().__init__(scheme, host, port, connect_timeout, read_timeout,
                         requests_ca_bundle(), pool_size)
        self.account = account
        self.account_key = account_key
        self.api_version = api_version
        # The Shared Key signature is computed locally: nothing a GET needs blocks.
        self.loop = LoopConnections(host, port, connect_timeout, read_timeout, self.context,
                                    pool_size)

    def path(self, key: str) -> str:
        """The request path of blob `key`, quoted as the SDK quotes blob names."""
        return f"{self.prefix}/{urllib.parse.quote(key, safe='~/')}"

    def get(self, key: str, out: IO[bytes], offset: int, length: int | None) -> int:
        """Write the blob (or range: `length` None runs to its end) into `out`; returns the
        bytes received, 0 for a range that starts past the end. Raises Fallback (nothing
        written), azure.core's ResourceNotFoundError or HttpResponseError (429, 5xx),
        Unavailable (a short answer), ConnectionError or TimeoutError."""
        wanted = byte_range(offset, length)
        path, headers = self._signed("GET", key, {} if wanted is None else
                                     {"x-ms-range": wanted})

        return self.exchange("GET", path, headers, None, download_answer(
            lambda response: read_body(response, out, key, self.host), _refused))

    async def get_on_loop(self, key: str, write: Callable[[bytes], None]) -> int:
        """The whole blob, handed to `write` as it arrives, from the event loop
        (`objfs.backends.asyncget`): what `get` does for it, without a worker thread. Raises
        Fallback or NotOnLoop (nothing written), azure.core's ResourceNotFoundError or
        HttpResponseError (429, 5xx), ConnectionError, TimeoutError, or what `write`
        raises."""
        assert self.loop is not None
        path, headers = self._signed("GET", key, {})
        return await self.loop.get(
            path, {"host": self.host_header, **headers}, write, lambda answer: None,
            lambda answer, body: _refusal(answer.status, answer.reason,
                                          answer.headers.get("x-ms-error-code", "")))

    def head(self, key: str) -> int:
        """The blob's size (Get Blob Properties). Raises Fallback, azure.core's
        ResourceNotFoundError or HttpResponseError (429, 5xx), ConnectionError or
        TimeoutError."""
        path, headers = self._signed("HEAD", key, {})
        return self.exchange("HEAD", path, headers, None, head_answer(_refused))

    def put(self, key: str, body: IO[bytes], size: int, tier: str | None) -> None:
        """Store `size` bytes of `body` (a file at offset 0) as block blob `key` in one Put
        Blob, replacing any blob of that name, in access `tier` when given. Raises Fallback
        (`body` may have been read), azure.core's ResourceNotFoundError or HttpResponseError
        (429, 5xx), ConnectionError or TimeoutError."""
        md5 = hashlib.md5()
        while chunk := body.read(BUFFER):
            md5.update(chunk)
        extra = {"content-length": str(size), "content-md5": b64encode(md5.digest()).decode(),
                 "content-type": "application/octet-stream", "x-ms-blob-type": "BlockBlob"}
        if tier is not None:
            extra["x-ms-access-tier"] = tier
        path, headers = self._signed("PUT", key, extra)

        def answer(response: http.client.HTTPResponse) -> None:
            if response.status != 201:
                raise _refused(response)
            response.read()

        self.exchange("PUT", path, headers, (body, size), answer)

    def list_page(self, prefix: str, marker: str | None, limit: int) -> Listed:
        """One page of at most `limit` blobs whose names start with `prefix`, after the page
        `marker` ended (List Blobs, the parameters the SDK sends): ([(name, size,
        modification time)], the next page's marker or None). Raises Fallback (an answer it
        cannot read), azure.core's ResourceNotFoundError (ContainerNotFound) or
        HttpResponseError (429, 5xx), ConnectionError or TimeoutError."""
        query = {"restype": "container", "comp": "list"}
        if prefix:
            query["prefix"] = prefix
        query["maxresults"] = str(limit)
        if marker:
            query["marker"] = marker
        target = self.prefix + "?" + "&".join(
            f"{name}={urllib.parse.quote(value, safe='')}" for name, value in query.items())
        headers = self._dated({"accept": "application/xml"})
        headers["authorization"] = azsign.authorization("GET", self.prefix, headers,
                                                        self.account, self.account_key, query)

        return self.exchange("GET", target, headers, None,
                             listing_answer(listed_blobs, _refused, self.host))

    def _dated(self, extra: dict[str, str]) -> dict[str, str]:
        """`extra` with the date and the service version (before the authorization)."""
        return {**extra, "x-ms-date": azsign.http_date(datetime.datetime.now(datetime.UTC)),
                "x-ms-version": self.api_version}

    def _signed(self, method: str, key: str, extra: dict[str, str]) -> tuple[str, dict[str, str]]:
        """The request path of blob `key` and its headers (`extra`, lower-case names, with
        the date, the service version and the Shared Key authorization)."""
        path = self.path(key)
        headers = self._dated(extra)
        headers["authorization"] = azsign.authorization(method, path, headers, self.account,
                                                        self.account_key)
        return path, headers


def _refused(response: http.client.HTTPResponse) -> Exception:
    """What a non-success answer raises (`_refusal`), its body read."""
    response.read(ERROR_BODY_LIMIT)
    return _refusal(response.status, response.reason,
                    response.getheader("x-ms-error-code") or "")


def _refusal(status: int, reason: str, code: str) -> Exception:
    """What a non-success answer raises: azure.core's exception for 404, 429 and server
    errors, carrying the service's status, reason and error code (`code`, from
    x-ms-error-code) as the SDK's do; else Fallback."""
    if status in (404, 429) or status >= 500:
        kind = ax.ResourceNotFoundError if status == 404 else ax.HttpResponseError
        error = kind(message=f"{status} {reason} ({code or 'no error code'})")
        error.status_code = status
        error.reason = reason
        error.error_code = code  # type: ignore[attr-defined]
        return error
    return Fallback(f"HTTP {status}")
