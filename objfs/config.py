"""Configuration: JSON files, Docker secrets and environment variables -> one typed `Settings`.

Sources, later wins, in the orthancteam images' order: JSON files (a file, or every ``*.json``
of a directory in name order; default ``/etc/orthanc``) and the secrets directory's ``*.json``
(default ``/run/secrets``); ``ORTHANC_JSON`` (a whole JSON root); environment variables
``ORTHANC__SECTION__KEY`` (orthancteam naming; a value is parsed as JSON when it is JSON, else
taken as a string); then secret files named like those variables, or named by a variable
``ORTHANC__SECTION__KEY_SECRET``. JSON may hold ``//`` and ``/* */`` comments, as Orthanc's own
files do. The plugins' sections are read verbatim; objfs' own options live in ``Objfs``.

Every problem is reported, all together, as a `ConfigError` naming each JSON path. Pure apart
from reading the files it is pointed at.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from objfs.codec import MAX_KEY_ID, KeyRing, read_key_file
from objfs.errors import ConfigError
from objfs.layout import Layout

log = logging.getLogger(__name__)

MIB = 1024 * 1024
S3_SECTION = "AwsS3Storage"
AZURE_SECTION = "AzureBlobStorage"
GCS_SECTION = "GoogleCloudStorage"
OBJFS_SECTION = "Objfs"
ENV_PREFIX = "ORTHANC__"
DEFAULT_SECRETS_DIR = "/run/secrets"
DEFAULT_CONFIG_DIR = "/etc/orthanc"  # where the orthancteam images keep their JSON


@dataclass(frozen=True)
class Option:
    """One JSON option: its accepted types, default and an optional extra check.

    `check` returns an error message (without the path) or None.
    """

    types: tuple[type, ...]
    default: Any = None
    check: Callable[[Any], str | None] | None = None


def _one_of(*values: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in values else f"must be one of {', '.join(map(repr, values))}"
    return check


def _at_least(minimum: float) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value >= minimum else f"must be >= {minimum}"
    return check


def _root_path(value: Any) -> str | None:
    return "must not start with '/'" if value.startswith("/") else None


def _string_map(value: Any) -> str | None:
    if all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return None
    return "must map strings to strings"


NUMBER = (int, float)
HYBRID_MODES = ("Disabled", "WriteToFileSystem", "WriteToObjectStorage")

# Options every provider section (and the Objfs section, for the local bucket) understands.
COMMON_OPTIONS: dict[str, Option] = {
    "RootPath": Option((str,), "", _root_path),
    "StorageStructure": Option((str,), "flat", _one_of("flat", "legacy")),
    "EnableLegacyUnknownFiles": Option((bool,), False),
    "StorageEncryption": Option((dict,), None),
    "HybridMode": Option((str,), "Disabled", _one_of(*HYBRID_MODES)),
    "MigrationFromFileSystemEnabled": Option((bool,), False),
}

S3_OPTIONS: dict[str, Option] = {
    **COMMON_OPTIONS,
    "BucketName": Option((str,)),
    "Region": Option((str,)),
    "AccessKey": Option((str,)),
    "SecretKey": Option((str,)),
    "Endpoint": Option((str,)),
    "VirtualAddressing": Option((bool,), True),
    "ConnectTimeout": Option(NUMBER, 10, _at_least(0.1)),
    "ConnectionTimeout": Option(NUMBER, None, _at_least(0.1)),
    "RequestTimeout": Option(NUMBER, 60, _at_least(0.1)),
    "MaxConnections": Option((int,), 16, _at_least(1)),
    "MaxRetries": Option((int,), 3, _at_least(0)),
    "StorageClass": Option((str,)),
    "Tags": Option((dict,), None, _string_map),
    "ServerSideEncryption": Option((str,), None, _one_of("AES256", "aws:kms")),
    "SseKmsKeyId": Option((str,)),
    "ObjectAcl": Option((str,)),
    "ChunkSize": Option((int,), 8, _at_least(5)),
}

# Options of the official S3 plugin that have no meaning for objfs: accepted, with a notice.
S3_PLUGIN_ONLY = {"UseTransferManager", "TransferPoolSize", "TransferBufferSize",
                  "EnableAwsSdkLogs"}

OBJFS_OPTIONS: dict[str, Option] = {
    **COMMON_OPTIONS,
    "CacheDirectory": Option((str,), "/var/cache/objfs"),
    "CacheSize": Option((int,), 10240, _at_least(16)),
    "WriteMode": Option((str,), "write-back", _one_of("write-back", "write-through")),
    "UploadConcurrency": Option((int,), 8, _at_least(1)),
    "ShutdownDrainTimeout": Option(NUMBER, 60, _at_least(0)),
    "CacheFullTimeout": Option(NUMBER, 30, _at_least(0)),
    "ReadTimeout": Option(NUMBER, 60, _at_least(1)),
    "LocalBucket": Option((str,), "/var/lib/objfs/bucket"),
    "AllowUnencryptedReads": Option((bool,), False),
    "EncryptLocalCache": Option((bool,), False),
    "FileSystemDirectory": Option((str,)),
    "EncryptFileSystemTier": Option((bool,), True),
    "RestApi": Option((dict,), None),
    "Orthanc": Option((dict,), None),
}

REST_API_OPTIONS: dict[str, Option] = {
    "Enable": Option((bool,), True),
    "Host": Option((str,), "127.0.0.1"),
    "Port": Option((int,), 8044, lambda v: None if 0 <= v <= 65535 else "must be a TCP port"),
    "Username": Option((str,)),
    "Password": Option((str,)),
}

ORTHANC_OPTIONS: dict[str, Option] = {
    "Url": Option((str,), "http://127.0.0.1:8042",
                  lambda v: None if v.startswith(("http://", "https://")) else
                  "must start with http:// or https://"),
    "Username": Option((str,)),
    "Password": Option((str,)),
    "Timeout": Option(NUMBER, 60, _at_least(1)),
}

# Options every object-store client of objfs has (objfs-only for Azure and GCS).
CLIENT_OPTIONS: dict[str, Option] = {
    "ConnectTimeout": Option(NUMBER, 10, _at_least(0.1)),
    "RequestTimeout": Option(NUMBER, 60, _at_least(0.1)),
    "MaxConnections": Option((int,), 16, _at_least(1)),
    "MaxRetries": Option((int,), 3, _at_least(0)),
    "ChunkSize": Option((int,), 8, _at_least(5)),
}

AZURE_TIERS = ("Hot", "Cool", "Cold", "Archive", "Premium")
AZURE_OPTIONS: dict[str, Option] = {
    **COMMON_OPTIONS, **CLIENT_OPTIONS,
    "ConnectionString": Option((str,)),
    "AccountUrl": Option((str,)),
    "ContainerName": Option((str,)),
    "CreateContainerIfNotExists": Option((bool,), True),
    "AccessTier": Option((str,), None, _one_of(*AZURE_TIERS)),
    "ApiVersion": Option((str,)),
}

GCS_OPTIONS: dict[str, Option] = {
    **COMMON_OPTIONS, **CLIENT_OPTIONS,
    "ServiceAccountFile": Option((str,)),
    "BucketName": Option((str,)),
    "Project": Option((str,)),
    "Endpoint": Option((str,)),
    "StorageClass": Option((str,)),
}

SECTIONS: dict[str, dict[str, Option]] = {S3_SECTION: S3_OPTIONS, AZURE_SECTION: AZURE_OPTIONS,
                                          GCS_SECTION: GCS_OPTIONS, OBJFS_SECTION: OBJFS_OPTIONS}
PROVIDERS = {S3_SECTION: "s3", AZURE_SECTION: "azure", GCS_SECTION: "gcs"}

ENCRYPTION_OPTIONS: dict[str, Option] = {
    "Enable": Option((bool,), True),
    "MasterKey": Option((list,)),
    "PreviousMasterKeys": Option((list,), None),
    "MaxConcurrentInputSize": Option((int,), 1024, _at_least(1)),
}


@dataclass(frozen=True)
class Encryption:
    """Validated ``StorageEncryption``: the key ring and the bound on bytes in flight."""

    ring: KeyRing
    max_concurrent_input: int


@dataclass(frozen=True)
class S3Settings:
    """The ``AwsS3Storage`` section, validated. Sizes in bytes, times in seconds."""

    bucket: str
    region: str
    access_key: str | None
    secret_key: str | None
    endpoint: str | None
    virtual_addressing: bool
    connect_timeout: float
    request_timeout: float
    max_connections: int
    max_retries: int
    storage_class: str | None
    tags: Mapping[str, str]
    server_side_encryption: str | None
    sse_kms_key_id: str | None
    acl: str | None
    chunk_size: int


@dataclass(frozen=True)
class ClientSettings:
    """Timeouts and limits shared by the Azure and GCS clients (seconds, bytes)."""

    connect_timeout: float
    request_timeout: float
    max_connections: int
    max_retries: int
    chunk_size: int


@dataclass(frozen=True)
class AzureSettings:
    """The ``AzureBlobStorage`` section, validated."""

    connection_string: str | None
    account_url: str | None
    container: str
    create_container: bool
    access_tier: str | None
    api_version: str | None
    client: ClientSettings


@dataclass(frozen=True)
class GcsSettings:
    """The ``GoogleCloudStorage`` section, validated."""

    bucket: str
    service_account_file: str | None
    project: str | None
    endpoint: str | None
    storage_class: str | None
    client: ClientSettings


@dataclass(frozen=True)
class RestApiSettings:
    """``Objfs.RestApi``: where the sidecar listens and the basic-auth credentials."""

    host: str
    port: int
    username: str | None
    password: str | None


@dataclass(frozen=True)
class OrthancSettings:
    """``Objfs.Orthanc``: how the sidecar reaches Orthanc's REST API."""

    url: str
    username: str | None
    password: str | None
    timeout: float


