"""Test support: processes, emulators, objfs daemons, Orthanc, DICOM, REST. Every server
binds to 127.0.0.1; every process runs in its own session and is stopped by PID."""
