"""AWS S3 (and S3-compatible stores) through boto3.

Uploads are a single PUT up to `ChunkSize`, parallel multipart (s3transfer) above it, each
request carrying a checksum the server verifies: CRC32 through botocore, CRC32C on the direct
path below (unless the store refused it). Bodies are never hashed into the signature
(`UNSIGNED-PAYLOAD`), on http:// endpoints too, as the official plugin does (its
`PayloadSigningPolicy::Never`): the signed checksum header covers the body's integrity, and
hashing it cost about 0.8 ms of CPU per MB sent. Timeouts and SDK retries come from
the configuration so that no call can block for long; objfs' own retry policy sits above.
Timestamps in answers are parsed by `parse_timestamp`, not by botocore's default (dateutil),
which took half the CPU of a listing page (inventories, audits, shared-bucket confirmations).
GETs, HEADs, single PUTs and batch deletes go through `objfs.backends.s3direct` (signed by
objfs, over `http.client`) unless `DirectRequests` is false or an HTTP proxy is configured;
what it does not handle itself (redirects, 400/403) is sent again through botocore.
"""

from __future__ import annotations

import datetime
import email.utils
import logging
import os
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

import boto3
import botocore.credentials
import botocore.exceptions as bx
import botocore.httpsession
import botocore.session
import botocore.utils
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from objfs import errors, sigv4
from objfs.backends.base import ObjectInfo
from objfs.backends.kept import Listed, as_objects
from objfs.backends.loopgets import LoopGets
from objfs.backends.s3direct import DirectS3, bucket_url, byte_range, proxied
from objfs.config import S3Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

READ_CHUNK = 1024 * 1024
PARTS_IN_FLIGHT = 4

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
# What S3-compatible servers without DeleteObjects answer to it.
_NO_BATCH = {"NotImplemented", "MethodNotAllowed", "501", "405"}
# A conditional write or delete that lost (412), or raced another one (409).
_PRECONDITION = {"PreconditionFailed", "412", "ConditionalRequestConflict"}
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "ExpiredToken",
           "InvalidToken", "AllAccessDisabled", "AccountProblem"}
_THROTTLED = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
              "TooManyRequests", "503"}
# put_object's parameters in `extra` and the headers they become.
_PUT_HEADERS = (("StorageClass", "x-amz-storage-class"),
                ("ServerSideEncryption", "x-amz-server-side-encryption"),
                ("SSEKMSKeyId", "x-amz-server-side-encryption-aws-kms-key-id"),
                ("ACL", "x-amz-acl"), ("Tagging", "x-amz-tagging"))
_TRANSIENT = {"RequestTimeout", "InternalError", "ServiceUnavailable", "500",
              "RequestTimeTooSkewed"}


