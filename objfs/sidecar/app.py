"""The sidecar's HTTP API (Starlette on hypercorn's trio worker).

- ``POST /move-storage``: the plugins' request and answers (``Resources``, ``TargetStorage``,
  ``Asynchronous``, ``Priority``; higher priority runs first).
- ``GET /jobs`` (``?expand``), ``GET /jobs/{id}``, ``POST /jobs/{id}/cancel``.
- ``GET /attachments/{uuid}``: which tier holds an attachment, its object key and size.
- ``GET /status``, ``GET /health`` (200, or 503 with the reason).
- ``GET /metrics``: Prometheus text format (see `objfs.metrics`).

Errors answer Orthanc-like JSON ``{"HttpStatus": n, "Message": "..."}``. With credentials
configured every request needs HTTP basic auth (401 otherwise).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from objfs import errors, status
from objfs.clusterlock import LockHeld
from objfs.config import RestApiSettings, Settings
from objfs.metrics import CONTENT_TYPE, Metrics
from objfs.sidecar.jobs import TARGETS, Jobs
from objfs.sidecar.orthanc import OrthancClient
from objfs.store import Store

log = logging.getLogger(__name__)

HEALTH_TIMEOUT = 10.0


def _error(status_code: int, message: str) -> JSONResponse:
    return JSONResponse({"HttpStatus": status_code, "Message": message}, status_code)


class BasicAuth:
    """ASGI middleware: every HTTP request needs the configured basic-auth credentials."""

    def __init__(self, app: ASGIApp, username: str, password: str) -> None:
        self.app = app
        self.expected = f"{username}:{password}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self._authorized(scope):
            response = _error(401, "authentication required (HTTP basic auth, "
                                   "Objfs.RestApi.Username/Password)")
            response.headers["WWW-Authenticate"] = 'Basic realm="objfs"'
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization" and value[:6].lower() == b"basic ":
                try:
                    given = base64.b64decode(value[6:].strip(), validate=True)
                except (binascii.Error, ValueError):
                    return False
                return hmac.compare_digest(given, self.expected)
        return False


class Sidecar:
    """The endpoints, over the daemon's store, jobs and Orthanc client."""

    def __init__(self, settings: Settings, store: Store, jobs: Jobs, orthanc: OrthancClient,
                 metrics: Metrics, mountpoint: Path, mounted: Callable[[], bool]) -> None:
        self.settings = settings
        self.metrics = metrics
        self.store = store
        self.jobs = jobs
        self.orthanc = orthanc
        self.mountpoint = mountpoint
        self.mounted = mounted

    def app(self, rest: RestApiSettings) -> ASGIApp:
        routes = [
            Route("/move-storage", self.move_storage, methods=["POST"]),
            Route("/jobs", self.list_jobs, methods=["GET"]),
            Route("/jobs/{job_id}", self.get_job, methods=["GET"]),
            Route("/jobs/{job_id}/cancel", self.cancel_job, methods=["POST"]),
            Route("/attachments/{uuid}", self.attachment, methods=["GET"]),
            Route("/status", self.status, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
        ]
        app: ASGIApp = Starlette(routes=routes)
        if rest.username is not None and rest.password is not None:
            app = BasicAuth(app, rest.username, rest.password)
        return app

    # --- move-storage and jobs ----------------------------------------------------------------

    async def move_storage(self, request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _error(400, "the body must be a JSON object")
        problem = _check_move_request(body)
        if problem:
            return _error(400, problem)
        if self.store.fs is None:
            return _error(409, "HybridMode is Disabled: there is no file-system tier to move "
                               "to or from")
        resources: list[tuple[str, str]] = []
        try:
            for resource in body["Resources"]:
                level = await self.orthanc.resource_type(resource)
                if level is None:
                    return _error(404, f"Resources: unknown resource {resource!r} (no such "
                                       "patient, study, series or instance in Orthanc)")
                resources.append((level, resource))
        except errors.OrthancUnavailable as exc:
            return _error(502, str(exc))
        try:
            job = await self.jobs.submit(body["TargetStorage"], resources,
                                         body.get("Priority", 0))
        except LockHeld as exc:
            return JSONResponse({"HttpStatus": 409, "Message": str(exc),
                                 "Holder": exc.holder}, 409)
        except errors.Unavailable as exc:
            return _error(503, f"cannot take the cluster lock: {exc}")
        if body.get("Asynchronous", False):
            return JSONResponse({"ID": job.id, "Path": f"/jobs/{job.id}"})
        await self.jobs.wait(job.id)
        if job.state != "Success":
            return JSONResponse({"HttpStatus": 500, "Message": job.error, "ID": job.id,
                                 "Path": f"/jobs/{job.id}"}, 500)
        return JSONResponse(job.content)

    async def list_jobs(self, request: Request) -> Response:
        jobs = sorted(self.jobs.jobs.values(), key=lambda j: j.seq)
        if "expand" in request.query_params:
            return JSONResponse([j.describe() for j in jobs])
        return JSONResponse([j.id for j in jobs])

    async def get_job(self, request: Request) -> Response:
        job = self.jobs.jobs.get(request.path_params["job_id"])
        if job is None:
            return _error(404, f"unknown job {request.path_params['job_id']!r}")
        return JSONResponse(job.describe())

    async def cancel_job(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        if job_id not in self.jobs.jobs:
            return _error(404, f"unknown job {job_id!r}")
        job = await self.jobs.cancel(job_id)
        return JSONResponse(job.describe())

    # --- where, status, health ----------------------------------------------------------------

    async def attachment(self, request: Request) -> Response:
        uuid = request.path_params["uuid"]
        found = self.store.placement(uuid)
        if found is None:
            return _error(404, f"attachment {uuid!r} is in no tier")
        return JSONResponse(found)

    async def status(self, request: Request) -> Response:
        try:
            stats = await self.store.stats()
        except errors.JournalDamaged as exc:  # nothing to count: say why (as /health does)
            return _error(503, str(exc))
        found = await trio.to_thread.run_sync(status.facts, stats, self.settings, self.store.fs,
                                              self.store.cache_space().capacity)
        found.update(status.cluster_facts(self.settings, self.jobs.held_locks,
                                          self.store.tally.bucket_lookups))
        return JSONResponse(found)

    async def prometheus(self, request: Request) -> Response:
        try:
            stats = await self.store.stats()
        except errors.JournalDamaged as exc:
            return _error(503, str(exc))
        return Response(self.metrics.render(stats), media_type=CONTENT_TYPE)

    async def health(self, request: Request) -> Response:
        problems = []
        if not self.mounted():
            problems.append(f"{self.mountpoint} is not mounted")
        else:
            try:
                with trio.fail_after(HEALTH_TIMEOUT):
                    await trio.to_thread.run_sync(os.statvfs, self.mountpoint,
                                                  abandon_on_cancel=True)
            except trio.TooSlowError:
                problems.append(f"the mount at {self.mountpoint} did not answer within "
                                f"{HEALTH_TIMEOUT:.0f}s")
            except OSError as exc:
                problems.append(f"the mount at {self.mountpoint} fails: {exc}")
        try:
            with trio.fail_after(HEALTH_TIMEOUT):
                await self.store.probe_bucket()
        except trio.TooSlowError:
            problems.append(f"the bucket did not answer within {HEALTH_TIMEOUT:.0f}s")
        except errors.ObjfsError as exc:
            problems.append(f"the bucket fails: {exc}")
        if self.store.journal.damage is not None:
            problems.append(self.store.journal.damage)
        if problems:
            return JSONResponse({"Healthy": False, "Problems": problems}, 503)
        return JSONResponse({"Healthy": True})


def _check_move_request(body: Any) -> str | None:
    """The first problem of a move-storage request body, naming its field, or None."""
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    resources = body.get("Resources")
    if not isinstance(resources, list) or not all(isinstance(r, str) and r for r in resources):
        return "Resources: expected an array of Orthanc ids (non-empty strings)"
    if body.get("TargetStorage") not in TARGETS:
        return f"TargetStorage: expected {TARGETS[0]!r} or {TARGETS[1]!r}"
    if not isinstance(body.get("Asynchronous", False), bool):
        return "Asynchronous: expected true or false"
    priority = body.get("Priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool):
        return "Priority: expected an integer"
    return None
