"""Orthanc on local disk vs Orthanc on objfs (write-back) on each cloud emulator, one run.

Prints figures and ratios to local disk: ingest (small instances/s, large MB/s), time until
everything is durable in the bucket, warm read, resend of the small instances by one client
(duplicates Orthanc writes, then unlinks), cold read (caches emptied), cached read (objfs'
copies, page cache dropped), delete; the daemon's peak RSS and CPU seconds; the CPU the daemon
and the stand-in server each take on this machine (ingest until durable, and per cold read);
for the small ingest, the warm read and the delete, the CPU every process (and the kernel's
threads) takes per item, against the least time per item that allows on this machine's CPUs;
and the background upload throughput against raw boto3 PUTs of the same files at the same
concurrency. objfs is told Orthanc's URL (`Objfs.Orthanc.Url`) as a site configures it, so
its series prefetch (on by default) takes part in the cold read.

    .venv/bin/python benchmarks/orthanc_ingest.py [--small 300] [--small-kb 512]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from objfs import codec
from tests.support.daemon import Objfs
from tests.support.dicom import make_dicom
from tests.support.emulators import AzuriteServer, FakeGcsServer, MotoServer
from tests.support.orthanc import Orthanc
from tests.support.procs import wait_until

CLIENTS = 4
UPLOAD_CONCURRENCY = 8
# Object storage is remote in production: the emulators' CPU should not be taken from the
# system under test on this 2-core machine, so they run at a lower priority.
EMULATOR_NICE = 10


def corpus(n_small: int, small_kb: int) -> tuple[list[bytes], list[bytes]]:
    side = int((small_kb * 1024 / 2) ** 0.5)
    small = [make_dicom(i, rows=side, cols=side, patient=f"BENCH^{i % 3}", study=i % 6,
                        series=i % 12) for i in range(n_small)]
    large = [make_dicom(10_000 + i, rows=512, cols=512, frames=frames, patient="BENCH^LARGE",
                        study=100 + i) for i, frames in enumerate((60, 150))]
    return small, large


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def round_ratios(figures: Iterable[float], bases: Iterable[float]) -> list[float]:
    """Each round's figure over its base figure, both given in round order: rounds
    interleave, so each pair ran the same minute. Raises ValueError when the two differ in
    length."""
    return [a / b for a, b in zip(figures, bases, strict=True)]


def paired_ratio(figures: Iterable[float], bases: Iterable[float]) -> float:
    """The median of `round_ratios` (the ratio of the two medians could pair figures of
    different rounds)."""
    return statistics.median(round_ratios(figures, bases))


def timed(fn: Any, *args: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def proc_usage(pid: int) -> tuple[float, float]:
    """(peak RSS in MB, CPU seconds) of a live process."""
    status = Path(f"/proc/{pid}/status").read_text()
    hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return hwm / 1024, (int(fields[11]) + int(fields[12])) / ticks


def cpu_seconds(pid: int | None) -> float:
    """CPU seconds a live process has used so far (0 for None: nothing to count)."""
    return 0.0 if pid is None else proc_usage(pid)[1]


def machine_busy() -> float:
    """CPU seconds this machine's CPUs have been busy since boot (/proc/stat: user, nice,
    system, irq and softirq; not idle, iowait, or steal, the hypervisor's; guest time is
    already in user)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


CPUIDLE_DRIVER = Path("/sys/devices/system/cpu/cpuidle/current_driver")
GUEST_HALT_POLL = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")


def idle_cpus_note() -> str | None:
    """What an idle CPU of this machine does, when the kernel says: a virtual machine whose
    idle vCPUs halt at once pays a wake-up through the hypervisor whenever a FUSE request or
    its answer finds the other side's CPU idle, which local disk's system calls do not."""
    try:
        driver = CPUIDLE_DRIVER.read_text().strip()
    except OSError:
        return None
    note = f"idle CPUs: cpuidle driver {driver}"
    try:
        polling = int(GUEST_HALT_POLL.read_text())
    except (OSError, ValueError):
        return note
    if polling:
        return note + f", an idle vCPU polls {polling / 1000:.0f} µs before it halts"
    return note + ", guest halt polling off (an idle vCPU halts at once: a FUSE round trip " \
        "that finds one idle waits for its wake-up)"


