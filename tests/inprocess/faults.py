"""A backend wrapper for in-process tests: each operation can be made to fail, hang, or wait
for the test's go-ahead, switchable while running. (The integration tests use real servers;
this only steers the local backend in-process.)"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import trio

from objfs import errors
from objfs.backends.base import Backend, ObjectInfo, Transform

T = TypeVar("T")


class Mode(enum.Enum):
    OK = "ok"
    UNAVAILABLE = "unavailable"  # every call fails with a temporary error
    HANG = "hang"  # every call blocks until cancelled
    GATED = "gated"  # every call waits for `gate` to be set, then succeeds
    ANSWER_GATED = "answer gated"  # every call is done at once, its answer waits for `gate`


class FaultyBackend(Backend):
    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name
        self.modes: dict[str, Mode] = {}
        self.gate = trio.Event()
        self.calls: Counter[str] = Counter()
        self.started = trio.Event()  # set whenever a call starts (replaced after each wait)
        self.batch_delete_limit = inner.batch_delete_limit
        self.single_request_limit = inner.single_request_limit
        self.refuse_batches = False  # a store without DeleteObjects: Unsupported
        self.put_sizes: list[int] = []  # size of each PUT's body, in the order they began

    def set(self, mode: Mode, *ops: str) -> None:
        for op in ops or ("put", "get", "head", "delete", "list", "copy"):
            self.modes[op] = mode
        if mode in (Mode.GATED, Mode.ANSWER_GATED):
            self.gate = trio.Event()

    async def _call(self, op: str, fn: Callable[[], Awaitable[T]]) -> T:
        self.calls[op] += 1
        self.started.set()
        self.started = trio.Event()
        mode = self.modes.get(op, Mode.OK)
        if mode is Mode.UNAVAILABLE:
            await trio.lowlevel.checkpoint()
            raise errors.Unavailable(f"{op}: injected 503")
        if mode is Mode.HANG:
            await trio.sleep_forever()
        if mode is Mode.GATED:
            await self.gate.wait()
        if mode is Mode.ANSWER_GATED:
            answer = await fn()
            await self.gate.wait()
            return answer
        return await fn()

    async def put(self, key: str, path: Path) -> None:
        self.put_sizes.append(path.stat().st_size)
        await self._call("put", lambda: self.inner.put(key, path))

    async def get(self, key: str, path: Path, offset: int = 0, length: int | None = None,
                  transform: Transform | None = None) -> int:
        return await self._call("get", lambda: self.inner.get(key, path, offset, length,
                                                              transform))

    async def head(self, key: str) -> ObjectInfo:
        return await self._call("head", lambda: self.inner.head(key))

    async def delete(self, key: str) -> None:
        await self._call("delete", lambda: self.inner.delete(key))

    async def delete_many(self, keys: list[str]) -> None:
        if self.refuse_batches:
            self.calls["refused batch"] += 1
            raise errors.Unsupported("injected: DeleteObjects is not implemented")
        await self._call("delete", lambda: self.inner.delete_many(keys))

    async def list_page(self, prefix: str, token: str | None = None,
                        limit: int = 1000) -> tuple[list[ObjectInfo], str | None]:
        return await self._call("list", lambda: self.inner.list_page(prefix, token, limit))

    async def copy(self, src: str, dst: str) -> None:
        await self._call("copy", lambda: self.inner.copy(src, dst))

    async def create_exclusive(self, key: str, data: bytes) -> bool:
        return await self._call("put", lambda: self.inner.create_exclusive(key, data))

    async def read_versioned(self, key: str) -> tuple[bytes, str]:
        return await self._call("get", lambda: self.inner.read_versioned(key))

    async def delete_if(self, key: str, version: str) -> bool:
        return await self._call("delete", lambda: self.inner.delete_if(key, version))

    async def replace_if(self, key: str, version: str, data: bytes) -> bool:
        return await self._call("put", lambda: self.inner.replace_if(key, version, data))
