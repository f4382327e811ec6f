"""Whole-object downloads on the event loop, for the backends whose direct path can make them
(`objfs.backends.asyncget`): S3 and Azure.

`LoopGets.get` sends a GET of a whole object (offset 0, no length) through the direct path's
`get_on_loop`, without a worker thread, and writes what arrives into the local file,
decrypting it first when a transform is given; every other download (a range, or any GET once
the direct path has no loop connections) goes to a worker thread as `ThreadedBackend.get`
sends it. An answer the direct path leaves to the SDK (`Fallback`: nothing was written) is
sent again by the SDK in a worker thread, counted towards `DIRECT_GIVE_UP` as the threads'
refusals are (`DirectFirst._after_refusal`); an answer it cannot read on the loop (`NotOnLoop`:
no length) sends this and every later whole-object GET to the worker threads' direct path.
Errors are those `ThreadedBackend.get` raises: the backend's `translate` of the network's and
the service's, LocalDiskFull for a full local disk.
"""

from __future__ import annotations

import abc
import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, TypeVar

from objfs import errors
from objfs.backends.asyncget import LoopConnections, NotOnLoop
from objfs.backends.base import ThreadedBackend, Transform, local_disk_full
from objfs.backends.kept import DirectFirst, Fallback, KeptConnections
from objfs.priority import is_foreground

log = logging.getLogger(__name__)


class LoopDirect(KeptConnections, abc.ABC):
    """A direct path whose whole-object GETs may run on the event loop.

    `loop`: its streams for them; None when they stay in worker threads (set so when built,
    or, the only change, by `LoopGets.get` on the event loop once the store answered without
    a length)."""

    loop: LoopConnections | None = None

    @abc.abstractmethod
    async def get_on_loop(self, key: str, write: Callable[[bytes], None]) -> int:
        """The whole object, handed to `write` as it arrives; returns its length. Raises
        Fallback (nothing written), NotOnLoop (nothing written), the service's errors as the
        threads' `get` raises them, ConnectionError, TimeoutError, or what `write` raises."""


D = TypeVar("D", bound=LoopDirect)


class LoopGets(ThreadedBackend, DirectFirst[D]):
    """`get` of whole objects on the event loop (module docstring). Subclasses give the SDK's
    own GET for a refused one (`_sdk_get`) and close `_loop_streams` in `aclose`
    (`_close_loop`)."""

    # The direct path's loop streams, kept so that `_close_loop` closes them even after the
    # direct path ended (`DirectFirst._after_refusal`). Set by the subclass after `direct`.
    _loop_streams: LoopConnections | None = None

    @abc.abstractmethod
    def _sdk_get(self, key: str, out: IO[bytes], offset: int, length: int | None) -> int:
        """The object (or range) into `out` through the SDK; returns the bytes received."""

    async def get(self, key: str, path: Path, offset: int = 0, length: int | None = None,
                  transform: Transform | None = None) -> int:
        direct = self.direct
        if direct is not None and direct.loop is not None and offset == 0 and length is None:
            try:
                received = await self._get_on_loop(direct, key, path, transform)
                self._discrepancies = 0  # a direct success, as `_either` counts them
                return received
            except Fallback as refused:
                # The SDK has the final word, as after a thread's direct GET was refused.
                return await self._run("get", key, self._get_into, key, path, 0, None, transform,
                                       functools.partial(self._refused_on_loop, direct, refused))
            except NotOnLoop as exc:
                # A store that streams objects without a length does so every time.
                direct.loop = None
                log.info("%s: %s; whole-object GETs run in worker threads from now on",
                         self.where + key, exc)
        return await super().get(key, path, offset, length, transform)

    async def _get_on_loop(self, direct: D, key: str, path: Path,
                           transform: Transform | None) -> int:
        """`direct.get_on_loop` into `path` (through `transform`), under the same limiter as
        a thread's GET; errors as `ThreadedBackend.get` raises them."""
        async with self._foreground if is_foreground() else self._limiter:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
            except OSError as exc:
                raise local_disk_full(exc, path) or self.translate(exc, key, "get") from exc

            def write(data: bytes) -> None:
                view = memoryview(data)
                while view:  # to the page cache; short only when the disk fills
                    view = view[os.write(fd, view):]

            try:
                if transform is None:
                    return await direct.get_on_loop(key, write)
                received = await direct.get_on_loop(
                    key, lambda chunk: write(transform.update(chunk)))
                write(transform.finalize())
                return received
            except (Fallback, NotOnLoop, errors.ObjfsError):
                raise
            except OSError as exc:  # writing the local copy, or the network
                raise local_disk_full(exc, path) or self.translate(exc, key, "get") from exc
            except Exception as exc:  # the service's errors, as the threads' path raises them
                raise self.translate(exc, key, "get") from exc
            finally:
                os.close(fd)

    def _refused_on_loop(self, direct: D, refused: Fallback, key: str, out: IO[bytes],
                         offset: int, length: int | None) -> int:
        """The SDK's GET of what a direct GET on the event loop was refused
        (`DirectFirst._after_refusal`)."""
        return self._after_refusal(direct, "GET", key, refused,
                                   lambda: self._sdk_get(key, out, offset, length))

    async def _close_loop(self) -> None:
        if self._loop_streams is not None:
            await self._loop_streams.aclose()
