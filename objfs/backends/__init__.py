"""Object-store backends behind one small async interface (`objfs.backends.base.Backend`)."""

from __future__ import annotations

from objfs.backends.base import Backend, ObjectInfo
from objfs.config import Provider, Settings
from objfs.errors import ConfigError, ObjfsError

SECTIONS = {Provider.S3: "AwsS3Storage", Provider.AZURE: "AzureBlobStorage",
            Provider.GCS: "GoogleCloudStorage", Provider.LOCAL: "Objfs.LocalBucket"}


def open_backend(settings: Settings) -> Backend:
    """The backend the settings name. SDKs are imported here, lazily, never by the fs layer.

    A value the SDK refuses when its client is made (a malformed connection string, a key file
    it cannot use, a missing optional package) is a `ConfigError` naming the section, never an
    SDK traceback.
    """
    try:
        return _open(settings)
    except ObjfsError:
        raise
    except Exception as exc:
        section = SECTIONS[settings.provider]
        raise ConfigError(f"{section}: the {settings.provider} client refuses this "
                          f"configuration: {type(exc).__name__}: {exc}") from exc


def check_client(settings: Settings) -> list[str]:
    """Problems the cloud SDK finds when its client is made (no request is sent); the local
    bucket is not touched."""
    if settings.provider == Provider.LOCAL:
        return []
    try:
        backend = open_backend(settings)
    except ConfigError as exc:
        return exc.problems
    del backend
    return []


def _open(settings: Settings) -> Backend:
    if settings.provider == Provider.S3:
        from objfs.backends.s3 import S3Backend

        assert settings.s3 is not None
        return S3Backend(settings.s3)
    if settings.provider == Provider.AZURE:
        from objfs.backends.azure import AzureBackend

        assert settings.azure is not None
        return AzureBackend(settings.azure)
    if settings.provider == Provider.GCS:
        from objfs.backends.gcs import GcsBackend

        assert settings.gcs is not None
        return GcsBackend(settings.gcs)
    from objfs.backends.local import LocalBackend

    return LocalBackend(settings.local_bucket)


__all__ = ["Backend", "ObjectInfo", "check_client", "open_backend"]
