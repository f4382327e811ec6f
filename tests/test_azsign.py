"""objfs.azsign: the Shared Key signature of a Blob request is the one azure-storage-blob's own
policy computes for the same request."""

from __future__ import annotations

import datetime

import pytest
from azure.core.pipeline import PipelineContext, PipelineRequest
from azure.core.pipeline.transport import HttpRequest
from azure.storage.blob._shared.authentication import SharedKeyCredentialPolicy

from objfs import azsign
from tests.support.emulators import AZ_ACCOUNT, AZ_KEY

NOW = datetime.datetime(2026, 12, 3, 20, 15, 7, tzinfo=datetime.UTC)


def sdk_authorization(url: str, headers: dict[str, str]) -> str:
    request = HttpRequest("GET", url, headers=dict(headers))
    SharedKeyCredentialPolicy(AZ_ACCOUNT, AZ_KEY).on_request(
        PipelineRequest(request, PipelineContext(None)))
    return str(request.headers["Authorization"])


def test_the_date_is_rfc_1123_in_gmt() -> None:
    assert azsign.http_date(NOW) == "Thu, 03 Dec 2026 20:15:07 GMT"
    later = NOW.astimezone(datetime.timezone(datetime.timedelta(hours=5)))
    assert azsign.http_date(later) == "Thu, 03 Dec 2026 20:15:07 GMT"


@pytest.mark.parametrize(("path", "query", "extra"), [
    ("/devstoreaccount1/c/ab/cd/plain", {}, {}),
    ("/devstoreaccount1/c/a%20b%2Bc/%C3%BC~x", {}, {"x-ms-range": "bytes=0-9"}),
    ("/c/name", {"comp": "metadata", "snapshot": "2024-01-01T00%3A00%3A00Z"},
     {"x-ms-range": "bytes=100-"}),
], ids=["plain", "quoted name and range", "query"])
def test_signature_matches_the_sdks(path: str, query: dict[str, str],
                                    extra: dict[str, str]) -> None:
    headers = {"x-ms-date": azsign.http_date(NOW), "x-ms-version": "2025-01-05", **extra}
    url = f"http://127.0.0.1:10000{path}" + (
        "?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else "")
    mine = azsign.authorization("GET", path, headers, AZ_ACCOUNT, AZ_KEY, query)
    assert mine == sdk_authorization(url, headers)
    # Every signed part counts.
    assert azsign.authorization("GET", path + "x", headers, AZ_ACCOUNT, AZ_KEY, query) != mine
    assert azsign.authorization("HEAD", path, headers, AZ_ACCOUNT, AZ_KEY, query) != mine
    other = {**headers, "x-ms-version": "2021-08-06"}
    assert azsign.authorization("GET", path, other, AZ_ACCOUNT, AZ_KEY, query) != mine


def test_a_key_not_in_base64_is_refused() -> None:
    with pytest.raises(ValueError):
        azsign.authorization("GET", "/a/b", {}, AZ_ACCOUNT, "not base64!")
