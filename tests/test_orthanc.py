"""End to end: the Debian orthanc package stores, serves and deletes DICOM through objfs."""

from __future__ import annotations

import io
import shutil
import subprocess
import tempfile
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import bucket_name, cloud_server
from tests.support.daemon import Objfs
from tests.support.dicom import make_dicom
from tests.support.orthanc import RELEASES, Orthanc, sop_instance_uid
from tests.support.procs import free_port, wait_until
from tests.test_codec import VECTORS, independent_decrypt, key

KEY3 = VECTORS / "keys" / "key3.b64"

pytestmark = pytest.mark.orthanc

N_REST = 100
N_DIMSE = 100


def dataset_bytes(dicom: bytes) -> bytes:
    """The data set after the file meta group: C-STORE makes Orthanc write its own meta
    header (its AE title, implementation UID), so only this part survives DIMSE unchanged."""
    length = int.from_bytes(dicom[140:144], "little")  # (0002,0000) group length, UL
    assert dicom[132:136] == b"\x02\x00\x00\x00"
    return dicom[144 + length:]


def corpus() -> list[bytes]:
    """200 instances: 2 patients x 2 studies x 2 series, 96x96 16-bit CT."""
    out = []
    for i in range(N_REST + N_DIMSE):
        out.append(make_dicom(i, rows=96, cols=96, patient=f"PAT^{i % 2}", study=i % 4,
                              series=i % 8))
    return out


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
@pytest.mark.parametrize("structure", ["flat", "legacy"])
@pytest.mark.parametrize("cloud", ["s3", "azure", "gcs"])
def test_orthanc_on_cloud(cloud: str, structure: str, encrypted: bool, tmp_path: Path,
                          request: pytest.FixtureRequest,
                          objfs_factory: Callable[..., Objfs]) -> None:
    end_to_end(cloud, structure, encrypted, "bookworm", tmp_path, request, objfs_factory)


@pytest.mark.parametrize(("release", "structure", "encrypted"), [
    ("trixie", "flat", False), ("trixie", "legacy", True),
    ("sid", "flat", True), ("sid", "legacy", False)],
    ids=["1.12-flat-plain", "1.12-legacy-encrypted", "1.13-flat-encrypted",
         "1.13-legacy-plain"])
def test_newer_orthanc_on_s3(release: str, structure: str, encrypted: bool, tmp_path: Path,
                             request: pytest.FixtureRequest,
                             objfs_factory: Callable[..., Objfs]) -> None:
    """Debian 13's Orthanc 1.12 and sid's 1.13 (whose storage reads were rewritten), the
    newest with its parallel storage loader."""
    options: dict[str, object] = {}
    if release == "sid":
        options = {"StorageLoaderThreadsCount": 8, "DicomAlwaysAllowMove": True,
                   "DicomModalities": {"sink": ["SINK", "127.0.0.1", free_port()]}}
    end_to_end("s3", structure, encrypted, release, tmp_path, request, objfs_factory,
               **options)


