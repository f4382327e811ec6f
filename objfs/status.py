"""What `objfs status` and ``GET /status`` report: the journal's counters, the cache budget and,
in HybridMode, the file-system tier's size; and, while the daemon drains its uploads at
shutdown, how far it got."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from objfs.clusterlock import lock_kind
from objfs.config import Settings
from objfs.fstier import FileSystemTier
from objfs.journal import LOST_AND_FOUND, Stats


def facts(stats: Stats, settings: Settings, fs: FileSystemTier | None,
          capacity: int | None = None) -> dict[str, Any]:
    """The status as JSON-ready facts; `capacity`: the running daemon's cache budget (CacheSize
    unless `LocalTier.fit_to_disk` lowered it), CacheSize when None. Walks the file-system
    tier (two directory levels and a stat per file), so it takes a while on a tier of millions
    of files."""
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
        "cache_capacity_bytes": settings.cache_size if capacity is None else capacity,
        "lost_and_found_files": _count_files(settings.cache_directory / LOST_AND_FOUND),
    }
    if fs is not None:
        files, size = fs.usage()
        out.update(file_system_directory=str(fs.root), file_system_files=files,
                   file_system_bytes=size)
    return out


def _count_files(directory: Path) -> int:
    try:
        with os.scandir(directory) as entries:
            return sum(1 for _ in entries)
    except OSError:  # none, usually
        return 0


def cluster_facts(settings: Settings, held_locks: list[str] | None,
                  bucket_lookups: int | None) -> dict[str, Any]:
    """The node's role with SharedBucket: its name, how the cluster lock works, the locks it
    holds (None: no daemon running) and how many lookups went to the bucket."""
    if not settings.shared_bucket:
        return {"shared_bucket": False}
    return {"shared_bucket": True, "node": settings.node_name,
            "cluster_lock": lock_kind(settings), "locks_held": held_locks,
            "bucket_lookups": bucket_lookups}


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
    if f.get("lost_and_found_files"):
        lines.append(f"lost+found:       {f['lost_and_found_files']} local copies a new journal "
                     f"could not place, in {settings.cache_directory / LOST_AND_FOUND} "
                     "(README: \"A damaged journal\")")
    if f.get("shared_bucket"):
        held = f.get("locks_held")
        role = ("daemon not running" if held is None else
                f"holds {', '.join(held)}" if held else "holds no cluster lock")
        lookups = f.get("bucket_lookups")
        lines.append(f"cluster:          node {f['node']}, SharedBucket, {role} "
                     f"({f['cluster_lock']})"
                     + ("" if lookups is None else f"; {lookups} lookups asked the bucket"))
    if "file_system_files" in f:
        lines.append(f"file-system tier: {f['file_system_bytes']} bytes in "
                     f"{f['file_system_files']} files at {f['file_system_directory']} "
                     f"(HybridMode {f['hybrid_mode']})")
    return "\n".join(lines)


def lock_holder(lock_file: Path) -> int | None:
    """The pid holding a flock on `lock_file`, from /proc/locks (no lock is taken, so a
    daemon starting meanwhile is not disturbed)."""
    try:
        st = os.stat(lock_file)
        with open("/proc/locks", encoding="ascii") as f:
            lines = f.readlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; blocked waiters have "->"
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[2] != "->":
            # The device is not compared: under overlayfs (containers) it differs from stat's.
            if int(fields[5].rsplit(":", 1)[-1]) == st.st_ino:
                return int(fields[4])
    return None


def daemon_phase(cache_directory: Path) -> dict[str, Any] | None:
    """The running daemon's ``state.json`` (phase ``running`` or ``draining``), or None when
    no daemon holds the cache directory (a state file left by a crash is ignored)."""
    holder = lock_holder(cache_directory / "lock")
    if holder is None:
        return None
    try:
        state: dict[str, Any] = json.loads((cache_directory / "state.json").read_text())
    except (OSError, ValueError):
        return None
    return state if state.get("pid") == holder else None


def drain_line(state: dict[str, Any], f: dict[str, Any]) -> str:
    """One progress line while draining: a bar of uploads done since the drain began."""
    total = max(int(state.get("uploads_at_start", 0)), f["pending_uploads"])
    done = total - f["pending_uploads"]
    width = 30
    filled = width if total == 0 else width * done // total
    left = max(0.0, float(state.get("deadline", 0)) - time.time())
    return (f"draining [{'#' * filled}{'.' * (width - filled)}] {done}/{total} uploads, "
            f"{f['pending_upload_bytes']} bytes left, deadline in {left:.0f}s")
