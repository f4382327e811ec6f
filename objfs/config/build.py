"""Validation of a merged JSON tree into the typed `Settings`.

Every problem is reported, all together, as one `ConfigError` naming each JSON path. Pure apart
from reading the key files that ``StorageEncryption`` names.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import socket
import urllib.parse
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from objfs.codec import MAX_KEY_ID, KeyRing, read_key_file
from objfs.config.problems import Problems
from objfs.config.schema import (
    AZURE_SECTION,
    COMMON_OPTIONS,
    ENCRYPTION,
    ENCRYPTION_OPTIONS,
    GCS_SECTION,
    OBJFS_OPTIONS,
    OBJFS_SECTION,
    ORTHANC_OPTIONS,
    POSTGRESQL_OPTIONS,
    POSTGRESQL_SECTION,
    PROVIDER_SECTIONS,
    REST_API_OPTIONS,
    S3_PLUGIN_ONLY,
    S3_SECTION,
    SECTIONS,
    Option,
)
from objfs.config.settings import (
    AzureAccessTier,
    AzureSettings,
    ClientSettings,
    Encryption,
    GcsSettings,
    HybridMode,
    OrthancSettings,
    PostgresSettings,
    Provider,
    RestApiSettings,
    S3Settings,
    ServerSideEncryption,
    Settings,
    WriteMode,
)
from objfs.config.sources import load_tree
from objfs.errors import ConfigError
from objfs.layout import Layout, StorageStructure

log = logging.getLogger(__name__)
E = TypeVar("E", ServerSideEncryption, AzureAccessTier)

MIB = 1024 * 1024
PROVIDERS = {S3_SECTION: Provider.S3, AZURE_SECTION: Provider.AZURE, GCS_SECTION: Provider.GCS}


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


def _enum_or_none(kind: type[E], value: str | None) -> E | None:
    return None if value is None else kind(value)


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
    path = f"{section_name}.{ENCRYPTION}"
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


def _hybrid_mode(section_name: str, values: Mapping[str, Any]) -> HybridMode:
    mode = HybridMode(values["HybridMode"])
    if values["MigrationFromFileSystemEnabled"] and mode == HybridMode.DISABLED:
        log.warning("%s.MigrationFromFileSystemEnabled is deprecated: use \"HybridMode\": "
                    "\"WriteToObjectStorage\" instead (which it means)", section_name)
        return HybridMode.WRITE_TO_OBJECT_STORAGE
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
        server_side_encryption=_enum_or_none(ServerSideEncryption,
                                             values["ServerSideEncryption"]),
        sse_kms_key_id=values["SseKmsKeyId"], acl=values["ObjectAcl"],
        chunk_size=values["ChunkSize"] * MIB, direct_requests=values["DirectRequests"],
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
        access_tier=_enum_or_none(AzureAccessTier, values["AccessTier"]),
        api_version=values["ApiVersion"], direct_requests=values["DirectRequests"],
        client=_client(values))


def _gcs(values: Mapping[str, Any]) -> GcsSettings:
    _required(GCS_SECTION, values, "BucketName")
    return GcsSettings(bucket=values["BucketName"],
                       service_account_file=values["ServiceAccountFile"],
                       project=values["Project"], endpoint=values["Endpoint"] or None,
                       storage_class=values["StorageClass"],
                       direct_requests=values["DirectRequests"], client=_client(values))


def _postgresql(tree: Mapping[str, Any], problems: Problems) -> PostgresSettings | None:
    """Orthanc's PostgreSQL section, when it is there: how to reach the database."""
    raw = _section(tree, POSTGRESQL_SECTION)
    if raw is None:
        return None
    # The plugin's other options (Lock, EnableStorage...) are not objfs' business.
    ours = {k: v for k, v in raw.items() if k in POSTGRESQL_OPTIONS}
    values = _validate(POSTGRESQL_SECTION, ours, POSTGRESQL_OPTIONS, problems)
    if not values["EnableIndex"]:
        return None  # Orthanc's index is not there (Debian ships the section disabled)
    if values["ConnectionUri"]:
        uri = values["ConnectionUri"]
        parsed = urllib.parse.urlsplit(uri)
        if parsed.scheme not in ("postgres", "postgresql"):
            problems.add(f"{POSTGRESQL_SECTION}.ConnectionUri: expected postgresql://...")
            return None
        return PostgresSettings(uri, f"{parsed.hostname}:{parsed.port or 5432}{parsed.path}")
    parts = {"host": values["Host"], "port": str(values["Port"]), "dbname": values["Database"],
             "user": values["Username"], "password": values["Password"],
             "sslmode": "require" if values["EnableSsl"] else "prefer"}
    conninfo = " ".join(f"{k}='{_libpq_quote(v)}'" for k, v in parts.items() if v)
    return PostgresSettings(conninfo,
                            f"{values['Host']}:{values['Port']}/{values['Database']}")


