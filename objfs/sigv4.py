"""AWS Signature Version 4 for S3 requests, as a pure function.

Used by the S3 backend's direct requests (`objfs.backends.s3direct`), which skip botocore's
request pipeline for GETs, HEADs and single PUTs. The algorithm is AWS's published one: a
canonical request (method, URI-encoded path, sorted query, lower-cased signed headers, payload
hash), a string to sign over its SHA-256, and an HMAC chain keyed by the secret through date,
region, service and "aws4_request". The signing key depends only on the secret, day, region
and service, so it is kept for the day (`SigningKeys`).

No I/O, no SDK: the caller brings the credentials (with a session token when they are
temporary) and the time. Tested against botocore's own signer.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import threading
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
# The payload hash of a body sent unsigned (its integrity: a signed checksum header).
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"


@dataclass(frozen=True)
class Credentials:
    """What signs a request; `token` is the session token of temporary credentials."""

    access_key: str
    secret_key: str
    token: str | None = None


def uri_path(path: str) -> str:
    """The canonical (and sent) form of an S3 object path: every byte but unreserved ones
    and '/' percent-encoded, once (S3 does not double-encode)."""
    return urllib.parse.quote(path, safe="/-_.~")


def _canonical_query(query: Mapping[str, str]) -> str:
    return "&".join(f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}"
                    for k, v in sorted(query.items()))


class SigningKeys:
    """The day's signing key per (secret, day, region, service), computed once: four HMACs
    saved per request. Safe to share between threads (a lock guards the one-entry memo)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._memo: tuple[tuple[str, str, str, str], bytes] | None = None

    def key(self, secret: str, day: str, region: str, service: str) -> bytes:
        wanted = (secret, day, region, service)
        with self._lock:
            if self._memo is not None and self._memo[0] == wanted:
                return self._memo[1]
        key = hmac.digest(("AWS4" + secret).encode(), day.encode(), "sha256")
        for part in (region, service, "aws4_request"):
            key = hmac.digest(key, part.encode(), "sha256")
        with self._lock:
            self._memo = (wanted, key)
        return key


def sign(method: str, host: str, path: str, headers: Mapping[str, str],
         credentials: Credentials, region: str, now: datetime.datetime,
         query: Mapping[str, str] | None = None, service: str = "s3",
         keys: SigningKeys | None = None, payload_hash: str = EMPTY_SHA256) -> dict[str, str]:
    """The headers to send: `headers` (names lower-cased, all of them signed) plus host,
    x-amz-date, x-amz-content-sha256 (`payload_hash`: the empty body's by default, or
    UNSIGNED_PAYLOAD), x-amz-security-token (temporary credentials) and authorization.
    `host` is the Host header as sent (with a non-default port); `path` the encoded path
    (`uri_path`); `now` an aware UTC time."""
    stamp = now.astimezone(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    day = stamp[:8]
    signed = {k.lower(): " ".join(str(v).split()) for k, v in headers.items()}
    signed["host"] = host
    signed["x-amz-date"] = stamp
    signed["x-amz-content-sha256"] = payload_hash
    if credentials.token:
        signed["x-amz-security-token"] = credentials.token
    names = sorted(signed)
    signed_names = ";".join(names)
    canonical = "\n".join([method, path, _canonical_query(query or {}),
                           *(f"{n}:{signed[n]}" for n in names), "", signed_names,
                           payload_hash])
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join([ALGORITHM, stamp, scope,
                         hashlib.sha256(canonical.encode()).hexdigest()])
    key = (keys.key(credentials.secret_key, day, region, service) if keys is not None
           else SigningKeys().key(credentials.secret_key, day, region, service))
    signature = hmac.new(key, to_sign.encode(), "sha256").hexdigest()
    signed["authorization"] = (f"{ALGORITHM} Credential={credentials.access_key}/{scope}, "
                               f"SignedHeaders={signed_names}, Signature={signature}")
    return signed
