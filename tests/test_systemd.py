"""systemd: the units verify, and the daemon speaks the notify protocol: READY=1 only once the
mount answers, STATUS= lines, STOPPING=1 at SIGTERM, then a drain that finishes with the
backend up and gives up at the deadline, uploads kept journaled, with the backend down."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from objfs.config import OBJFS_OPTIONS, strip_comments
from tests.support.daemon import Objfs, is_live_mount
from tests.support.emulators import MotoServer
from tests.support.procs import ROOT, wait_until
from tests.test_hybrid import at, uuid_for, write

SYSTEMD = ROOT / "systemd"
ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
DEBIAN_ORTHANC_UNIT = Path("/lib/systemd/system/orthanc.service")


def verify(*units: Path, unit_path: Path | None = None, debug: bool = False) -> str:
    """`systemd-analyze verify`; returns its output. It exits 0 on mere parse warnings
    ("..., ignoring"), so callers assert the output is empty too."""
    env = {**os.environ, "SYSTEMD_LOG_COLOR": "0"}
    if unit_path is not None:
        env["SYSTEMD_UNIT_PATH"] = f"{unit_path}:"  # the trailing ':' keeps the defaults
    if debug:
        env["SYSTEMD_LOG_LEVEL"] = "debug"
    out = subprocess.run([ANALYZE, "verify", *map(str, units)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


def unit_setting(unit: Path, key: str) -> str:
    found = re.findall(rf"^{key}=(.*)$", unit.read_text(), re.MULTILINE)
    assert len(found) == 1, (unit, key, found)
    return found[0].strip()


def seconds(value: str) -> float:
    return float(value[:-1]) * 60 if value.endswith("min") else float(value.rstrip("s"))


def test_units_verify(tmp_path: Path) -> None:
    assert os.access("/usr/local/bin/objfs", os.X_OK), "scripts/setup.sh links the command"
    instance = tmp_path / "objfs@site-a.service"
    shutil.copy(SYSTEMD / "objfs@.service", instance)
    for unit in (SYSTEMD / "objfs.service", instance):
        assert verify(unit) == "", unit
        assert unit_setting(unit, "Type") == "notify"
        assert unit_setting(unit, "Restart") == "on-failure"
        drain = OBJFS_OPTIONS["ShutdownDrainTimeout"].default
        assert seconds(unit_setting(unit, "TimeoutStopSec")) > drain + 30
        # Each of these gives the service a private mount namespace: Orthanc would not see
        # the FUSE mount.
        for namespaced in ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
                           "ReadWritePaths", "ProtectKernelTunables", "PrivateMounts"):
            assert not re.search(rf"^{namespaced}=", unit.read_text(), re.MULTILINE)


def test_verification_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a typo is reported (as a warning, exit status 0)."""
    broken = tmp_path / "objfs.service"
    broken.write_text((SYSTEMD / "objfs.service").read_text()
                      .replace("Type=notify", "Type=notfy"))
    assert "Failed to parse service type" in verify(broken)


def test_orthanc_drop_in_and_configuration_fragment(tmp_path: Path) -> None:
    units = tmp_path / "units"
    (units / "orthanc.service.d").mkdir(parents=True)
    shutil.copy(DEBIAN_ORTHANC_UNIT, units)
    shutil.copy(SYSTEMD / "objfs.service", units)
    shutil.copy(SYSTEMD / "orthanc.service.d" / "objfs.conf", units / "orthanc.service.d")
    assert verify(units / "orthanc.service", unit_path=units) == ""
    debug = verify(units / "orthanc.service", unit_path=units, debug=True)
    assert str(units / "orthanc.service.d" / "objfs.conf") in debug
    drop_in = (SYSTEMD / "orthanc.service.d" / "objfs.conf").read_text()
    assert re.search(r"^Requires=objfs\.service$", drop_in, re.MULTILINE)
    assert re.search(r"^After=objfs\.service$", drop_in, re.MULTILINE)

    import json
    fragment = json.loads(strip_comments((SYSTEMD / "orthanc-objfs.json").read_text()))
    mountpoint = unit_setting(SYSTEMD / "objfs.service", "ExecStart").split()[-1]
    assert fragment["StorageDirectory"] == mountpoint
    assert not fragment["IndexDirectory"].startswith(mountpoint + "/")


# --- the notify protocol -----------------------------------------------------------------------


class NotifyListener:
    """A datagram socket standing in for systemd; records each message with whether the mount
    answered at the moment it arrived."""

    def __init__(self, path: Path, mountpoint: Path) -> None:
        self.path = str(path)
        self.mountpoint = mountpoint
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[dict[str, str], bool]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            live = is_live_mount(self.mountpoint) if "READY" in fields else False
            self.messages.append((fields, live))

    def first(self, key: str) -> int | None:
        return next((i for i, (m, _) in enumerate(self.messages) if key in m), None)

    def wait_for(self, key: str, timeout: float = 30) -> dict[str, str]:
        wait_until(lambda: self.first(key) is not None, timeout, f"{key} notification")
        index = self.first(key)
        assert index is not None
        return self.messages[index][0]

    def statuses(self) -> list[str]:
        return [m["STATUS"] for m, _ in self.messages if "STATUS" in m]

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Callable[[Path], NotifyListener]]:
    made: list[NotifyListener] = []

    def make(mountpoint: Path) -> NotifyListener:
        made.append(NotifyListener(tmp_path / f"notify-{len(made)}.sock", mountpoint))
        return made[-1]

    yield make
    for item in made:
        item.close()


