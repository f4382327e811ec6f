"""Azure Storage Shared Key authorization: the ``Authorization: SharedKey account:signature``
header of a Blob service request, signed with the storage account's key.

Used by the Azure backend's direct requests (`objfs.backends.azuredirect`); the signature is
the one azure-storage-blob's own policy computes for the same request (a test compares them).
Pure: no I/O, no clock (the caller passes the date).

String to sign (service version 2009-09-19 and later): the method, then eleven standard
headers one per line (Content-Length empty when 0; Date empty, as ``x-ms-date`` is sent),
then each ``x-ms-`` header as ``name:value`` in name order, then ``/account/path`` and each
query parameter as ``name:value`` in name order.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
from base64 import b64decode, b64encode
from collections.abc import Mapping
from urllib.parse import unquote

STANDARD_HEADERS = ("content-encoding", "content-language", "content-length", "content-md5",
                    "content-type", "date", "if-modified-since", "if-match", "if-none-match",
                    "if-unmodified-since", "range")


def http_date(now: datetime.datetime) -> str:
    """`now` (aware) as RFC 1123 in GMT, as ``x-ms-date`` carries it."""
    return now.astimezone(datetime.UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")


def string_to_sign(method: str, path: str, headers: Mapping[str, str], account: str,
                   query: Mapping[str, str] | None = None) -> str:
    """What is signed. `path`: the request's path as sent (percent-encoded); `headers`:
    lower-case names; `query`: the parameters as in the URL (values are percent-decoded for
    signing)."""
    lines = [method.upper()]
    for name in STANDARD_HEADERS:
        value = headers.get(name, "")
        lines.append("" if name == "content-length" and value == "0" else value)
    text = "\n".join(lines) + "\n"
    text += "".join(f"{name}:{headers[name].strip()}\n"
                    for name in sorted(h for h in headers if h.startswith("x-ms-")))
    text += f"/{account}{path}"
    text += "".join(f"\n{name.lower()}:{unquote(value)}"
                    for name, value in sorted((query or {}).items()))
    return text


def authorization(method: str, path: str, headers: Mapping[str, str], account: str,
                  account_key: str, query: Mapping[str, str] | None = None) -> str:
    """The Authorization header's value for a request with these `headers` (lower-case
    names, ``x-ms-date`` and ``x-ms-version`` among them). `account_key`: base64, as the
    portal and connection strings give it. Raises binascii.Error for a key not in base64."""
    digest = hmac.new(b64decode(account_key),
                      string_to_sign(method, path, headers, account, query).encode("utf-8"),
                      hashlib.sha256).digest()
    return f"SharedKey {account}:{b64encode(digest).decode()}"
