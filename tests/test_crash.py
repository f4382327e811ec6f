"""Crash safety: nothing Orthanc was told is stored may be lost."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.daemon import Objfs
from tests.support.dicom import make_dicom
from tests.support.emulators import MotoServer
from tests.support.orthanc import HttpError, Orthanc
from tests.support.procs import wait_until

pytestmark = pytest.mark.orthanc


def _ingest(orthanc: Orthanc, files: list[bytes], acknowledged: dict[str, bytes],
            failures: list[str], stop: threading.Event) -> None:
    def one(dicom: bytes) -> None:
        if stop.is_set():
            return
        try:
            acknowledged[orthanc.upload(dicom)] = dicom
        except (HttpError, OSError) as exc:
            failures.append(str(exc))

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, files))


def test_kill_9_while_orthanc_ingests(tmp_path: Path, moto: MotoServer, bucket: str,
                                      objfs_factory: Callable[..., Objfs]) -> None:
    config = {"AwsS3Storage": moto.s3_section(bucket),
              "Objfs": {"CacheDirectory": str(tmp_path / "cache")}}
    daemon = objfs_factory(config).start()
    orthanc = Orthanc(tmp_path, daemon.mountpoint).start()
    try:
        files = [make_dicom(i, rows=256, cols=256, patient="CRASH^TEST") for i in range(300)]
        acknowledged: dict[str, bytes] = {}
        failures: list[str] = []
        stop = threading.Event()
        worker = threading.Thread(target=_ingest,
                                  args=(orthanc, files, acknowledged, failures, stop))
        worker.start()
        wait_until(lambda: len(acknowledged) >= 60, 120, "first instances")
        daemon.kill()
        time.sleep(1)
        stop.set()
        worker.join(120)
        assert failures, "writes after the crash must fail, not land under the mount point"
        assert len(acknowledged) < len(files)
        daemon.start()  # clears the stale mount, resumes journaled uploads
        assert "clearing the stale mount" in daemon.text()
        daemon.wait_uploaded()
        objects = moto.keys(bucket)
        stored = set(objects.values())
        lost = [oid for oid, dicom in acknowledged.items() if dicom not in stored]
        assert lost == [], f"{len(lost)} acknowledged instances missing from the bucket"
        for oid, dicom in acknowledged.items():
            assert orthanc.request("GET", f"/instances/{oid}/file") == dicom
    finally:
        orthanc.stop()


def test_backend_down_for_30s_mid_ingest(tmp_path: Path,
                                         objfs_factory: Callable[..., Objfs]) -> None:
    moto = MotoServer(tmp_path)  # our own server: it is frozen below
    try:
        bucket = moto.new_bucket("frozen")
        config = {"AwsS3Storage": moto.s3_section(bucket, ConnectTimeout=1, RequestTimeout=2),
                  "Objfs": {"CacheDirectory": str(tmp_path / "cache")}}
        daemon = objfs_factory(config).start()
        orthanc = Orthanc(tmp_path, daemon.mountpoint).start()
        files = [make_dicom(i, patient="FROZEN^BACKEND") for i in range(150)]
        acknowledged: dict[str, bytes] = {}
        failures: list[str] = []
        for dicom in files[:50]:
            acknowledged[orthanc.upload(dicom)] = dicom
        assert moto.process is not None
        os.kill(moto.process.pid, signal.SIGSTOP)  # connections hang, requests time out
        frozen_at = time.monotonic()
        try:
            for dicom in files[50:]:
                acknowledged[orthanc.upload(dicom)] = dicom
            time.sleep(max(0.0, 30 - (time.monotonic() - frozen_at)))
            status = daemon.status()
            assert status["pending_uploads"] > 0 and status["failing_uploads"] > 0
        finally:
            os.kill(moto.process.pid, signal.SIGCONT)
        assert failures == [] and len(acknowledged) == 150
        daemon.wait_uploaded(timeout=180)
        assert sorted(moto.keys(bucket).values()) == sorted(acknowledged.values())
        for oid, dicom in acknowledged.items():
            assert orthanc.request("GET", f"/instances/{oid}/file") == dicom
        orthanc.stop()
    finally:
        moto.stop()