def s3_config(moto: MotoServer, bucket: str, tmp_path: Path, drain: float) -> dict[str, object]:
    return {"AwsS3Storage": moto.s3_section(bucket, ConnectTimeout=1, RequestTimeout=2),
            "Objfs": {"CacheDirectory": str(tmp_path / "cache"), "CacheSize": 256,
                      "ShutdownDrainTimeout": drain}}


def write_attachments(mountpoint: Path, count: int) -> list[str]:
    uuids = [uuid_for(1000 + i) for i in range(count)]
    for i, uuid in enumerate(uuids):
        write(at(mountpoint, uuid), os.urandom(50_000 + i))
    return uuids


def objfs_status(daemon: Objfs, *extra: str, timeout: float = 120) -> str:
    out = subprocess.run([sys.executable, "-m", "objfs", "status", *extra, "--config",
                          str(daemon.config_path)], capture_output=True, text=True,
                         timeout=timeout, check=True)
    return out.stdout


def test_ready_status_stopping_and_drain_with_backend_up(
        tmp_path: Path, moto: MotoServer, bucket: str,
        objfs_factory: Callable[..., Objfs],
        listener: Callable[[Path], NotifyListener]) -> None:
    daemon = objfs_factory(s3_config(moto, bucket, tmp_path, drain=90))
    notify = listener(daemon.mountpoint)
    daemon.env["NOTIFY_SOCKET"] = notify.path
    daemon.start()
    ready = notify.wait_for("READY")
    assert ready["READY"] == "1" and ready["MAINPID"] == str(daemon.process.pid)
    assert "uploads queued" in ready["STATUS"] and "cache" in ready["STATUS"]
    assert [live for m, live in notify.messages if "READY" in m] == [True]

    daemon.wait_inventory()
    assert moto.process is not None
    os.kill(moto.process.pid, signal.SIGSTOP)  # uploads cannot finish yet
    try:
        uuids = write_attachments(daemon.mountpoint, 6)
        wait_until(lambda: any(s.startswith("6 uploads queued") for s in notify.statuses()),
                   20, "a STATUS line with the queue")
        assert daemon.process is not None
        daemon.process.proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING")
        wait_until(lambda: any(s.startswith("draining: 6 uploads left")
                               for s in notify.statuses()), 20, "draining STATUS")
        # While the daemon drains, `objfs status` follows the progress until it is done.
        status = subprocess.Popen([sys.executable, "-m", "objfs", "status", "--config",
                                   str(daemon.config_path)], stdout=subprocess.PIPE, text=True)
        time.sleep(2)
    finally:
        os.kill(moto.process.pid, signal.SIGCONT)
    assert daemon.process.proc.wait(120) == 0
    progress, _ = status.communicate(timeout=60)
    assert status.returncode == 0
    assert "daemon:           draining" in progress
    assert re.search(r"draining \[\.+\] 0/6 uploads", progress), progress
    assert "all uploads done" in daemon.text()
    assert "all uploads done" in notify.statuses()
    keys = moto.keys(bucket)
    assert sorted(k.split(".")[0] for k in keys) == sorted(uuids)
    assert daemon.journal_stats().pending_uploads == 0
    assert "not running" in objfs_status(daemon)


def test_drain_deadline_with_backend_down_keeps_uploads_journaled(
        tmp_path: Path, moto: MotoServer, bucket: str,
        objfs_factory: Callable[..., Objfs],
        listener: Callable[[Path], NotifyListener]) -> None:
    daemon = objfs_factory(s3_config(moto, bucket, tmp_path, drain=3))
    notify = listener(daemon.mountpoint)
    daemon.env["NOTIFY_SOCKET"] = notify.path
    daemon.start()
    notify.wait_for("READY")
    daemon.wait_inventory()
    assert moto.process is not None and daemon.process is not None
    os.kill(moto.process.pid, signal.SIGSTOP)
    try:
        uuids = write_attachments(daemon.mountpoint, 4)
        started = time.monotonic()
        daemon.process.proc.send_signal(signal.SIGTERM)
        assert daemon.process.proc.wait(60) == 0
        took = time.monotonic() - started
    finally:
        os.kill(moto.process.pid, signal.SIGCONT)
    assert 3 <= took < 20, took
    assert "shutdown deadline (3.0s) reached: 4 uploads" in daemon.text()
    assert "shutdown deadline reached: uploads stay journaled" in notify.statuses()
    facts = objfs_status(daemon, "--json")
    assert '"pending_uploads": 4' in facts and '"daemon": "stopped"' in facts
    assert "4 uploads stay journaled" in objfs_status(daemon)
    # A PUT sent whole before the deadline may still be carried out by the store once it
    # runs again (as S3 completes a request whose client left): never a partial object, and
    # the journal sends it again at the next start.
    sizes = {uuid: 50_000 + i for i, uuid in enumerate(uuids)}
    assert all(sizes[k.split(".")[0]] == n for k, n in moto.sizes(bucket).items())

    daemon.cleanup()
    daemon.start()  # the next start resumes them
    daemon.wait_uploaded(120)
    assert {k.split(".")[0]: n for k, n in moto.sizes(bucket).items()} == sizes
