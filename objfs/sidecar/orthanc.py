"""Orthanc's REST API, as far as objfs needs it: what a resource id is and the uuids of every
attachment under it (move-storage, audit), and the attachments of a series (series prefetch)."""

from __future__ import annotations

import base64
import http.client
import json
import logging
import ssl
import urllib.parse
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from objfs.config import OrthancSettings
from objfs.errors import OrthancUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

# Orthanc resource type -> its REST collection, from the highest level down.
COLLECTIONS = {"Patient": "patients", "Study": "studies", "Series": "series",
               "Instance": "instances"}
# How the plugins name each level in a job's Content.
CONTENT_GROUPS = {"Patient": "Patients", "Study": "Studies", "Series": "Series",
                  "Instance": "Instances"}
PAGE = 1000
# Requests to Orthanc at a time (per client): each holds one of Orthanc's HTTP threads while
# it is served, and Orthanc's own clients need the rest (`HttpThreadsCount`, 50 by default).
REQUESTS_AT_ONCE = 4
_BELOW = {"Patient": ("Study", "Series", "Instance"), "Study": ("Series", "Instance"),
          "Series": ("Instance",), "Instance": ()}


DICOM_CONTENT_TYPE = 1


def _viewing_order(instance: dict[str, Any]) -> tuple[int, int]:
    """Sort key of an instance in a series: IndexInSeries (a field of `/series/{id}/instances`
    answers, a metadata string in `/tools/find` answers), then InstanceNumber; unknown last."""
    tags = instance.get("MainDicomTags") or {}
    number = str(tags.get("InstanceNumber", "")).strip()
    index = instance.get("IndexInSeries", (instance.get("Metadata") or {}).get("IndexInSeries"))
    if isinstance(index, str) and index.strip().isdigit():
        index = int(index)
    return (index if isinstance(index, int) else 1 << 30,
            int(number) if number.lstrip("-").isdigit() else 1 << 30)


