"""Move-storage jobs: persisted in the journal, run one at a time, highest priority first.

A job names resources (already resolved to their level when it was submitted) and a target
tier. Running it asks Orthanc for every attachment under the resources, then moves them a few
at a time (`Store.move_to_*`: copy, verify, record, delete the source). Progress is saved as it
goes; a daemon stop or crash leaves the job "Running" in the journal and the next start runs
it again from the beginning, where attachments already on the target are skipped quickly.

With SharedBucket the runner holds the cluster lock "move-storage" (`objfs.clusterlock`)
while it has jobs to run: `submit` takes it or raises LockHeld naming the node that holds it
(the sidecar answers 409), a job found interrupted at start waits for it, the lock is given
back once no job is pending, and a lock lost while a job runs cancels that job (Failure).
"""

from __future__ import annotations

import enum
import json
import logging
import time
import uuid as uuid_mod
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

from objfs import clusterlock, errors
from objfs.clusterlock import ClusterLock, LockHeld
from objfs.journal import Journal
from objfs.sidecar.orthanc import CONTENT_GROUPS, OrthancClient
from objfs.store import Store

log = logging.getLogger(__name__)



class Target(enum.StrEnum):
    """Where a move-storage job moves attachments to."""

    FILE_SYSTEM = "file-system"
    OBJECT_STORAGE = "object-storage"


class JobState(enum.StrEnum):
    """A job's state, as Orthanc names job states. Allowed transitions: Pending -> Running ->
    Success | Failure; Pending -> Failure (canceled); Running -> Pending only at a start-up
    that finds the job interrupted by a stop or crash."""

    PENDING = "Pending"
    RUNNING = "Running"
    SUCCESS = "Success"
    FAILURE = "Failure"


FILE_SYSTEM, OBJECT_STORAGE = Target.FILE_SYSTEM, Target.OBJECT_STORAGE
TARGETS = tuple(Target)
PENDING, RUNNING, SUCCESS, FAILURE = JobState
JOB_TYPE = "MoveStorage"
# Attachments of one job moved concurrently: each move waits on the network (upload, read-back,
# delete) and on fsyncs, so a few in flight keep both busy.
MOVES_AT_ONCE = 4
LOCK_RETRY = 5.0


