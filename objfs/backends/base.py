"""The backend interface, and a base for backends built on blocking SDKs.

Contract for every backend:
- `put` stores a whole local file under a key, atomically (no partial object is visible);
- `get` writes the object (or a byte range of it) into a local file and returns the byte count;
  a range that runs past the end is clamped; a range that starts past the end yields 0 bytes;
  with a `Transform` (whole objects only) every received piece goes through it before it is
  written, in order, and its `finalize` ends the file (decryption as the bytes arrive);
- `head` returns the size; `delete` of a missing object succeeds;
- `list_page` returns keys in lexicographic order with a continuation token (None at the end);
- every failure is raised as an `objfs.errors` exception, never an SDK exception; `get`
  raises LocalDiskFull when the local file finds no room (the disk's failure, not the
  bucket's: never counted against the bucket nor retried as one).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar, cast

import trio

from objfs.errnos import is_disk_full
from objfs.errors import LocalDiskFull, ObjfsError
from objfs.priority import is_foreground

T = TypeVar("T")


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: float | None = None  # seconds since the epoch, when the listing tells


class Transform(Protocol):
    """What `Backend.get` passes the received bytes through (`objfs.codec.StreamDecryptor`).
    Its exceptions (ObjfsError) end the download and reach the caller unchanged."""

    def update(self, data: bytes | memoryview) -> bytes: ...

    def finalize(self) -> bytes: ...


class _TransformedFile:
    """The writable stream an SDK downloads into when `get` has a Transform: the SDK writes
    received bytes, the file gets their transform. Not seekable (SDKs then download in order);
    `tell` counts the bytes received."""

    def __init__(self, out: IO[bytes], transform: Transform) -> None:
        self._out = out
        self._transform = transform
        self._received = 0

    def write(self, data: bytes | memoryview) -> int:
        self._out.write(self._transform.update(data))
        self._received += len(data)
        return len(data)

    def tell(self) -> int:
        return self._received

    def seekable(self) -> bool:
        return False


class Backend(abc.ABC):
    """Async object store. Implementations are safe to call from many trio tasks at once."""

    name: str = "backend"

    @abc.abstractmethod
    async def put(self, key: str, path: Path) -> None: ...

    @abc.abstractmethod
    async def get(self, key: str, path: Path, offset: int = 0, length: int | None = None,
                  transform: Transform | None = None) -> int: ...

    @abc.abstractmethod
    async def head(self, key: str) -> ObjectInfo: ...

    @abc.abstractmethod
    async def delete(self, key: str) -> None: ...

    # Most keys one `delete_many` call takes; 0 when the store has no batch delete (then
    # deletes go one key at a time, after a listing).
    batch_delete_limit: int = 0
    # Largest object `put` sends in one request; a larger one goes in parts, several at a
    # time (None: never several at a time). The store lets those wait for Orthanc to pause.
    single_request_limit: int | None = None

    async def delete_many(self, keys: list[str]) -> None:
        """Delete up to `batch_delete_limit` keys in one request; absent keys are not an
        error. Raises when any key could not be deleted (the whole call may be repeated)."""
        raise NotImplementedError(f"{self.name} has no batch delete")

    @abc.abstractmethod
    async def list_page(self, prefix: str, token: str | None = None,
                        limit: int = 1000) -> tuple[list[ObjectInfo], str | None]: ...

    @abc.abstractmethod
    async def copy(self, src: str, dst: str) -> None: ...

    # Conditional requests, for the cluster lease (objfs.clusterlock): small objects only.
    @abc.abstractmethod
    async def create_exclusive(self, key: str, data: bytes) -> bool:
        """Create `key` holding `data` only if no object has that name (one conditional
        request); False when one exists."""

    @abc.abstractmethod
    async def read_versioned(self, key: str) -> tuple[bytes, str]:
        """A small object's bytes and version (ETag, generation); raises NotFound."""

    @abc.abstractmethod
    async def delete_if(self, key: str, version: str) -> bool:
        """Delete `key` only while its version is `version`; False when it is not (changed
        or gone)."""

    @abc.abstractmethod
    async def replace_if(self, key: str, version: str, data: bytes) -> bool:
        """Overwrite `key` with `data` only while its version is `version`; False when it is
        not (changed or gone)."""

    async def list(self, prefix: str, limit: int | None = None) -> AsyncIterator[ObjectInfo]:
        """Every object under `prefix` (at most `limit`), page by page."""
        token: str | None = None
        count = 0
        while True:
            page_size = 1000 if limit is None else min(1000, limit - count)
            page, token = await self.list_page(prefix, token, page_size)
            for info in page:
                yield info
                count += 1
                if limit is not None and count >= limit:
                    return
            if token is None:
                return

    async def prepare(self) -> None:  # noqa: B027 - most backends have nothing to prepare
        """Create what the configuration asks to create (a container); called once at start."""

    async def aclose(self) -> None:  # noqa: B027 - most backends hold nothing to close
        """Release connections. Closes even if it fails."""


def local_disk_full(exc: OSError, path: Path) -> LocalDiskFull | None:
    """What a failure to write a download's local copy `path` raises when the disk is full
    (a backend's own error otherwise)."""
    return LocalDiskFull(f"{path}: {exc.strerror}") if is_disk_full(exc) else None