@dataclass(frozen=True)
class Settings:
    """Everything the daemon needs, validated. Sizes in bytes, times in seconds."""

    provider: str  # "local" | "s3" | "azure" | "gcs"
    layout: Layout
    legacy_unknown_files: bool
    local_bucket: Path
    cache_directory: Path
    cache_size: int
    write_mode: str
    upload_concurrency: int
    shutdown_drain_timeout: float
    cache_full_timeout: float
    read_timeout: float
    s3: S3Settings | None = None
    azure: AzureSettings | None = None
    gcs: GcsSettings | None = None
    encryption: Encryption | None = None
    allow_unencrypted_reads: bool = False
    encrypt_local_cache: bool = False
    hybrid_mode: str = "Disabled"  # one of HYBRID_MODES
    fs_directory: Path | None = None  # the file-system tier (HybridMode not Disabled)
    encrypt_fs_tier: bool = True
    rest_api: RestApiSettings | None = None  # None: the sidecar is disabled
    orthanc: OrthancSettings = OrthancSettings("http://127.0.0.1:8042", None, None, 60.0)


# --- orthancteam environment-variable naming --------------------------------------------------

_WORD_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
# Names the orthancteam images do not derive by their rule (their non-standard table).
ENV_EXCEPTIONS = {"PostgreSQL": "POSTGRESQL", "MySQL": "MYSQL"}
_JSON_EXCEPTIONS = {v: k for k, v in ENV_EXCEPTIONS.items()}
SECRET_SUFFIX = "_SECRET"
WHOLE_ROOT_ENV = "ORTHANC_JSON"