class OrthancClient:
    """An HTTP client of Orthanc. Every method raises OrthancUnavailable when Orthanc cannot
    be reached or answers an unexpected error.

    Each request runs in a worker thread over the standard library's `http.client`, at most
    REQUESTS_AT_ONCE at a time, on a connection of its own that is closed with the answer
    (`Connection: close`). Why:
    - Orthanc serves each open connection with one of its `HttpThreadsCount` threads, idle
      keep-alive connections included, until its `KeepAliveTimeout`: connections kept open for
      objfs' next request made Orthanc's own clients wait (with 8 threads, reads through
      Orthanc stalled for 2 s while the series prefetch had asked its questions);
    - the event loop, which serves Orthanc's file requests, only hands the request over (an
      async HTTP client on the loop cost about 1.2 ms of its CPU per request; a thread with
      a new connection 0.3 ms, on another thread); the series prefetch of an Orthanc before
      1.12.5 asks once per instance.
    The exception: `dicom_uuids` asks a run of such questions on one connection that it
    closes with the last answer (no idle connection is left to Orthanc).
    """

    def __init__(self, settings: OrthancSettings) -> None:
        self.url = settings.url
        parts = urllib.parse.urlsplit(settings.url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port
        self._prefix = parts.path.rstrip("/")  # Orthanc behind a reverse proxy's path
        self._timeout = settings.timeout
        self._headers = {"Accept": "application/json", "Connection": "close"}
        if settings.username is not None and settings.password is not None:
            token = f"{settings.username}:{settings.password}".encode()
            self._headers["Authorization"] = "Basic " + base64.b64encode(token).decode()
        self._ssl = ssl.create_default_context() if self._https else None
        self._limiter = trio.CapacityLimiter(REQUESTS_AT_ONCE)
        # Whether `/tools/find` names attachments (Orthanc >= 1.12.5); None until known.
        self._find_names_attachments: bool | None = None

    def _connection(self) -> http.client.HTTPConnection:
        return (http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout,
                                            context=self._ssl) if self._https else
                http.client.HTTPConnection(self._host, self._port, timeout=self._timeout))

    def _exchange(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        """One request and its whole answer, in a worker thread."""
        connection = self._connection()
        try:
            connection.request(method, self._prefix + path, body=body, headers=self._headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def _get_run(self, paths: list[str]) -> list[tuple[int, bytes]]:
        """GET each of `paths` one after the other on one connection, in one worker thread:
        kept open between them and closed with the last answer (an Orthanc that closes it
        earlier gets a new one). Orthanc's thread serves the run and is free right after it,
        and the run costs one thread hand-over and one connection instead of one each."""
        connection = self._connection()
        keep = {**self._headers, "Connection": "keep-alive"}
        answers = []
        try:
            for i, path in enumerate(paths):
                connection.request("GET", self._prefix + path,
                                   headers=self._headers if i == len(paths) - 1 else keep)
                response = connection.getresponse()
                answers.append((response.status, response.read()))
        finally:
            connection.close()
        return answers

    async def _get(self, path: str) -> Any | None:
        """The JSON answer of GET `path`, or None for 404."""
        return await self._request("GET", path)

    async def _request(self, method: str, path: str, body: str | None = None) -> Any | None:
        """The JSON answer of one request, or None for 404; answers are parsed in the worker
        thread too (megabytes for a long series). Cancelling abandons the thread, which ends
        within `Timeout`."""

        def exchange() -> tuple[int, bytes, Any]:
            status, data = self._exchange(method, path,
                                          None if body is None else body.encode())
            return status, data, self._parsed(method, path, status, data)

        status, data, answer = await self._in_thread(exchange)
        self._check(status, method, path, data)
        return None if status == 404 else answer

    async def _in_thread(self, work: Callable[[], T]) -> T:
        """`work` (requests to Orthanc) in a worker thread, REQUESTS_AT_ONCE at a time."""
        try:
            return await trio.to_thread.run_sync(work, limiter=self._limiter,
                                                 abandon_on_cancel=True)
        except (OSError, http.client.HTTPException) as exc:
            raise OrthancUnavailable(f"Orthanc at {self.url} is unreachable: {exc}") from exc

    def _parsed(self, method: str, path: str, status: int, data: bytes) -> Any:
        """The JSON of a 200 answer (None for any other status)."""
        if status != 200:
            return None
        try:
            return json.loads(data)
        except ValueError as exc:
            raise OrthancUnavailable(f"Orthanc at {self.url} answered {method} {path} with "
                                     f"something that is not JSON: {exc}") from exc

    @staticmethod
    def _check(status: int, method: str, path: str, data: bytes) -> None:
        """Raise OrthancUnavailable for an answer that is neither 200 nor 404."""
        if status not in (200, 404):
            raise OrthancUnavailable(f"Orthanc answered HTTP {status} to {method} {path}: "
                                     f"{data.decode(errors='replace')[:200]}")

    async def series_id(self, series_instance_uid: str) -> str | None:
        """Orthanc's id of the series with this SeriesInstanceUID, or None."""
        answer = await self._request("POST", "/tools/lookup", series_instance_uid) or []
        found = [r["ID"] for r in answer if r.get("Type") == "Series"]
        return str(found[0]) if found else None

    async def series_instances(self, series_id: str) -> list[tuple[str, str | None]]:
        """The instances of a series in viewing order (IndexInSeries, then InstanceNumber),
        each with its DICOM attachment's uuid when the answer names it (`FileUuid`: Orthanc
        1.10 to 1.13 do), else None; empty when the series is gone."""
        instances = await self._get(f"/series/{series_id}/instances") or []
        return [(str(i["ID"]), str(i["FileUuid"]) if isinstance(i.get("FileUuid"), str)
                 else None) for i in sorted(instances, key=_viewing_order)]

    async def series_dicom_uuids(self, series_instance_uid: str) -> list[str] | None:
        """The DICOM attachment uuids of every instance of the series with this
        SeriesInstanceUID, in viewing order, in one request: `/tools/find` with
        `ResponseContent` (Orthanc >= 1.12.5). Empty when Orthanc has no such series. None
        when this Orthanc does not name attachments in a find answer (older versions ignore
        `ResponseContent` and answer bare ids): the caller then lists the series
        (`series_instances`); that answer is remembered, so an old Orthanc is asked this only
        once."""
        if self._find_names_attachments is False:
            return None
        query = {"Level": "Instance", "Query": {"SeriesInstanceUID": series_instance_uid},
                 "ResponseContent": ["Attachments", "Metadata", "MainDicomTags"]}
        answer = await self._request("POST", "/tools/find", json.dumps(query))
        if not isinstance(answer, list):
            return []
        if not all(isinstance(i, dict) and isinstance(i.get("Attachments"), list)
                   for i in answer):
            self._find_names_attachments = False
            log.info("Orthanc at %s does not name attachments in /tools/find answers (before "
                     "1.12.5): series prefetch reads them from its listing of the series", self.url)
            return None
        if answer:
            self._find_names_attachments = True
        uuids: list[str] = []
        for instance in sorted(answer, key=_viewing_order):
            for attachment in instance["Attachments"]:
                if attachment.get("ContentType") == DICOM_CONTENT_TYPE and "Uuid" in attachment:
                    uuids.append(str(attachment["Uuid"]))
        return uuids

    async def dicom_uuids(self, instance_ids: list[str]) -> list[str | None]:
        """The uuid of each instance's DICOM file attachment (for a series listing that did
        not name them), asked one after the other on one connection (`_get_run`): one of the
        REQUESTS_AT_ONCE slots for the whole run. None for an instance that is gone.
        Cancelling abandons the thread, which ends within `Timeout` per instance."""
        paths = [f"/instances/{i}/attachments/dicom/info" for i in instance_ids]

        def run() -> list[tuple[int, bytes, Any]]:
            return [(status, data, self._parsed("GET", path, status, data))
                    for path, (status, data) in zip(paths, self._get_run(paths), strict=True)]

        answers = await self._in_thread(run)
        uuids: list[str | None] = []
        for path, (status, data, info) in zip(paths, answers, strict=True):
            self._check(status, "GET", path, data)
            uuids.append(None if status == 404 else str(info["Uuid"]))
        return uuids

    async def resource_type(self, resource_id: str) -> str | None:
        """"Patient", "Study", "Series" or "Instance", or None for an unknown id. Ids are
        tried from the instance level up, as the plugins do."""
        if not resource_id or "/" in resource_id:
            return None
        for level in ("Instance", "Series", "Study", "Patient"):
            if await self._get(f"/{COLLECTIONS[level]}/{resource_id}") is not None:
                return level
        return None

    async def attachment_uuids(self, level: str, resource_id: str) -> list[str]:
        """Every attachment uuid of the resource and of everything under it (DICOM files,
        other instance attachments, and patient/study/series-level attachments)."""
        owners = [(level, resource_id)]
        for below in _BELOW[level]:
            children = await self._get(f"/{COLLECTIONS[level]}/{resource_id}/"
                                       f"{COLLECTIONS[below]}")
            owners.extend((below, child["ID"]) for child in children or [])
        uuids: list[str] = []
        for owner_level, owner in owners:
            uuids.extend(await self._own_attachments(COLLECTIONS[owner_level], owner))
        return list(dict.fromkeys(uuids))

    async def _own_attachments(self, collection: str, resource_id: str) -> list[str]:
        return list(await self._attachment_infos(collection, resource_id))

    async def _attachment_infos(self, collection: str, resource_id: str) -> dict[str, str]:
        """uuid -> the path of its ``info`` resource, for every attachment of one resource."""
        base = f"/{collection}/{resource_id}/attachments"
        types = await self._get(base + "?full")
        found: dict[str, str] = {}
        for content_type in (types or {}).values():
            info = await self._get(f"{base}/{content_type}/info")
            if info is not None:
                found[str(info["Uuid"])] = f"{base}/{content_type}/info"
        return found

    async def all_attachments(self, progress: Callable[[str], None] = lambda _: None
                              ) -> dict[str, str]:
        """Every attachment of every resource Orthanc's index holds: uuid -> the path of its
        ``info`` resource (for `attachment_still_there`). Pages through each collection; the
        resources of a page are asked about together, REQUESTS_AT_ONCE requests at a time."""
        found: dict[str, str] = {}
        for collection in COLLECTIONS.values():
            since, seen = 0, 0
            while True:
                ids = await self._get(f"/{collection}?since={since}&limit={PAGE}") or []

                async def one(resource: str, where: str = collection) -> None:
                    found.update(await self._attachment_infos(where, resource))

                async with trio.open_nursery() as nursery:
                    for resource in ids:
                        nursery.start_soon(one, str(resource))
                seen += len(ids)
                if collection == "instances" and ids:
                    progress(f"audit: {seen} instances read from Orthanc")
                if len(ids) < PAGE:
                    break
                since += PAGE
        return found

    async def attachment_still_there(self, uuid: str, info_path: str) -> bool:
        """Whether the attachment found at `info_path` still has uuid `uuid` (False once
        Orthanc deleted it or its resource)."""
        info = await self._get(info_path)
        return info is not None and str(info.get("Uuid")) == uuid