class S3Backend(LoopGets[DirectS3]):
    """Backend for one S3 bucket."""

    name = "s3"
    sdk_name = "botocore"
    direct_option = "AwsS3Storage.DirectRequests"

    def __init__(self, cfg: S3Settings) -> None:
        super().__init__(cfg.max_connections)
        self.cfg = cfg
        self.bucket = cfg.bucket
        self.single_request_limit = cfg.chunk_size
        endpoint = cfg.endpoint
        if endpoint and "://" not in endpoint:
            endpoint = "https://" + endpoint
        config = Config(
            region_name=cfg.region,
            connect_timeout=cfg.connect_timeout,
            read_timeout=cfg.request_timeout,
            retries={"max_attempts": cfg.max_retries + 1, "mode": "standard"},
            max_pool_connections=cfg.max_connections * PARTS_IN_FLIGHT,
            s3={"addressing_style": "virtual" if cfg.virtual_addressing else "path",
                # botocore hashes every body sent over plain HTTP otherwise.
                "payload_signing_enabled": False},
            request_checksum_calculation="when_supported",
        )
        core = botocore.session.get_session()
        core.get_component("response_parser_factory").set_parser_defaults(
            timestamp_parser=parse_timestamp)
        session = boto3.session.Session(aws_access_key_id=cfg.access_key,
                                        aws_secret_access_key=cfg.secret_key,
                                        region_name=cfg.region, botocore_session=core)
        self.client = session.client("s3", endpoint_url=endpoint, config=config)
        self.transfer = TransferConfig(multipart_threshold=cfg.chunk_size,
                                       multipart_chunksize=cfg.chunk_size,
                                       max_concurrency=PARTS_IN_FLIGHT, use_threads=True)
        self.extra: dict[str, Any] = {"ChecksumAlgorithm": "CRC32"}
        if cfg.storage_class:
            self.extra["StorageClass"] = cfg.storage_class
        if cfg.server_side_encryption:
            self.extra["ServerSideEncryption"] = cfg.server_side_encryption
        if cfg.sse_kms_key_id:
            self.extra["SSEKMSKeyId"] = cfg.sse_kms_key_id
        if cfg.acl:
            self.extra["ACL"] = cfg.acl
        if cfg.tags:
            self.extra["Tagging"] = urllib.parse.urlencode(cfg.tags)
        # The same as headers, for direct PUTs.
        self.put_headers = {header: str(self.extra[name]) for name, header in _PUT_HEADERS
                            if name in self.extra}
        self.where = f"s3://{self.bucket}/"
        self.direct = self._direct_requests(core, session) if cfg.direct_requests else None
        self._loop_streams = self.direct.loop if self.direct is not None else None

    def _direct_requests(self, core: botocore.session.Session,
                         session: boto3.session.Session) -> DirectS3 | None:
        """Direct requests to this bucket, on botocore's URL, credentials and CA bundle; None
        (every request through botocore) behind an HTTP proxy or without credentials."""
        found = session.get_credentials()
        if found is None:
            return None  # botocore raises NoCredentialsError on the first request
        # botocore's own URL for an object (built offline, not sent): its addressing rules.
        probe = "objfs-probe"
        base = bucket_url(self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": probe}), probe)
        if proxied(base[0], base[1]):
            log.info("S3: every request goes through botocore (an HTTP proxy is configured)")
            return None

        def credentials() -> sigv4.Credentials:
            frozen = found.get_frozen_credentials()  # refreshed as botocore refreshes them
            return sigv4.Credentials(frozen.access_key, frozen.secret_key, frozen.token)

        ca_bundle = core.get_config_variable("ca_bundle") or \
            botocore.httpsession.get_cert_path(True)
        # Credentials botocore refreshes (a role's, the instance's) may block for a request
        # when they expire: only fixed ones are read on the event loop.
        return DirectS3(base, str(self.client.meta.region_name), credentials,
                        self.cfg.connect_timeout, self.cfg.request_timeout, ca_bundle,
                        self.cfg.max_connections, loop_gets=not isinstance(
                            found, botocore.credentials.RefreshableCredentials))

    def translate(self, exc: Exception, key: str, op: str) -> errors.ObjfsError:
        if isinstance(exc, S3UploadFailedError) and isinstance(exc.__context__, Exception):
            exc = exc.__context__
        where = f"s3://{self.bucket}/{key}"
        if isinstance(exc, bx.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            what = f"{where}: {code} {err.get('Message', '')}".rstrip()
            if code in _NOT_FOUND:
                return errors.NotFound(what)
            if code == "NoSuchBucket":
                return errors.BucketMissing(what)
            if code in _DENIED or status in (401, 403):
                return errors.Denied(what)
            if code in _THROTTLED or status in (429, 503):
                return errors.Throttled(what)
            if code == "EntityTooLarge":
                return errors.TooLarge(what)
            if code in _TRANSIENT or status >= 500:
                return errors.Unavailable(what)
            return errors.BackendError(what)
        if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
            return errors.Denied(f"{where}: {exc}")
        if isinstance(exc, bx.BotoCoreError | ConnectionError | TimeoutError):
            return errors.Unavailable(f"{where}: {exc}")
        return errors.BackendError(f"{where}: {exc!r}")

    def _put_sync(self, key: str, path: Path) -> None:
        if path.stat().st_size > self.cfg.chunk_size:
            self.client.upload_file(str(path), self.bucket, key, ExtraArgs=self.extra,
                                    Config=self.transfer)
            return
        # One PUT: far less overhead than the transfer manager for Orthanc's typical files.
        with open(path, "rb") as body:
            size = os.fstat(body.fileno()).st_size

            def through_botocore() -> None:
                body.seek(0)  # the direct attempt may have read it
                self.client.put_object(Bucket=self.bucket, Key=key, Body=body, **self.extra)

            self._either("PUT", key, lambda d: d.put(key, body, size, self.put_headers),
                         through_botocore)

    def _get_sync(self, key: str, out: IO[bytes], offset: int, length: int | None) -> int:
        if length == 0:
            return 0
        return self._either("GET", key, lambda d: d.get(key, out, offset, length),
                            lambda: self._sdk_get(key, out, offset, length))

    def _sdk_get(self, key: str, out: IO[bytes], offset: int, length: int | None) -> int:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        wanted = byte_range(offset, length)
        if wanted is not None:
            args["Range"] = wanted
        try:
            response = self.client.get_object(**args)
        except bx.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                return 0
            raise
        expected = response["ContentLength"]
        copied = 0
        for chunk in response["Body"].iter_chunks(READ_CHUNK):
            out.write(chunk)
            copied += len(chunk)
        if copied != expected:
            raise errors.Unavailable(f"s3://{self.bucket}/{key}: short read "
                                     f"({copied} of {expected} bytes)")
        return copied

    def _head_sync(self, key: str) -> ObjectInfo:
        size = self._either("HEAD", key, lambda d: d.head(key),
                            lambda: int(self.client.head_object(
                                Bucket=self.bucket, Key=key)["ContentLength"]))
        return ObjectInfo(key, size)

    def _delete_sync(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=key)

    batch_delete_limit = 1000  # DeleteObjects' limit

    def _delete_many_sync(self, keys: list[str]) -> None:
        try:
            refused = self._either("POST", keys[0], lambda d: d.delete_many(keys),
                                   lambda: self._botocore_delete_many(keys))
        except bx.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _NO_BATCH:
                raise errors.Unsupported(f"s3://{self.bucket}: DeleteObjects: {exc}") from exc
            raise
        failed = [(key, code, message) for key, code, message in refused
                  if code not in _NOT_FOUND]
        if failed:
            key, code, message = failed[0]
            what = (f"s3://{self.bucket}/{key}: {code} {message} ({len(failed)} of {len(keys)} "
                    "keys of a batch delete failed)")
            if code in _DENIED:
                raise errors.Denied(what)
            raise errors.Unavailable(what)

    def _botocore_delete_many(self, keys: list[str]) -> list[tuple[str, str, str]]:
        """`DirectS3.delete_many` through botocore."""
        response = self.client.delete_objects(
            Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True})
        return [(str(e.get("Key", "")), str(e.get("Code", "")), str(e.get("Message", "")))
                for e in response.get("Errors", [])]

    def _create_exclusive_sync(self, key: str, data: bytes) -> bool:
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, IfNoneMatch="*",
                                   **self.extra)
        except bx.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _PRECONDITION:
                return False
            raise
        return True

    def _replace_if_sync(self, key: str, version: str, data: bytes) -> bool:
        return _unless_precondition(lambda: self.client.put_object(
            Bucket=self.bucket, Key=key, Body=data, IfMatch=version, **self.extra))

    def _read_versioned_sync(self, key: str) -> tuple[bytes, str]:
        response = self.client.get_object(Bucket=self.bucket, Key=key)
        return response["Body"].read(), str(response["ETag"])

    def _delete_if_sync(self, key: str, version: str) -> bool:
        return _unless_precondition(lambda: self.client.delete_object(
            Bucket=self.bucket, Key=key, IfMatch=version))

    def _list_sync(self, prefix: str, token: str | None,
                   limit: int) -> tuple[list[ObjectInfo], str | None]:
        def through_botocore() -> Listed:
            args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": limit}
            if token:
                args["ContinuationToken"] = token
            response = self.client.list_objects_v2(**args)
            page = [(o["Key"], o["Size"], o["LastModified"].timestamp())
                    for o in response.get("Contents", [])]
            more = response.get("IsTruncated") and response.get("NextContinuationToken")
            return page, (more or None)

        return as_objects(self._either(
            "LIST", prefix, lambda d: d.list_page(prefix, token, limit), through_botocore))

    def _copy_sync(self, src: str, dst: str) -> None:
        extra = {k: v for k, v in self.extra.items() if k != "ChecksumAlgorithm"}
        self.client.copy({"Bucket": self.bucket, "Key": src}, self.bucket, dst,
                         ExtraArgs=extra, Config=self.transfer)

    async def aclose(self) -> None:
        if self.direct is not None:
            self.direct.close()
        await self._close_loop()
        self.client.close()


def parse_timestamp(value: str) -> datetime.datetime:
    """An S3 timestamp as an aware datetime: ISO 8601 (listings' XML) and RFC 1123 (headers)
    directly, anything else (or one without a time zone) as botocore parses it.

    botocore's default hands every timestamp to dateutil, about 30-40 us each: 35 of a
    1,000-key listing page's 70 ms of CPU (measured against moto; a GET or HEAD parses one);
    these two forms take 0.1-3 us.
    """
    try:
        parsed = (datetime.datetime.fromisoformat(value) if value[4:5] == "-"
                  else email.utils.parsedate_to_datetime(value))
    except (ValueError, TypeError, IndexError):
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        return botocore.utils.parse_timestamp(value)  # type: ignore[no-any-return]
    return parsed


def _unless_precondition(request: Callable[[], object]) -> bool:
    """Run a conditional request: False when its condition did not hold (412, a racing 409)
    or the object is gone, True when it was carried out."""
    try:
        request()
    except bx.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if code in _PRECONDITION or code in _NOT_FOUND:
            return False
        raise
    return True