def env_word(name: str) -> str:
    """CamelCase -> CAMEL_CASE as the orthancteam images do (``AwsS3Storage`` ->
    ``AWS_S3_STORAGE``, ``SseKmsKeyId`` -> ``SSE_KMS_KEY_ID``)."""
    return ENV_EXCEPTIONS.get(name) or _WORD_BOUNDARY.sub("_", name).upper()


def json_word(word: str) -> str:
    """The orthancteam rule back: each ``_``-separated word keeps its first character and
    lower-cases the rest (``AWS_S3_STORAGE`` -> ``AwsS3Storage``)."""
    return _JSON_EXCEPTIONS.get(word) or "".join(w[:1] + w[1:].lower() for w in word.split("_"))


def env_name(*path: str) -> str:
    """The environment variable that sets the option at JSON `path`."""
    return ENV_PREFIX + "__".join(env_word(p) for p in path)


def env_path(name: str) -> tuple[str, ...]:
    """The JSON path an ``ORTHANC__...`` variable (or secret file) name sets."""
    return tuple(json_word(w) for w in name[len(ENV_PREFIX):].split("__"))


def _subsections(section: str) -> dict[str, dict[str, Option]]:
    """Options that are JSON objects of their own, with their options."""
    subs = {"StorageEncryption": ENCRYPTION_OPTIONS}
    if section == OBJFS_SECTION:
        subs.update(RestApi=REST_API_OPTIONS, Orthanc=ORTHANC_OPTIONS)
    return subs


def _known_paths() -> set[tuple[str, ...]]:
    paths: set[tuple[str, ...]] = set()
    for section, options in SECTIONS.items():
        paths.add((section,))
        for name in [*options, *(S3_PLUGIN_ONLY if section == S3_SECTION else ())]:
            paths.add((section, name))
        for sub_name, sub_options in _subsections(section).items():
            paths.update((section, sub_name, sub) for sub in sub_options)
    return paths


