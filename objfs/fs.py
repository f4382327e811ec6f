"""pyfuse3 handlers: the inode table, file handles and the errno boundary. No policy here.

The tree Orthanc sees: the root holds two-hex-digit directories ``ab``, which hold ``cd``,
which hold attachments ``abcd....-...`` (see `objfs.store`). Any other name at the root is
passed through to a local directory (Orthanc's SQLite index when ``IndexDirectory`` is unset).
Directory inodes are fixed numbers derived from their names; files get numbers as the kernel
learns of them and lose them at `forget`.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pyfuse3

from objfs import layout
from objfs.errnos import errno_for, is_disk_full
from objfs.errors import Immutable, InvalidName, ObjfsError
from objfs.priority import FOREGROUND
from objfs.store import Store, WriteHandle
from objfs.tally import Tally

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
L1_BASE = 2  # inodes 2..257: first-level directories "00".."ff"
L2_BASE = L1_BASE + 256  # inodes 258..65793: second-level directories "0000".."ffff"
FIRST_DYNAMIC = 1 << 20
# Attachments are immutable and objfs invalidates what it removes, so the kernel may keep
# names and attributes for long: this is what makes ingest fast (docs/design.md,
# "Performance shape").
STABLE_TIMEOUT = 300.0
PASS_TIMEOUT = 1.0
# Linux <time.h>; Python's time module does not name it. The clock the kernel stamps a FUSE
# inode's times with (`current_time`: the timekeeper's time at the last tick).
CLOCK_REALTIME_COARSE = 5

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def errno_boundary(fn: F) -> F:
    """Turn any exception a handler raises into a FUSEError with the table's errno, and count
    the request by operation and result in the instance's `tally`."""
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: Operations, *args: Any) -> Any:
        FOREGROUND.set(True)  # this handler's task only: backends give it their own slots
        self.in_flight += 1
        try:
            result = await fn(self, *args)
        except pyfuse3.FUSEError as exc:
            self.tally.fuse_ops[name, errno.errorcode.get(exc.errno, str(exc.errno))] += 1
            raise
        except Exception as exc:
            code = errno_for(exc)
            if is_disk_full(exc):
                log.error("%s failed: no space left on the local disk (%s)", name, exc)
            elif code == errno.EIO or not isinstance(exc, ObjfsError | OSError):
                log.error("%s failed: %s", name, exc, exc_info=not isinstance(exc, ObjfsError))
            elif code not in (errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY):
                log.warning("%s refused (%s): %s", name, errno.errorcode.get(code), exc)
            self.tally.fuse_ops[name, errno.errorcode.get(code, str(code))] += 1
            raise pyfuse3.FUSEError(code) from None
        finally:
            self.in_flight -= 1
        # A lookup's cached "absent" answer (inode 0) is an ENOENT for whoever counts.
        absent = name == "lookup" and result.st_ino == 0
        self.tally.fuse_ops[name, "ENOENT" if absent else "OK"] += 1
        return result

    return wrapper  # type: ignore[return-value]


@dataclass
class FileNode:
    uuid: str
    lookups: int = 0
    size: int = 0  # last size reported, kept for files unlinked while open


@dataclass
class PassNode:
    rel: str  # path relative to the pass-through directory
    lookups: int = 0


@dataclass
class ReadHandle:
    uuid: str
    fd: int


@dataclass
class PassHandle:
    fd: int


Handle = ReadHandle | WriteHandle | PassHandle


def _dir_name(inode: int) -> str | None:
    """The hex name of a fixed directory inode ("" for the root), None for other inodes."""
    if inode == ROOT:
        return ""
    if L1_BASE <= inode < L2_BASE:
        return f"{inode - L1_BASE:02x}"
    if L2_BASE <= inode < L2_BASE + 65536:
        return f"{inode - L2_BASE:04x}"
    return None


