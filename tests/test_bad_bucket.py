"""Orthanc on objfs while the bucket misbehaves (issue 12): a fault-injecting proxy between
objfs and moto answers 503, hangs, trickles or resets; what Orthanc and the operator see.

All with Debian's Orthanc on the mount (`MaximumStorageCacheSize` 0, so reads reach objfs),
`ReadTimeout` 5 s, and a 16 MiB cache that keeps only some of the 512 KiB instances."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Objfs
from tests.support.dicom import make_dicom
from tests.support.emulators import MotoServer
from tests.support.faultproxy import FaultProxy
from tests.support.orthanc import HttpError, Orthanc
from tests.support.procs import wait_until
from tests.support.rest import rest

READ_TIMEOUT = 5


@pytest.fixture
def proxy(moto: MotoServer) -> Iterator[FaultProxy]:
    server = FaultProxy(moto.endpoint)
    yield server
    server.stop()


def config(moto: MotoServer, proxy: FaultProxy, bucket: str, cache: Path,
           request_timeout: float = 2, **objfs: Any) -> dict[str, Any]:
    return {"AwsS3Storage": moto.s3_section(bucket, Endpoint=proxy.endpoint, ConnectTimeout=1,
                                            RequestTimeout=request_timeout, MaxRetries=0),
            "Objfs": {"CacheDirectory": str(cache), "CacheSize": 16,
                      "ReadTimeout": READ_TIMEOUT, "ShutdownDrainTimeout": 5, **objfs}}


def big_instances(first: int, count: int, patient: str) -> list[bytes]:
    return [make_dicom(i, rows=512, cols=512, patient=patient, series=i // 10)
            for i in range(first, first + count)]


def attachment(orthanc: Orthanc, instance: str) -> str:
    return str(orthanc.json("GET", f"/instances/{instance}/attachments/dicom/info")["Uuid"])


def path_of(mount: Path, uuid: str) -> Path:
    return mount / uuid[:2] / uuid[2:4] / uuid


def bucket_uuids(moto: MotoServer, bucket: str) -> dict[str, bytes]:
    return {key.split(".")[0]: data for key, data in moto.keys(bucket).items()}


def seeded(objfs: Objfs, orthanc: Orthanc, count: int,
           patient: str) -> tuple[dict[str, bytes], dict[str, str]]:
    """`count` 512 KiB instances ingested and uploaded, then Orthanc and objfs stopped:
    instance -> bytes, and instance -> attachment uuid."""
    sent = {orthanc.upload(d): d for d in big_instances(0, count, patient)}
    uuids = {oid: attachment(orthanc, oid) for oid in sent}
    objfs.wait_uploaded()
    orthanc.stop()
    assert objfs.stop() == 0
    return sent, uuids


def timed_failure(orthanc: Orthanc, instance: str) -> float:
    """Seconds until GET /file fails (it must fail: never 200 with wrong bytes)."""
    start = time.monotonic()
    with pytest.raises(HttpError) as failed:
        orthanc.request("GET", f"/instances/{instance}/file", timeout=60)
    assert failed.value.status >= 400
    return time.monotonic() - start


def evicted(daemon_cache: Path, uuids: dict[str, str]) -> list[str]:
    return [oid for oid, uuid in uuids.items() if not (daemon_cache / "data" / uuid).exists()]


def test_restart_while_the_bucket_answers_503(
        tmp_path: Path, moto: MotoServer, proxy: FaultProxy,
        objfs_factory: Callable[..., Objfs], request: pytest.FixtureRequest) -> None:
    """(a) A normal restart with the bucket throttling: objfs mounts, existing attachments
    are never ENOENT, cold reads fail within ReadTimeout + 1 s, ingest and deletes go on, and
    once the bucket answers it holds exactly the live attachments."""
    bucket = moto.new_bucket("throttled")
    cache = tmp_path / "cache"
    daemon = objfs_factory(config(moto, proxy, bucket, cache)).start()
    orthanc = Orthanc(tmp_path, daemon.mountpoint).start()
    request.addfinalizer(orthanc.stop)
    sent, uuids = seeded(daemon, orthanc, 60, "THROTTLED^BUCKET")

    proxy.set("503")
    daemon.start()
    assert "the bucket is unreachable" in daemon.text()
    orthanc.start()
    for uuid in uuids.values():
        os.stat(path_of(daemon.mountpoint, uuid))  # from the journal: never ENOENT
    cold = evicted(cache, uuids)
    assert len(cold) >= 20, "the 16 MiB cache should have evicted half the copies"
    warm = [oid for oid in sent if oid not in cold]
    for oid in warm:  # the cache serves on while the bucket is down
        assert orthanc.request("GET", f"/instances/{oid}/file") == sent[oid]
    for oid in cold[:3]:
        # Orthanc reports any failed open as 404 "Inexistent file": never 200 with zeros.
        assert timed_failure(orthanc, oid) <= READ_TIMEOUT + 1

    new = {orthanc.upload(d): d for d in big_instances(100, 20, "WHILE^THROTTLED")}
    assert len(new) == 20
    deleted = list(new)[:5]
    for oid in deleted:
        orthanc.request("DELETE", f"/instances/{oid}")
    live = {**sent, **{oid: d for oid, d in new.items() if oid not in deleted}}
    live_uuids = {**uuids, **{oid: attachment(orthanc, oid) for oid in live if oid in new}}
    wait_until(lambda: daemon.status()["failing_uploads"] > 0, 30, "objfs status to show "
               "the failing uploads")
    wait_until(lambda: daemon.status()["bucket_failing_seconds"] is not None, 30,
               "objfs status to say the bucket does not answer")
    assert "SlowDown" in str(daemon.status()["bucket_error"])
    health, _ = rest(daemon.api, "GET", "/health", timeout=30)
    assert health == 503

    proxy.set("ok")
    daemon.wait_uploaded(timeout=180)
    wait_until(lambda: daemon.status()["bucket_failing_seconds"] is None, 30,
               "objfs status to say the bucket answers again")
    in_bucket = bucket_uuids(moto, bucket)
    assert set(in_bucket) == set(live_uuids.values())
    for oid, dicom in live.items():
        assert in_bucket[live_uuids[oid]] == dicom
        assert orthanc.request("GET", f"/instances/{oid}/file") == dicom
    orthanc.stop()


def test_first_start_on_an_empty_cache_while_the_bucket_answers_503(
        tmp_path: Path, moto: MotoServer, proxy: FaultProxy,
        objfs_factory: Callable[..., Objfs], request: pytest.FixtureRequest) -> None:
    """(a') A lost cache volume: objfs cannot tell a new name from an existing one until the
    bucket answers, so it answers EIO — never ENOENT — and recovers by itself."""
    bucket = moto.new_bucket("first-start")
    first = objfs_factory(config(moto, proxy, bucket, tmp_path / "cache-a")).start()
    orthanc = Orthanc(tmp_path, first.mountpoint).start()
    request.addfinalizer(orthanc.stop)
    sent, uuids = seeded(first, orthanc, 12, "FIRST^START")

    proxy.set("503")
    second = objfs_factory(config(moto, proxy, bucket, tmp_path / "cache-b"), name="second")
    second.mountpoint.rmdir()
    second.mountpoint = first.mountpoint
    second.start()
    orthanc.start()
    for uuid in list(uuids.values())[:3]:
        start = time.monotonic()
        with pytest.raises(OSError) as failed:
            os.stat(path_of(second.mountpoint, uuid))
        assert failed.value.errno == errno.EIO  # never ENOENT
        assert time.monotonic() - start <= READ_TIMEOUT + 1
    oid = next(iter(sent))
    assert timed_failure(orthanc, oid) <= 3 * (READ_TIMEOUT + 1)  # a stat or two, then open

    proxy.set("ok")
    deadline = time.monotonic() + 60
    while True:
        try:
            for oid, dicom in sent.items():
                assert orthanc.request("GET", f"/instances/{oid}/file") == dicom
            break
        except HttpError:
            assert time.monotonic() < deadline, "objfs did not recover by itself"
            time.sleep(1)
    orthanc.stop()


@pytest.mark.parametrize("mode", ["hang", "trickle", "reset", "500"])
def test_cold_reads_end_within_the_deadline_then_recover(
        tmp_path: Path, moto: MotoServer, proxy: FaultProxy,
        objfs_factory: Callable[..., Objfs], mode: str,
        request: pytest.FixtureRequest) -> None:
    """(b) Whatever the bucket does with a GET, Orthanc's read ends (non-200) within
    ReadTimeout + 1 s, and reads work again once it behaves."""
    bucket = moto.new_bucket(f"cold-{mode}")
    cache = tmp_path / "cache"
    daemon = objfs_factory(config(moto, proxy, bucket, cache)).start()
    orthanc = Orthanc(tmp_path, daemon.mountpoint).start()
    request.addfinalizer(orthanc.stop)
    sent = {orthanc.upload(d): d for d in big_instances(0, 40, f"COLD^{mode.upper()}")}
    uuids = {oid: attachment(orthanc, oid) for oid in sent}
    daemon.wait_uploaded()
    cold = evicted(cache, uuids)
    assert len(cold) >= 4
    proxy.set(mode, "GET")
    for oid in cold[:2]:
        assert timed_failure(orthanc, oid) <= READ_TIMEOUT + 1
    proxy.set("ok", "GET")
    for oid in cold[:4]:
        assert orthanc.request("GET", f"/instances/{oid}/file") == sent[oid]
    orthanc.stop()


def test_uploads_stuck_in_a_hanging_bucket_do_not_delay_a_cold_read(
        tmp_path: Path, moto: MotoServer, proxy: FaultProxy,
        objfs_factory: Callable[..., Objfs], request: pytest.FixtureRequest) -> None:
    """(c) 16 uploads hang on every connection the background may use; Orthanc's cold read
    of another attachment has slots of its own and is served at once."""
    bucket = moto.new_bucket("stuck-uploads")
    cache = tmp_path / "cache"
    # A long socket timeout: a stuck PUT holds its worker thread for a minute.
    daemon = objfs_factory(config(moto, proxy, bucket, cache, request_timeout=60,
                                  UploadConcurrency=16, CacheSize=64)).start()
    orthanc = Orthanc(tmp_path, daemon.mountpoint).start()
    request.addfinalizer(orthanc.stop)
    old = {orthanc.upload(d): d for d in big_instances(0, 8, "STUCK^OLD")}
    uuids = {oid: attachment(orthanc, oid) for oid in old}
    daemon.wait_uploaded()
    proxy.set("hang", "PUT")
    fresh = [orthanc.upload(d) for d in big_instances(100, 16, "STUCK^NEW")]
    assert len(fresh) == 16
    time.sleep(2)  # Orthanc is idle: every upload worker is now stuck in a PUT
    assert proxy.seen["PUT", "hang"] >= 16
    for uuid in uuids.values():
        (cache / "data" / uuid).unlink()  # as eviction would; the row is fixed on open
    try:
        for oid, dicom in old.items():
            start = time.monotonic()
            assert orthanc.request("GET", f"/instances/{oid}/file") == dicom
            assert time.monotonic() - start <= READ_TIMEOUT + 1
    finally:
        proxy.set("ok")
    daemon.wait_uploaded(timeout=180)
    orthanc.stop()
