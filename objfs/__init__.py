"""objfs: a FUSE filesystem that keeps an Orthanc storage area in object storage."""

__version__ = "0.1.0"
