"""The delete log: a durable record of each acknowledged delete, cheaper than a journal commit.

An Orthanc delete is durable once acknowledged (docs/durability.md, invariant 1). A durable
SQLite commit costs a WAL fsync and, to keep that off the event loop, a worker-thread hop;
one `O_DSYNC` write of 64 bytes into blocks written beforehand costs one data write and a
cache flush, with no file-system journal commit, and can run on the event loop. So the
journal keeps a delete's row change for a batch and appends the uuid here; a later durable
commit covers those rows and empties the log (`Journal.checkpoint_deletes`), and opening
the journal replays whatever the log still holds.

Format: a file of `SLOTS` slots of `SLOT` bytes, zero-filled when made (so a write never
allocates blocks). Slot 0 holds the header (magic, generation, CRC32); slot i >= 1 holds
record i (generation, uuid, CRC32). Only records of the header's generation count, read in
order up to the first that does not verify (torn, or never written): emptying the log is
one header write with the next generation. Pure: no trio, no SQLite; thread-safe.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from pathlib import Path

from objfs.fsutil import fsync_path

MAGIC = b"OBJFSDL1"
SLOT = 64
SLOTS = 8192
_HEADER = struct.Struct("<8sQ")
_RECORD = struct.Struct("<Q40s")
_CRC = struct.Struct("<I")


def _sealed(body: bytes) -> bytes:
    """`body` with its CRC32, padded to one slot."""
    return (body + _CRC.pack(zlib.crc32(body))).ljust(SLOT, b"\0")


def _unsealed(slot: bytes, size: int) -> bytes | None:
    """The body of a slot written by `_sealed` (`size` bytes), or None if it does not
    verify."""
    body, crc = slot[:size], slot[size:size + _CRC.size]
    if len(crc) != _CRC.size or _CRC.unpack(crc)[0] != zlib.crc32(body):
        return None
    return body


def _generation_of(data: bytes) -> int | None:
    """The generation in a whole log's content (`SLOTS` slots), or None when it is not of
    that size or its header does not verify."""
    if len(data) != SLOT * SLOTS:
        return None
    header = _unsealed(data[:SLOT], _HEADER.size)
    if header is None:
        return None
    magic, generation = _HEADER.unpack(header)
    return int(generation) if magic == MAGIC else None


def _records(data: bytes, generation: int) -> list[str]:
    """The uuids of `generation` in a log's content, in order (up to the first slot that does
    not verify or belongs to another generation)."""
    found = []
    for slot in range(1, SLOTS):
        body = _unsealed(data[slot * SLOT:(slot + 1) * SLOT], _RECORD.size)
        if body is None:
            break
        record_generation, uuid = _RECORD.unpack(body)
        if record_generation != generation:
            break
        found.append(uuid.rstrip(b"\0").decode("ascii"))
    return found


def read_logged(path: Path) -> list[str]:
    """The uuids the log at `path` holds now, read without changing it (another process may
    be appending): [] when there is no log, or none of its size and format."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    generation = _generation_of(data)
    return [] if generation is None else _records(data, generation)


class DeleteLog:
    """The log file at `path`, made (zero-filled, fsynced) if absent or not of its size.

    State: `generation` and `count` (records of that generation), changed only under
    `_lock`: `append` (the event loop) adds a record, `reset_if` (a worker thread, after
    the rows are durable) starts the next generation. Raises OSError when the file cannot
    be made, read or written.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            self._sync_fd = os.open(path, os.O_WRONLY | os.O_DSYNC | os.O_CLOEXEC)
        except OSError:
            os.close(self._fd)
            raise
        self.generation = 0
        self.count = 0
        generation = _generation_of(os.pread(self._fd, SLOT * SLOTS + 1, 0))
        if generation is None:
            self._make()
            return
        self.generation = generation
        self.count = len(self.pending())

    def _make(self) -> None:
        """A fresh, durable, zero-filled log of generation 1 (its old content is void)."""
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, bytes(SLOT * SLOTS), 0)
        self.generation, self.count = 1, 0
        os.pwrite(self._fd, _sealed(_HEADER.pack(MAGIC, 1)), 0)
        os.fsync(self._fd)
        fsync_path(self.path.parent)

    def close(self) -> None:
        os.close(self._sync_fd)
        os.close(self._fd)

    @property
    def full(self) -> bool:
        return self.count >= SLOTS - 1

    def pending(self) -> list[str]:
        """The uuids logged in the current generation, in order."""
        return _records(os.pread(self._fd, SLOT * SLOTS, 0), self.generation)

    def append(self, uuid: str) -> bool:
        """Log `uuid`, durably when this returns True; False when the log is full (nothing
        written). The write is synchronous (`O_DSYNC`, about 0.04 ms on an SSD). Raises
        ValueError for a name longer than a record holds (Orthanc's uuids take 36 bytes)."""
        if len(uuid) > 40 or not uuid.isascii():
            raise ValueError(f"not an attachment uuid: {uuid!r}")
        with self._lock:
            if self.full:
                return False
            # Sealed under the lock: a reset that ran since the caller's row change must not
            # leave this record in the generation it has just ended.
            record = _sealed(_RECORD.pack(self.generation, uuid.encode("ascii")))
            os.pwrite(self._sync_fd, record, (self.count + 1) * SLOT)
            self.count += 1
        return True

    def reset_if(self, count: int) -> bool:
        """Empty the log (durably) if it holds exactly `count` records, i.e. none was
        appended since the caller made the first `count` durable elsewhere; returns whether
        it did (or was empty)."""
        with self._lock:
            if self.count != count:
                return False
            if count == 0:
                return True
            os.pwrite(self._sync_fd, _sealed(_HEADER.pack(MAGIC, self.generation + 1)), 0)
            self.generation += 1
            self.count = 0
        return True
