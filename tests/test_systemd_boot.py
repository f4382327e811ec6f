"""The systemd units under systemd, for real: a Debian 12 tree (scripts/nspawn-root.sh) booted
with systemd-nspawn, Debian's orthanc and objfs.service with the shipped drop-in. objfs is
READY before Orthanc starts; Orthanc stores through the mount; after `kill -9` of objfs no
Orthanc write lands under the bare mount point and both serve again within 30 s by
themselves; `systemctl stop` drains and succeeds without errors in the journal."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid as uuid_mod
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.dicom import make_dicom
from tests.support.fuse import require_fuse
from tests.support.procs import ROOT, Process, wait_until

NSPAWN_ROOT = Path(os.environ.get("OBJFS_NSPAWN", "/var/cache/objfs-test/nspawn/root"))
MOUNT = "/var/lib/orthanc/objfs"


class Machine:
    """A booted container; `run` executes a shell command inside it."""

    def __init__(self, workdir: Path) -> None:
        self.name = f"objfs-{uuid_mod.uuid4().hex[:8]}"
        self.process = Process(["systemd-nspawn", "-q", "-D", str(NSPAWN_ROOT), "-b",
                                "--register=no", "--keep-unit", "--volatile=overlay",
                                "--private-network", "--bind=/dev/fuse",
                                f"--bind-ro={ROOT}:/src", "-M", self.name],
                               workdir / "nspawn.log")
        wait_until(lambda: self._leader() is not None, 30, "the container's init",
                   self.process.proc, self.process.log)
        wait_until(lambda: self.run("systemctl is-system-running", check=False).stdout.strip()
                   in ("running", "degraded"), 60, "the container to boot",
                   self.process.proc, self.process.log)

    def _leader(self) -> int | None:
        children = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True,
                                  text=True).stdout.split()
        return int(children[0]) if children else None

    def run(self, command: str, check: bool = True, stdin: bytes | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        leader = self._leader()
        assert leader is not None, "the container is gone"
        raw = subprocess.run(["nsenter", "-t", str(leader), "-a", "sh", "-c", command],
                             input=stdin, capture_output=True, timeout=timeout)
        # Bytes kept as they are (latin-1 maps each byte to one character, no newline games).
        done = subprocess.CompletedProcess(raw.args, raw.returncode,
                                           raw.stdout.decode("latin-1"),
                                           raw.stderr.decode("latin-1"))
        if check:
            assert done.returncode == 0, f"{command}: {done.stdout}{done.stderr}"
        return done

    def put_file(self, path: str, data: bytes) -> None:
        self.run(f"cat > {path}", stdin=data)

    def stop(self) -> None:
        self.process.stop(signal.SIGTERM, 60)


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[Machine]:
    require_fuse()
    if shutil.which("systemd-nspawn") is None or not (NSPAWN_ROOT / ".objfs-ready").exists():
        pytest.fail(f"no bootable tree at {NSPAWN_ROOT}: scripts/nspawn-root.sh builds it "
                    "(scripts/test.sh runs it)")
    booted = Machine(tmp_path)
    yield booted
    booted.stop()


def install(m: Machine) -> None:
    """objfs from this checkout, the shipped units and drop-in, Orthanc on the mount."""
    m.run("cp -r /src/objfs /tmp/objfs-src && printf '#!/bin/sh\\nexec env PYTHONPATH=/tmp "
          "/opt/objfs/bin/python -m objfs \"$@\"\\n' > /usr/local/bin/objfs && "
          "mv /tmp/objfs-src /tmp/objfs && chmod 755 /usr/local/bin/objfs && objfs --version")
    m.run("cp /src/systemd/objfs.service /etc/systemd/system/ && "
          "mkdir -p /etc/systemd/system/orthanc.service.d /etc/objfs && "
          "cp /src/systemd/orthanc.service.d/objfs.conf /etc/systemd/system/orthanc.service.d/")
    m.put_file("/etc/objfs/objfs.json", json.dumps(
        {"Objfs": {"LocalBucket": "/var/lib/objfs/bucket", "ShutdownDrainTimeout": 30}}).encode())
    m.run("cp /src/systemd/orthanc-objfs.json /etc/orthanc/ && "
          "mkdir -p /var/lib/orthanc/db-index && chown orthanc:orthanc /var/lib/orthanc/db-index")
    # The Debian file names both directories too, and Orthanc refuses a key set twice.
    m.run("sed -i '/\"StorageDirectory\"/d; /\"IndexDirectory\"/d' /etc/orthanc/orthanc.json")
    m.run("systemctl daemon-reload")


def upload(m: Machine, dicom: bytes) -> str:
    m.put_file("/tmp/upload.dcm", dicom)
    out = m.run("curl -sf -X POST --data-binary @/tmp/upload.dcm "
                "http://127.0.0.1:8042/instances", check=False)
    if out.returncode != 0:
        raise OSError(f"upload failed: {out.returncode} {out.stdout}")
    return str(json.loads(out.stdout)["ID"])


def download(m: Machine, instance: str) -> bytes:
    out = m.run(f"curl -sf http://127.0.0.1:8042/instances/{instance}/file")
    return out.stdout.encode("latin-1")


def show(m: Machine, unit: str, prop: str) -> str:
    return m.run(f"systemctl show -p {prop} --value {unit}").stdout.strip()


def test_objfs_and_orthanc_under_systemd(machine: Machine) -> None:
    m = machine
    install(m)
    m.run("systemctl start orthanc.service", timeout=180)
    # objfs was started by the drop-in's Requires= and reported READY before Orthanc ran.
    ready = int(show(m, "objfs.service", "ActiveEnterTimestampMonotonic"))
    orthanc_started = int(show(m, "orthanc.service", "ExecMainStartTimestampMonotonic"))
    assert 0 < ready <= orthanc_started
    assert m.run(f"findmnt -n -o FSTYPE {MOUNT}").stdout.strip() == "fuse.objfs"
    wait_until(lambda: m.run("curl -sf http://127.0.0.1:8042/system", check=False).returncode
               == 0, 60, "Orthanc")
    sent = {}
    for i in range(5):
        dicom = make_dicom(i, patient="UNDER^SYSTEMD")
        sent[upload(m, dicom)] = dicom
    for oid, dicom in sent.items():
        assert download(m, oid) == dicom
    # LimitNICE lets the event loop thread (the main thread) take EventLoopNice without
    # CAP_SYS_NICE; the worker threads stay at 0.
    pid = show(m, "objfs.service", "MainPID")
    nices = {int(line.split()[0]): int(line.rsplit(")", 1)[1].split()[16]) for line in
             m.run(f"cat /proc/{pid}/task/*/stat").stdout.splitlines()}
    assert nices.pop(int(pid)) == -10
    assert nices and set(nices.values()) == {0}

    # kill -9 of objfs: Orthanc's writes fail meanwhile (never land underneath), and both
    # serve again within 30 s without anyone acting.
    killed_at = time.monotonic()
    m.run("systemctl kill -s KILL objfs.service")
    failed_uploads = 0
    back = None
    while time.monotonic() - killed_at < 60:
        try:
            dicom = make_dicom(100 + failed_uploads, patient="DURING^RESTART")
            sent[upload(m, dicom)] = dicom
            back = time.monotonic() - killed_at
            break
        except OSError:
            failed_uploads += 1
            time.sleep(0.5)
    assert back is not None and back <= 30, f"not serving again after {back}"
    print(f"serving again {back:.1f} s after kill -9; {failed_uploads} uploads failed meanwhile")
    for oid, dicom in sent.items():
        assert download(m, oid) == dicom
    m.run("mkdir -p /mnt/under && mount --bind /var/lib/orthanc /mnt/under")
    assert m.run("ls -A /mnt/under/objfs").stdout.strip() == "", "a write landed underneath"
    m.run("umount /mnt/under")

    stop_mark = m.run("date '+%Y-%m-%d %H:%M:%S'").stdout.strip()
    m.run("systemctl stop orthanc.service objfs.service", timeout=240)
    assert show(m, "objfs.service", "Result") == "success"
    assert show(m, "objfs.service", "ExecMainStatus") == "0"
    errors = m.run(f"journalctl -q -u objfs.service -p err --since '{stop_mark}'",
                   check=False).stdout.strip()
    assert errors == "", errors
    stored = m.run("ls /var/lib/objfs/bucket").stdout.split()
    assert len(stored) == len(sent)
