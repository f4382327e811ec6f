"""`objfs audit` against a real Orthanc on objfs over moto: planted orphans and objects deleted
behind objfs' back are reported exactly, while writes keep flowing during the audit."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid as uuid_mod
from collections.abc import Callable
from pathlib import Path

from tests.support.daemon import Objfs
from tests.support.dicom import make_dicom
from tests.support.emulators import MotoServer
from tests.support.orthanc import Orthanc

GRACE = 3


def run_audit(daemon: Objfs, *extra: str) -> tuple[int, dict[str, object], str]:
    done = subprocess.run([sys.executable, "-m", "objfs", "audit", "--json", "--grace",
                           str(GRACE), "--config", str(daemon.config_path), *extra],
                          capture_output=True, text=True, timeout=300)
    return done.returncode, json.loads(done.stdout), done.stderr


def test_audit_reports_exactly_the_missing_and_the_orphans(
        tmp_path: Path, moto: MotoServer, bucket: str,
        objfs_factory: Callable[..., Objfs]) -> None:
    orthanc = Orthanc(tmp_path, tmp_path / "objfs-mnt")
    config = {"AwsS3Storage": moto.s3_section(bucket),
              "Objfs": {"CacheDirectory": str(tmp_path / "cache"),
                        "Orthanc": {"Url": orthanc.url}}}
    daemon = objfs_factory(config).start()
    orthanc.start()
    sent = {orthanc.upload(make_dicom(i, patient="AUDIT^ME")): i for i in range(10)}
    uuids = {oid: str(orthanc.json("GET", f"/instances/{oid}/attachments/dicom/info")["Uuid"])
             for oid in sent}
    daemon.wait_uploaded()

    orphans = [str(uuid_mod.uuid4()) for _ in range(3)]
    for uuid in orphans:
        moto.client().put_object(Bucket=bucket, Key=f"{uuid}.dcm", Body=b"nobody's")
    lost = list(uuids.values())[:2]
    for uuid in lost:
        moto.client().delete_object(Bucket=bucket, Key=f"{uuid}.dcm")
    time.sleep(GRACE + 1)  # the planted objects are now older than the grace period

    stop = threading.Event()
    in_flight: list[str] = []

    def keep_writing() -> None:
        i = 100
        while not stop.is_set() and i < 400:
            in_flight.append(orthanc.upload(make_dicom(i, patient="IN^FLIGHT")))
            i += 1

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        code, report, stderr = run_audit(daemon)
        assert code == 1, stderr
        assert sorted(report["missing"]) == sorted(lost)  # type: ignore[arg-type]
        found = sorted(o["uuid"] for o in report["orphans"])  # type: ignore[attr-defined,union-attr]
        assert found == sorted(orphans)
        assert "attachments referenced by Orthanc" in stderr or "audit:" in stderr

        code, report, stderr = run_audit(daemon, "--delete-orphans")
        assert code == 1, stderr
        assert sorted(report["deleted_keys"]) == \
            sorted(f"{u}.dcm" for u in orphans)  # type: ignore[arg-type]
    finally:
        stop.set()
        writer.join(120)
    assert in_flight, "writes kept flowing during the audit"
    keys = moto.keys(bucket)
    assert not any(key.split(".")[0] in orphans for key in keys)
    daemon.wait_uploaded()
    code, report, _ = run_audit(daemon)
    assert code == 1 and sorted(report["missing"]) == sorted(lost)  # type: ignore[arg-type]
    assert report["orphans"] == []
    orthanc.stop()
