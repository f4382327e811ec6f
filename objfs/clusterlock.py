"""Cluster-wide locks: work that must run once per cluster of objfs nodes (SharedBucket).

Move-storage jobs and `objfs rekey` each take one named lock for as long as they run. Two
kinds, chosen by the configuration (`open_lock`):

- `PostgresLock`, when Orthanc's ``PostgreSQL`` section is there: a session-level advisory
  lock on a connection of its own. PostgreSQL releases it when the holder's session ends,
  so a node that dies frees it as soon as the server notices the closed connection (TCP
  keepalives bound that for a vanished host). The holder is named from ``pg_stat_activity``:
  the connection's ``application_name`` is ``objfs <node>``.
- `BucketLease`, otherwise: an object ``<RootPath>objfs-locks/<work>`` created with a
  conditional write (create-if-absent), holding the node's name, a random token and an
  expiry ``LEASE_SECONDS`` ahead. The holder renews it every ``RENEW_SECONDS`` by overwriting
  exactly the version it read (If-Match); a node that finds the lease expired deletes exactly
  that version and creates its own. Expiry compares wall clocks: nodes must
  agree within a few seconds (NTP), far below LEASE_SECONDS.

Failure behaviour: `try_acquire` raises ObjfsError when the database or bucket cannot be
asked (the caller answers 503 / exits non-zero); `renew` returns False once the lock is lost
(the caller stops the work: another node may take over).
"""

from __future__ import annotations

import abc
import json
import logging
import secrets
import time
import zlib
from collections.abc import Callable
from typing import Any

import trio

from objfs import errors
from objfs.backends.base import Backend
from objfs.config import Settings

log = logging.getLogger(__name__)

LEASE_SECONDS = 30.0
RENEW_SECONDS = 10.0
# First key of objfs' advisory locks ("objf"): keeps them apart from other users of the
# database; the second is a checksum of the lock's name.
ADVISORY_CLASS = 0x6F626A66


class LockHeld(errors.ObjfsError):
    """Another node holds the lock; `holder` names it."""

    def __init__(self, work: str, holder: str) -> None:
        super().__init__(f"{work} is running on node {holder}")
        self.holder = holder


class ClusterLock(abc.ABC):
    """One named lock. Methods run on the event loop; one holder per process at a time."""

    def __init__(self, work: str, node: str) -> None:
        self.work = work
        self.node = node

    @abc.abstractmethod
    async def try_acquire(self) -> str | None:
        """Take the lock if it is free: None when taken, else the holder's name."""

    @abc.abstractmethod
    async def renew(self) -> bool:
        """Called every RENEW_SECONDS while held: False when the lock was lost."""

    @abc.abstractmethod
    async def release(self) -> None:
        """Give the lock back (best effort: an expired lease or a closed session frees it)."""


class PostgresLock(ClusterLock):
    """A session advisory lock in the PostgreSQL database of Orthanc's index."""

    def __init__(self, work: str, node: str, conninfo: str, scope: str) -> None:
        super().__init__(work, node)
        self._conninfo = conninfo
        self._key = zlib.crc32(f"{scope}:{work}".encode()) & 0x7FFFFFFF
        self._conn: Any = None
        self._limiter = trio.CapacityLimiter(1)

    def _connect(self) -> Any:
        import psycopg  # only nodes configured for PostgreSQL load it

        try:
            return psycopg.connect(self._conninfo, autocommit=True, connect_timeout=10,
                                   application_name=f"objfs {self.node}"[:63],
                                   keepalives=1, keepalives_idle=10, keepalives_interval=5,
                                   keepalives_count=3)
        except psycopg.Error as exc:
            raise errors.Unavailable(f"PostgreSQL: {exc}".strip()) from exc

    async def _call(self, fn: Callable[[], Any]) -> Any:
        import psycopg

        def run() -> Any:
            try:
                return fn()
            except psycopg.Error as exc:
                raise errors.Unavailable(f"PostgreSQL: {exc}".strip()) from exc
        return await trio.to_thread.run_sync(run, limiter=self._limiter)

    async def try_acquire(self) -> str | None:
        conn = self._conn or await trio.to_thread.run_sync(self._connect)
        self._conn = conn
        got = await self._call(lambda: conn.execute(
            "SELECT pg_try_advisory_lock(%s, %s)", (ADVISORY_CLASS, self._key)).fetchone()[0])
        if got:
            return None
        holder = await self._call(lambda: conn.execute(
            "SELECT a.application_name, host(a.client_addr) FROM pg_locks l "
            "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' "
            "AND l.granted AND l.classid = %s AND l.objid = %s AND l.objsubid = 2",
            (ADVISORY_CLASS, self._key)).fetchone())
        if holder is None:
            return "another node (it has just released it)"
        name = str(holder[0] or "")
        return name.removeprefix("objfs ") or f"a client at {holder[1]}"

    async def renew(self) -> bool:
        conn = self._conn
        if conn is None:
            return False
        try:
            held = await self._call(lambda: conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND pid = pg_backend_pid() AND classid = %s AND objid = %s AND objsubid = 2",
                (ADVISORY_CLASS, self._key)).fetchone()[0])
        except errors.Unavailable as exc:
            log.error("cluster lock %s: lost the PostgreSQL session (%s)", self.work, exc)
            await self._close()
            return False
        return bool(held)

    async def release(self) -> None:
        await self._close()  # ending the session releases every advisory lock it holds

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await trio.to_thread.run_sync(conn.close)


