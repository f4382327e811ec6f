"""The HybridMode file-system tier: a directory in Orthanc's own layout, ``ab/cd/<uuid>``.

It can be the StorageDirectory an Orthanc used before objfs (that is how a migration starts),
or the directory an official plugin in HybridMode writes to. Files are plaintext, or ``A1``
ciphertext as the plugins write them with StorageEncryption; both are read. It is not bounded
by ``CacheSize`` and needs no journal: the directory itself is the record, and every change is
fsynced (file, then directory entry) before it counts as done.

Methods are blocking file-system calls: run the slow ones (`commit`, `write_copy`, `remove`,
`usage`) in a worker thread; `stat`, `encrypted` and the directory queries are single syscalls.
Files being written live in ``.objfs-tmp/`` inside the directory (same file system, so a
rename publishes them); whatever is left there after a crash was never acknowledged. A tier
shared by several nodes (SharedBucket with SharedFileSystemTier) gives each node its own
``.objfs-tmp/<node>/``: a node's start-up cleans only its own.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from pathlib import Path

from objfs import codec
from objfs.errors import Corrupt
from objfs.fsutil import fd_path, fsync_path, sha256_file

log = logging.getLogger(__name__)

TMP_DIR = ".objfs-tmp"
# A shared tier's tombstones (``.objfs-deleted/<ab>/<uuid>``, empty files): a node's delete of
# an attachment leaves one before it looks at either tier, and another node's move of that
# attachment looks for one once its own step is done, then undoes the move (`Hybrid`).
DELETED_DIR = ".objfs-deleted"
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class FileSystemTier:
    """Attachment files under `root`. `ring` decrypts A1 files; new files are encrypted with it
    when `encrypt_new` is set."""

    def __init__(self, root: Path, ring: codec.KeyRing | None, encrypt_new: bool,
                 node: str | None = None) -> None:
        self.root = root
        self.ring = ring
        self.seal = ring if encrypt_new else None
        self.tmp = root / TMP_DIR / node if node else root / TMP_DIR

    def prepare(self) -> None:
        """Create the directory if needed and drop files a crash left half written.

        Raises OSError (with the path) when the directory cannot be used.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        probe = self.tmp / "probe"
        probe.write_bytes(b"")
        probe.unlink()

    def path(self, uuid: str) -> Path:
        return self.root / uuid[:2] / uuid[2:4] / uuid

    def partial_path(self, uuid: str, suffix: str = "") -> Path:
        return self.tmp / (uuid + suffix)

    # --- lookups ------------------------------------------------------------------------------

    def stat(self, uuid: str) -> os.stat_result | None:
        try:
            return os.stat(self.path(uuid))
        except FileNotFoundError:
            return None

    def encrypted(self, uuid: str) -> bool:
        """Whether the file is A1 ciphertext. Only meaningful with encryption configured:
        without a key ring nothing can be decrypted, so every file counts as plaintext."""
        if self.ring is None:
            return False
        with open(self.path(uuid), "rb") as f:
            head = f.read(2)
        return codec.is_encrypted(head)

    def size(self, uuid: str) -> int | None:
        """The attachment's plaintext size, or None when the file is not here."""
        st = self.stat(uuid)
        if st is None:
            return None
        try:
            encrypted = st.st_size >= codec.OVERHEAD and self.encrypted(uuid)
        except FileNotFoundError:
            return None
        return codec.plaintext_size(st.st_size) if encrypted else st.st_size

    def has_dir(self, name: str) -> bool:
        """Whether Orthanc directory `name` ("ab" or "abcd") exists here."""
        return os.path.isdir(self._dir(name))

    def has_files(self, name: str) -> bool:
        try:
            with os.scandir(self._dir(name)) as entries:
                return any(True for _ in entries)
        except (FileNotFoundError, NotADirectoryError):
            return False

    def children(self, name: str) -> list[str]:
        """Attachment uuids in second-level directory `name` ("abcd"), or the subdirectory
        names of a first-level one ("ab"), or first-level names for the root ("")."""
        try:
            found = os.listdir(self._dir(name)) if name else os.listdir(self.root)
        except (FileNotFoundError, NotADirectoryError):
            return []
        if len(name) == 4:
            return [n for n in found if _UUID.match(n) and n.startswith(name)]
        return [n for n in found if len(n) == 2 and all(c in "0123456789abcdef" for c in n)]

    def remove_dir(self, name: str) -> None:
        """rmdir of an empty Orthanc directory (missing is fine; not empty raises)."""
        try:
            os.rmdir(self._dir(name))
        except FileNotFoundError:
            pass

    def _dir(self, name: str) -> Path:
        return self.root / name[:2] / name[2:4] if len(name) == 4 else self.root / name

    # --- writing ------------------------------------------------------------------------------

    def commit(self, fd: int, uuid: str, placed: bool) -> bool:
        """Make the file written through `fd` (at `partial_path(uuid)`) durable under its final
        name: encrypted from the partial copy when new files are, else the partial file itself
        renamed into place (once: `placed` says it already was). Returns whether the final
        file is now the one behind `fd`."""
        os.fdatasync(fd)
        if self.seal is not None:
            sealed = self.partial_path(uuid, ".enc")
            codec.encrypt_file(fd_path(fd), sealed, self.seal)
            self._publish(sealed, uuid)
            return False
        if not placed:
            self._publish(self.partial_path(uuid), uuid)
        return True

    def write_copy(self, plaintext: Path, uuid: str) -> str:
        """Store a copy of `plaintext` as this tier's file for `uuid` (encrypted when new files
        are), then read it back: returns the plaintext's sha256. Raises Corrupt when the
        read-back differs."""
        _, expected = sha256_file(plaintext)
        staged = self.partial_path(uuid, ".copy")
        try:
            if self.seal is not None:
                codec.encrypt_file(plaintext, staged, self.seal)
            else:
                shutil.copyfile(plaintext, staged)
            self._publish(staged, uuid)
        finally:
            staged.unlink(missing_ok=True)
        check = self.partial_path(uuid, ".check")
        try:
            if self.seal is not None:
                codec.decrypt_file(self.path(uuid), check, self.seal)
                _, got = sha256_file(check)
            else:
                _, got = sha256_file(self.path(uuid))
        finally:
            check.unlink(missing_ok=True)
        if got != expected:
            raise Corrupt(f"the copy at {self.path(uuid)} does not read back as written")
        return expected

    def _publish(self, staged: Path, uuid: str) -> None:
        """fsync `staged`, rename it to the final name, fsync the directories that changed."""
        fsync_path(staged)
        final = self.path(uuid)
        for directory in (final.parent.parent, final.parent):
            if not directory.is_dir():
                directory.mkdir(exist_ok=True)
                fsync_path(directory.parent)
        os.replace(staged, final)
        fsync_path(final.parent)

    def discard_partial(self, uuid: str) -> None:
        for suffix in ("", ".enc"):
            self.partial_path(uuid, suffix).unlink(missing_ok=True)

    # --- removing -----------------------------------------------------------------------------

    def remove(self, uuid: str, prune: bool = False) -> bool:
        """Delete the file durably; returns False when it was not there. With `prune`, also
        remove its directories if that left them empty (as Orthanc does after a delete)."""
        final = self.path(uuid)
        try:
            os.unlink(final)
        except FileNotFoundError:
            return False
        fsync_path(final.parent)
        if prune:
            for directory in (final.parent, final.parent.parent):
                try:
                    os.rmdir(directory)
                except OSError as exc:
                    if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                        break
                    raise
        return True

    # --- tombstones (a shared tier) ------------------------------------------------------------

    def _tombstone(self, uuid: str) -> Path:
        return self.root / DELETED_DIR / uuid[:2] / uuid

    def mark_deleted(self, uuid: str) -> None:
        """Leave `uuid`'s tombstone (kept until `prune_tombstones`). Not fsynced: it orders
        a delete against a move on another node running at the same moment, which a crash of
        the tier's file server interrupts anyway. Raises OSError."""
        path = self._tombstone(uuid)
        try:
            path.touch()
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()

    def deleted(self, uuid: str) -> bool:
        """Whether a node left `uuid`'s tombstone (`mark_deleted`)."""
        return self._tombstone(uuid).exists()

    def prune_tombstones(self, older_than: float) -> int:
        """Remove the tombstones last touched before `older_than` (seconds since the epoch);
        returns how many went. Every node of the tier prunes: entries another one removed
        meanwhile are skipped."""
        removed = 0
        try:
            shards = os.listdir(self.root / DELETED_DIR)
        except FileNotFoundError:
            return 0
        for shard in shards:
            directory = self.root / DELETED_DIR / shard
            try:
                names = os.listdir(directory)
            except (FileNotFoundError, NotADirectoryError):
                continue
            for name in names:
                path = directory / name
                try:
                    if path.stat().st_mtime < older_than:
                        path.unlink()
                        removed += 1
                except FileNotFoundError:
                    continue
        return removed

    # --- status -------------------------------------------------------------------------------

    def usage(self) -> tuple[int, int]:
        """(files, bytes on disk) of the attachments here (walks the two directory levels)."""
        files = size = 0
        for first in self.children(""):
            for second in self.children(first):
                for uuid in self.children(first + second):
                    try:
                        size += os.stat(self.path(uuid)).st_size
                        files += 1
                    except FileNotFoundError:
                        continue
        return files, size
