"""Several Orthanc nodes on one PostgreSQL index: ingest on 1 node vs 2 nodes at once, with
objfs SharedBucket on vs off (write-back, one node only) vs local disk, in one run.

Every Orthanc uses the same PostgreSQL 15 index (a fresh database per run); the S3 server
(moto) runs at nice 10 as in the other benchmarks. Rounds are interleaved: each round runs
every configuration once, local disk included; the figures are medians over the rounds.
Prints ingest rates and ratios to local disk (1 node and 2 nodes), bucket requests per
ingested instance by operation, and cross-node read latency (p50/p99: an instance uploaded
on node A read at once through node B).

    .venv/bin/python benchmarks/scaleout.py [--instances 200] [--rounds 2]
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.orthanc_ingest import paired_ratio
from tests.support.daemon import Objfs
from tests.support.dicom import make_dicom
from tests.support.emulators import MotoServer
from tests.support.orthanc import Orthanc
from tests.support.postgres import INDEX_PLUGIN, Postgres
from tests.support.rest import rest

CLIENTS = 4  # REST clients in total, split over the nodes
EMULATOR_NICE = 10
LATENCY_SAMPLES = 100
_COUNT = re.compile(r'^objfs_backend_request_duration_seconds_count\{operation="(\w+)",'
                    r'outcome="[^"]+"\} ([0-9.e+]+)$', re.M)
_LOOKUPS = re.compile(r"^objfs_bucket_lookups_total ([0-9.e+]+)$", re.M)


def requests_of(api: str) -> tuple[Counter[str], float]:
    """(bucket requests by operation, lookups that went to the bucket) from /metrics."""
    _, text = rest(api, "GET", "/metrics")
    found: Counter[str] = Counter()
    for op, count in _COUNT.findall(text):
        found[op] += int(float(count))
    lookups = _LOOKUPS.search(text)
    return found, float(lookups.group(1)) if lookups else 0.0


class Run:
    """One configuration: `nodes` Orthancs on a fresh database, on local disk or objfs."""

    def __init__(self, work: Path, pg: Postgres, moto: MotoServer, name: str, nodes: int,
                 objfs: dict[str, Any] | None) -> None:
        self.work = work / name
        self.work.mkdir(parents=True)
        database = re.sub(r"\W", "_", name)
        pg.create_database(database)
        section = pg.section(database)
        self.daemons: list[Objfs] = []
        self.orthancs: list[Orthanc] = []
        shared_dir = self.work / "storage"
        shared_dir.mkdir()
        bucket = moto.new_bucket(database.replace("_", "-")) if objfs is not None else None
        for n in range(nodes):
            storage = shared_dir
            if objfs is not None:
                config = {"AwsS3Storage": moto.s3_section(bucket),
                          "Objfs": {"CacheDirectory": str(self.work / f"cache-{n}"),
                                    "CacheSize": 4096, **objfs}}
                daemon = Objfs(self.work, config, name=f"objfs-{n}").start()
                self.daemons.append(daemon)
                storage = daemon.mountpoint
            self.orthancs.append(Orthanc(self.work, storage, name=f"orthanc-{n}",
                                         Plugins=[INDEX_PLUGIN], PostgreSQL=section).start())

    def ingest(self, corpus: list[bytes]) -> float:
        """Instances/s of the whole corpus, spread over the nodes, CLIENTS clients in all."""
        jobs = [(self.orthancs[i % len(self.orthancs)], data) for i, data in enumerate(corpus)]
        start = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(lambda job: job[0].upload(job[1]), jobs))
        return len(corpus) / (time.perf_counter() - start)

    def cross_node_latency(self, first: int) -> list[float]:
        """Seconds of GET /file on node B for instances just uploaded on node A."""
        a, b = self.orthancs[0], self.orthancs[1]
        out = []
        for i in range(LATENCY_SAMPLES):
            instance = a.upload(make_dicom(first + i, rows=256, cols=256, patient="LATENCY"))
            start = time.perf_counter()
            b.request("GET", f"/instances/{instance}/file")
            out.append(time.perf_counter() - start)
        return out

    def requests(self) -> tuple[Counter[str], float]:
        total: Counter[str] = Counter()
        lookups = 0.0
        for daemon in self.daemons:
            daemon.wait_uploaded(600)
            found, looked = requests_of(daemon.api)
            total.update(found)
            lookups += looked
        return total, lookups

    def close(self) -> None:
        for orthanc in self.orthancs:
            orthanc.stop()
        for daemon in self.daemons:
            daemon.stop()
        shutil.rmtree(self.work, ignore_errors=True)


CONFIGS: list[tuple[str, int, dict[str, Any] | None]] = [
    ("local disk, 1 node", 1, None),
    ("write-back, 1 node", 1, {}),
    ("SharedBucket, 1 node", 1, {"SharedBucket": True}),
    ("local disk, 2 nodes", 2, None),
    ("SharedBucket, 2 nodes", 2, {"SharedBucket": True}),
]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--kb", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="objfs-scaleout-"))
    side = int((args.kb * 1024 / 2) ** 0.5)
    pg = Postgres()
    moto = MotoServer(work, nice=EMULATOR_NICE)
    rates: dict[str, list[float]] = {name: [] for name, _, _ in CONFIGS}
    per_instance: dict[str, Counter[str]] = {}
    lookups: dict[str, float] = {}
    latency: list[float] = []
    try:
        for round_no in range(args.rounds):
            for c, (name, nodes, objfs) in enumerate(CONFIGS):
                # A new corpus per run: instances already in another database are new here
                # too, but distinct files keep the page cache honest.
                first = (round_no * len(CONFIGS) + c) * 10_000
                corpus = [make_dicom(first + i, rows=side, cols=side, patient=f"S^{i % 4}",
                                     study=i % 8, series=i % 16)
                          for i in range(args.instances)]
                run = Run(work, pg, moto, f"r{round_no}-{c}", nodes, objfs)
                try:
                    rates[name].append(run.ingest(corpus))
                    if objfs is not None and round_no == 0:
                        found, looked = run.requests()
                        per_instance[name] = found
                        lookups[name] = looked
                    if nodes == 2 and objfs is not None:
                        latency.extend(run.cross_node_latency(first + 5000))
                finally:
                    run.close()
    finally:
        moto.stop()
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"corpus: {args.instances} instances of {args.kb} KiB per run; {CLIENTS} REST "
          f"clients in all; PostgreSQL 15 index; moto at nice {EMULATOR_NICE}; median of "
          f"{args.rounds} interleaved rounds; each ratio is the median of the rounds' own")
    med = {name: statistics.median(v) for name, v in rates.items()}

    def ratio(name: str, base: str) -> float:
        return paired_ratio(rates[name], rates[base])

    for name, nodes, _ in CONFIGS:
        local = f"local disk, {nodes} node{'s' if nodes > 1 else ''}"
        print(f"  ingest {name:<24} {med[name]:>7.1f} inst/s  {ratio(name, local):>5.2f}x "
              f"local disk ({nodes} node{'s' if nodes > 1 else ''})")
    print(f"  SharedBucket vs write-back, 1 node: "
          f"{ratio('SharedBucket, 1 node', 'write-back, 1 node'):.2f}x")
    print(f"  2 nodes vs 1 node, SharedBucket: "
          f"{ratio('SharedBucket, 2 nodes', 'SharedBucket, 1 node'):.2f}x "
          f"(local disk: {ratio('local disk, 2 nodes', 'local disk, 1 node'):.2f}x)")
    for name, found in per_instance.items():
        ops = ", ".join(f"{op} {count / args.instances:.2f}"
                        for op, count in sorted(found.items()))
        print(f"  bucket requests per ingested instance, {name}: "
              f"{sum(found.values()) / args.instances:.2f} ({ops}); lookups that asked the "
              f"bucket {lookups[name] / args.instances:.2f}")
    if latency:
        print(f"  cross-node read (upload on A, GET /file on B at once, {len(latency)} "
              f"samples): p50 {percentile(latency, 50) * 1000:.1f} ms, "
              f"p99 {percentile(latency, 99) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
