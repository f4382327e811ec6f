"""Without a usable /dev/fuse, tests that need no mount still run and pass, and mount tests
fail loudly (never skip). Shown by running part of this suite in a private mount namespace
where /dev/fuse is covered by /dev/null."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support.procs import ROOT

FUSE_FREE = ["tests/test_layout.py", "tests/test_errnos.py", "tests/test_journal.py",
             "tests/inprocess"]
MOUNT_TEST = "tests/test_mount.py::test_directories_behave"


def test_fuse_free_tests_pass_and_mount_tests_fail_without_fuse() -> None:
    script = ("mount --bind /dev/null /dev/fuse && exec " + sys.executable
              + " -m pytest -p no:cacheprovider -q -rfEs " + " ".join([*FUSE_FREE, MOUNT_TEST]))
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                             script], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    # The mount fixture fails in set-up (pytest says ERROR) or the test body fails: either
    # way it is counted against the run, never skipped.
    assert f"FAILED {MOUNT_TEST}" in out or f"ERROR {MOUNT_TEST}" in out, out
    assert "FUSE is required by this mount test: /dev/fuse is not the FUSE device" in out, out
    assert "FUSE IS NOT USABLE HERE" in out, out
    summary = out.strip().splitlines()[-1]
    assert (" 1 failed" in summary or " 1 error" in summary) and "skipped" not in summary, \
        summary
    passed = int(summary.split(" passed")[0].split()[-1])
    assert passed >= 40, summary
