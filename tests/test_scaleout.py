"""Several Orthanc nodes on one PostgreSQL index and one bucket (issue 13), for real.

A throw-away PostgreSQL cluster (Debian's postgresql 15) on 127.0.0.1; two Debian Orthanc
1.10 nodes on it with the PostgreSQL index plugin and `"Lock": false`; each node on its own
objfs mount (own cache, own REST port) of one moto bucket with `SharedBucket`, A1 encryption,
and HybridMode WriteToObjectStorage over a file-system tier both nodes share. The tests run
in order on one cluster and end by comparing the bucket with the index.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Objfs
from tests.support.dicom import make_dicom
from tests.support.emulators import MotoServer
from tests.support.orthanc import HttpError, Orthanc, sop_instance_uid
from tests.support.postgres import INDEX_PLUGIN, Postgres
from tests.support.procs import Process, wait_until
from tests.support.rest import rest
from tests.test_codec import VECTORS

pytestmark = pytest.mark.orthanc

K = {n: str(VECTORS / "keys" / f"key{n}.b64") for n in (1, 2)}
DATABASE = "orthanc"
# The stated bound after which a node no longer serves an attachment another node deleted
# (docs/scale-out.md): SHARED_CONFIRM_TTL; the kernel's entry cache does not extend it, every
# open() reaches objfs.
DELETE_BOUND = 1.0


class Node:
    """One Orthanc on its own objfs mount."""

    def __init__(self, name: str, workdir: Path, pg: Postgres, moto: MotoServer, bucket: str,
                 fs_tier: Path) -> None:
        self.name = name
        self.workdir = workdir
        self.cache = workdir / f"{name}-cache"
        mount = workdir / f"{name}-objfs-mnt"
        self.orthanc = Orthanc(workdir, mount, name=f"{name}-orthanc",
                               Plugins=[INDEX_PLUGIN], PostgreSQL=pg.section(DATABASE),
                               HttpThreadsCount=8)
        self.config = {
            "AwsS3Storage": moto.s3_section(
                bucket, StorageEncryption={"MasterKey": [1, K[1]],
                                           "PreviousMasterKeys": [[2, K[2]]]},
                HybridMode="WriteToObjectStorage"),
            "PostgreSQL": pg.section(DATABASE),
            "Objfs": {"CacheDirectory": str(self.cache), "CacheSize": 64,
                      "SharedBucket": True, "NodeName": name, "SharedFileSystemTier": True,
                      "FileSystemDirectory": str(fs_tier), "ReadTimeout": 10,
                      "ShutdownDrainTimeout": 30, "Orthanc": {"Url": self.orthanc.url}}}
        self.objfs = Objfs(workdir, self.config, name=f"{name}-objfs")
        assert self.objfs.mountpoint == mount

    @property
    def mount(self) -> Path:
        return self.objfs.mountpoint

    def start(self) -> Node:
        self.objfs.start()
        self.orthanc.start()
        return self

    def stop(self) -> None:
        self.orthanc.stop()
        if self.objfs.process is not None and self.objfs.process.alive():
            assert self.objfs.stop() == 0
        self.objfs.cleanup()

    def file(self, instance: str) -> bytes:
        return self.orthanc.request("GET", f"/instances/{instance}/file")


@pytest.fixture(scope="module")
def cluster(moto: MotoServer, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[dict[str, Any]]:
    workdir = tmp_path_factory.mktemp("scaleout")
    pg = Postgres()
    pg.create_database(DATABASE)
    bucket = moto.new_bucket("scaleout")
    fs_tier = workdir / "shared-fs-tier"
    a = Node("node-a", workdir, pg, moto, bucket, fs_tier)
    b = Node("node-b", workdir, pg, moto, bucket, fs_tier)
    try:
        a.start()
        b.start()
        yield {"a": a, "b": b, "pg": pg, "moto": moto, "bucket": bucket, "fs_tier": fs_tier,
               "sent": {}}
    finally:
        for node in (a, b):
            try:
                node.stop()
            except Exception:
                node.objfs.cleanup()
        pg.stop()


def attachment(orthanc: Orthanc, instance: str) -> str:
    return str(orthanc.json("GET", f"/instances/{instance}/attachments/dicom/info")["Uuid"])


def path_of(mount: Path, uuid: str) -> Path:
    return mount / uuid[:2] / uuid[2:4] / uuid


def bucket_uuids(moto: MotoServer, bucket: str) -> set[str]:
    return {key.split(".")[0] for key in moto.keys(bucket)}


def fs_uuids(fs_tier: Path) -> set[str]:
    return {p.name for p in fs_tier.glob("??/??/*") if p.is_file()}


def pixels(dicom: bytes) -> bytes:
    import io

    import pydicom

    return bytes(pydicom.dcmread(io.BytesIO(dicom)).PixelData)


def index_uuids(pg: Postgres) -> set[str]:
    return {row[0] for row in pg.query(DATABASE, "SELECT uuid FROM AttachedFiles")}


def test_an_instance_stored_on_one_node_reads_at_once_on_the_other(
        cluster: dict[str, Any]) -> None:
    """4 threads: each uploads an instance on one node and at once reads it from the other;
    40 A->B and 40 B->A, byte-identical."""
    a, b = cluster["a"], cluster["b"]
    jobs = [(i, a, b) for i in range(40)] + [(i, b, a) for i in range(40, 80)]

    def one(job: tuple[int, Node, Node]) -> tuple[str, bytes, bytes]:
        i, writer, reader = job
        data = make_dicom(i, rows=128, cols=128, patient="CROSS^NODE", series=i // 20)
        instance = writer.orthanc.upload(data)
        return instance, data, reader.file(instance)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, jobs))
    wrong = [inst for inst, sent, got in results if sent != got]
    assert not wrong, f"{len(wrong)} of 80 read back differently on the other node"
    cluster["sent"].update({inst: sent for inst, sent, _ in results})


def test_c_store_into_one_node_reads_on_the_other(cluster: dict[str, Any],
                                                  tmp_path: Path) -> None:
    a, b = cluster["a"], cluster["b"]
    files = {}
    for i in range(20):
        data = make_dicom(100 + i, rows=128, cols=128, patient="CSTORE^NODE")
        path = tmp_path / f"{i}.dcm"
        path.write_bytes(data)
        files[path] = data
    a.orthanc.storescu(files)
    for data in files.values():
        instance = b.orthanc.instance_id(sop_instance_uid(data))
        # storescu sends the data set; Orthanc writes its own file meta header: B must read
        # exactly what A stored, whose pixels are the ones sent.
        on_b = b.file(instance)
        assert on_b == a.file(instance)
        assert pixels(on_b) == pixels(data)
        cluster["sent"][instance] = on_b


def test_deletes_on_the_other_node_remove_the_objects_and_stop_cached_copies(
        cluster: dict[str, Any]) -> None:
    """B deletes 20 instances only A has read: their objects leave the bucket, the survivors
    still read on both nodes, and A's mount stops serving the deleted files within the bound."""
    a, b, moto, bucket = cluster["a"], cluster["b"], cluster["moto"], cluster["bucket"]
    only_a = {}
    for i in range(20):
        data = make_dicom(200 + i, rows=128, cols=128, patient="DELETE^ME")
        instance = a.orthanc.upload(data)
        assert a.file(instance) == data  # A has a cached copy
        only_a[instance] = attachment(a.orthanc, instance)
    for uuid in only_a.values():
        with open(path_of(a.mount, uuid), "rb") as f:
            assert f.read(4)  # A serves it before the delete
    assert set(only_a.values()) <= bucket_uuids(moto, bucket)
    for instance in only_a:
        assert rest(b.orthanc.url, "DELETE", f"/instances/{instance}")[0] == 200
    deleted_at = time.monotonic()
    b.objfs.wait_uploaded(60)  # B's journaled object deletes are done
    assert not set(only_a.values()) & bucket_uuids(moto, bucket)
    time.sleep(max(0.0, DELETE_BOUND + 0.2 - (time.monotonic() - deleted_at)))
    for uuid in only_a.values():
        with pytest.raises(OSError) as gone:
            open(path_of(a.mount, uuid), "rb").close()
        assert gone.value.errno == errno.ENOENT
    for instance, data in list(cluster["sent"].items())[::10]:
        assert a.file(instance) == data and b.file(instance) == data
    for instance in only_a:
        with pytest.raises(HttpError):
            a.file(instance)


