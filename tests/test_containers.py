"""The objfs image built (scripts/images.sh, on a local Debian 12 base) and run for real: the
mount appears on a shared bind mount, Orthanc on the host stores through it, the health check
turns healthy, `docker stop` drains and exits 0, and a killed container leaves the mount point
dead (ENOTCONN), never a writable directory. Where no Docker engine can run they fail,
saying so: the setup installs one (scripts/images.sh), and a container test that did not run
has not passed."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import subprocess
import uuid as uuid_mod
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.dicom import make_dicom
from tests.support.emulators import MotoServer
from tests.support.orthanc import Orthanc
from tests.support.procs import ROOT, free_port, wait_until

IMAGE = "objfs-test/objfs"


def docker(*args: str, check: bool = True,
           timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check,
                          timeout=timeout)


@pytest.fixture(scope="module")
def image() -> str:
    if shutil.which("docker") is None or docker("info", check=False).returncode != 0:
        pytest.fail("NO DOCKER ENGINE CAN RUN HERE: the container tests did not run "
                    "(scripts/images.sh says why)")
    built = subprocess.run(["bash", str(ROOT / "scripts" / "images.sh")], capture_output=True,
                           text=True, timeout=1800)
    assert built.returncode == 0, built.stdout + built.stderr
    assert docker("image", "inspect", IMAGE, check=False).returncode == 0, built.stdout
    return IMAGE


@contextlib.contextmanager
def shared_directory(path: Path) -> Iterator[Path]:
    """`path` bind-mounted on itself and made rshared, as the compose trial shares Orthanc's
    storage directory with the objfs container; unmounted (with any FUSE mount on it) after."""
    path.mkdir()
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    subprocess.run(["mount", "--make-rshared", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False,
                       capture_output=True)
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[Path]:
    with shared_directory(tmp_path / "storage") as path:
        yield path


def orthanc_round_trip(workdir: Path, storage: Path, patient: str, count: int) -> None:
    """Orthanc on the host stores `count` instances through the container's mount and reads
    each back identical."""
    orthanc = Orthanc(workdir, storage).start()
    try:
        files = [make_dicom(i, patient=patient) for i in range(count)]
        sent = {orthanc.upload(dicom): dicom for dicom in files}
        for oid, dicom in sent.items():
            assert orthanc.request("GET", f"/instances/{oid}/file") == dicom
    finally:
        orthanc.stop()


def run_objfs(name: str, config_dir: Path, storage: Path, cache: Path,
              *extra: str) -> None:
    docker("rm", "-f", name, check=False)
    docker("run", "-d", "--name", name, "--network", "host", "--device", "/dev/fuse",
           "--cap-add", "SYS_ADMIN", "--security-opt", "apparmor:unconfined",
           "--health-interval", "2s", "--health-start-period", "5s",
           "-v", f"{storage}:/mnt/orthanc-storage:rshared", "-v", f"{config_dir}:/etc/orthanc:ro",
           "-v", f"{cache}:/var/cache/objfs", *extra, IMAGE)


def state(name: str) -> dict[str, object]:
    return dict(json.loads(docker("inspect", "-f", "{{json .State}}", name).stdout))


def is_fuse_mount(path: Path) -> bool:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return any(line.split()[4] == str(path) and " - fuse.objfs " in line for line in f)


def test_the_image_mounts_serves_orthanc_drains_and_dies_safely(
        image: str, tmp_path: Path, moto: MotoServer, bucket: str, storage: Path) -> None:
    name = f"objfs-test-{uuid_mod.uuid4().hex[:8]}"
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o777)
    cache.chmod(0o777)
    api_port = free_port()
    (config_dir / "objfs.json").write_text(json.dumps({
        "AwsS3Storage": moto.s3_section(bucket),
        "Objfs": {"RestApi": {"Port": api_port}, "ShutdownDrainTimeout": 60}}))
    try:
        fuse_mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
        if fuse_mode & 0o006 != 0o006:
            # As the image's own user (uid 10001) a 0600 /dev/fuse cannot be opened: objfs
            # says how to fix it and stops with status 2.
            run_objfs(name, config_dir, storage, cache)
            wait_until(lambda: state(name)["Status"] == "exited", 60, "objfs to refuse")
            assert state(name)["ExitCode"] == 2
            logs = docker("logs", name).stderr
            assert "/dev/fuse cannot be opened for reading and writing by uid 10001" in logs
        run_objfs(name, config_dir, storage, cache, "--user", "root")
        wait_until(lambda: is_fuse_mount(storage), 60, "the objfs mount on the host")
        wait_until(lambda: state(name).get("Health", {}).get("Status") == "healthy",  # type: ignore[union-attr]
                   90, "the health check")
        orthanc_round_trip(tmp_path, storage, "IN^CONTAINER", 10)
        docker("stop", "-t", "120", name)
        assert state(name)["ExitCode"] == 0
        assert "all uploads done" in docker("logs", name).stderr
        assert len(moto.keys(bucket)) == 10
        assert not is_fuse_mount(storage)

        run_objfs(name, config_dir, storage, cache, "--user", "root")
        wait_until(lambda: is_fuse_mount(storage), 60, "the objfs mount on the host")
        docker("kill", name)
        wait_until(lambda: state(name)["Status"] == "exited", 30, "the container to die")
        with pytest.raises(OSError) as dead:
            os.statvfs(storage)
        assert dead.value.errno == errno.ENOTCONN
        with pytest.raises(OSError) as refused:
            (storage / "ab").mkdir()
        assert refused.value.errno == errno.ENOTCONN
    finally:
        docker("rm", "-f", name, check=False)


def compose(project: Path, *args: str, env: dict[str, str],
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", "compose", "-f", str(project / "docker-compose.yml"),
                           "-f", str(project / "trial-with-moto.yml"), "-p", project.name,
                           *args], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=project)


def test_the_compose_trial_with_a_stand_in_s3(image: str, tmp_path: Path) -> None:
    """docker/docker-compose.yml as shipped, with moto (built here) in place of MinIO: the
    secrets script, the objfs service on ./storage (rshared), healthy, Orthanc on the host
    storing through ./storage, `docker compose stop` draining into the bucket, encrypted."""
    if docker("compose", "version", check=False).returncode != 0:
        pytest.fail("docker compose (v2) is missing: scripts/images.sh installs it")
    project = tmp_path / f"trial{uuid_mod.uuid4().hex[:6]}"
    project.mkdir()
    for name in ("docker-compose.yml", "make-trial-secrets.sh"):
        shutil.copy(ROOT / "docker" / name, project / name)
    shutil.copy(ROOT / "tests" / "support" / "compose" / "trial-with-moto.yml", project)
    subprocess.run(["sh", str(project / "make-trial-secrets.sh")], check=True,
                   capture_output=True)
    port = free_port()
    fuse_open = stat.S_IMODE(os.stat("/dev/fuse").st_mode) & 0o006 == 0o006
    env = {**os.environ, "MOTO_PORT": str(port),
           # Where /dev/fuse is 0600 the image's user cannot open it (README, Containers).
           "OBJFS_USER": "10001:10001" if fuse_open else "root"}
    with shared_directory(project / "storage") as storage:
        run_compose_trial(project, storage, env, port, tmp_path)


def run_compose_trial(project: Path, storage: Path, env: dict[str, str], port: int,
                      tmp_path: Path) -> None:
    try:
        up = compose(project, "up", "-d", "objfs", env=env)
        assert up.returncode == 0, up.stdout + up.stderr
        container = f"{project.name}-objfs-1"
        wait_until(lambda: state(container).get("Health", {}).get("Status")  # type: ignore[union-attr]
                   == "healthy", 120, "the objfs service to be healthy")
        assert is_fuse_mount(storage)
        orthanc_round_trip(tmp_path, storage, "COMPOSE^TRIAL", 8)
        stopped = compose(project, "stop", "objfs", env=env)
        assert stopped.returncode == 0, stopped.stderr
        assert state(container)["ExitCode"] == 0
        assert not is_fuse_mount(storage)
        bucket = MotoServer.__new__(MotoServer)
        bucket.endpoint = f"http://127.0.0.1:{port}"
        objects = bucket.keys("orthanc")
        assert len(objects) == 8
        assert all(key.endswith(".dcm.enc") and data[:2] == b"A1"
                   for key, data in objects.items())
    finally:
        logs = compose(project, "logs", "--no-color", env=env)
        (tmp_path / "compose.log").write_text(logs.stdout + logs.stderr)
        compose(project, "down", "-v", "--remove-orphans", env=env)
