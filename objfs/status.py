"""What `objfs status` and ``GET /status`` report: the journal's counters, the cache budget and,
in HybridMode, the file-system tier's size."""

from __future__ import annotations

import time
from typing import Any

from objfs.config import Settings
from objfs.fstier import FileSystemTier
from objfs.journal import Stats


def facts(stats: Stats, settings: Settings, fs: FileSystemTier | None) -> dict[str, Any]:
    """The status as JSON-ready facts. Walks the file-system tier (two directory levels and a
    stat per file), so it takes a while on a tier of millions of files."""
    age = None if stats.oldest_pending is None else max(0.0, time.time() - stats.oldest_pending)
    out: dict[str, Any] = {
        "hybrid_mode": settings.hybrid_mode,
        "pending_uploads": stats.pending_uploads,
        "pending_upload_bytes": stats.pending_upload_bytes,
        "oldest_pending_age_seconds": None if age is None else round(age, 1),
        "failing_uploads": stats.failing,
        "pending_deletes": stats.pending_deletes,
        "uploaded_known": stats.uploaded,
        "cache_entries": stats.cached_entries,
        "cache_bytes": stats.cached_bytes,
        "cache_capacity_bytes": settings.cache_size,
    }
    if fs is not None:
        files, size = fs.usage()
        out.update(file_system_directory=str(fs.root), file_system_files=files,
                   file_system_bytes=size)
    return out


def render(settings: Settings, f: dict[str, Any]) -> str:
    """The same facts for a human."""
    age = f["oldest_pending_age_seconds"]
    lines = [
        f"cache directory:  {settings.cache_directory}",
        f"pending uploads:  {f['pending_uploads']} ({f['pending_upload_bytes']} bytes)"
        + ("" if age is None else f", oldest {age:.0f}s ago")
        + (f", {f['failing_uploads']} failing" if f["failing_uploads"] else ""),
        f"pending deletes:  {f['pending_deletes']}",
        f"cache:            {f['cache_bytes']} of {f['cache_capacity_bytes']} bytes "
        f"in {f['cache_entries']} files",
    ]
    if "file_system_files" in f:
        lines.append(f"file-system tier: {f['file_system_bytes']} bytes in "
                     f"{f['file_system_files']} files at {f['file_system_directory']} "
                     f"(HybridMode {f['hybrid_mode']})")
    return "\n".join(lines)
