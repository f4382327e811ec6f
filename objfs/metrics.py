"""Prometheus metrics of one daemon, served by the sidecar at ``GET /metrics``.

The store, the cache tier and the FUSE handlers keep plain counters (`objfs.tally`; no
Prometheus in those layers); `DaemonCollector` reads them through the store's accessors, and
the journal's counters, at scrape time. Backend latency and traffic are measured by
`objfs.backends.instrumented.InstrumentedBackend`, which reports to a histogram made here.
Every metric lives in the daemon's own registry, not the process-wide default one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from objfs.backends.base import Backend
from objfs.backends.instrumented import InstrumentedBackend
from objfs.journal import Stats
from objfs.tally import Tally

if TYPE_CHECKING:
    from objfs.store import Store

CONTENT_TYPE = CONTENT_TYPE_LATEST
CLUSTER_LOCKS = ("move-storage",)  # the locks the daemon itself takes
# Object-store requests take from a millisecond (local bucket) to minutes (a large upload).
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
                   120, 300)


class DaemonCollector(Collector):
    """Reads the store, cache tier, journal and backend counters when Prometheus scrapes."""

    def __init__(self, store: Store, backend: InstrumentedBackend, tally: Tally,
                 journal_path: Path) -> None:
        self.store = store
        self.backend = backend
        self.tally = tally
        self.journal_path = journal_path
        self.stats = Stats(0, 0, None, 0, 0, 0, 0, 0)  # set by `Metrics.render`
        # The cluster locks this node holds (SharedBucket), read at scrape time.
        self.held_locks: Callable[[], list[str]] = list

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        age = 0.0 if stats.oldest_pending is None else max(0.0, time.time() - stats.oldest_pending)
        yield _gauge("objfs_uploads_queued", "Attachments waiting for upload (journaled)",
                     stats.pending_uploads)
        yield _gauge("objfs_uploads_queued_bytes", "Bytes waiting for upload",
                     stats.pending_upload_bytes)
        yield _gauge("objfs_uploads_in_progress", "Uploads being sent now",
                     self.store.uploads_in_progress)
        yield _gauge("objfs_uploads_failing", "Queued uploads whose last attempt failed",
                     stats.failing)
        yield _gauge("objfs_oldest_pending_upload_age_seconds",
                     "Age of the oldest attachment not yet uploaded (0 when none)", age)
        failing_since = self.store.health.failing_since
        yield _gauge("objfs_bucket_unreachable_seconds",
                     "How long the bucket has failed to answer (0 when it answers)",
                     0.0 if failing_since is None else max(0.0, time.time() - failing_since))
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
        space = self.store.cache_space()
        yield _gauge("objfs_cache_bytes", "Bytes held by the local cache", space.used)
        yield _gauge("objfs_cache_capacity_bytes", "CacheSize", space.capacity)
        yield _gauge("objfs_cache_entries", "Clean copies kept in the local cache",
                     stats.cached_entries)
        yield _counter("objfs_cache_evictions", "Clean copies evicted from the cache",
                       space.evicted_files)
        yield _counter("objfs_cache_evicted_bytes", "Bytes evicted from the cache",
                       space.evicted_bytes)
        ops = CounterMetricFamily("objfs_fuse_operations", "FUSE requests by operation and "
                                  "result (errno name, OK on success)",
                                  labels=["operation", "errno"])
        for (op, code), count in sorted(self.tally.fuse_ops.items()):
            ops.add_metric([op, code], count)
        yield ops
        waits = CounterMetricFamily("objfs_fuse_request_waits", "The FUSE loop's waits for "
                                    "the next request: ready (one was queued, read at once) "
                                    "or parked (the loop slept until one came)",
                                    labels=["outcome"])
        for outcome in ("ready", "parked"):
            waits.add_metric([outcome], self.tally.fuse_waits[outcome])
        yield waits
        yield _counter("objfs_bucket_lookups", "Lookups that asked the bucket: names the "
                       "journal did not know, and (SharedBucket) confirmations of known copies",
                       self.tally.bucket_lookups)
        held = GaugeMetricFamily("objfs_cluster_lock_held", "1 while this node holds the "
                                 "cluster lock (SharedBucket: move-storage runs here)",
                                 labels=["lock"])
        held_now = self.held_locks()
        for name in CLUSTER_LOCKS:
            held.add_metric([name], 1.0 if name in held_now else 0.0)
        yield held
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
        latency = Histogram("objfs_backend_request_duration_seconds",
                            "Object-store request latency", ["operation", "outcome"],
                            buckets=LATENCY_BUCKETS, registry=self.registry)

        def observe(operation: str, outcome: str, seconds: float) -> None:
            latency.labels(operation, outcome).observe(seconds)

        return InstrumentedBackend(backend, observe)

    def attach(self, store: Store, backend: InstrumentedBackend, journal_path: Path) -> None:
        self._collector = DaemonCollector(store, backend, self.tally, journal_path)
        self.registry.register(self._collector)

    def show_locks(self, held_locks: Callable[[], list[str]]) -> None:
        """Where the scrape reads the cluster locks this node holds."""
        assert self._collector is not None
        self._collector.held_locks = held_locks

    def render(self, stats: Stats) -> bytes:
        """The text exposition, with the journal's counters `stats` (counted beforehand, off
        the event loop). Call it on the event loop thread, which owns the other counters."""
        if self._collector is not None:
            self._collector.stats = stats
        return generate_latest(self.registry)
