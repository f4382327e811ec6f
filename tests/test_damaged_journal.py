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

from tests.conftest import local_config
from tests.support.daemon import Objfs
from tests.support.emulators import MotoServer
from tests.support.faultproxy import FaultProxy
from tests.support.procs import wait_until
from tests.support.rest import rest
from tests.test_mount import att, orthanc_write
from tests.test_systemd import NotifyListener


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
    assert f"the journal {journal} is damaged" in daemon.refused_start()
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


def damage_pages(journal: Path) -> None:
    """Make every b-tree page of `journal` but the first unreadable to SQLite (its page-type
    byte set to one no page has): what a failing disk or a stray write leaves."""
    size = journal.stat().st_size
    with open(journal, "r+b") as damaged:
        for offset in range(PAGE, size, PAGE):
            damaged.seek(offset)
            damaged.write(b"\x77")


PAGE = 4096


def test_a_journal_damaged_while_running_is_reported_and_checked_at_the_next_start(
        tmp_path: Path, objfs_factory: Callable[..., Objfs],
        request: pytest.FixtureRequest) -> None:
    daemon = objfs_factory(local_config(tmp_path, ShutdownDrainTimeout=1)).start()
    data = {str(uuid_mod.uuid4()): os.urandom(2048) for _ in range(300)}
    for uuid, content in data.items():
        orthanc_write(att(daemon.mountpoint, uuid), content)
    daemon.wait_uploaded()
    assert daemon.stop() == 0
    journal = tmp_path / "cache" / "journal.sqlite"
    assert not journal.with_name("journal.sqlite-wal").exists()
    sound = journal.read_bytes()
    assert len(sound) > 4 * PAGE

    # Damaged at once, perhaps before the daemon reported readiness: it reports it all the
    # same, and its status lines (at readiness, then every 5 s) say what is wrong.
    notify = NotifyListener(tmp_path / "notify.sock", daemon.mountpoint)
    request.addfinalizer(notify.close)
    daemon.env["NOTIFY_SOCKET"] = notify.path
    daemon.start()
    damage_pages(journal)
    notify.wait_for("READY")
    wait_until(lambda: any(f"the journal {journal} is damaged" in line
                           for line in notify.statuses()), 30, "a STATUS line with the damage")
    # A write commits through another connection, so the reads after it go to the file.
    failed = []
    try:
        orthanc_write(att(daemon.mountpoint, str(uuid_mod.uuid4())), b"after the damage")
    except OSError as exc:
        failed.append(exc.errno)
    for uuid in list(data)[:50]:
        try:
            att(daemon.mountpoint, uuid, False).read_bytes()
        except OSError as exc:
            failed.append(exc.errno)
    assert failed and set(failed) == {errno.EIO}, failed
    code, answer = rest(daemon.api, "GET", "/health")
    assert code == 503 and any(f"the journal {journal} is damaged" in problem
                               for problem in answer["Problems"]), answer
    for endpoint in ("/status", "/metrics"):  # nothing to count: 503 with the reason
        code, answer = rest(daemon.api, "GET", endpoint)
        assert code == 503 and f"the journal {journal} is damaged" in answer["Message"], answer
    assert daemon.text().count(" CRITICAL ") == 1
    mark = journal.with_name("journal-damaged")
    assert f"the journal {journal} is damaged" in mark.read_text()
    status = subprocess.run([sys.executable, "-m", "objfs", "status", "--config",
                             str(daemon.config_path)], capture_output=True, text=True, timeout=60)
    assert status.returncode == 1 and f"the journal {journal} is damaged" in status.stderr
    assert "requests that need its damaged part fail with EIO. Stop objfs" in daemon.text()
    # A stop unmounts as ever, without the drain, and exits 1 with the way out.
    assert daemon.stop() == 1
    assert not os.path.ismount(daemon.mountpoint)
    assert "Traceback" not in daemon.text()

    # The next start checks the whole file and refuses it, saying what SQLite found.
    assert f"the journal {journal} is damaged" in daemon.refused_start()

    # Put back in good order (here: the copy from before the damage), it is used again.
    for name in ("journal.sqlite-wal", "journal.sqlite-shm"):
        journal.with_name(name).unlink(missing_ok=True)
    journal.write_bytes(sound)
    daemon.start()
    assert "finds it sound now: using it" in daemon.text()
    assert not mark.exists()
    for uuid, content in data.items():
        assert att(daemon.mountpoint, uuid, False).read_bytes() == content
    code, answer = rest(daemon.api, "GET", "/health")
    assert code == 200, answer
    assert daemon.stop() == 0
