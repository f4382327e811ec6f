"""The intent log: a durable record of each acknowledged write and delete, cheaper than a
journal commit.

An Orthanc write is durable once its fsync returns, a delete once acknowledged
(docs/durability.md, invariants 1 and 3). A durable SQLite commit costs a WAL write and
fsync and about 0.12 ms of CPU; one `O_DSYNC` write of 64 bytes into blocks written
beforehand costs one data write and a cache flush, with no file-system journal commit, and
about 0.05 ms of CPU. So the journal keeps the row change of a new attachment or a delete in
memory for a batch and appends an intent here; a later durable commit covers those rows and
empties the log (`Journal.checkpoint_log`), and opening the journal replays whatever the log
still holds, in order.

Format: a file of `SLOTS` slots of `SLOT` bytes, zero-filled when made (so a write never
allocates blocks). Slot 0 holds the header (magic, generation, CRC32); slot i >= 1 holds
intent i (generation, kind, uuid, size, CRC32). Only intents of the header's generation that
verify count (the other slots are torn, never written, or stale): emptying the log is one
header write with the next generation. An intent that does not verify before one that does
is damage (only the last append can be torn): the log's content is kept beside it
(`<name>.damaged`) with an error, and the intents that verify still count. Pure: no trio,
no SQLite; thread-safe.

`legacy_deletes` reads the delete log of objfs before 2026-12-05 (``deletes.log``, uuids of
deletes only), which the journal replays once and removes.
"""

from __future__ import annotations

import enum
import logging
import os
import struct
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from objfs.fsutil import fsync_path

log = logging.getLogger(__name__)

MAGIC = b"OBJFSIL1"
SLOT = 64
SLOTS = 8192
_HEADER = struct.Struct("<8sQ")
_RECORD = struct.Struct("<QB40sQ")
_CRC = struct.Struct("<I")
# The delete log this replaces: same header layout and size, records (generation, uuid).
LEGACY_MAGIC = b"OBJFSDL1"
_LEGACY_RECORD = struct.Struct("<Q40s")


class Kind(enum.IntEnum):
    DELETE = 0
    PUT = 1


class Intent(NamedTuple):
    """One logged change: a delete of `uuid`, or a put of `size` bytes (0 for a delete)."""

    kind: Kind
    uuid: str
    size: int = 0


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


def _generation_of(data: bytes, magic: bytes = MAGIC) -> int | None:
    """The generation in a whole log's content (`SLOTS` slots), or None when it is not of
    that size or its header does not verify."""
    if len(data) != SLOT * SLOTS:
        return None
    header = _unsealed(data[:SLOT], _HEADER.size)
    if header is None:
        return None
    found, generation = _HEADER.unpack(header)
    return int(generation) if found == magic else None


def _decoded(body: bytes, legacy: bool) -> tuple[int, Intent] | None:
    """(generation, intent) of a record's body; None for a kind this objfs does not know."""
    if legacy:
        generation, uuid = _LEGACY_RECORD.unpack(body)
        return generation, Intent(Kind.DELETE, uuid.rstrip(b"\0").decode("ascii"))
    generation, kind, uuid, size = _RECORD.unpack(body)
    if kind not in (Kind.DELETE, Kind.PUT):
        return None
    return generation, Intent(Kind(kind), uuid.rstrip(b"\0").decode("ascii"), size)


def _scan(data: bytes, generation: int, legacy: bool = False) -> tuple[list[Intent], int, int]:
    """A whole log's intents of `generation`: (them in order, the last slot one of them
    takes, how many slots before that one do not verify). Appends are written one after the
    other, each durable before the next, so only the last can be torn: a slot that does not
    verify followed by an intent of the generation is damage, not a tear."""
    record = _LEGACY_RECORD if legacy else _RECORD
    found: list[Intent] = []
    last = damaged = 0
    for slot in range(1, SLOTS):
        body = _unsealed(data[slot * SLOT:(slot + 1) * SLOT], record.size)
        decoded = None if body is None else _decoded(body, legacy)
        if decoded is None:
            continue
        record_generation, intent = decoded
        if record_generation == generation:
            found.append(intent)
            damaged += slot - last - 1
            last = slot
    return found, last, damaged


def _kept_aside(path: Path, data: bytes) -> Path:
    """A damaged log's content (`data`) copied beside it, for a post-mortem; the copy's
    path (a failure to write it is logged, not raised)."""
    aside = path.with_name(path.name + ".damaged")
    try:
        aside.write_bytes(data)
    except OSError as exc:
        log.error("cannot keep the damaged log's content in %s: %s", aside, exc)
    return aside


