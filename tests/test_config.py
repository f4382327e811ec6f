"""Configuration sources, precedence, orthancteam env naming and every validation error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from objfs.config import (
    KNOWN_PATHS,
    env_name,
    env_path,
    env_word,
    load_settings,
    load_tree,
    masked,
    settings_from_tree,
)
from objfs.errors import ConfigError

S3 = {"BucketName": "b", "Region": "eu-west-1"}


def write(path: Path, tree: dict[str, Any]) -> Path:
    path.write_text(json.dumps(tree))
    return path


def test_defaults_are_the_embedded_local_bucket() -> None:
    s = settings_from_tree({})
    assert s.provider == "local"
    assert str(s.local_bucket) == "/var/lib/objfs/bucket"
    assert str(s.cache_directory) == "/var/cache/objfs"
    assert s.write_mode == "write-back"
    assert (s.layout.structure, s.layout.root_path) == ("flat", "")
    assert s.cache_size == 10240 * 1024 * 1024


def test_s3_section_verbatim() -> None:
    s = settings_from_tree({"AwsS3Storage": {
        **S3, "AccessKey": "AK", "SecretKey": "SK", "Endpoint": "http://127.0.0.1:9000",
        "VirtualAddressing": False, "ConnectTimeout": 3, "RequestTimeout": 7, "MaxRetries": 2,
        "RootPath": "orthanc", "StorageStructure": "legacy", "StorageClass": "STANDARD_IA",
        "Tags": {"site": "a"}, "ServerSideEncryption": "aws:kms", "SseKmsKeyId": "k",
        "ObjectAcl": "private", "ChunkSize": 16, "MaxConnections": 4,
        "EnableLegacyUnknownFiles": True, "UseTransferManager": True}})
    assert s.provider == "s3" and s.s3 is not None
    assert (s.s3.bucket, s.s3.region, s.s3.access_key, s.s3.secret_key) == ("b", "eu-west-1",
                                                                             "AK", "SK")
    assert (s.s3.connect_timeout, s.s3.request_timeout, s.s3.max_retries) == (3, 7, 2)
    assert s.s3.chunk_size == 16 * 1024 * 1024 and not s.s3.virtual_addressing
    assert s.layout.structure == "legacy" and s.layout.root_path == "orthanc"
    assert s.legacy_unknown_files and s.s3.tags == {"site": "a"}


def test_connection_timeout_spelling_is_honoured() -> None:
    s = settings_from_tree({"AwsS3Storage": {**S3, "ConnectionTimeout": 4}})
    assert s.s3 is not None and s.s3.connect_timeout == 4
    s = settings_from_tree({"AwsS3Storage": {**S3, "ConnectTimeout": 5, "ConnectionTimeout": 4}})
    assert s.s3 is not None and s.s3.connect_timeout == 5


def test_files_then_directory_merge_later_wins(tmp_path: Path) -> None:
    d = tmp_path / "conf.d"
    d.mkdir()
    write(d / "a.json", {"Objfs": {"CacheSize": 100, "UploadConcurrency": 3}})
    write(d / "b.json", {"Objfs": {"CacheSize": 200}, "Name": "orthanc's own key"})
    (d / "ignored.txt").write_text("not json")
    top = write(tmp_path / "top.json", {"Objfs": {"UploadConcurrency": 5}})
    s = load_settings([d, top], environ={}, secrets_dir=tmp_path / "none")
    assert s.cache_size == 200 * 1024 * 1024 and s.upload_concurrency == 5


def test_environment_then_secrets(tmp_path: Path) -> None:
    """The orthancteam order: files, environment, then secrets (a secret wins)."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "ORTHANC__AWS_S3_STORAGE__SECRET_KEY").write_text("from-secret\n")
    (secrets / "ORTHANC__AWS_S3_STORAGE__ACCESS_KEY").write_text("ak-secret")
    (secrets / "unrelated").write_text("x")
    conf = write(tmp_path / "c.json", {"AwsS3Storage": {**S3, "AccessKey": "f", "SecretKey": "f"}})
    env = {"ORTHANC__AWS_S3_STORAGE__ACCESS_KEY": "ak-env",
           "ORTHANC__AWS_S3_STORAGE__VIRTUAL_ADDRESSING": "false",
           "ORTHANC__AWS_S3_STORAGE__MAX_RETRIES": "7",
           "ORTHANC__OBJFS__CACHE_DIRECTORY": "/srv/cache",
           "ORTHANC__NAME": "orthanc's own variable, ignored"}
    s = load_settings([conf], environ=env, secrets_dir=secrets)
    assert s.s3 is not None
    assert s.s3.secret_key == "from-secret" and s.s3.access_key == "ak-secret"
    assert not s.s3.virtual_addressing and s.s3.max_retries == 7
    assert str(s.cache_directory) == "/srv/cache"


