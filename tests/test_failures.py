"""The crash policy through a real mount (issue 12, finding 3): a bug in a background task is
logged and the daemon keeps serving; a dead FUSE loop exits non-zero and leaves the mount point
dead (ENOTCONN), never the bare directory; the next `objfs mount` recovers by itself.
Failures are injected with the documented test hooks (`objfs/testhooks.py`)."""

from __future__ import annotations

import errno
import os
import signal
import uuid as uuid_mod
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import local_config
from tests.support.daemon import Objfs
from tests.support.procs import wait_until
from tests.test_mount import att, bucket_files, orthanc_write


def hooks(fail_at: str) -> dict[str, str]:
    return {"OBJFS_TEST_HOOKS": "1", "OBJFS_FAIL_AT": fail_at}


def test_a_dead_fuse_loop_exits_nonzero_and_leaves_the_mount_dead(
        tmp_path: Path, objfs_factory: Callable[..., Objfs]) -> None:
    config = local_config(tmp_path)
    daemon = objfs_factory(config, env=hooks("fuse-loop@3")).start()
    kept = str(uuid_mod.uuid4())
    orthanc_write(att(daemon.mountpoint, kept), b"acknowledged before the loop died")
    assert daemon.process is not None
    code = daemon.process.proc.wait(timeout=60)
    assert code != 0
    assert "objfs cannot go on; leaving" in daemon.text()
    for attempt in (lambda: os.stat(daemon.mountpoint / "ab"),
                    lambda: orthanc_write(att(daemon.mountpoint, str(uuid_mod.uuid4()), False),
                                          b"must not land underneath")):
        with pytest.raises(OSError) as dead:
            attempt()
        assert dead.value.errno == errno.ENOTCONN
    # Started again without the hook: the dead mount is cleared, the journal resumes.
    again = objfs_factory(config, name="again")
    again.mountpoint.rmdir()
    again.mountpoint = daemon.mountpoint
    again.start()
    assert att(again.mountpoint, kept, False).read_bytes() == \
        b"acknowledged before the loop died"
    again.wait_uploaded()
    assert list(bucket_files(tmp_path / "bucket").values()) == \
        [b"acknowledged before the loop died"]
    assert again.stop() == 0


def test_a_failing_background_task_is_restarted_and_the_mount_serves_on(
        tmp_path: Path, objfs_factory: Callable[..., Objfs]) -> None:
    daemon = objfs_factory(local_config(tmp_path), env=hooks("status-reporter")).start()
    wait_until(lambda: "the status reporter failed; restarting it" in daemon.text(), 30,
               "the injected failure", daemon.process.proc if daemon.process else None,
               daemon.log)
    uuid = str(uuid_mod.uuid4())
    orthanc_write(att(daemon.mountpoint, uuid), b"still serving")
    assert att(daemon.mountpoint, uuid, False).read_bytes() == b"still serving"
    assert daemon.process is not None and daemon.process.alive()
    assert daemon.stop() == 0


def test_sigkill_is_not_needed_to_stop_a_daemon_with_a_failing_task(
        tmp_path: Path, objfs_factory: Callable[..., Objfs]) -> None:
    """SIGTERM still drains and exits 0 while a supervised task keeps failing."""
    daemon = objfs_factory(local_config(tmp_path), env=hooks("status-reporter")).start()
    uuid = str(uuid_mod.uuid4())
    orthanc_write(att(daemon.mountpoint, uuid), b"drained at stop")
    assert daemon.process is not None
    daemon.process.proc.send_signal(signal.SIGTERM)
    assert daemon.process.proc.wait(timeout=60) == 0
    assert list(bucket_files(tmp_path / "bucket").values()) == [b"drained at stop"]
