"""Object-store backends behind one small async interface (`objfs.backends.base.Backend`)."""

from __future__ import annotations

from objfs.backends.base import Backend, ObjectInfo
from objfs.config import Provider, Settings


def open_backend(settings: Settings) -> Backend:
    """The backend the settings name. SDKs are imported here, lazily, never by the fs layer."""
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


__all__ = ["Backend", "ObjectInfo", "open_backend"]