# Who takes the machine's CPU in a phase: the processes by name, "client" (this process: the
# REST clients), "other" (the kernel's threads, e.g. writeback and ext4's journal, and
# anything else running) and "busy" (all of it).
CPU_SHARES = ("orthanc", "client", "daemon", "server", "other", "busy")


def cpu_snapshot(pids: dict[str, int | None]) -> dict[str, float]:
    return {**{who: cpu_seconds(pid) for who, pid in pids.items()},
            "client": time.process_time(), "busy": machine_busy(), "took": time.perf_counter()}


def cpu_shares(before: dict[str, float], pids: dict[str, int | None],
               per: int) -> dict[str, float]:
    """Milliseconds of CPU per item (`per` items) each of CPU_SHARES took since `before`, and
    of wall-clock time ("took")."""
    after = cpu_snapshot(pids)
    used = {who: after[who] - before[who] for who in after}
    used["other"] = used["busy"] - sum(v for who, v in used.items() if who not in ("busy", "took"))
    return {who: max(0.0, used.get(who, 0.0)) * 1e3 / per for who in (*CPU_SHARES, "took")}


def read_instances(orthanc: Orthanc, ids: list[str], clients: int) -> int:
    """Bytes of every instance's file read through Orthanc's REST API by `clients` clients."""
    with ThreadPoolExecutor(clients) as pool:
        return sum(len(b) for b in pool.map(
            lambda i: orthanc.request("GET", f"/instances/{i}/file"), ids))


def resend(orthanc: Orthanc, small: list[bytes]) -> None:
    """Send instances Orthanc already stores again, one after the other (a modality or router
    resending a study over one association): Orthanc writes and fsyncs each file, then finds
    the instance stored and unlinks it."""
    for data in small:
        orthanc.upload(data)


