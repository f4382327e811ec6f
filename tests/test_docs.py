"""docs/ stays current: every test and code location the durability contract cites exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _defined_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
    return names


def test_cited_tests_exist() -> None:
    """`tests/x.py::name` cites a test; a following `::other` continues the same file."""
    text = (DOCS / "durability.md").read_text()
    last_file: str | None = None
    checked, missing = 0, []
    for file, name in re.findall(r"`(tests/[\w/]+\.py)?(?:::(\w+))?`", text):
        if file:
            last_file = file
            if not (ROOT / file).is_file():
                missing.append(file)
                continue
        if name:
            assert last_file is not None, name
            checked += 1
            if name not in _defined_names(ROOT / last_file):
                missing.append(f"{last_file}::{name}")
    assert checked > 20
    assert missing == []


def test_cited_code_exists() -> None:
    text = (DOCS / "durability.md").read_text() + (DOCS / "design.md").read_text()
    missing, checked = [], 0
    for file, names in re.findall(r"`(objfs/[\w/]+\.py)`((?: `[\w.]+`(?:/`?\w+`?)?,?)*)", text):
        path = ROOT / file
        if not path.is_file():
            missing.append(file)
            continue
        defined = _defined_names(path)
        for name in re.findall(r"`([\w.]+)`", names):
            checked += 1
            if name.split(".")[-1] not in defined:
                missing.append(f"{file}: {name}")
    assert checked >= 10
    assert missing == []


def test_code_cites_docs_not_the_old_design_file() -> None:
    stale = [str(p.relative_to(ROOT)) for p in (ROOT / "objfs").rglob("*.py")
             if "DESIGN.md" in p.read_text()]
    assert stale == []
