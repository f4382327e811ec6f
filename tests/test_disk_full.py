"""A cache directory on a disk that is too small or fills up (a real tmpfs of 48 MiB under
the cache; needs root, as the whole suite): objfs keeps its copies within what the disk can
hold, answers ENOSPC (never EIO) when the disk is full anyway, loses nothing acknowledged, and
serves on once there is room again."""

from __future__ import annotations

import errno
import os
import uuid as uuid_mod
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import fill, local_config
from tests.support.daemon import Objfs
from tests.support.emulators import MotoServer
from tests.support.faultproxy import FaultProxy
from tests.support.procs import wait_until
from tests.support.rest import rest
from tests.test_mount import att, bucket_files, orthanc_write

MIB = 1024 * 1024


def test_a_cache_size_beyond_the_disk_is_fitted_to_it(
        tmp_path: Path, small_disk: Path, objfs_factory: Callable[..., Objfs]) -> None:
    daemon = objfs_factory(local_config(tmp_path, CacheSize=1024)).start()
    assert "Objfs.CacheSize is 1024 MiB, but the file system of the cache directory" \
        in daemon.text()
    # `objfs status` and GET /status give the budget in use, not CacheSize.
    fitted = daemon.status()["cache_capacity_bytes"]
    assert 16 * MIB < fitted <= 48 * MIB - 16 * MIB
    code, answer = rest(daemon.api, "GET", "/status")
    assert code == 200 and answer["cache_capacity_bytes"] == fitted
    written = {}
    for _ in range(90):  # 90 MiB through a 48 MiB disk
        uuid = str(uuid_mod.uuid4())
        written[uuid] = os.urandom(MIB)
        orthanc_write(att(daemon.mountpoint, uuid), written[uuid])
    for uuid, data in written.items():
        assert att(daemon.mountpoint, uuid, False).read_bytes() == data
    daemon.wait_uploaded()
    assert len(bucket_files(tmp_path / "bucket")) == 90
    assert daemon.stop() == 0
    assert " ERROR " not in daemon.text()


def test_a_full_disk_answers_enospc_and_the_mount_serves_on_once_there_is_room(
        tmp_path: Path, small_disk: Path, objfs_factory: Callable[..., Objfs]) -> None:
    daemon = objfs_factory(local_config(tmp_path, CacheSize=16)).start()
    first = str(uuid_mod.uuid4())
    orthanc_write(att(daemon.mountpoint, first), b"acknowledged before the disk filled")
    daemon.wait_uploaded()  # no upload's commit takes the room freed below
    # Something else fills the cache's disk. `first` stays open: an open copy is never
    # evicted, so no clean copy can make room.
    held = open(att(daemon.mountpoint, first), "rb")
    filler = small_disk / "filler"
    fill(filler)
    refused = []
    for size in (1024, 300 * 1024):
        uuid = str(uuid_mod.uuid4())
        with pytest.raises(OSError) as failed:
            orthanc_write(att(daemon.mountpoint, uuid), os.urandom(size))
        assert failed.value.errno == errno.ENOSPC, failed.value
        refused.append(uuid)
    # With one page free the copy fits, and its row goes to the intent log, whose blocks
    # were written beforehand: acknowledged, although SQLite has no room for the row yet.
    os.truncate(filler, filler.stat().st_size - 4096)
    late = str(uuid_mod.uuid4())
    orthanc_write(att(daemon.mountpoint, late), b"acknowledged on a full disk")
    held.close()
    for uuid in refused:
        wait_until(lambda u=uuid: not att(daemon.mountpoint, u, False).exists(), 10,
                   "the refused attachment gone")
    assert att(daemon.mountpoint, first, False).read_bytes() \
        == b"acknowledged before the disk filled"
    assert "no space left on the local disk" in daemon.text()
    filler.unlink()
    again = str(uuid_mod.uuid4())
    orthanc_write(att(daemon.mountpoint, again), b"room again")
    assert att(daemon.mountpoint, again, False).read_bytes() == b"room again"
    assert att(daemon.mountpoint, late, False).read_bytes() == b"acknowledged on a full disk"
    daemon.wait_uploaded()
    assert {name.split(".")[0] for name in bucket_files(tmp_path / "bucket")} \
        == {first, again, late}
    # Gone again, so that the start below finds the same copies as ever to drop (each one
    # it drops gives the journal room).
    os.unlink(att(daemon.mountpoint, late, False))
    daemon.wait_uploaded()
    assert daemon.process is not None and daemon.process.alive()
    # A stop on a full disk: the final checkpoint may find no room in the journal; that is
    # logged, and the stop is as clean as ever.
    fill(filler)
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.text()
    # Nor can it start again there: it says so, before mounting anything.
    assert "the disk of the cache directory is full" in daemon.refused_start()


def behind_proxy(moto: MotoServer, cache: Path, objfs_factory: Callable[..., Objfs],
                 request: pytest.FixtureRequest, bucket: str) -> tuple[Objfs, FaultProxy, str]:
    """A started daemon on a new moto bucket reached through a fault proxy, its cache (16 MiB)
    in `cache`."""
    proxy = FaultProxy(moto.endpoint)
    request.addfinalizer(proxy.stop)
    moto.new_bucket(bucket)
    config = {"AwsS3Storage": moto.s3_section(bucket, Endpoint=proxy.endpoint),
              "Objfs": {"CacheDirectory": str(cache), "CacheSize": 16}}
    return objfs_factory(config).start(), proxy, bucket