def test_orthanc_json_secret_json_files_and_secret_indirection(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    write(secrets / "storage.json", {"AwsS3Storage": {"Region": "from-secret-json"}})
    (secrets / "s3-secret").write_text("sk-from-file\n")
    conf = tmp_path / "orthanc.json"
    conf.write_text('{\n  // Orthanc files have comments\n  "Name": "a // not a comment",\n'
                    '  /* a block */ "AwsS3Storage": {"BucketName": "from-file", '
                    '"Region": "from-file"}\n}')
    env = {"ORTHANC_JSON": json.dumps({"AwsS3Storage": {"BucketName": "from-orthanc-json",
                                                        "AccessKey": "ak"}}),
           "ORTHANC__AWS_S3_STORAGE__SECRET_KEY_SECRET": "s3-secret"}
    tree = load_tree([conf], environ=env, secrets_dir=secrets)
    assert tree["Name"] == "a // not a comment"
    s = settings_from_tree(tree)
    assert s.s3 is not None
    assert (s.s3.bucket, s.s3.region, s.s3.secret_key) == ("from-orthanc-json",
                                                           "from-secret-json", "sk-from-file")
    shown = masked(tree)
    assert set(shown) == {"AwsS3Storage"}
    assert shown["AwsS3Storage"]["SecretKey"] == shown["AwsS3Storage"]["AccessKey"] == "********"
    assert shown["AwsS3Storage"]["BucketName"] == "from-orthanc-json"


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    env = {"ORTHANC__OBJFS__CACHE_SIZE": "1", "ORTHANC__OBJFS__NOPE": "x",
           "ORTHANC_JSON": "[1]"}
    conf = write(tmp_path / "c.json", {"Objfs": {"WriteMode": "never"},
                                       "AwsS3Storage": {"Region": "r", "ChunkSize": 1}})
    with pytest.raises(ConfigError) as info:
        load_settings([bad, conf], environ=env, secrets_dir=tmp_path / "none")
    found = info.value.problems
    for expected in ("bad.json: invalid JSON", "ORTHANC_JSON: the top level must be",
                     "ORTHANC__OBJFS__NOPE", "Objfs.CacheSize: must be >= 16",
                     "Objfs.WriteMode: must be one of", "AwsS3Storage.ChunkSize: must be >= 5",
                     "AwsS3Storage.BucketName: missing"):
        assert sum(expected in p for p in found) == 1, (expected, found)
    assert len(found) == 7, found


def test_environment_alone_can_configure_s3_and_nested_objects(tmp_path: Path) -> None:
    env = {"ORTHANC__AWS_S3_STORAGE": json.dumps(S3),
           "ORTHANC__AWS_S3_STORAGE__ROOT_PATH": "site-a",
           "ORTHANC__AWS_S3_STORAGE__TAGS": '{"team": "pacs"}'}
    s = load_settings([], environ=env, secrets_dir=tmp_path)
    assert s.s3 is not None and s.s3.bucket == "b" and s.layout.root_path == "site-a"
    assert s.s3.tags == {"team": "pacs"}


@pytest.mark.parametrize(("camel", "env"), [
    ("AwsS3Storage", "AWS_S3_STORAGE"), ("BucketName", "BUCKET_NAME"),
    ("SseKmsKeyId", "SSE_KMS_KEY_ID"), ("EnableLegacyUnknownFiles", "ENABLE_LEGACY_UNKNOWN_FILES"),
    ("StorageEncryption", "STORAGE_ENCRYPTION"), ("MasterKey", "MASTER_KEY"),
    ("MaxConcurrentInputSize", "MAX_CONCURRENT_INPUT_SIZE"), ("RootPath", "ROOT_PATH"),
    ("Objfs", "OBJFS"), ("CacheSize", "CACHE_SIZE"), ("HTTPServer", "HTTP_SERVER"),
])
def test_env_naming(camel: str, env: str) -> None:
    assert env_word(camel) == env


# Option names of the official object-storage plugins (Orthanc Book) and Orthanc's own names
# the orthancteam images treat as exceptions, with the variable those images read.
PLUGIN_OPTION_ENV = [
    (("AwsS3Storage",), "ORTHANC__AWS_S3_STORAGE"),
    (("AwsS3Storage", "BucketName"), "ORTHANC__AWS_S3_STORAGE__BUCKET_NAME"),
    (("AwsS3Storage", "Region"), "ORTHANC__AWS_S3_STORAGE__REGION"),
    (("AwsS3Storage", "AccessKey"), "ORTHANC__AWS_S3_STORAGE__ACCESS_KEY"),
    (("AwsS3Storage", "SecretKey"), "ORTHANC__AWS_S3_STORAGE__SECRET_KEY"),
    (("AwsS3Storage", "Endpoint"), "ORTHANC__AWS_S3_STORAGE__ENDPOINT"),
    (("AwsS3Storage", "VirtualAddressing"), "ORTHANC__AWS_S3_STORAGE__VIRTUAL_ADDRESSING"),
    (("AwsS3Storage", "ConnectTimeout"), "ORTHANC__AWS_S3_STORAGE__CONNECT_TIMEOUT"),
    (("AwsS3Storage", "RequestTimeout"), "ORTHANC__AWS_S3_STORAGE__REQUEST_TIMEOUT"),
    (("AwsS3Storage", "RootPath"), "ORTHANC__AWS_S3_STORAGE__ROOT_PATH"),
    (("AwsS3Storage", "StorageStructure"), "ORTHANC__AWS_S3_STORAGE__STORAGE_STRUCTURE"),
    (("AwsS3Storage", "MigrationFromFileSystemEnabled"),
     "ORTHANC__AWS_S3_STORAGE__MIGRATION_FROM_FILE_SYSTEM_ENABLED"),
    (("AwsS3Storage", "HybridMode"), "ORTHANC__AWS_S3_STORAGE__HYBRID_MODE"),
    (("AwsS3Storage", "EnableLegacyUnknownFiles"),
     "ORTHANC__AWS_S3_STORAGE__ENABLE_LEGACY_UNKNOWN_FILES"),
    (("AwsS3Storage", "UseTransferManager"), "ORTHANC__AWS_S3_STORAGE__USE_TRANSFER_MANAGER"),
    (("AwsS3Storage", "TransferPoolSize"), "ORTHANC__AWS_S3_STORAGE__TRANSFER_POOL_SIZE"),
    (("AwsS3Storage", "TransferBufferSize"), "ORTHANC__AWS_S3_STORAGE__TRANSFER_BUFFER_SIZE"),
    (("AwsS3Storage", "EnableAwsSdkLogs"), "ORTHANC__AWS_S3_STORAGE__ENABLE_AWS_SDK_LOGS"),
    (("AwsS3Storage", "StorageEncryption", "Enable"),
     "ORTHANC__AWS_S3_STORAGE__STORAGE_ENCRYPTION__ENABLE"),
    (("AwsS3Storage", "StorageEncryption", "MasterKey"),
     "ORTHANC__AWS_S3_STORAGE__STORAGE_ENCRYPTION__MASTER_KEY"),
    (("AwsS3Storage", "StorageEncryption", "PreviousMasterKeys"),
     "ORTHANC__AWS_S3_STORAGE__STORAGE_ENCRYPTION__PREVIOUS_MASTER_KEYS"),
    (("AwsS3Storage", "StorageEncryption", "MaxConcurrentInputSize"),
     "ORTHANC__AWS_S3_STORAGE__STORAGE_ENCRYPTION__MAX_CONCURRENT_INPUT_SIZE"),
    (("AzureBlobStorage", "ConnectionString"), "ORTHANC__AZURE_BLOB_STORAGE__CONNECTION_STRING"),
    (("AzureBlobStorage", "ContainerName"), "ORTHANC__AZURE_BLOB_STORAGE__CONTAINER_NAME"),
    (("AzureBlobStorage", "CreateContainerIfNotExists"),
     "ORTHANC__AZURE_BLOB_STORAGE__CREATE_CONTAINER_IF_NOT_EXISTS"),
    (("AzureBlobStorage", "HybridMode"), "ORTHANC__AZURE_BLOB_STORAGE__HYBRID_MODE"),
    (("GoogleCloudStorage", "ServiceAccountFile"),
     "ORTHANC__GOOGLE_CLOUD_STORAGE__SERVICE_ACCOUNT_FILE"),
    (("GoogleCloudStorage", "BucketName"), "ORTHANC__GOOGLE_CLOUD_STORAGE__BUCKET_NAME"),
    (("Objfs", "RestApi", "Password"), "ORTHANC__OBJFS__REST_API__PASSWORD"),
    (("Objfs", "ShutdownDrainTimeout"), "ORTHANC__OBJFS__SHUTDOWN_DRAIN_TIMEOUT"),
    (("PostgreSQL", "EnableIndex"), "ORTHANC__POSTGRESQL__ENABLE_INDEX"),
    (("MySQL", "Host"), "ORTHANC__MYSQL__HOST"),
]


@pytest.mark.parametrize(("path", "env"), PLUGIN_OPTION_ENV)
def test_plugin_option_names_follow_the_orthancteam_rule(path: tuple[str, ...],
                                                          env: str) -> None:
    assert env_name(*path) == env
    assert env_path(env) == path


def test_every_option_objfs_knows_round_trips() -> None:
    assert len(KNOWN_PATHS) > 100
    for path in KNOWN_PATHS:
        assert env_path(env_name(*path)) == path, path


@pytest.mark.parametrize(("tree", "message"), [
    ({"Objfs": {"CacheSise": 1}}, "Objfs.CacheSise: unknown option"),
    ({"Objfs": {"CacheSize": "big"}}, 'Objfs.CacheSize: expected int, got "big"'),
    ({"Objfs": {"CacheSize": True}}, "Objfs.CacheSize: expected int"),
    ({"Objfs": {"CacheSize": 1}}, "Objfs.CacheSize: must be >= 16"),
    ({"Objfs": {"WriteMode": "sometimes"}}, "Objfs.WriteMode: must be one of"),
    ({"Objfs": {"EventLoopNice": 5}}, "Objfs.EventLoopNice: must be between -20 and 0"),
    ({"Objfs": {"EventLoopNice": -21}}, "Objfs.EventLoopNice: must be between -20 and 0"),
    ({"Objfs": {"BackgroundHold": -1}}, "Objfs.BackgroundHold: must be >= 0"),
    ({"Objfs": {"RootPath": "/abs"}}, "Objfs.RootPath: must not start with '/'"),
    ({"Objfs": {"StorageStructure": "tree"}}, "Objfs.StorageStructure: must be one of"),
    ({"Objfs": []}, "Objfs: must be a JSON object"),
    ({"AwsS3Storage": {"Region": "r"}}, "AwsS3Storage.BucketName: missing"),
    ({"AwsS3Storage": {"BucketName": "b"}}, "AwsS3Storage.Region: missing"),
    ({"AwsS3Storage": {**S3, "RootPath": "/x"}}, "AwsS3Storage.RootPath: must not start"),
    ({"AwsS3Storage": {**S3, "StorageStructure": "deep"}}, "AwsS3Storage.StorageStructure"),
    ({"AwsS3Storage": {**S3, "ChunkSize": 1}}, "AwsS3Storage.ChunkSize: must be >= 5"),
    ({"AwsS3Storage": {**S3, "VirtualAddressing": "yes"}}, "AwsS3Storage.VirtualAddressing"),
    ({"AwsS3Storage": {**S3, "ServerSideEncryption": "rot13"}},
     "AwsS3Storage.ServerSideEncryption: must be one of"),
    ({"AwsS3Storage": {**S3, "SseKmsKeyId": "k"}}, "AwsS3Storage.SseKmsKeyId: needs"),
    ({"AwsS3Storage": {**S3, "AccessKey": "a"}}, "AwsS3Storage.AccessKey/SecretKey"),
    ({"AwsS3Storage": {**S3, "Tags": {"a": 1}}}, "AwsS3Storage.Tags: must map strings"),
    ({"AwsS3Storage": S3, "Objfs": {"RootPath": "x"}}, "Objfs.RootPath: with a AwsS3Storage"),
    ({"AwsS3Storage": {**S3, "HybridMode": "WriteToFileSystem"}},
     "Objfs.FileSystemDirectory: missing (required with AwsS3Storage.HybridMode"),
    ({"AwsS3Storage": {**S3, "HybridMode": "Sometimes"}}, "AwsS3Storage.HybridMode: must be"),
    ({"Objfs": {"RestApi": {"Host": "0.0.0.0"}}},
     "Objfs.RestApi.Username/Password: required when Host (0.0.0.0)"),
    ({"Objfs": {"RestApi": {"Host": "orthanc.example", "Username": "u"}}},
     "Objfs.RestApi.Username/Password: give both"),
    ({"Objfs": {"RestApi": {"Port": 70000}}}, "Objfs.RestApi.Port: must be a TCP port"),
    ({"Objfs": {"RestApi": {"Bogus": 1}}}, "Objfs.RestApi.Bogus: unknown option"),
    ({"Objfs": {"RestApi": []}}, "Objfs.RestApi: expected object"),
    ({"Objfs": {"Orthanc": {"Url": "ftp://x"}}}, "Objfs.Orthanc.Url: must start with http"),
    ({"Objfs": {"Orthanc": {"Password": "p"}}}, "Objfs.Orthanc.Username/Password"),
])
def test_validation_errors_name_the_json_path(tree: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_tree(tree)
    assert message in str(info.value)


def test_unknown_env_option_in_objfs_section_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"ORTHANC__OBJFS__NOPE"):
        load_settings([], environ={"ORTHANC__OBJFS__NOPE": "1"}, secrets_dir=tmp_path)


def test_unknown_provider_option_is_only_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    s = settings_from_tree({"AwsS3Storage": {**S3, "SomeFutureOption": 1}})
    assert s.s3 is not None
    assert "AwsS3Storage.SomeFutureOption: unknown option" in caplog.text


def test_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad\.json: invalid JSON"):
        load_settings([bad], environ={}, secrets_dir=tmp_path)
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_settings([tmp_path / "missing.json"], environ={}, secrets_dir=tmp_path)
    arr = write(tmp_path / "arr.json", [])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="top level must be a JSON object"):
        load_settings([arr], environ={}, secrets_dir=tmp_path)