KNOWN_PATHS = _known_paths()
# Option values that `objfs config show` masks.
SECRET_OPTIONS = {"AccessKey", "SecretKey", "Password", "ConnectionString"}


# --- loading ---------------------------------------------------------------------------------


class Problems:
    """Every problem found in one pass, so that one run of `objfs config check` (or a failed
    start) lists them all."""

    def __init__(self) -> None:
        self.found: list[str] = []

    def add(self, message: str) -> None:
        self.found.append(message)

    @contextlib.contextmanager
    def collect(self) -> Iterator[None]:
        """Record a ConfigError raised in the block and carry on after it."""
        try:
            yield
        except ConfigError as exc:
            self.found.extend(exc.problems)

    def raise_any(self) -> None:
        if self.found:
            raise ConfigError(*self.found)


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
    if len(path) == 1 or (len(path) == 2 and path[1] in _subsections(path[0])):
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
    return {k: walk(v) for k, v in tree.items() if k in SECTIONS}


# --- validation ------------------------------------------------------------------------------


def _section(tree: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    value = tree.get(name)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: must be a JSON object")
    return value


def _validate(section_name: str, section: Mapping[str, Any], options: Mapping[str, Option],
              problems: Problems, ignored: Iterable[str] = (),
              strict: bool = True) -> dict[str, Any]:
    """Check types and values; returns every option of `options`, defaults filled in (also
    for the options found wrong, which are recorded in `problems`)."""
    out: dict[str, Any] = {}
    for key, value in section.items():
        path = f"{section_name}.{key}"
        option = options.get(key)
        if option is None:
            if key in ignored:
                log.info("%s is an option of the Orthanc plugin only; objfs ignores it", path)
            elif strict:
                problems.add(f"{path}: unknown option")
            else:
                log.warning("%s: unknown option, ignored", path)
            continue
        if value is None:
            continue
        wrong_bool = isinstance(value, bool) and bool not in option.types
        if wrong_bool or not isinstance(value, option.types):
            wanted = " or ".join(t.__name__ for t in option.types).replace("dict", "object")
            problems.add(f"{path}: expected {wanted}, got {json.dumps(value)}")
            continue
        if option.check is not None:
            problem = option.check(value)
            if problem:
                problems.add(f"{path}: {problem} (got {json.dumps(value)})")
                continue
        out[key] = value
    for key, option in options.items():
        out.setdefault(key, option.default)
    return out


def _key_entry(path: str, entry: Any) -> tuple[int, bytes]:
    if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], int)
            and not isinstance(entry[0], bool) and isinstance(entry[1], str)):
        raise ConfigError(f"{path}: expected [id, \"/path/to/key\"], got {json.dumps(entry)}")
    if not 0 <= entry[0] <= MAX_KEY_ID:
        raise ConfigError(f"{path}: key id {entry[0]} is not a uint32")
    try:
        return entry[0], read_key_file(entry[1])
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _encryption(section_name: str, raw: Mapping[str, Any] | None,
                problems: Problems) -> Encryption | None:
    """The plugin's ``StorageEncryption`` object; unlike the plugin, any mistake is an error
    (the plugin silently stores plaintext)."""
    path = f"{section_name}.StorageEncryption"
    if raw is None:
        return None
    values = _validate(path, raw, ENCRYPTION_OPTIONS, problems)
    if not values["Enable"]:
        return None
    if values["MasterKey"] is None:
        raise ConfigError(f"{path}.MasterKey: missing (required when Enable is true)")
    keys: dict[int, bytes] = {}
    current_id = None
    with problems.collect():
        current_id, keys[current_id] = _key_entry(f"{path}.MasterKey", values["MasterKey"])
    for i, entry in enumerate(values["PreviousMasterKeys"] or []):
        with problems.collect():
            key_id, key = _key_entry(f"{path}.PreviousMasterKeys[{i}]", entry)
            if key_id in keys:
                raise ConfigError(f"{path}.PreviousMasterKeys[{i}]: key id {key_id} is used "
                                  "twice")
            keys[key_id] = key
    if current_id is None:
        return None  # the problem is recorded
    return Encryption(KeyRing(current_id, keys), values["MaxConcurrentInputSize"] * MIB)


def _hybrid_mode(section_name: str, values: Mapping[str, Any]) -> str:
    mode: str = values["HybridMode"]
    if values["MigrationFromFileSystemEnabled"] and mode == "Disabled":
        log.warning("%s.MigrationFromFileSystemEnabled is deprecated: use \"HybridMode\": "
                    "\"WriteToObjectStorage\" instead (which it means)", section_name)
        return "WriteToObjectStorage"
    return mode


