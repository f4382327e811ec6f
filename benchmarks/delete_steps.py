"""Where the time of one Orthanc delete goes: its six system calls, timed one by one, on
objfs over moto and on local disk in the same run.

Orthanc removes an attachment with `lstat(file)`, `unlink(file)`, then `lstat` and `rmdir` of
its directory and of the directory above (both usually refused: ENOTEMPTY). This script writes
N files the way Orthanc stores them (create, one write, `fdatasync`, close) under the mount and
under a local directory, reads each once (as the benchmark's cold read does before deleting),
waits until objfs has uploaded them, then deletes them one after the other with Orthanc's
sequence, timing each call. Rounds alternate between local disk and objfs. With `--trace`
(root, a kernel with the fuse tracepoints) it also prints each FUSE request's round trip during
objfs' deletes, from the kernel's send to the daemon's answer: a call's time beyond its
requests' round trips is the kernel's own work and the caller's wake-up.

    .venv/bin/python benchmarks/delete_steps.py [--files 600] [--rounds 3] [--trace]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
import uuid as uuid_mod
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.ab_revisions import workspace
from benchmarks.fuse_requests import summary, traced, tracepoints
from benchmarks.orthanc_ingest import EMULATOR_NICE, idle_cpus_note
from tests.support.daemon import Objfs

STEPS = ("lstat file", "unlink file", "lstat dir", "rmdir dir", "lstat parent", "rmdir parent")
FILE_KB = 512

# step -> seconds of each call
Timings = dict[str, list[float]]


def store(root: Path, count: int, data: bytes) -> list[Path]:
    """`count` attachments under `root` as Orthanc writes them, each read back once."""
    paths = []
    for _ in range(count):
        uuid = str(uuid_mod.uuid4())
        folder = root / uuid[:2] / uuid[2:4]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / uuid
        with open(path, "xb", buffering=0) as file:  # unbuffered: one write call
            file.write(data)
            os.fdatasync(file.fileno())
        paths.append(path)
    for path in paths:
        os.stat(path)
        path.read_bytes()
    return paths


def delete_all(paths: list[Path]) -> Timings:
    """Orthanc's delete of each of `paths`, one after the other, each call timed."""
    took: Timings = {step: [] for step in STEPS}
    clock = time.perf_counter

    def timed(step: str, call: Callable[[str], object], path: str) -> None:
        start = clock()
        try:
            call(path)
        except OSError:
            pass  # rmdir of a directory that still holds files: ENOTEMPTY, as for Orthanc
        took[step].append(clock() - start)

    for path in paths:
        dirs = (("dir", str(path.parent)), ("parent", str(path.parent.parent)))
        name = str(path)
        timed("lstat file", os.lstat, name)
        timed("unlink file", os.unlink, name)
        for label, folder in dirs:
            timed(f"lstat {label}", os.lstat, folder)
            timed(f"rmdir {label}", os.rmdir, folder)
    return took


def _collect(into: list[Timings], paths: list[Path]) -> None:
    """`delete_all` for `traced`, which calls its action without arguments (a lambda in the
    loop would not bind the round's variables)."""
    into.append(delete_all(paths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trace", action="store_true",
                        help="also the FUSE requests' round trips (fuse tracepoints, root)")
    args = parser.parse_args()
    events = tracepoints() if args.trace else None
    data = os.urandom(FILE_KB << 10)
    local: list[Timings] = []
    mounted: list[Timings] = []
    trips: list[dict[str, tuple[float, float]]] = []
    with workspace("objfs-delete-steps-") as ws:
        moto = ws.moto()
        for number in range(args.rounds):
            work = ws.work / f"r{number}"
            work.mkdir()
            paths = store(work / "local", args.files, data)
            local.append(delete_all(paths))
            config = {"AwsS3Storage": moto.s3_section(moto.new_bucket(f"delete-steps-{number}")),
                      "Objfs": {"CacheDirectory": str(work / "cache"), "CacheSize": 4096}}
            daemon = Objfs(work, config)
            try:
                daemon.start()
                paths = store(daemon.mountpoint, args.files, data)
                daemon.wait_uploaded(600)
                time.sleep(1.0)  # past the burst: the deletes start from a quiet daemon
                if events is not None:
                    got: list[Timings] = []
                    trips.append(traced(events, functools.partial(_collect, got, paths),
                                        args.files))
                    mounted.append(got[0])
                else:
                    mounted.append(delete_all(paths))
            finally:
                daemon.cleanup()
    print(f"Orthanc's delete, call by call ({args.files} files of {FILE_KB} KiB, written, read "
          f"once and deleted one after the other; objfs over moto at nice {EMULATOR_NICE}, the "
          f"files uploaded first); medians of each round's median, {args.rounds} alternating "
          "rounds")
    if (note := idle_cpus_note()) is not None:
        print(note)
    print(f"  {'call':<14} {'local µs':>9} {'objfs µs':>9} {'objfs/local':>12}")

    def median_of(runs: list[Timings], step: str) -> float:
        return statistics.median(statistics.median(run[step]) for run in runs) * 1e6

    whole_local = whole_objfs = 0.0
    for step in STEPS:
        here, there = median_of(local, step), median_of(mounted, step)
        whole_local += here
        whole_objfs += there
        print(f"  {step:<14} {here:9.1f} {there:9.1f} {there / here:11.1f}x")
    print(f"  {'one delete':<14} {whole_local:9.1f} {whole_objfs:9.1f} "
          f"{whole_objfs / whole_local:11.1f}x")
    if trips:
        print("FUSE requests per delete (mean round trip): " + summary(trips))


if __name__ == "__main__":
    main()
