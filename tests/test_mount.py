"""Real mounts: the kernel talks to an objfs daemon running in a subprocess."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from objfs.intentlog import read_intents
from objfs.journal import INTENT_LOG
from tests.conftest import local_config
from tests.support.daemon import Objfs
from tests.support.dicom import make_dicom
from tests.support.emulators import MotoServer
from tests.support.faultproxy import FaultProxy
from tests.support.procs import wait_until

U1 = "0a1b2c3d-4e5f-4a6b-8c7d-0e1f2a3b4c5d"
U2 = "0a1b9999-4e5f-4a6b-8c7d-0e1f2a3b4c5d"
U3 = "ffee0000-0000-4000-8000-000000000001"


def att(mnt: Path, uuid: str, make_dirs: bool = True) -> Path:
    path = mnt / uuid[:2] / uuid[2:4] / uuid
    if make_dirs:
        path.parent.mkdir(parents=True, exist_ok=True)
    return path


def orthanc_write(path: Path, data: bytes, piece: int = 4096) -> None:
    """Write as Orthanc does: O_WRONLY|O_CREAT|O_TRUNC, writes of `piece` bytes, fdatasync,
    close."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        for off in range(0, len(data), piece):
            assert os.write(fd, data[off:off + piece]) == len(data[off:off + piece])
        os.fdatasync(fd)
    finally:
        os.close(fd)


def resident_bytes(path: Path) -> int:
    """How much of `path` the page cache holds (mincore(2); reads nothing, unlike a
    RWF_NOWAIT read, whose miss starts the kernel's read-ahead)."""
    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    size = path.stat().st_size
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as m:
        pages = (size + page - 1) // page
        vec = (ctypes.c_ubyte * pages)()
        address = ctypes.addressof(ctypes.c_char.from_buffer(m))
        if libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        del address
        return min(size, sum(page for v in vec if v & 1))


def bucket_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and ".objfs-tmp" not in p.parts}


@pytest.fixture
def local_mount(tmp_path: Path, objfs_factory: Callable[..., Objfs]) -> Objfs:
    return objfs_factory(local_config(tmp_path)).start()


def test_write_read_unlink_rmdir(local_mount: Objfs, tmp_path: Path) -> None:
    mnt = local_mount.mountpoint
    data = os.urandom(300_000)
    path = att(mnt, U1)
    orthanc_write(path, data)
    assert os.stat(path).st_size == len(data)
    assert path.read_bytes() == data
    dicom = make_dicom(1)
    orthanc_write(att(mnt, U2), dicom)
    local_mount.wait_uploaded()
    assert bucket_files(tmp_path / "bucket") == {f"{U1}.unk": data, f"{U2}.dcm": dicom}
    assert sorted(os.listdir(mnt / "0a" / "1b")) == sorted([U1, U2])
    assert os.listdir(mnt) == ["0a"] and os.listdir(mnt / "0a") == ["1b"]
    with pytest.raises(OSError) as info:
        os.rmdir(mnt / "0a" / "1b")
    assert info.value.errno == errno.ENOTEMPTY
    os.unlink(path)
    os.unlink(att(mnt, U2))
    assert not path.exists()
    os.rmdir(mnt / "0a" / "1b")
    os.rmdir(mnt / "0a")
    assert os.listdir(mnt) == []
    local_mount.wait_uploaded()
    assert bucket_files(tmp_path / "bucket") == {}
    assert local_mount.status()["cache_bytes"] == 0


def test_directories_behave(local_mount: Objfs) -> None:
    mnt = local_mount.mountpoint
    # Every Orthanc directory exists (they are virtual): Orthanc never has to create one,
    # so its concurrent uploads cannot race on creating the same directory.
    assert os.path.isdir(mnt / "ab") and os.path.isdir(mnt / "ab" / "cd")
    with pytest.raises(FileExistsError):
        os.mkdir(mnt / "ab")
    os.makedirs(mnt / U1[:2] / U1[2:4], exist_ok=True)  # what Orthanc's create would do
    assert os.listdir(mnt) == []  # listings show what is stored
    orthanc_write(att(mnt, U1), b"x")
    assert os.listdir(mnt) == [U1[:2]] and os.listdir(mnt / U1[:2]) == [U1[2:4]]
    with pytest.raises(OSError) as info:
        os.rmdir(mnt / U1[:2])
    assert info.value.errno == errno.ENOTEMPTY
    os.unlink(att(mnt, U1, False))
    os.rmdir(mnt / U1[:2] / U1[2:4])  # Orthanc's clean-up after a delete: accepted
    os.rmdir(mnt / U1[:2])
    assert os.listdir(mnt) == [] and os.path.isdir(mnt / U1[:2])
    with pytest.raises(FileNotFoundError):
        os.stat(mnt / "ab" / "cd" / "not-an-attachment")


