"""Many threads reading cached attachments at once: what each FUSE request costs the daemon.

Each round reads a set of small files whose pages the kernel caches, from `--threads` threads
at once for `--seconds`, each read as Orthanc makes it (``stat``, then open, read, close: a
GETATTR, OPEN, FLUSH and RELEASE reach the daemon), on local disk and on objfs (its local
bucket) started from each ``--variant`` revision, the order reversed every other round.
Prints per round and as medians: reads/s, the ratio to local disk, the daemon's CPU per read,
and the share of the FUSE loop's waits that found a request already queued
(``objfs_fuse_request_waits_total``; "-" for a revision without it).

    .venv/bin/python benchmarks/parallel_reads.py [--variant now=rev:HEAD \\
        --variant before=rev:HEAD~1] [--threads 4] [--seconds 3] [--rounds 4] [--files 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.ab_revisions import ROOT, Variant, parse_variant, start_from, workspace
from benchmarks.operations_overhead import create_files
from benchmarks.orthanc_ingest import proc_usage
from tests.support.daemon import Objfs
from tests.support.metrics import scrape, total


def make_files(root: Path, count: int, size: int) -> list[Path]:
    """`count` files in Orthanc's ``ab/cd/uuid`` layout under `root` (`create_files`), each
    read once so that the kernel caches them."""
    create_files(root, count, size)
    files = sorted(root.glob("*/*/*"))
    for path in files:
        path.read_bytes()
    return files


def read_loops(files: list[Path], threads: int, seconds: float) -> float:
    """Reads per second of `threads` threads, each reading `files` in turn (from a different
    start) for `seconds`."""
    counts = [0] * threads
    deadline = time.monotonic() + seconds

    def loop(k: int) -> None:
        n = 0
        while time.monotonic() < deadline:
            path = files[(k * 7 + n) % len(files)]
            os.stat(path)
            with open(path, "rb") as handle:
                handle.read()
            n += 1
        counts[k] = n

    start = time.monotonic()
    workers = [threading.Thread(target=loop, args=(k,)) for k in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(counts) / (time.monotonic() - start)


def waits(daemon: Objfs) -> dict[str, float]:
    samples = scrape(daemon)
    return {outcome: total(samples, "objfs_fuse_request_waits_total", outcome=outcome)
            for outcome in ("ready", "parked")}


def objfs_round(work: Path, variant: Variant, index: int, args: argparse.Namespace
                ) -> tuple[float, float, float | None]:
    """(reads/s, daemon CPU µs per read, share of waits that found a request queued)."""
    base = work / f"run{index}"
    config = {"Objfs": {"LocalBucket": str(base / "bucket"), "CacheDirectory": str(base / "cache"),
                        "CacheSize": 1024}}
    daemon = Objfs(base, config, env=variant.env)
    try:
        start_from(daemon, variant.tree)
        files = make_files(daemon.mountpoint, args.files, args.size)
        time.sleep(1)  # the uploads of the new files are over
        assert daemon.process is not None
        before, cpu = waits(daemon), proc_usage(daemon.process.pid)[1]
        rate = read_loops(files, args.threads, args.seconds)
        used = proc_usage(daemon.process.pid)[1] - cpu
        after = waits(daemon)
        counted = {k: after[k] - before[k] for k in ("ready", "parked")}
        share = (counted["ready"] / sum(counted.values())) if sum(counted.values()) else None
        return rate, used * 1e6 / (rate * args.seconds), share
    finally:
        daemon.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append",
                        help="NAME=rev:REVISION or NAME=env:K=V[,K=V] (default: this tree)")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--files", type=int, default=64)
    parser.add_argument("--size", type=int, default=4096, help="bytes per file")
    args = parser.parse_args()
    ws = workspace("objfs-parallel-")
    with ws:
        variants = ([parse_variant(v, ws.work, ws.made) for v in args.variant] if args.variant
                    else [Variant("objfs", ROOT)])
        local = make_files(ws.work / "local", args.files, args.size)
        print(f"{args.threads} threads, stat + open/read/close of {args.files} cached files of "
              f"{args.size} bytes, {args.seconds:g} s per run; {args.rounds} rounds, order "
              "reversed every other round")
        rates: dict[str, list[float]] = {"local": []}
        cpus: dict[str, list[float]] = {}
        ratios: dict[str, list[float]] = {}
        index = 0
        for rnd in range(args.rounds):
            local_rate = read_loops(local, args.threads, args.seconds)
            rates["local"].append(local_rate)
            print(f"round {rnd} {'local':>10}: {local_rate:8.0f} reads/s")
            for variant in variants if rnd % 2 == 0 else variants[::-1]:
                index += 1
                rate, cpu, share = objfs_round(ws.work, variant, index, args)
                rates.setdefault(variant.name, []).append(rate)
                cpus.setdefault(variant.name, []).append(cpu)
                ratios.setdefault(variant.name, []).append(rate / local_rate)
                queued = "-" if share is None else f"{share:.0%}"
                print(f"round {rnd} {variant.name:>10}: {rate:8.0f} reads/s  "
                      f"{rate / local_rate:.2f}x local  daemon {cpu:6.1f} µs/read  "
                      f"queued {queued}", flush=True)
        print(f"median {'local':>10}: {statistics.median(rates['local']):8.0f} reads/s")
        for variant in variants:
            name = variant.name
            print(f"median {name:>10}: {statistics.median(rates[name]):8.0f} reads/s  "
                  f"{statistics.median(ratios[name]):.2f}x local  daemon "
                  f"{statistics.median(cpus[name]):6.1f} µs/read")


if __name__ == "__main__":
    main()
