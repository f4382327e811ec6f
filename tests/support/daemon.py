"""objfs daemons in subprocesses on real FUSE mounts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from objfs.journal import Stats, read_stats
from objfs.mountinfo import mounts
from tests.support.fuse import require_fuse
from tests.support.procs import Process, free_port, http_ready, wait_until


def mounted_paths() -> dict[str, str]:
    """Mount point -> filesystem type (objfs.mountinfo, which unescapes the paths)."""
    return {path: mount.fstype for path, mount in mounts().items()}


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
        require_fuse()
        self.process = Process([sys.executable, "-m", "objfs", "mount", "--log-level", "INFO",
                                "--config", str(self.config_path), str(self.mountpoint)],
                               self.log, self.env)
        # The REST API too: it listens before the mount, and after a kill -9 the old mount can
        # still look live for a moment, while the old daemon's port no longer answers.
        wait_until(lambda: is_live_mount(self.mountpoint) and http_ready(self.api + "/health"),
                   timeout, "objfs mount", self.process.proc, self.log)
        return self

    def stop(self, timeout: float = 120) -> int | None:
        """SIGTERM and wait; returns the exit status."""
        assert self.process is not None
        code = self.process.stop(signal.SIGTERM, timeout)
        self.cleanup()
        return code

    def refused_start(self) -> str:
        """Run `objfs mount` on this configuration, expecting it to refuse: exit 1 with a
        reason and no traceback, nothing mounted. Returns its stderr."""
        start = subprocess.run([sys.executable, "-m", "objfs", "mount", "--config",
                                str(self.config_path), str(self.mountpoint)],
                               capture_output=True, text=True, timeout=60)
        assert start.returncode == 1, start.stderr
        assert "Traceback" not in start.stderr, start.stderr
        assert not os.path.ismount(self.mountpoint)
        return start.stderr

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

    def wait_inventory(self, timeout: float = 30) -> None:
        """Until the bucket's inventory is complete: from then on a new name is known to be
        new without asking the bucket. Tests that freeze the bucket right after a start wait
        for it, or a create may still be asking the bucket and get EIO (invariant 9)."""
        wait_until(lambda: "inventory complete" in self.text(), timeout, "the inventory")

    def wait_uploaded(self, timeout: float = 120) -> None:
        def idle() -> bool:
            stats = self.journal_stats()
            return stats.pending_uploads == 0 and stats.pending_deletes == 0

        wait_until(idle, timeout, "uploads to finish", poll=0.05)