def run_orthanc(work: Path, storage: Path, small: list[bytes], large: list[bytes],
                daemon: Objfs | None, server: Any, bucket: str | None,
                orthanc: Orthanc | None = None) -> dict[str, float]:
    """One round on `storage`, by `orthanc` when given (not started yet; objfs was told its
    URL), else by a new Orthanc."""
    orthanc = (orthanc or Orthanc(work, storage, name="orthanc")).start()
    out: dict[str, float] = {}
    # The stand-in server runs on the same cores as Orthanc and objfs: its CPU is counted to
    # show how much of the machine it takes (a real bucket's is not on the machine).
    server_pid = server.process.pid if server is not None and server.process else None
    daemon_pid = daemon.process.pid if daemon is not None and daemon.process else None

    def pids() -> dict[str, int | None]:
        assert orthanc.process is not None
        return {"orthanc": orthanc.process.pid, "daemon": daemon_pid, "server": server_pid}

    try:
        daemon_cpu, server_cpu = cpu_seconds(daemon_pid), cpu_seconds(server_pid)
        cpu = cpu_snapshot(pids())
        start = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            ids = list(pool.map(orthanc.upload, small))
        out["ingest_small_s"] = time.perf_counter() - start
        out.update({f"cpu_ingest_{who}": ms
                    for who, ms in cpu_shares(cpu, pids(), len(small)).items()})
        large_start = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            large_ids = list(pool.map(orthanc.upload, large))
        acked = time.perf_counter()
        out["ingest_large_s"] = acked - large_start
        out["ingest_s"] = acked - start
        if daemon is not None:
            daemon.wait_uploaded(timeout=900)
            done = time.perf_counter()
            out["durable_s"] = done - start
            out["durable_lag_s"] = done - acked
            out["daemon_cpu_ingest_s"] = cpu_seconds(daemon_pid) - daemon_cpu
            out["server_cpu_ingest_s"] = cpu_seconds(server_pid) - server_cpu

        def read(which: list[str], clients: int) -> int:
            return read_instances(orthanc, which, clients)

        cpu = cpu_snapshot(pids())
        out["warm_read_s"], out["read_bytes"] = timed(read, ids + large_ids, CLIENTS)
        out.update({f"cpu_warm_{who}": ms
                    for who, ms in cpu_shares(cpu, pids(), len(ids) + len(large_ids)).items()})
        out["resend_s"], _ = timed(resend, orthanc, small)
        orthanc.stop()
        if daemon is not None:
            assert daemon.process is not None
            out["rss_mb"], out["cpu_s"] = proc_usage(daemon.process.pid)
            daemon.stop()
            shutil.rmtree(daemon.workdir / "cache")
            daemon.start()
        out["page_cache_dropped"] = float(drop_page_cache())
        orthanc.start()
        daemon_pid = daemon.process.pid if daemon is not None and daemon.process else None
        daemon_cpu, server_cpu = cpu_seconds(daemon_pid), cpu_seconds(server_pid)
        out["cold_small_s"], out["small_bytes"] = timed(read, ids, CLIENTS)
        if daemon is not None:
            out["daemon_ms_cold"] = (cpu_seconds(daemon_pid) - daemon_cpu) * 1e3 / len(ids)
            out["server_ms_cold"] = (cpu_seconds(server_pid) - server_cpu) * 1e3 / len(ids)
        out["cold_large_s"], out["large_bytes"] = timed(read, large_ids, 2)
        # Everything again with the page cache dropped: objfs serves its local copies (a read
        # of an instance its cache holds and the kernel no longer does); local disk reads cold.
        drop_page_cache()
        out["cached_read_s"], _ = timed(read, ids + large_ids, CLIENTS)
        if server is not None and bucket is not None and hasattr(server, "raw_get"):
            # The same objects objfs just fetched for the small instances, fetched by the SDK
            # alone at the same concurrency against the same server.
            keys = [k for k, size in server.sizes(bucket).items() if size < 4 << 20]
            server_cpu = cpu_seconds(server_pid)
            with ThreadPoolExecutor(CLIENTS) as pool:
                out["raw_get_small_s"], _ = timed(
                    lambda: list(pool.map(lambda k: server.raw_get(bucket, k), keys)))
            out["server_ms_raw_get"] = (cpu_seconds(server_pid) - server_cpu) * 1e3 / len(keys)

        def delete_all() -> None:
            for patient in orthanc.json("GET", "/patients"):
                orthanc.request("DELETE", f"/patients/{patient}")

        cpu = cpu_snapshot(pids())
        out["delete_s"], _ = timed(delete_all)
        out.update({f"cpu_delete_{who}": ms
                    for who, ms in cpu_shares(cpu, pids(), len(ids) + len(large_ids)).items()})
        if daemon is not None and server is not None and bucket is not None:
            daemon.wait_uploaded(timeout=600)
            wait_until(lambda: server.sizes(bucket) == {}, 120, "bucket empty")
            assert daemon.process is not None
            rss, cpu = proc_usage(daemon.process.pid)  # the restarted daemon: cold read, delete
            out["rss_mb"], out["cpu_s"] = max(rss, out["rss_mb"]), cpu + out["cpu_s"]
    finally:
        orthanc.stop()
    return out


Figure = tuple[str, str, Callable[[dict[str, float]], float]]


def figures(small: list[bytes], large: list[bytes]) -> tuple[list[Figure], Figure]:
    """(title, unit, value of one run) for ingest and warm read, and for delete: the figures
    every Orthanc benchmark here prints from `run_orthanc`'s results."""
    large_mb = sum(map(len, large)) / 1e6
    return [
        ("ingest, small instances", "inst/s", lambda r: len(small) / r["ingest_small_s"]),
        ("ingest, multi-frame files", "MB/s", lambda r: large_mb / r["ingest_large_s"]),
        ("warm read (all files)", "MB/s", lambda r: r["read_bytes"] / 1e6 / r["warm_read_s"]),
        ("resend, one client", "inst/s", lambda r: len(small) / r["resend_s"]),
    ], ("delete (all patients)", "inst/s", lambda r: (len(small) + len(large)) / r["delete_s"])


def print_cpu_shares(results: dict[str, list[dict[str, float]]],
                     phases: dict[str, str]) -> None:
    """For each phase, the CPU each process took per item (medians over the rounds), and the
    least time per item that the machine's busy CPU allows when spread over all its CPUs,
    against the time it took: where they meet, only less CPU makes the phase faster."""
    cpus = os.cpu_count() or 1
    print(f"CPU on this machine ({cpus} CPUs) per item; other: the kernel's threads and "
          "anything else; least: busy / CPUs")
    for phase, title in phases.items():
        print(f"  {title:<43}" + "".join(f" {who:>7}" for who in CPU_SHARES)
              + "    least     took")
        for label, runs in results.items():
            if not all(f"cpu_{phase}_busy" in r for r in runs):
                continue
            share = {who: statistics.median(r[f"cpu_{phase}_{who}"] for r in runs)
                     for who in (*CPU_SHARES, "took")}
            print(f"    {label:<41}" + "".join(f" {share[who]:7.2f}" for who in CPU_SHARES)
                  + f" {share['busy'] / cpus:8.2f} {share['took']:8.2f}")