def read_intents(path: Path) -> list[Intent]:
    """The intents the log at `path` holds now, read without changing it (another process
    may be appending): [] when there is no log, or none of its size and format; intents that
    do not verify left out, as the replay does (a whole read: about 5 ms)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    generation = _generation_of(data)
    return [] if generation is None else _scan(data, generation)[0]


def legacy_deletes(path: Path) -> list[str]:
    """The uuids in the delete log of an earlier objfs at `path`, in order: [] when there is
    none, or it is not of that format (records that do not verify left out)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    generation = _generation_of(data, LEGACY_MAGIC)
    if generation is None:
        if data.strip(b"\0"):
            aside = _kept_aside(path, data)
            log.error("the delete log %s of an earlier objfs is not of its format (kept as "
                      "%s): deletes only it held leave their objects in the bucket; `objfs "
                      "audit --delete-orphans` removes them", path, aside)
        return []
    return [intent.uuid for intent in _scan(data, generation, legacy=True)[0]]


class IntentLog:
    """The log file at `path`, made (zero-filled, fsynced) if absent or not of its size.

    State: `generation` and `count` (slots of that generation taken), changed only under
    `_lock`: `append_*` (the event loop or a worker thread) adds an intent, `reset_if` (a
    worker thread, after the rows are durable) starts the next generation. Raises OSError
    when the file cannot be made, read or written.
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
        self.count = 0  # slots of this generation taken (intents, and damaged ones among them)
        self.damaged = False  # found damaged (and set aside) at this opening
        data = os.pread(self._fd, SLOT * SLOTS + 1, 0)
        generation = _generation_of(data)
        if generation is None:
            if data.strip(b"\0"):
                self._set_aside(data, "its header does not verify, or its size is not "
                                f"{SLOT * SLOTS} bytes")
            self._make()
            return
        self.generation = generation
        found, self.count, damaged = _scan(data, generation)
        if damaged:
            self._set_aside(data, f"{damaged} of its records do not verify; the "
                            f"{len(found)} that do are replayed")

    def _set_aside(self, data: bytes, problem: str) -> None:
        """A damaged log: its content is copied beside it for a post-mortem, with an error.
        What only the lost intents held is lost to the journal: a delete leaves its object
        in the bucket, an orphan that `objfs audit --delete-orphans` removes (Orthanc no
        longer references it, so none is served); a write leaves its local copy without a
        row, which start-up recovery keeps in lost+found (docs/durability.md)."""
        self.damaged = True
        aside = _kept_aside(self.path, data)
        log.error("the intent log %s is damaged (%s; kept as %s): deletes acknowledged to "
                  "Orthanc that only the lost records held leave their objects in the bucket "
                  "(`objfs audit --delete-orphans` removes them); writes that only they held "
                  "are kept in lost+found beside the journal", self.path, problem, aside)

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

    def pending(self) -> list[Intent]:
        """The intents logged in the current generation, in order (those that do not verify
        left out: `__init__` reported them)."""
        return _scan(os.pread(self._fd, SLOT * SLOTS, 0), self.generation)[0]

    def append_delete(self, uuid: str) -> bool:
        """Log the delete of `uuid`: `_append`."""
        return self._append(Kind.DELETE, uuid, 0)

    def append_put(self, uuid: str, size: int) -> bool:
        """Log the acknowledged write of `uuid` (`size` bytes): `_append`."""
        return self._append(Kind.PUT, uuid, size)

    def _append(self, kind: Kind, uuid: str, size: int) -> bool:
        """Durable when this returns True; False when the log is full (nothing written).
        The write is synchronous (`O_DSYNC`, 0.04 ms on an SSD, 0.13 ms on this project's
        virtual disk). Raises ValueError for a name longer than a record holds (Orthanc's
        uuids take 36 bytes)."""
        if len(uuid) > 40 or not uuid.isascii():
            raise ValueError(f"not an attachment uuid: {uuid!r}")
        with self._lock:
            if self.full:
                return False
            # Sealed under the lock: a reset that ran since the caller's row change must not
            # leave this record in the generation it has just ended.
            record = _sealed(_RECORD.pack(self.generation, kind, uuid.encode("ascii"), size))
            os.pwrite(self._sync_fd, record, (self.count + 1) * SLOT)
            self.count += 1
        return True

    def reset_if(self, count: int) -> bool:
        """Empty the log (durably) if it holds exactly `count` intents, i.e. none was
        appended since the caller made the first `count` durable elsewhere; returns whether
        it did (or was empty)."""
        with self._lock:
            if self.count != count:
                return False
            self._next_generation()
        return True

    def reset_after(self, prepare: Callable[[], None]) -> None:
        """Run `prepare`, which makes the change of every intent logged so far durable
        elsewhere, then empty the log (durably), with appends held throughout: an append
        waits for both. Raises what `prepare` raises (the log is then left as it was)."""
        with self._lock:
            prepare()
            self._next_generation()

    def _next_generation(self) -> None:
        """Start the next generation (an empty log), unless this one is empty. Caller holds
        `_lock`."""
        if self.count == 0:
            return
        os.pwrite(self._sync_fd, _sealed(_HEADER.pack(MAGIC, self.generation + 1)), 0)
        self.generation += 1
        self.count = 0
