"""Shared fixtures.

FUSE is required by every test that mounts objfs: without it those tests fail (never skip)
and the run ends with a banner saying why; tests that need no mount run and pass anyway.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Objfs
from tests.support.emulators import AzuriteServer, FakeGcsServer, MotoServer
from tests.support.fuse import fuse_problems


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    problems = fuse_problems()
    if problems:
        terminalreporter.section("FUSE IS NOT USABLE HERE", sep="!", red=True, bold=True)
        terminalreporter.line("every test that mounts objfs failed: " + "; ".join(problems),
                              red=True)


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzuriteServer]:
    server = AzuriteServer(tmp_path_factory.mktemp("azurite"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fake_gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeGcsServer]:
    server = FakeGcsServer(tmp_path_factory.mktemp("fake-gcs"))
    yield server
    server.stop()


CLOUD_FIXTURES = {"s3": "moto", "azure": "azurite", "gcs": "fake_gcs"}


def cloud_server(request: pytest.FixtureRequest, cloud: str) -> Any:
    """The local emulator of `cloud` ("s3", "azure" or "gcs")."""
    return request.getfixturevalue(CLOUD_FIXTURES[cloud])


def bucket_name(request: pytest.FixtureRequest) -> str:
    return "b" + format(abs(hash(request.node.nodeid)) % 10**12, "012d")


@pytest.fixture
def bucket(moto: MotoServer, request: pytest.FixtureRequest) -> str:
    return moto.new_bucket(bucket_name(request))


@pytest.fixture
def objfs_factory(tmp_path: Path) -> Iterator[Callable[..., Objfs]]:
    """Make objfs daemons; every one is stopped and unmounted at teardown."""
    made: list[Objfs] = []

    def make(config: dict[str, Any], name: str = "objfs", **kw: Any) -> Objfs:
        daemon = Objfs(tmp_path, config, name, **kw)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.cleanup()


def local_config(tmp_path: Path, **objfs: Any) -> dict[str, Any]:
    return {"Objfs": {"CacheDirectory": str(tmp_path / "cache"),
                      "LocalBucket": str(tmp_path / "bucket"), "CacheSize": 256,
                      "ShutdownDrainTimeout": 30, **objfs}}


@pytest.fixture
def small_disk(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """`tmp_path/cache` on a tmpfs of 48 MiB (needs root, as the whole suite), unmounted
    (lazily: a daemon may still hold it) at teardown."""
    cache = tmp_path / "cache"
    cache.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m,mode=0700", "objfs-test", str(cache)],
                   check=True)
    request.addfinalizer(lambda: subprocess.run(["umount", "-l", str(cache)], check=False))
    return cache


def fill(path: Path) -> None:
    """Write zeros into `path` until its disk is full. Unbuffered: a buffered file keeps
    what the last write could not place and fails again when it is closed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with pytest.raises(OSError) as filled:
            while True:
                os.write(fd, b"\0" * 65536)
    finally:
        os.close(fd)
    assert filled.value.errno == errno.ENOSPC