def test_invalid_names_and_immutability(local_mount: Objfs) -> None:
    mnt = local_mount.mountpoint
    path = att(mnt, U1)
    orthanc_write(path, b"first")
    for bad in ["not-a-uuid", U3, U1.upper()]:  # U3 lives under ff/ee, not 0a/1b
        with pytest.raises(PermissionError):
            os.open(path.parent / bad, os.O_WRONLY | os.O_CREAT, 0o666)
    with pytest.raises(PermissionError):
        os.mkdir(path.parent / "sub")
    with pytest.raises(PermissionError):
        os.open(path, os.O_WRONLY)
    with pytest.raises(PermissionError):
        os.open(path, os.O_WRONLY | os.O_TRUNC)
    with pytest.raises(PermissionError):
        os.rename(path, path.parent / U2)
    assert path.read_bytes() == b"first"
    assert "not an Orthanc attachment path" in local_mount.text()


def test_concurrent_readers_and_open_unlink(tmp_path: Path,
                                            objfs_factory: Callable[..., Objfs]) -> None:
    daemon = objfs_factory(local_config(tmp_path)).start()
    data = os.urandom(5 * 1024 * 1024 + 3)
    path = att(daemon.mountpoint, U1)
    orthanc_write(path, data)
    daemon.wait_uploaded()
    daemon.stop()
    shutil.rmtree(tmp_path / "cache")  # cold: every read must come from the bucket
    daemon.start()
    digest = hashlib.sha256(data).hexdigest()
    results: list[str] = []

    def reader() -> None:
        with open(path, "rb") as f:
            results.append(hashlib.sha256(f.read()).hexdigest())

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [digest] * 8
    with open(path, "rb") as held:
        first = held.read(1000)
        os.unlink(path)
        assert not path.exists()
        rest = held.read()
    assert first + rest == data
    daemon.wait_uploaded()
    assert bucket_files(tmp_path / "bucket") == {}



def test_a_name_written_again_while_its_old_file_is_open(local_mount: Objfs) -> None:
    """A file unlinked while open, then its name written again (a copy put back through the
    mount; Orthanc never writes a name twice): the kernel still holds the old inode, and the new
    file must not be taken for it (size, content), while the open handle reads the old file."""
    old, new = os.urandom(300_000), os.urandom(7_000)
    path = att(local_mount.mountpoint, U1)
    orthanc_write(path, old)
    with open(path, "rb") as held:
        first = held.read(1000)
        os.unlink(path)
        local_mount.wait_uploaded()  # its bucket delete done: the name may be written again
        orthanc_write(path, new)
        assert os.stat(path).st_size == len(new)
        assert path.read_bytes() == new
        assert os.fstat(held.fileno()).st_nlink == 0
        assert first + held.read() == old
    assert path.read_bytes() == new

def test_restart_serves_everything_and_status(tmp_path: Path,
                                              objfs_factory: Callable[..., Objfs]) -> None:
    daemon = objfs_factory(local_config(tmp_path)).start()
    files = {f"{i:02x}{i:02x}0000-0000-4000-8000-{i:012x}": os.urandom(1000 * i)
             for i in range(1, 20)}
    for uuid, data in files.items():
        orthanc_write(att(daemon.mountpoint, uuid), data)
    assert daemon.stop() == 0
    assert "all uploads done" in daemon.text()
    # A clean stop leaves the intent log empty: its changes are rows, durably.
    assert read_intents(tmp_path / "cache" / INTENT_LOG) == []
    status = daemon.status()
    assert status["pending_uploads"] == 0 and status["cache_entries"] == len(files)
    daemon.start()
    for uuid, data in files.items():
        assert os.stat(att(daemon.mountpoint, uuid, False)).st_size == len(data)
        assert att(daemon.mountpoint, uuid, False).read_bytes() == data


