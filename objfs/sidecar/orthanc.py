"""Orthanc's REST API, as far as move-storage needs it: what a resource id is, and the uuids
of every attachment under it."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import httpx
import trio

from objfs.config import OrthancSettings
from objfs.errors import OrthancUnavailable

log = logging.getLogger(__name__)

# Orthanc resource type -> its REST collection, from the highest level down.
COLLECTIONS = {"Patient": "patients", "Study": "studies", "Series": "series",
               "Instance": "instances"}
# How the plugins name each level in a job's Content.
CONTENT_GROUPS = {"Patient": "Patients", "Study": "Studies", "Series": "Series",
                  "Instance": "Instances"}
PAGE = 1000
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
    be reached or answers an unexpected error."""

    def __init__(self, settings: OrthancSettings) -> None:
        auth = None
        if settings.username is not None and settings.password is not None:
            auth = (settings.username, settings.password)
        self.url = settings.url
        self._http = httpx.AsyncClient(base_url=settings.url, auth=auth,
                                       timeout=settings.timeout)
        # Whether `/tools/find` names attachments (Orthanc >= 1.12.5); None until known.
        self._find_names_attachments: bool | None = None

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _get(self, path: str, large: bool = False) -> Any | None:
        """The JSON answer of GET `path`, or None for 404."""
        return await self._request("GET", path, large=large)

    async def _request(self, method: str, path: str, body: str | None = None,
                       large: bool = False) -> Any | None:
        """The JSON answer of one request, or None for 404. A `large` answer (megabytes for a
        long series) is parsed in a worker thread: the event loop keeps serving Orthanc."""
        try:
            response = await self._http.request(method, path, content=body)
        except httpx.HTTPError as exc:
            raise OrthancUnavailable(f"Orthanc at {self.url} is unreachable: {exc}") from exc
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise OrthancUnavailable(f"Orthanc answered HTTP {response.status_code} to "
                                     f"{method} {path}: {response.text[:200]}")
        try:
            if large:
                return await trio.to_thread.run_sync(json.loads, response.content)
            return response.json()
        except ValueError as exc:
            raise OrthancUnavailable(f"Orthanc at {self.url} answered {method} {path} with "
                                     f"something that is not JSON: {exc}") from exc

    async def series_id(self, series_instance_uid: str) -> str | None:
        """Orthanc's id of the series with this SeriesInstanceUID, or None."""
        answer = await self._request("POST", "/tools/lookup", series_instance_uid) or []
        found = [r["ID"] for r in answer if r.get("Type") == "Series"]
        return str(found[0]) if found else None

    async def series_instances(self, series_id: str) -> list[str]:
        """The instance ids of a series in viewing order (IndexInSeries, then
        InstanceNumber); empty when the series is gone."""
        instances = await self._get(f"/series/{series_id}/instances", large=True) or []
        return [str(i["ID"]) for i in sorted(instances, key=_viewing_order)]

    async def series_dicom_uuids(self, series_instance_uid: str) -> list[str] | None:
        """The DICOM attachment uuids of every instance of the series with this
        SeriesInstanceUID, in viewing order, in one request: `/tools/find` with
        `ResponseContent` (Orthanc >= 1.12.5). Empty when Orthanc has no such series. None
        when this Orthanc does not name attachments in a find answer (older versions ignore
        `ResponseContent` and answer bare ids): the caller then asks per instance; that
        answer is remembered, so an old Orthanc is asked this only once."""
        if self._find_names_attachments is False:
            return None
        query = {"Level": "Instance", "Query": {"SeriesInstanceUID": series_instance_uid},
                 "ResponseContent": ["Attachments", "Metadata", "MainDicomTags"]}
        answer = await self._request("POST", "/tools/find", json.dumps(query), large=True)
        if not isinstance(answer, list):
            return []
        if not all(isinstance(i, dict) and isinstance(i.get("Attachments"), list)
                   for i in answer):
            self._find_names_attachments = False
            log.info("Orthanc at %s does not name attachments in /tools/find answers (before "
                     "1.12.5): series prefetch asks for each instance's attachment", self.url)
            return None
        if answer:
            self._find_names_attachments = True
        uuids: list[str] = []
        for instance in sorted(answer, key=_viewing_order):
            for attachment in instance["Attachments"]:
                if attachment.get("ContentType") == DICOM_CONTENT_TYPE and "Uuid" in attachment:
                    uuids.append(str(attachment["Uuid"]))
        return uuids

    async def dicom_uuid(self, instance_id: str) -> str | None:
        """The uuid of an instance's DICOM file attachment, or None."""
        info = await self._get(f"/instances/{instance_id}/attachments/dicom/info")
        return None if info is None else str(info["Uuid"])

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

    async def all_attachments(self, progress: Callable[[str], None] = lambda _: None,
                              concurrency: int = 8) -> dict[str, str]:
        """Every attachment of every resource Orthanc's index holds: uuid -> the path of its
        ``info`` resource (for `attachment_still_there`). Pages through each collection;
        `concurrency` requests at a time."""
        found: dict[str, str] = {}
        limiter = trio.CapacityLimiter(concurrency)
        for collection in COLLECTIONS.values():
            since, seen = 0, 0
            while True:
                ids = await self._get(f"/{collection}?since={since}&limit={PAGE}") or []

                async def one(resource: str, where: str = collection) -> None:
                    async with limiter:
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
