"""The repository stands on its own: nothing in the tests, benchmarks or scripts reads a path
outside the checkout (CI runs a plain clone; a user has nothing beside it)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What reaching outside the checkout has looked like: the parent of the repository root, or
# the steering folder that sits beside the repository on developer machines.
OUTSIDE = re.compile(r"ROOT\.parent\b|\.\./shared|/work/shared")


def test_no_test_or_script_reads_outside_the_repository() -> None:
    offenders = []
    for folder in ("tests", "benchmarks", "scripts", "objfs", "contrib", "docker", "systemd",
                   ".ci"):
        for path in (ROOT / folder).rglob("*"):
            if not path.is_file() or path.suffix not in {".py", ".sh", ".c", "", ".yml"}:
                continue
            if path == Path(__file__).resolve():
                continue
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if OUTSIDE.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_plugin_vectors_are_in_the_repository() -> None:
    vectors = ROOT / "tests" / "data" / "plugin-encryption"
    assert (vectors / "manifest.json").is_file()
    assert len(list((vectors / "enc").iterdir())) >= 10