def test_cache_budget_evicts_clean_copies(tmp_path: Path,
                                          objfs_factory: Callable[..., Objfs]) -> None:
    daemon = objfs_factory(local_config(tmp_path, CacheSize=16)).start()
    files = {f"aa{i:02x}0000-0000-4000-8000-{i:012x}": os.urandom(3 * 1024 * 1024)
             for i in range(12)}  # 36 MiB through a 16 MiB cache
    for uuid, data in files.items():
        orthanc_write(att(daemon.mountpoint, uuid), data)
    for uuid, data in files.items():
        assert att(daemon.mountpoint, uuid, False).read_bytes() == data
    daemon.wait_uploaded()
    status = daemon.status()
    assert status["cache_bytes"] <= 16 * 1024 * 1024
    assert len(bucket_files(tmp_path / "bucket")) == 12
    usage = sum(p.stat().st_size for p in (tmp_path / "cache" / "data").iterdir())
    assert usage <= 16 * 1024 * 1024


def test_full_cache_of_dirty_data_gives_enospc(tmp_path: Path, moto: MotoServer,
                                               objfs_factory: Callable[..., Objfs],
                                               request: pytest.FixtureRequest) -> None:
    # Once objfs knows the bucket (its inventory is complete), the bucket stops answering
    # (every connection reset), so nothing written can become clean.
    proxy = FaultProxy(moto.endpoint)
    request.addfinalizer(proxy.stop)
    config = {"AwsS3Storage": moto.s3_section(moto.new_bucket("unreachable"),
                                              Endpoint=proxy.endpoint),
              "Objfs": {"CacheDirectory": str(tmp_path / "cache"), "CacheSize": 16,
                        "CacheFullTimeout": 1, "ShutdownDrainTimeout": 1}}
    daemon = objfs_factory(config).start()
    daemon.wait_inventory()
    proxy.set("reset")
    first = os.urandom(10 * 1024 * 1024)
    orthanc_write(att(daemon.mountpoint, U1), first)
    with pytest.raises(OSError) as info:
        orthanc_write(att(daemon.mountpoint, U2), os.urandom(10 * 1024 * 1024))
    assert info.value.errno == errno.ENOSPC
    assert att(daemon.mountpoint, U1, False).read_bytes() == first
    assert not att(daemon.mountpoint, U2, False).exists()
    status = daemon.status()
    assert status["pending_uploads"] == 1
    wait_until(lambda: daemon.journal_stats().failing == 1, 30, "failure recorded")
    assert daemon.stop() == 0
    assert "stay journaled" in daemon.text()


def test_passthrough_for_other_names(local_mount: Objfs, tmp_path: Path) -> None:
    mnt = local_mount.mountpoint
    (mnt / "index").write_bytes(b"sqlite")
    with open(mnt / "index", "r+b") as f:
        f.seek(2)
        f.write(b"XX")
        f.truncate(5)
    assert (mnt / "index").read_bytes() == b"sqXXt"
    os.rename(mnt / "index", mnt / "index-wal")
    assert (tmp_path / "cache" / "passthrough" / "index-wal").read_bytes() == b"sqXXt"
    os.mkdir(mnt / "other")
    (mnt / "other" / "f").write_text("x")
    assert sorted(os.listdir(mnt)) == ["index-wal", "other"]
    assert "set IndexDirectory" in local_mount.text()
    assert bucket_files(tmp_path / "bucket") == {}


def test_stale_mount_is_cleared_after_a_crash(tmp_path: Path,
                                              objfs_factory: Callable[..., Objfs]) -> None:
    daemon = objfs_factory(local_config(tmp_path)).start()
    orthanc_write(att(daemon.mountpoint, U1), b"before crash")
    daemon.kill()
    with pytest.raises(OSError) as info:  # a dead daemon fails writes, never hides them
        orthanc_write(att(daemon.mountpoint, U2, False), b"after crash")
    assert info.value.errno == errno.ENOTCONN
    daemon.start()
    assert "clearing the stale mount" in daemon.text()
    assert att(daemon.mountpoint, U1, False).read_bytes() == b"before crash"
    daemon.wait_uploaded()
    assert bucket_files(tmp_path / "bucket") == {f"{U1}.unk": b"before crash"}


