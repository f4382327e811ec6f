"""The typed, validated settings the daemon and the tools run on (built by `objfs.config.build`).

Sizes are in bytes and times in seconds. Every closed set of values is an enum (a `StrEnum`, so
it compares equal to the JSON string it came from). Secrets are kept out of ``repr`` so that a
logged or printed settings object never shows a key, a password or a connection string.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from objfs.codec import KeyRing
from objfs.layout import Layout

DEFAULT_ORTHANC_URL = "http://127.0.0.1:8042"
DEFAULT_ORTHANC_TIMEOUT = 60.0


class Provider(enum.StrEnum):
    """Where the bucket is: a local directory (the embedded default) or a cloud."""

    LOCAL = "local"
    S3 = "s3"
    AZURE = "azure"
    GCS = "gcs"


class WriteMode(enum.StrEnum):
    """When Orthanc's close() returns: after the durable local write, or once uploaded."""

    WRITE_BACK = "write-back"
    WRITE_THROUGH = "write-through"


class HybridMode(enum.StrEnum):
    """The plugins' HybridMode: which tier new attachments go to, which is read first."""

    DISABLED = "Disabled"
    WRITE_TO_FILE_SYSTEM = "WriteToFileSystem"
    WRITE_TO_OBJECT_STORAGE = "WriteToObjectStorage"


class ServerSideEncryption(enum.StrEnum):
    AES256 = "AES256"
    KMS = "aws:kms"


class AzureAccessTier(enum.StrEnum):
    """Block-blob access tiers (a premium account has none: leave AccessTier out)."""

    HOT = "Hot"
    COOL = "Cool"
    COLD = "Cold"
    ARCHIVE = "Archive"


@dataclass(frozen=True)
class Encryption:
    """Validated ``StorageEncryption``: the key ring and the bound on bytes in flight."""

    ring: KeyRing = field(repr=False)
    max_concurrent_input: int


@dataclass(frozen=True)
class S3Settings:
    """The ``AwsS3Storage`` section, validated."""

    bucket: str
    region: str
    access_key: str | None = field(repr=False)
    secret_key: str | None = field(repr=False)
    endpoint: str | None
    virtual_addressing: bool
    connect_timeout: float
    request_timeout: float
    max_connections: int
    max_retries: int
    storage_class: str | None
    tags: Mapping[str, str]
    server_side_encryption: ServerSideEncryption | None
    sse_kms_key_id: str | None
    acl: str | None
    chunk_size: int
    direct_requests: bool


@dataclass(frozen=True)
class ClientSettings:
    """Timeouts and limits shared by the Azure and GCS clients."""

    connect_timeout: float
    request_timeout: float
    max_connections: int
    max_retries: int
    chunk_size: int


@dataclass(frozen=True)
class AzureSettings:
    """The ``AzureBlobStorage`` section, validated."""

    connection_string: str | None = field(repr=False)
    account_url: str | None
    container: str
    create_container: bool
    access_tier: AzureAccessTier | None
    api_version: str | None
    direct_requests: bool
    client: ClientSettings


@dataclass(frozen=True)
class GcsSettings:
    """The ``GoogleCloudStorage`` section, validated."""

    bucket: str
    service_account_file: str | None
    project: str | None
    endpoint: str | None
    storage_class: str | None
    direct_requests: bool
    client: ClientSettings


@dataclass(frozen=True)
class RestApiSettings:
    """``Objfs.RestApi``: where the sidecar listens and the basic-auth credentials."""

    host: str
    port: int
    username: str | None
    password: str | None = field(repr=False)


@dataclass(frozen=True)
class OrthancSettings:
    """``Objfs.Orthanc``: how objfs reaches Orthanc's REST API (move-storage)."""

    url: str = DEFAULT_ORTHANC_URL
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = DEFAULT_ORTHANC_TIMEOUT


@dataclass(frozen=True)
class PostgresSettings:
    """Orthanc's ``PostgreSQL`` section: where the cluster-wide lock lives (SharedBucket)."""

    conninfo: str = field(repr=False)  # libpq keyword/value string or URI; holds the password
    where: str  # host:port/database, for messages


@dataclass(frozen=True)
class Settings:
    """Everything the daemon needs, validated."""

    provider: Provider
    layout: Layout
    legacy_unknown_files: bool
    local_bucket: Path
    cache_directory: Path
    cache_size: int
    write_mode: WriteMode
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
    hybrid_mode: HybridMode = HybridMode.DISABLED
    fs_directory: Path | None = None  # the file-system tier (HybridMode not Disabled)
    encrypt_fs_tier: bool = True
    rest_api: RestApiSettings | None = None  # None: the sidecar is disabled
    orthanc: OrthancSettings = field(default_factory=OrthancSettings)
    series_prefetch: bool = True
    series_prefetch_limit: int = 500
    read_ahead_kib: int = 1024  # 0: the kernel's default (objfs.mountinfo.set_read_ahead)
    event_loop_nice: int = -10  # objfs.threadprio
    background_hold: float = 2.0  # seconds; objfs.store.writeback `_turn`
    shared_bucket: bool = False  # other objfs nodes use the bucket (docs/scale-out.md)
    shared_fs_tier: bool = False
    node_name: str = "objfs"
    postgresql: PostgresSettings | None = None