def local_round(base: Path, small: list[bytes], large: list[bytes]) -> dict[str, float]:
    """One round of Orthanc on local disk, under `base`/local."""
    (base / "local" / "storage").mkdir(parents=True)
    return run_orthanc(base / "local", base / "local" / "storage", small, large, None, None,
                       None)


def upload_phase(work: Path, server: Any, files: list[bytes]) -> float:
    """MB/s of objfs' background uploads of `files`, journaled while the server was frozen
    and resumed all at once (nothing else running)."""
    bucket = server.new_bucket(f"phase-{server.section_name.lower()}")
    config = {server.section_name: server.section(bucket, RequestTimeout=2, ConnectTimeout=1),
              "Objfs": {"CacheDirectory": str(work / f"cache-phase-{bucket}"),
                        "CacheSize": 4096, "UploadConcurrency": UPLOAD_CONCURRENCY,
                        "ShutdownDrainTimeout": 0}}
    daemon = Objfs(work, config, name=f"objfs-phase-{bucket}").start()
    os.kill(server.process.pid, signal.SIGSTOP)  # nothing can upload: all stays journaled
    try:
        for i, data in enumerate(files):
            uuid = f"{i:08x}-0000-4000-8000-{i:012x}"
            path = daemon.mountpoint / uuid[:2] / uuid[2:4] / uuid
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        daemon.stop(timeout=60)
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    daemon.start()
    start = time.perf_counter()
    daemon.wait_uploaded(timeout=900)
    rate = sum(map(len, files)) / (time.perf_counter() - start) / 1e6
    daemon.stop()
    return rate


def sdk_puts(work: Path, server: Any, bucket: str, files: list[bytes]) -> tuple[float, list[str]]:
    """Seconds the SDK alone takes to PUT `files` into `bucket` at UPLOAD_CONCURRENCY, and
    their keys (the local copies are gone again)."""
    tmp = work / f"raw-{bucket}"
    tmp.mkdir()
    paths = []
    for i, data in enumerate(files):
        paths.append(tmp / str(i))
        paths[-1].write_bytes(data)
    with ThreadPoolExecutor(UPLOAD_CONCURRENCY) as pool:
        seconds, _ = timed(lambda: list(pool.map(
            lambda p: server.raw_put(bucket, p.name, p), paths)))
    shutil.rmtree(tmp)
    return seconds, [p.name for p in paths]


def raw_ceilings(work: Path, server: Any, files: list[bytes]) -> tuple[float, float]:
    """MB/s of the SDK's own PUTs and GETs of `files` at the same concurrency."""
    bucket = server.new_bucket(f"raw-{server.section_name.lower()}")
    total = sum(map(len, files)) / 1e6
    seconds, keys = sdk_puts(work, server, bucket, files)
    with ThreadPoolExecutor(UPLOAD_CONCURRENCY) as pool:
        get, _ = timed(lambda: list(pool.map(lambda k: server.raw_get(bucket, k), keys)))
    return total / seconds, total / get


def sdk_put_seconds(work: Path, server: Any, files: list[bytes]) -> float:
    """Seconds the SDK alone takes to PUT `files` at UPLOAD_CONCURRENCY with nothing else
    running: no upload schedule can make them all durable sooner after the first byte
    arrives. The objects are deleted afterwards (moto keeps them in memory)."""
    bucket = server.new_bucket(f"put-floor-{work.name}")
    seconds, keys = sdk_puts(work, server, bucket, files)
    server.client().delete_objects(
        Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True})
    return seconds