def test_a_second_daemon_on_the_same_mount_is_refused(
        tmp_path: Path, objfs_factory: Callable[..., Objfs]) -> None:
    first = objfs_factory(local_config(tmp_path)).start()
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "objfs", "mount", "--config",
                          str(first.config_path), str(first.mountpoint)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "already mounted" in out.stderr


def test_s3_flat_and_legacy_keys(tmp_path: Path, moto: MotoServer, bucket: str,
                                 objfs_factory: Callable[..., Objfs]) -> None:
    dicom = make_dicom(7)
    for structure, root in [("flat", "site"), ("legacy", "old/")]:
        config = {"AwsS3Storage": moto.s3_section(bucket, StorageStructure=structure,
                                                  RootPath=root),
                  "Objfs": {"CacheDirectory": str(tmp_path / f"cache-{structure}")}}
        daemon = objfs_factory(config, name=structure).start()
        orthanc_write(att(daemon.mountpoint, U1), dicom)
        daemon.wait_uploaded()
        assert daemon.stop() == 0
    assert moto.keys(bucket) == {f"site/{U1}.dcm": dicom, f"old/0a/1b/{U1}": dicom}


@pytest.mark.parametrize("cloud", ["s3", "azure", "gcs"])
def test_orthanc_deletes_leave_every_bucket(tmp_path: Path, cloud: str,
                                            request: pytest.FixtureRequest,
                                            objfs_factory: Callable[..., Objfs]) -> None:
    """Orthanc's remove sequence on 40 attachments: every object leaves the bucket, in a few
    batch requests where the store has batch deletes (S3, Azure), one by one elsewhere."""
    from tests.conftest import bucket_name, cloud_server
    from tests.support.metrics import scrape, total

    server = cloud_server(request, cloud)
    bucket = server.new_bucket(bucket_name(request).replace("b", "del", 1))
    daemon = objfs_factory({server.section_name: server.section(bucket),
                            "Objfs": {"CacheDirectory": str(tmp_path / "cache")}}).start()
    uuids = [f"{i:08x}-1234-4abc-8def-{i:012x}" for i in range(1, 41)]
    for i, uuid in enumerate(uuids):
        orthanc_write(att(daemon.mountpoint, uuid), make_dicom(i))
    keep = f"{99:08x}-1234-4abc-8def-{99:012x}"
    orthanc_write(att(daemon.mountpoint, keep), b"kept")
    daemon.wait_uploaded()
    assert len(server.sizes(bucket)) == 41
    for uuid in uuids:  # lstat, unlink, then both directories (ENOTEMPTY is normal)
        path = att(daemon.mountpoint, uuid, False)
        path.lstat()
        path.unlink()
        for directory in (path.parent, path.parent.parent):
            try:
                directory.rmdir()
            except OSError as exc:
                assert exc.errno == errno.ENOTEMPTY
    daemon.wait_uploaded()
    (left,) = server.sizes(bucket)
    assert keep in left
    samples = scrape(daemon)
    batches = total(samples, "objfs_backend_request_duration_seconds_count",
                    operation="delete_batch")
    singles = total(samples, "objfs_backend_request_duration_seconds_count",
                    operation="delete")
    if cloud == "gcs":
        assert batches == 0 and singles >= 40
    else:
        assert 1 <= batches <= 10 and singles == 0


@pytest.mark.parametrize("shared", [False, True], ids=["one-node", "shared-bucket"])
def test_a_store_looks_its_new_name_up_once(
        tmp_path: Path, objfs_factory: Callable[..., Objfs], shared: bool) -> None:
    from tests.support.metrics import scrape, total

    extra = {"SharedBucket": True, "NodeName": "node-a"} if shared else {}
    daemon = objfs_factory(local_config(tmp_path, **extra)).start()
    data = os.urandom(50_000)
    path = att(daemon.mountpoint, U1)
    path.parent.stat()  # the directories are known to the kernel from here on

    def lookups(errno_name: str) -> float:
        return total(scrape(daemon), "objfs_fuse_operations_total", operation="lookup",
                     errno=errno_name)

    before = lookups("ENOENT"), lookups("OK")
    assert not path.exists()  # Orthanc's stat before it creates: ENOENT
    orthanc_write(path, data)  # open(O_CREAT): the kernel looks the name up again unless it kept
    # the absent answer, which only a single node gives (another node may create any name).
    assert lookups("ENOENT") - before[0] == (2 if shared else 1)
    assert lookups("OK") == before[1]
    # The kernel replaced the absent entry with the created file.
    assert path.stat().st_size == len(data) and path.read_bytes() == data
    os.unlink(path)
    assert not path.exists()


