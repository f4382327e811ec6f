"""SIGKILL at named points of the write, upload, eviction, download and delete paths (issue 12;
the test hooks of `objfs/testhooks.py`), then a restart: every acknowledged attachment is in
the bucket and reads identical, no deleted one comes back, and the cache accounting equals the
bytes on disk."""

from __future__ import annotations

import os
import re
import signal
import uuid as uuid_mod
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import local_config
from tests.support.daemon import Objfs
from tests.support.emulators import MotoServer
from tests.support.orthanc import Orthanc
from tests.support.rest import rest
from tests.test_hybrid import check_reads, fs_files, hybrid_config, ingest, wait_job
from tests.test_mount import att, bucket_files, orthanc_write

POINTS = ["after-data-fsync", "after-journal-commit", "after-put", "mid-eviction",
          "mid-download", "after-copy-dropped", "after-delete-journaled", "after-object-delete"]
MIB = 1024 * 1024


def workload(mount: Path, acked: dict[str, bytes], deleted: set[str],
             in_flight: dict[str, bytes | None]) -> None:
    """Write 24 attachments of 1 MiB (past a 16 MiB cache), delete every fourth, then read
    everything back; stops at the first failure (the daemon died). What was being written or
    deleted at that moment goes to `in_flight` (uuid -> data, or None for a delete)."""
    try:
        for i in range(24):
            uuid, data = str(uuid_mod.uuid4()), os.urandom(MIB)
            in_flight[uuid] = data
            orthanc_write(att(mount, uuid), data)
            acked[uuid] = data
            del in_flight[uuid]
            if i % 4 == 3:
                victim = next(u for u in acked if u not in deleted)
                in_flight[victim] = None
                os.unlink(att(mount, victim, False))
                deleted.add(victim)
                del in_flight[victim]
        for uuid in list(acked):
            if uuid not in deleted:
                assert att(mount, uuid, False).read_bytes() == acked[uuid]
    except OSError:
        return


def cache_bytes(api: str) -> int:
    status, text = rest(api, "GET", "/metrics")
    assert status == 200
    found = re.search(r"^objfs_cache_bytes (\S+)$", str(text), re.M)
    assert found is not None
    return int(float(found.group(1)))


@pytest.mark.parametrize("point", POINTS)
def test_sigkill_at_a_named_point_loses_nothing_acknowledged(
        tmp_path: Path, objfs_factory: Callable[..., Objfs], point: str) -> None:
    config = local_config(tmp_path, CacheSize=16)
    crashing = objfs_factory(config, env={"OBJFS_TEST_HOOKS": "1", "OBJFS_CRASH_AT": point})
    crashing.start()
    acked: dict[str, bytes] = {}
    deleted: set[str] = set()
    in_flight: dict[str, bytes | None] = {}
    workload(crashing.mountpoint, acked, deleted, in_flight)
    assert crashing.process is not None
    assert crashing.process.proc.wait(timeout=60) == -signal.SIGKILL, \
        f"the daemon never reached {point}"
    assert f"test hook: crashing at {point}" in crashing.text()

    daemon = objfs_factory(config, name="restarted")
    daemon.mountpoint.rmdir()
    daemon.mountpoint = crashing.mountpoint
    daemon.start()
    daemon.wait_uploaded()
    # A write or delete the crash interrupted may have happened or not; never half.
    for uuid, data in in_flight.items():
        path = att(daemon.mountpoint, uuid, False)
        if path.exists():
            assert path.read_bytes() == (acked[uuid] if data is None else data)
    live = {u: d for u, d in acked.items() if u not in deleted and u not in in_flight}
    for uuid, data in live.items():
        assert att(daemon.mountpoint, uuid, False).read_bytes() == data
    for uuid in deleted:
        assert not att(daemon.mountpoint, uuid, False).exists()
    in_bucket = {name.split(".")[0]: data
                 for name, data in bucket_files(tmp_path / "bucket").items()}
    for uuid, data in live.items():
        assert in_bucket.get(uuid) == data, uuid
    assert not set(in_bucket) & deleted
    for uuid in set(in_bucket) & set(in_flight):
        data = in_flight[uuid]
        assert in_bucket[uuid] == (acked[uuid] if data is None else data)
    on_disk = sum(p.stat().st_size for p in (tmp_path / "cache" / "data").iterdir())
    assert cache_bytes(daemon.api) == on_disk
    assert daemon.stop() == 0


@pytest.mark.parametrize(("point", "mode", "target"), [
    ("mid-move-to-bucket", "WriteToFileSystem", "object-storage"),
    ("mid-move-to-fs", "WriteToObjectStorage", "file-system"),
])
def test_sigkill_in_the_middle_of_a_tier_move(
        tmp_path: Path, moto: MotoServer, bucket: str, objfs_factory: Callable[..., Objfs],
        point: str, mode: str, target: str) -> None:
    """A move killed between its copy and its record: after a restart the interrupted job
    runs again, every attachment ends in exactly one tier and reads identical."""
    fs_dir = tmp_path / "fs-tier"
    orthanc = Orthanc(tmp_path, tmp_path / "objfs-mnt")
    config = hybrid_config(moto, bucket, tmp_path, mode, orthanc, fs_dir)
    daemon = objfs_factory(config, env={"OBJFS_TEST_HOOKS": "1", "OBJFS_CRASH_AT": point})
    daemon.start()
    orthanc.start()
    try:
        sent = ingest(orthanc, 10, studies=1)
        daemon.wait_uploaded()
        status, answer = rest(daemon.api, "POST", "/move-storage", {
            "Resources": orthanc.json("GET", "/patients"), "TargetStorage": target,
            "Asynchronous": True})
        assert status == 200, answer
        assert daemon.process is not None
        assert daemon.process.proc.wait(timeout=120) == -signal.SIGKILL
        assert f"test hook: crashing at {point}" in daemon.text()
        daemon.env.pop("OBJFS_CRASH_AT")
        daemon.start()
        job = wait_job(daemon, answer["Path"])
        assert job["State"] == "Success", job
        daemon.wait_uploaded()
        in_fs = set(fs_files(fs_dir))
        in_bucket = {key.split(".")[0] for key in moto.keys(bucket)}
        assert not in_fs & in_bucket
        assert len(in_fs | in_bucket) == 10
        assert (in_bucket if target == "object-storage" else in_fs) == in_fs | in_bucket
        check_reads(orthanc, sent)
    finally:
        orthanc.stop()