def _dir_inode(name: str) -> int:
    return (L1_BASE if len(name) == 2 else L2_BASE) + int(name, 16)


class Operations(pyfuse3.Operations):
    """The FUSE request handlers for one mount."""

    enable_writeback_cache = True

    def __init__(self, store: Store, passthrough: Path, uid: int, gid: int,
                 dir_mode: int, tally: Tally) -> None:
        super().__init__()
        self.store = store
        self.tally = tally
        self.in_flight = 0  # handlers running (errno_boundary counts them)
        self.passthrough = passthrough
        self.uid, self.gid = uid, gid
        self.dir_mode = stat.S_IFDIR | (dir_mode & 0o7777)
        self.file_mode = stat.S_IFREG | (dir_mode & 0o666)
        self.nodes: dict[int, FileNode | PassNode] = {}
        self.by_uuid: dict[str, int] = {}
        self.by_rel: dict[str, int] = {}
        self.handles: dict[int, Handle] = {}
        self._next_inode = FIRST_DYNAMIC
        self._next_fh = 1
        self._start_ns = time.time_ns()
        self._warned_passthrough = False

    # --- inode table --------------------------------------------------------------------------

    def _new_inode(self) -> int:
        self._next_inode += 1
        return self._next_inode

    def _file_inode(self, uuid: str) -> int:
        inode = self.by_uuid.get(uuid)
        if inode is None:
            inode = self.by_uuid[uuid] = self._new_inode()
            self.nodes[inode] = FileNode(uuid)
        return inode

    def _pass_inode(self, rel: str) -> int:
        inode = self.by_rel.get(rel)
        if inode is None:
            inode = self.by_rel[rel] = self._new_inode()
            self.nodes[inode] = PassNode(rel)
        return inode

    def _counted(self, entry: pyfuse3.EntryAttributes) -> pyfuse3.EntryAttributes:
        """Count a lookup the kernel will later `forget`."""
        node = self.nodes.get(entry.st_ino)
        if node is not None:
            node.lookups += 1
        return entry

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            node = self.nodes.get(inode)
            if node is None:
                continue
            node.lookups -= count
            if node.lookups <= 0:
                del self.nodes[inode]
                if isinstance(node, FileNode):
                    if self.by_uuid.get(node.uuid) == inode:
                        del self.by_uuid[node.uuid]
                else:
                    self.by_rel.pop(node.rel, None)

    def _detach(self, uuid: str) -> None:
        """The file named `uuid` is gone: its inode, if the kernel still holds one, keeps
        answering for the old file (an open handle, a late FORGET) and the name's next file gets
        an inode of its own. Reusing the number would make the kernel take the new file for the
        old one (same node id and generation: it keeps the old inode, its size and its cached
        pages), and the old inode's FORGET would then drop the new file's node."""
        self.by_uuid.pop(uuid, None)

    def _gone(self, inode: int, node: FileNode) -> bool:
        """Whether `node` stands for a file that is gone (`_detach`): its name leads elsewhere."""
        return self.by_uuid.get(node.uuid) != inode

    def _pass_path(self, rel: str) -> Path:
        if not self._warned_passthrough:
            self._warned_passthrough = True
            log.warning("storing %r in the local pass-through directory %s: these files never "
                        "reach the bucket. If this is Orthanc's index, set IndexDirectory to a "
                        "local disk outside the mount.", rel, self.passthrough)
        return self.passthrough / rel

    # --- attributes ---------------------------------------------------------------------------

    def _entry(self, inode: int, mode: int, size: int, timeout: float) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        entry.st_mode = mode
        entry.st_nlink = 2 if stat.S_ISDIR(mode) else 1
        entry.st_uid, entry.st_gid = self.uid, self.gid
        entry.st_size = size
        entry.st_blksize = 65536
        entry.st_blocks = (size + 511) // 512
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = self._start_ns
        entry.entry_timeout = entry.attr_timeout = timeout
        return entry

    def _dir_entry(self, name: str) -> pyfuse3.EntryAttributes:
        inode = ROOT if name == "" else _dir_inode(name)
        return self._entry(inode, self.dir_mode, 4096, STABLE_TIMEOUT)

    async def _file_entry(self, uuid: str) -> pyfuse3.EntryAttributes:
        size = await self.store.size_of(uuid)
        if size is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._sized_file_entry(uuid, size)

    def _sized_file_entry(self, uuid: str, size: int) -> pyfuse3.EntryAttributes:
        inode = self._file_inode(uuid)
        node = self.nodes[inode]
        assert isinstance(node, FileNode)
        node.size = size
        return self._entry(inode, self.file_mode, size, STABLE_TIMEOUT)

    @staticmethod
    def _absent_entry(keep: float) -> pyfuse3.EntryAttributes:
        """A lookup's answer that the name does not exist, which the kernel keeps for `keep`
        seconds (inode 0: nothing to count or forget)."""
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = 0
        entry.entry_timeout = keep
        return entry

    def _pass_entry(self, rel: str) -> pyfuse3.EntryAttributes:
        st = os.lstat(self._pass_path(rel))
        entry = self._entry(self._pass_inode(rel), st.st_mode, st.st_size, PASS_TIMEOUT)
        entry.st_nlink = st.st_nlink
        entry.st_atime_ns, entry.st_mtime_ns, entry.st_ctime_ns = (
            st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)
        return entry

    async def _entry_of(self, inode: int) -> pyfuse3.EntryAttributes:
        name = _dir_name(inode)
        if name is not None:
            return self._dir_entry(name)
        node = self.nodes.get(inode)
        if isinstance(node, FileNode):
            size = None if self._gone(inode, node) else await self.store.size_of(node.uuid)
            if size is None:
                # Unlinked while open: the kernel still asks (fstat, writeback of times).
                entry = self._entry(inode, self.file_mode, node.size, STABLE_TIMEOUT)
                entry.st_nlink = 0
                return entry
            return self._sized_file_entry(node.uuid, size)
        if isinstance(node, PassNode):
            return self._pass_entry(node.rel)
        raise pyfuse3.FUSEError(errno.ENOENT)

    def _child(self, parent: int, name: bytes) -> tuple[str, str]:
        """Classify a name under `parent`: ("dir", hexname) | ("file", uuid) | ("pass", rel)."""
        text = os.fsdecode(name)
        node = self.nodes.get(parent)
        if isinstance(node, PassNode):
            return "pass", f"{node.rel}/{text}"
        parent_name = _dir_name(parent)
        if parent_name is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if parent_name == "":
            return ("dir", text) if layout.is_hex_dir(text) else ("pass", text)
        if len(parent_name) == 2:
            if layout.is_hex_dir(text):
                return "dir", parent_name + text
        elif layout.is_uuid(text) and text.startswith(parent_name):
            return "file", text
        raise InvalidName(f"{text!r} in directory {parent_name!r}: not an Orthanc attachment path")

    # --- name operations ----------------------------------------------------------------------

    @errno_boundary
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        try:
            kind, what = self._child(parent_inode, name)
        except InvalidName:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        if kind == "dir":
            if not await self.store.dir_exists(what):
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._dir_entry(what)
        if kind == "file":
            size = await self.store.size_of(what)
            if size is not None:
                return self._counted(self._sized_file_entry(what, size))
            if not self.store.kernel_absent_ttl:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._absent_entry(self.store.kernel_absent_ttl)
        return self._counted(self._pass_entry(what))

    @errno_boundary
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._entry_of(inode)

    @errno_boundary
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.nodes.get(inode)
        if isinstance(node, PassNode):
            path = self._pass_path(node.rel)
            if fields.update_size:
                os.truncate(path, attr.st_size)
            if fields.update_mode:
                os.chmod(path, stat.S_IMODE(attr.st_mode))
            if fields.update_atime or fields.update_mtime:
                st = os.lstat(path)
                os.utime(path, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                                   attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns))
        elif isinstance(node, FileNode) and fields.update_size:
            handle = None if self._gone(inode, node) else self.store.write_handle(node.uuid)
            if handle is None:
                raise Immutable(f"attachment {node.uuid} is write-once")
            await self.store.truncate(handle, attr.st_size)
        # Times, mode and owner of attachments are fixed; the kernel's writeback cache sends
        # mtime updates that are accepted and ignored.
        return await self._entry_of(inode)

    @errno_boundary
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        kind, what = self._child(parent_inode, name)
        if kind == "dir":
            self.store.make_dir(what)
            return self._dir_entry(what)
        if kind == "pass":
            os.mkdir(self._pass_path(what), mode)
            return self._counted(self._pass_entry(what))
        raise InvalidName(f"{what}: a directory cannot have an attachment's name")

    @errno_boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        kind, what = self._child(parent_inode, name)
        if kind == "dir":
            self.store.remove_dir(what)
        elif kind == "pass":
            os.rmdir(self._pass_path(what))
        else:
            raise OSError(errno.ENOTDIR, what)

    @errno_boundary
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        kind, what = self._child(parent_inode, name)
        if kind == "file":
            await self.store.unlink(what)
            self._detach(what)
        elif kind == "pass":
            os.unlink(self._pass_path(what))
        else:
            raise OSError(errno.EISDIR, what)

    @errno_boundary
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        old_kind, old = self._child(parent_inode_old, name_old)
        new_kind, new = self._child(parent_inode_new, name_new)
        if old_kind != "pass" or new_kind != "pass":
            raise OSError(errno.EPERM, "attachments and their directories cannot be renamed")
        os.rename(self._pass_path(old), self._pass_path(new))
        inode = self.by_rel.pop(old, None)
        if inode is not None:
            node = self.nodes[inode]
            assert isinstance(node, PassNode)
            node.rel = new
            self.by_rel[new] = inode

    # --- files --------------------------------------------------------------------------------

    def _add_handle(self, handle: Handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = handle
        return fh

    @errno_boundary
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo,
                                                           pyfuse3.EntryAttributes]:
        kind, what = self._child(parent_inode, name)
        if kind == "file":
            handle = await self.store.create(what)
            # A new file: never the inode of one the name stood for before (deleted through
            # this mount, or by another node of a SharedBucket).
            self._detach(what)
            entry = self._counted(await self._file_entry(what))
            # With the writeback cache the kernel keeps a file's mtime and ctime itself, from
            # this reply on. Orthanc's write follows within a tick: when the new file's times
            # already equal the kernel's clock then, the write leaves the inode clean and
            # the fsync or close sends no SETATTR with the new times (one FUSE round trip
            # fewer per stored attachment; objfs ignores those times anyway).
            entry.st_mtime_ns = entry.st_ctime_ns = time.clock_gettime_ns(CLOCK_REALTIME_COARSE)
            return pyfuse3.FileInfo(fh=self._add_handle(handle), keep_cache=True), entry
        if kind == "pass":
            fd = os.open(self._pass_path(what), (flags & ~os.O_WRONLY) | os.O_RDWR | os.O_CREAT,
                         mode)
            entry = self._counted(self._pass_entry(what))
            return pyfuse3.FileInfo(fh=self._add_handle(PassHandle(fd))), entry
        raise OSError(errno.EISDIR, what)

    @errno_boundary
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self.nodes.get(inode)
        if isinstance(node, PassNode):
            # Read-write even for write-only opens: the writeback cache reads partial pages.
            if flags & os.O_ACCMODE == os.O_WRONLY:
                flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
            fd = os.open(self._pass_path(node.rel), flags & ~(os.O_CREAT | os.O_EXCL))
            return pyfuse3.FileInfo(fh=self._add_handle(PassHandle(fd)))
        if not isinstance(node, FileNode) or self._gone(inode, node):
            raise OSError(errno.EISDIR if _dir_name(inode) is not None else errno.ENOENT, "open")
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise OSError(errno.EPERM, f"attachment {node.uuid} is write-once")
        fd = await self.store.open_read(node.uuid)
        return pyfuse3.FileInfo(fh=self._add_handle(ReadHandle(node.uuid, fd)), keep_cache=True)

    @errno_boundary
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(self.handles[fh].fd, size, off)

    @errno_boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.handles[fh]
        if isinstance(handle, WriteHandle):
            return await self.store.write(handle, off, buf)
        if isinstance(handle, PassHandle):
            return os.pwrite(handle.fd, buf, off)
        raise OSError(errno.EBADF, "file not open for writing")

    @errno_boundary
    async def flush(self, fh: int) -> None:
        handle = self.handles[fh]
        if isinstance(handle, WriteHandle):
            await self.store.sync(handle, alone=self.in_flight == 1)

    @errno_boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self.handles[fh]
        if isinstance(handle, WriteHandle):
            await self.store.sync(handle, alone=self.in_flight == 1)
        elif isinstance(handle, PassHandle):
            (os.fdatasync if datasync else os.fsync)(handle.fd)

    @errno_boundary
    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh)
        if isinstance(handle, WriteHandle):
            if not await self.store.close_write(handle) and not handle.unlinked:
                # A failed write leaves no file behind: drop the kernel's cached entry.
                pyfuse3.invalidate_entry_async(_dir_inode(handle.uuid[:4]),
                                               handle.uuid.encode(), ignore_enoent=True)
        elif isinstance(handle, ReadHandle):
            self.store.close_read(handle.uuid, handle.fd)
        else:
            os.close(handle.fd)

    # --- directories --------------------------------------------------------------------------

    @errno_boundary
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if _dir_name(inode) is None and not isinstance(self.nodes.get(inode), PassNode):
            raise OSError(errno.ENOTDIR, "opendir")
        return inode

    async def _listing(self, inode: int) -> list[tuple[str, pyfuse3.EntryAttributes]]:
        node = self.nodes.get(inode)
        if isinstance(node, PassNode):
            names = sorted(os.listdir(self._pass_path(node.rel)))
            return [(n, self._pass_entry(f"{node.rel}/{n}")) for n in names]
        name = _dir_name(inode)
        assert name is not None
        out: list[tuple[str, pyfuse3.EntryAttributes]] = []
        if len(name) == 4:
            for uuid in self.store.list_dir(name):
                try:
                    out.append((uuid, await self._file_entry(uuid)))
                except pyfuse3.FUSEError:
                    continue  # deleted while listing
            return out
        out = [(d, self._dir_entry(name + d)) for d in self.store.list_dir(name)]
        if name == "" and self.passthrough.is_dir():
            out += [(n, self._pass_entry(n)) for n in sorted(os.listdir(self.passthrough))]
        return out

    @errno_boundary
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        listing = await self._listing(fh)
        for index in range(start_id, len(listing)):
            name, entry = listing[index]
            if not pyfuse3.readdir_reply(token, os.fsencode(name), entry, index + 1):
                return
            self._counted(entry)

    async def releasedir(self, fh: int) -> None:
        return None

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        """Capacity as the local tier sees it: what a writer can put down right now."""
        space = self.store.cache_space()
        st = os.statvfs(space.root)
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = 4096
        budget = space.capacity // 4096
        free = max(0, (space.capacity - space.used) // 4096)
        out.f_blocks = budget
        out.f_bfree = out.f_bavail = min(free, st.f_bavail * st.f_frsize // 4096)
        out.f_files = 1 << 32
        out.f_ffree = out.f_favail = 1 << 31
        out.f_namemax = 255
        return out