def test_a_store_sends_no_setattr_for_the_new_times(local_mount: Objfs) -> None:
    """The writeback cache keeps a new file's times in the kernel; create's reply carries the
    kernel's own clock, so Orthanc's write (one syscall, right after) leaves them as they are
    and its fdatasync and close send no SETATTR. Not every time: the write may fall in the
    next tick (4 ms at HZ=250), and a file system with fine-grained times (ext4, tmpfs) that
    stamps a file meanwhile moves the kernel's clock past the tick's. So: at most a quarter
    of 20 stores send one, in one of three batches (before, every store sent one)."""
    from tests.support.metrics import scrape, total

    def setattrs() -> float:
        return total(scrape(local_mount), "objfs_fuse_operations_total", operation="setattr")

    data = os.urandom(100_000)
    sent = []
    for batch in range(3):
        paths = [att(local_mount.mountpoint, f"0a1b{n:04x}-4e5f-4a6b-8c7d-0e1f2a3b4c{batch:02x}")
                 for n in range(20)]
        before = setattrs()
        for path in paths:
            orthanc_write(path, data, piece=len(data))
        sent.append(setattrs() - before)
        assert all(path.read_bytes() == data for path in paths)
        if sent[-1] <= 5:
            break
    assert min(sent) <= 5, f"SETATTRs per batch of 20 stores: {sent}"


@pytest.mark.parametrize("read_ahead", [1024, 0])
def test_read_ahead_makes_an_uncached_read_one_request(
        tmp_path: Path, objfs_factory: Callable[..., Objfs], read_ahead: int) -> None:
    from objfs.mountinfo import mounts
    from tests.support.metrics import scrape, total

    daemon = objfs_factory(local_config(tmp_path, ReadAhead=read_ahead)).start()
    window = Path(f"/sys/class/bdi/{mounts()[str(daemon.mountpoint)].device}/read_ahead_kb")
    if read_ahead:
        # Raised once the mount answered its first request (the kernel resets it at INIT).
        wait_until(lambda: int(window.read_text()) == 1024, 10, "read-ahead raised")
    else:
        assert int(window.read_text()) < 600
    data = os.urandom(600_000)
    path = att(daemon.mountpoint, U1)
    orthanc_write(path, data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # out of the page cache
        before = total(scrape(daemon), "objfs_fuse_operations_total", operation="read")
        assert os.pread(fd, len(data) + 1, 0) == data
        reads = total(scrape(daemon), "objfs_fuse_operations_total", operation="read") - before
    finally:
        os.close(fd)
    # One request for the whole file; with the kernel's 128 KiB window it takes five.
    assert reads == 1 if read_ahead else reads >= 5


def test_opening_a_cached_attachment_starts_reading_its_copy_from_disk(
        local_mount: Objfs, tmp_path: Path) -> None:
    """The handlers read copies inline; `open` asks the kernel to bring the whole copy into
    the page cache meanwhile, so readers of copies not in the page cache do not wait for
    the disk one after the other."""
    data = os.urandom(2_000_000)
    orthanc_write(att(local_mount.mountpoint, U1), data)
    local_mount.wait_uploaded()  # the upload reads the copy too
    copy = next(p for p in (tmp_path / "cache").rglob(f"{U1}*") if p.is_file())

    def resident() -> bool:
        return resident_bytes(copy) == len(data)

    fd = os.open(copy, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert not resident()
        reader = os.open(att(local_mount.mountpoint, U1, False), os.O_RDONLY)
        try:
            wait_until(resident, 10, "the copy in the page cache after open()")
            assert os.pread(reader, len(data), 0) == data
        finally:
            os.close(reader)
    finally:
        os.close(fd)
