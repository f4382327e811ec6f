"""Whether real FUSE mounts can be made here. Mount tests need it and fail loudly without it;
every other test runs anyway."""

from __future__ import annotations

import os
import shutil
import stat

# /dev/fuse is character device 10:229 on Linux.
FUSE_DEVICE = (10, 229)


def fuse_problems() -> list[str]:
    """What keeps this machine from mounting objfs, empty when nothing does."""
    problems = []
    try:
        st = os.stat("/dev/fuse")
    except FileNotFoundError:
        problems.append("/dev/fuse is missing")
    else:
        if not stat.S_ISCHR(st.st_mode) or \
                (os.major(st.st_rdev), os.minor(st.st_rdev)) != FUSE_DEVICE:
            problems.append("/dev/fuse is not the FUSE device (10:229)")
        elif not os.access("/dev/fuse", os.R_OK | os.W_OK):
            problems.append("/dev/fuse cannot be opened for reading and writing")
    if shutil.which("fusermount3") is None:
        problems.append("fusermount3 is not installed (Debian package fuse3)")
    return problems


def require_fuse() -> None:
    """Fail the calling test (never skip it) when FUSE is unusable."""
    problems = fuse_problems()
    if problems:
        import pytest

        pytest.fail("FUSE is required by this mount test: " + "; ".join(problems),
                    pytrace=False)
