"""Orthanc on objfs while the bucket misbehaves: for each fault mode of the test proxy (every S3
operation answered 503, 500, reset, hang or trickle), the worst foreground latency (ingest and
cold reads through Orthanc), Orthanc's errors during ingest, and the time to drain the upload
queue once the bucket recovers. `ok` is the same run with a healthy bucket.

    .venv/bin/python benchmarks/fault_latency.py [--instances 30] [--reads 4] [--read-timeout 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.daemon import Objfs
from tests.support.dicom import make_dicom
from tests.support.emulators import MotoServer
from tests.support.faultproxy import FaultProxy
from tests.support.orthanc import HttpError, Orthanc

MODES = ["ok", "503", "500", "reset", "hang", "trickle"]


def timed(fn: object) -> tuple[float, bool]:
    start = time.monotonic()
    try:
        fn()  # type: ignore[operator]
        ok = True
    except HttpError:
        ok = False
    return time.monotonic() - start, ok


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, default=30)
    parser.add_argument("--reads", type=int, default=4)
    parser.add_argument("--read-timeout", type=float, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="objfs-faults-"))
    moto = MotoServer(work, nice=10)
    proxy = FaultProxy(moto.endpoint)
    bucket = moto.new_bucket("faults")
    config = {"AwsS3Storage": moto.s3_section(bucket, Endpoint=proxy.endpoint, ConnectTimeout=1,
                                              RequestTimeout=2, MaxRetries=0),
              "Objfs": {"CacheDirectory": str(work / "cache"), "CacheSize": 16,
                        "ReadTimeout": args.read_timeout, "ShutdownDrainTimeout": 5}}
    daemon = Objfs(work, config).start()
    orthanc = Orthanc(work, daemon.mountpoint).start()
    rows = []
    try:
        # Enough 512 KiB instances that the 16 MiB cache holds only part of them.
        base = [orthanc.upload(make_dicom(i, rows=512, cols=512, patient="COLD^BASE"))
                for i in range(80)]
        uuids = {oid: str(orthanc.json("GET", f"/instances/{oid}/attachments/dicom/info")
                          ["Uuid"]) for oid in base}
        daemon.wait_uploaded()
        for round_no, mode in enumerate(MODES):
            cold = [oid for oid in base if not (work / "cache" / "data" / uuids[oid]).exists()]
            proxy.set(mode)
            first = 1000 * (round_no + 1)
            patient = f"F^{mode}"
            ingest = [timed(lambda i=i, p=patient: orthanc.upload(make_dicom(i, patient=p)))
                      for i in range(first, first + args.instances)]
            reads = [timed(lambda oid=oid: orthanc.request("GET", f"/instances/{oid}/file"))
                     for oid in cold[:args.reads]]
            proxy.set("ok")
            start = time.monotonic()
            daemon.wait_uploaded(timeout=600)
            drain = time.monotonic() - start
            rows.append((mode, max(t for t, _ in ingest), sum(not ok for _, ok in ingest),
                         max((t for t, _ in reads), default=0.0),
                         sum(not ok for _, ok in reads), len(reads), drain))
    finally:
        orthanc.stop()
        daemon.stop()
        proxy.stop()
        moto.stop()
    print(f"ReadTimeout {args.read_timeout:g} s; {args.instances} instances ingested and "
          f"{args.reads} cold reads per mode, the fault on every S3 operation")
    print(f"{'mode':<9}{'worst ingest':>14}{'ingest errors':>15}{'worst cold read':>17}"
          f"{'failed reads':>14}{'drain after':>13}")
    for mode, worst_in, errors_in, worst_read, failed, total, drain in rows:
        print(f"{mode:<9}{worst_in:>12.2f} s{errors_in:>15}{worst_read:>15.2f} s"
              f"{failed:>9} of {total}{drain:>11.1f} s")


if __name__ == "__main__":
    main()
