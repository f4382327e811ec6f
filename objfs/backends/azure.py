"""Azure Blob Storage through azure-storage-blob.

Block blobs: a single Put Blob up to `ChunkSize`, blocks staged in parallel above it; every
request carries a transactional MD5 (`validate_content`). Timeouts and a short linear retry
replace the SDK's defaults, which can block for minutes on a refused connection.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import IO, Any

from azure.core import MatchConditions
from azure.core import exceptions as ax
from azure.storage.blob import BlobServiceClient, ContainerClient, LinearRetry, StandardBlobTier

from objfs import errors
from objfs.backends.azuredirect import DirectAzure, container_url
from objfs.backends.base import ObjectInfo
from objfs.backends.kept import Listed, as_objects, proxied
from objfs.backends.loopgets import LoopGets
from objfs.config import AzureSettings

log = logging.getLogger(__name__)

PARALLEL_BLOCKS = 4
DOWNLOAD_CHUNK = 4 * 1024 * 1024
COPY_POLL = 0.2


class AzureBackend(LoopGets[DirectAzure]):
    """Backend for one Azure Blob container."""

    name = "azure"
    sdk_name = "azure-storage-blob"
    direct_option = "AzureBlobStorage.DirectRequests"

    def __init__(self, cfg: AzureSettings) -> None:
        super().__init__(cfg.client.max_connections)
        self.cfg = cfg
        self.single_request_limit = cfg.client.chunk_size
        self._tier = (StandardBlobTier(cfg.access_tier.value) if cfg.access_tier is not None
                      else None)
        options: dict[str, Any] = {
            "connection_timeout": cfg.client.connect_timeout,
            "read_timeout": cfg.client.request_timeout,
            "retry_policy": LinearRetry(backoff=1, random_jitter_range=1,
                                        retry_total=cfg.client.max_retries),
            "max_single_put_size": cfg.client.chunk_size,
            "max_block_size": cfg.client.chunk_size,
            # The SDK's first GET would otherwise buffer up to 32 MiB per download.
            "max_single_get_size": DOWNLOAD_CHUNK,
            "max_chunk_get_size": DOWNLOAD_CHUNK,
        }
        if cfg.api_version:
            options["api_version"] = cfg.api_version
        if cfg.connection_string:
            service = BlobServiceClient.from_connection_string(cfg.connection_string, **options)
        else:
            from azure.identity import DefaultAzureCredential  # optional dependency

            service = BlobServiceClient(str(cfg.account_url),
                                        credential=DefaultAzureCredential(), **options)
        self.service = service
        self.container: ContainerClient = service.get_container_client(cfg.container)
        self.where = f"azure://{cfg.container}/"
        self.direct = self._direct_requests() if cfg.direct_requests else None
        self._loop_streams = self.direct.loop if self.direct is not None else None

    def _direct_requests(self) -> DirectAzure | None:
        """Direct downloads from this container, on the SDK's URL and service version; None
        without an account key (SAS, Entra ID) or behind an HTTP proxy."""
        credential = self.service.credential
        account = getattr(credential, "account_name", None)
        key = getattr(credential, "account_key", None)
        if not isinstance(account, str) or not isinstance(key, str):
            return None
        url = container_url(self.container.url)
        if proxied(url[0], url[1]):
            return None
        client_cfg = self.cfg.client
        return DirectAzure(url, account, key, self.service.api_version,
                           client_cfg.connect_timeout, client_cfg.request_timeout,
                           client_cfg.max_connections)

    def translate(self, exc: Exception, key: str, op: str) -> errors.ObjfsError:
        where = f"azure://{self.cfg.container}/{key}"
        if isinstance(exc, ax.HttpResponseError):
            code = str(getattr(exc, "error_code", "") or "")
            status = exc.status_code or 0
            what = f"{where}: {code or status} {exc.reason or ''}".rstrip()
            if code == "ContainerNotFound":
                return errors.BucketMissing(what)
            if isinstance(exc, ax.ResourceNotFoundError) or status == 404:
                # An unknown account answers 404 too: a configuration problem.
                return errors.NotFound(what) if code == "BlobNotFound" else \
                    errors.BucketMissing(what)
            if isinstance(exc, ax.ClientAuthenticationError) or status in (401, 403):
                return errors.Denied(what)
            if status in (429, 503) or code == "ServerBusy":
                return errors.Throttled(what)
            if code in ("RequestBodyTooLarge", "BlockCountExceedsLimit"):
                return errors.TooLarge(what)
            if status >= 500 or status == 408:
                return errors.Unavailable(what)
            return errors.BackendError(what)
        if isinstance(exc, ax.ServiceRequestError | ax.ServiceResponseError
                      | ConnectionError | TimeoutError):
            return errors.Unavailable(f"{where}: {exc}")
        if isinstance(exc, ax.ClientAuthenticationError):
            return errors.Denied(f"{where}: {exc}")
        return errors.BackendError(f"{where}: {exc!r}")

    async def prepare(self) -> None:
        if self.cfg.create_container:
            await self._run("create", "", self._create_container)

    def _create_container(self) -> None:
        try:
            self.container.create_container()
        except ax.ResourceExistsError:
            return
        log.warning(
            "created Azure container %r: check that it is private (no public access)",
            self.cfg.container)

    def _put_sync(self, key: str, path: Path) -> None:
        with open(path, "rb") as body:
            size = os.fstat(body.fileno()).st_size

            def through_the_sdk() -> None:
                body.seek(0)  # the direct attempt may have read it
                self.container.upload_blob(key, body, length=size, overwrite=True,
                                           validate_content=True,
                                           max_concurrency=PARALLEL_BLOCKS,
                                           standard_blob_tier=self._tier)

            if size > self.cfg.client.chunk_size:
                through_the_sdk()  # blocks staged in parallel
                return
            tier = None if self._tier is None else self._tier.value
            self._either("PUT", key, lambda d: d.put(key, body, size, tier), through_the_sdk)

    def _get_sync(self, key: str, out: IO[bytes], offset: int, length: int | None) -> int:
        if length == 0:
            return 0

        return self._either("GET", key, lambda d: d.get(key, out, offset, length),
                            lambda: self._sdk_get(key, out, offset, length))

    def _sdk_get(self, key: str, out: IO[bytes], offset: int, length: int | None) -> int:
        try:
            ranged = offset > 0 or length is not None
            # Blocks in parallel are written at their offsets: only into a seekable stream.
            stream = self.container.download_blob(
                key, offset=offset if ranged else None, length=length,
                max_concurrency=PARALLEL_BLOCKS if out.seekable() else 1)
        except ax.HttpResponseError as exc:
            if exc.status_code == 416:  # starts past the end
                return 0
            raise
        return int(stream.readinto(out))

    def _head_sync(self, key: str) -> ObjectInfo:
        size = self._either("HEAD", key, lambda d: d.head(key), lambda: int(
            self.container.get_blob_client(key).get_blob_properties().size))
        return ObjectInfo(key, size)

    def _delete_sync(self, key: str) -> None:
        try:
            self.container.delete_blob(key)
        except ax.ResourceNotFoundError as exc:
            if getattr(exc, "error_code", "") == "ContainerNotFound":
                raise
            # Already gone: success (the plugins report a false error here).

    batch_delete_limit = 256  # a blob batch's limit

    def _delete_many_sync(self, keys: list[str]) -> None:
        try:
            replies = list(self.container.delete_blobs(*keys, raise_on_any_failure=False))
        except ax.HttpResponseError as exc:
            # 403 too: a SAS may allow deletes but not a batch; with bad credentials the
            # single deletes fail the same way, so falling back loses nothing.
            if (exc.status_code or 0) in (400, 403, 405, 501) and \
                    getattr(exc, "error_code", "") != "ContainerNotFound":
                raise errors.Unsupported(f"azure://{self.cfg.container}: blob batch: "
                                         f"{exc.status_code} {exc.reason or ''}") from exc
            raise
        failed = []
        for key, reply in zip(keys, replies, strict=False):
            code = reply.headers.get("x-ms-error-code", "")
            if reply.status_code == 404 and code != "ContainerNotFound":
                continue  # already gone: success, as for a single delete
            if reply.status_code >= 300:
                failed.append((key, reply.status_code, code))
        if failed:
            key, status, code = failed[0]
            what = (f"azure://{self.cfg.container}/{key}: {code or status} ({len(failed)} of "
                    f"{len(keys)} deletes of a batch failed)")
            if code == "ContainerNotFound":
                raise errors.BucketMissing(what)
            if status in (401, 403):
                raise errors.Denied(what)
            raise errors.Unavailable(what)

    def _create_exclusive_sync(self, key: str, data: bytes) -> bool:
        try:
            self.container.upload_blob(key, data, overwrite=False)
        except ax.ResourceExistsError:
            return False
        return True

    def _replace_if_sync(self, key: str, version: str, data: bytes) -> bool:
        try:
            self.container.upload_blob(key, data, overwrite=True, etag=version,
                                       match_condition=MatchConditions.IfNotModified)
        except (ax.ResourceModifiedError, ax.ResourceNotFoundError):
            return False
        return True

    def _read_versioned_sync(self, key: str) -> tuple[bytes, str]:
        stream = self.container.download_blob(key)
        return stream.readall(), str(stream.properties.etag)

    def _delete_if_sync(self, key: str, version: str) -> bool:
        try:
            self.container.delete_blob(key, etag=version,
                                       match_condition=MatchConditions.IfNotModified)
        except (ax.ResourceModifiedError, ax.ResourceNotFoundError):
            return False
        return True

    def _list_sync(self, prefix: str, token: str | None,
                   limit: int) -> tuple[list[ObjectInfo], str | None]:
        def through_the_sdk() -> Listed:
            pages = self.container.list_blobs(name_starts_with=prefix or None,
                                              results_per_page=limit).by_page(
                continuation_token=token)
            page = [(b.name, int(b.size),
                     b.last_modified.timestamp() if b.last_modified else None)
                    for b in next(pages)]
            # by_page() returns an ItemPaged page iterator, which carries the token; the
            # SDK's annotation says only Iterator.
            following: str | None = getattr(pages, "continuation_token", None)
            return page, (following or None)

        return as_objects(self._either(
            "LIST", prefix, lambda d: d.list_page(prefix, token, limit), through_the_sdk))

    def _copy_sync(self, src: str, dst: str) -> None:
        target = self.container.get_blob_client(dst)
        target.start_copy_from_url(self.container.get_blob_client(src).url)
        while True:
            copy = target.get_blob_properties().copy
            if copy.status != "pending":
                break
            time.sleep(COPY_POLL)
        if copy.status != "success":
            raise errors.Unavailable(f"copy of {src} to {dst} ended with {copy.status}: "
                                     f"{copy.status_description}")

    async def aclose(self) -> None:
        if self.direct is not None:
            self.direct.close()
        await self._close_loop()
        self.service.close()