def test_an_upload_the_full_disk_kept_from_being_recorded_goes_through_once_there_is_room(
        tmp_path: Path, small_disk: Path, moto: MotoServer, objfs_factory: Callable[..., Objfs],
        request: pytest.FixtureRequest) -> None:
    # The bucket refuses the upload until the disk is full; then the PUT succeeds, and the
    # journal has no room to record it. The copy stays open (a reader): once uploaded it is
    # clean, and evicting it would make the room (the next test).
    daemon, proxy, bucket = behind_proxy(moto, small_disk, objfs_factory, request, "diskfull")
    daemon.wait_inventory()
    proxy.set("reset")
    uuid = str(uuid_mod.uuid4())
    data = os.urandom(256 * 1024)
    orthanc_write(att(daemon.mountpoint, uuid), data)
    held = open(att(daemon.mountpoint, uuid), "rb")
    request.addfinalizer(held.close)
    filler = small_disk / "filler"
    fill(filler)
    proxy.set("ok")
    wait_until(lambda: f"upload of attachment {uuid}: no space left on the local disk"
               in daemon.text(), 120, "the upload refused by the full disk",
               daemon.process.proc if daemon.process else None, daemon.log)
    assert daemon.journal_stats().pending_uploads == 1
    held.close()
    filler.unlink()
    daemon.wait_uploaded(60)  # tried again after a pause, without a restart
    assert list(moto.sizes(bucket).values()) == [len(data)]
    assert att(daemon.mountpoint, uuid, False).read_bytes() == data
    assert daemon.stop() == 0


def test_an_upload_the_full_disk_kept_from_being_recorded_evicts_clean_copies(
        tmp_path: Path, small_disk: Path, moto: MotoServer, objfs_factory: Callable[..., Objfs],
        request: pytest.FixtureRequest) -> None:
    # As above, with clean copies in the cache: evicting them makes room for the journal's
    # record, and the upload goes through while the disk stays full.
    daemon, proxy, bucket = behind_proxy(moto, small_disk, objfs_factory, request,
                                         "diskfull-evict")
    written = {}
    for _ in range(4):
        uuid = str(uuid_mod.uuid4())
        written[uuid] = os.urandom(MIB)
        orthanc_write(att(daemon.mountpoint, uuid), written[uuid])
    daemon.wait_uploaded()
    proxy.set("reset")
    uuid = str(uuid_mod.uuid4())
    written[uuid] = os.urandom(256 * 1024)
    orthanc_write(att(daemon.mountpoint, uuid), written[uuid])
    fill(small_disk / "filler")
    proxy.set("ok")
    daemon.wait_uploaded(30)  # well before the full-disk pause would have ended twice
    assert daemon.journal_stats().pending_uploads == 0
    assert "evicted" in daemon.text()
    assert f"upload of attachment {uuid}: no space left" not in daemon.text()
    assert sorted(moto.sizes(bucket).values()) == sorted(map(len, written.values()))
    (small_disk / "filler").unlink()
    for uuid, data in written.items():
        assert att(daemon.mountpoint, uuid, False).read_bytes() == data
    assert daemon.stop() == 0


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_clean_copies_make_room_when_something_else_fills_the_disk(
        tmp_path: Path, small_disk: Path, objfs_factory: Callable[..., Objfs],
        request: pytest.FixtureRequest, backend: str) -> None:
    if backend == "s3":  # downloads through the S3 client's own GET path
        moto: MotoServer = request.getfixturevalue("moto")
        bucket = moto.new_bucket("roomy")
        config = {"AwsS3Storage": moto.s3_section(bucket),
                  "Objfs": {"CacheDirectory": str(small_disk), "CacheSize": 16}}
        in_bucket: Callable[[], int] = lambda: len(moto.sizes(bucket))  # noqa: E731
    else:
        config = local_config(tmp_path, CacheSize=16)
        in_bucket = lambda: len(bucket_files(tmp_path / "bucket"))  # noqa: E731
    daemon = objfs_factory(config).start()
    written = {}
    for _ in range(24):  # 24 MiB through a 16 MiB budget: the first copies are evicted
        uuid = str(uuid_mod.uuid4())
        written[uuid] = os.urandom(MIB)
        orthanc_write(att(daemon.mountpoint, uuid), written[uuid])
    daemon.wait_uploaded()
    cold = [uuid for uuid in written if not (small_disk / "data" / uuid).exists()]
    assert len(cold) >= 8
    # The disk room set aside for the journal: it records the evictions of a full disk.
    assert (small_disk / "journal-room").stat().st_blocks * 512 >= MIB
    # Something else fills the disk while the budget still has room: Orthanc's cold reads
    # and writes find room by evicting clean copies, as they would with the budget full.
    filler = small_disk / "filler"
    fill(filler)
    for uuid in cold + [uuid for uuid in written if uuid not in cold]:
        assert att(daemon.mountpoint, uuid, False).read_bytes() == written[uuid]
    again = {}
    for _ in range(4):
        uuid = str(uuid_mod.uuid4())
        again[uuid] = os.urandom(MIB)
        orthanc_write(att(daemon.mountpoint, uuid), again[uuid])
    for uuid, data in again.items():
        assert att(daemon.mountpoint, uuid, False).read_bytes() == data
    assert "the disk of the cache directory" in daemon.text()
    assert "something else uses it" in daemon.text()
    filler.unlink()
    daemon.wait_uploaded()
    assert in_bucket() == 28
    assert daemon.stop() == 0
    assert " ERROR " not in daemon.text()
