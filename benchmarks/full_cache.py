"""Ingest in a site's steady state: the objfs cache full of clean copies.

Every other benchmark starts from an empty cache, where nothing is evicted. A site that has
run for a while has `CacheSize` full of copies already in the bucket: each new attachment
evicts older ones. Each round, for local disk, objfs with a roomy cache and objfs with a full
one (and each `--variant` revision, full): Orthanc stores a first set of small instances
(about 2x the full cache's size, so that the cache ends full of clean copies once uploaded),
then the second set is timed (4 REST clients), with the daemon's CPU per instance. moto as in
`orthanc_ingest.py`; interleaved rounds, order reversed every other round.

    .venv/bin/python benchmarks/full_cache.py [--rounds 4] [--small 300]
        [--variant before=rev:REVISION]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.ab_revisions import ROOT, Variant, parse_variant, remove_trees, start_from
from benchmarks.orthanc_ingest import CLIENTS, EMULATOR_NICE, UPLOAD_CONCURRENCY, proc_usage
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


def one_run(base: Path, server: MotoServer | None, tree: Path | None, cache_mb: int,
            earlier: list[bytes], timed: list[bytes]) -> tuple[float, float | None]:
    """(instances/s of the timed set, daemon CPU ms per instance or None for local disk)."""
    daemon = None
    if server is not None and tree is not None:
        bucket = server.new_bucket(f"full-{base.name}")
        config = {server.section_name: server.section(bucket),
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
            return rate, None
        assert daemon.process is not None
        return rate, (proc_usage(daemon.process.pid)[1] - cpu) * 1000 / len(timed)
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
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="objfs-full-", dir="/var/tmp"))
    made: list[Path] = []
    server = None
    # The full cache holds the earlier set's copies and a bit more (CacheSize is in MB).
    earlier = instances(0, 2 * args.small, "EARLIER")
    timed = instances(100_000, args.small, "TIMED")
    full_mb = int(sum(map(len, earlier)) / 1e6 * 1.03) + 1
    configs: list[tuple[str, Variant | None, int]] = [
        ("local disk", None, 0), ("objfs, roomy cache", Variant("this", ROOT), ROOMY_MB),
        ("objfs, full cache", Variant("this", ROOT), full_mb)]
    results: dict[str, list[tuple[float, float | None]]] = {}
    try:
        for text in args.variant:
            variant = parse_variant(text, work, made)
            configs.append((f"{variant.name}, full cache", variant, full_mb))
        server = MotoServer(work, nice=EMULATOR_NICE)
        print(f"{len(timed)} instances of 0.53 MB timed after {len(earlier)} stored and uploaded "
              f"(full cache: CacheSize {full_mb} MB, roomy: {ROOMY_MB} MB); {CLIENTS} clients; "
              f"moto at nice {EMULATOR_NICE}; {args.rounds} rounds", flush=True)
        run = 0
        for rnd in range(args.rounds):
            for name, variant, cache_mb in configs if rnd % 2 == 0 else configs[::-1]:
                run += 1
                base = work / f"run{run}"
                base.mkdir()
                got = one_run(base, server if variant else None,
                              variant.tree if variant else None, cache_mb, earlier, timed)
                results.setdefault(name, []).append(got)
                cpu = "" if got[1] is None else f", daemon CPU {got[1]:.2f} ms/instance"
                print(f"round {rnd} {name}: {got[0]:.1f} instances/s{cpu}", flush=True)
                shutil.rmtree(base, ignore_errors=True)
    finally:
        if server is not None:
            server.stop()
        remove_trees(made)
        shutil.rmtree(work, ignore_errors=True)
    local = statistics.median(r for r, _ in results["local disk"])
    for name, _, _ in configs:
        rate = statistics.median(r for r, _ in results[name])
        cpus = [c for _, c in results[name] if c is not None]
        cpu = f", daemon CPU {statistics.median(cpus):.2f} ms/instance" if cpus else ""
        print(f"median {name}: {rate:.1f} instances/s = {rate / local:.2f}x local disk{cpu}")


if __name__ == "__main__":
    main()
