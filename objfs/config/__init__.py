"""Configuration: JSON files, Docker secrets and environment variables -> one typed `Settings`.

- `schema`: every option with its type, default, check and help (the one source for all below);
- `settings`: the typed, validated settings and the enums of every closed set of values;
- `envnames`: orthancteam environment-variable naming;
- `sources`: reading files, secrets and the environment into one JSON tree;
- `build`: validating that tree into `Settings`, every problem reported at once.

Pure apart from reading the files it is pointed at (configuration, secrets, key files).
"""

from objfs.config.build import check, load_settings, settings_from_tree
from objfs.config.envnames import env_name, env_path, env_word, json_word
from objfs.config.schema import KNOWN_PATHS, OBJFS_OPTIONS, SECRET_OPTIONS, SECTIONS, text_help
from objfs.config.settings import (
    DEFAULT_ORTHANC_URL,
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
from objfs.config.sources import DEFAULT_CONFIG_DIR, load_tree, masked, strip_comments
from objfs.layout import StorageStructure

__all__ = [
    "DEFAULT_CONFIG_DIR", "DEFAULT_ORTHANC_URL", "KNOWN_PATHS", "OBJFS_OPTIONS",
    "SECRET_OPTIONS", "SECTIONS", "AzureAccessTier", "AzureSettings", "ClientSettings",
    "Encryption", "GcsSettings", "HybridMode", "OrthancSettings", "PostgresSettings", "Provider",
    "RestApiSettings",
    "S3Settings", "ServerSideEncryption", "Settings", "StorageStructure", "WriteMode", "check",
    "env_name", "env_path", "env_word", "json_word", "load_settings", "load_tree", "masked",
    "settings_from_tree", "strip_comments", "text_help",
]