def end_to_end(cloud: str, structure: str, encrypted: bool, release: str, tmp_path: Path,
               request: pytest.FixtureRequest, objfs_factory: Callable[..., Objfs],
               **orthanc_options: object) -> None:
    """REST (4 clients) and C-STORE ingest, byte-identical reads, tags, a study archive
    (all studies at once, concurrently), Orthanc restarted, objfs restarted on an empty
    cache, then every patient deleted and the bucket empty."""
    server = cloud_server(request, cloud)
    bucket = server.new_bucket(bucket_name(request))
    section = server.section(bucket, StorageStructure=structure, RootPath="orthanc")
    if encrypted:
        section["StorageEncryption"] = {"MasterKey": [3, str(KEY3)]}
    config = {server.section_name: section,
              "Objfs": {"CacheDirectory": str(tmp_path / "cache"), "CacheSize": 512}}
    daemon = objfs_factory(config).start()
    orthanc = Orthanc(tmp_path, daemon.mountpoint, release=release,
                      **orthanc_options).start()
    version = orthanc.json("GET", "/system")["Version"]
    assert version.startswith(RELEASES[release]), version
    try:
        files = corpus()
        by_id: dict[str, bytes] = {}  # what Orthanc must serve back, byte for byte
        with ThreadPoolExecutor(4) as pool:  # 4 concurrent REST clients
            for dicom, oid in zip(files[:N_REST], pool.map(orthanc.upload, files[:N_REST]),
                                  strict=True):
                by_id[oid] = dicom
        dimse = tmp_path / "dimse"
        dimse.mkdir()
        for i, dicom in enumerate(files[N_REST:]):
            (dimse / f"{i}.dcm").write_bytes(dicom)
        orthanc.storescu(sorted(dimse.iterdir()))
        for dicom in files[N_REST:]:
            oid = orthanc.instance_id(sop_instance_uid(dicom))
            stored = orthanc.request("GET", f"/instances/{oid}/file")
            assert dataset_bytes(stored) == dataset_bytes(dicom)
            by_id[oid] = stored
        assert len(by_id) == N_REST + N_DIMSE

        def check_all() -> None:
            for oid, dicom in by_id.items():
                assert orthanc.request("GET", f"/instances/{oid}/file") == dicom
            tags = orthanc.json("GET", f"/instances/{next(iter(by_id))}/tags?simplify")
            assert tags["Modality"] == "CT"
            studies = orthanc.json("GET", "/studies")

            def archive_of(study: str) -> tuple[str, zipfile.ZipFile]:
                return study, zipfile.ZipFile(io.BytesIO(
                    orthanc.request("GET", f"/studies/{study}/archive")))

            sink = orthanc.config.get("DicomModalities", {}).get("sink")
            with ThreadPoolExecutor(len(studies) + 1) as pool:  # concurrent archive reads
                moved = pool.submit(c_move_all, orthanc, sink, studies) if sink else None
                for study, archive in pool.map(archive_of, studies):
                    members = [n for n in archive.namelist() if not n.endswith("/")]
                    expected = orthanc.json("GET", f"/studies/{study}/instances")
                    assert len(members) == len(expected) > 0
                    assert all(archive.read(n) in by_id.values() for n in members)
                if moved is not None:  # C-MOVE, meanwhile, of every study to a DICOM sink
                    received = moved.result()
                    assert sorted(map(dataset_bytes, received)) == \
                        sorted(map(dataset_bytes, by_id.values()))

        check_all()
        daemon.wait_uploaded()
        objects = server.keys(bucket, "orthanc/")
        assert len(objects) == len(by_id)
        stored = [independent_decrypt(b, {3: key(3)}) if encrypted
                  else b for b in objects.values()]
        assert sorted(stored) == sorted(by_id.values())
        suffix = (".dcm.enc" if encrypted else ".dcm") if structure == "flat" else ""
        assert all(k.endswith(suffix) and k.count("/") == (1 if structure == "flat" else 3)
                   for k in objects)

        # Orthanc restarted on the same mount; then objfs restarted with an empty cache.
        orthanc.stop()
        orthanc.start()
        check_all()
        orthanc.stop()
        assert daemon.stop() == 0
        shutil.rmtree(tmp_path / "cache")
        daemon.start()
        orthanc.start()
        check_all()

        for patient in orthanc.json("GET", "/patients"):
            orthanc.request("DELETE", f"/patients/{patient}")
        assert orthanc.json("GET", "/instances") == []
        daemon.wait_uploaded()
        wait_until(lambda: server.keys(bucket) == {}, 30, "bucket to empty")
    finally:
        orthanc.stop()


def c_move_all(orthanc: Orthanc, sink: list[object], studies: list[str]) -> list[bytes]:
    """C-MOVE every study to a storescp listening as the `sink` modality; the files it got."""
    out = Path(tempfile.mkdtemp(prefix="objfs-sink-"))
    receiver = subprocess.Popen(["storescp", "-aet", str(sink[0]), "-od", str(out),
                                 str(sink[2])], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        time.sleep(0.5)
        for study in studies:
            uid = orthanc.json("GET", f"/studies/{study}")["MainDicomTags"]["StudyInstanceUID"]
            subprocess.run(["movescu", "-S", "-aet", "OBJFSTEST", "-aec", "ORTHANC", "-aem",
                            str(sink[0]), "-k", "QueryRetrieveLevel=STUDY", "-k",
                            f"StudyInstanceUID={uid}", "127.0.0.1", str(orthanc.dicom_port)],
                           check=True, capture_output=True, timeout=300)
        return [p.read_bytes() for p in sorted(out.iterdir())]
    finally:
        receiver.terminate()
        receiver.wait(10)
        shutil.rmtree(out, ignore_errors=True)


def test_orthanc_on_the_embedded_local_bucket(tmp_path: Path,
                                              objfs_factory: Callable[..., Objfs]) -> None:
    from tests.conftest import local_config

    daemon = objfs_factory(local_config(tmp_path)).start()
    orthanc = Orthanc(tmp_path, daemon.mountpoint).start()
    try:
        files = [make_dicom(i, patient="LOCAL^BUCKET") for i in range(20)]
        ids = [orthanc.upload(d) for d in files]
        for oid, dicom in zip(ids, files, strict=True):
            assert orthanc.request("GET", f"/instances/{oid}/file") == dicom
        # A duplicate is written, then unlinked by Orthanc (OverwriteInstances false).
        assert orthanc.json("POST", "/instances", files[0])["Status"] == "AlreadyStored"
        daemon.wait_uploaded()
        stored = sorted(p.read_bytes() for p in (tmp_path / "bucket").iterdir()
                        if p.is_file())
        assert stored == sorted(files)
        orthanc.request("DELETE", f"/patients/{orthanc.json('GET', '/patients')[0]}")
        daemon.wait_uploaded()
        assert [p for p in (tmp_path / "bucket").iterdir() if p.is_file()] == []
        assert list(daemon.mountpoint.iterdir()) == []  # Orthanc removed its empty dirs
    finally:
        orthanc.stop()
