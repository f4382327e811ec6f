"""`objfs audit`: the bucket compared with the attachments Orthanc's index references.

- **missing**: an attachment Orthanc knows whose data is in no tier (not in the bucket, not
  waiting for upload in the local journal, not in the file-system tier): data loss.
- **orphans**: objects under `RootPath` that no attachment references and that are older than a
  grace period (a write in flight is young, so it is never counted); `delete_orphans` removes
  them.

Order makes the answer safe while Orthanc and objfs keep working: Orthanc's attachments are
read first, the bucket is listed second. An attachment written during the audit is either
unknown to the first read (its object is then young, never an orphan) or known to it (its
object or pending local copy is then found, or found by a second look). A candidate "missing"
uuid is checked again (bucket, journal, file-system tier, and whether Orthanc still has it)
before it is reported.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from objfs.backends import open_backend
from objfs.backends.base import Backend, ObjectInfo
from objfs.config import Settings
from objfs.fstier import FileSystemTier
from objfs.journal import PENDING_UPLOAD, Journal
from objfs.retry import RetryPolicy
from objfs.sidecar.orthanc import OrthancClient

log = logging.getLogger(__name__)

DEFAULT_GRACE = 3600.0
POLICY = RetryPolicy(deadline=120)
PROGRESS_EVERY = 1000


@dataclass
class Orphan:
    uuid: str
    keys: list[str]
    bytes: int
    age_seconds: float


@dataclass
class Report:
    """What one audit found; `to_json` is the ``--json`` output."""

    attachments: int = 0  # referenced by Orthanc
    objects: int = 0  # attachment objects in the bucket
    pending_upload: int = 0  # referenced, not yet in the bucket, journaled locally
    missing: list[str] = field(default_factory=list)
    orphans: list[Orphan] = field(default_factory=list)
    young_unreferenced: int = 0  # unreferenced but within the grace period
    deleted_keys: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


async def audit(settings: Settings, *, grace: float = DEFAULT_GRACE,
                delete_orphans: bool = False,
                progress: Callable[[str], None] = lambda _: None) -> Report:
    """Compare the bucket with Orthanc's attachments. Raises OrthancUnavailable when Orthanc's
    REST API (``Objfs.Orthanc``) cannot be read, BackendError for the bucket."""
    orthanc = OrthancClient(settings.orthanc)
    backend = open_backend(settings)
    journal_path = settings.cache_directory / "journal.sqlite"
    journal = Journal(journal_path, readonly=True) if journal_path.exists() else None
    fs = (FileSystemTier(settings.fs_directory, None, False)
          if settings.fs_directory is not None else None)
    try:
        referenced = await orthanc.all_attachments(progress)
        progress(f"audit: {len(referenced)} attachments referenced by Orthanc")
        objects = await _bucket(backend, settings, progress)
        return await _compare(settings, backend, orthanc, journal, fs, referenced, objects,
                              grace, delete_orphans, progress)
    finally:
        if journal is not None:
            journal.close()
        await backend.aclose()


async def _bucket(backend: Backend, settings: Settings,
                  progress: Callable[[str], None]) -> dict[str, list[ObjectInfo]]:
    """Every attachment object under RootPath, by uuid."""
    found: dict[str, list[ObjectInfo]] = {}
    count = 0
    token: str | None = None
    prefix = settings.layout.root_prefix()
    while True:
        page, token = await POLICY.call(f"list {prefix or 'the bucket'}",
                                        functools.partial(backend.list_page, prefix, token,
                                                          1000))
        for info in page:
            parsed = settings.layout.parse_key(info.key)
            if parsed is not None:
                found.setdefault(parsed.uuid, []).append(info)
        count += len(page)
        if count and count % (PROGRESS_EVERY * 10) < len(page):
            progress(f"audit: {count} objects listed")
        if token is None:
            return found


async def _compare(settings: Settings, backend: Backend, orthanc: OrthancClient,
                   journal: Journal | None, fs: FileSystemTier | None,
                   referenced: dict[str, str],
                   objects: dict[str, list[ObjectInfo]], grace: float, delete_orphans: bool,
                   progress: Callable[[str], None]) -> Report:
    report = Report(attachments=len(referenced), objects=len(objects))
    for uuid in sorted(referenced - objects.keys()):
        if journal is not None:
            row = journal.get(uuid)
            if row is not None and row.state == PENDING_UPLOAD:
                report.pending_upload += 1
                continue
        if fs is not None and fs.stat(uuid) is not None:
            continue
        # A second look: uploaded since the listing, or deleted by Orthanc since its read.
        prefix = settings.layout.lookup_prefix(uuid)
        page, _ = await POLICY.call(f"list {prefix}",
                                    functools.partial(backend.list_page, prefix, None, 16))
        if any((parsed := settings.layout.parse_key(o.key)) and parsed.uuid == uuid
               for o in page):
            continue
        if not await orthanc.attachment_still_there(uuid, referenced[uuid]):
            continue
        log.error("attachment %s is referenced by Orthanc but its data is in no tier", uuid)
        report.missing.append(uuid)
    now = time.time()
    for uuid in sorted(objects.keys() - referenced):
        infos = objects[uuid]
        newest = max((i.modified for i in infos if i.modified is not None), default=None)
        age = now - newest if newest is not None else float("inf")
        if age < grace:
            report.young_unreferenced += 1
            continue
        report.orphans.append(Orphan(uuid, sorted(i.key for i in infos),
                                     sum(i.size for i in infos), round(age, 1)))
    if delete_orphans:
        for orphan in report.orphans:
            for key in orphan.keys:
                await POLICY.call(f"delete {key}", functools.partial(backend.delete, key))
                report.deleted_keys.append(key)
        if report.deleted_keys:
            progress(f"audit: deleted {len(report.deleted_keys)} orphan objects")
    return report


def describe(report: Report) -> str:
    """The human-readable report."""
    lines = [f"attachments referenced by Orthanc: {report.attachments}",
             f"attachment objects in the bucket:  {report.objects}",
             f"waiting for upload (journaled):    {report.pending_upload}",
             f"missing (data in no tier):         {len(report.missing)}"]
    lines += [f"  MISSING {uuid}" for uuid in report.missing]
    lines.append(f"orphans (unreferenced, older than the grace period): {len(report.orphans)}"
                 f" ({sum(o.bytes for o in report.orphans)} bytes)")
    lines += [f"  orphan {o.uuid}: {', '.join(o.keys)} ({o.bytes} bytes, "
              f"{o.age_seconds:.0f}s old)" for o in report.orphans]
    if report.young_unreferenced:
        lines.append(f"unreferenced but recent (not counted): {report.young_unreferenced}")
    if report.deleted_keys:
        lines.append(f"deleted orphan objects: {len(report.deleted_keys)}")
    return "\n".join(lines)

