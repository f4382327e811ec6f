"""HybridMode and the sidecar: the file-system tier, move-storage jobs, the REST API, the
Orthanc forwarding plugin. Real mounts, the Debian orthanc package, the cloud emulators."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import bucket_name, cloud_server, local_config
from tests.support.daemon import Objfs
from tests.support.dicom import make_dicom
from tests.support.emulators import MotoServer
from tests.support.orthanc import HttpError, Orthanc
from tests.support.procs import ROOT, wait_until
from tests.support.rest import rest
from tests.test_codec import MANIFEST, VECTORS, independent_decrypt, key

PYTHON_PLUGIN = "/usr/share/orthanc/plugins/libOrthancPython.so"
FORWARDER = ROOT / "contrib" / "orthanc" / "objfs_move_storage.py"
KEY1 = str(VECTORS / "keys" / "key1.b64")
KEY3 = str(VECTORS / "keys" / "key3.b64")


def fs_files(root: Path) -> dict[str, Path]:
    """uuid -> path of every attachment file in a file-system tier (Orthanc layout)."""
    found = {}
    for path in root.glob("[0-9a-f][0-9a-f]/[0-9a-f][0-9a-f]/*"):
        found[path.name] = path
    return found


def ingest(orthanc: Orthanc, count: int, studies: int, first: int = 0,
           patient: str = "HYB^RID") -> dict[str, bytes]:
    """Upload `count` instances spread over `studies` studies; instance id -> file bytes."""
    sent = {}
    for i in range(first, first + count):
        dicom = make_dicom(i, rows=48, cols=48, patient=patient, study=i % studies,
                           series=i % studies)
        sent[orthanc.upload(dicom)] = dicom
    return sent


def attachment_uuids(orthanc: Orthanc, level: str, resource: str) -> list[str]:
    """Every attachment uuid under a resource, straight from Orthanc (for the assertions)."""
    collection = {"patient": "patients", "study": "studies", "series": "series"}[level]
    owners = [(collection, resource)]
    owners += [("instances", i["ID"])
               for i in orthanc.json("GET", f"/{collection}/{resource}/instances")]
    if level == "patient":
        studies = orthanc.json("GET", f"/patients/{resource}/studies")
        owners += [("studies", s["ID"]) for s in studies]
    uuids = []
    for owner_collection, owner in owners:
        base = f"/{owner_collection}/{owner}/attachments"
        for number in orthanc.json("GET", base + "?full").values():
            uuids.append(orthanc.json("GET", f"{base}/{number}/info")["Uuid"])
    return uuids


def wait_job(daemon: Objfs, path: str, timeout: float = 180) -> dict[str, Any]:
    answer: dict[str, Any] = {}

    def finished() -> bool:
        status, body = rest(daemon.api, "GET", path)
        assert status == 200, body
        answer.update(body)
        return body["State"] in ("Success", "Failure")

    wait_until(finished, timeout, f"job {path}", poll=0.1)
    return answer


def check_reads(orthanc: Orthanc, sent: dict[str, bytes]) -> None:
    for instance, dicom in sent.items():
        assert orthanc.request("GET", f"/instances/{instance}/file") == dicom, instance


def hybrid_config(server: Any, bucket: str, tmp_path: Path, mode: str, orthanc: Orthanc,
                  fs_dir: Path, **section: Any) -> dict[str, Any]:
    return {server.section_name: server.section(bucket, HybridMode=mode, **section),
            "Objfs": {"CacheDirectory": str(tmp_path / "cache"), "CacheSize": 256,
                      "FileSystemDirectory": str(fs_dir), "Orthanc": {"Url": orthanc.url}}}


@pytest.mark.orthanc
@pytest.mark.parametrize("cloud", ["s3", "azure", "gcs", "s3-encrypted"])
def test_write_to_file_system_and_moves_both_ways(
        cloud: str, tmp_path: Path, request: pytest.FixtureRequest,
        objfs_factory: Callable[..., Objfs]) -> None:
    encrypted = cloud.endswith("-encrypted")
    server = cloud_server(request, cloud.removesuffix("-encrypted"))
    bucket = server.new_bucket(bucket_name(request))
    fs_dir = tmp_path / "fs-tier"
    orthanc = Orthanc(tmp_path, tmp_path / "objfs-mnt", Plugins=[PYTHON_PLUGIN],
                      PythonScript=str(FORWARDER), UserContentType={"objfs-note": 1030})
    extra = {"StorageEncryption": {"MasterKey": [3, KEY3]}} if encrypted else {}
    daemon = objfs_factory(hybrid_config(server, bucket, tmp_path, "WriteToFileSystem",
                                         orthanc, fs_dir, **extra)).start()
    orthanc.config["ObjfsSidecar"] = {"Url": daemon.api}
    orthanc.start()
    try:
        sent = ingest(orthanc, 50, studies=2)
        assert len(fs_files(fs_dir)) == 50
        assert all((p.read_bytes()[:2] == b"A1") == encrypted for p in fs_files(fs_dir).values())
        daemon.wait_uploaded()
        assert server.keys(bucket) == {}
        study_a, study_b = sorted(s for s in orthanc.json("GET", "/studies"))
        orthanc.request("PUT", f"/studies/{study_a}/attachments/objfs-note", b"a study note")
        in_a = attachment_uuids(orthanc, "study", study_a)
        assert len(in_a) == 26  # 25 DICOM files and the study-level note
        for uuid in in_a:
            status, where = rest(daemon.api, "GET", f"/attachments/{uuid}")
            assert status == 200 and "FileSystem" in where and "ObjectStorage" not in where

        # Asynchronous move of one study to object storage, polled to Success.
        status, answer = rest(daemon.api, "POST", "/move-storage", {
            "Resources": [study_a], "TargetStorage": "object-storage", "Asynchronous": True})
        assert status == 200 and answer["Path"] == f"/jobs/{answer['ID']}", answer
        job = wait_job(daemon, answer["Path"])
        assert job["State"] == "Success" and job["Progress"] == 100, job
        assert job["Type"] == "MoveStorage" and job["Content"]["Studies"] == [study_a]
        assert job["Content"]["MovedAttachments"] == 26
        on_disk, in_bucket = fs_files(fs_dir), server.keys(bucket)
        assert len(on_disk) == 25 and len(in_bucket) == 26
        assert all((data[:2] == b"A1") == encrypted for data in in_bucket.values())
        for uuid in in_a:
            assert uuid not in on_disk
            status, where = rest(daemon.api, "GET", f"/attachments/{uuid}")
            assert "FileSystem" not in where and where["ObjectStorage"]["Uploaded"], where
            assert where["ObjectStorage"]["Key"] in in_bucket
        check_reads(orthanc, sent)
        assert orthanc.request("GET", f"/studies/{study_a}/attachments/objfs-note/data") \
            == b"a study note"

        # Back to disk, synchronously, through Orthanc's own port (the forwarding plugin).
        answer = orthanc.json("POST", "/move-storage",
                              {"Resources": [study_a], "TargetStorage": "file-system"})
        assert answer == {"Studies": [study_a]}
        assert len(fs_files(fs_dir)) == 51 and server.keys(bucket) == {}
        for uuid in in_a:
            status, where = rest(daemon.api, "GET", f"/attachments/{uuid}")
            assert "FileSystem" in where and "ObjectStorage" not in where, where
        check_reads(orthanc, sent)
        # Moving again skips what is already there.
        answer = orthanc.json("POST", "/move-storage",
                              {"Resources": [study_b, study_a], "TargetStorage": "file-system"})
        assert answer == {"Studies": [study_b, study_a]}
        status, jobs = rest(daemon.api, "GET", "/jobs?expand")
        assert jobs[-1]["Content"]["SkippedAttachments"] == 51

        # The plugin forwards errors as they are.
        with pytest.raises(HttpError) as info:
            orthanc.request("GET", "/move-storage")
        assert info.value.status == 405
        with pytest.raises(HttpError) as info:
            orthanc.request("POST", "/move-storage", b'{"Resources": ["x"]}')
        assert info.value.status == 400

        # Deleting through Orthanc removes the file-system copies.
        orthanc.request("DELETE", f"/studies/{study_a}")
        assert len(fs_files(fs_dir)) == 25
    finally:
        orthanc.stop()


@pytest.mark.orthanc
def test_migration_from_a_plain_storage_directory(
        tmp_path: Path, moto: MotoServer, bucket: str,
        objfs_factory: Callable[..., Objfs]) -> None:
    plain = tmp_path / "plain-storage"
    first = Orthanc(tmp_path, plain).start()
    try:
        old = ingest(first, 30, studies=3)
    finally:
        first.stop()
    assert len(fs_files(plain)) == 30

    orthanc = Orthanc(tmp_path, tmp_path / "objfs-mnt")  # the same index directory
    config = hybrid_config(moto, bucket, tmp_path, "Disabled", orthanc, plain,
                       MigrationFromFileSystemEnabled=True)  # the deprecated spelling
    daemon = objfs_factory(config).start()
    assert "MigrationFromFileSystemEnabled is deprecated" in daemon.text()
    orthanc.start()
    try:
        check_reads(orthanc, old)
        new = ingest(orthanc, 10, studies=1, first=100, patient="NEW^ONE")
        daemon.wait_uploaded()
        assert len(moto.keys(bucket)) == 10 and len(fs_files(plain)) == 30
        assert daemon.status()["file_system_files"] == 30
        patients = orthanc.json("GET", "/patients")
        status, answer = rest(daemon.api, "POST", "/move-storage", {
            "Resources": patients, "TargetStorage": "object-storage", "Asynchronous": True})
        assert status == 200
        rounds = 0
        while rest(daemon.api, "GET", answer["Path"])[1]["State"] in ("Pending", "Running"):
            check_reads(orthanc, {**old, **new})  # reads keep working during the move
            rounds += 1
        job = rest(daemon.api, "GET", answer["Path"])[1]
        assert job["State"] == "Success" and sorted(job["Content"]["Patients"]) == \
            sorted(patients), job
        assert rounds >= 1
        assert fs_files(plain) == {} and len(moto.keys(bucket)) == 40
        check_reads(orthanc, {**old, **new})
        orthanc.stop()
        daemon.stop()
        daemon.start()
        orthanc.start()
        check_reads(orthanc, {**old, **new})
    finally:
        orthanc.stop()


@pytest.mark.orthanc
def test_job_interrupted_by_kill_9_resumes(tmp_path: Path, moto: MotoServer, bucket: str,
                                           objfs_factory: Callable[..., Objfs]) -> None:
    fs_dir = tmp_path / "fs-tier"
    orthanc = Orthanc(tmp_path, tmp_path / "objfs-mnt")
    config = hybrid_config(moto, bucket, tmp_path, "WriteToFileSystem", orthanc, fs_dir,
                           ConnectTimeout=1, RequestTimeout=2)
    config["Objfs"]["ReadTimeout"] = 6
    daemon = objfs_factory(config).start()
    orthanc.start()
    assert moto.process is not None
    try:
        sent = ingest(orthanc, 20, studies=2)
        patients = orthanc.json("GET", "/patients")
        os.kill(moto.process.pid, signal.SIGSTOP)  # the first upload hangs
        try:
            status, answer = rest(daemon.api, "POST", "/move-storage", {
                "Resources": patients, "TargetStorage": "object-storage",
                "Asynchronous": True})
            assert status == 200
            wait_until(lambda: rest(daemon.api, "GET", answer["Path"])[1]["State"]
                       == "Running", 30, "the job to start")
            time.sleep(0.5)
            daemon.kill()
        finally:
            os.kill(moto.process.pid, signal.SIGCONT)
        daemon.start()
        job = wait_job(daemon, answer["Path"])
        assert job["State"] == "Success", job
        assert fs_files(fs_dir) == {} and len(moto.keys(bucket)) == 20
        assert "was interrupted by a stop; it runs again" in daemon.text()
        check_reads(orthanc, sent)

        # A move that cannot complete fails clearly and leaves the source as it was.
        status, answer = rest(daemon.api, "POST", "/move-storage",
                              {"Resources": patients, "TargetStorage": "file-system"})
        assert status == 200 and len(fs_files(fs_dir)) == 20 and moto.keys(bucket) == {}
        os.kill(moto.process.pid, signal.SIGSTOP)
        try:
            status, health = rest(daemon.api, "GET", "/health")
            assert status == 503 and "the bucket" in health["Problems"][0], health
            status, answer = rest(daemon.api, "POST", "/move-storage",
                                  {"Resources": patients, "TargetStorage": "object-storage"})
            assert status == 500 and answer["Message"].startswith("attachment "), answer
            job = rest(daemon.api, "GET", answer["Path"])[1]
            assert job["State"] == "Failure" and job["ErrorDescription"] == answer["Message"]
            assert len(fs_files(fs_dir)) == 20
        finally:
            os.kill(moto.process.pid, signal.SIGCONT)
        check_reads(orthanc, sent)
        assert rest(daemon.api, "GET", "/health")[0] == 200
    finally:
        orthanc.stop()


def test_rest_api_errors_and_authentication(tmp_path: Path,
                                            objfs_factory: Callable[..., Objfs]) -> None:
    orthanc = Orthanc(tmp_path, tmp_path / "orthanc-storage").start()  # resolves ids only
    try:
        config = local_config(tmp_path, HybridMode="WriteToFileSystem",
                              FileSystemDirectory=str(tmp_path / "fs"),
                              RestApi={"Username": "admin", "Password": "s3cret"},
                              Orthanc={"Url": orthanc.url})
        daemon = objfs_factory(config).start()
        auth = ("admin", "s3cret")
        assert rest(daemon.api, "GET", "/health")[0] == 401
        assert rest(daemon.api, "GET", "/health", auth=("admin", "wrong"))[0] == 401
        assert rest(daemon.api, "GET", "/health", auth=auth) == (200, {"Healthy": True})
        assert rest(daemon.api, "GET", "/move-storage", auth=auth)[0] == 405
        bad = [(b"not json", "JSON object"), ([1], "JSON object"),
               ({"TargetStorage": "file-system"}, "Resources"),
               ({"Resources": "abc", "TargetStorage": "file-system"}, "Resources"),
               ({"Resources": [1], "TargetStorage": "file-system"}, "Resources"),
               ({"Resources": []}, "TargetStorage"),
               ({"Resources": [], "TargetStorage": "tape"}, "TargetStorage"),
               ({"Resources": [], "TargetStorage": "file-system", "Asynchronous": "yes"},
                "Asynchronous"),
               ({"Resources": [], "TargetStorage": "file-system", "Priority": "high"},
                "Priority")]
        for body, field in bad:
            status, answer = rest(daemon.api, "POST", "/move-storage", body, auth=auth)
            assert status == 400 and field in answer["Message"], (body, answer)
        status, answer = rest(daemon.api, "POST", "/move-storage",
                              {"Resources": ["0123-nope"], "TargetStorage": "file-system"},
                              auth=auth)
        assert status == 404 and "0123-nope" in answer["Message"]
        assert rest(daemon.api, "GET", "/jobs/nope", auth=auth)[0] == 404
        assert rest(daemon.api, "POST", "/jobs/nope/cancel", auth=auth)[0] == 404
        assert rest(daemon.api, "GET", "/attachments/nope", auth=auth)[0] == 404
        # An empty move succeeds at once.
        status, answer = rest(daemon.api, "POST", "/move-storage",
                              {"Resources": [], "TargetStorage": "file-system"}, auth=auth)
        assert (status, answer) == (200, {})
        status, facts = rest(daemon.api, "GET", "/status", auth=auth)
        assert facts["hybrid_mode"] == "WriteToFileSystem" and facts["file_system_files"] == 0
    finally:
        orthanc.stop()
    # Orthanc gone: resolution fails with 502, not a hang.
    status, answer = rest(daemon.api, "POST", "/move-storage",
                          {"Resources": ["x"], "TargetStorage": "file-system"}, auth=auth)
    assert status == 502 and "unreachable" in answer["Message"]


def test_rest_api_needs_credentials_off_loopback(tmp_path: Path) -> None:
    config = local_config(tmp_path, RestApi={"Host": "0.0.0.0"})
    path = tmp_path / "objfs.json"
    path.write_text(__import__("json").dumps(config))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = subprocess.run([sys.executable, "-m", "objfs", "mount", "--config", str(path),
                          str(mnt)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "Objfs.RestApi.Username/Password: required when Host (0.0.0.0)" in out.stderr


def test_move_storage_needs_hybrid_mode(tmp_path: Path,
                                        objfs_factory: Callable[..., Objfs]) -> None:
    daemon = objfs_factory(local_config(tmp_path)).start()
    status, answer = rest(daemon.api, "POST", "/move-storage",
                          {"Resources": ["x"], "TargetStorage": "file-system"})
    assert status == 409 and "HybridMode is Disabled" in answer["Message"]


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        os.fsync(f.fileno())


def uuid_for(i: int) -> str:
    return f"{i:08x}-0000-4000-8000-{i:012x}"


def at(root: Path, uuid: str) -> Path:
    return root / uuid[:2] / uuid[2:4] / uuid


def bucket_uuids(bucket: Path) -> set[str]:
    return {p.name.split(".")[0] for p in bucket.iterdir() if not p.name.startswith(".")}


def test_write_to_object_storage_reads_and_deletes_both_tiers(
        tmp_path: Path, objfs_factory: Callable[..., Objfs]) -> None:
    fs_dir = tmp_path / "fs"
    only_fs, both, new = "abcd0001-0000-4000-8000-000000000001", uuid_for(2), uuid_for(3)
    write(at(fs_dir, only_fs), b"old file " * 100)
    config = local_config(tmp_path, HybridMode="WriteToObjectStorage",
                          FileSystemDirectory=str(fs_dir))
    daemon = objfs_factory(config).start()
    mnt = daemon.mountpoint
    assert at(mnt, only_fs).read_bytes() == b"old file " * 100
    write(at(mnt, new), b"new")
    write(at(mnt, both), b"in both tiers")
    daemon.wait_uploaded()
    assert not at(fs_dir, new).exists()  # new attachments go to the bucket
    assert bucket_uuids(tmp_path / "bucket") == {both, new}
    write(at(fs_dir, both), b"in both tiers")
    assert os.listdir(mnt / "ab" / "cd") == [only_fs]
    assert sorted(os.listdir(mnt / "00" / "00")) == [both, new]
    for uuid in (only_fs, both):  # gone from both tiers, and the delete succeeds
        os.unlink(at(mnt, uuid))
        assert not at(fs_dir, uuid).exists()
        with pytest.raises(FileNotFoundError):
            os.stat(at(mnt, uuid))
    daemon.wait_uploaded()
    assert bucket_uuids(tmp_path / "bucket") == {new}
    with pytest.raises(OSError) as info:
        os.unlink(at(mnt, uuid_for(9)))
    assert info.value.errno == errno.ENOENT
    # Orthanc's rmdir after a delete removes the directory in the file-system tier too.
    os.rmdir(at(mnt, only_fs).parent)
    assert not at(fs_dir, only_fs).parent.exists()


def test_file_system_tier_encryption(tmp_path: Path,
                                     objfs_factory: Callable[..., Objfs]) -> None:
    fs_dir = tmp_path / "fs"
    expected = {}
    for i, vector in enumerate(MANIFEST["vectors"]):  # written by the official plugin's code
        uuid = uuid_for(100 + i)
        at(fs_dir, uuid).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(VECTORS / vector["ciphertext_file"], at(fs_dir, uuid))
        expected[uuid] = (VECTORS / vector["plaintext_file"]).read_bytes()
    plain_old = uuid_for(200)
    write(at(fs_dir, plain_old), b"written by Orthanc before encryption")
    config = local_config(tmp_path, HybridMode="WriteToFileSystem",
                          FileSystemDirectory=str(fs_dir),
                          StorageEncryption={"MasterKey": [3, KEY3],
                                             "PreviousMasterKeys": [[1, KEY1]]})
    daemon = objfs_factory(config).start()
    mnt = daemon.mountpoint
    for uuid, plain in expected.items():
        assert os.stat(at(mnt, uuid)).st_size == len(plain)
        assert at(mnt, uuid).read_bytes() == plain
    assert at(mnt, plain_old).read_bytes() == b"written by Orthanc before encryption"
    data = os.urandom(3 * 1024 * 1024 + 5)
    write(at(mnt, uuid_for(300)), data)
    stored = at(fs_dir, uuid_for(300)).read_bytes()
    assert stored[:2] == b"A1" and independent_decrypt(stored, {3: key(3)}) == data
    assert at(mnt, uuid_for(300)).read_bytes() == data
    # A tampered file is refused with EIO, the daemon keeps serving.
    tampered = bytearray(stored)
    tampered[200] ^= 1
    write(at(fs_dir, uuid_for(301)), bytes(tampered))
    with pytest.raises(OSError) as info:
        at(mnt, uuid_for(301)).read_bytes()
    assert info.value.errno == errno.EIO
    assert at(mnt, uuid_for(300)).read_bytes() == data


def test_plaintext_file_system_tier_with_encryption_on(
        tmp_path: Path, objfs_factory: Callable[..., Objfs]) -> None:
    fs_dir = tmp_path / "fs"
    vector = MANIFEST["vectors"][0]
    at(fs_dir, uuid_for(1)).parent.mkdir(parents=True)
    shutil.copy(VECTORS / vector["ciphertext_file"], at(fs_dir, uuid_for(1)))
    config = local_config(tmp_path, HybridMode="WriteToFileSystem",
                          FileSystemDirectory=str(fs_dir), EncryptFileSystemTier=False,
                          StorageEncryption={"MasterKey": [3, KEY3],
                                             "PreviousMasterKeys": [[1, KEY1]]})
    daemon = objfs_factory(config).start()
    write(at(daemon.mountpoint, uuid_for(2)), b"kept in clear on local disk")
    assert at(fs_dir, uuid_for(2)).read_bytes() == b"kept in clear on local disk"
    assert at(daemon.mountpoint, uuid_for(1)).read_bytes() == \
        (VECTORS / vector["plaintext_file"]).read_bytes()
