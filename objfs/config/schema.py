"""Every option objfs reads: its JSON types, default, extra check and help text.

This table is the one source for validation (`objfs.config.build`), environment-variable names
(`objfs.config.envnames`), ``objfs config options`` and the option tables in the README (a test
compares them). Sections: the plugins' ``AwsS3Storage``, ``AzureBlobStorage`` and
``GoogleCloudStorage`` (read verbatim) and objfs' own ``Objfs``; sub-objects
``StorageEncryption`` (every section), ``Objfs.RestApi`` and ``Objfs.Orthanc``.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from objfs.config.settings import (
    DEFAULT_ORTHANC_TIMEOUT,
    DEFAULT_ORTHANC_URL,
    AzureAccessTier,
    HybridMode,
    ServerSideEncryption,
    WriteMode,
)
from objfs.layout import StorageStructure

S3_SECTION = "AwsS3Storage"
AZURE_SECTION = "AzureBlobStorage"
GCS_SECTION = "GoogleCloudStorage"
OBJFS_SECTION = "Objfs"
ENCRYPTION = "StorageEncryption"

Check = Callable[[Any], str | None]


@dataclass(frozen=True)
class Option:
    """One JSON option.

    `check` returns an error message (without the path) or None. `shown` is how the default
    reads in help when it is not a plain value (``required``, ``the SDK's``); `help` says what
    the option does, in one or two sentences of Markdown.
    """

    types: tuple[type, ...]
    default: Any = None
    check: Check | None = None
    help: str = ""
    shown: str | None = None

    def type_name(self) -> str:
        names = {bool: "boolean", int: "integer", float: "number", str: "string",
                 dict: "object", list: "array"}
        if self.types == (int, float):
            return "number"
        return " or ".join(names[t] for t in self.types)

    def default_text(self) -> str:
        if self.shown is not None:
            return self.shown
        if self.default is None:
            return "none"
        return f"`{json.dumps(self.default)}`"


def one_of(values: Iterable[str]) -> Check:
    allowed = [str(v) for v in values]

    def check(value: Any) -> str | None:
        return None if value in allowed else f"must be one of {', '.join(map(repr, allowed))}"
    return check


def at_least(minimum: float) -> Check:
    def check(value: Any) -> str | None:
        return None if value >= minimum else f"must be >= {minimum}"
    return check


def _event_loop_nice(value: Any) -> str | None:
    return None if -20 <= value <= 0 else "must be between -20 and 0"


def _root_path(value: Any) -> str | None:
    return "must not start with '/'" if value.startswith("/") else None


def _string_map(value: Any) -> str | None:
    if all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return None
    return "must map strings to strings"


def _node_name(value: Any) -> str | None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,47}", value):
        return "1 to 48 letters, digits, '.', '_' or '-', starting with a letter or digit"
    return None


def _tcp_port(value: Any) -> str | None:
    return None if 0 <= value <= 65535 else "must be a TCP port"


# The form botocore accepts for a region name (it raises InvalidRegionError otherwise).
_REGION = re.compile(r"^[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?$")


def _region(value: Any) -> str | None:
    return None if _REGION.match(value) else "is not a region name (like eu-west-1)"


def _endpoint(value: Any) -> str | None:
    """An endpoint the SDKs can connect to: ``host[:port]`` or ``http(s)://host[:port][/path]``
    (S3 adds ``https://`` when no scheme is given)."""
    if value == "":
        return None
    url = urllib.parse.urlsplit(value if "://" in value else "https://" + value)
    problem = None
    try:
        url.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError:
        problem = "has an invalid port"
    if url.scheme not in ("http", "https"):
        problem = "must be http:// or https://"
    elif not url.hostname or any(c.isspace() for c in value):
        problem = "is not a URL (host[:port] or http(s)://host[:port])"
    return problem


def _http_url(value: Any) -> str | None:
    return None if value.startswith(("http://", "https://")) else \
        "must start with http:// or https://"


NUMBER = (int, float)

# Options every storage section (and Objfs, for the local bucket) understands.
COMMON_OPTIONS: dict[str, Option] = {
    "RootPath": Option((str,), "", _root_path,
                       "Key prefix; must not start with `/`; joined with one `/`."),
    "StorageStructure": Option(
        (str,), StorageStructure.FLAT.value, one_of(StorageStructure),
        "`flat`: `RootPath/<uuid>.dcm` (`.dcm.head`, `.json`, `.unk`); "
        "`legacy`: `RootPath/ab/cd/<uuid>`."),
    "EnableLegacyUnknownFiles": Option(
        (bool,), False, None,
        "Accepted; objfs finds an attachment under every plugin name anyway (one prefix "
        "listing)."),
    ENCRYPTION: Option((dict,), None, None,
                       "Client-side `A1` envelope encryption, see [Encryption](#encryption).",
                       "off"),
    "HybridMode": Option(
        (str,), HybridMode.DISABLED.value, one_of(HybridMode),
        "`WriteToFileSystem` or `WriteToObjectStorage`, see "
        "[HybridMode](#hybridmode-and-move-storage); any other value is an error (the plugin "
        "falls back to `Disabled`)."),
    "MigrationFromFileSystemEnabled": Option(
        (bool,), False, None,
        "Deprecated: `true` with `Disabled` means `WriteToObjectStorage` (logged)."),
}

S3_OPTIONS: dict[str, Option] = {
    **COMMON_OPTIONS,
    "BucketName": Option((str,), None, None, "The bucket.", "required"),
    "Region": Option((str,), None, _region, "The bucket's region.", "required"),
    "AccessKey": Option((str,), None, None, "Give both or neither; secret.",
                        "boto3 default chain"),
    "SecretKey": Option((str,), None, None, "Give both or neither; secret.",
                        "boto3 default chain"),
    "Endpoint": Option((str,), None, _endpoint,
                       "S3-compatible endpoint; `https://` is added when no scheme is given.",
                       "AWS"),
    "VirtualAddressing": Option((bool,), True, None, "`false`: path-style requests."),
    "ConnectTimeout": Option(NUMBER, 10, at_least(0.1),
                             "Seconds to connect (plugin default 30)."),
    "ConnectionTimeout": Option(NUMBER, None, at_least(0.1),
                                "Another name for `ConnectTimeout` (which wins).",
                                "`ConnectTimeout`"),
    "RequestTimeout": Option(NUMBER, 60, at_least(0.1),
                             "Socket read timeout per request, seconds (plugin: 1200 for a "
                             "whole request)."),
    "MaxConnections": Option((int,), 16, at_least(1),
                             "Concurrent requests (x4 during multipart)."),
    "MaxRetries": Option((int,), 3, at_least(0),
                         "SDK retries per request, beneath objfs' own retry policy."),
    "StorageClass": Option((str,), None, None, "E.g. `STANDARD_IA`.", "bucket default"),
    "Tags": Option((dict,), None, _string_map, "Object tags, `{\"key\": \"value\"}`."),
    "ServerSideEncryption": Option((str,), None, one_of(ServerSideEncryption),
                                   "`AES256` or `aws:kms`."),
    "SseKmsKeyId": Option((str,), None, None, "KMS key id (needs `aws:kms`)."),
    "ObjectAcl": Option((str,), None, None, "Canned ACL, e.g. `bucket-owner-full-control`."),
    "ChunkSize": Option((int,), 8, at_least(5),
                        "Multipart part size in MiB, >= 5; larger objects upload in parallel "
                        "parts."),
    "DirectRequests": Option((bool,), True, None,
                             "GETs, HEADs, single PUTs, batch deletes and listings signed "
                             "by objfs and sent over `http.client`, without botocore's "
                             "request pipeline (objfs only; not behind an HTTP proxy); "
                             "`false`: through boto3 like every other request."),
}

# Options of the official S3 plugin that have no meaning for objfs: accepted, with a notice.
S3_PLUGIN_ONLY = ("UseTransferManager", "TransferPoolSize", "TransferBufferSize",
                  "EnableAwsSdkLogs")

# Options every object-store client of objfs has (objfs-only for Azure and GCS).
CLIENT_OPTIONS: dict[str, Option] = {
    "ConnectTimeout": Option(NUMBER, 10, at_least(0.1), "Seconds to connect (objfs only)."),
    "RequestTimeout": Option(NUMBER, 60, at_least(0.1),
                             "Socket read timeout per request, seconds (objfs only)."),
    "MaxConnections": Option((int,), 16, at_least(1), "Concurrent requests (objfs only)."),
    "MaxRetries": Option((int,), 3, at_least(0),
                         "SDK retries per request (objfs only); the SDKs' own defaults block "
                         "for 80 s and more on a refused connection."),
    "ChunkSize": Option((int,), 8, at_least(5), "Block or chunk size in MiB (objfs only)."),
}

AZURE_OPTIONS: dict[str, Option] = {
    **COMMON_OPTIONS, **CLIENT_OPTIONS,
    "ConnectionString": Option((str,), None, None, "Secret.", "required, unless `AccountUrl`"),
    "AccountUrl": Option((str,), None, _endpoint,
                         "With `DefaultAzureCredential` when there is no connection string "
                         "(objfs only)."),
    "ContainerName": Option((str,), None, None, "The container.", "required"),
    "CreateContainerIfNotExists": Option((bool,), True, None,
                                         "Creates it at start, with a warning to check it is "
                                         "private."),
    "AccessTier": Option((str,), None, one_of(AzureAccessTier),
                         "`Hot`, `Cool`, `Cold` or `Archive`.", "account default"),
    "ApiVersion": Option((str,), None, None,
                         "Pin the service API version: emulators, Azure Stack (objfs only).",
                         "the SDK's"),
    "DirectRequests": Option((bool,), True, None,
                             "Downloads, HEADs, listings and single Put Blob uploads signed "
                             "with the connection string's account key and sent over "
                             "`http.client`, without the SDK's request pipeline (objfs only; "
                             "not with SAS or Entra ID, not behind an HTTP proxy); `false`: "
                             "through azure-storage-blob like every other request."),
}

GCS_OPTIONS: dict[str, Option] = {
    **COMMON_OPTIONS, **CLIENT_OPTIONS,
    "BucketName": Option((str,), None, None, "The bucket.", "required"),
    "ServiceAccountFile": Option((str,), None, None, "A service-account JSON key file.",
                                 "Application Default Credentials"),
    "Project": Option((str,), None, None, "Project id (objfs only).", "from the credentials"),
    "Endpoint": Option((str,), None, _endpoint, "Emulator or private endpoint (objfs only).",
                       "Google"),
    "StorageClass": Option((str,), None, None, "E.g. `NEARLINE` (objfs only).",
                           "bucket default"),
    "DirectRequests": Option((bool,), True, None,
                             "Downloads, HEADs, deletes, listings and single-request "
                             "uploads sent over `http.client` with the SDK's credentials, "
                             "without its request pipeline (objfs only; not behind an HTTP "
                             "proxy); `false`: through google-cloud-storage like every other "
                             "request."),
}

OBJFS_OPTIONS: dict[str, Option] = {
    **COMMON_OPTIONS,
    "CacheDirectory": Option((str,), "/var/cache/objfs", None,
                             "Journal, local copies, pass-through files. On local disk, "
                             "outside the mount point (inside it, objfs would wait for itself: "
                             "refused at start, exit 2; so are `LocalBucket` and "
                             "`FileSystemDirectory`)."),
    "CacheSize": Option((int,), 10240, at_least(16),
                        "MiB; bound on local copies, dirty and clean. Lowered at start, with a "
                        "warning, to what the cache directory's disk can hold."),
    "WriteMode": Option((str,), WriteMode.WRITE_BACK.value, one_of(WriteMode),
                        "`write-through`: `close()` returns only once the object is in the "
                        "bucket."),
    "UploadConcurrency": Option((int,), 8, at_least(1), "Parallel background uploads."),
    "BackgroundHold": Option(NUMBER, 2, at_least(0),
                             "Seconds at the start of each burst of Orthanc writes or deletes "
                             "during which no background request (upload, bucket delete, "
                             "prefetch) runs; then one at a time until Orthanc pauses for "
                             "0.5 s. Half the cache full of unsent data ends the wait. `0`: "
                             "one at a time from the start: the bucket closer behind, ingest "
                             "and delete slower (on the project's 2-core machine the durable "
                             "lag 0.92 s instead of 1.52 s, small ingest 281 instead of 398 "
                             "instances/s: docs/performance.md, 2026-12-05 10:31)."),
    "ShutdownDrainTimeout": Option(NUMBER, 60, at_least(0),
                                   "Seconds unmount waits for uploads; the rest stays "
                                   "journaled."),
    "CacheFullTimeout": Option(NUMBER, 30, at_least(0),
                               "Seconds a writer waits for space before ENOSPC."),
    "ReadTimeout": Option(NUMBER, 60, at_least(1),
                          "Seconds `open()` of an uncached file may retry the bucket before "
                          "EIO."),
    "LocalBucket": Option((str,), "/var/lib/objfs/bucket", None,
                          "The bucket when no cloud section is present; outside the mount point."),
    "AllowUnencryptedReads": Option((bool,), False, None,
                                    "With encryption on, also serve objects that are not "
                                    "encrypted (migrating a bucket)."),
    "EncryptLocalCache": Option((bool,), False, None,
                                "Keep local copies sealed too (needs `StorageEncryption`)."),
    "FileSystemDirectory": Option((str,), None, None,
                                  "The file-system tier, in Orthanc's layout `ab/cd/<uuid>`; "
                                  "outside the mount point (when migrating, mount objfs "
                                  "elsewhere than the old `StorageDirectory`).",
                                  "required with a HybridMode"),
    "EncryptFileSystemTier": Option((bool,), True, None,
                                    "With `StorageEncryption` on, new file-system-tier files "
                                    "are `A1` as the plugin writes them; `false`: plaintext."),
    "RestApi": Option((dict,), None, None, "The sidecar REST server, see `Objfs.RestApi`.",
                      "on, 127.0.0.1:8044"),
    "Orthanc": Option((dict,), None, None,
                      "Orthanc's REST API for move-storage, see `Objfs.Orthanc`.",
                      "`Objfs.Orthanc` defaults"),
    "SeriesPrefetch": Option((bool,), True, None,
                             "When a read has to fetch an instance from the bucket, fetch "
                             "the other instances of its series in the background (the "
                             "journal knows them for instances uploaded by this node; else "
                             "it asks `Objfs.Orthanc.Url`), below Orthanc's own reads and "
                             "within the cache budget: fetched copies replace the least "
                             "recently used ones, and a download starts only while it, the "
                             "other downloads in progress and the data not yet uploaded fit "
                             "in half the budget."),
    "SeriesPrefetchLimit": Option((int,), 500, at_least(0),
                                  "Most instances fetched ahead per series."),
    "ReadAhead": Option((int,), 1024, at_least(0),
                        "KiB the kernel reads ahead on the mount (one request per MiB for "
                        "files not in the page cache instead of one per 128 KiB); needs root "
                        "and a writable /sys. `0`: the kernel's default."),
    "EventLoopNice": Option((int,), -10, _event_loop_nice,
                            "Nice value of the daemon's event loop thread, which answers "
                            "every FUSE request Orthanc waits for; the worker threads "
                            "(uploads, journal commits, GCS and ranged downloads) keep "
                            "theirs (whole-object S3 and Azure downloads run on the event "
                            "loop). Needs "
                            "CAP_SYS_NICE (the systemd units grant it); without it the "
                            "thread stays as it is (logged). `0`: unchanged."),
    "SharedBucket": Option((bool,), False, None,
                           "Other objfs nodes use this bucket (several Orthanc nodes on one "
                           "index): write-through, lookups and deletes ask the bucket, "
                           "move-storage and rekey take a cluster-wide lock. See \"Several "
                           "Orthanc nodes\"."),
    "SharedFileSystemTier": Option((bool,), False, None,
                                   "With `SharedBucket` and a HybridMode: the operator "
                                   "declares `FileSystemDirectory` a filesystem every node "
                                   "mounts (CephFS, or NFS mounted with `lookupcache=none`: "
                                   "docs/scale-out.md); required then."),
    "NodeName": Option((str,), None, _node_name,
                       "This node's name in cluster locks, `objfs status` and 409 answers.",
                       "the host name"),
}

ENCRYPTION_OPTIONS: dict[str, Option] = {
    "Enable": Option((bool,), True, None, "`false` turns encryption off."),
    "MasterKey": Option((list,), None, None,
                        "`[id, \"/path/to/key\"]`: the key new objects are encrypted with.",
                        "required"),
    "PreviousMasterKeys": Option((list,), None, None,
                                 "`[[id, \"/path\"], ...]`: keys that may still decrypt."),
    "MaxConcurrentInputSize": Option((int,), 1024, at_least(1),
                                     "MiB of plaintext being encrypted or decrypted at once."),
}

REST_API_OPTIONS: dict[str, Option] = {
    "Enable": Option((bool,), True, None, "`false` turns the sidecar off."),
    "Host": Option((str,), "127.0.0.1", None,
                   "Listen address; not a loopback address needs `Username`/`Password`."),
    "Port": Option((int,), 8044, _tcp_port, "Listen port."),
    "Username": Option((str,), None, None, "HTTP basic auth; give both or neither."),
    "Password": Option((str,), None, None, "HTTP basic auth; secret."),
}

ORTHANC_OPTIONS: dict[str, Option] = {
    "Url": Option((str,), DEFAULT_ORTHANC_URL, _http_url, "Orthanc's REST API."),
    "Username": Option((str,), None, None, "Give both or neither."),
    "Password": Option((str,), None, None, "Secret."),
    "Timeout": Option(NUMBER, DEFAULT_ORTHANC_TIMEOUT, at_least(1), "Seconds per request."),
}

# Orthanc's PostgreSQL plugin section, read for the cluster-wide lock (SharedBucket) when its
# EnableIndex is true; objfs reads only how to connect and ignores the plugin's other options.
POSTGRESQL_SECTION = "PostgreSQL"
POSTGRESQL_OPTIONS: dict[str, Option] = {
    "EnableIndex": Option((bool,), False, None,
                          "Orthanc's index is in PostgreSQL; objfs uses the section only then."),
    "Host": Option((str,), "localhost", None, "The server."),
    "Port": Option((int,), 5432, _tcp_port, "Its port."),
    "Database": Option((str,), "", None, "The database (the user's by default)."),
    "Username": Option((str,), "", None, "The role."),
    "Password": Option((str,), "", None, "Secret."),
    "ConnectionUri": Option((str,), None, None,
                            "`postgresql://user:password@host:port/database`; replaces the "
                            "five options above.", "none"),
    "EnableSsl": Option((bool,), False, None, "Require TLS."),
}

SECTIONS: dict[str, dict[str, Option]] = {S3_SECTION: S3_OPTIONS, AZURE_SECTION: AZURE_OPTIONS,
                                          GCS_SECTION: GCS_OPTIONS, OBJFS_SECTION: OBJFS_OPTIONS,
                                          POSTGRESQL_SECTION: POSTGRESQL_OPTIONS}
PROVIDER_SECTIONS = (S3_SECTION, AZURE_SECTION, GCS_SECTION)
# Option values that `objfs config show` masks and settings keep out of their repr.
SECRET_OPTIONS = frozenset({"AccessKey", "SecretKey", "Password", "ConnectionString",
                            "ConnectionUri"})


def subsections(section: str) -> dict[str, dict[str, Option]]:
    """Options of `section` that are JSON objects of their own, with their options."""
    subs = {ENCRYPTION: ENCRYPTION_OPTIONS}
    if section == OBJFS_SECTION:
        subs.update(RestApi=REST_API_OPTIONS, Orthanc=ORTHANC_OPTIONS)
    return subs


def _known_paths() -> frozenset[tuple[str, ...]]:
    paths: set[tuple[str, ...]] = set()
    for section, options in SECTIONS.items():
        paths.add((section,))
        for name in [*options, *(S3_PLUGIN_ONLY if section == S3_SECTION else ())]:
            paths.add((section, name))
        for sub_name, sub_options in subsections(section).items():
            paths.update((section, sub_name, sub) for sub in sub_options)
    return frozenset(paths)


KNOWN_PATHS = _known_paths()


# --- help: `objfs config options` and the README's tables --------------------------------------

# (title, options) of each table; the provider tables leave out what COMMON_OPTIONS says once.
def tables() -> list[tuple[str, dict[str, Option]]]:
    def own(options: dict[str, Option]) -> dict[str, Option]:
        return {k: v for k, v in options.items() if k not in COMMON_OPTIONS}

    return [
        ("Every storage section (`AwsS3Storage`, `AzureBlobStorage`, `GoogleCloudStorage`, "
         "or `Objfs` for the local bucket)", COMMON_OPTIONS),
        (S3_SECTION, own(S3_OPTIONS)),
        (AZURE_SECTION, own(AZURE_OPTIONS)),
        (GCS_SECTION, own(GCS_OPTIONS)),
        (OBJFS_SECTION, own(OBJFS_OPTIONS)),
        (f"{ENCRYPTION} (inside the storage section)", ENCRYPTION_OPTIONS),
        (f"{OBJFS_SECTION}.RestApi", REST_API_OPTIONS),
        (f"{OBJFS_SECTION}.Orthanc", ORTHANC_OPTIONS),
        (f"{POSTGRESQL_SECTION} (Orthanc's PostgreSQL plugin section, read with "
         "`Objfs.SharedBucket`; its other options are the plugin's)", POSTGRESQL_OPTIONS),
    ]


def markdown_table(options: dict[str, Option]) -> str:
    """One README table: option, type, default, meaning."""
    lines = ["| option | type | default | meaning |", "|---|---|---|---|"]
    for name, option in options.items():
        lines.append(f"| `{name}` | {option.type_name()} | {option.default_text()} | "
                     f"{option.help} |")
    return "\n".join(lines)


def markdown_tables() -> str:
    """Every table as the README holds it: a ``#### title`` line, then the table."""
    return "\n\n".join(f"#### {title}\n{markdown_table(options)}" for title, options in tables())


def text_help() -> str:
    """Every option with its type, default and help, for ``objfs config options``."""
    out: list[str] = []
    for title, options in tables():
        out.append(title.replace("`", ""))
        for name, option in options.items():
            out.append(f"  {name}  ({option.type_name()}, default: "
                       f"{option.default_text().replace('`', '')})")
            out.append(f"      {option.help.replace('`', '')}")
        out.append("")
    if S3_PLUGIN_ONLY:
        out.append("Accepted in AwsS3Storage and ignored (the official plugin's own): "
                   + ", ".join(S3_PLUGIN_ONLY))
    return "\n".join(out)