@dataclass
class Job:
    """One move-storage job. `resources` holds (level, Orthanc id) pairs."""

    id: str
    target: Target
    resources: list[tuple[str, str]]
    priority: int = 0
    state: JobState = PENDING
    progress: float = 0.0
    error: str | None = None
    created: float = field(default_factory=time.time)
    completed: float | None = None
    moved: int = 0
    skipped: int = 0
    seq: int = 0  # submission order, to run equal priorities first come, first served

    @property
    def content(self) -> dict[str, list[str]]:
        """The resources grouped by level, as the plugins' job Content."""
        groups: dict[str, list[str]] = {}
        for level, resource in self.resources:
            groups.setdefault(CONTENT_GROUPS[level], []).append(resource)
        return groups

    @property
    def finished(self) -> bool:
        return self.state in (SUCCESS, FAILURE)

    def describe(self) -> dict[str, Any]:
        """The Orthanc-like JSON of GET /jobs/{id}."""
        return {
            "ID": self.id, "Type": JOB_TYPE, "State": self.state,
            "Progress": round(self.progress), "Priority": self.priority,
            "Content": {**self.content, "TargetStorage": self.target,
                        "MovedAttachments": self.moved, "SkippedAttachments": self.skipped},
            "ErrorDescription": self.error or "", "CreationTime": _iso(self.created),
            "CompletionTime": _iso(self.completed) if self.completed else None,
        }

    def record(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_record(cls, record: str) -> Job:
        values = json.loads(record)
        values["resources"] = [tuple(r) for r in values["resources"]]
        values["target"] = Target(values["target"])
        values["state"] = JobState(values["state"])
        return cls(**values)


def _iso(t: float) -> str:
    """Orthanc's timestamp format (UTC, basic ISO 8601)."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}"


class Jobs:
    """The job list and its runner. Methods run on the event loop."""

    def __init__(self, journal: Journal, store: Store, orthanc: OrthancClient,
                 lock: ClusterLock | None = None) -> None:
        self.journal = journal
        self.store = store
        self.orthanc = orthanc
        # The cluster lock (SharedBucket) and whether this node holds it (owner: this object,
        # on the event loop; `held_locks` is what status and metrics show).
        self.lock = lock
        self.lock_held = False
        # Taking and giving back the lock are bucket (or PostgreSQL) round trips: one at a
        # time, so that a submit arriving while the runner gives the lock back waits for that
        # and then takes it afresh, instead of finding its own lease (LockHeld by this very
        # node) or having its new lease's token wiped by the release.
        self._lock_turn = trio.Lock()
        self._keeper: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._cancel_reason: str | None = None
        self.jobs: dict[str, Job] = {}
        self._wakeup = trio.Event()
        self._finished: dict[str, trio.Event] = {}
        self._running: tuple[Job, trio.CancelScope] | None = None
        for record in journal.job_records():
            job = Job.from_record(record)
            if job.state == RUNNING:
                log.info("job %s was interrupted by a stop; it runs again", job.id)
                job.state = PENDING
            self.jobs[job.id] = job

    async def _save(self, job: Job, durable: bool = True) -> None:
        if durable:
            await trio.to_thread.run_sync(self.journal.put_job, job.id, job.record())
        else:
            self.journal.put_job(job.id, job.record(), durable=False)

    @property
    def held_locks(self) -> list[str]:
        return [self.lock.work] if self.lock is not None and self.lock_held else []

    async def _take_lock(self) -> None:
        """Hold the cluster lock from now on; raises LockHeld when another node holds it,
        ObjfsError when the lock's store cannot be asked."""
        if self.lock is None:
            return
        async with self._lock_turn:  # (checked inside: another task may have taken it)
            if self.lock_held:
                return
            holder = await self.lock.try_acquire()
            if holder is not None:
                raise LockHeld(self.lock.work, holder)
            log.info("cluster lock %s taken by this node (%s)", self.lock.work, self.lock.node)
            self.lock_held = True
            if self._nursery is not None:
                self._nursery.start_soon(self._keep_lock)

    async def _keep_lock(self) -> None:
        assert self.lock is not None
        with trio.CancelScope() as self._keeper:
            await clusterlock.keep(self.lock, self._lock_lost)

    def _lock_lost(self) -> None:
        self.lock_held = False
        self._keeper = None
        if self._running is not None:
            self._cancel_reason = "the cluster lock was lost (another node may run it)"
            self._running[1].cancel()

    async def _release_lock(self) -> None:
        if self.lock is None:
            return
        async with self._lock_turn:
            if not self.lock_held:
                return
            if self._keeper is not None:
                self._keeper.cancel()
                self._keeper = None
            self.lock_held = False
            try:
                await self.lock.release()
            except errors.ObjfsError as exc:
                log.warning("cluster lock %s: release failed (%s); it expires by itself",
                            self.lock.work, exc)
            log.info("cluster lock %s released", self.lock.work)

    async def _wait_for_lock(self) -> None:
        """The runner's way to the lock (jobs found interrupted at start): try every
        LOCK_RETRY seconds until this node holds it."""
        logged = False
        while not self.lock_held:
            try:
                await self._take_lock()
                return
            except LockHeld as exc:
                if not logged:
                    log.info("job runner: waiting for the cluster lock (%s)", exc)
                    logged = True
            except errors.ObjfsError as exc:
                log.warning("job runner: cannot take the cluster lock: %s", exc)
            await trio.sleep(LOCK_RETRY)

    async def submit(self, target: str, resources: list[tuple[str, str]],
                     priority: int) -> Job:
        """Persist a new job (durable when this returns) and wake the runner. With a
        cluster lock, raises LockHeld when another node runs move-storage."""
        await self._take_lock()
        seq = max((j.seq for j in self.jobs.values()), default=0) + 1
        job = Job(str(uuid_mod.uuid4()), Target(target), resources, priority, seq=seq)
        await self._save(job)
        self.jobs[job.id] = job
        self._wakeup.set()
        log.info("job %s: move %s to %s (priority %d)", job.id, job.content, target, priority)
        return job

    async def wait(self, job_id: str) -> Job:
        """Wait until the job has finished (Success or Failure)."""
        job = self.jobs[job_id]
        while not job.finished:
            await self._finished.setdefault(job_id, trio.Event()).wait()
        return job

    async def cancel(self, job_id: str) -> Job:
        """Cancel a pending or running job (it ends in Failure); a finished one is left as is.
        An attachment being moved when the cancel arrives keeps at least one good copy."""
        job = self.jobs[job_id]
        if job.state == PENDING:
            await self._finish(job, FAILURE, "canceled before it started")
        elif self._running is not None and self._running[0] is job:
            self._running[1].cancel()
        return job

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run pending jobs forever, highest priority first."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.lock_held:  # taken by a submit before the runner started
                    nursery.start_soon(self._keep_lock)
                task_status.started()
                await self._run_jobs()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                await self._release_lock()

    async def _run_jobs(self) -> None:
        while True:
            pending = [j for j in self.jobs.values() if j.state == PENDING]
            if not pending:
                # The event first: a job submitted while the lock is given back sets it.
                self._wakeup = wakeup = trio.Event()
                await self._release_lock()
                await wakeup.wait()
                continue
            await self._wait_for_lock()
            # Chosen again: a job may have been cancelled while the lock was awaited.
            pending = [j for j in self.jobs.values() if j.state == PENDING]
            if pending:
                await self._execute(max(pending, key=lambda j: (j.priority, -j.seq)))

    async def _execute(self, job: Job) -> None:
        with trio.CancelScope() as scope:
            # Cancellable from the moment it is Running (`cancel`), its own save included.
            self._running = (job, scope)
            try:
                job.state, job.progress, job.moved, job.skipped = RUNNING, 0.0, 0, 0
                await self._save(job)
                await self._move_all(job)
            except (errors.ObjfsError, OSError) as exc:
                log.error("job %s failed: %s", job.id, exc)
                await self._finish(job, FAILURE, str(exc))
                return
            except Exception as exc:
                # A bug, or an answer nobody expected (a non-JSON 200 from Orthanc): the job
                # fails with the reason, and the daemon goes on serving (it must never stop
                # over a background task: docs/durability.md, invariant 8).
                log.exception("job %s failed on an unexpected error", job.id)
                await self._finish(job, FAILURE, f"unexpected {type(exc).__name__}: {exc}")
                return
            finally:
                self._running = None
        if scope.cancelled_caught:
            reason, self._cancel_reason = self._cancel_reason or "canceled", None
            log.warning("job %s: %s after %d attachments moved", job.id, reason, job.moved)
            await self._finish(job, FAILURE, f"{reason} after {job.moved} attachments were "
                               "moved")
            return
        job.progress = 100.0
        log.info("job %s done: %d attachments moved to %s, %d already there", job.id,
                 job.moved, job.target, job.skipped)
        await self._finish(job, SUCCESS, None)

    async def _move_all(self, job: Job) -> None:
        """Move every attachment, MOVES_AT_ONCE at a time; the first failure stops the rest
        (each attachment's move is all-or-nothing) and is raised."""
        uuids: list[str] = []
        for level, resource in job.resources:
            uuids.extend(await self.orthanc.attachment_uuids(level, resource))
        uuids = list(dict.fromkeys(uuids))
        move = (self.store.move_to_file_system if job.target == FILE_SYSTEM
                else self.store.move_to_object_storage)
        todo = iter(uuids)
        failures: list[errors.ObjfsError] = []

        async def worker(cancel_scope: trio.CancelScope) -> None:
            for uuid in todo:
                try:
                    moved = await move(uuid)
                except errors.ObjfsError as exc:
                    failures.append(type(exc)(f"attachment {uuid}: {exc}"))
                    cancel_scope.cancel()
                    return
                except Exception as exc:
                    log.exception("moving attachment %s failed on an unexpected error", uuid)
                    failures.append(errors.ObjfsError(
                        f"attachment {uuid}: unexpected {type(exc).__name__}: {exc}"))
                    cancel_scope.cancel()
                    return
                if moved:
                    job.moved += 1
                else:
                    job.skipped += 1
                job.progress = 100.0 * (job.moved + job.skipped) / len(uuids)
                await self._save(job, durable=False)

        async with trio.open_nursery() as nursery:
            for _ in range(min(MOVES_AT_ONCE, len(uuids))):
                nursery.start_soon(worker, nursery.cancel_scope)
        if failures:
            raise failures[0]

    async def _finish(self, job: Job, state: JobState, error: str | None) -> None:
        job.state, job.error, job.completed = state, error, time.time()
        with trio.CancelScope(shield=True):
            await self._save(job)
        event = self._finished.pop(job.id, None)
        if event is not None:
            event.set()
