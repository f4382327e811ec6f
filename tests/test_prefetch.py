"""Series prefetch (issue 15) with Debian's Orthanc: a viewer's first cold read of a series
makes objfs fetch the rest of the series ahead, so the next reads need no request."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from objfs.sidecar.prefetch import PARALLEL
from objfs.store.state import DISK_FULL_TRIES
from tests.conftest import fill
from tests.support.daemon import Objfs
from tests.support.dicom import make_dicom
from tests.support.emulators import MotoServer
from tests.support.faultproxy import FaultProxy
from tests.support.metrics import scrape, total
from tests.support.orthanc import Orthanc
from tests.support.procs import free_port, wait_until

pytestmark = pytest.mark.orthanc
SERIES = 24


def cached_entries(daemon: Objfs) -> int:
    return daemon.journal_stats().cached_entries


def gets(daemon: Objfs) -> float:
    return total(scrape(daemon), "objfs_backend_request_duration_seconds_count",
                 operation="get")


def run(tmp_path: Path, moto: MotoServer, bucket: str, evicted: bool = False,
        route: Callable[[str], str] = lambda url: url, release: str = "bookworm",
        **objfs: Any) -> tuple[Objfs, Orthanc, list[str], dict[str, bytes]]:
    """A series of SERIES instances (and another series) ingested into `release`'s Orthanc,
    uploaded, then objfs restarted on an empty cache, or with only its copies gone
    (`evicted`: the journal stays, as after evictions). objfs reaches Orthanc at
    `route(Orthanc's URL)`."""
    orthanc = Orthanc(tmp_path, tmp_path / "objfs-mnt", release=release)
    config = {"AwsS3Storage": moto.s3_section(bucket),
              "Objfs": {"CacheDirectory": str(tmp_path / "cache"), "CacheSize": 256,
                        "Orthanc": {"Url": route(orthanc.url)}, **objfs}}
    daemon = Objfs(tmp_path, config).start()
    orthanc.start()
    sent = {}
    for i in range(SERIES):
        data = make_dicom(i, rows=128, cols=128, patient="PREFETCH", series=1)
        sent[orthanc.upload(data)] = data
    other = orthanc.upload(make_dicom(99, rows=128, cols=128, patient="PREFETCH", series=2))
    daemon.wait_uploaded()
    orthanc.stop()
    assert daemon.stop() == 0
    shutil.rmtree(tmp_path / "cache" / "data" if evicted else tmp_path / "cache")
    daemon.start()
    orthanc.start()
    series = orthanc.json("GET", f"/instances/{next(iter(sent))}/series")["ID"]
    # Viewing order (Orthanc 1.12 lists a series' instances in no particular order).
    order = [i["ID"] for i in sorted(orthanc.json("GET", f"/series/{series}/instances"),
                                     key=lambda i: int(i["IndexInSeries"]))]
    assert other not in order
    return daemon, orthanc, order, sent


def first_read_prefetches_the_series(daemon: Objfs, orthanc: Orthanc, order: list[str],
                                     sent: dict[str, bytes]) -> None:
    """From nothing cached, the first read of the series brings all of it (and nothing
    else) into the cache; the other reads are served from those copies with no GET."""
    assert cached_entries(daemon) == 0
    assert orthanc.request("GET", f"/instances/{order[0]}/file") == sent[order[0]]
    wait_until(lambda: cached_entries(daemon) == SERIES, 30, "the series prefetched")
    time.sleep(0.5)
    assert cached_entries(daemon) == SERIES  # not the other series
    before = gets(daemon)
    for instance in order[1:]:
        assert orthanc.request("GET", f"/instances/{instance}/file") == sent[instance]
    assert gets(daemon) == before  # every read was served from the prefetched copies


def test_a_cold_read_fetches_the_rest_of_its_series_ahead(
        tmp_path: Path, moto: MotoServer, bucket: str) -> None:
    daemon, orthanc, order, sent = run(tmp_path, moto, bucket)
    try:
        first_read_prefetches_the_series(daemon, orthanc, order, sent)
        assert "fetched ahead" in daemon.text()
    finally:
        orthanc.stop()
        daemon.stop()


@pytest.mark.parametrize("release", ["bookworm", "trixie"])
def test_prefetch_off_and_the_limit(tmp_path: Path, moto: MotoServer, bucket: str,
                                    release: str) -> None:
    """The limit counts the same whether Orthanc names the series' attachments in one find
    answer (trixie's 1.12) or in its listing of the series (bookworm's 1.10)."""
    daemon, orthanc, order, _ = run(tmp_path / "off", moto, bucket, release=release,
                                    SeriesPrefetch=False)
    try:
        orthanc.request("GET", f"/instances/{order[0]}/file")
        time.sleep(2)
        assert cached_entries(daemon) == 1
    finally:
        orthanc.stop()
        daemon.stop()
    daemon, orthanc, order, _ = run(tmp_path / "limit", moto, moto.new_bucket(f"{bucket}-l"),
                                    release=release, SeriesPrefetchLimit=5)
    try:
        orthanc.request("GET", f"/instances/{order[0]}/file")
        wait_until(lambda: cached_entries(daemon) >= 5, 30, "five prefetched")
        time.sleep(1)
        assert cached_entries(daemon) == 5  # the first five in viewing order, itself included
    finally:
        orthanc.stop()
        daemon.stop()


def test_an_evicted_series_is_prefetched_from_the_journal_without_orthanc(
        tmp_path: Path, moto: MotoServer, bucket: str) -> None:
    """Uploads noted each instance's series: the first cold read starts the prefetch at once
    from the journal, asking nothing of Orthanc (here objfs cannot even reach it)."""
    dead = f"http://127.0.0.1:{free_port()}"
    daemon, orthanc, order, sent = run(tmp_path, moto, bucket, evicted=True,
                                       route=lambda _: dead)
    try:
        first_read_prefetches_the_series(daemon, orthanc, order, sent)
        assert f"{SERIES - 1} of its {SERIES - 1} other known instances fetched ahead" \
            in daemon.text()
    finally:
        orthanc.stop()
        daemon.stop()


def test_a_series_read_in_a_full_cache_keeps_the_other_copies(
        tmp_path: Path, moto: MotoServer, bucket: str) -> None:
    """A site's cache is full of other studies' copies: a cold series read and its prefetch
    take the room of as many of them as the series needs, not more (an earlier rule kept
    prefetched copies within half the cache, and the series' prefetch emptied it)."""
    orthanc = Orthanc(tmp_path, tmp_path / "objfs-mnt")
    cache = tmp_path / "cache"
    config = {"AwsS3Storage": moto.s3_section(bucket),
              "Objfs": {"CacheDirectory": str(cache), "CacheSize": 16,
                        "Orthanc": {"Url": orthanc.url}}}
    daemon = Objfs(tmp_path, config).start()
    orthanc.start()
    try:
        # 10 + 30 instances of 0.5 MiB: the 30 others fill the 16 MiB, the series is evicted.
        series = [orthanc.upload(make_dicom(i, rows=512, cols=512, patient="VIEWED", series=1))
                  for i in range(10)]
        others = [orthanc.upload(make_dicom(100 + i, rows=512, cols=512, patient="OTHER",
                                            series=2)) for i in range(30)]

        copy = {i: cache / "data" / orthanc.json(
            "GET", f"/instances/{i}/attachments/dicom/info")["Uuid"] for i in series + others}
        daemon.wait_uploaded()
        orthanc.stop()
        assert daemon.stop() == 0
        for instance in series:
            copy[instance].unlink(missing_ok=True)
        kept_before = sum(copy[i].exists() for i in others)
        assert kept_before >= 28
        daemon.start()
        orthanc.start()
        for instance in series:
            orthanc.request("GET", f"/instances/{instance}/file")
        wait_until(lambda: cached_entries(daemon) >= kept_before, 30, "the series read")
        time.sleep(2)  # prefetches still running end
        assert all(copy[i].exists() for i in series[-3:])
        kept = sum(copy[i].exists() for i in others)
        assert kept >= kept_before - 12, f"{kept} of {kept_before} other copies left"
    finally:
        orthanc.stop()
        daemon.stop()


@pytest.mark.parametrize("release", ["bookworm", "trixie", "sid"])
def test_what_the_prefetch_asks_of_orthanc(tmp_path: Path, moto: MotoServer, bucket: str,
                                           release: str) -> None:
    """Orthanc 1.12.5 and later (Debian 13's 1.12, sid's 1.13) name every attachment of the
    series in one `/tools/find` answer. Orthanc 1.10 (Debian 12) ignores `ResponseContent`
    there, so objfs looks the series up and lists it (the listing names each instance's
    DICOM attachment: no request per instance), and remembers not to try the find again.
    Counted by a proxy between objfs and Orthanc."""
    proxies: list[FaultProxy] = []

    def through_proxy(url: str) -> str:
        proxies.append(FaultProxy(url))
        return proxies[0].endpoint

    daemon, orthanc, order, sent = run(tmp_path, moto, bucket, route=through_proxy,
                                       release=release)
    proxy = proxies[0]
    try:
        proxy.requests.clear()
        first_read_prefetches_the_series(daemon, orthanc, order, sent)
        asked = list(proxy.requests)
        assert asked.count(("POST", "/tools/find")) == 1, asked
        if release == "bookworm":
            assert [method for method, _ in asked] == ["POST", "POST", "GET"], asked
            assert asked[1] == ("POST", "/tools/lookup"), asked
            assert asked[2][1].startswith("/series/") and asked[2][1].endswith("/instances")
            assert "does not name attachments in /tools/find answers" in daemon.text()
        else:
            assert asked == [("POST", "/tools/find")]
        # The other series (one instance): an old Orthanc is not asked the find again.
        other = [i for i in orthanc.json("GET", "/instances") if i not in sent]
        proxy.requests.clear()
        orthanc.request("GET", f"/instances/{other[0]}/file")
        wait_until(lambda: cached_entries(daemon) == SERIES + 1, 30, "the other series read")
        wait_until(lambda: daemon.text().count("fetched ahead") == 2, 30,
                   "the second prefetch ended")
        finds = proxy.requests.count(("POST", "/tools/find"))
        assert finds == (0 if release == "bookworm" else 1), proxy.requests
    finally:
        orthanc.stop()
        daemon.stop()
        proxy.stop()


def test_a_full_cache_disk_pauses_the_prefetch(tmp_path: Path, small_disk: Path,
                                               moto: MotoServer, bucket: str) -> None:
    """Something else fills the cache directory's disk (the budget still has room): the
    series prefetch stops at its first refused copy instead of fetching the rest of the
    series only to throw it away, and Orthanc's own reads go on."""
    daemon, orthanc, order, sent = run(tmp_path, moto, bucket, evicted=True)
    try:
        filler = small_disk / "filler"
        fill(filler)
        # Room for the first read's copy (33 KB) and a few more, not for the series.
        os.truncate(filler, filler.stat().st_size - 160 * 1024)
        before = gets(daemon)
        assert orthanc.request("GET", f"/instances/{order[0]}/file") == sent[order[0]]
        wait_until(lambda: "series prefetch paused for 10s: the disk of the cache directory"
                   in daemon.text(), 30, "the prefetch paused")
        time.sleep(1)  # the prefetch's last downloads end
        fetched = gets(daemon) - before
        # The first read (tried again after each eviction while the prefetch's downloads under
        # way took the room), the copies that fitted, and at most PARALLEL refused at once.
        assert fetched <= DISK_FULL_TRIES + 4 + PARALLEL < SERIES, fetched
        assert daemon.text().count("series prefetch paused") == 1
        filler.unlink()
        for instance in order[1:]:
            assert orthanc.request("GET", f"/instances/{instance}/file") == sent[instance]
        assert " ERROR " not in daemon.text()
    finally:
        orthanc.stop()
        daemon.stop()