def _rest_api(raw: Mapping[str, Any] | None, problems: Problems) -> RestApiSettings | None:
    path = f"{OBJFS_SECTION}.RestApi"
    values = _validate(path, raw or {}, REST_API_OPTIONS, problems)
    if not values["Enable"]:
        return None
    if (values["Username"] is None) != (values["Password"] is None):
        raise ConfigError(f"{path}.Username/Password: give both or neither")
    host = values["Host"]
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and values["Username"] is None:
        raise ConfigError(f"{path}.Username/Password: required when Host ({host}) is not a "
                          "loopback address: the API moves and describes patient data")
    return RestApiSettings(host, values["Port"], values["Username"], values["Password"])


def _orthanc(raw: Mapping[str, Any] | None, problems: Problems) -> OrthancSettings:
    values = _validate(f"{OBJFS_SECTION}.Orthanc", raw or {}, ORTHANC_OPTIONS, problems)
    if (values["Username"] is None) != (values["Password"] is None):
        raise ConfigError(f"{OBJFS_SECTION}.Orthanc.Username/Password: give both or neither")
    return OrthancSettings(values["Url"].rstrip("/"), values["Username"], values["Password"],
                           float(values["Timeout"]))


def _client(values: Mapping[str, Any]) -> ClientSettings:
    return ClientSettings(connect_timeout=float(values["ConnectTimeout"]),
                          request_timeout=float(values["RequestTimeout"]),
                          max_connections=values["MaxConnections"],
                          max_retries=values["MaxRetries"], chunk_size=values["ChunkSize"] * MIB)


def _required(section: str, values: Mapping[str, Any], *names: str) -> None:
    for name in names:
        if not values[name]:
            raise ConfigError(f"{section}.{name}: missing (required)")


def _s3(raw: Mapping[str, Any], values: Mapping[str, Any]) -> S3Settings:
    _required(S3_SECTION, values, "BucketName", "Region")
    if values["SseKmsKeyId"] and values["ServerSideEncryption"] != "aws:kms":
        raise ConfigError(f"{S3_SECTION}.SseKmsKeyId: needs ServerSideEncryption 'aws:kms'")
    if (values["AccessKey"] is None) != (values["SecretKey"] is None):
        raise ConfigError(f"{S3_SECTION}.AccessKey/SecretKey: give both or neither")
    # The plugin reads ConnectTimeout; other S3 tools say ConnectionTimeout. Both work.
    connect = (values["ConnectTimeout"] if "ConnectTimeout" in raw
               else values["ConnectionTimeout"] or values["ConnectTimeout"])
    return S3Settings(
        bucket=values["BucketName"], region=values["Region"],
        access_key=values["AccessKey"], secret_key=values["SecretKey"],
        endpoint=values["Endpoint"] or None, virtual_addressing=values["VirtualAddressing"],
        connect_timeout=float(connect), request_timeout=float(values["RequestTimeout"]),
        max_connections=values["MaxConnections"], max_retries=values["MaxRetries"],
        storage_class=values["StorageClass"], tags=dict(values["Tags"] or {}),
        server_side_encryption=values["ServerSideEncryption"],
        sse_kms_key_id=values["SseKmsKeyId"], acl=values["ObjectAcl"],
        chunk_size=values["ChunkSize"] * MIB,
    )


def _azure(values: Mapping[str, Any]) -> AzureSettings:
    _required(AZURE_SECTION, values, "ContainerName")
    if not values["ConnectionString"] and not values["AccountUrl"]:
        raise ConfigError(f"{AZURE_SECTION}.ConnectionString: missing (or give AccountUrl to "
                          "use DefaultAzureCredential)")
    return AzureSettings(
        connection_string=values["ConnectionString"], account_url=values["AccountUrl"],
        container=values["ContainerName"],
        create_container=values["CreateContainerIfNotExists"],
        access_tier=values["AccessTier"], api_version=values["ApiVersion"],
        client=_client(values))


def _gcs(values: Mapping[str, Any]) -> GcsSettings:
    _required(GCS_SECTION, values, "BucketName")
    return GcsSettings(bucket=values["BucketName"],
                       service_account_file=values["ServiceAccountFile"],
                       project=values["Project"], endpoint=values["Endpoint"] or None,
                       storage_class=values["StorageClass"], client=_client(values))


