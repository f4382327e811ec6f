"""Running the Debian `orthanc` package for tests and benchmarks, bound to 127.0.0.1."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tests.support.procs import ROOT, Process, free_port, http_ready, wait_until

ORTHANC_BIN = "/usr/sbin/Orthanc"
_SHIM_CACHE: Path | None = None


def bind_shim() -> Path:
    """Build (once per process) the LD_PRELOAD shim that keeps Orthanc on the loopback; its
    directory is removed when the process exits (a running Orthanc keeps its mapping)."""
    global _SHIM_CACHE
    if _SHIM_CACHE is None or not _SHIM_CACHE.exists():
        folder = tempfile.mkdtemp(prefix="objfs-shim-")
        atexit.register(shutil.rmtree, folder, True)
        out = Path(folder) / "bind_localhost.so"
        subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(out),
                        str(ROOT / "tests" / "support" / "bind_localhost.c"), "-ldl"],
                       check=True)
        _SHIM_CACHE = out
    return _SHIM_CACHE


class HttpError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:300]!r}")
        self.status = status
        self.body = body


# Debian releases whose orthanc the tests run besides the host's (bookworm, 1.10.1), from the
# chroots that scripts/chroots.sh builds and caches.
CHROOTS = Path(os.environ.get("OBJFS_CHROOTS", "/var/cache/objfs-test/chroots"))
RELEASES = {"bookworm": "1.10", "trixie": "1.12", "sid": "1.13"}


def chroot_of(release: str) -> Path:
    root = CHROOTS / release
    if not (root / ".objfs-ready").exists():
        raise AssertionError(f"no {release} chroot at {root}: scripts/chroots.sh builds it "
                             "(scripts/test.sh runs it)")
    return root


def orthanc_argv(release: str, config: Path) -> list[str]:
    """The command that runs `release`'s Orthanc on `config`, bound to the loopback: the host's
    binary, or the chroot's in a private mount namespace that sees /tmp, /dev and /proc."""
    shim = bind_shim()
    if release == "bookworm":
        return ["env", f"LD_PRELOAD={shim}", ORTHANC_BIN, str(config)]
    root = chroot_of(release)
    script = (f"mount --rbind /tmp {root}/tmp && mount -t proc proc {root}/proc && "
              f"mount --rbind /dev {root}/dev && exec chroot {root} "
              f"env LD_PRELOAD={shim} {ORTHANC_BIN} {config}")
    return ["unshare", "--mount", "--propagation", "slave", "sh", "-c", script]


class Orthanc:
    """An Orthanc server whose StorageDirectory is `storage` and whose index is local.

    `release` other than the host's bookworm runs that Debian release's Orthanc from its
    chroot, in a private mount namespace that sees /tmp (the test's files and the objfs
    mount), /dev and /proc at the same paths."""

    def __init__(self, workdir: Path, storage: Path, name: str = "orthanc",
                 release: str = "bookworm", **options: Any) -> None:
        self.release = release
        self.workdir = workdir
        self.storage = storage
        self.index = workdir / f"{name}-index"
        self.index.mkdir(parents=True, exist_ok=True)
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.config = {
            "Name": "objfs-test", "StorageDirectory": str(storage),
            "IndexDirectory": str(self.index), "HttpPort": self.http_port,
            "DicomPort": self.dicom_port, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "SyncStorageArea": True,
            "MaximumStorageCacheSize": 0, "StorageCompression": False, "Plugins": [],
            "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True,
            "TemporaryDirectory": str(workdir / f"{name}-tmp"), "HttpThreadsCount": 8,
            **options}
        Path(self.config["TemporaryDirectory"]).mkdir(exist_ok=True)
        self.config_path = workdir / f"{name}.json"
        self.log = workdir / f"{name}.log"
        self.process: Process | None = None

    def start(self) -> Orthanc:
        self.config_path.write_text(json.dumps(self.config, indent=1))
        assert str(self.workdir).startswith("/tmp/") or self.release == "bookworm", \
            f"{self.workdir} is not visible in the chroot"
        self.process = Process(orthanc_argv(self.release, self.config_path), self.log)
        wait_until(lambda: http_ready(self.url + "/system"), 60, "Orthanc",
                   self.process.proc, self.log)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    # --- REST ---------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: bytes | None = None,
                timeout: float = 120) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", "application/octet-stream")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as exc:
            raise HttpError(exc.code, exc.read()) from None

    def json(self, method: str, path: str, body: Any = None) -> Any:
        raw = None if body is None else (body if isinstance(body, bytes)
                                         else json.dumps(body).encode())
        return json.loads(self.request(method, path, raw))

    def upload(self, dicom: bytes) -> str:
        """POST /instances; returns the Orthanc instance id."""
        answer = self.json("POST", "/instances", dicom)
        return str(answer["ID"])

    def instance_id(self, sop_instance_uid: str) -> str:
        found = self.json("POST", "/tools/lookup", sop_instance_uid.encode())
        ids = [f["ID"] for f in found if f["Type"] == "Instance"]
        assert len(ids) == 1, found
        return str(ids[0])

    def storescu(self, files: Iterable[Path]) -> None:
        subprocess.run(["storescu", "-aec", "ORTHANC", "-aet", "OBJFSTEST", "127.0.0.1",
                        str(self.dicom_port), *map(str, files)], check=True,
                       capture_output=True, timeout=600)


def sop_instance_uid(dicom: bytes) -> str:
    import io

    import pydicom

    return str(pydicom.dcmread(io.BytesIO(dicom), stop_before_pixels=True).SOPInstanceUID)
