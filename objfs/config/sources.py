"""Reading the configuration sources into one JSON tree, in the orthancteam images' order.

Later wins: JSON files (a file, or every ``*.json`` of a directory in name order; default
``/etc/orthanc``) and the secrets directory's ``*.json`` (default ``/run/secrets``);
``ORTHANC_JSON`` (a whole JSON root); environment variables ``ORTHANC__SECTION__KEY`` (a value
is parsed as JSON when it is JSON, else taken as a string); then secret files named like those
variables, or named by a variable ``ORTHANC__SECTION__KEY_SECRET``. JSON may hold ``//`` and
``/* */`` comments, as Orthanc's own files do. No validation here (`objfs.config.build`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from objfs.config.envnames import ENV_PREFIX, SECRET_SUFFIX, WHOLE_ROOT_ENV, env_path
from objfs.config.problems import Problems
from objfs.config.schema import (
    KNOWN_PATHS,
    OBJFS_SECTION,
    POSTGRESQL_SECTION,
    SECRET_OPTIONS,
    SECTIONS,
    subsections,
)
from objfs.errors import ConfigError

DEFAULT_SECRETS_DIR = "/run/secrets"
DEFAULT_CONFIG_DIR = "/etc/orthanc"  # where the orthancteam images keep their JSON


def _parse_env_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def strip_comments(text: str) -> str:
    """Remove ``//`` and ``/* */`` comments outside strings (Orthanc accepts them in its JSON
    files; Debian's orthanc.json has many)."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i:j + 1])
            i = j + 1
        elif text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            out.append(" ")
            i = n if end < 0 else end + 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _json_files(paths: Iterable[str | os.PathLike[str]], problems: Problems) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix == ".json" and p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            problems.add(f"{path}: no such configuration file or directory")
    return files


def _parse_json_object(text: str, origin: str) -> dict[str, Any]:
    try:
        data = json.loads(strip_comments(text))
    except ValueError as exc:
        raise ConfigError(f"{origin}: invalid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the top level must be a JSON object")
    return data


def _load_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    return _parse_json_object(text, str(path))


def _set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any, origin: str) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path)} (from {origin}): {part} is not an object")
        node = child
    node[path[-1]] = value


def _override(tree: dict[str, Any], name: str, raw: str, origin: str) -> None:
    """Apply one ``ORTHANC__...`` value to `tree`; names outside objfs' sections are
    Orthanc's and ignored."""
    path = env_path(name)
    if path[0] not in SECTIONS:
        return
    where = f"{origin} {name}"
    if path not in KNOWN_PATHS and path[0] == OBJFS_SECTION:
        raise ConfigError(f"{name} (from {origin}): unknown option in section Objfs")
    value = _parse_env_value(raw)
    if len(path) == 1 or (len(path) == 2 and path[1] in subsections(path[0])):
        if not isinstance(value, dict):
            raise ConfigError(f"{'.'.join(path)} (from {where}): expected a JSON object")
        base: Any = tree
        for part in path:
            base = base.get(part, {}) if isinstance(base, dict) else {}
        value = _deep_merge(base if isinstance(base, dict) else {}, value)
    _set_path(tree, path, value, where)


def _read_secret(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read secret: {exc.strerror}") from exc


def load_tree(config_paths: Iterable[str | os.PathLike[str]],
              environ: Mapping[str, str] | None = None,
              secrets_dir: str | os.PathLike[str] | None = None,
              problems: Problems | None = None) -> dict[str, Any]:
    """Merge every source into one JSON tree (no validation), in the orthancteam images'
    order, later wins: the JSON files (each path a file or a directory of ``*.json``), the
    secrets directory's ``*.json``; ``ORTHANC_JSON``; ``ORTHANC__...`` variables; secrets
    named like those variables, and variables ``NAME_SECRET=file`` naming a secret file that
    holds NAME's value. Problems go to `problems`, or are raised together at the end."""
    environ = os.environ if environ is None else environ
    own = problems if problems is not None else Problems()
    secrets = Path(secrets_dir or environ.get("OBJFS_SECRETS_DIR", DEFAULT_SECRETS_DIR))
    files = _json_files(config_paths, own)
    if secrets.is_dir():
        files += sorted(p for p in secrets.iterdir() if p.suffix == ".json" and p.is_file())
    tree: dict[str, Any] = {}
    for path in files:
        with own.collect():
            tree = _deep_merge(tree, _load_json(path))
    if WHOLE_ROOT_ENV in environ:
        with own.collect():
            tree = _deep_merge(tree, _parse_json_object(environ[WHOLE_ROOT_ENV],
                                                        f"environment variable {WHOLE_ROOT_ENV}"))
    indirect: dict[str, str] = {}
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX):
            continue
        if name.endswith(SECRET_SUFFIX):
            indirect[name[:-len(SECRET_SUFFIX)]] = environ[name]
            continue
        with own.collect():
            _override(tree, name, environ[name], "environment variable")
    named: dict[str, Path] = {}
    if secrets.is_dir():
        named = {p.name: p for p in secrets.iterdir()
                 if p.name.startswith(ENV_PREFIX) and p.is_file()}
    for name, file_name in indirect.items():
        named[name] = secrets / file_name
    for name in sorted(named):
        with own.collect():
            _override(tree, name, _read_secret(named[name]), f"secret {named[name]}")
    if problems is None:
        own.raise_any()
    return tree


def masked(tree: Mapping[str, Any]) -> dict[str, Any]:
    """objfs' sections of `tree` with secret values replaced, for display."""
    def walk(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        return {k: "********" if k in SECRET_OPTIONS and isinstance(v, str) else walk(v)
                for k, v in node.items()}
    return {k: walk(v) for k, v in tree.items() if k in SECTIONS and (
        k != POSTGRESQL_SECTION or (isinstance(v, dict) and v.get("EnableIndex") is True))}