def test_kill_9_of_one_objfs_after_its_last_200_loses_nothing(cluster: dict[str, Any]) -> None:
    """Write-through: every instance acknowledged by A is in the bucket when objfs A dies, so
    B reads each at once; A's restart leaves no orphan (checked at the end of the module)."""
    a, b = cluster["a"], cluster["b"]
    acked = {}
    for i in range(30):
        data = make_dicom(300 + i, rows=128, cols=128, patient="KILL^NINE")
        acked[a.orthanc.upload(data)] = data
    a.objfs.kill()
    for instance, data in acked.items():
        assert b.file(instance) == data
    cluster["sent"].update(acked)
    # A comes back: its Orthanc lost its mount with objfs, so both restart.
    a.orthanc.stop()
    a.objfs.cleanup()
    a.start()
    for instance, data in list(acked.items())[:5]:
        assert a.file(instance) == data
    status = a.objfs.status()
    assert status["shared_bucket"] is True and status["node"] == "node-a"
    assert status["pending_uploads"] == 0


def test_the_same_move_storage_on_both_sidecars_runs_once(cluster: dict[str, Any]) -> None:
    a, b = cluster["a"], cluster["b"]
    moto, bucket, fs_tier = cluster["moto"], cluster["bucket"], cluster["fs_tier"]
    study = next(s for s in a.orthanc.json("GET", "/studies?expand")
                 if s["PatientMainDicomTags"].get("PatientName") == "CROSS^NODE")["ID"]
    instances = a.orthanc.json("GET", f"/studies/{study}/instances")
    uuids = {i["ID"]: attachment(a.orthanc, i["ID"]) for i in instances}
    body = {"Resources": [study], "TargetStorage": "file-system"}
    barrier = threading.Barrier(2)

    def ask(node: Node) -> tuple[int, Any]:
        barrier.wait()
        return rest(node.objfs.api, "POST", "/move-storage", body)

    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(ask, [a, b]))
    codes = sorted(code for code, _ in answers)
    assert codes == [200, 409], answers
    refused = next(answer for code, answer in answers if code == 409)
    holder = "node-a" if answers[1][0] == 409 else "node-b"
    assert refused["Holder"] == holder and holder in refused["Message"], refused
    # Each attachment in exactly one tier, and readable on both nodes.
    in_fs, in_bucket = fs_uuids(fs_tier), bucket_uuids(moto, bucket)
    for uuid in uuids.values():
        assert uuid in in_fs and uuid not in in_bucket
    for instance in uuids:
        assert a.file(instance) == cluster["sent"][instance]
        assert b.file(instance) == cluster["sent"][instance]
    # Back to the bucket, asked of the node that was refused: the lock was released.
    loser = a if answers[0][0] == 409 else b
    code, answer = rest(loser.objfs.api, "POST", "/move-storage",
                        {**body, "TargetStorage": "object-storage"})
    assert code == 200, answer
    in_fs, in_bucket = fs_uuids(fs_tier), bucket_uuids(moto, bucket)
    for uuid in uuids.values():
        assert uuid in in_bucket and uuid not in in_fs
    for instance in list(uuids)[:5]:
        assert a.file(instance) == b.file(instance) == cluster["sent"][instance]
    _, metrics = rest(a.objfs.api, "GET", "/metrics")
    assert 'objfs_cluster_lock_held{lock="move-storage"} 0.0' in metrics
    assert "objfs_bucket_lookups_total" in metrics