def settings_from_tree(tree: Mapping[str, Any]) -> Settings:
    """Validate a merged JSON tree into `Settings`; raises one ConfigError listing every
    problem, each naming its JSON path."""
    problems = Problems()
    own_raw: dict[str, Any] = {}
    with problems.collect():
        own_raw = _section(tree, OBJFS_SECTION) or {}
    own = _validate(OBJFS_SECTION, own_raw, OBJFS_OPTIONS, problems)
    present = []
    for name in PROVIDERS:
        with problems.collect():
            if _section(tree, name) is not None:
                present.append(name)
    if len(present) > 1:
        problems.add(f"{' and '.join(present)}: only one object-storage section may be "
                     "configured")
    clouds: dict[str, Any] = {}
    if present:
        section = present[0]
        raw = tree[section]
        for key in COMMON_OPTIONS:
            if key in own_raw:
                problems.add(f"{OBJFS_SECTION}.{key}: with a {section} section this option "
                             f"belongs in {section}")
        ignored = S3_PLUGIN_ONLY if section == S3_SECTION else ()
        values = _validate(section, raw, SECTIONS[section], problems, ignored, strict=False)
        provider = PROVIDERS[section]
        with problems.collect():
            if provider == "s3":
                clouds["s3"] = _s3(raw, values)
            elif provider == "azure":
                clouds["azure"] = _azure(values)
            else:
                clouds["gcs"] = _gcs(values)
    else:
        section, values, provider = OBJFS_SECTION, own, "local"
    layout = Layout(values["StorageStructure"], values["RootPath"])
    hybrid = _hybrid_mode(section, values)
    if hybrid != "Disabled" and not own["FileSystemDirectory"]:
        problems.add(f"{OBJFS_SECTION}.FileSystemDirectory: missing (required with "
                     f"{section}.HybridMode {hybrid!r})")
    encryption = rest_api = None
    orthanc = OrthancSettings("http://127.0.0.1:8042", None, None, 60.0)
    with problems.collect():
        encryption = _encryption(section, values["StorageEncryption"], problems)
    if own["EncryptLocalCache"] and encryption is None:
        problems.add(f"{OBJFS_SECTION}.EncryptLocalCache: needs StorageEncryption enabled "
                     f"(in {section})")
    with problems.collect():
        rest_api = _rest_api(own["RestApi"], problems)
    with problems.collect():
        orthanc = _orthanc(own["Orthanc"], problems)
    problems.raise_any()
    return Settings(
        provider=provider, layout=layout, legacy_unknown_files=values["EnableLegacyUnknownFiles"],
        local_bucket=Path(own["LocalBucket"]), cache_directory=Path(own["CacheDirectory"]),
        cache_size=own["CacheSize"] * MIB, write_mode=own["WriteMode"],
        upload_concurrency=own["UploadConcurrency"],
        shutdown_drain_timeout=float(own["ShutdownDrainTimeout"]),
        cache_full_timeout=float(own["CacheFullTimeout"]),
        read_timeout=float(own["ReadTimeout"]), encryption=encryption,
        allow_unencrypted_reads=own["AllowUnencryptedReads"],
        encrypt_local_cache=own["EncryptLocalCache"], hybrid_mode=hybrid,
        fs_directory=Path(own["FileSystemDirectory"]) if hybrid != "Disabled" else None,
        encrypt_fs_tier=own["EncryptFileSystemTier"], rest_api=rest_api,
        orthanc=orthanc, **clouds,
    )


def check(config_paths: Iterable[str | os.PathLike[str]] = (),
          environ: Mapping[str, str] | None = None,
          secrets_dir: str | os.PathLike[str] | None = None,
          ) -> tuple[dict[str, Any], Settings | None, list[str]]:
    """Read every source and validate without raising: the merged tree, the settings (None
    when there is a problem) and every problem found."""
    problems = Problems()
    tree = load_tree(config_paths, environ, secrets_dir, problems)
    settings = None
    try:
        settings = settings_from_tree(tree)
    except ConfigError as exc:
        problems.found.extend(exc.problems)
    return tree, (None if problems.found else settings), problems.found


def load_settings(config_paths: Iterable[str | os.PathLike[str]] = (),
                  environ: Mapping[str, str] | None = None,
                  secrets_dir: str | os.PathLike[str] | None = None) -> Settings:
    """Read every source and validate; raises one ConfigError listing every problem."""
    _, settings, problems = check(config_paths, environ, secrets_dir)
    if settings is None:
        raise ConfigError(*problems)
    return settings
