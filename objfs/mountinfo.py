"""What the kernel says about mounts (/proc/self/mountinfo), and the one knob objfs turns on
its own: the read-ahead of the mount's backing device info.

Reading mountinfo never sends a request to a FUSE daemon, so these helpers are safe to call
from the daemon's own event loop, even for its own mount point.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

MOUNTINFO = Path("/proc/self/mountinfo")
BDI_ROOT = Path("/sys/class/bdi")


class Mount(NamedTuple):
    device: str  # "major:minor", which also names the mount's entry under /sys/class/bdi
    fstype: str  # "fuse.objfs", "ext4", ...


def _unescape(field: str) -> str:
    """Mount points in mountinfo have space, tab, newline and backslash written as octal."""
    return field.encode().decode("unicode_escape") if "\\" in field else field


def mounts(mountinfo: Path = MOUNTINFO) -> dict[str, Mount]:
    """Mount point -> the mount on top there (a later line covers an earlier one at the same
    path). Unlike os.path.ismount, it also lists a FUSE mount whose daemon died."""
    found: dict[str, Mount] = {}
    with open(mountinfo, encoding="utf-8") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) >= 5 and right:
                found[_unescape(fields[4])] = Mount(fields[2], right.split()[0])
    return found


def set_read_ahead(mountpoint: Path, kib: int, mountinfo: Path = MOUNTINFO,
                   bdi_root: Path = BDI_ROOT) -> bool:
    """Set the read-ahead of the mount on `mountpoint` to `kib` KiB. The kernel reads a FUSE
    file that is not in the page cache in requests no larger than the read-ahead window
    (128 KiB by default, whatever the request size the daemon accepts), so a whole-file read
    of a 0.5 MB instance costs five round trips through the daemon instead of one. Call it
    once the mount has answered a request: the kernel sets the read-ahead (to at most its
    default) while the daemon answers FUSE_INIT.

    Returns whether it was set. Never raises: without the right (not root, or /sys read-only
    as in most containers) reads stay correct, only in smaller requests."""
    try:
        mount = mounts(mountinfo).get(str(mountpoint))
        if mount is None:
            log.info("read-ahead left as it is: %s is not in %s", mountpoint, mountinfo)
            return False
        (bdi_root / mount.device / "read_ahead_kb").write_text(f"{kib}\n")
    except OSError as exc:
        log.info("read-ahead of %s left at the kernel's default (%s); reads of files not in "
                 "the page cache go in smaller requests. Set Objfs.ReadAhead to 0 to skip "
                 "this step.", mountpoint, exc)
        return False
    log.debug("read-ahead of %s (device %s) set to %d KiB", mountpoint, mount.device, kib)
    return True
