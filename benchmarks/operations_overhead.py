"""What observability costs: file creation through objfs (local bucket) with and without
Prometheus scraping ``/metrics`` every 100 ms, against local disk in the same run; the time
of one scrape; and the journal counts behind ``/metrics``, ``/status`` and ``STATUS=`` as
the journal grows (they run in a worker thread, off the FUSE event loop).

    .venv/bin/python benchmarks/operations_overhead.py [--files 2000] [--rows 1000000]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from objfs.journal import Journal, read_stats
from tests.support.daemon import Objfs
from tests.support.rest import rest


def create_files(root: Path, count: int, size: int = 4096) -> float:
    """Files per second: Orthanc's pattern (mkdir -p ab/cd, create, write, fsync, close)."""
    data = os.urandom(size)
    start = time.perf_counter()
    for _ in range(count):
        name = str(uuid.uuid4())
        folder = root / name[:2] / name[2:4]
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
    return count / (time.perf_counter() - start)


class Scraper:
    """GET /metrics every `period` seconds in a thread; records each scrape's duration."""

    def __init__(self, api: str, period: float = 0.1) -> None:
        self.api = api
        self.period = period
        self.durations: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            status, _ = rest(self.api, "GET", "/metrics")
            assert status == 200
            self.durations.append(time.perf_counter() - start)
            self._stop.wait(self.period)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def journal_counts(work: Path, rows: int) -> list[tuple[int, float]]:
    """(rows, ms per count) for growing journals."""
    path = work / "bench-journal.sqlite"
    Journal(path).close()
    db = sqlite3.connect(path)
    out = []
    done = 0
    now = time.time()
    for target in (10_000, 100_000, rows):
        batch = [(str(uuid.uuid4()), "uploaded" if i % 100 else "pending-upload", 500_000,
                  None, i % 3 == 0, 0, now - i, now - i, None) for i in range(done, target)]
        db.executemany("INSERT INTO attachments (uuid, state, size, key, cached, sealed, "
                       "created, atime, last_error) VALUES (?,?,?,?,?,?,?,?,?)", batch)
        db.commit()
        done = target
        read_stats(path)  # warm the page cache
        start = time.perf_counter()
        for _ in range(3):
            read_stats(path)
        out.append((target, (time.perf_counter() - start) / 3 * 1000))
    db.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="objfs-bench-ops-"))
    local = work / "local"
    local.mkdir()
    local_rate = create_files(local, args.files)
    config = {"Objfs": {"CacheDirectory": str(work / "cache"), "LocalBucket": str(work / "b"),
                        "CacheSize": 4096}}
    daemon = Objfs(work, config).start()
    try:
        plain = create_files(daemon.mountpoint, args.files)
        with Scraper(daemon.api) as scraper:
            scraped = create_files(daemon.mountpoint, args.files)
        daemon.wait_uploaded()
        status, text = rest(daemon.api, "GET", "/metrics")
        assert status == 200
        series = sum(1 for line in str(text).splitlines() if line and not line.startswith("#"))
    finally:
        daemon.stop()
    durations = sorted(scraper.durations)
    print(f"{'':38}{'files/s':>10}{'vs local':>10}")
    print(f"{'local disk':38}{local_rate:10.0f}{1:9.2f}x")
    print(f"{'objfs, no scraping':38}{plain:10.0f}{plain / local_rate:9.2f}x")
    print(f"{'objfs, /metrics scraped every 100 ms':38}{scraped:10.0f}"
          f"{scraped / local_rate:9.2f}x  ({scraped / plain:.2f}x of no scraping)")
    print(f"scrape: {len(durations)} scrapes, median {durations[len(durations) // 2] * 1000:.1f} "
          f"ms, max {durations[-1] * 1000:.1f} ms, {series} series")
    for rows, ms in journal_counts(work, args.rows):
        print(f"journal counts with {rows:>9,} attachments: {ms:6.1f} ms (worker thread)")


if __name__ == "__main__":
    main()