# A blocking GET: (key, out, offset, length) -> bytes received (`ThreadedBackend._get_sync`).
GetSync = Callable[[str, IO[bytes], int, "int | None"], int]


class ThreadedBackend(Backend):
    """A backend whose work is blocking calls, run in worker threads under one limiter.

    Subclasses implement the `_sync` methods and `translate`, which turns any exception the
    SDK raises into an `ObjfsError`.
    """

    def __init__(self, max_threads: int) -> None:
        self._limiter = trio.CapacityLimiter(max_threads)
        # Orthanc's requests have slots of their own (objfs.priority).
        self._foreground = trio.CapacityLimiter(max_threads)

    @abc.abstractmethod
    def translate(self, exc: Exception, key: str, op: str) -> ObjfsError:
        """The objfs error for an SDK exception raised by operation `op` ("put", "get",
        "head", "delete", "list", "copy") on `key`."""

    async def _run(self, op: str, key: str, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` in a worker thread. Cancelling the caller (a deadline) abandons the thread:
        it ends on the SDK's own timeouts, still holding its limiter slot until then."""
        try:
            limiter = self._foreground if is_foreground() else self._limiter
            return await trio.to_thread.run_sync(fn, *args, limiter=limiter,
                                                 abandon_on_cancel=True)
        except ObjfsError:
            raise
        except Exception as exc:
            raise self.translate(exc, key, op) from exc

    @abc.abstractmethod
    def _put_sync(self, key: str, path: Path) -> None: ...

    @abc.abstractmethod
    def _get_sync(self, key: str, out: IO[bytes], offset: int, length: int | None) -> int:
        """Write the object (or range) into `out`, an empty stream, in order unless
        `out.seekable()`; returns the bytes received."""

    @abc.abstractmethod
    def _head_sync(self, key: str) -> ObjectInfo: ...

    @abc.abstractmethod
    def _delete_sync(self, key: str) -> None: ...

    @abc.abstractmethod
    def _list_sync(self, prefix: str, token: str | None,
                   limit: int) -> tuple[list[ObjectInfo], str | None]: ...

    @abc.abstractmethod
    def _copy_sync(self, src: str, dst: str) -> None: ...

    @abc.abstractmethod
    def _create_exclusive_sync(self, key: str, data: bytes) -> bool: ...

    @abc.abstractmethod
    def _read_versioned_sync(self, key: str) -> tuple[bytes, str]: ...

    @abc.abstractmethod
    def _delete_if_sync(self, key: str, version: str) -> bool: ...

    @abc.abstractmethod
    def _replace_if_sync(self, key: str, version: str, data: bytes) -> bool: ...

    async def create_exclusive(self, key: str, data: bytes) -> bool:
        return await self._run("put", key, self._create_exclusive_sync, key, data)

    async def read_versioned(self, key: str) -> tuple[bytes, str]:
        return await self._run("get", key, self._read_versioned_sync, key)

    async def delete_if(self, key: str, version: str) -> bool:
        return await self._run("delete", key, self._delete_if_sync, key, version)

    async def replace_if(self, key: str, version: str, data: bytes) -> bool:
        return await self._run("put", key, self._replace_if_sync, key, version, data)

    async def put(self, key: str, path: Path) -> None:
        await self._run("put", key, self._put_sync, key, path)

    async def get(self, key: str, path: Path, offset: int = 0, length: int | None = None,
                  transform: Transform | None = None) -> int:
        if transform is not None and (offset or length is not None):
            raise ValueError("a transformed download takes the whole object")
        return await self._run("get", key, self._get_into, key, path, offset, length, transform)

    def _get_into(self, key: str, path: Path, offset: int, length: int | None,
                  transform: Transform | None, get: GetSync | None = None) -> int:
        """`get` (by default `_get_sync`) into `path`, through `transform` if given."""
        get = get or self._get_sync
        try:
            with open(path, "wb") as out:
                if transform is None:
                    return get(key, out, offset, length)
                received = get(key, cast(IO[bytes], _TransformedFile(out, transform)), offset,
                               length)
                out.write(transform.finalize())
                return received
        except OSError as exc:
            # No network call answers ENOSPC: only the local file can have raised it.
            full = local_disk_full(exc, path)
            if full is not None:
                raise full from exc
            raise

    async def head(self, key: str) -> ObjectInfo:
        return await self._run("head", key, self._head_sync, key)

    async def delete(self, key: str) -> None:
        await self._run("delete", key, self._delete_sync, key)

    def _delete_many_sync(self, keys: list[str]) -> None:
        """Backends with a `batch_delete_limit` implement this."""
        raise NotImplementedError(f"{self.name} has no batch delete")

    async def delete_many(self, keys: list[str]) -> None:
        if not self.batch_delete_limit:
            return await super().delete_many(keys)  # raises: the store has no batch delete
        await self._run("delete", keys[0] if keys else "", self._delete_many_sync, keys)

    async def list_page(self, prefix: str, token: str | None = None,
                        limit: int = 1000) -> tuple[list[ObjectInfo], str | None]:
        return await self._run("list", prefix, self._list_sync, prefix, token, limit)

    async def copy(self, src: str, dst: str) -> None:
        await self._run("copy", src, self._copy_sync, src, dst)
