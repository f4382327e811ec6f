"""What kernel FUSE passthrough (Linux >= 6.9) would bring objfs: Orthanc's ingest, warm read
and delete on local disk, on objfs (local-directory bucket, no network), and on `mirrorfs`
(benchmarks/passthrough/mirrorfs.c: a minimal C mirror on libfuse 3.17) without the writeback
cache, with it (as objfs mounts), and with passthrough, in interleaved rounds.

Debian 12's libfuse 3.14 cannot ask for passthrough, so mirrorfs is built and run with
Debian 13's libfuse 3.17 and C library from a trixie tree made with debootstrap
(`--chroot`; `gcc`, `pkg-config` and `libfuse3-dev` are installed into it when missing).

    .venv/bin/python benchmarks/passthrough_probe.py --chroot /tmp/pt-trixie [--rounds 2]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.orthanc_ingest import corpus, figures, local_round, run_orthanc
from tests.support.daemon import Objfs, mounted_paths
from tests.support.procs import Process, wait_until

SOURCE = Path(__file__).resolve().parent / "passthrough" / "mirrorfs.c"
MODES = ("plain", "writeback", "passthrough")


def build(chroot: Path) -> Path:
    """Compile mirrorfs inside the trixie tree; returns the binary's path on this host."""
    if not (chroot / "usr/include/fuse3/fuse_lowlevel.h").exists():
        subprocess.run(["chroot", str(chroot), "sh", "-c",
                        "apt-get update -q && apt-get install -y -q gcc pkg-config "
                        "libfuse3-dev"], check=True, stdout=subprocess.DEVNULL)
    (chroot / "build").mkdir(exist_ok=True)
    shutil.copy(SOURCE, chroot / "build" / "mirrorfs.c")
    subprocess.run(["chroot", str(chroot), "sh", "-c",
                    "cd /build && gcc -O2 -Wall -Wextra -Werror -o mirrorfs mirrorfs.c "
                    "$(pkg-config --cflags --libs fuse3) -lpthread"], check=True)
    return chroot / "build" / "mirrorfs"


def mirror_run(work: Path, chroot: Path, binary: Path, mode: str, small: list[bytes],
               large: list[bytes]) -> dict[str, float]:
    source, mnt = work / "source", work / "mnt"
    source.mkdir(parents=True)
    mnt.mkdir()
    libs = f"{chroot}/lib/x86_64-linux-gnu:{chroot}/usr/lib/x86_64-linux-gnu"
    proc = Process([str(chroot / "lib64/ld-linux-x86-64.so.2"), "--library-path", libs,
                    str(binary), str(source), str(mnt), mode], work / "mirrorfs.log")
    try:
        wait_until(lambda: mounted_paths().get(str(mnt)) == "fuse", 10, "mirrorfs mount",
                   proc.proc, proc.log)
        return run_orthanc(work, mnt, small, large, None, None, None)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        proc.stop()


def objfs_run(work: Path, small: list[bytes], large: list[bytes]) -> dict[str, float]:
    work.mkdir(parents=True)
    daemon = Objfs(work, {"Objfs": {"CacheDirectory": str(work / "cache"), "CacheSize": 4096,
                                    "LocalBucket": str(work / "bucket")}})
    try:
        daemon.start()
        return run_orthanc(work, daemon.mountpoint, small, large, None, None, None)
    finally:
        daemon.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chroot", type=Path, required=True, help="a Debian 13 (trixie) tree")
    parser.add_argument("--small", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    binary = build(args.chroot)
    small, large = corpus(args.small, 512)
    work = Path(tempfile.mkdtemp(prefix="objfs-probe-"))
    labels = ["local", "objfs", *(f"mirrorfs {m}" for m in MODES)]
    results: dict[str, list[dict[str, float]]] = {label: [] for label in labels}
    try:
        for rnd in range(args.rounds):
            base = work / f"round{rnd}"
            results["local"].append(local_round(base, small, large))
            results["objfs"].append(objfs_run(base / "objfs", small, large))
            for mode in MODES:
                results[f"mirrorfs {mode}"].append(
                    mirror_run(base / mode, args.chroot, binary, mode, small, large))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ingest_warm, delete = figures(small, large)
    metrics = [*ingest_warm, delete]
    print(f"Orthanc 1.10.1, {len(small)} instances of {len(small[0]) / 1e6:.2f} MB and 2 "
          f"multi-frame files; 4 REST clients; median of {args.rounds} interleaved rounds; "
          "ratios to local disk")
    print(f"{'':<28}" + "".join(f" {label:>19}" for label in labels))
    for title, unit, fn in metrics:
        meds = [statistics.median(fn(r) for r in results[label]) for label in labels]
        print(f"{title + ' (' + unit + ')':<28}" + "".join(
            f" {m:>10.1f} {m / meds[0]:>6.2f}x" for m in meds))


if __name__ == "__main__":
    main()
