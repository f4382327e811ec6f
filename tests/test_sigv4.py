"""objfs.sigv4 signs exactly as botocore's own S3 signer does (a pure module, no server)."""

from __future__ import annotations

import datetime

import botocore.auth
import botocore.awsrequest
import botocore.credentials
import pytest

from objfs import sigv4

NOW = datetime.datetime(2026, 12, 2, 16, 5, 9, tzinfo=datetime.UTC)


def botocore_headers(method: str, url: str, headers: dict[str, str],
                     credentials: sigv4.Credentials, region: str,
                     monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setattr(botocore.auth, "get_current_datetime",
                        lambda remove_tzinfo=True: NOW.replace(tzinfo=None))
    request = botocore.awsrequest.AWSRequest(method=method, url=url, headers=dict(headers))
    signer = botocore.auth.S3SigV4Auth(
        botocore.credentials.Credentials(credentials.access_key, credentials.secret_key,
                                         credentials.token), "s3", region)
    signer.add_auth(request)
    return {k.lower(): v for k, v in request.headers.items()}


@pytest.mark.parametrize(("host", "key", "headers", "token", "region"), [
    ("127.0.0.1:9000", "/bucket/ab/cd/3f0c-uuid.dcm", {}, None, "us-east-1"),
    ("bucket.s3.eu-west-1.amazonaws.com", "/ab/x y+z%é~.enc", {"range": "bytes=10-99"},
     None, "eu-west-1"),
    ("s3.ap-south-1.amazonaws.com", "/b/k", {"x-amz-checksum-mode": "ENABLED"},
     "FwoGZXIvYXdzE//session+token/=", "ap-south-1"),
])
def test_the_signature_is_botocores(host: str, key: str, headers: dict[str, str],
                                    token: str | None, region: str,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    credentials = sigv4.Credentials("AKIAEXAMPLE0000000", "wJalrXUtnFEMI/K7MDENG+bPxRfiCY",
                                    token)
    path = sigv4.uri_path(key)
    ours = sigv4.sign("GET", host, path, headers, credentials, region, NOW)
    theirs = botocore_headers("GET", f"https://{host}{path}",
                              {"X-Amz-Content-SHA256": sigv4.EMPTY_SHA256, **headers},
                              credentials, region, monkeypatch)
    assert ours["authorization"] == theirs["authorization"]
    assert ours["x-amz-date"] == theirs["x-amz-date"] == "20261202T160509Z"
    assert ours.get("x-amz-security-token") == theirs.get("x-amz-security-token") == token


def test_signing_keys_are_kept_per_day_region_and_secret() -> None:
    keys = sigv4.SigningKeys()
    first = keys.key("secret", "20261202", "us-east-1", "s3")
    assert keys.key("secret", "20261202", "us-east-1", "s3") is first
    assert keys.key("secret", "20261203", "us-east-1", "s3") != first
    assert keys.key("other", "20261202", "us-east-1", "s3") != first
    credentials = sigv4.Credentials("AK", "secret")
    with_memo = sigv4.sign("GET", "h", "/b/k", {}, credentials, "us-east-1", NOW, keys=keys)
    assert with_memo == sigv4.sign("GET", "h", "/b/k", {}, credentials, "us-east-1", NOW)


def test_paths_are_encoded_once() -> None:
    assert sigv4.uri_path("/b/a b/c%2F/é") == "/b/a%20b/c%252F/%C3%A9"
    assert sigv4.uri_path("/b/ab/cd/x-y_z.~") == "/b/ab/cd/x-y_z.~"
