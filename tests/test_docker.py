"""Containers without a Docker engine: the Dockerfiles pass hadolint, the compose files pass
the Compose schema and configure objfs correctly the orthancteam way, and the entry-point
scripts, run here outside a container, build the configuration from variables and secrets and
start objfs (the second one with the real Orthanc then storing through the mount)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from objfs.codec import write_key_file
from objfs.config import (
    KNOWN_PATHS,
    OBJFS_OPTIONS,
    env_name,
    env_path,
    load_tree,
    settings_from_tree,
)
from tests.support.daemon import is_live_mount, mounted_paths
from tests.support.emulators import MotoServer
from tests.support.orthanc import Orthanc, orthanc_argv
from tests.support.procs import ROOT, Process, free_port, http_ready, wait_until
from tests.test_hybrid import at, ingest, uuid_for, write

DOCKER = ROOT / "docker"
BIN = Path(sys.executable).parent
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "orthanc" / "Dockerfile"]
COMPOSE_FILES = [DOCKER / "docker-compose.yml", DOCKER / "docker-compose.cloud.yml",
                 DOCKER / "docker-compose.cluster.yml"]


def hadolint(*files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "hadolint"), "--no-color", "--config",
                           str(DOCKER / ".hadolint.yaml"), *map(str, files)],
                          capture_output=True, text=True, timeout=120)


def compose_schema(*files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "check-jsonschema"), "--builtin-schema",
                           "vendor.compose-spec", *map(str, files)],
                          capture_output=True, text=True, timeout=120)


def test_dockerfiles_pass_hadolint(tmp_path: Path) -> None:
    out = hadolint(*DOCKERFILES)
    assert out.returncode == 0 and out.stdout == "", out.stdout + out.stderr
    # The lint can fail: the same file with a root user name and an unpinned base image.
    worse = tmp_path / "Dockerfile"
    worse.write_text((DOCKER / "Dockerfile").read_text()
                     .replace("USER 10001:10001", "USER objfs")
                     .replace("FROM ${BASE} AS build\n", "FROM debian AS build\n"))
    out = hadolint(worse)
    assert out.returncode != 0 and "DL3066" in out.stdout and "DL3006" in out.stdout


def dockerfile(path: Path) -> dict[str, list[str]]:
    """Instruction -> arguments, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*(#[^\n]*\n\s*)*", " ", path.read_text())
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            found.setdefault(word, []).append(rest.strip())
    return found


def test_dockerfile_facts() -> None:
    image = dockerfile(DOCKER / "Dockerfile")
    assert image["FROM"][-1] == "${BASE}" and image["ARG"][0] == "BASE=debian:12-slim"
    assert any("fuse3" in run for run in image["RUN"])
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", image["USER"][-1])  # numeric, not root
    assert '"objfs", "health"' in image["HEALTHCHECK"][0]
    assert image["ENTRYPOINT"] == ['["/usr/local/bin/objfs-entrypoint"]']
    variant = dockerfile(DOCKER / "orthanc" / "Dockerfile")
    assert variant["FROM"][0].startswith("orthancteam/orthanc:")
    env = " ".join(variant["ENV"])
    assert "BEFORE_ORTHANC_STARTUP_SCRIPT=/usr/local/bin/objfs-before-orthanc" in env
    assert "OBJFS_MOUNTPOINT=/var/lib/orthanc/db" in env
    assert "ORTHANC__STORAGE_DIRECTORY=/var/lib/orthanc/db" in env
    for parsed in (image, variant):
        for copy in parsed["COPY"]:
            if not copy.startswith("--from"):
                for source in copy.split()[:-1]:
                    assert (ROOT / source).exists(), source


def test_compose_files_pass_the_compose_schema(tmp_path: Path) -> None:
    out = compose_schema(*COMPOSE_FILES)
    assert out.returncode == 0, out.stdout + out.stderr
    broken = tmp_path / "docker-compose.yml"
    broken.write_text((DOCKER / "docker-compose.yml").read_text()
                      .replace("cap_add:", "cap_added:", 1))
    assert compose_schema(broken).returncode != 0


def compose(path: Path) -> dict[str, Any]:
    tree = yaml.safe_load(path.read_text())
    assert isinstance(tree, dict)
    return tree


def objfs_services(tree: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in tree["services"].items()
            if s.get("image", "").startswith("objfs")}


def fake_secrets(directory: Path, service: dict[str, Any]) -> None:
    """The files Docker would mount under /run/secrets for `service`."""
    directory.mkdir()
    for secret in service.get("secrets", []):
        target = secret["target"] if isinstance(secret, dict) else secret
        path = directory / target
        if "master-key" in target:
            write_key_file(path)
        else:
            path.write_text(f"value of {target}\n")


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_configures_objfs_the_orthancteam_way(path: Path, tmp_path: Path) -> None:
    tree = compose(path)
    services = objfs_services(tree)
    assert services
    drain = OBJFS_OPTIONS["ShutdownDrainTimeout"].default
    for name, service in services.items():
        assert "/dev/fuse:/dev/fuse" in service["devices"]
        assert "SYS_ADMIN" in service["cap_add"]
        assert "apparmor:unconfined" in service["security_opt"]
        grace = service["stop_grace_period"]
        assert grace.endswith("m") and int(grace[:-1]) * 60 > drain + 30
        binds = [v for v in service["volumes"] if isinstance(v, dict) and v["type"] == "bind"]
        assert [b["bind"]["propagation"] for b in binds] == ["rshared"]
        mount = binds[0]
        assert mount["target"] == "/mnt/orthanc-storage"  # the image's OBJFS_MOUNTPOINT

        # Every variable and secret name is one objfs knows; together they validate.
        env = {k: str(v) for k, v in service["environment"].items()}
        names = list(env)
        for secret in service.get("secrets", []):
            if secret["target"].startswith("ORTHANC__"):
                names.append(secret["target"])
            assert not secret["target"].endswith(".json")
            assert secret["uid"] == "10001"  # the image's user must read them
        for variable in names:
            assert env_path(variable) in KNOWN_PATHS, variable
        secrets = tmp_path / name
        fake_secrets(secrets, service)
        env = {k: v.replace("/run/secrets", str(secrets)) for k, v in env.items()}
        settings = settings_from_tree(load_tree([], environ=env, secrets_dir=secrets))
        assert settings.provider in ("s3", "azure", "gcs") and settings.encryption is not None

        # Orthanc sees the same host directory, as its StorageDirectory.
        orthancs = [s for s in tree["services"].values()
                    if s.get("image", "").startswith("orthancteam/orthanc")
                    and name in s.get("depends_on", {})]
        assert len(orthancs) == 1, name
        orthanc = orthancs[0]
        assert orthanc["depends_on"][name]["condition"] == "service_healthy"
        theirs = [v for v in orthanc["volumes"] if isinstance(v, dict) and v["type"] == "bind"]
        assert theirs[0]["source"] == mount["source"]
        assert theirs[0]["target"] == orthanc["environment"]["ORTHANC__STORAGE_DIRECTORY"]
        assert orthanc["environment"].get("ORTHANC__INDEX_DIRECTORY") != theirs[0]["target"]
        if "profiles" in service:
            assert orthanc["profiles"] == service["profiles"]


def test_the_cluster_compose_file_is_two_nodes_on_one_index_and_bucket(tmp_path: Path) -> None:
    """docker-compose.cluster.yml: each node's objfs with SharedBucket, its own name, mount,
    cache and Orthanc; every Orthanc on one PostgreSQL index with Lock false and no storage
    cache; objfs reads the same PostgreSQL section (cluster lock); nginx over both nodes."""
    path = DOCKER / "docker-compose.cluster.yml"
    tree = compose(path)
    services = objfs_services(tree)
    assert sorted(services) == ["objfs-a", "objfs-b"]
    settings = {}
    for name, service in services.items():
        secrets = tmp_path / name
        fake_secrets(secrets, service)
        env = {k: str(v).replace("/run/secrets", str(secrets))
               for k, v in service["environment"].items()}
        settings[name] = settings_from_tree(load_tree([], environ=env, secrets_dir=secrets))
    a, b = settings["objfs-a"], settings["objfs-b"]
    assert a.shared_bucket and b.shared_bucket
    assert {a.node_name, b.node_name} == {"node-a", "node-b"}
    assert a.s3 is not None and b.s3 is not None and a.s3.bucket == b.s3.bucket
    assert a.postgresql is not None and b.postgresql is not None
    assert a.postgresql.where == b.postgresql.where == "postgres:5432/orthanc"
    assert a.orthanc.url != b.orthanc.url
    mounts = {tuple(v["source"] for v in s["volumes"] if isinstance(v, dict))
              for s in services.values()}
    assert len(mounts) == 2  # a mount point per node
    orthancs = {n: s for n, s in tree["services"].items()
                if str(s.get("image", "")).startswith("orthancteam/orthanc")}
    assert sorted(orthancs) == ["orthanc-a", "orthanc-b"]
    for orthanc in orthancs.values():
        env = orthanc["environment"]
        assert env["ORTHANC__POSTGRESQL__LOCK"] == "false"
        assert env["ORTHANC__POSTGRESQL__ENABLE_INDEX"] == "true"
        assert env["ORTHANC__MAXIMUM_STORAGE_CACHE_SIZE"] == "0"
        assert env["ORTHANC__POSTGRESQL__HOST"] == "postgres"
    nginx = (DOCKER / "cluster-nginx.conf").read_text()
    assert "server orthanc-a:8042" in nginx and "server orthanc-b:8042" in nginx
    assert any("cluster-nginx.conf" in v for v in tree["services"]["lb"]["volumes"])


def test_trial_secrets_script(tmp_path: Path) -> None:
    copy = tmp_path / "docker"
    copy.mkdir()
    shutil.copy(DOCKER / "make-trial-secrets.sh", copy)
    subprocess.run(["sh", str(copy / "make-trial-secrets.sh")], check=True, timeout=60,
                   capture_output=True)
    secrets = copy / "secrets"
    access = (secrets / "s3-access-key").read_text()
    assert len(access) >= 3 and len((secrets / "s3-secret-key").read_text()) >= 8  # MinIO
    tree = {"AwsS3Storage": {"BucketName": "b", "Region": "r", "StorageEncryption": {
        "MasterKey": [1, str(secrets / "objfs-master-key")]}}}
    assert settings_from_tree(tree).encryption is not None
    assert oct(secrets.stat().st_mode & 0o777) == "0o700"
    subprocess.run(["sh", str(copy / "make-trial-secrets.sh")], check=True, timeout=60,
                   capture_output=True)
    assert (secrets / "s3-access-key").read_text() == access  # kept


# --- the entry points, outside a container -----------------------------------------------------


def container_env(tmp_path: Path, moto: MotoServer, bucket: str,
                  **extra: str) -> dict[str, str]:
    """What the objfs service of docker-compose.yml gets, pointed at this machine's moto."""
    secrets = tmp_path / "run-secrets"
    secrets.mkdir(exist_ok=True)
    (secrets / "ORTHANC__AWS_S3_STORAGE__ACCESS_KEY").write_text("test\n")
    (secrets / "ORTHANC__AWS_S3_STORAGE__SECRET_KEY").write_text("test\n")
    if not (secrets / "objfs-master-key").exists():
        write_key_file(secrets / "objfs-master-key")
    etc = tmp_path / "etc-orthanc"
    etc.mkdir(exist_ok=True)
    (etc / "orthanc.json").write_text('{\n  // the image\'s own Orthanc settings\n'
                                      '  "Name": "trial", "Objfs": {"CacheSize": 64}\n}\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORTHANC")}
    env.update({
        "PATH": f"{BIN}:{env['PATH']}",
        "OBJFS_CONFIG": str(etc), "OBJFS_SECRETS_DIR": str(secrets),
        "OBJFS_MOUNTPOINT": str(tmp_path / "storage"),
        "ORTHANC__AWS_S3_STORAGE__BUCKET_NAME": bucket,
        "ORTHANC__AWS_S3_STORAGE__REGION": "us-east-1",
        "ORTHANC__AWS_S3_STORAGE__ENDPOINT": moto.endpoint,
        "ORTHANC__AWS_S3_STORAGE__VIRTUAL_ADDRESSING": "false",
        "ORTHANC__AWS_S3_STORAGE__STORAGE_ENCRYPTION__MASTER_KEY":
            json.dumps([1, str(secrets / "objfs-master-key")]),
        "ORTHANC__OBJFS__CACHE_DIRECTORY": str(tmp_path / "cache"),
        "ORTHANC__OBJFS__REST_API__PORT": str(free_port()),
        **extra})
    return env


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[list[Process]]:
    """Processes a test starts; at teardown they are stopped, so is a daemon the startup
    script left in the background, and the mount is cleared."""
    started: list[Process] = []
    yield started
    for process in started:
        process.stop(signal.SIGTERM, 60)
    pidfile = tmp_path / "objfs.pid"
    if pidfile.exists():
        try:
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass
    if str(tmp_path / "storage") in mounted_paths():
        subprocess.run(["fusermount3", "-u", "-z", str(tmp_path / "storage")], check=False)


def test_objfs_entrypoint(tmp_path: Path, moto: MotoServer, bucket: str,
                          processes: list[Process]) -> None:
    env = container_env(tmp_path, moto, bucket)
    mountpoint = Path(env["OBJFS_MOUNTPOINT"])
    entry = Process([str(DOCKER / "objfs-entrypoint.sh"), "--log-level", "DEBUG"],
                    tmp_path / "entry.log", env)
    processes.append(entry)
    wait_until(lambda: is_live_mount(mountpoint), 60, "the entrypoint's mount", entry.proc,
               entry.log)
    # exec: the entrypoint's pid is the daemon's, so `docker stop` signals objfs itself.
    argv = Path(f"/proc/{entry.pid}/cmdline").read_bytes().split(b"\0")
    assert argv[1].endswith(b"/objfs") and argv[2] == b"mount", argv
    health = subprocess.run(["objfs", "health"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert health.returncode == 0 and json.loads(health.stdout) == {"Healthy": True}
    uuid = uuid_for(42)
    write(at(mountpoint, uuid), b"DICM" * 1000)
    wait_until(lambda: len(moto.keys(bucket)) == 1, 60, "the upload")
    key, body = next(iter(moto.keys(bucket).items()))
    assert key.startswith(uuid) and body[:2] == b"A1"  # encrypted with the secret's key
    assert entry.stop(signal.SIGTERM, 60) == 0
    assert "all uploads done" in entry.text()
    assert "DEBUG" in entry.text()  # the arguments reached `objfs mount`


def test_objfs_entrypoint_refuses_a_bad_configuration(tmp_path: Path, moto: MotoServer,
                                                      bucket: str,
                                                      processes: list[Process]) -> None:
    env = container_env(tmp_path, moto, bucket, ORTHANC__OBJFS__CACHE_SIZE="1",
                        ORTHANC__AWS_S3_STORAGE__STORAGE_STRUCTURE="deep")
    out = subprocess.run([str(DOCKER / "objfs-entrypoint.sh")], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2
    assert "2 configuration problem(s)" in out.stderr
    assert "Objfs.CacheSize: must be >= 16" in out.stderr
    assert "AwsS3Storage.StorageStructure: must be one of" in out.stderr
    assert not is_live_mount(Path(env["OBJFS_MOUNTPOINT"]))


@pytest.mark.orthanc
def test_before_orthanc_script_then_orthanc(tmp_path: Path, moto: MotoServer, bucket: str,
                                            processes: list[Process]) -> None:
    env = container_env(tmp_path, moto, bucket, OBJFS_PIDFILE=str(tmp_path / "objfs.pid"))
    mountpoint = Path(env["OBJFS_MOUNTPOINT"])
    out = subprocess.run([str(DOCKER / "orthanc" / "before-orthanc.sh")], env=env,
                         stdout=open(tmp_path / "before.log", "w"), stderr=subprocess.STDOUT,
                         timeout=180)
    log = (tmp_path / "before.log").read_text()
    assert out.returncode == 0, log
    assert is_live_mount(mountpoint), log  # Orthanc starts only once the mount answers
    pid = int((tmp_path / "objfs.pid").read_text())
    orthanc = Orthanc(tmp_path, mountpoint).start()
    try:
        sent = ingest(orthanc, 5, studies=1)
        wait_until(lambda: len(moto.keys(bucket)) >= 5, 60, "uploads", poll=0.2)
        for instance, dicom in sent.items():
            assert orthanc.request("GET", f"/instances/{instance}/file") == dicom
    finally:
        orthanc.stop()
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not Path(f"/proc/{pid}").exists() or
               "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2], 60, "objfs to exit")
    assert not is_live_mount(mountpoint)


def test_before_orthanc_script_fails_when_objfs_cannot_mount(
        tmp_path: Path, moto: MotoServer, processes: list[Process]) -> None:
    env = container_env(tmp_path, moto, "no-such-bucket-here",
                        OBJFS_PIDFILE=str(tmp_path / "objfs.pid"))
    out = subprocess.run([str(DOCKER / "orthanc" / "before-orthanc.sh")], env=env,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 1
    assert "failed to mount" in out.stderr and "Orthanc not started" in out.stderr
    assert "no-such-bucket-here" in out.stderr  # objfs' own reason, on the same output
    assert not is_live_mount(Path(env["OBJFS_MOUNTPOINT"]))


# --- the orthancteam variant: its plugins and its entry-point contract ----------------------

# The image loads a plugin whose section is configured unless its variable says "false"
# (orthanc-builder's configurator, 26.8.1); these sections are objfs' configuration here.
OBJECT_STORAGE_PLUGINS = {"AwsS3Storage": "AWS_S3_STORAGE_PLUGIN_ENABLED",
                          "AzureBlobStorage": "AZURE_BLOB_STORAGE_PLUGIN_ENABLED",
                          "GoogleCloudStorage": "GOOGLE_CLOUD_STORAGE_PLUGIN_ENABLED"}
# Deprecated enabling variables make images from 26.7.0 on refuse to start.
DEPRECATED = {"AZSTOR_ENABLED"}


def image_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in dockerfile(path).get("ENV", []):
        for item in shlex.split(line.replace("\\\n", " ")):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def plugins_loaded(sections: set[str], env: dict[str, str]) -> set[str]:
    """Which object-storage plugins the image would load, by its documented rule."""
    return {section for section, var in OBJECT_STORAGE_PLUGINS.items()
            if (section in sections or (env.get(var, "false") != "false" and var in env))
            and env.get(var) != "false"}


def test_orthancteam_variant_loads_no_object_storage_plugin() -> None:
    env = image_env(DOCKER / "orthanc" / "Dockerfile")
    assert plugins_loaded(set(OBJECT_STORAGE_PLUGINS), env) == set()
    assert plugins_loaded(set(OBJECT_STORAGE_PLUGINS), {}) == set(OBJECT_STORAGE_PLUGINS)
    assert not DEPRECATED & env.keys()
    assert env["OBJFS_CONFIG"] == "/tmp/orthanc.json"  # what the entry point generates
    assert env["BEFORE_ORTHANC_STARTUP_SCRIPT"] == "/usr/local/bin/objfs-before-orthanc"
    tag = dockerfile(DOCKER / "orthanc" / "Dockerfile")["FROM"][0].split(":")[1]
    assert int(tag.split(".")[0]) >= 26
    for path in (DOCKER / "docker-compose.yml", DOCKER / "docker-compose.cloud.yml"):
        text = path.read_text()
        for section, var in OBJECT_STORAGE_PLUGINS.items():
            orthanc_side = [s for s in yaml.safe_load(text).get("services", {}).values()
                            if str(s.get("image", "")).startswith("orthancteam/orthanc")]
            for service in orthanc_side:
                names = " ".join(service.get("environment", {}) or {})
                if env_name(section) in names:
                    assert service["environment"].get(var) == "false", (path, section)


def test_orthancteam_entrypoint_contract_with_orthanc_1_13(
        tmp_path: Path, moto: MotoServer, bucket: str, processes: list[Process]) -> None:
    """The image's entry point, step by step: the configuration generated into one file,
    BEFORE_ORTHANC_STARTUP_SCRIPT run unquoted under errexit, then Orthanc exec'd on that
    file — here sid's Orthanc 1.13. objfs reads the same generated file."""
    env = container_env(tmp_path, moto, bucket, OBJFS_PIDFILE=str(tmp_path / "objfs.pid"))
    mountpoint = Path(env["OBJFS_MOUNTPOINT"])
    generated = tmp_path / "orthanc.json"  # /tmp/orthanc.json in the image
    orthanc = Orthanc(tmp_path, mountpoint, release="sid")
    generated.write_text(json.dumps({
        **orthanc.config, "AwsS3Storage": {
            "BucketName": bucket, "Region": "us-east-1", "Endpoint": moto.endpoint,
            "VirtualAddressing": False, "AccessKey": "test", "SecretKey": "test"},
        "Objfs": {"CacheDirectory": str(tmp_path / "cache"), "CacheSize": 64}}))
    env = {k: v for k, v in env.items() if not k.startswith("ORTHANC__")}
    env.update(OBJFS_CONFIG=str(generated), OBJFS_SECRETS_DIR=str(tmp_path / "no-secrets"),
               BEFORE_ORTHANC_STARTUP_SCRIPT=str(DOCKER / "orthanc" / "before-orthanc.sh"),
               **dict.fromkeys(OBJECT_STORAGE_PLUGINS.values(), "false"))
    entrypoint = tmp_path / "entrypoint.sh"
    entrypoint.write_text('#!/usr/bin/env bash\nset -o errexit\n'
                          'if [[ ! -z $BEFORE_ORTHANC_STARTUP_SCRIPT ]]; then\n'
                          '  $BEFORE_ORTHANC_STARTUP_SCRIPT\nfi\nexec "$@"\n')
    entrypoint.chmod(0o755)
    started = Process([str(entrypoint), *orthanc_argv("sid", generated)],
                      tmp_path / "entrypoint.log", env)
    processes.append(started)
    wait_until(lambda: http_ready(orthanc.url + "/system"), 120, "Orthanc 1.13",
               started.proc, started.log)
    assert is_live_mount(mountpoint)
    assert orthanc.json("GET", "/system")["Version"].startswith("1.13")
    sent = ingest(orthanc, 5, studies=1)
    wait_until(lambda: len(moto.keys(bucket)) >= 5, 60, "uploads", poll=0.2)
    for instance, dicom in sent.items():
        assert orthanc.request("GET", f"/instances/{instance}/file") == dicom
    pid = int((tmp_path / "objfs.pid").read_text())
    started.stop()  # SIGTERM to the container's processes: Orthanc and objfs
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not Path(f"/proc/{pid}").exists() or
               "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2], 60, "objfs to exit")

    # The same contract when objfs cannot mount: the script fails, so errexit stops the
    # entry point and Orthanc never starts on the bare directory.
    bad = json.loads(generated.read_text())
    bad["AwsS3Storage"]["BucketName"] = "no-such-bucket"
    generated.write_text(json.dumps(bad))
    refused = subprocess.run([str(entrypoint), "sh", "-c", "echo ORTHANC STARTED"], env=env,
                             capture_output=True, text=True, timeout=180)
    assert refused.returncode != 0 and "ORTHANC STARTED" not in refused.stdout
    assert "Orthanc not started" in refused.stderr