class BucketLease(ClusterLock):
    """A lease object in the bucket, created and replaced only by conditional requests."""

    def __init__(self, work: str, node: str, backend: Backend, key: str,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(work, node)
        self.backend = backend
        self.key = key
        self.clock = clock
        self._token: str | None = None

    def _body(self) -> bytes:
        self._token = secrets.token_hex(16)
        return json.dumps({"node": self.node, "token": self._token,
                           "expires": self.clock() + LEASE_SECONDS}).encode()

    async def _read(self) -> tuple[dict[str, Any], str] | None:
        try:
            data, version = await self.backend.read_versioned(self.key)
        except errors.NotFound:
            return None
        try:
            lease = json.loads(data)
            if not isinstance(lease, dict):
                raise ValueError("not an object")
        except ValueError:
            lease = {"node": "unknown (unreadable lease)", "expires": 0}
        return lease, version

    async def try_acquire(self) -> str | None:
        for _ in range(3):
            if await self.backend.create_exclusive(self.key, self._body()):
                return None
            found = await self._read()
            if found is None:
                continue  # released meanwhile: try again
            lease, version = found
            if float(lease.get("expires", 0)) > self.clock():
                return str(lease.get("node", "unknown"))
            log.warning("cluster lock %s: the lease of node %s expired; taking it over",
                        self.work, lease.get("node"))
            await self.backend.delete_if(self.key, version)
        return "another node (the lease changed hands while objfs asked)"

    async def renew(self) -> bool:
        found = await self._read()
        if found is None or found[0].get("token") != self._token:
            log.error("cluster lock %s: the lease is no longer this node's", self.work)
            return False
        token = self._token
        if await self.backend.replace_if(self.key, found[1], self._body()):
            return True
        self._token = token  # not replaced: the lease may still be ours, unrenewed
        return False

    async def release(self) -> None:
        found = await self._read()
        if found is not None and found[0].get("token") == self._token:
            await self.backend.delete_if(self.key, found[1])
        self._token = None


def open_lock(settings: Settings, backend: Backend, work: str) -> ClusterLock | None:
    """The lock for `work` ("move-storage", "rekey"), or None without SharedBucket (one node:
    nothing to coordinate)."""
    if not settings.shared_bucket:
        return None
    if settings.postgresql is not None:
        return PostgresLock(work, settings.node_name, settings.postgresql.conninfo,
                            _scope(settings))
    return BucketLease(work, settings.node_name, backend,
                       f"{settings.layout.root_prefix()}objfs-locks/{work}")


def _scope(settings: Settings) -> str:
    """What makes two clusters' locks different in one database: their bucket."""
    bucket = (settings.s3.bucket if settings.s3 else settings.azure.container if settings.azure
              else settings.gcs.bucket if settings.gcs else str(settings.local_bucket))
    return f"{settings.provider}:{bucket}:{settings.layout.root_prefix()}"


def lock_kind(settings: Settings) -> str:
    """How `open_lock` coordinates, for status output."""
    if not settings.shared_bucket:
        return "none (single node)"
    if settings.postgresql is not None:
        return f"PostgreSQL advisory lock ({settings.postgresql.where})"
    return "lease object in the bucket"


async def keep(lock: ClusterLock, on_lost: Callable[[], None]) -> None:
    """Renew `lock` every RENEW_SECONDS until cancelled; call `on_lost` once if it is lost
    (or cannot be renewed for LEASE_SECONDS - RENEW_SECONDS), then return."""
    failing_since: float | None = None
    while True:
        await trio.sleep(RENEW_SECONDS)
        try:
            ok = await lock.renew()
            failing_since = None
        except errors.ObjfsError as exc:
            now = trio.current_time()
            failing_since = failing_since if failing_since is not None else now
            log.warning("cluster lock %s: cannot renew (%s)", lock.work, exc)
            ok = now - failing_since < LEASE_SECONDS - RENEW_SECONDS
        if not ok:
            log.error("cluster lock %s: lost; stopping its work", lock.work)
            on_lost()
            return
