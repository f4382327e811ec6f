"""A viewer opening a cold series in a site's steady state: the objfs cache full of other
studies' copies.

`cold_series.py` starts from an empty cache. At a site that has run for a while, `CacheSize` is
full of clean copies, and the copies a series read (and its prefetch) brings in must take the
place of others. Each round, for each variant: Orthanc stores a series (100 instances of 512
KiB) and then 300 other instances into a cache just big enough for those 300; the series'
copies are then removed (what eviction leaves: the journal knows them, the bucket has them),
the daemon restarted and the page cache dropped; the series is read one instance after the
other (one client) with SeriesPrefetch on. Printed: the seconds the read took, and how many
of the other 300 copies the cache still holds afterwards (each of the series' copies needs
the room of one: a cache that evicts only what it needs keeps 200 of them).

    .venv/bin/python benchmarks/series_in_full_cache.py [--rounds 3]
        [--variant before=rev:REVISION]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.ab_revisions import ROOT, Variant, parse_variant, start_from, workspace
from benchmarks.orthanc_ingest import CLIENTS, EMULATOR_NICE, drop_page_cache
from tests.support.daemon import Objfs
from tests.support.dicom import make_dicom
from tests.support.emulators import MotoServer
from tests.support.orthanc import Orthanc

SERIES = 100
OTHERS = 300
SIDE = int((512 * 1024 / 2) ** 0.5)


def attachment(orthanc: Orthanc, instance: str) -> str:
    return str(orthanc.json("GET", f"/instances/{instance}/attachments/dicom/info")["Uuid"])


def one_run(base: Path, server: MotoServer, variant: Variant, series: list[bytes],
            others: list[bytes]) -> tuple[float, int, float]:
    """(seconds to read the series, copies of the others still cached, MiB cached)."""
    cache = base / "cache"
    cache_mib = int(sum(map(len, others)) / 2**20 * 1.05) + 1
    orthanc = Orthanc(base, base / "objfs-mnt", name="orthanc")
    bucket = server.new_bucket(f"series-{base.name}")
    config = {server.section_name: server.section(bucket),
              "Objfs": {"CacheDirectory": str(cache), "CacheSize": cache_mib,
                        "SeriesPrefetch": True, "Orthanc": {"Url": orthanc.url}}}
    daemon = Objfs(base, config)
    start_from(daemon, variant.tree)
    try:
        orthanc.start()
        with ThreadPoolExecutor(CLIENTS) as pool:
            series_ids = list(pool.map(orthanc.upload, series))
            other_ids = list(pool.map(orthanc.upload, others))
        order = [i["ID"] for i in orthanc.json(
            "GET", f"/series/{orthanc.json('GET', f'/instances/{series_ids[0]}/series')['ID']}"
                   "/instances")]
        series_copies = [attachment(orthanc, i) for i in series_ids]
        other_copies = [attachment(orthanc, i) for i in other_ids]
        daemon.wait_uploaded(timeout=600)
        orthanc.stop()
        daemon.stop()
        for uuid in series_copies:  # evicted: the journal keeps them, start-up notes it
            (cache / "data" / uuid).unlink(missing_ok=True)
        drop_page_cache()
        start_from(daemon, variant.tree)
        orthanc.start()
        start = time.perf_counter()
        for instance in order:
            orthanc.request("GET", f"/instances/{instance}/file")
        took = time.perf_counter() - start
        time.sleep(2)  # prefetches still running end
        kept = sum((cache / "data" / uuid).exists() for uuid in other_copies)
        held = sum(p.stat().st_size for p in (cache / "data").iterdir()) / 2**20
        return took, kept, held
    finally:
        orthanc.stop()
        daemon.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME=rev:REVISION, run beside this tree")
    args = parser.parse_args()
    ws = workspace("objfs-series-full-")
    work, made = ws.work, ws.made
    variants = [Variant("this", ROOT)]
    results: dict[str, list[tuple[float, int, float]]] = {}
    with ws:
        variants += [parse_variant(text, work, made) for text in args.variant]
        server = ws.moto()
        print(f"a series of {SERIES} instances of 512 KiB read one after the other, cold, in a "
              f"cache full of {OTHERS} other copies; SeriesPrefetch on; moto at nice "
              f"{EMULATOR_NICE}; {args.rounds} rounds", flush=True)
        run = 0
        for rnd in range(args.rounds):
            for variant in variants if rnd % 2 == 0 else variants[::-1]:
                run += 1
                base = work / f"run{run}"
                base.mkdir()
                series = [make_dicom(run * 10_000 + i, rows=SIDE, cols=SIDE, patient="VIEWED",
                                     study=run, series=1) for i in range(SERIES)]
                others = [make_dicom(run * 10_000 + 1000 + i, rows=SIDE, cols=SIDE,
                                     patient=f"OTHER{i % 10}", study=run, series=2 + i % 10)
                          for i in range(OTHERS)]
                got = one_run(base, server, variant, series, others)
                results.setdefault(variant.name, []).append(got)
                print(f"round {rnd} {variant.name}: series read in {got[0]:.2f} s; "
                      f"{got[1]} of {OTHERS} other copies kept; cache holds {got[2]:.0f} MiB",
                      flush=True)
                shutil.rmtree(base, ignore_errors=True)
    for variant in variants:
        runs = results[variant.name]
        print(f"median {variant.name}: series read in "
              f"{statistics.median(t for t, _, _ in runs):.2f} s; "
              f"{statistics.median(k for _, k, _ in runs):.0f} of {OTHERS} other copies kept; "
              f"cache holds {statistics.median(h for _, _, h in runs):.0f} MiB")


if __name__ == "__main__":
    main()
