"""The daemon's lifetime: open everything, mount, serve, unmount, drain, close.

One nursery holds the store's workers, the signal watcher and pyfuse3's main loop. SIGTERM,
SIGINT or an external ``fusermount3 -u`` end the main loop; then the mount is removed (so
nothing new arrives), uploads drain up to ``ShutdownDrainTimeout``, and whatever is left stays
journaled for the next start.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from objfs import errors, fuseloop, testhooks
from objfs.backends import open_backend
from objfs.backends.base import Backend
from objfs.cache import LocalTier
from objfs.clusterlock import open_lock
from objfs.config import Provider, Settings
from objfs.fs import Operations
from objfs.journal import Journal, Stats
from objfs.metrics import Metrics
from objfs.mountinfo import mounts, set_read_ahead
from objfs.notify import Notifier
from objfs.retry import RetryPolicy
from objfs.sidecar.app import Sidecar
from objfs.sidecar.jobs import Jobs
from objfs.sidecar.orthanc import OrthancClient
from objfs.sidecar.prefetch import SeriesPrefetcher
from objfs.sidecar.server import serve as serve_sidecar
from objfs.store import Store, check_bucket_identity
from objfs.supervise import supervised
from objfs.tally import Tally
from objfs.threadprio import prioritize_this_thread

log = logging.getLogger(__name__)

FSNAME = "objfs"
PROBE = RetryPolicy(deadline=10.0)
STATUS_INTERVAL = 5.0
MIB = 1024 * 1024
# How long a thread running Python code keeps the GIL while another waits for it (CPython's
# default is 5 ms). Orthanc waits for every FUSE reply while upload and journal threads run
# the SDK's Python code: the event loop must get the GIL back quickly.
GIL_SWITCH_INTERVAL = 0.00005


def clear_stale_mount(mountpoint: Path) -> None:
    """Remove a dead objfs mount left on `mountpoint`; refuse a live FUSE mount there.

    Any other mount at that path (Docker's bind mount of a shared storage directory, a
    volume) is the mount point itself: objfs mounts on top of it."""
    mount = mounts().get(str(mountpoint))
    if mount is None or not mount.fstype.startswith("fuse"):
        return
    try:
        os.statvfs(mountpoint)  # always reaches the daemon; a stat may be served from cache
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise
        log.warning("%s: clearing the stale mount of a daemon that died", mountpoint)
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=True)
        return
    raise errors.ConfigError(f"{mountpoint} is already mounted ({mount.fstype})")


def check_fuse_device(path: str = "/dev/fuse") -> None:
    """A ConfigError that says how to fix it when this user cannot open the FUSE device
    (libfuse would only print "failed to open /dev/fuse: Permission denied")."""
    if not os.path.exists(path):
        raise errors.ConfigError(
            f"{path} does not exist: load the fuse module (modprobe fuse) on the host, and "
            "in a container pass the device: docker run --device /dev/fuse --cap-add "
            "SYS_ADMIN ...")
    if not os.access(path, os.R_OK | os.W_OK):
        raise errors.ConfigError(
            f"{path} cannot be opened for reading and writing by uid {os.getuid()} "
            f"(mode {os.stat(path).st_mode & 0o777:o}): run objfs as root, or give this user "
            f"the device: on the host 'chmod 0666 {path}' (udev usually does), or in a "
            "container 'docker run --device /dev/fuse:/dev/fuse:rwm' with a user that owns "
            "it or is in its group (--group-add)")


def bucket_identity(settings: Settings) -> str:
    if settings.s3:
        where = f"s3:{settings.s3.endpoint or ''}:{settings.s3.bucket}"
    elif settings.azure:
        account = settings.azure.account_url or next(
            (p for p in (settings.azure.connection_string or "").split(";")
             if p.startswith(("AccountName=", "BlobEndpoint="))), "")
        where = f"azure:{account}:{settings.azure.container}"
    elif settings.gcs:
        where = f"gcs:{settings.gcs.endpoint or ''}:{settings.gcs.bucket}"
    else:
        where = f"local:{settings.local_bucket.resolve()}"
    return f"{where}:{settings.layout.structure}:{settings.layout.root_path}"


def _lock_cache(root: Path) -> int:
    fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise errors.ConfigError(f"cache directory {root} is in use by another objfs daemon")\
            from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


async def _probe(backend: Backend, settings: Settings) -> None:
    """Fail fast on a bucket that is missing or refuses us; only warn when it is unreachable."""
    prefix = settings.layout.root_prefix()
    try:
        await PROBE.call("bucket preparation", backend.prepare)
        await PROBE.call("bucket check", lambda: backend.list_page(prefix, None, 1))
    except errors.Unavailable as exc:
        log.warning("the bucket is unreachable (%s); mounting anyway: writes are kept locally "
                    "and uploaded when it answers", exc)


async def _stop_on_signal(notifier: Notifier) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("%s received: unmounting", signal.Signals(signum).name)
            notifier.stopping("unmounting")
            pyfuse3.terminate()
            return


async def _announce_ready(mountpoint: Path, root_ino: int, notifier: Notifier,
                          store: Store, read_ahead_kib: int) -> None:
    """READY=1 once a stat of the mount point is answered by this daemon (pyfuse3's main
    loop is running); a mount that does not answer is never reported ready. The read-ahead
    is raised first: only now, because the kernel resets it while the daemon answers its
    FUSE_INIT request."""
    st = await trio.to_thread.run_sync(os.stat, mountpoint)
    if st.st_ino != root_ino:
        raise errors.BackendError(f"{mountpoint} does not show the objfs mount")
    if read_ahead_kib:
        set_read_ahead(mountpoint, read_ahead_kib)
    notifier.ready(await _status_line(store))
    log.debug("the mount answers; readiness reported")


async def _report_status(notifier: Notifier, store: Store, jobs: Jobs, root: Path) -> None:
    """Every STATUS_INTERVAL: systemd's STATUS= line, and for `objfs status` (in state.json,
    when it changed) the bucket's health and, with SharedBucket, the node's role."""
    reported: dict[str, Any] = {}
    while True:
        await trio.sleep(STATUS_INTERVAL)
        testhooks.fail_point("status-reporter")
        notifier.status(await _status_line(store))
        facts: dict[str, Any] = {"bucket_failing_since": store.health.failing_since,
                                 "bucket_error": store.health.last_error,
                                 "cache_capacity": store.cache_space().capacity}
        if store.shared:
            facts.update(locks_held=jobs.held_locks,
                         bucket_lookups=store.tally.bucket_lookups)
        if facts != reported:
            write_state(root, "running", **facts)
            reported = facts


async def _status_line(store: Store) -> str:
    """The STATUS= text while mounted; when the journal's counts meet damage, the damage
    instead (the daemon goes on serving what it can: readiness and the reporter must not die
    of it, or the mount is left dead)."""
    try:
        return running_status(store, await store.stats())
    except errors.JournalDamaged as exc:
        return str(exc)


def running_status(store: Store, stats: Stats) -> str:
    """The one-line STATUS= text while mounted."""
    line = f"{stats.pending_uploads} uploads queued ({_mib(stats.pending_upload_bytes)})"
    if stats.oldest_pending is not None:
        line += f", oldest {max(0.0, time.time() - stats.oldest_pending):.0f}s"
    if stats.failing:
        line += f", {stats.failing} failing"
    space = store.cache_space()
    return f"{line}; cache {_mib(space.used)} of {_mib(space.capacity)}"


def _mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


def write_state(root: Path, phase: str, **facts: float | str | list[str] | None) -> None:
    """Record the daemon's phase for `objfs status` (atomically; not fsynced: it only informs
    a human and is rewritten at every start). Best effort: on a full disk it logs a warning
    and `objfs status` shows the last phase recorded."""
    tmp = root / "state.json.tmp"
    try:
        tmp.write_text(json.dumps({"pid": os.getpid(), "phase": phase, **facts}),
                       encoding="utf-8")
        os.replace(tmp, root / "state.json")
    except OSError as exc:
        log.warning("cannot record the daemon's phase (%s) for `objfs status`: %s", phase, exc)
        tmp.unlink(missing_ok=True)


def check_outside_mount(settings: Settings, mountpoint: Path) -> None:
    """Raise ConfigError when a directory objfs itself writes (the cache, the local bucket, the
    file-system tier) is the mount point or inside it: each of its writes would be a request
    to its own file system, which waits for the writer (a hang, then a dead mount)."""
    own = [("Objfs.CacheDirectory", settings.cache_directory),
           ("Objfs.FileSystemDirectory", settings.fs_directory)]
    if settings.provider == Provider.LOCAL:
        own.append(("Objfs.LocalBucket", settings.local_bucket))
    mounted = Path(os.path.realpath(mountpoint))
    problems = []
    for name, path in own:
        if path is None:
            continue
        real = Path(os.path.realpath(path))  # symlinks into the mount point count too
        if real == mounted or mounted in real.parents:
            problems.append(f"{name}: {path} is inside the mount point {mountpoint}: objfs "
                            "would wait for its own file system; use a directory on local disk")
    if problems:
        raise errors.ConfigError(*problems)


async def serve(settings: Settings, mountpoint: Path) -> None:
    """Mount objfs on `mountpoint` and serve until unmounted or signalled.

    Raises ConfigError/BackendError before mounting when the setup is unusable.
    """
    mountpoint = mountpoint.resolve()
    check_outside_mount(settings, mountpoint)
    check_fuse_device()
    clear_stale_mount(mountpoint)
    st = os.stat(mountpoint)
    root = settings.cache_directory
    root.mkdir(parents=True, exist_ok=True)
    (root / "passthrough").mkdir(exist_ok=True)
    async with AsyncExitStack() as stack:
        lock_fd = _lock_cache(root)
        stack.callback(os.close, lock_fd)
        journal = Journal(root / "journal.sqlite", copies=root / LocalTier.DATA)
        stack.callback(journal.close)
        check_bucket_identity(journal, bucket_identity(settings), root)
        tier = LocalTier(root, settings.cache_size, journal, settings.cache_full_timeout)
        tier.recover()
        tier.fit_to_disk()
        metrics = Metrics()
        backend = metrics.instrument(open_backend(settings))
        stack.push_async_callback(backend.aclose)
        await _probe(backend, settings)
        store = Store(settings, backend, journal, tier, metrics.tally)
        metrics.attach(store, backend, root / "journal.sqlite")
        if store.fs is not None:
            _prepare_fs_tier(store.fs.prepare, settings)
        orthanc = OrthancClient(settings.orthanc)
        jobs = Jobs(journal, store, orthanc, open_lock(settings, backend, "move-storage"))
        metrics.show_locks(lambda: jobs.held_locks)
        prefetcher = None
        if settings.series_prefetch and not settings.encrypt_local_cache:
            prefetcher = SeriesPrefetcher(store, orthanc, settings.series_prefetch_limit)
            store.on_fetched = prefetcher.notify
            store.on_cold = prefetcher.notify_cold
        ops = Operations(store, root / "passthrough", st.st_uid, st.st_gid, st.st_mode,
                         metrics.tally)
        options = set(pyfuse3.default_options) | {f"fsname={FSNAME}", f"subtype={FSNAME}",
                                                  "allow_other", "noatime"}
        notifier = Notifier()
        stack.callback(notifier.close)
        mounted = False
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(store.run)
                if settings.rest_api is not None:
                    sidecar = Sidecar(settings, store, jobs, orthanc, metrics, mountpoint,
                                      lambda: mounted)
                    await nursery.start(serve_sidecar, sidecar.app(settings.rest_api),
                                        settings.rest_api)
                stack.callback(sys.setswitchinterval, sys.getswitchinterval())
                sys.setswitchinterval(GIL_SWITCH_INTERVAL)
                restore_priority = prioritize_this_thread(settings.event_loop_nice)
                if restore_priority is not None:
                    stack.callback(restore_priority)
                pyfuse3.init(ops, str(mountpoint), options)
                mounted = True
                write_state(root, "running", cache_capacity=tier.capacity)
                jobs_scope = trio.CancelScope()
                nursery.start_soon(_run_in_scope, jobs_scope,
                                   lambda: supervised("the job runner", jobs.run))
                prefetch_scope = trio.CancelScope()
                if prefetcher is not None:
                    nursery.start_soon(_run_in_scope, prefetch_scope,
                                       lambda: supervised("series prefetch", prefetcher.run))
                nursery.start_soon(_stop_on_signal, notifier)
                nursery.start_soon(_announce_ready, mountpoint, pyfuse3.ROOT_INODE, notifier,
                                   store, settings.read_ahead_kib)
                status_scope = trio.CancelScope()
                nursery.start_soon(_run_in_scope, status_scope,
                                   lambda: supervised("the status reporter",
                                                       lambda: _report_status(notifier, store,
                                                                              jobs, root)))
                log.info("objfs mounted on %s (%s bucket, %s layout, %s, HybridMode %s%s)",
                         mountpoint, settings.provider, settings.layout.structure,
                         settings.write_mode, settings.hybrid_mode,
                         f", SharedBucket as node {settings.node_name}"
                         if settings.shared_bucket else "")
                await _fuse_main(metrics.tally)
                status_scope.cancel()
                jobs_scope.cancel()  # a running job resumes at the next start
                prefetch_scope.cancel()
                notifier.stopping("unmounting")
                pyfuse3.close(unmount=True)
                mounted = False
                with contextlib.suppress(errors.JournalDamaged):  # noted: `journal.damage`
                    if journal.damage is None:
                        await _drain(store, settings, root, notifier)
                        tier.flush_atimes()
                try:
                    await trio.to_thread.run_sync(tier.checkpoint, True)
                    # Nothing appends any more: the intent log's changes become rows, durably,
                    # and the log is emptied, so that `objfs status` of the stopped daemon
                    # reads the rows alone.
                    await trio.to_thread.run_sync(journal.checkpoint_log)
                except (OSError, sqlite3.Error) as exc:
                    # The last periodic checkpoint stands: the next start fetches again the
                    # copies downloaded since, as after a crash.
                    log.error("cannot record the final cache checkpoint in %s: %s", root, exc)
                nursery.cancel_scope.cancel()
            if journal.damage is not None:
                # Stopped as asked, without the drain (the journal cannot say what is left);
                # exit 1 with the way out. The next start checks the whole file.
                raise errors.JournalDamaged(journal.damage)
        except BaseException:
            if mounted:
                # Never a clean unmount on a failure: the mount point must answer ENOTCONN
                # (Orthanc's writes fail) rather than show the bare directory underneath,
                # where they would land and be hidden by the next mount (invariant 8). The
                # next `objfs mount` clears the dead mount and resumes from the journal.
                log.critical("objfs cannot go on; leaving %s dead (ENOTCONN) until objfs is "
                             "started again", mountpoint)
                pyfuse3.close(unmount=False)
                mounted = False
            raise
        finally:
            (root / "state.json").unlink(missing_ok=True)


async def _drain(store: Store, settings: Settings, root: Path, notifier: Notifier) -> None:
    """Wait for uploads up to ShutdownDrainTimeout, telling systemd and `objfs status` how
    far it got."""
    timeout = settings.shutdown_drain_timeout
    start = await store.stats()
    write_state(root, "draining", deadline=time.time() + timeout,
                uploads_at_start=start.pending_uploads, bytes_at_start=start.pending_upload_bytes)
    log.info("unmounted; waiting up to %ss for %d uploads (%d bytes)", timeout,
             start.pending_uploads, start.pending_upload_bytes)

    async def progress() -> None:
        while True:
            stats = await store.stats()
            notifier.status(f"draining: {stats.pending_uploads} uploads left "
                            f"({_mib(stats.pending_upload_bytes)}), "
                            f"{stats.pending_deletes} deletes")
            await trio.sleep(1.0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(progress)
        done = await store.drain(timeout)
        nursery.cancel_scope.cancel()
    if done:
        log.info("all uploads done")
        notifier.status("all uploads done")
    else:
        notifier.status("shutdown deadline reached: uploads stay journaled")


async def _fuse_main(tally: Tally) -> None:
    """pyfuse3's request loop, waiting for requests through `objfs.fuseloop` (counted in
    `tally`). With the test hook ``fuse-loop@SECONDS`` armed it fails after
    that long, to show what a dead loop does (exit non-zero, the mount left dead)."""
    fuseloop.install(tally)
    delay = testhooks.failure_delay("fuse-loop")
    if delay is None:
        await pyfuse3.main()
        return
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pyfuse3.main)
        await trio.sleep(delay)
        testhooks.fail_point("fuse-loop")


async def _run_in_scope(scope: trio.CancelScope, fn: Callable[[], Awaitable[None]]) -> None:
    with scope:
        await fn()


def _prepare_fs_tier(prepare: Callable[[], None], settings: Settings) -> None:
    try:
        prepare()
    except OSError as exc:
        raise errors.ConfigError(f"Objfs.FileSystemDirectory: {settings.fs_directory} cannot "
                                 f"be used: {exc.strerror or exc}") from exc
