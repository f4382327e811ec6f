"""HybridMode: ingest into the file-system tier, then move-storage both ways, on moto.

Prints: ingest with WriteToFileSystem vs Orthanc on plain local disk (same run); the move to
object storage and back in MB/s and attachments/s (resolution through Orthanc included),
against the raw SDK making the essential requests one file at a time (a PUT and the read-back
GET going up, a GET coming down); the daemon's peak RSS.

    .venv/bin/python benchmarks/hybrid_moves.py [--count 200] [--kb 512]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.orthanc_ingest import CLIENTS, EMULATOR_NICE, proc_usage
from tests.support.daemon import Objfs
from tests.support.dicom import make_dicom
from tests.support.emulators import MotoServer
from tests.support.orthanc import Orthanc
from tests.support.rest import rest


def ingest(orthanc: Orthanc, files: list[bytes]) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(orthanc.upload, files))
    return len(files) / (time.perf_counter() - start)


def raw_serial(server: MotoServer, bucket: str, work: Path, files: list[bytes]) -> tuple[
        float, float]:
    """Seconds for serial PUT+GET of every file, and for serial GETs alone."""
    paths = []
    for i, data in enumerate(files):
        paths.append(work / f"raw-{i}")
        paths[-1].write_bytes(data)
    start = time.perf_counter()
    for p in paths:
        server.raw_put(bucket, p.name, p)
        server.raw_get(bucket, p.name)
    up = time.perf_counter() - start
    start = time.perf_counter()
    for p in paths:
        server.raw_get(bucket, p.name)
    return up, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--kb", type=int, default=512)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="objfs-bench-hybrid-"))
    side = int((args.kb * 1024 / 2) ** 0.5)
    files = [make_dicom(i, rows=side, cols=side, patient=f"BENCH^{i % 4}", study=i % 8)
             for i in range(args.count)]
    total_mb = sum(map(len, files)) / 1e6
    print(f"corpus: {len(files)} instances of {len(files[0]) / 1e6:.2f} MB ({total_mb:.0f} MB), "
          f"{CLIENTS} REST clients, moto at nice {EMULATOR_NICE}")

    (work / "local").mkdir()
    local = Orthanc(work / "local", work / "local-storage").start()
    try:
        local_rate = ingest(local, files)
    finally:
        local.stop()

    server = MotoServer(work, nice=EMULATOR_NICE)
    try:
        bucket = server.new_bucket("hybrid-bench")
        orthanc = Orthanc(work, work / "objfs-mnt")
        config = {"AwsS3Storage": server.s3_section(bucket, HybridMode="WriteToFileSystem"),
                  "Objfs": {"CacheDirectory": str(work / "cache"), "CacheSize": 4096,
                            "FileSystemDirectory": str(work / "fs-tier"),
                            "Orthanc": {"Url": orthanc.url}}}
        daemon = Objfs(work, config).start()
        orthanc.start()
        try:
            fs_rate = ingest(orthanc, files)
            patients = orthanc.json("GET", "/patients")
            timings = {}
            for target in ("object-storage", "file-system"):
                start = time.perf_counter()
                status, answer = rest(daemon.api, "POST", "/move-storage",
                                      {"Resources": patients, "TargetStorage": target},
                                      timeout=3600)
                assert status == 200, answer
                timings[target] = time.perf_counter() - start
            assert daemon.process is not None
            rss, cpu = proc_usage(daemon.process.pid)
        finally:
            orthanc.stop()
            daemon.stop()
        raw_up, raw_down = raw_serial(server, server.new_bucket("hybrid-raw"), work, files)
    finally:
        server.stop()

    print(f"{'':34}{'objfs':>12}{'reference':>12}{'ratio':>8}")
    print(f"{'ingest, WriteToFileSystem (inst/s)':34}{fs_rate:12.1f}{local_rate:12.1f}"
          f"{fs_rate / local_rate:7.2f}x   (reference: Orthanc on local disk)")
    up, down = timings["object-storage"], timings["file-system"]
    print(f"{'move to object storage (MB/s)':34}{total_mb / up:12.1f}{total_mb / raw_up:12.1f}"
          f"{raw_up / up:7.2f}x   (reference: serial raw PUT+GET; {len(files) / up:.0f} att/s)")
    print(f"{'move to file system (MB/s)':34}{total_mb / down:12.1f}{total_mb / raw_down:12.1f}"
          f"{raw_down / down:7.2f}x   (reference: serial raw GET; {len(files) / down:.0f} att/s)")
    print(f"daemon peak RSS {rss:.0f} MB, CPU {cpu:.1f} s")


if __name__ == "__main__":
    main()
