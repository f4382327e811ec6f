"""A backend wrapper that times every request and counts the bytes that go up and down.

It reports each request to a callback (`objfs.metrics` feeds a Prometheus histogram with it),
so this layer imports no metrics library.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from objfs.backends.base import Backend, ObjectInfo, Transform
from objfs.errors import ObjfsError
from objfs.tally import error_class

T = TypeVar("T")
# (operation, outcome, seconds); outcome is "ok", an objfs error class, or "error".
Observer = Callable[[str, str, float], None]


class InstrumentedBackend(Backend):
    """Delegates to `inner`, reporting every request by operation and outcome to `observe`
    and counting bytes. Errors pass through unchanged."""

    def __init__(self, inner: Backend, observe: Observer) -> None:
        self.inner = inner
        self.name = inner.name
        self.batch_delete_limit = inner.batch_delete_limit
        self.single_request_limit = inner.single_request_limit
        self.observe = observe
        self.bytes_up = 0
        self.bytes_down = 0

    async def _timed(self, op: str, fn: Callable[[], Awaitable[T]]) -> T:
        start = time.monotonic()
        outcome = "error"
        try:
            result = await fn()
            outcome = "ok"
            return result
        except ObjfsError as exc:
            outcome = error_class(exc)
            raise
        finally:
            self.observe(op, outcome, time.monotonic() - start)

    async def put(self, key: str, path: Path) -> None:
        size = os.stat(path).st_size
        await self._timed("put", lambda: self.inner.put(key, path))
        self.bytes_up += size

    async def get(self, key: str, path: Path, offset: int = 0, length: int | None = None,
                  transform: Transform | None = None) -> int:
        count = await self._timed("get", lambda: self.inner.get(key, path, offset, length,
                                                                transform))
        self.bytes_down += count
        return count

    async def head(self, key: str) -> ObjectInfo:
        return await self._timed("head", lambda: self.inner.head(key))

    async def delete(self, key: str) -> None:
        await self._timed("delete", lambda: self.inner.delete(key))

    async def delete_many(self, keys: list[str]) -> None:
        await self._timed("delete_batch", lambda: self.inner.delete_many(keys))

    async def list_page(self, prefix: str, token: str | None = None,
                        limit: int = 1000) -> tuple[list[ObjectInfo], str | None]:
        return await self._timed("list", lambda: self.inner.list_page(prefix, token, limit))

    async def create_exclusive(self, key: str, data: bytes) -> bool:
        return await self._timed("put", lambda: self.inner.create_exclusive(key, data))

    async def read_versioned(self, key: str) -> tuple[bytes, str]:
        return await self._timed("get", lambda: self.inner.read_versioned(key))

    async def delete_if(self, key: str, version: str) -> bool:
        return await self._timed("delete", lambda: self.inner.delete_if(key, version))

    async def replace_if(self, key: str, version: str, data: bytes) -> bool:
        return await self._timed("put", lambda: self.inner.replace_if(key, version, data))

    async def copy(self, src: str, dst: str) -> None:
        await self._timed("copy", lambda: self.inner.copy(src, dst))

    async def prepare(self) -> None:
        await self.inner.prepare()

    async def aclose(self) -> None:
        await self.inner.aclose()