def objfs_run(work: Path, name: str, server: Any, small: list[bytes], large: list[bytes],
              extra: dict[str, Any]) -> dict[str, float]:
    bucket = server.new_bucket(f"bench-{work.name}-{name}")
    (work / name).mkdir()
    # objfs knows Orthanc's REST API, as a site configures it (series prefetch, move-storage).
    orthanc = Orthanc(work / name, work / name / "objfs-mnt", name="orthanc")
    config = {server.section_name: {**server.section(bucket), **extra},
              "Objfs": {"CacheDirectory": str(work / name / "cache"), "CacheSize": 4096,
                        "UploadConcurrency": UPLOAD_CONCURRENCY,
                        "Orthanc": {"Url": orthanc.url}}}
    daemon = Objfs(work / name, config)
    assert daemon.mountpoint == work / name / "objfs-mnt"
    try:
        daemon.start()
        return run_orthanc(work / name, daemon.mountpoint, small, large, daemon, server, bucket,
                           orthanc)
    finally:
        daemon.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=300)
    parser.add_argument("--small-kb", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--backends", default="s3",
                        help="comma-separated: s3 (moto), azure (Azurite), gcs (fake-gcs)")
    parser.add_argument("--no-encryption", action="store_true",
                        help="skip the s3 run with A1 encryption")
    parser.add_argument("--ceilings", action="store_true",
                        help="also measure the background upload phase against raw PUTs")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="objfs-bench-"))
    small, large = corpus(args.small, args.small_kb)
    small_mb = sum(map(len, small)) / 1e6
    large_mb = sum(map(len, large)) / 1e6
    print(f"corpus: {len(small)} instances of {len(small[0]) / 1e6:.2f} MB, "
          f"2 multi-frame files of {', '.join(f'{len(x) / 1e6:.0f}' for x in large)} MB; "
          f"{CLIENTS} concurrent REST clients; emulators at nice {EMULATOR_NICE}; "
          "objfs knows Orthanc's URL (series prefetch on); "
          f"median of {args.rounds} interleaved rounds; each ratio is the median of the "
          "rounds' own (local disk ran in every round)")
    if (note := idle_cpus_note()) is not None:
        print(note)
    key = work / "bench.key"
    codec.write_key_file(key)
    makers = {"s3": lambda: MotoServer(work, nice=EMULATOR_NICE),
              "azure": lambda: AzuriteServer(work, nice=EMULATOR_NICE),
              "gcs": lambda: FakeGcsServer(work, nice=EMULATOR_NICE)}
    servers = {name: makers[name]() for name in args.backends.split(",")}
    configs: list[tuple[str, str, dict[str, Any]]] = []
    for name in servers:
        configs.append((name, name, {}))
        if name == "s3" and not args.no_encryption:
            configs.append(("s3+enc", name, {"StorageEncryption": {"MasterKey": [1, str(key)]}}))
    results: dict[str, list[dict[str, float]]] = {"local": []}
    results.update({label: [] for label, _, _ in configs})
    ceilings: list[tuple[str, float, float, float]] = []
    put_floor: list[float] = []
    try:
        for rnd in range(args.rounds):
            base = work / f"round{rnd}"
            results["local"].append(local_round(base, small, large))
            for label, name, extra in configs:
                results[label].append(objfs_run(base, label.replace("+", "-"), servers[name],
                                                small, large, extra))
            if "s3" in servers:
                put_floor.append(sdk_put_seconds(base, servers["s3"], small + large))
        if args.ceilings:
            for name, server in servers.items():
                phase = upload_phase(work, server, small)
                put, get = raw_ceilings(work, server, small)
                ceilings.append((name, phase, put, get))
    finally:
        for server in servers.values():
            server.stop()

    def med(label: str, fn: Any) -> float:
        return statistics.median(fn(r) for r in results[label])

    def ratio(label: str, fn: Any, base: str = "local") -> float:
        return paired_ratio(map(fn, results[label]), map(fn, results[base]))

    ingest_warm, delete = figures(small, large)
    metrics = [
        *ingest_warm,
        ("cold read, small instances", "MB/s",
         lambda r: r["small_bytes"] / 1e6 / r["cold_small_s"]),
        ("cold read, multi-frame", "MB/s", lambda r: r["large_bytes"] / 1e6 / r["cold_large_s"]),
        ("cached, page cache dropped", "MB/s",
         lambda r: r["read_bytes"] / 1e6 / r["cached_read_s"]),
        delete,
    ]
    labels = [label for label, _, _ in configs]
    print(f"{'':<28} {'unit':<7} {'local':>8}" + "".join(f" {n:>16}" for n in labels))
    for title, unit, fn in metrics:
        loc = med("local", fn)
        cells = "".join(f" {med(n, fn):>8.1f} {ratio(n, fn):>6.2f}x" for n in labels)
        print(f"{title:<28} {unit:<7} {loc:>8.1f}{cells}")
    # Each round's own ratio (rounds interleave, so local disk ran the same minute): how far
    # apart they are says how much a median can be trusted on this machine.
    for label in labels:
        print(f"{label}, each round against local disk in that round: " + "; ".join(
            f"{title} " + "/".join(f"{r:.2f}" for r in round_ratios(
                map(fn, results[label]), map(fn, results["local"])))
            for title, _, fn in metrics))
    if "s3" in results and "s3+enc" in results:
        enc = [ratio("s3+enc", fn, "s3") for _, _, fn in metrics]
        print("encryption on/off (s3): " + ", ".join(
            f"{title} {r:.2f}x" for (title, _, _), r in zip(metrics, enc, strict=True)))
    local_ingest = med("local", lambda r: r["ingest_s"])
    for label in labels:
        lags = ", ".join(f"{r['durable_lag_s']:.2f}" for r in results[label])
        print(f"{label}: all {small_mb + large_mb:.0f} MB durable in the bucket "
              f"{med(label, lambda r: r['durable_s']):.2f} s after ingest start, "
              f"{med(label, lambda r: r['durable_lag_s']):.2f} s after the last acknowledgement "
              f"(rounds: {lags}; ingest {med(label, lambda r: r['ingest_s']):.2f} s, "
              f"local-disk ingest {local_ingest:.2f} s); daemon peak RSS "
              f"{med(label, lambda r: r['rss_mb']):.0f} MB, CPU "
              f"{med(label, lambda r: r['cpu_s']):.1f} s over the run")
        if all("raw_get_small_s" in r for r in results[label]):
            raw = med(label, lambda r: r["small_bytes"] / 1e6 / r["raw_get_small_s"])
            cold = med(label, lambda r: r["small_bytes"] / 1e6 / r["cold_small_s"])
            # Both read the same objects in the same round.
            against = paired_ratio((r["raw_get_small_s"] for r in results[label]),
                                   (r["cold_small_s"] for r in results[label]))
            print(f"{label}: cold read of small instances {cold:.1f} MB/s = {against:.2f}x "
                  f"raw SDK GETs of the same objects at concurrency {CLIENTS} ({raw:.1f} MB/s; "
                  "the ratio is the median of each round's)")
        if all("server_ms_raw_get" in r for r in results[label]):
            print(f"{label}: CPU on this machine from ingest start until all is in the bucket: "
                  f"daemon {med(label, lambda r: r['daemon_cpu_ingest_s']):.2f} s, stand-in "
                  f"server {med(label, lambda r: r['server_cpu_ingest_s']):.2f} s; per cold read "
                  f"of a small instance: daemon {med(label, lambda r: r['daemon_ms_cold']):.1f} "
                  f"ms, server {med(label, lambda r: r['server_ms_cold']):.1f} ms (server per raw "
                  f"SDK GET {med(label, lambda r: r['server_ms_raw_get']):.1f} ms)")
    print_cpu_shares(results, {"ingest": "ingest, small instances (ms per instance)",
                               "warm": "warm read (ms per file)",
                               "delete": "delete (ms per instance)"})
    if put_floor:
        floor = statistics.median(put_floor)
        print(f"durable-lag floor (s3): the SDK alone PUTs all {small_mb + large_mb:.0f} MB at "
              f"concurrency {UPLOAD_CONCURRENCY} in {floor:.2f} s with nothing else running "
              f"(rounds: {', '.join(f'{x:.2f}' for x in put_floor)}); uploading from the "
              f"first byte, without slowing ingest, would leave a lag of "
              f"{max(0.0, floor - med('s3', lambda r: r['ingest_s'])):.2f} s after objfs' ingest")
    for name, phase, put, get in ceilings:
        print(f"{name}: background upload phase {phase:.0f} MB/s = {phase / put:.2f}x the raw "
              f"SDK PUT ceiling ({put:.0f} MB/s; raw GET {get:.0f} MB/s) at concurrency "
              f"{UPLOAD_CONCURRENCY}")
    if not results["local"][0].get("page_cache_dropped"):
        print("note: could not drop the page cache; local cold read is a warm read")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
