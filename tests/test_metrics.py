"""GET /metrics after a real Orthanc ingest through objfs, and the logging set-up."""

from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from objfs import logs
from tests.support.daemon import Objfs
from tests.support.emulators import MotoServer
from tests.support.metrics import scrape, total
from tests.support.orthanc import Orthanc
from tests.support.procs import wait_until
from tests.test_hybrid import at, check_reads, ingest, uuid_for, write


@pytest.mark.orthanc
def test_metrics_after_an_orthanc_ingest(tmp_path: Path, moto: MotoServer, bucket: str,
                                         objfs_factory: Callable[..., Objfs]) -> None:
    config = {"AwsS3Storage": moto.s3_section(bucket),
              "Objfs": {"CacheDirectory": str(tmp_path / "cache"), "CacheSize": 256}}
    daemon = objfs_factory(config).start()
    before = scrape(daemon)
    assert total(before, "objfs_uploads_total") == 0
    orthanc = Orthanc(tmp_path, daemon.mountpoint).start()
    try:
        sent = ingest(orthanc, 30, studies=3)
        daemon.wait_uploaded()
        after = scrape(daemon)
        # Orthanc writes one DICOM attachment per instance (and may add its own JSON ones).
        uploads = total(after, "objfs_uploads_total")
        assert uploads >= 30
        stored = sum(len(d) for d in sent.values())
        assert total(after, "objfs_uploaded_bytes_total") >= stored
        assert total(after, "objfs_backend_request_duration_seconds_count", operation="put",
                     outcome="ok") == uploads
        assert total(after, "objfs_backend_request_duration_seconds_bucket", operation="put",
                     le="+Inf") == uploads
        assert total(after, "objfs_uploads_queued") == 0
        assert total(after, "objfs_uploads_in_progress") == 0
        assert total(after, "objfs_oldest_pending_upload_age_seconds") == 0
        assert total(after, "objfs_fuse_operations_total", operation="create", errno="OK") >= 30
        assert total(after, "objfs_fuse_operations_total", operation="write", errno="OK") >= 30
        assert total(after, "objfs_cache_bytes") > 0
        assert total(after, "objfs_cache_capacity_bytes") == 256 * 1024 * 1024
        assert total(after, "objfs_journal_bytes") > 0
        assert total(after, "objfs_upload_failures_total") == 0

        # Reads that miss the cache download; a lookup of a missing name counts its errno.
        cache_data = tmp_path / "cache" / "data"
        for copy in cache_data.iterdir():
            copy.unlink()  # clean copies: the next reads fetch from the bucket
        check_reads(orthanc, sent)
        missing = daemon.mountpoint / "00" / "00" / uuid_for(99999)
        assert not missing.exists()
        again = scrape(daemon)
        assert total(again, "objfs_downloaded_bytes_total") >= stored
        assert total(again, "objfs_fuse_operations_total", operation="lookup",
                     errno="ENOENT") >= 1
    finally:
        orthanc.stop()


def test_failed_uploads_are_counted_by_error_class(tmp_path: Path, moto: MotoServer,
                                                   bucket: str,
                                                   objfs_factory: Callable[..., Objfs]) -> None:
    config = {"AwsS3Storage": moto.s3_section(bucket, ConnectTimeout=1, RequestTimeout=1),
              "Objfs": {"CacheDirectory": str(tmp_path / "cache"), "CacheSize": 256}}
    daemon = objfs_factory(config).start()
    daemon.wait_inventory()
    assert moto.process is not None
    os.kill(moto.process.pid, signal.SIGSTOP)
    try:
        write(at(daemon.mountpoint, uuid_for(7)), b"x" * 1000)

        def failing() -> bool:
            samples = scrape(daemon)
            return (total(samples, "objfs_upload_failures_total", error="Unavailable") >= 1
                    and total(samples, "objfs_uploads_failing") == 1)

        wait_until(failing, 60, "a failed upload in the metrics", poll=0.5)
        samples = scrape(daemon)
        assert total(samples, "objfs_uploads_queued") == 1
        assert total(samples, "objfs_oldest_pending_upload_age_seconds") > 0
        assert total(samples, "objfs_backend_request_duration_seconds_count", operation="put",
                     outcome="Unavailable") >= 1
    finally:
        os.kill(moto.process.pid, signal.SIGCONT)
    daemon.wait_uploaded()
    assert total(scrape(daemon), "objfs_uploads_total") == 1


# --- logging -----------------------------------------------------------------------------------


def test_journald_prefixes_only_when_journal_stream_is_our_stderr(tmp_path: Path) -> None:
    target = tmp_path / "stream"
    with open(target, "w") as stream:
        st = os.fstat(stream.fileno())
        assert logs.under_journald(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not logs.under_journald(stream, {"JOURNAL_STREAM": f"{st.st_dev}:1"})
        assert not logs.under_journald(stream, {"JOURNAL_STREAM": "junk"})
        assert not logs.under_journald(stream, {})
    record = logging.LogRecord("objfs.store", logging.WARNING, __file__, 1, "slow %s", ("x",),
                               None)
    assert logs.JournalFormatter("%(name)s: %(message)s").format(record) == \
        "<4>objfs.store: slow x"


def test_cli_logs_with_priorities_under_systemd(tmp_path: Path) -> None:
    """A command started with JOURNAL_STREAM naming its stderr logs `<N>` lines."""
    log = tmp_path / "stderr"
    code = ("import os, sys\n"
            "st = os.fstat(2)\n"
            "os.environ['JOURNAL_STREAM'] = f'{st.st_dev}:{st.st_ino}'\n"
            "from objfs import logs\n"
            "import logging\n"
            "logs.setup('DEBUG')\n"
            "logging.getLogger('objfs.x').error('bad %d', 1)\n"
            "logging.getLogger('objfs.x').debug('detail')\n")
    with open(log, "w") as stderr:
        subprocess.run([sys.executable, "-c", code], stderr=stderr, check=True, timeout=60)
    assert log.read_text().splitlines() == ["<3>objfs.x: bad 1", "<7>objfs.x: detail"]
    with open(log, "w") as stderr:
        subprocess.run([sys.executable, "-c", code.replace("os.environ", "dict()")],
                       stderr=stderr, check=True, timeout=60)
    assert " ERROR objfs.x: bad 1" in log.read_text()
    assert not log.read_text().startswith("<")


def test_repeated_errors_are_rate_limited() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    limiter = logs.RepeatFilter(window=0.3)
    handler.addFilter(limiter)
    logger = logging.getLogger("objfs.test.repeat")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        for _ in range(50):
            logger.error("bucket unreachable: %s", "timeout")
        logger.error("another problem")
        logger.info("progress")
        logger.info("progress")
        time.sleep(0.35)
        logger.error("bucket unreachable: %s", "timeout")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines == ["bucket unreachable: timeout", "another problem", "progress", "progress",
                     "bucket unreachable: timeout (repeated 49 more times within 0.3s)"]
