"""What kernel FUSE passthrough (Linux >= 6.9) and FUSE over io_uring (Linux >= 6.14) would
bring objfs: Orthanc's ingest, warm read and delete on local disk, on objfs (local-directory
bucket, no network), and on `mirrorfs` (benchmarks/passthrough/mirrorfs.c: a minimal C mirror
on libfuse) without the writeback cache, with it (as objfs mounts), with passthrough, and with
the writeback cache over io_uring, in interleaved rounds.

Debian 12's libfuse 3.14 cannot ask for passthrough, so mirrorfs is built and run with a newer
libfuse and C library from a Debian 13 or sid tree made with debootstrap (`--chroot`; `gcc`,
`pkg-config` and `libfuse3-dev` are installed into it when missing). Debian builds libfuse
without io_uring: for the `uring` mode, `--libfuse-source` names a libfuse >= 3.18 source
tree inside the chroot (e.g. /build/libfuse, a snapshot of github.com/libfuse/libfuse), built
there with liburing (`meson`, `ninja-build`, `liburing-dev` installed when missing) into
/usr/local; the probe sets the fuse module's `enable_uring` for that mode and restores it.

    .venv/bin/python benchmarks/passthrough_probe.py --chroot /tmp/pt-trixie [--rounds 2]
    .venv/bin/python benchmarks/passthrough_probe.py --chroot /tmp/pt-sid \
        --libfuse-source /build/libfuse --modes writeback,uring --rounds 3
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

from benchmarks.orthanc_ingest import corpus, figures, local_round, paired_ratio, run_orthanc
from tests.support.daemon import Objfs, mounted_paths
from tests.support.procs import Process, wait_until

SOURCE = Path(__file__).resolve().parent / "passthrough" / "mirrorfs.c"
MODES = ("plain", "writeback", "passthrough", "uring")
# sid's (and a trixie tree's, weeks later) Release files expire; their packages still install.
APT_UPDATE = "apt-get -o Acquire::Check-Valid-Until=false update -q"
URING_SWITCH = Path("/sys/module/fuse/parameters/enable_uring")


def build(chroot: Path, libfuse_source: str | None) -> Path:
    """Compile mirrorfs inside the tree (against a libfuse built there from `libfuse_source`
    with io_uring, when given); returns the binary's path on this host."""
    if libfuse_source is not None:
        if not (chroot / "usr/local/lib64/pkgconfig/fuse3.pc").exists():
            subprocess.run(["chroot", str(chroot), "sh", "-c",
                            f"{APT_UPDATE} && apt-get install -y -q --no-install-recommends "
                            "gcc pkg-config meson ninja-build liburing-dev"],
                           check=True, stdout=subprocess.DEVNULL)
            subprocess.run(["chroot", str(chroot), "sh", "-c",
                            f"cd {libfuse_source} && meson setup --wipe objfs-build "
                            "-Denable-io-uring=true -Dexamples=false -Dtests=false "
                            "-Dutils=false --buildtype=release --prefix=/usr/local "
                            "&& ninja -C objfs-build install"],
                           check=True, stdout=subprocess.DEVNULL)
        flags = ("$(PKG_CONFIG_PATH=/usr/local/lib64/pkgconfig pkg-config --cflags --libs "
                 "fuse3)")
    else:
        if not (chroot / "usr/include/fuse3/fuse_lowlevel.h").exists():
            subprocess.run(["chroot", str(chroot), "sh", "-c",
                            f"{APT_UPDATE} && apt-get install -y -q gcc pkg-config "
                            "libfuse3-dev"], check=True, stdout=subprocess.DEVNULL)
        flags = "$(pkg-config --cflags --libs fuse3)"
    (chroot / "build").mkdir(exist_ok=True)
    shutil.copy(SOURCE, chroot / "build" / "mirrorfs.c")
    subprocess.run(["chroot", str(chroot), "sh", "-c",
                    f"cd /build && gcc -O2 -Wall -Wextra -Werror -o mirrorfs mirrorfs.c {flags} "
                    "-lpthread"], check=True)
    return chroot / "build" / "mirrorfs"


def mirror_run(work: Path, chroot: Path, binary: Path, mode: str, small: list[bytes],
               large: list[bytes]) -> dict[str, float]:
    source, mnt = work / "source", work / "mnt"
    source.mkdir(parents=True)
    mnt.mkdir()
    libs = (f"{chroot}/usr/local/lib64:{chroot}/lib/x86_64-linux-gnu:"
            f"{chroot}/usr/lib/x86_64-linux-gnu")
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


def uring_switched(on: bool) -> bool:
    """Set the fuse module's `enable_uring` (the kernel then offers FUSE over io_uring to
    new mounts); returns the former setting."""
    before = URING_SWITCH.read_text().strip() in ("Y", "1")
    URING_SWITCH.write_text("Y" if on else "N")
    return before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chroot", type=Path, required=True,
                        help="a Debian 13 (trixie) or sid tree")
    parser.add_argument("--small", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", default="plain,writeback,passthrough",
                        help=f"mirrorfs modes, comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--libfuse-source", help="a libfuse >= 3.18 source tree, as a path "
                        "inside the chroot: needed for the uring mode")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if not set(modes) <= set(MODES):
        parser.error(f"--modes: unknown {', '.join(sorted(set(modes) - set(MODES)))}")
    if "uring" in modes and (args.libfuse_source is None or not URING_SWITCH.exists()):
        parser.error("the uring mode needs --libfuse-source and a kernel with "
                     f"{URING_SWITCH}")
    binary = build(args.chroot, args.libfuse_source)
    small, large = corpus(args.small, 512)
    work = Path(tempfile.mkdtemp(prefix="objfs-probe-"))
    labels = ["local", "objfs", *(f"mirrorfs {m}" for m in modes)]
    results: dict[str, list[dict[str, float]]] = {label: [] for label in labels}
    # Off except during the uring rounds, so that no other mount meets it; as found at the end.
    uring_before = "uring" in modes and uring_switched(False)
    try:
        for rnd in range(args.rounds):
            base = work / f"round{rnd}"
            results["local"].append(local_round(base, small, large))
            results["objfs"].append(objfs_run(base / "objfs", small, large))
            for mode in modes:
                if mode == "uring":
                    uring_switched(True)
                try:
                    results[f"mirrorfs {mode}"].append(
                        mirror_run(base / mode, args.chroot, binary, mode, small, large))
                finally:
                    if mode == "uring":
                        uring_switched(False)
    finally:
        if "uring" in modes:
            uring_switched(uring_before)
        shutil.rmtree(work, ignore_errors=True)
    ingest_warm, delete = figures(small, large)
    metrics = [*ingest_warm, delete]
    print(f"Orthanc 1.10.1, {len(small)} instances of {len(small[0]) / 1e6:.2f} MB and 2 "
          f"multi-frame files; 4 REST clients; median of {args.rounds} interleaved rounds; "
          "ratios to local disk: the median of the rounds' own")
    print(f"{'':<28}" + "".join(f" {label:>19}" for label in labels))
    for title, unit, fn in metrics:
        meds = [statistics.median(fn(r) for r in results[label]) for label in labels]
        ratios = [paired_ratio(map(fn, results[label]), map(fn, results[labels[0]]))
                  for label in labels]
        print(f"{title + ' (' + unit + ')':<28}" + "".join(
            f" {m:>10.1f} {r:>6.2f}x" for m, r in zip(meds, ratios, strict=True)))


if __name__ == "__main__":
    main()
