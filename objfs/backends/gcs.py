"""Google Cloud Storage through google-cloud-storage.

Objects up to `ChunkSize` go up in one request, larger ones as resumable uploads in
`ChunkSize` pieces; uploads and whole downloads are checked with CRC32C. Every call has a
(connect, read) timeout and a retry deadline derived from the configuration, instead of the
SDK's 120 s.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

import google.auth.transport.requests
import requests
from google.api_core import exceptions as gx
from google.api_core.retry import Retry
from google.auth.exceptions import GoogleAuthError
from google.cloud import storage
from google.cloud.storage import blob as gcs_blob
from google.cloud.storage.retry import DEFAULT_RETRY

from objfs import errors
from objfs.backends.base import ObjectInfo, ThreadedBackend
from objfs.backends.gcsdirect import (
    SAMPLE_NAME,
    ApiTargets,
    DirectGcs,
    api_targets,
    media_url,
    upload_target,
)
from objfs.backends.kept import DirectFirst, Listed, as_objects, proxied
from objfs.config import GcsSettings

log = logging.getLogger(__name__)

T = TypeVar("T")


class GcsBackend(ThreadedBackend, DirectFirst[DirectGcs]):
    """Backend for one Google Cloud Storage bucket."""

    name = "gcs"
    sdk_name = "google-cloud-storage"
    direct_option = "GoogleCloudStorage.DirectRequests"

    def __init__(self, cfg: GcsSettings) -> None:
        super().__init__(cfg.client.max_connections)
        self.cfg = cfg
        options: dict[str, Any] = {}
        if cfg.endpoint:
            options["client_options"] = {"api_endpoint": cfg.endpoint}
        if cfg.service_account_file:
            self.client = storage.Client.from_service_account_json(
                cfg.service_account_file, project=cfg.project, **options)
        elif cfg.endpoint:
            # An emulator or private endpoint without a key file: anonymous.
            from google.auth.credentials import AnonymousCredentials

            self.client = storage.Client(project=cfg.project or "objfs",
                                         credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
                                         **options)
        else:
            self.client = storage.Client(project=cfg.project, **options)  # ADC
        self.bucket = self.client.bucket(cfg.bucket)
        client_cfg = cfg.client
        self.timeout = (client_cfg.connect_timeout, client_cfg.request_timeout)
        budget = (client_cfg.connect_timeout + client_cfg.request_timeout) \
            * (client_cfg.max_retries + 1)
        self.retry: Retry | None = DEFAULT_RETRY.with_deadline(budget) \
            if client_cfg.max_retries else None
        self.where = f"gs://{cfg.bucket}/"
        self.direct = self._direct_requests() if cfg.direct_requests else None

    def _direct_requests(self) -> DirectGcs | None:
        """Direct downloads from this bucket, on the SDK's media URL and credentials; None
        behind an HTTP proxy, or when the SDK's URL is not of the expected shape (logged)."""
        try:
            # The SDK's own (private) builder, so the URL is exactly the one it would use.
            sample = self.bucket.blob(SAMPLE_NAME)._get_download_url(self.client)
            url = media_url(sample)
        except (AttributeError, TypeError, ValueError) as exc:
            log.warning("GCS downloads go through google-cloud-storage: cannot build its "
                        "media URL (%s)", exc)
            return None
        credentials = getattr(self.client, "_credentials", None)  # the client's, scoped
        if credentials is None or proxied(url[0], url[1]):
            return None
        try:
            # The SDK's own URL for a multipart upload, built as `Blob` builds it.
            upload: str | None = upload_target(gcs_blob._MULTIPART_URL_TEMPLATE.format(
                hostname=gcs_blob._get_host_name(self.client._connection),
                bucket_path=self.bucket.path, api_version=gcs_blob._API_VERSION),
                url[0], url[1], url[2])
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            log.warning("GCS uploads go through google-cloud-storage: cannot build its upload "
                        "URL (%s)", exc)
            upload = None
        try:
            # The SDK's URLs for an object's metadata (as `Bucket.get_blob` asks for it), for
            # its delete (`Blob.delete`) and for a listing (`Client.list_blobs`).
            build = self.client._connection.build_api_url
            sample = self.bucket.blob(SAMPLE_NAME).path
            api: ApiTargets | None = api_targets(
                build(sample, query_params={"projection": "noAcl"}), build(sample),
                build(f"{self.bucket.path}/o", query_params={"projection": "noAcl"}), url[:3])
        except (AttributeError, TypeError, ValueError) as exc:
            log.warning("GCS metadata reads, deletes and listings go through "
                        "google-cloud-storage: cannot build their URLs (%s)", exc)
            api = None
        client_cfg = self.cfg.client
        return DirectGcs(url, upload, api, credentials,
                         google.auth.transport.requests.Request(), client_cfg.connect_timeout,
                         client_cfg.request_timeout, client_cfg.max_connections)

    def translate(self, exc: Exception, key: str, op: str) -> errors.ObjfsError:
        where = f"gs://{self.cfg.bucket}/{key}"
        if isinstance(exc, gx.RetryError) and isinstance(exc.cause, Exception):
            return self.translate(exc.cause, key, op)
        if isinstance(exc, gx.GoogleAPICallError):
            what = f"{where}: {exc.code} {exc.message}"
            if isinstance(exc, gx.NotFound):
                # Listing or writing cannot miss an object: only the bucket can be missing.
                return errors.BucketMissing(what) if op in ("list", "put") else \
                    errors.NotFound(what)
            if isinstance(exc, gx.Unauthorized | gx.Forbidden):
                return errors.Denied(what)
            if isinstance(exc, gx.TooManyRequests):
                return errors.Throttled(what)
            # 408 has no class of its own in google.api_core: it is a plain ClientError.
            if isinstance(exc, gx.ServerError) or exc.code == 408:
                return errors.Unavailable(what)
            return errors.BackendError(what)
        if isinstance(exc, GoogleAuthError):
            return errors.Denied(f"{where}: {exc}")
        if isinstance(exc, requests.RequestException | ConnectionError | TimeoutError):
            return errors.Unavailable(f"{where}: {exc}")
        return errors.BackendError(f"{where}: {exc!r}")

    def _put_sync(self, key: str, path: Path) -> None:
        with open(path, "rb") as body:
            size = os.fstat(body.fileno()).st_size
            chunk = self.cfg.client.chunk_size if size > self.cfg.client.chunk_size else None

            def through_the_sdk() -> None:
                body.seek(0)  # the direct attempt may have read it
                blob = self.bucket.blob(key, chunk_size=chunk)
                if self.cfg.storage_class:
                    blob.storage_class = self.cfg.storage_class
                blob.upload_from_file(body, size=size, checksum="crc32c", timeout=self.timeout,
                                      retry=self.retry)

            direct = self.direct
            if chunk is not None or direct is None or direct.upload is None:
                through_the_sdk()  # a resumable upload in ChunkSize pieces, or no direct URL
                return
            self._either("PUT", key,
                         lambda d: d.put(key, body, size, self.cfg.storage_class),
                         through_the_sdk)

    def _get_sync(self, key: str, out: IO[bytes], offset: int, length: int | None) -> int:
        if length == 0:
            return 0
        return self._either("GET", key, lambda d: d.get(key, out, offset, length),
                            lambda: self._sdk_get(key, out, offset, length))

    def _sdk_get(self, key: str, out: IO[bytes], offset: int, length: int | None) -> int:
        blob = self.bucket.blob(key)
        whole = offset == 0 and length is None
        end = None if length is None else offset + length - 1
        try:
            blob.download_to_file(out, start=None if whole else offset, end=end,
                                  checksum="crc32c" if whole else None, raw_download=True,
                                  timeout=self.timeout, retry=self.retry)
        except gx.RequestRangeNotSatisfiable:
            return 0
        return out.tell()

    def _head_sync(self, key: str) -> ObjectInfo:
        def through_the_sdk() -> int:
            blob = self.bucket.get_blob(key, timeout=self.timeout, retry=self.retry)
            if blob is None:
                raise errors.NotFound(f"gs://{self.cfg.bucket}/{key}")
            return int(blob.size or 0)

        return ObjectInfo(key, self._through_api("HEAD", key, lambda d: d.head(key),
                                                 through_the_sdk))

    def _delete_sync(self, key: str) -> None:
        def through_the_sdk() -> None:
            try:
                self.bucket.blob(key).delete(timeout=self.timeout, retry=self.retry)
            except gx.NotFound:
                pass  # already gone: success

        self._through_api("DELETE", key, lambda d: d.delete(key), through_the_sdk)

    def _through_api(self, method: str, key: str, direct_call: Callable[[DirectGcs], T],
                     sdk_call: Callable[[], T]) -> T:
        """`_either` for the requests on the JSON API's URLs (HEAD, DELETE, listing): the
        SDK's alone when those URLs could not be built (known at start, not a server's
        refusal, so not counted as one)."""
        direct = self.direct
        if direct is None or direct.api is None:
            return sdk_call()
        return self._either(method, key, direct_call, sdk_call)

    def _create_exclusive_sync(self, key: str, data: bytes) -> bool:
        try:
            self.bucket.blob(key).upload_from_string(data, if_generation_match=0,
                                                     timeout=self.timeout)
        except gx.PreconditionFailed:
            return False
        return True

    def _replace_if_sync(self, key: str, version: str, data: bytes) -> bool:
        try:
            self.bucket.blob(key).upload_from_string(data, if_generation_match=int(version),
                                                     timeout=self.timeout)
        except (gx.PreconditionFailed, gx.NotFound):
            return False
        return True

    def _read_versioned_sync(self, key: str) -> tuple[bytes, str]:
        blob = self.bucket.get_blob(key, timeout=self.timeout, retry=self.retry)
        if blob is None:
            raise errors.NotFound(f"gs://{self.cfg.bucket}/{key}")
        data = blob.download_as_bytes(if_generation_match=blob.generation,
                                      timeout=self.timeout, retry=self.retry)
        return data, str(blob.generation)

    def _delete_if_sync(self, key: str, version: str) -> bool:
        try:
            self.bucket.blob(key).delete(if_generation_match=int(version),
                                         timeout=self.timeout)
        except (gx.PreconditionFailed, gx.NotFound):
            return False
        return True

    def _list_sync(self, prefix: str, token: str | None,
                   limit: int) -> tuple[list[ObjectInfo], str | None]:
        def through_the_sdk() -> Listed:
            blobs = self.client.list_blobs(self.bucket, prefix=prefix or None,
                                           page_token=token, max_results=None,
                                           page_size=limit, timeout=self.timeout,
                                           retry=self.retry)
            page = next(blobs.pages)
            found = [(b.name, int(b.size or 0), b.updated.timestamp() if b.updated else None)
                     for b in page]
            return found, blobs.next_page_token or None

        return as_objects(self._through_api(
            "LIST", prefix, lambda d: d.list_page(prefix, token, limit), through_the_sdk))

    def _copy_sync(self, src: str, dst: str) -> None:
        target = self.bucket.blob(dst)
        token, _, _ = target.rewrite(self.bucket.blob(src), timeout=self.timeout,
                                     retry=self.retry)
        while token is not None:
            token, _, _ = target.rewrite(self.bucket.blob(src), token=token,
                                         timeout=self.timeout, retry=self.retry)

    async def aclose(self) -> None:
        if self.direct is not None:
            self.direct.close()
        self.client.close()
