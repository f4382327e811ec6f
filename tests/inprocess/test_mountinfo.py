"""objfs.mountinfo against mountinfo text and a /sys/class/bdi tree written here."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from objfs.mountinfo import mounts, set_read_ahead

MOUNTINFO = (
    "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
    "90 22 0:51 / /srv/orthanc\\040storage rw,nosuid shared:40 - fuse.objfs objfs rw\n"
    "91 22 0:52 / /mnt/stacked rw - ext4 /dev/sdb1 rw\n"
    "95 91 0:60 / /mnt/stacked rw,nosuid - fuse.objfs objfs rw\n"
)


@pytest.fixture
def mountinfo(tmp_path: Path) -> Path:
    path = tmp_path / "mountinfo"
    path.write_text(MOUNTINFO)
    return path


def test_mounts_unescape_paths_and_the_top_mount_wins(mountinfo: Path) -> None:
    found = mounts(mountinfo)
    assert found["/srv/orthanc storage"] == ("0:51", "fuse.objfs")
    assert found["/mnt/stacked"] == ("0:60", "fuse.objfs")
    assert found["/"].fstype == "ext4"


def test_read_ahead_is_written_for_the_mounts_device(mountinfo: Path, tmp_path: Path) -> None:
    bdi = tmp_path / "bdi"
    for device in ("0:51", "0:52", "0:60"):
        (bdi / device).mkdir(parents=True)
        (bdi / device / "read_ahead_kb").write_text("128\n")
    assert set_read_ahead(Path("/mnt/stacked"), 1024, mountinfo, bdi)
    assert (bdi / "0:60" / "read_ahead_kb").read_text() == "1024\n"
    assert (bdi / "0:52" / "read_ahead_kb").read_text() == "128\n"  # the covered mount
    assert set_read_ahead(Path("/srv/orthanc storage"), 512, mountinfo, bdi)
    assert (bdi / "0:51" / "read_ahead_kb").read_text() == "512\n"


def test_read_ahead_that_cannot_be_set_is_reported_not_raised(
        mountinfo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "objfs.mountinfo")
    # No such device entry (as with /sys missing or read-only in a container).
    assert not set_read_ahead(Path("/mnt/stacked"), 1024, mountinfo, tmp_path / "no-bdi")
    assert "left at the kernel's default" in caplog.text and "Objfs.ReadAhead" in caplog.text
    assert not set_read_ahead(Path("/not/mounted"), 1024, mountinfo, tmp_path)
    assert "/not/mounted is not in" in caplog.text
    assert not set_read_ahead(Path("/x"), 1024, tmp_path / "no-mountinfo", tmp_path)
