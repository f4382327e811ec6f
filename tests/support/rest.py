"""One HTTP request to a JSON REST API (the sidecar, Orthanc), without raising for HTTP errors."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Any


def rest(base: str, method: str, path: str, body: Any = None,
         auth: tuple[str, str] | None = None, timeout: float = 300) -> tuple[int, Any]:
    """(status, decoded JSON or raw text) of one HTTP request; never raises for HTTP errors.
    `body` is sent as JSON unless it is bytes."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")
