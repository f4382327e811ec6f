"""Serving the sidecar's ASGI app with hypercorn's trio worker, inside the daemon's nursery."""

from __future__ import annotations

import logging

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve
from starlette.types import ASGIApp

from objfs.config import RestApiSettings
from objfs.errors import ConfigError

log = logging.getLogger(__name__)


async def serve(app: ASGIApp, rest: RestApiSettings, *,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on ``Objfs.RestApi`` Host:Port until cancelled. Reports started once the socket
    is bound; raises ConfigError when it cannot be."""
    config = Config()
    host = f"[{rest.host}]" if ":" in rest.host else rest.host
    config.bind = [f"{host}:{rest.port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")  # through objfs' own handlers
    config.graceful_timeout = 2.0

    async def run(*, task_status: trio.TaskStatus[list[str]]) -> None:
        await hypercorn_serve(app, config, task_status=task_status)  # type: ignore[arg-type]

    async with trio.open_nursery() as nursery:
        try:
            binds = await nursery.start(run)
        except OSError as exc:
            raise ConfigError(f"Objfs.RestApi: cannot listen on {host}:{rest.port}: "
                              f"{exc.strerror or exc}") from exc
        log.info("REST API listening on %s%s", ", ".join(binds),
                 "" if rest.username else " (no authentication: loopback only)")
        task_status.started()
