"""A viewer opening a cold series: every instance read one after the other through Orthanc's
REST API, from an empty objfs cache (page cache dropped), with SeriesPrefetch on and off,
against Orthanc on local disk, in interleaved rounds.

    .venv/bin/python benchmarks/cold_series.py [--instances 100] [--kb 512] [--rounds 2]
        [--release bookworm|trixie|sid]

`--release` runs that Debian release's Orthanc (from the test chroots, scripts/chroots.sh) for
every configuration, local disk included: from 1.12.5 on, one `/tools/find` answer names the
series' attachments, where 1.10 takes a request per instance.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.orthanc_ingest import (
    EMULATOR_NICE,
    cpu_shares,
    cpu_snapshot,
    drop_page_cache,
    paired_ratio,
)
from objfs.sidecar.prefetch import PARALLEL
from tests.support.daemon import Objfs
from tests.support.dicom import make_dicom
from tests.support.emulators import MotoServer
from tests.support.orthanc import RELEASES, Orthanc

# Whose CPU time `one_run` counts during the read, in the order printed.
PROCESSES = ("server", "daemon", "orthanc", "client")


def read_series(orthanc: Orthanc, order: list[str]) -> float:
    start = time.perf_counter()
    for instance in order:
        orthanc.request("GET", f"/instances/{instance}/file")
    return time.perf_counter() - start


def one_run(work: Path, name: str, corpus: list[bytes], moto: MotoServer | None,
            objfs: dict[str, Any] | None, evicted: bool,
            release: str) -> tuple[float, float | None, dict[str, float]]:
    """Seconds to read the series once everything is cold; for objfs the seconds the SDK
    alone takes to GET the same objects, PARALLEL at a time (the floor for prefetch); and the
    CPU seconds each process on the machine used during the read (`PROCESSES`)."""
    base = work / name
    base.mkdir()
    daemon = None
    if moto is not None and objfs is not None:
        orthanc = Orthanc(base, base / "objfs-mnt", release=release)
        bucket = moto.new_bucket(name)
        config = {"AwsS3Storage": moto.s3_section(bucket),
                  "Objfs": {"CacheDirectory": str(base / "cache"), "CacheSize": 4096,
                            "Orthanc": {"Url": orthanc.url}, **objfs}}
        daemon = Objfs(base, config).start()
        assert daemon.mountpoint == base / "objfs-mnt"
    else:
        (base / "storage").mkdir()
        orthanc = Orthanc(base, base / "storage", release=release)
    try:
        orthanc.start()
        ids = [orthanc.upload(d) for d in corpus]
        series = orthanc.json("GET", f"/instances/{ids[0]}/series")["ID"]
        order = [i["ID"] for i in orthanc.json("GET", f"/series/{series}/instances")]
        orthanc.stop()
        if daemon is not None:
            daemon.wait_uploaded(600)
            daemon.stop()
            # A wiped cache (a new node, a lost disk), or only the copies gone and the
            # journal kept (what evictions leave: the usual way a series goes cold).
            shutil.rmtree(base / "cache" / "data" if evicted else base / "cache")
        drop_page_cache()
        if daemon is not None:
            daemon.start()
        orthanc.start()
        pids = {"server": moto.process.proc.pid if moto is not None and moto.process else None,
                "daemon": daemon.process.proc.pid if daemon is not None and daemon.process
                else None,
                "orthanc": orthanc.process.proc.pid if orthanc.process else None}
        before = cpu_snapshot(pids)
        took = read_series(orthanc, order)
        cpu = {who: ms / 1e3 for who, ms in cpu_shares(before, pids, 1).items()}
        if moto is None:
            return took, None, cpu
        keys = list(moto.sizes(bucket))
        start = time.perf_counter()
        with ThreadPoolExecutor(PARALLEL) as pool:
            list(pool.map(lambda k: moto.raw_get(bucket, k), keys))
        return took, time.perf_counter() - start, cpu
    finally:
        orthanc.stop()
        if daemon is not None:
            daemon.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--kb", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--release", choices=sorted(RELEASES), default="bookworm")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="objfs-series-"))
    side = int((args.kb * 1024 / 2) ** 0.5)
    moto = MotoServer(work, nice=EMULATOR_NICE)
    configs: list[tuple[str, dict[str, Any] | None, bool]] = [
        ("local disk", None, False),
        ("objfs, prefetch off", {"SeriesPrefetch": False}, False),
        ("objfs, prefetch on", {"SeriesPrefetch": True}, False),
        ("evicted, prefetch off", {"SeriesPrefetch": False}, True),
        ("evicted, prefetch on", {"SeriesPrefetch": True}, True)]
    times: dict[str, list[float]] = {name: [] for name, _, _ in configs}
    cpus: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in configs}
    floor: list[float] = []
    try:
        for r in range(args.rounds):
            for c, (name, objfs, evicted) in enumerate(configs):
                corpus = [make_dicom((r * 10 + c) * 10_000 + i, rows=side, cols=side,
                                     patient="SERIES", study=r * 10 + c, series=1)
                          for i in range(args.instances)]
                took, raw, cpu = one_run(work, f"series-r{r}c{c}", corpus,
                                         moto if objfs is not None else None, objfs, evicted,
                                         args.release)
                times[name].append(took)
                cpus[name].append(cpu)
                if raw is not None:
                    floor.append(raw)
    finally:
        moto.stop()
        shutil.rmtree(work, ignore_errors=True)
    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"cold series: {args.instances} instances of {args.kb} KiB read one after the other "
          f"(one client) from Orthanc {RELEASES[args.release]} ({args.release}), page cache "
          "dropped; objfs cache wiped, or only its copies gone "
          f"(evicted: the journal kept); moto at nice {EMULATOR_NICE}; "
          f"median of {args.rounds} interleaved rounds; each ratio is the median of the "
          "rounds' own")

    def faster(name: str, than: str) -> float:
        """How many times faster `name` read than `than` (each round ran both)."""
        return paired_ratio(times[than], times[name])

    for name, _, _ in configs:
        print(f"  {name:<22} {med[name]:>6.2f} s  {args.instances / med[name]:>7.1f} inst/s  "
              f"{faster(name, 'local disk'):>5.2f}x local disk")
    print(f"  prefetch on vs off: {faster('objfs, prefetch on', 'objfs, prefetch off'):.2f}x "
          f"faster (cache wiped), "
          f"{faster('evicted, prefetch on', 'evicted, prefetch off'):.2f}x (copies evicted)")
    print(f"  CPU during the read, ms per instance (median): S3 stand-in, objfs daemon, "
          f"Orthanc, this client; their sum spread over the machine's {os.cpu_count()} CPUs "
          "is the least time the read can take")
    for name, _, _ in configs:
        per = {who: statistics.median(c[who] for c in cpus[name]) * 1e3 / args.instances
               for who in PROCESSES}
        total = sum(per.values())
        bound = total * args.instances / 1e3 / (os.cpu_count() or 1)
        print(f"  {name:<22} " + "  ".join(f"{per[who]:4.2f}" for who in PROCESSES)
              + f"  = {total:4.2f} ms: at least {bound:.2f} s, took {med[name]:.2f} s")
    raw = statistics.median(floor)
    print(f"  the SDK alone, GETs of the same {args.instances} objects {PARALLEL} at a time: "
          f"{raw:.2f} s (the floor for any prefetch against this server; prefetch on is "
          f"{med['objfs, prefetch on'] / raw:.2f}x that)")


if __name__ == "__main__":
    main()
