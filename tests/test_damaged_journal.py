"""A damaged journal: objfs refuses to start on it with a clear reason, and the recovery the
README gives ("A damaged journal") loses nothing that was acknowledged, not even an attachment
that had not reached the bucket."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import uuid as uuid_mod
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.daemon import Objfs
from tests.support.emulators import MotoServer
from tests.support.faultproxy import FaultProxy
from tests.test_mount import att, orthanc_write


def test_a_damaged_journal_stops_the_start_and_the_recovery_loses_nothing(
        tmp_path: Path, moto: MotoServer, objfs_factory: Callable[..., Objfs],
        request: pytest.FixtureRequest) -> None:
    proxy = FaultProxy(moto.endpoint)
    request.addfinalizer(proxy.stop)
    bucket = moto.new_bucket("damaged")
    cache = tmp_path / "cache"
    config = {"AwsS3Storage": moto.s3_section(bucket, Endpoint=proxy.endpoint),
              "Objfs": {"CacheDirectory": str(cache), "ShutdownDrainTimeout": 1}}
    daemon = objfs_factory(config).start()
    uploaded, pending = str(uuid_mod.uuid4()), str(uuid_mod.uuid4())
    data = {uploaded: os.urandom(300_000), pending: os.urandom(200_000)}
    orthanc_write(att(daemon.mountpoint, uploaded), data[uploaded])
    daemon.wait_uploaded()
    proxy.set("reset")  # the bucket gone: `pending` stays only on the local disk
    orthanc_write(att(daemon.mountpoint, pending), data[pending])
    daemon.stop()
    assert daemon.journal_stats().pending_uploads == 1

    journal = cache / "journal.sqlite"
    with open(journal, "r+b") as damaged:
        damaged.write(b"not a database, not any more" * 8)
    start = subprocess.run([sys.executable, "-m", "objfs", "mount", "--config",
                            str(daemon.config_path), str(daemon.mountpoint)],
                           capture_output=True, text=True, timeout=60)
    assert start.returncode == 1, start.stderr
    assert f"the journal {journal} is damaged" in start.stderr
    assert "Traceback" not in start.stderr
    assert not os.path.ismount(daemon.mountpoint)
    status = subprocess.run([sys.executable, "-m", "objfs", "status", "--config",
                             str(daemon.config_path)], capture_output=True, text=True, timeout=60)
    assert status.returncode == 1 and f"the journal {journal} is damaged" in status.stderr
    assert "Traceback" not in status.stderr

    # The README's recovery: the journal's files aside, start, copy lost+found back in.
    aside = tmp_path / "aside"
    aside.mkdir()
    for name in ("journal.sqlite", "journal.sqlite-wal", "journal.sqlite-shm"):
        if (cache / name).exists():
            shutil.move(cache / name, aside / name)
    proxy.set("ok")
    daemon.start()
    assert "a new journal, but 2 local copies" in daemon.text()
    lost = cache / "lost+found"
    assert sorted(p.name for p in lost.iterdir()) == sorted(data)
    assert daemon.status()["lost_and_found_files"] == 2
    daemon.wait_inventory()
    assert att(daemon.mountpoint, uploaded, False).read_bytes() == data[uploaded]
    assert not att(daemon.mountpoint, pending, False).exists()
    for uuid in (uploaded, pending):
        target = att(daemon.mountpoint, uuid)
        if uuid == uploaded:  # the bucket has it: write-once
            with pytest.raises(OSError) as refused:
                orthanc_write(target, (lost / uuid).read_bytes())
            assert refused.value.errno == errno.EPERM
        else:
            shutil.copyfile(lost / uuid, target)
    daemon.wait_uploaded()
    for uuid in data:
        (lost / uuid).unlink()
    assert daemon.status()["lost_and_found_files"] == 0
    assert moto.sizes(bucket)[next(k for k in moto.sizes(bucket) if k.startswith(pending))] \
        == len(data[pending])
    assert daemon.stop() == 0
    # Read back from the bucket alone: a fresh cache directory.
    shutil.rmtree(cache)
    daemon.start()
    for uuid, content in data.items():
        assert att(daemon.mountpoint, uuid, False).read_bytes() == content
    assert daemon.stop() == 0
