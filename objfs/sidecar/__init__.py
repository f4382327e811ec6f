"""The sidecar REST server: move-storage and its jobs, where an attachment is, status, health.

It runs in the daemon's nursery on its own port (``Objfs.RestApi``) and reaches Orthanc's REST
API (``Objfs.Orthanc``) to resolve patients, studies, series and instances to attachments.
"""