def _libpq_quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _cluster_problems(own: Mapping[str, Any], own_raw: Mapping[str, Any], hybrid: HybridMode,
                      problems: Problems) -> None:
    """What SharedBucket cannot work with, each naming its option."""
    if not own["SharedBucket"]:
        return
    if own_raw.get("WriteMode") == WriteMode.WRITE_BACK:
        problems.add(f"{OBJFS_SECTION}.WriteMode: 'write-back' cannot be used with "
                     "SharedBucket (another node could not read an attachment before its "
                     "upload); leave it out, SharedBucket writes through")
    if hybrid == HybridMode.DISABLED or not own["FileSystemDirectory"]:
        return
    if not own["SharedFileSystemTier"]:
        problems.add(f"{OBJFS_SECTION}.SharedBucket with HybridMode '{hybrid}': every node must "
                     "see the same file-system tier; put FileSystemDirectory on a filesystem "
                     "all nodes mount and set Objfs.SharedFileSystemTier to true")
    cache = Path(own["CacheDirectory"]).resolve()
    fs_dir = Path(own["FileSystemDirectory"]).resolve()
    if cache == fs_dir or fs_dir in cache.parents:
        problems.add(f"{OBJFS_SECTION}.CacheDirectory: must not be inside the shared "
                     "FileSystemDirectory (it holds this node's own files)")


def settings_from_tree(tree: Mapping[str, Any]) -> Settings:
    """Validate a merged JSON tree into `Settings`; raises one ConfigError listing every
    problem, each naming its JSON path."""
    problems = Problems()
    own_raw: dict[str, Any] = {}
    with problems.collect():
        own_raw = _section(tree, OBJFS_SECTION) or {}
    own = _validate(OBJFS_SECTION, own_raw, OBJFS_OPTIONS, problems)
    present = []
    for name in PROVIDER_SECTIONS:
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
            if provider == Provider.S3:
                clouds["s3"] = _s3(raw, values)
            elif provider == Provider.AZURE:
                clouds["azure"] = _azure(values)
            else:
                clouds["gcs"] = _gcs(values)
    else:
        section, values, provider = OBJFS_SECTION, own, Provider.LOCAL
    layout = Layout(StorageStructure(values["StorageStructure"]), values["RootPath"])
    hybrid = _hybrid_mode(section, values)
    if hybrid != HybridMode.DISABLED and not own["FileSystemDirectory"]:
        problems.add(f"{OBJFS_SECTION}.FileSystemDirectory: missing (required with "
                     f"{section}.HybridMode '{hybrid}')")
    encryption = rest_api = None
    orthanc = OrthancSettings()
    with problems.collect():
        encryption = _encryption(section, values[ENCRYPTION], problems)
    if own["EncryptLocalCache"] and encryption is None:
        problems.add(f"{OBJFS_SECTION}.EncryptLocalCache: needs StorageEncryption enabled "
                     f"(in {section})")
    with problems.collect():
        rest_api = _rest_api(own["RestApi"], problems)
    with problems.collect():
        orthanc = _orthanc(own["Orthanc"], problems)
    postgresql = None
    with problems.collect():
        postgresql = _postgresql(tree, problems)
    _cluster_problems(own, own_raw, hybrid, problems)
    problems.raise_any()
    return Settings(
        provider=provider, layout=layout, legacy_unknown_files=values["EnableLegacyUnknownFiles"],
        local_bucket=Path(own["LocalBucket"]), cache_directory=Path(own["CacheDirectory"]),
        cache_size=own["CacheSize"] * MIB,
        write_mode=WriteMode.WRITE_THROUGH if own["SharedBucket"] else WriteMode(own["WriteMode"]),
        upload_concurrency=own["UploadConcurrency"],
        shutdown_drain_timeout=float(own["ShutdownDrainTimeout"]),
        cache_full_timeout=float(own["CacheFullTimeout"]),
        read_timeout=float(own["ReadTimeout"]), encryption=encryption,
        allow_unencrypted_reads=own["AllowUnencryptedReads"],
        encrypt_local_cache=own["EncryptLocalCache"], hybrid_mode=hybrid,
        fs_directory=(Path(own["FileSystemDirectory"]) if hybrid != HybridMode.DISABLED
                      else None),
        encrypt_fs_tier=own["EncryptFileSystemTier"], rest_api=rest_api,
        orthanc=orthanc, series_prefetch=own["SeriesPrefetch"],
        series_prefetch_limit=own["SeriesPrefetchLimit"], read_ahead_kib=own["ReadAhead"],
        event_loop_nice=own["EventLoopNice"],
        background_hold=float(own["BackgroundHold"]),
        shared_bucket=own["SharedBucket"],
        shared_fs_tier=own["SharedFileSystemTier"],
        node_name=own["NodeName"] or _host_name(), postgresql=postgresql, **clouds,
    )


def _host_name() -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:48].strip(".-_")
    return name or "objfs"


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
