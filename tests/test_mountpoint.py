"""What objfs finds at its mount point (issue 14's fixes): a bind mount of the mount point
itself (Docker's shared storage directory) is mounted over, never refused; a /dev/fuse this
user cannot open is a configuration error that says how to fix it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid as uuid_mod
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import local_config
from tests.support.daemon import Objfs
from tests.support.procs import ROOT
from tests.test_mount import att, orthanc_write


def test_objfs_mounts_over_a_bind_mount_of_its_mount_point(
        tmp_path: Path, objfs_factory: Callable[..., Objfs],
        request: pytest.FixtureRequest) -> None:
    daemon = objfs_factory(local_config(tmp_path))
    subprocess.run(["mount", "--bind", str(daemon.mountpoint), str(daemon.mountpoint)],
                   check=True)
    request.addfinalizer(lambda: subprocess.run(["umount", "-l", str(daemon.mountpoint)],
                                                check=False))
    daemon.start()
    uuid = str(uuid_mod.uuid4())
    orthanc_write(att(daemon.mountpoint, uuid), b"over the bind mount")
    assert att(daemon.mountpoint, uuid, False).read_bytes() == b"over the bind mount"
    assert "already mounted" not in daemon.text()
    assert daemon.stop() == 0


def test_a_fuse_device_this_user_cannot_open_is_explained(tmp_path: Path) -> None:
    """In a private mount namespace /dev/fuse is replaced by a FUSE device node owned by
    another user, mode 0600, and objfs runs as root without capabilities (as a container
    user would): it must exit 2 naming the device and the fix, before mounting anything."""
    config = tmp_path / "objfs.json"
    config.write_text(json.dumps({"Objfs": {"CacheDirectory": str(tmp_path / "cache"),
                                            "LocalBucket": str(tmp_path / "bucket")}}))
    (tmp_path / "mnt").mkdir()
    node = tmp_path / "fuse"
    script = (f"mknod {node} c 10 229 && chown 12345 {node} && chmod 600 {node} && "
              f"mount --bind {node} /dev/fuse && exec setpriv --inh-caps=-all "
              f"--ambient-caps=-all --bounding-set=-all {sys.executable} -m objfs mount "
              f"--config {config} {tmp_path / 'mnt'}")
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           script], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert done.returncode == 2, done.stderr
    assert "/dev/fuse cannot be opened for reading and writing by uid 0" in done.stderr
    assert "--device /dev/fuse" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "cache").exists()  # refused before anything was set up


@pytest.mark.parametrize("inside", ["CacheDirectory", "LocalBucket", "FileSystemDirectory"])
def test_a_directory_objfs_writes_inside_its_mount_point_is_a_configuration_error(
        tmp_path: Path, inside: str) -> None:
    """Each write there would be a request to objfs' own file system, waiting for objfs: the
    daemon hung, then left a dead mount. Refused before anything is created or mounted."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    link = tmp_path / "link"
    link.symlink_to(mountpoint)  # through a symlink: the real path counts
    own = {"CacheDirectory": str(tmp_path / "cache"), "LocalBucket": str(tmp_path / "bucket"),
           inside: str(link / "sub")}
    if inside == "FileSystemDirectory":
        own["HybridMode"] = "WriteToObjectStorage"
    config = tmp_path / "objfs.json"
    config.write_text(json.dumps({"Objfs": own}))
    run = subprocess.run([sys.executable, "-m", "objfs", "mount", "--config", str(config),
                          str(mountpoint)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode == 2, run.stderr
    assert f"Objfs.{inside}: {link / 'sub'} is inside the mount point {mountpoint}" \
        in run.stderr
    assert "Traceback" not in run.stderr
    assert not os.path.ismount(mountpoint)
    assert list(mountpoint.iterdir()) == []
