"""A/B of objfs variants under the same Orthanc workload, in alternating rounds.

Each variant is a git revision of this repository (the daemon runs from a temporary worktree
of it) or this tree with extra environment variables (for instance an option overridden as
``ORTHANC__OBJFS__BACKGROUND_HOLD=0``). Every round runs each variant once, the order
reversed every other round, each on a fresh moto bucket and a fresh daemon: ingest of the
small instances (4 REST clients) and of the multi-frame files (2 clients), the wait until
everything is in the bucket, a warm read of everything, the small instances sent again
by one client (Orthanc writes each duplicate, then unlinks it), a cold read of the small instances
(the daemon restarted with its cache wiped, the page cache dropped), and the delete of every
patient, against moto (or, with `--backend`, Azurite or fake-gcs-server).
`--encrypted` runs everything with A1 encryption. `--fresh-delete` skips the cold
read, so that the delete finds the copies Orthanc wrote and fsynced (a site that ingests,
anonymizes and deletes the originals) rather than copies just downloaded.

Prints each run, then per variant the medians and, against the first variant, in how many
rounds it was ahead: with this machine's noise a median alone proves little.

    .venv/bin/python benchmarks/ab_revisions.py --variant before=rev:HEAD~1 \\
        --variant after=rev:HEAD [--variant hold0=env:ORTHANC__OBJFS__BACKGROUND_HOLD=0] \\
        [--rounds 6] [--small 300] [--encrypted] [--fresh-delete] [--backend azure]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.orthanc_ingest import (
    CLIENTS,
    EMULATOR_NICE,
    UPLOAD_CONCURRENCY,
    corpus,
    drop_page_cache,
    proc_usage,
    read_instances,
    resend,
)
from objfs import codec
from tests.support.daemon import Objfs
from tests.support.emulators import AzuriteServer, FakeGcsServer, MotoServer
from tests.support.orthanc import Orthanc

ROOT = Path(__file__).resolve().parent.parent
# (name, unit, higher is better)
FIGURES = [("small", "inst/s", True), ("multi", "MB/s", True), ("lag", "s", False),
           ("warm", "MB/s", True), ("resend", "inst/s", True), ("cold", "MB/s", True),
           ("delete", "inst/s", True),
           ("cpu_small", "ms/inst", False), ("cpu_cold", "ms/inst", False)]


@dataclass
class Variant:
    name: str
    tree: Path  # the daemon is started from here (`python -m objfs` imports it from its cwd)
    env: dict[str, str] = field(default_factory=dict)
    runs: list[dict[str, float]] = field(default_factory=list)


def start_from(daemon: Objfs, tree: Path) -> None:
    """Start `daemon` from `tree`: `python -m objfs` imports objfs from its working
    directory, which the child inherits."""
    here = Path.cwd()
    os.chdir(tree)
    try:
        daemon.start()
    finally:
        os.chdir(here)


# The stand-in servers by backend name (`--backend`).
SERVERS: dict[str, type[MotoServer] | type[AzuriteServer] | type[FakeGcsServer]] = {
    "s3": MotoServer, "azure": AzuriteServer, "gcs": FakeGcsServer}
Server = MotoServer | AzuriteServer | FakeGcsServer


def one_run(work: Path, server: Server, variant: Variant, small: list[bytes],
            large: list[bytes], index: int, key: Path | None,
            fresh_delete: bool = False) -> dict[str, float]:
    bucket = server.new_bucket(f"ab-run-{index}")
    base = work / f"run{index}"
    base.mkdir()
    section = server.section(bucket)
    if key is not None:
        section["StorageEncryption"] = {"MasterKey": [1, str(key)]}
    orthanc = Orthanc(base, base / "objfs-mnt", name="orthanc")
    config = {server.section_name: section,
              "Objfs": {"CacheDirectory": str(base / "cache"), "CacheSize": 4096,
                        "UploadConcurrency": UPLOAD_CONCURRENCY,
                        "Orthanc": {"Url": orthanc.url}}}
    daemon = Objfs(base, config, env=variant.env)
    assert daemon.mountpoint == base / "objfs-mnt"
    start_from(daemon, variant.tree)
    orthanc.start()
    out: dict[str, float] = {}

    def read(which: list[str]) -> float:
        """MB/s of Orthanc serving `which` to CLIENTS clients."""
        start = time.perf_counter()
        got = read_instances(orthanc, which, CLIENTS)
        return got / 1e6 / (time.perf_counter() - start)

    try:
        assert daemon.process is not None
        pid = daemon.process.pid
        cpu = proc_usage(pid)[1]
        start = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            small_ids = list(pool.map(orthanc.upload, small))
        small_done = time.perf_counter()
        out["cpu_small"] = (proc_usage(pid)[1] - cpu) * 1000 / len(small)
        with ThreadPoolExecutor(2) as pool:
            ids = small_ids + list(pool.map(orthanc.upload, large))
        acked = time.perf_counter()
        daemon.wait_uploaded(timeout=900)
        out["lag"] = time.perf_counter() - acked
        out["small"] = len(small) / (small_done - start)
        out["multi"] = sum(map(len, large)) / 1e6 / (acked - small_done)
        out["warm"] = read(ids)
        start = time.perf_counter()
        resend(orthanc, small)
        out["resend"] = len(small) / (time.perf_counter() - start)
        if not fresh_delete:
            orthanc.stop()
            daemon.stop()
            shutil.rmtree(base / "cache")
            start_from(daemon, variant.tree)
            drop_page_cache()
            orthanc.start()
            assert daemon.process is not None
            cpu = proc_usage(daemon.process.pid)[1]
            out["cold"] = read(small_ids)
            out["cpu_cold"] = (proc_usage(daemon.process.pid)[1] - cpu) * 1000 / len(small_ids)
        start = time.perf_counter()
        for patient in orthanc.json("GET", "/patients"):
            orthanc.request("DELETE", f"/patients/{patient}")
        out["delete"] = len(ids) / (time.perf_counter() - start)
    finally:
        orthanc.stop()
        daemon.cleanup()
    return out


def parse_variant(text: str, work: Path, made: list[Path]) -> Variant:
    name, _, spec = text.partition("=")
    kind, _, value = spec.partition(":")
    if not name or kind not in ("rev", "env"):
        raise SystemExit(f"--variant {text!r}: expected NAME=rev:REVISION or NAME=env:K=V[,K=V]")
    if kind == "env":
        env = dict(pair.split("=", 1) for pair in value.split(",") if pair)
        return Variant(name, ROOT, env)
    tree = work / f"tree-{name}"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree),
                    value], check=True)
    made.append(tree)
    return Variant(name, tree)


def remove_trees(made: list[Path]) -> None:
    """Remove the worktrees `parse_variant` made."""
    for tree in made:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                       check=False)


@dataclass
class Workspace:
    """A benchmark's scratch directory in /var/tmp, the worktrees `parse_variant` made for it
    (`made`) and the stand-in server it started (`moto`, `start`): all removed or stopped
    when its `with` block ends, however it ends."""
    work: Path
    made: list[Path] = field(default_factory=list)
    server: Server | None = None

    def moto(self) -> MotoServer:
        server = self.start("s3")
        assert isinstance(server, MotoServer)
        return server

    def start(self, backend: str) -> Server:
        """The stand-in server of `backend` ("s3", "azure", "gcs"), at EMULATOR_NICE."""
        self.server = SERVERS[backend](self.work, nice=EMULATOR_NICE)
        return self.server

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *_: object) -> None:
        if self.server is not None:
            self.server.stop()
        remove_trees(self.made)
        shutil.rmtree(self.work, ignore_errors=True)


def workspace(prefix: str) -> Workspace:
    return Workspace(Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", required=True,
                        help="NAME=rev:REVISION or NAME=env:K=V[,K=V] (two or more)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--small", type=int, default=300)
    parser.add_argument("--encrypted", action="store_true", help="A1 encryption in every run")
    parser.add_argument("--fresh-delete", action="store_true",
                        help="no cold read: delete the copies Orthanc wrote")
    parser.add_argument("--backend", choices=sorted(SERVERS), default="s3",
                        help="the bucket's stand-in server (default: moto)")
    args = parser.parse_args()
    if len(args.variant) < 2:
        parser.error("give at least two --variant")
    ws = workspace("objfs-ab-")
    work, made = ws.work, ws.made
    with ws:
        variants = [parse_variant(v, work, made) for v in args.variant]
        small, large = corpus(args.small, 512)
        key = None
        if args.encrypted:
            key = work / "master.key"
            codec.write_key_file(key)
        server = ws.start(args.backend)
        encrypted = ", A1 encryption" if key else ""
        print(f"{len(small)} instances of 0.53 MB and 2 multi-frame files, "
              f"{type(server).__name__} at nice {EMULATOR_NICE}{encrypted}; {args.rounds} "
              "rounds, order reversed every other round")
        index = 0
        for rnd in range(args.rounds):
            for variant in variants if rnd % 2 == 0 else variants[::-1]:
                index += 1
                run = one_run(work, server, variant, small, large, index, key,
                              args.fresh_delete)
                variant.runs.append(run)
                print(f"round {rnd} {variant.name:>10}: " + "  ".join(
                    f"{name} {run[name]:.2f}" for name, _, _ in FIGURES if name in run),
                      flush=True)
    first = variants[0]
    for variant in variants:
        cells = []
        for name, unit, higher in FIGURES:
            if name not in first.runs[0]:
                continue
            median = statistics.median(r[name] for r in variant.runs)
            cell = f"{name} {median:.2f} {unit}"
            if variant is not first:
                ahead = sum(mine[name] > theirs[name] if higher else mine[name] < theirs[name]
                            for mine, theirs in zip(variant.runs, first.runs, strict=True))
                cell += f" (ahead of {first.name} in {ahead}/{len(variant.runs)})"
            cells.append(cell)
        print(f"median {variant.name}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
