"""Prometheus metrics of one daemon, served by the sidecar at ``GET /metrics``.

The store, the cache tier and the FUSE handlers keep plain counters (no Prometheus in those
layers); `DaemonCollector` reads them, and the journal's counters, at scrape time. Backend
latency and traffic are measured by `InstrumentedBackend`, a wrapper around the real backend.
Every metric lives in the daemon's own registry, not the process-wide default one.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from objfs.backends.base import Backend, ObjectInfo
from objfs.errors import ObjfsError
from objfs.journal import Stats

if TYPE_CHECKING:
    from objfs.cache import LocalTier
    from objfs.store import Store

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Object-store requests take from a millisecond (local bucket) to minutes (a large upload).
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
                   120, 300)


@dataclass
class Tally:
    """Plain counters the store and the FUSE layer bump; read at scrape time."""

    uploads: int = 0
    upload_errors: Counter[str] = field(default_factory=Counter)  # by error class
    fuse_ops: Counter[tuple[str, str]] = field(default_factory=Counter)  # (op, errno name)


def error_class(exc: BaseException) -> str:
    """The label for a failure: the objfs error class, or ``Other``."""
    return type(exc).__name__ if isinstance(exc, ObjfsError) else "Other"


class InstrumentedBackend(Backend):
    """Delegates to `inner`, timing every request by operation and outcome and counting the
    bytes that go up and down. Errors pass through unchanged."""

    def __init__(self, inner: Backend, registry: CollectorRegistry) -> None:
        self.inner = inner
        self.name = inner.name
        self.latency = Histogram("objfs_backend_request_duration_seconds",
                                 "Object-store request latency", ["operation", "outcome"],
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.bytes_up = 0
        self.bytes_down = 0

    async def _timed(self, op: str, fn: Callable[[], Any]) -> Any:
        start = time.monotonic()
        outcome = "error"
        try:
            result = await fn()
            outcome = "ok"
            return result
        except ObjfsError as exc:
            outcome = error_class(exc)
            raise
        finally:
            self.latency.labels(op, outcome).observe(time.monotonic() - start)

    async def put(self, key: str, path: Path) -> None:
        size = os.stat(path).st_size
        await self._timed("put", lambda: self.inner.put(key, path))
        self.bytes_up += size

    async def get(self, key: str, path: Path, offset: int = 0, length: int | None = None) -> int:
        count: int = await self._timed("get", lambda: self.inner.get(key, path, offset, length))
        self.bytes_down += count
        return count

    async def head(self, key: str) -> ObjectInfo:
        info: ObjectInfo = await self._timed("head", lambda: self.inner.head(key))
        return info

    async def delete(self, key: str) -> None:
        await self._timed("delete", lambda: self.inner.delete(key))

    async def list_page(self, prefix: str, token: str | None = None,
                        limit: int = 1000) -> tuple[list[ObjectInfo], str | None]:
        page: tuple[list[ObjectInfo], str | None] = await self._timed(
            "list", lambda: self.inner.list_page(prefix, token, limit))
        return page

    async def copy(self, src: str, dst: str) -> None:
        await self._timed("copy", lambda: self.inner.copy(src, dst))

    async def prepare(self) -> None:
        await self.inner.prepare()

    async def aclose(self) -> None:
        await self.inner.aclose()


class DaemonCollector(Collector):
    """Reads the store, cache tier, journal and backend counters when Prometheus scrapes."""

    def __init__(self, store: Store, tier: LocalTier, backend: InstrumentedBackend,
                 tally: Tally, journal_path: Path) -> None:
        self.store = store
        self.tier = tier
        self.backend = backend
        self.tally = tally
        self.journal_path = journal_path
        self.stats = Stats(0, 0, None, 0, 0, 0, 0, 0)  # set by `Metrics.render`

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        age = 0.0 if stats.oldest_pending is None else max(0.0, time.time() - stats.oldest_pending)
        yield _gauge("objfs_uploads_queued", "Attachments waiting for upload (journaled)",
                     stats.pending_uploads)
        yield _gauge("objfs_uploads_queued_bytes", "Bytes waiting for upload",
                     stats.pending_upload_bytes)
        yield _gauge("objfs_uploads_in_progress", "Uploads being sent now",
                     len(self.store.inflight))
        yield _gauge("objfs_uploads_failing", "Queued uploads whose last attempt failed",
                     stats.failing)
        yield _gauge("objfs_oldest_pending_upload_age_seconds",
                     "Age of the oldest attachment not yet uploaded (0 when none)", age)
        yield _gauge("objfs_deletes_queued", "Object deletions waiting (journaled)",
                     stats.pending_deletes)
        yield _counter("objfs_uploads", "Uploads completed", self.tally.uploads)
        failures = CounterMetricFamily("objfs_upload_failures",
                                       "Failed upload attempts (retried), by error class",
                                       labels=["error"])
        for cls, count in sorted(self.tally.upload_errors.items()):
            failures.add_metric([cls], count)
        yield failures
        yield _counter("objfs_uploaded_bytes", "Bytes sent to the object store",
                       self.backend.bytes_up)
        yield _counter("objfs_downloaded_bytes", "Bytes read from the object store",
                       self.backend.bytes_down)
        yield _gauge("objfs_cache_bytes", "Bytes held by the local cache", self.tier.used)
        yield _gauge("objfs_cache_capacity_bytes", "CacheSize", self.tier.capacity)
        yield _gauge("objfs_cache_entries", "Clean copies kept in the local cache",
                     stats.cached_entries)
        yield _counter("objfs_cache_evictions", "Clean copies evicted from the cache",
                       self.tier.evicted_files)
        yield _counter("objfs_cache_evicted_bytes", "Bytes evicted from the cache",
                       self.tier.evicted_bytes)
        ops = CounterMetricFamily("objfs_fuse_operations", "FUSE requests by operation and "
                                  "result (errno name, OK on success)",
                                  labels=["operation", "errno"])
        for (op, code), count in sorted(self.tally.fuse_ops.items()):
            ops.add_metric([op, code], count)
        yield ops
        yield _gauge("objfs_journal_bytes", "Size of the journal database with its WAL",
                     _journal_size(self.journal_path))


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _journal_size(path: Path) -> int:
    total = 0
    for suffix in ("", "-wal", "-shm"):
        try:
            total += os.stat(f"{path}{suffix}").st_size
        except FileNotFoundError:
            pass
    return total


class Metrics:
    """The daemon's registry: the backend wrapper registers its histogram at construction,
    `attach` adds the scrape-time collector once the store exists."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.tally = Tally()
        self._collector: DaemonCollector | None = None

    def instrument(self, backend: Backend) -> InstrumentedBackend:
        return InstrumentedBackend(backend, self.registry)

    def attach(self, store: Store, tier: LocalTier, backend: InstrumentedBackend,
               journal_path: Path) -> None:
        self._collector = DaemonCollector(store, tier, backend, self.tally, journal_path)
        self.registry.register(self._collector)

    def render(self, stats: Stats) -> bytes:
        """The text exposition, with the journal's counters `stats` (counted beforehand, off
        the event loop). Call it on the event loop thread, which owns the other counters."""
        if self._collector is not None:
            self._collector.stats = stats
        return generate_latest(self.registry)
