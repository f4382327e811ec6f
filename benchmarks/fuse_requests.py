"""What the kernel asks objfs for each of Orthanc's operations: FUSE requests per instance and
their round-trip time, by phase, read from the kernel's fuse tracepoints.

Orthanc (on objfs over moto) stores the small instances (4 REST clients), reads them back
while the page cache holds them (warm), again after a restart with the objfs cache wiped
and the page cache dropped (cold), again with only the page cache dropped (cached), and
deletes them. For each phase it prints the requests per instance by opcode and the mean
time from the kernel sending a request to the daemon's answer (`fuse:fuse_request_send` to
`fuse:fuse_request_end`, so a request's wait in the queue counts). The tracepoints see every
FUSE mount on the machine: run nothing else meanwhile.

Needs root and a kernel with the fuse tracepoints (6.18 on the project's machine; tracefs is
mounted if it is not).

    .venv/bin/python benchmarks/fuse_requests.py [--small 300] [--rounds 1] [--clients 4]
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.ab_revisions import workspace
from benchmarks.orthanc_ingest import (
    CLIENTS,
    corpus,
    drop_page_cache,
    idle_cpus_note,
    read_instances,
)
from tests.support.daemon import Objfs
from tests.support.emulators import MotoServer
from tests.support.orthanc import Orthanc

TRACING = Path("/sys/kernel/tracing")
SEND = re.compile(r"(\d+\.\d+): fuse_request_send: connection \d+ req (\d+) opcode \d+ "
                  r"\((\w+)\)")
END = re.compile(r"(\d+\.\d+): fuse_request_end: connection \d+ req (\d+)")

# phase -> opcode -> (requests per instance, mean round trip in µs), one dict per round
Round = dict[str, dict[str, tuple[float, float]]]


def tracepoints() -> Path:
    """The fuse tracepoints' directory, tracefs mounted if needed; SystemExit if absent."""
    if not (TRACING / "events").is_dir():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACING)], check=False)
    events = TRACING / "events" / "fuse"
    if not (events / "fuse_request_send").is_dir():
        raise SystemExit(f"no fuse tracepoints under {events} (a kernel with them, as root)")
    return events


def traced(events: Path, action: Callable[[], object],
           instances: int) -> dict[str, tuple[float, float]]:
    """Run `action` with the fuse tracepoints on; requests per instance and mean round trip
    (µs) by opcode."""
    (TRACING / "buffer_size_kb").write_text("65536")
    (TRACING / "trace").write_text("")
    (events / "enable").write_text("1")
    try:
        action()
    finally:
        (events / "enable").write_text("0")
    sent: dict[str, tuple[float, str]] = {}
    counts: collections.Counter[str] = collections.Counter()
    times: dict[str, list[float]] = collections.defaultdict(list)
    for line in (TRACING / "trace").read_text().splitlines():
        if found := SEND.search(line):
            sent[found[2]] = (float(found[1]), found[3].removeprefix("FUSE_"))
            counts[found[3].removeprefix("FUSE_")] += 1
        elif (found := END.search(line)) and found[2] in sent:
            start, op = sent.pop(found[2])
            times[op].append(float(found[1]) - start)
    return {op: (n / instances, statistics.mean(times[op]) * 1e6 if times[op] else 0.0)
            for op, n in counts.most_common()}


def summary(runs: list[dict[str, tuple[float, float]]]) -> str:
    """`traced`'s results of several runs in one line: each opcode's requests per item and
    mean round trip, medians over the runs, the most frequent (in the first run) first."""
    ops = sorted({op for run in runs for op in run},
                 key=lambda op: -runs[0].get(op, (0.0, 0.0))[0])
    cells = []
    for op in ops:
        per = statistics.median(run.get(op, (0.0, 0.0))[0] for run in runs)
        took = statistics.median(run.get(op, (0.0, 0.0))[1] for run in runs)
        cells.append(f"{op} {per:.2f} ({took:.0f} us)")
    return ", ".join(cells)


def one_round(work: Path, moto: MotoServer, small: list[bytes], events: Path,
              clients: int) -> Round:
    orthanc = Orthanc(work, work / "objfs-mnt", name="orthanc")
    config = {"AwsS3Storage": moto.s3_section(moto.new_bucket(f"fuse-requests-{work.name}")),
              "Objfs": {"CacheDirectory": str(work / "cache"), "CacheSize": 4096,
                        "Orthanc": {"Url": orthanc.url}}}
    daemon = Objfs(work, config)
    out: Round = {}
    try:
        daemon.start()
        orthanc.start()
        ids: list[str] = []

        def ingest() -> None:
            with ThreadPoolExecutor(clients) as pool:
                ids.extend(pool.map(orthanc.upload, small))

        out["store"] = traced(events, ingest, len(small))
        daemon.wait_uploaded(600)
        out["warm read"] = traced(events, lambda: read_instances(orthanc, ids, clients),
                                  len(ids))
        orthanc.stop()
        daemon.stop()
        shutil.rmtree(work / "cache")
        daemon.start()
        drop_page_cache()
        orthanc.start()
        out["cold read"] = traced(events, lambda: read_instances(orthanc, ids, clients),
                                  len(ids))
        drop_page_cache()
        out["cached read"] = traced(events, lambda: read_instances(orthanc, ids, clients),
                                    len(ids))

        def delete() -> None:
            for patient in orthanc.json("GET", "/patients"):
                orthanc.request("DELETE", f"/patients/{patient}")

        out["delete"] = traced(events, delete, len(ids))
    finally:
        orthanc.stop()
        daemon.cleanup()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=300)
    parser.add_argument("--small-kb", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--clients", type=int, default=CLIENTS,
                        help="concurrent REST clients that store and read (one alone shows "
                             "each request's own round trip, without waiting for the others')")
    args = parser.parse_args()
    events = tracepoints()
    small, _ = corpus(args.small, args.small_kb)
    rounds: list[Round] = []
    with workspace("objfs-fuse-requests-") as ws:
        moto = ws.moto()
        for number in range(args.rounds):
            (ws.work / f"r{number}").mkdir()
            rounds.append(one_round(ws.work / f"r{number}", moto, small, events, args.clients))
    print(f"FUSE requests per instance ({args.small} instances of {args.small_kb} KiB, Orthanc "
          f"on objfs over moto, {args.clients} clients; delete: one patient after the other), "
          f"mean round trip from the kernel's send to the daemon's answer; median of "
          f"{args.rounds} rounds")
    if (note := idle_cpus_note()) is not None:
        print(note)
    for phase in rounds[0]:
        total = statistics.median(sum(n for n, _ in r[phase].values()) for r in rounds)
        print(f"  {phase:<12} {total:5.2f}: " + summary([r[phase] for r in rounds]))


if __name__ == "__main__":
    main()