def test_cli_reports_config_errors_with_exit_code_2(tmp_path: Path) -> None:
    conf = write(tmp_path / "c.json", {"Objfs": {"WriteMode": "never"}})
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = subprocess.run([sys.executable, "-m", "objfs", "mount", "--config", str(conf),
                          str(mnt)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("objfs: configuration error: Objfs.WriteMode")
    assert "Traceback" not in out.stderr
    assert str(mnt) not in Path("/proc/self/mountinfo").read_text()


def test_cli_version() -> None:
    out = subprocess.run([sys.executable, "-m", "objfs", "--version"], capture_output=True,
                         text=True, check=True)
    assert out.stdout.startswith("objfs ")


AZ = {"ConnectionString": "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=a2V5;",
      "ContainerName": "orthanc"}
GCS = {"BucketName": "orthanc"}


def test_azure_and_gcs_sections() -> None:
    s = settings_from_tree({"AzureBlobStorage": {**AZ, "AccessTier": "Cool", "ApiVersion":
                                                 "2025-11-05", "RootPath": "r",
                                                 "StorageStructure": "legacy"}})
    assert s.provider == "azure" and s.azure is not None
    assert (s.azure.container, s.azure.access_tier, s.azure.api_version) == (
        "orthanc", "Cool", "2025-11-05")
    assert s.azure.create_container and s.layout.root_path == "r" and s.layout.legacy
    assert s.azure.client.connect_timeout == 10 and s.azure.client.max_retries == 3
    g = settings_from_tree({"GoogleCloudStorage": {**GCS, "Endpoint": "http://127.0.0.1:1",
                                                   "StorageClass": "NEARLINE",
                                                   "RequestTimeout": 7}})
    assert g.provider == "gcs" and g.gcs is not None
    assert (g.gcs.bucket, g.gcs.endpoint, g.gcs.storage_class) == ("orthanc",
                                                                   "http://127.0.0.1:1",
                                                                   "NEARLINE")
    assert g.gcs.client.request_timeout == 7 and g.gcs.service_account_file is None
    url = settings_from_tree({"AzureBlobStorage": {"AccountUrl": "https://a.blob.core",
                                                   "ContainerName": "c"}})
    assert url.azure is not None and url.azure.connection_string is None


@pytest.mark.parametrize(("tree", "message"), [
    ({"AwsS3Storage": S3, "AzureBlobStorage": AZ},
     "AwsS3Storage and AzureBlobStorage: only one object-storage section"),
    ({"AzureBlobStorage": AZ, "GoogleCloudStorage": GCS},
     "AzureBlobStorage and GoogleCloudStorage: only one"),
    ({"AzureBlobStorage": {**AZ, "AccessTier": "Lukewarm"}},
     "AzureBlobStorage.AccessTier: must be one of 'Hot', 'Cool', 'Cold', 'Archive'"),
    ({"AzureBlobStorage": {"ConnectionString": "x"}}, "AzureBlobStorage.ContainerName: missing"),
    ({"AzureBlobStorage": {"ContainerName": "c"}}, "AzureBlobStorage.ConnectionString: missing"),
    ({"AzureBlobStorage": {**AZ, "CreateContainerIfNotExists": "yes"}},
     "AzureBlobStorage.CreateContainerIfNotExists: expected bool"),
    ({"GoogleCloudStorage": {"Endpoint": "x"}}, "GoogleCloudStorage.BucketName: missing"),
    ({"GoogleCloudStorage": {**GCS, "MaxRetries": -1}}, "GoogleCloudStorage.MaxRetries"),
    ({"GoogleCloudStorage": GCS, "Objfs": {"StorageStructure": "legacy"}},
     "Objfs.StorageStructure: with a GoogleCloudStorage section"),
])
def test_provider_section_errors(tree: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_tree(tree)
    assert message in str(info.value)


def test_hybrid_mode_and_its_deprecated_spelling(caplog: pytest.LogCaptureFixture) -> None:
    s = settings_from_tree({"AwsS3Storage": {**S3, "MigrationFromFileSystemEnabled": True},
                            "Objfs": {"FileSystemDirectory": "/srv/orthanc"}})
    assert s.hybrid_mode == "WriteToObjectStorage" and s.fs_directory == Path("/srv/orthanc")
    assert "MigrationFromFileSystemEnabled is deprecated" in caplog.text
    s = settings_from_tree({"AwsS3Storage": {**S3, "MigrationFromFileSystemEnabled": True,
                                             "HybridMode": "WriteToFileSystem"},
                            "Objfs": {"FileSystemDirectory": "/srv/orthanc"}})
    assert s.hybrid_mode == "WriteToFileSystem" and s.encrypt_fs_tier
    s = settings_from_tree({"Objfs": {"HybridMode": "WriteToFileSystem",
                                      "FileSystemDirectory": "/d",
                                      "EncryptFileSystemTier": False}})
    assert s.provider == "local" and s.hybrid_mode == "WriteToFileSystem"
    assert not s.encrypt_fs_tier
    default = settings_from_tree({})
    assert default.hybrid_mode == "Disabled" and default.fs_directory is None


def test_rest_api_and_orthanc_sections(tmp_path: Path) -> None:
    s = settings_from_tree({})
    assert s.rest_api is not None and (s.rest_api.host, s.rest_api.port) == ("127.0.0.1", 8044)
    assert s.orthanc.url == "http://127.0.0.1:8042" and s.orthanc.username is None
    for host in ("::1", "localhost", "127.0.0.2"):
        api = settings_from_tree({"Objfs": {"RestApi": {"Host": host}}}).rest_api
        assert api is not None and api.host == host
    env = {"ORTHANC__OBJFS__REST_API__PORT": "9000",
           "ORTHANC__OBJFS__REST_API__HOST": "10.1.2.3",
           "ORTHANC__OBJFS__REST_API__USERNAME": "admin",
           "ORTHANC__OBJFS__ORTHANC__URL": "http://orthanc:8042/"}
    (tmp_path / "ORTHANC__OBJFS__REST_API__PASSWORD").write_text("from a secret\n")
    s = load_settings([], environ=env, secrets_dir=tmp_path)
    assert s.rest_api is not None
    assert (s.rest_api.host, s.rest_api.port) == ("10.1.2.3", 9000)
    assert (s.rest_api.username, s.rest_api.password) == ("admin", "from a secret")
    assert s.orthanc.url == "http://orthanc:8042"
    off = load_settings([], environ={"ORTHANC__OBJFS__REST_API": '{"Enable": false}'},
                        secrets_dir=tmp_path / "none")
    assert off.rest_api is None


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "objfs", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def test_cli_config_check_and_show(tmp_path: Path) -> None:
    key = tmp_path / "key"
    (tmp_path / "secrets").mkdir()
    bad = write(tmp_path / "bad.json", {
        "Objfs": {"CacheSize": 1, "RestApi": {"Host": "0.0.0.0"}},
        "AwsS3Storage": {"Region": "r", "SecretKey": "s3cr3t", "AccessKey": "AKIA",
                         "StorageEncryption": {"MasterKey": [1, str(key)]}}})
    env = {"PATH": "/usr/bin:/bin", "OBJFS_SECRETS_DIR": str(tmp_path / "secrets")}
    out = run_cli("config", "check", "--config", str(bad), env=env)
    assert out.returncode == 2 and out.stdout == ""
    problems = out.stderr.splitlines()
    assert problems[0] == "objfs: 4 configuration problem(s):"
    assert [p.split(":")[0] for p in problems[1:]] == [
        "  - Objfs.CacheSize", "  - AwsS3Storage.BucketName",
        "  - AwsS3Storage.StorageEncryption.MasterKey", "  - Objfs.RestApi.Username/Password"]
    out = run_cli("config", "show", "--config", str(bad), env=env)
    assert out.returncode == 2  # shown, and the problems listed
    shown = json.loads(out.stdout)
    assert shown["AwsS3Storage"]["SecretKey"] == "********" and "s3cr3t" not in out.stdout
    assert shown["Objfs"]["CacheSize"] == 1
    good = write(tmp_path / "good.json", {"AwsS3Storage": S3})
    out = run_cli("config", "check", "--config", str(good), env=env)
    assert out.returncode == 0
    assert out.stdout.startswith("objfs: configuration OK: s3 bucket, flat layout")


def test_default_configuration_is_etc_orthanc_with_its_comments(tmp_path: Path) -> None:
    """Without --config objfs reads /etc/orthanc/*.json, as the orthancteam images do; Debian's
    own orthanc.json (full of comments) parses."""
    assert "//" in Path("/etc/orthanc/orthanc.json").read_text()
    env = {"PATH": "/usr/bin:/bin", "OBJFS_SECRETS_DIR": str(tmp_path)}
    out = run_cli("config", "check", env=env)
    assert out.returncode == 0, out.stderr
    assert run_cli("config", "show", env=env).stdout.strip() == "{}"


# --- the option schema: one source for validation, help and the README ---------------------


def test_readme_option_tables_are_generated_from_the_schema() -> None:
    from objfs.config.schema import markdown_tables

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    begin = "<!-- BEGIN generated: objfs config options --markdown -->\n"
    start = readme.index(begin) + len(begin)
    block = readme[start:readme.index("\n<!-- END generated -->", start)]
    assert block == markdown_tables(), "README option tables differ from the schema: " \
        "paste the output of `objfs config options --markdown` between the markers"


def test_config_options_lists_every_known_option_with_its_default() -> None:
    from objfs.config.schema import COMMON_OPTIONS, S3_PLUGIN_ONLY, SECTIONS, subsections

    out = subprocess.run([sys.executable, "-m", "objfs", "config", "options"],
                         capture_output=True, text=True, check=True).stdout
    for path in KNOWN_PATHS:
        assert f"  {path[-1]}  (" in out or path[-1] in S3_PLUGIN_ONLY or len(path) == 1, path
    for section, options in SECTIONS.items():
        for name, option in options.items():
            line = next(ln for ln in out.splitlines() if ln.startswith(f"  {name}  ("))
            assert option.type_name() in line, line
            assert option.help, f"{section}.{name} has no help text"
        for sub in subsections(section).values():
            assert all(o.help for o in sub.values())
    assert "  CacheSize  (integer, default: 10240)" in out
    assert "  ReadTimeout  (number, default: 60)" in out
    assert "  Url  (string, default: \"http://127.0.0.1:8042\")" in out
    assert all(name in out for name in COMMON_OPTIONS)


def test_every_default_passes_its_own_check() -> None:
    from objfs.config.schema import SECTIONS, subsections

    for options in [*SECTIONS.values(),
                    *(sub for s in SECTIONS for sub in subsections(s).values())]:
        for name, option in options.items():
            if option.default is not None:
                assert isinstance(option.default, option.types), name
                assert option.check is None or option.check(option.default) is None, name


def test_secrets_stay_out_of_reprs(tmp_path: Path) -> None:
    keyfile = tmp_path / "k.key"
    subprocess.run([sys.executable, "-m", "objfs", "keys", "generate", str(keyfile)],
                   check=True, capture_output=True)
    s = settings_from_tree({
        "AwsS3Storage": {**S3, "AccessKey": "AKIA-VISIBLE-ID", "SecretKey": "s3cr3t-value",
                         "StorageEncryption": {"MasterKey": [1, str(keyfile)]}},
        "Objfs": {"RestApi": {"Username": "u", "Password": "rest-pass-word"},
                  "Orthanc": {"Username": "o", "Password": "orthanc-pass-word"}}})
    text = repr(s)
    for secret in ("AKIA-VISIBLE-ID", "s3cr3t-value", "rest-pass-word", "orthanc-pass-word"):
        assert secret not in text
    assert s.encryption is not None
    assert s.encryption.ring.keys[1].hex() not in text
    azure = settings_from_tree({"AzureBlobStorage": {
        "ConnectionString": "AccountKey=az-secret-key;", "ContainerName": "c"}})
    assert "az-secret-key" not in repr(azure)


def test_closed_sets_are_enums() -> None:
    from objfs.config import HybridMode, Provider, StorageStructure, WriteMode

    s = settings_from_tree({"Objfs": {"WriteMode": "write-through", "HybridMode":
                                      "WriteToFileSystem", "FileSystemDirectory": "/x",
                                      "StorageStructure": "legacy"}})
    assert s.provider is Provider.LOCAL
    assert s.write_mode is WriteMode.WRITE_THROUGH
    assert s.hybrid_mode is HybridMode.WRITE_TO_FILE_SYSTEM
    assert s.layout.structure is StorageStructure.LEGACY
    assert json.dumps(s.hybrid_mode) == '"WriteToFileSystem"'


# --- values the SDKs would refuse (issue 12, finding 9) -------------------------------------


@pytest.mark.parametrize(("section", "option", "value", "message"), [
    ("AwsS3Storage", "Region", "eu west 1", "is not a region name"),
    ("AwsS3Storage", "Region", "-bad-", "is not a region name"),
    ("AwsS3Storage", "Endpoint", "http://exa mple:9000", "is not a URL"),
    ("AwsS3Storage", "Endpoint", "minio:99999", "invalid port"),
    ("AwsS3Storage", "Endpoint", "ftp://minio", "must be http:// or https://"),
    ("GoogleCloudStorage", "Endpoint", "http://", "is not a URL"),
    ("AzureBlobStorage", "AccountUrl", "https://acct .blob", "is not a URL"),
])
def test_values_the_sdks_refuse_are_configuration_errors(section: str, option: str,
                                                         value: str, message: str) -> None:
    base = {"AwsS3Storage": dict(S3), "GoogleCloudStorage": {"BucketName": "b"},
            "AzureBlobStorage": {"ContainerName": "c", "ConnectionString": "x"}}[section]
    with pytest.raises(ConfigError) as exc:
        settings_from_tree({section: {**base, option: value}})
    assert any(p.startswith(f"{section}.{option}: ") and message in p
               for p in exc.value.problems), exc.value.problems


def test_sdk_refusals_at_client_creation_name_the_section(tmp_path: Path) -> None:
    """What only the SDK can judge (here a malformed Azure connection string) is a
    configuration error at `config check` and at mount: exit 2, no traceback."""
    from objfs.backends import check_client, open_backend

    tree = {"AzureBlobStorage": {"ContainerName": "c", "ConnectionString": "not a connection"}}
    settings = settings_from_tree(tree)
    with pytest.raises(ConfigError, match=r"^AzureBlobStorage: the azure client refuses"):
        open_backend(settings)
    assert check_client(settings)[0].startswith("AzureBlobStorage: ")
    path = write(tmp_path / "c.json", tree)
    check = subprocess.run([sys.executable, "-m", "objfs", "config", "check", "--config",
                            str(path)], capture_output=True, text=True)
    assert check.returncode == 2 and "AzureBlobStorage: the azure client" in check.stderr
    assert "Traceback" not in check.stderr
    (tmp_path / "mnt").mkdir()
    mount = subprocess.run([sys.executable, "-m", "objfs", "mount", "--config", str(path),
                            str(tmp_path / "mnt")], capture_output=True, text=True,
                           env={**os.environ, "ORTHANC__OBJFS__CACHE_DIRECTORY":
                                str(tmp_path / "cache")}, timeout=60)
    assert mount.returncode == 2, mount.stderr
    assert "AzureBlobStorage: the azure client" in mount.stderr
    assert "Traceback" not in mount.stderr


# --- SharedBucket (several Orthanc nodes) ---------------------------------------------------


def shared(tmp_path: Path, **objfs: Any) -> dict[str, Any]:
    return {"Objfs": {"SharedBucket": True, "CacheDirectory": str(tmp_path / "cache"),
                      "LocalBucket": str(tmp_path / "bucket"), **objfs}}


def test_shared_bucket_writes_through_and_names_the_node(tmp_path: Path) -> None:
    settings = settings_from_tree(shared(tmp_path, NodeName="node-7"))
    assert settings.shared_bucket and settings.write_mode == "write-through"
    assert settings.node_name == "node-7"
    assert settings_from_tree(shared(tmp_path)).node_name  # the host name by default
    assert not settings_from_tree({"Objfs": {}}).shared_bucket


@pytest.mark.parametrize(("objfs", "problem"), [
    ({"WriteMode": "write-back"}, "Objfs.WriteMode: 'write-back' cannot be used with "
                                  "SharedBucket"),
    ({"HybridMode": "WriteToObjectStorage", "FileSystemDirectory": "/srv/fs"},
     "Objfs.SharedBucket with HybridMode 'WriteToObjectStorage': every node must see the same "
     "file-system tier"),
    ({"NodeName": "a node"}, "Objfs.NodeName: 1 to 48 letters"),
])
def test_shared_bucket_refuses_what_cannot_work(tmp_path: Path, objfs: dict[str, Any],
                                                problem: str) -> None:
    with pytest.raises(ConfigError) as refused:
        settings_from_tree(shared(tmp_path, **objfs))
    assert problem in str(refused.value)


def test_a_shared_file_system_tier_must_be_declared_and_hold_no_cache(tmp_path: Path) -> None:
    fs_dir = tmp_path / "nfs"
    ok = settings_from_tree(shared(tmp_path, HybridMode="WriteToObjectStorage",
                                   FileSystemDirectory=str(fs_dir), SharedFileSystemTier=True))
    assert ok.shared_fs_tier and ok.fs_directory == fs_dir
    with pytest.raises(ConfigError) as refused:
        settings_from_tree(shared(tmp_path, HybridMode="WriteToObjectStorage",
                                  FileSystemDirectory=str(fs_dir), SharedFileSystemTier=True,
                                  CacheDirectory=str(fs_dir / "cache")))
    assert "Objfs.CacheDirectory: must not be inside the shared FileSystemDirectory" \
        in str(refused.value)


def test_orthancs_postgresql_section_is_read_for_the_cluster_lock(tmp_path: Path) -> None:
    section = {"EnableIndex": True, "Host": "db.example", "Port": 5433, "Database": "orthanc",
               "Username": "orthanc", "Password": "it's secret", "Lock": False,
               "IndexConnectionsCount": 5}
    settings = settings_from_tree({**shared(tmp_path), "PostgreSQL": section})
    assert settings.postgresql is not None
    assert settings.postgresql.where == "db.example:5433/orthanc"
    assert "password='it\\'s secret'" in settings.postgresql.conninfo
    assert "secret" not in repr(settings)
    uri = {"EnableIndex": True, "ConnectionUri": "postgresql://u:p@10.0.0.5:6432/idx"}
    pg = settings_from_tree({**shared(tmp_path), "PostgreSQL": uri}).postgresql
    assert pg is not None and pg.where == "10.0.0.5:6432/idx"
    # Debian's /etc/orthanc/postgresql.json ships the section disabled: it is not Orthanc's
    # index then, and objfs falls back to the lease object.
    disabled = settings_from_tree({**shared(tmp_path),
                                   "PostgreSQL": {**section, "EnableIndex": False}})
    assert disabled.postgresql is None
    with pytest.raises(ConfigError) as refused:
        settings_from_tree({**shared(tmp_path), "PostgreSQL": {"EnableIndex": True,
                                                                "ConnectionUri": "mysql://x"}})
    assert "PostgreSQL.ConnectionUri" in str(refused.value)
