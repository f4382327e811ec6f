"""Ingest in a site's steady state: the objfs cache full of clean copies.

Every other benchmark starts from an empty cache, where nothing is evicted. A site that has
run for a while has `CacheSize` full of copies already in the bucket: each new attachment
evicts older ones. Each round, for local disk, objfs with a roomy cache and objfs with a full
one (and each `--variant` revision, full): Orthanc stores a first set of small instances
(about 2x the full cache's size, so that the cache ends full of clean copies once uploaded),
then the second set is timed (4 REST clients), with the daemon's CPU per instance. moto as in
`orthanc_ingest.py`; interleaved rounds, order reversed every other round. Each objfs run also
reports how much of `CacheSize` its copies fill once everything is uploaded (a cache that
evicted more than it needed holds less). `--encrypted`: objfs runs with A1 encryption (each
upload's body is a temporary copy that takes budget).

    .venv/bin/python benchmarks/full_cache.py [--rounds 4] [--small 300] [--encrypted]
        [--variant before=rev:REVISION]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.ab_revisions import ROOT, Variant, parse_variant, start_from, workspace
from benchmarks.orthanc_ingest import (
    CLIENTS,
    EMULATOR_NICE,
    UPLOAD_CONCURRENCY,
    paired_ratio,
    proc_usage,
)
from objfs import codec
from tests.support.daemon import Objfs
from tests.support.dicom import make_dicom
from tests.support.emulators import MotoServer
from tests.support.orthanc import Orthanc

ROOMY_MB = 4096


def instances(first: int, count: int, tag: str) -> list[bytes]:
    """`count` instances of 0.53 MB in 12 series (as `orthanc_ingest.corpus`)."""
    side = int((512 * 1024 / 2) ** 0.5)
    return [make_dicom(first + i, rows=side, cols=side, patient=f"{tag}^{i % 3}",
                       study=first // 100 + i % 6, series=first // 10 + i % 12)
            for i in range(count)]


Run = tuple[float, float | None, float | None]


def cached_mb(cache: Path) -> float:
    """MiB of the copies in an objfs cache directory (the unit of `CacheSize`)."""
    return sum(entry.stat().st_size for entry in os.scandir(cache / "data")) / 2**20


def one_run(base: Path, server: MotoServer | None, tree: Path | None, cache_mb: int,
            earlier: list[bytes], timed: list[bytes], key: Path | None) -> Run:
    """(instances/s of the timed set, daemon CPU ms per instance, MiB the cache holds once
    everything is uploaded; the last two None for local disk)."""
    daemon = None
    if server is not None and tree is not None:
        bucket = server.new_bucket(f"full-{base.name}")
        section = server.section(bucket)
        if key is not None:
            section["StorageEncryption"] = {"MasterKey": [1, str(key)]}
        config = {server.section_name: section,
                  "Objfs": {"CacheDirectory": str(base / "cache"), "CacheSize": cache_mb,
                            "UploadConcurrency": UPLOAD_CONCURRENCY}}
        daemon = Objfs(base, config)
        start_from(daemon, tree)
        storage = daemon.mountpoint
    else:
        storage = base / "storage"
        storage.mkdir()
    orthanc = Orthanc(base, storage, name="orthanc").start()
    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(orthanc.upload, earlier))
        cpu = 0.0
        if daemon is not None:
            daemon.wait_uploaded(timeout=900)
            assert daemon.process is not None
            cpu = proc_usage(daemon.process.pid)[1]
        time.sleep(1)  # a pause between the two: a new burst
        start = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(orthanc.upload, timed))
        rate = len(timed) / (time.perf_counter() - start)
        if daemon is None:
            return rate, None, None
        assert daemon.process is not None
        cpu_ms = (proc_usage(daemon.process.pid)[1] - cpu) * 1000 / len(timed)
        daemon.wait_uploaded(timeout=900)
        return rate, cpu_ms, cached_mb(base / "cache")
    finally:
        orthanc.stop()
        if daemon is not None:
            daemon.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--small", type=int, default=300, help="instances in the timed set")
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME=rev:REVISION, run with the full cache too")
    parser.add_argument("--encrypted", action="store_true", help="objfs with A1 encryption")
    args = parser.parse_args()
    ws = workspace("objfs-full-")
    work, made = ws.work, ws.made
    key = None
    if args.encrypted:
        key = work / "master.key"
        codec.write_key_file(key)
    # The full cache holds the earlier set's copies and a bit more (its size computed in MB,
    # CacheSize counts MiB: about 8 % more).
    earlier = instances(0, 2 * args.small, "EARLIER")
    timed = instances(100_000, args.small, "TIMED")
    full_mb = int(sum(map(len, earlier)) / 1e6 * 1.03) + 1
    configs: list[tuple[str, Variant | None, int]] = [
        ("local disk", None, 0), ("objfs, roomy cache", Variant("this", ROOT), ROOMY_MB),
        ("objfs, full cache", Variant("this", ROOT), full_mb)]
    results: dict[str, list[Run]] = {}
    with ws:
        for text in args.variant:
            revision = parse_variant(text, work, made)
            configs.append((f"{revision.name}, full cache", revision, full_mb))
        server = ws.moto()
        print(f"{len(timed)} instances of 0.53 MB timed after {len(earlier)} stored and uploaded "
              f"(full cache: CacheSize {full_mb} MiB, roomy: {ROOMY_MB} MiB); {CLIENTS} clients; "
              f"moto at nice {EMULATOR_NICE}; {args.rounds} rounds"
              f"{'; objfs with A1 encryption' if key else ''}", flush=True)
        run = 0
        for rnd in range(args.rounds):
            for name, variant, cache_mb in configs if rnd % 2 == 0 else configs[::-1]:
                run += 1
                base = work / f"run{run}"
                base.mkdir()
                got = one_run(base, server if variant else None,
                              variant.tree if variant else None, cache_mb, earlier, timed,
                              key)
                results.setdefault(name, []).append(got)
                print(f"round {rnd} {name}: {got[0]:.1f} instances/s{extra(got, cache_mb)}",
                      flush=True)
                shutil.rmtree(base, ignore_errors=True)
    for name, _, cache_mb in configs:
        runs = results[name]
        rate = statistics.median(r for r, _, _ in runs)
        against = paired_ratio((r for r, _, _ in runs),
                               (r for r, _, _ in results["local disk"]))
        medians: Run = (rate, None, None)
        if runs[0][1] is not None:
            medians = (rate, statistics.median(c for _, c, _ in runs if c is not None),
                       statistics.median(m for _, _, m in runs if m is not None))
        print(f"median {name}: {rate:.1f} instances/s = {against:.2f}x local disk"
              f"{extra(medians, cache_mb)}")


def extra(run: Run, cache_mb: int) -> str:
    """The daemon's CPU and the cache's fill, for an objfs run."""
    _, cpu, held = run
    if cpu is None or held is None:
        return ""
    return (f", daemon CPU {cpu:.2f} ms/instance, cache holds {held:.0f} of {cache_mb} MiB "
            f"({held / cache_mb:.0%})")


if __name__ == "__main__":
    main()
