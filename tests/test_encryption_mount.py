"""Encryption through real mounts: plugin-made objects read, objfs-made objects, rotation."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import local_config
from tests.support.daemon import Objfs
from tests.support.dicom import make_dicom
from tests.support.emulators import MotoServer
from tests.support.orthanc import Orthanc
from tests.support.procs import wait_until
from tests.test_codec import MANIFEST, VECTORS, independent_decrypt, key
from tests.test_mount import att, orthanc_write

K = {n: str(VECTORS / "keys" / f"key{n}.b64") for n in (1, 2, 3)}


def encryption(current: int, *previous: int) -> dict[str, Any]:
    section: dict[str, Any] = {"MasterKey": [current, K[current]]}
    if previous:
        section["PreviousMasterKeys"] = [[p, K[p]] for p in previous]
    return section


def uuid_for(i: int) -> str:
    return f"{i:08x}-1234-4abc-8def-{i:012x}"


def encrypted_config(tmp_path: Path, current: int, *previous: int, **objfs: Any) -> dict:
    config = local_config(tmp_path, **objfs)
    config["Objfs"]["StorageEncryption"] = encryption(current, *previous)
    return config


def test_plugin_encrypted_objects_read_through_the_mount(
        tmp_path: Path, objfs_factory: Callable[..., Objfs]) -> None:
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    expected: dict[str, bytes] = {}
    for i, vector in enumerate(MANIFEST["vectors"]):
        uuid = uuid_for(i + 1)
        ext = [".dcm", ".json", ".dcm.head", ".unk"][i % 4]
        shutil.copy(VECTORS / vector["ciphertext_file"], bucket / f"{uuid}{ext}.enc")
        expected[uuid] = (VECTORS / vector["plaintext_file"]).read_bytes()
    bad: dict[str, str] = {}
    for j, case in enumerate(MANIFEST["negative_cases"]):
        uuid = uuid_for(100 + j)
        shutil.copy(VECTORS / case["ciphertext_file"], bucket / f"{uuid}.dcm.enc")
        bad[uuid] = case["name"]
    daemon = objfs_factory(encrypted_config(tmp_path, 3, 1)).start()  # no key 2: n3 fails
    for uuid, plain in expected.items():
        path = att(daemon.mountpoint, uuid, False)
        assert os.stat(path).st_size == len(plain)
        assert path.read_bytes() == plain
    for uuid in bad:
        with pytest.raises(OSError) as info:
            att(daemon.mountpoint, uuid, False).read_bytes()
        assert info.value.errno == errno.EIO
    log = daemon.text()
    for uuid, reason in [(uuid_for(100), "authentication failed"),
                         (uuid_for(101), "authentication failed"),
                         (uuid_for(102), "unknown master key id 2"),
                         (uuid_for(103), "bad version header")]:
        assert f"{uuid}.dcm.enc: " in log and reason in log, (uuid, reason)
    # The daemon keeps serving after refusing.
    assert att(daemon.mountpoint, uuid_for(1), False).read_bytes() == expected[uuid_for(1)]


def test_legacy_layout_with_plugin_ciphertexts(tmp_path: Path,
                                               objfs_factory: Callable[..., Objfs]) -> None:
    uuid = uuid_for(7)
    target = tmp_path / "bucket" / "root" / uuid[:2] / uuid[2:4] / uuid
    target.parent.mkdir(parents=True)
    shutil.copy(VECTORS / "enc" / "v07_1MiB_plus3.key3.enc", target)
    config = encrypted_config(tmp_path, 3, StorageStructure="legacy", RootPath="root")
    daemon = objfs_factory(config).start()
    path = att(daemon.mountpoint, uuid, False)
    assert os.stat(path).st_size == 1048579  # the header was read: the size is exact
    assert path.read_bytes() == (VECTORS / "plain" / "v07_1MiB_plus3.bin").read_bytes()


def test_objfs_writes_encrypted_objects(tmp_path: Path,
                                        objfs_factory: Callable[..., Objfs]) -> None:
    daemon = objfs_factory(encrypted_config(tmp_path, 3, 1)).start()
    dicom = make_dicom(1)
    other = os.urandom(5000)
    orthanc_write(att(daemon.mountpoint, uuid_for(1)), dicom)
    orthanc_write(att(daemon.mountpoint, uuid_for(2)), other)
    daemon.wait_uploaded()
    blob = (tmp_path / "bucket" / f"{uuid_for(1)}.dcm.enc").read_bytes()
    assert blob[:6] == b"A1" + struct.pack("<I", 3)
    assert independent_decrypt(blob, {3: key(3)}) == dicom
    blob = (tmp_path / "bucket" / f"{uuid_for(2)}.unk.enc").read_bytes()
    assert independent_decrypt(blob, {3: key(3)}) == other
    assert (tmp_path / "cache" / "data" / uuid_for(1)).read_bytes() == dicom  # local: plain
    daemon.stop()
    shutil.rmtree(tmp_path / "cache")
    daemon.start()
    assert att(daemon.mountpoint, uuid_for(1), False).read_bytes() == dicom


def test_unencrypted_objects_need_allow_unencrypted_reads(
        tmp_path: Path, objfs_factory: Callable[..., Objfs]) -> None:
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    (bucket / f"{uuid_for(1)}.dcm").write_bytes(b"plain bytes")
    daemon = objfs_factory(encrypted_config(tmp_path, 3)).start()
    with pytest.raises(OSError) as info:
        att(daemon.mountpoint, uuid_for(1), False).read_bytes()
    assert info.value.errno == errno.EIO
    assert "AllowUnencryptedReads" in daemon.text()
    daemon.stop()
    daemon.config_path.write_text(daemon.config_path.read_text().replace(
        '"CacheSize"', '"AllowUnencryptedReads": true, "CacheSize"'))
    daemon.start()
    assert att(daemon.mountpoint, uuid_for(1), False).read_bytes() == b"plain bytes"


def key_ids(bucket: Path) -> dict[str, int]:
    return {p.name: struct.unpack("<I", p.read_bytes()[2:6])[0] for p in bucket.iterdir()
            if p.is_file()}


def rekey(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "objfs", "rekey", "--config", str(config),
                           *extra], capture_output=True, text=True, timeout=600)


def test_key_rotation_and_rekey(tmp_path: Path, objfs_factory: Callable[..., Objfs]) -> None:
    files = {uuid_for(i): os.urandom(20_000 + i) for i in range(1, 21)}
    old = objfs_factory(encrypted_config(tmp_path, 1), name="key1").start()
    for uuid, data in files.items():
        orthanc_write(att(old.mountpoint, uuid), data)
    assert old.stop() == 0
    bucket = tmp_path / "bucket"
    assert set(key_ids(bucket).values()) == {1}

    def all_read(daemon: Objfs) -> None:
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)
        daemon.start()
        for uuid, data in files.items():
            assert att(daemon.mountpoint, uuid, False).read_bytes() == data
        daemon.stop()

    rotated = objfs_factory(encrypted_config(tmp_path, 3, 1), name="key3-and-1")
    all_read(rotated)
    dry = rekey(rotated.config_path, "--dry-run")
    assert dry.returncode == 0 and "to rewrite 20" in dry.stdout
    assert set(key_ids(bucket).values()) == {1}
    done = rekey(rotated.config_path)
    assert done.returncode == 0, done.stderr
    assert "rewritten 20, failed 0" in done.stdout
    assert set(key_ids(bucket).values()) == {3}
    assert len(key_ids(bucket)) == 20
    again = rekey(rotated.config_path)
    assert "rewritten 0" in again.stdout and "already current 20" in again.stdout
    all_read(objfs_factory(encrypted_config(tmp_path, 3), name="key3-only"))


def test_rekey_interrupted_by_kill_9_resumes(tmp_path: Path,
                                            objfs_factory: Callable[..., Objfs]) -> None:
    files = {uuid_for(i): os.urandom(2_000_000 + i) for i in range(1, 41)}
    writer = objfs_factory(encrypted_config(tmp_path, 1), name="key1").start()
    for uuid, data in files.items():
        orthanc_write(att(writer.mountpoint, uuid), data)
    assert writer.stop() == 0
    bucket = tmp_path / "bucket"
    rotated = objfs_factory(encrypted_config(tmp_path, 3, 1), name="rotated")
    proc = subprocess.Popen([sys.executable, "-m", "objfs", "rekey", "--config",
                             str(rotated.config_path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_until(lambda: 3 in key_ids(bucket).values(), 120, "rekey to make progress")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ids = key_ids(bucket)
    assert 1 in ids.values(), "the kill came too late to interrupt anything"
    done = rekey(rotated.config_path)
    assert done.returncode == 0, done.stderr
    ids = key_ids(bucket)
    assert set(ids.values()) == {3} and len(ids) == len(files)
    assert not (bucket / ".objfs-rekey").exists() or not any((bucket / ".objfs-rekey")
                                                               .iterdir())
    reader = objfs_factory(encrypted_config(tmp_path, 3), name="key3-only")
    reader.start()
    for uuid, data in files.items():
        got = att(reader.mountpoint, uuid, False).read_bytes()
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


@pytest.mark.slow
def test_2gib_file_with_bounded_memory(tmp_path: Path,
                                       objfs_factory: Callable[..., Objfs]) -> None:
    daemon = objfs_factory(encrypted_config(tmp_path, 3, CacheSize=8192)).start()
    path = att(daemon.mountpoint, uuid_for(1))
    block = os.urandom(1024 * 1024)
    size = 2 * 1024 * 1024 * 1024 + 5
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for i in range(2048):
            chunk = struct.pack("<I", i) + block[4:]
            f.write(chunk)
            digest.update(chunk)
        f.write(b"tail!")
        digest.update(b"tail!")
    daemon.wait_uploaded(timeout=600)
    assert (tmp_path / "bucket" / f"{uuid_for(1)}.unk.enc").stat().st_size == size + 86
    daemon.stop()
    shutil.rmtree(tmp_path / "cache")  # the read must download and decrypt all 2 GiB
    daemon.start()
    check = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * 1024 * 1024):
            check.update(chunk)
    assert check.hexdigest() == digest.hexdigest()
    assert daemon.process is not None
    status = Path(f"/proc/{daemon.process.pid}/status").read_text()
    peak_kb = next(int(x.split()[1]) for x in status.splitlines() if x.startswith("VmHWM"))
    assert peak_kb < 150 * 1024, f"peak RSS {peak_kb // 1024} MB"


@pytest.mark.orthanc
def test_orthanc_with_encryption_on_s3(tmp_path: Path, moto: MotoServer, bucket: str,
                                       objfs_factory: Callable[..., Objfs]) -> None:
    config = {"AwsS3Storage": {**moto.s3_section(bucket), "StorageEncryption": encryption(3)},
              "Objfs": {"CacheDirectory": str(tmp_path / "cache")}}
    daemon = objfs_factory(config).start()
    orthanc = Orthanc(tmp_path, daemon.mountpoint).start()
    try:
        files = [make_dicom(i, patient="ENC^RYPTED") for i in range(30)]
        ids = [orthanc.upload(d) for d in files]
        daemon.wait_uploaded()
        objects = moto.keys(bucket)
        assert len(objects) == 30 and all(k.endswith(".dcm.enc") for k in objects)
        assert sorted(independent_decrypt(b, {3: key(3)}) for b in objects.values()) == \
            sorted(files)
        orthanc.stop()
        daemon.stop()
        shutil.rmtree(tmp_path / "cache")
        daemon.start()
        orthanc.start()
        for oid, dicom in zip(ids, files, strict=True):
            assert orthanc.request("GET", f"/instances/{oid}/file") == dicom
        orthanc.request("DELETE", f"/patients/{orthanc.json('GET', '/patients')[0]}")
        daemon.wait_uploaded()
        wait_until(lambda: moto.keys(bucket) == {}, 30, "bucket to empty")
    finally:
        orthanc.stop()


def test_encrypt_local_cache(tmp_path: Path, objfs_factory: Callable[..., Objfs]) -> None:
    config = encrypted_config(tmp_path, 3, EncryptLocalCache=True)
    daemon = objfs_factory(config).start()
    files = {uuid_for(1): make_dicom(1), uuid_for(2): os.urandom(300_000)}
    for uuid, data in files.items():
        orthanc_write(att(daemon.mountpoint, uuid), data)
    data_dir = tmp_path / "cache" / "data"

    def local_copies_are_sealed() -> None:
        for uuid, data in files.items():
            blob = (data_dir / uuid).read_bytes()
            assert blob[:2] == b"A1" and independent_decrypt(blob, {3: key(3)}) == data

    local_copies_are_sealed()  # sealed as soon as close() returned
    for uuid, data in files.items():
        assert att(daemon.mountpoint, uuid, False).read_bytes() == data
    daemon.wait_uploaded()
    assert (tmp_path / "bucket" / f"{uuid_for(1)}.dcm.enc").read_bytes() == \
        (data_dir / uuid_for(1)).read_bytes()  # the sealed copy is what was uploaded
    daemon.stop()
    shutil.rmtree(tmp_path / "cache")
    daemon.start()
    for uuid, data in files.items():
        assert att(daemon.mountpoint, uuid, False).read_bytes() == data
    local_copies_are_sealed()  # downloads are kept sealed too
    assert not list((tmp_path / "cache" / "tmp").iterdir())  # plaintext only in O_TMPFILEs
    # A damaged local copy is dropped and fetched again; the reader sees good bytes.
    daemon.stop()
    copy = data_dir / uuid_for(2)
    before = copy.stat()
    damaged = bytearray(copy.read_bytes())
    damaged[100] ^= 1
    copy.write_bytes(bytes(damaged))
    # Bit rot keeps the file's times: a copy modified after the last cache checkpoint would
    # be dropped at start instead (objfs.cache, CHECKPOINT_SECONDS).
    os.utime(copy, ns=(before.st_atime_ns, before.st_mtime_ns))
    daemon.start()
    assert att(daemon.mountpoint, uuid_for(2), False).read_bytes() == files[uuid_for(2)]
    assert "local copy is damaged" in daemon.text()


def test_encrypt_local_cache_needs_encryption(tmp_path: Path) -> None:
    from objfs.config import settings_from_tree
    from objfs.errors import ConfigError

    with pytest.raises(ConfigError, match="EncryptLocalCache: needs StorageEncryption"):
        settings_from_tree(local_config(tmp_path, EncryptLocalCache=True))
