"""The README's first command, `scripts/run-orthanc.sh`, run as a user runs it: it sets up,
mounts objfs on the embedded local bucket, starts Debian's Orthanc on the mount as user
`orthanc`, and Ctrl-C (SIGINT to its process group, as a terminal sends it) stops both and
leaves nothing mounted. Its paths and ports come from the environment variables the script
documents, so the test touches no system path of a real installation."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import mounted_paths
from tests.support.dicom import make_dicom
from tests.support.fuse import require_fuse
from tests.support.procs import ROOT, Process, free_port, wait_until
from tests.support.rest import rest

pytestmark = pytest.mark.orthanc


@pytest.fixture
def base() -> Iterator[Path]:
    # Not pytest's tmp_path: it is private to root, and Orthanc runs as user orthanc.
    path = Path(tempfile.mkdtemp(prefix="objfs-run-script-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    mnt = path / "mnt"
    if str(mnt) in mounted_paths():
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
    # The script makes the bare mount point immutable, where the file system allows it.
    subprocess.run(["chattr", "-i", str(mnt)], check=False, capture_output=True)
    shutil.rmtree(path, ignore_errors=True)


def test_run_orthanc_script_stores_in_the_bucket_and_stops_at_ctrl_c(base: Path) -> None:
    require_fuse()
    http_port, dicom_port = free_port(), free_port()
    config = base / "config"
    config.mkdir()
    (config / "objfs.json").write_text(json.dumps({"Objfs": {
        "LocalBucket": str(base / "bucket"), "CacheDirectory": str(base / "cache"),
        "RestApi": {"Port": free_port()}}}))
    env = {**os.environ, "OBJFS_MOUNT": str(base / "mnt"), "ORTHANC_INDEX": str(base / "index"),
           "ORTHANC_HTTP_PORT": str(http_port), "ORTHANC_DICOM_PORT": str(dicom_port),
           "OBJFS_CONFIG_DIR": str(config), "OBJFS_LOG_DIR": str(base / "logs"),
           "OBJFS_DEMO_STATE": str(base / "state")}
    run = Process(["bash", str(ROOT / "scripts" / "run-orthanc.sh")], base / "run.out", env)
    try:
        wait_until(lambda: "Orthanc is running on objfs" in run.text(), 300,
                   "run-orthanc.sh", run.proc, base / "run.out")
        assert mounted_paths().get(str(base / "mnt")) == "fuse.objfs"
        url = f"http://127.0.0.1:{http_port}"
        dicom = make_dicom(1)
        status, stored = rest(url, "POST", "/instances", dicom, timeout=30)
        assert status == 200, stored
        instance = stored["ID"]
        # The file as bytes (`rest` decodes what is not JSON as text).
        with urllib.request.urlopen(f"{url}/instances/{instance}/file", timeout=30) as answer:
            assert answer.read() == dicom

        def in_bucket() -> bool:
            objects = [p for p in (base / "bucket").rglob("*") if p.is_file()]
            return any(p.read_bytes() == dicom for p in objects)

        wait_until(in_bucket, 60, "the instance in the local bucket")
        code = run.stop(signal.SIGINT, timeout=120)
        assert code == 130, run.text()
        assert "run: stopped" in run.text()
        assert str(base / "mnt") not in mounted_paths()
    finally:
        run.stop(signal.SIGKILL)
        for log in ("objfs.log", "orthanc.log"):
            if (base / "logs" / log).exists():
                print(f"--- {log}\n{(base / 'logs' / log).read_text(errors='replace')[-3000:]}")
