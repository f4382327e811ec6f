"""A directory used as a bucket: the embedded default, no cloud needed.

Keys are relative paths under the directory. Objects are written to ``.objfs-tmp/`` inside the
bucket, fsynced, then renamed into place, so a reader never sees a partial object and a crash
leaves at most a temp file (removed at the next start).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, BinaryIO

from objfs import errors
from objfs.backends.base import ObjectInfo, ThreadedBackend
from objfs.fsutil import fsync_path

TMP_DIR = ".objfs-tmp"
COPY_CHUNK = 1024 * 1024
STALE_TMP = 24 * 3600.0


def _copy(src: BinaryIO, dst: BinaryIO) -> None:
    """Copy a whole file in the kernel (no data through Python; a reflink where the file
    system can), or with reads and writes where copy_file_range is refused."""
    try:
        while os.copy_file_range(src.fileno(), dst.fileno(), 64 * COPY_CHUNK):
            pass
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    src.seek(0)
    dst.seek(0)
    dst.truncate()
    shutil.copyfileobj(src, dst, COPY_CHUNK)
    dst.flush()


class LocalBackend(ThreadedBackend):
    """Backend storing each object as a file under `root` (created if missing)."""

    name = "local"

    def __init__(self, root: Path, max_threads: int = 8) -> None:
        super().__init__(max_threads)
        self.root = root
        self._tmp = root / TMP_DIR
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._tmp.mkdir(exist_ok=True)
            # Leftovers of a crashed writer; another process (the daemon, while `objfs audit`
            # or `objfs rekey` runs) may be writing the recent ones.
            stale = time.time() - STALE_TMP
            for entry in os.scandir(self._tmp):
                if entry.stat().st_mtime < stale:
                    os.unlink(entry.path)
        except OSError as exc:
            raise errors.BucketMissing(f"local bucket {root}: {exc.strerror}") from exc

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) \
                or parts[0] == TMP_DIR:
            raise errors.BackendError(f"invalid object key {key!r}")
        return self.root.joinpath(*parts)

    def translate(self, exc: Exception, key: str, op: str) -> errors.ObjfsError:
        if isinstance(exc, OSError):
            what = f"{key}: {exc.strerror or exc}"
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                if not self.root.is_dir():
                    return errors.BucketMissing(f"local bucket {self.root} is missing")
                return errors.NotFound(what)
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return errors.Denied(what)
            if exc.errno in (errno.EFBIG,):
                return errors.TooLarge(what)
            return errors.Unavailable(what)
        return errors.BackendError(f"{key}: {exc!r}")

    def _put_sync(self, key: str, path: Path) -> None:
        target = self._path(key)
        tmp = self._tmp / uuid.uuid4().hex
        try:
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                _copy(src, dst)
                os.fsync(dst.fileno())
            for _ in range(10):
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.replace(tmp, target)
                    break
                except FileNotFoundError:
                    continue  # a concurrent delete removed the emptied directory: again
            fsync_path(target.parent)
        finally:
            tmp.unlink(missing_ok=True)

    def _synced_tmp(self, data: bytes) -> Path:
        """A new temporary file in the bucket holding `data`, fsynced; the caller removes it."""
        tmp = self._tmp / uuid.uuid4().hex
        with open(tmp, "wb") as dst:
            dst.write(data)
            dst.flush()
            os.fsync(dst.fileno())
        return tmp

    def _create_exclusive_sync(self, key: str, data: bytes) -> bool:
        target = self._path(key)
        tmp = self._synced_tmp(data)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(tmp, target)  # atomic, and fails when the name exists
            except FileExistsError:
                return False
            fsync_path(target.parent)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _version(st: os.stat_result) -> str:
        return f"{st.st_ino}-{st.st_mtime_ns}-{st.st_size}"

    def _read_versioned_sync(self, key: str) -> tuple[bytes, str]:
        with open(self._path(key), "rb") as f:
            return f.read(), self._version(os.fstat(f.fileno()))

    def _delete_if_sync(self, key: str, version: str) -> bool:
        with self._conditional(key, version) as matches:
            if matches:
                os.unlink(self._path(key))
            return matches

    def _replace_if_sync(self, key: str, version: str, data: bytes) -> bool:
        with self._conditional(key, version) as matches:
            if not matches:
                return False
            tmp = self._synced_tmp(data)
            try:
                os.replace(tmp, self._path(key))
            finally:
                tmp.unlink(missing_ok=True)
            return True

    @contextlib.contextmanager
    def _conditional(self, key: str, version: str) -> Iterator[bool]:
        """Whether `key` is at `version`, held true until the block ends: the check and the
        change run under one lock that every process using the bucket takes."""
        with open(self._tmp / ".conditional", "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            try:
                matches = self._version(os.stat(self._path(key))) == version
            except FileNotFoundError:
                matches = False
            yield matches

    def _get_sync(self, key: str, out: IO[bytes], offset: int, length: int | None) -> int:
        copied = 0
        with open(self._path(key), "rb") as src:
            src.seek(offset)
            while length is None or copied < length:
                want = COPY_CHUNK if length is None else min(COPY_CHUNK, length - copied)
                chunk = src.read(want)
                if not chunk:
                    break
                out.write(chunk)
                copied += len(chunk)
        return copied

    def _head_sync(self, key: str) -> ObjectInfo:
        path = self._path(key)
        st = path.stat()
        if not path.is_file():
            raise errors.NotFound(key)
        return ObjectInfo(key, st.st_size)

    batch_delete_limit = 1000

    def _delete_many_sync(self, keys: list[str]) -> None:
        for key in keys:
            self._delete_sync(key)

    def _delete_sync(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        # Drop empty parent directories, as a bucket has no directories of its own.
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def _list_sync(self, prefix: str, token: str | None,
                   limit: int) -> tuple[list[ObjectInfo], str | None]:
        base, _, name_prefix = prefix.rpartition("/")
        start = self.root.joinpath(*base.split("/")) if base else self.root
        found: list[ObjectInfo] = []
        if start.is_dir():
            self._collect(start, base + "/" if base else "", name_prefix, found)
        found.sort(key=lambda info: info.key)
        if token is not None:
            found = [info for info in found if info.key > token]
        page = found[:limit]
        more = len(found) > limit
        return page, (page[-1].key if more and page else None)

    def _collect(self, directory: Path, key_prefix: str, name_prefix: str,
                 out: list[ObjectInfo]) -> None:
        with os.scandir(directory) as entries:
            for entry in entries:
                if not entry.name.startswith(name_prefix):
                    continue
                if not key_prefix and entry.name == TMP_DIR:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    self._collect(Path(entry.path), key_prefix + entry.name + "/", "", out)
                elif entry.is_file(follow_symlinks=False):
                    st = entry.stat()
                    out.append(ObjectInfo(key_prefix + entry.name, st.st_size, st.st_mtime))

    def _copy_sync(self, src: str, dst: str) -> None:
        self._put_sync(dst, self._path(src))