def test_a_second_rekey_while_one_runs_is_refused(cluster: dict[str, Any]) -> None:
    a, b = cluster["a"], cluster["b"]
    rekey_config = dict(a.config)
    rekey_config["AwsS3Storage"] = {**a.config["AwsS3Storage"], "StorageEncryption": {
        "MasterKey": [2, K[2]], "PreviousMasterKeys": [[1, K[1]]]}}

    def config_file(node: Node) -> Path:
        path = node.workdir / f"{node.name}-rekey.json"
        tree = {**rekey_config, "Objfs": {**rekey_config["Objfs"], "NodeName": node.name,
                                          "CacheDirectory": str(node.workdir /
                                                                f"{node.name}-rekey-cache")}}
        path.write_text(json.dumps(tree))
        return path

    argv = [sys.executable, "-m", "objfs", "rekey", "--log-level", "INFO", "--config"]
    first = Process([*argv, str(config_file(a))], a.workdir / "rekey-a.log")
    try:
        wait_until(lambda: "cluster lock rekey taken" in first.text(), 60, "first rekey",
                   first.proc, first.log)
        os.killpg(first.pid, signal.SIGSTOP)  # hold it mid-run, its session (and lock) alive
        second = subprocess.run([*argv, str(config_file(b))], capture_output=True, text=True,
                                timeout=120)
        assert second.returncode != 0
        assert "running on node node-a" in second.stderr, second.stderr
        os.killpg(first.pid, signal.SIGCONT)
        first.proc.wait(300)
        assert first.proc.returncode == 0, first.text()[-3000:]
    finally:
        if first.alive():
            os.killpg(first.pid, signal.SIGCONT)
        first.stop()
    # Every object now under key 2, and still readable on both nodes (key 2 is a previous key
    # of theirs).
    for instance, data in list(cluster["sent"].items())[::7]:
        assert a.file(instance) == data and b.file(instance) == data


def test_a_node_started_while_the_other_ingests_reads_its_new_instances(
        cluster: dict[str, Any]) -> None:
    a, b = cluster["a"], cluster["b"]
    b.stop()
    shutil.rmtree(b.cache)  # a new node: empty cache, nothing known
    written: dict[str, bytes] = {}
    stop = threading.Event()

    def ingest() -> None:
        i = 0
        while not stop.is_set() and i < 200:
            data = make_dicom(400 + i, rows=128, cols=128, patient="DURING^START")
            written[a.orthanc.upload(data)] = data
            i += 1

    thread = threading.Thread(target=ingest)
    thread.start()
    try:
        wait_until(lambda: len(written) >= 3, 60, "A ingesting")
        b.start()
        seen = 0
        deadline = time.monotonic() + 60
        while seen < 40 and time.monotonic() < deadline:
            instance, data = list(written.items())[-1]
            assert b.file(instance) == data
            seen += 1
    finally:
        stop.set()
        thread.join()
    for instance, data in written.items():
        assert b.file(instance) == data
    cluster["sent"].update(written)


def test_the_bucket_holds_exactly_the_attachments_of_the_index(cluster: dict[str, Any]) -> None:
    a, b, pg = cluster["a"], cluster["b"], cluster["pg"]
    a.objfs.wait_uploaded(60)
    b.objfs.wait_uploaded(60)
    index = index_uuids(pg)
    assert len(index) >= len(cluster["sent"])
    assert bucket_uuids(cluster["moto"], cluster["bucket"]) == index
    assert fs_uuids(cluster["fs_tier"]) == set()
