"""Backend contract: every backend behaves the same against a real server (or directory)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import time
import uuid
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import boto3
import botocore.utils
import pytest
import trio

from objfs import codec, errors
from objfs.backends import open_backend
from objfs.backends.base import Backend, ObjectInfo, Transform
from objfs.backends.local import LocalBackend
from objfs.backends.s3 import S3Backend, parse_timestamp
from objfs.config import settings_from_tree
from tests.conftest import bucket_name, cloud_server
from tests.support.emulators import AZ_KEY, AzuriteServer, FakeGcsServer, MotoServer
from tests.support.procs import free_port


def s3_backend(moto: MotoServer, bucket: str, **extra: object) -> S3Backend:
    settings = settings_from_tree({"AwsS3Storage": moto.s3_section(bucket, **extra)})
    assert settings.s3 is not None
    return S3Backend(settings.s3)


def cloud_backend(section_name: str, section: dict[str, Any]) -> Backend:
    return open_backend(settings_from_tree({section_name: section}))


# A real cloud joins the suite when its section is in the environment as JSON, e.g.
# OBJFS_TEST_AZURE='{"ConnectionString": "...", "ContainerName": "objfs-test"}'.
REAL = {"s3-real": ("OBJFS_TEST_S3", "AwsS3Storage"),
        "azure-real": ("OBJFS_TEST_AZURE", "AzureBlobStorage"),
        "gcs-real": ("OBJFS_TEST_GCS", "GoogleCloudStorage")}


@pytest.fixture(params=["local", "s3", "azure", "gcs", *REAL])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    kind = request.param
    if kind == "local":
        made: Backend = LocalBackend(tmp_path / "bucket")
    elif kind in REAL:
        variable, section_name = REAL[kind]
        if variable not in os.environ:
            pytest.skip(f"{variable} is not set: no real {section_name} account to test")
        section = json.loads(os.environ[variable])
        section["RootPath"] = f"objfs-contract/{uuid.uuid4()}"
        made = cloud_backend(section_name, section)
        made = PrefixedBackend(made, section["RootPath"] + "/")
    else:
        server = cloud_server(request, kind)
        name = server.new_bucket(bucket_name(request))
        made = cloud_backend(server.section_name, server.section(name, ChunkSize=5))
    yield made
    await made.aclose()


class PrefixedBackend(Backend):
    """A real bucket shared with others: every key of the contract tests under one prefix,
    removed afterwards."""

    def __init__(self, inner: Backend, prefix: str) -> None:
        self.inner, self.prefix = inner, prefix
        self.batch_delete_limit = inner.batch_delete_limit

    async def delete_many(self, keys: list[str]) -> None:
        await self.inner.delete_many([self.prefix + k for k in keys])

    async def put(self, key: str, path: Path) -> None:
        await self.inner.put(self.prefix + key, path)

    async def get(self, key: str, path: Path, offset: int = 0, length: int | None = None,
                  transform: Transform | None = None) -> int:
        return await self.inner.get(self.prefix + key, path, offset, length, transform)

    async def head(self, key: str) -> ObjectInfo:
        info = await self.inner.head(self.prefix + key)
        return ObjectInfo(key, info.size)

    async def delete(self, key: str) -> None:
        await self.inner.delete(self.prefix + key)

    async def list_page(self, prefix: str, token: str | None = None,
                        limit: int = 1000) -> tuple[list[ObjectInfo], str | None]:
        page, token = await self.inner.list_page(self.prefix + prefix, token, limit)
        return [ObjectInfo(i.key[len(self.prefix):], i.size, i.modified) for i in page], token

    async def copy(self, src: str, dst: str) -> None:
        await self.inner.copy(self.prefix + src, self.prefix + dst)

    async def create_exclusive(self, key: str, data: bytes) -> bool:
        return await self.inner.create_exclusive(self.prefix + key, data)

    async def read_versioned(self, key: str) -> tuple[bytes, str]:
        return await self.inner.read_versioned(self.prefix + key)

    async def delete_if(self, key: str, version: str) -> bool:
        return await self.inner.delete_if(self.prefix + key, version)

    async def replace_if(self, key: str, version: str, data: bytes) -> bool:
        return await self.inner.replace_if(self.prefix + key, version, data)

    async def aclose(self) -> None:
        async for info in self.inner.list(self.prefix):
            await self.inner.delete(info.key)
        await self.inner.aclose()


def _file(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("size", [0, 1, 1024 * 1024])
async def test_put_get_roundtrip(backend: Backend, tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    await backend.put("dir/obj.dcm", _file(tmp_path, "src", data))
    out = tmp_path / "out"
    assert await backend.get("dir/obj.dcm", out) == size
    assert out.read_bytes() == data
    assert (await backend.head("dir/obj.dcm")).size == size


async def test_large_object_multipart(backend: Backend, tmp_path: Path) -> None:
    size = 101 * 1024 * 1024 + 7
    src = tmp_path / "big"
    digest = hashlib.sha256()
    with open(src, "wb") as f:
        block = os.urandom(1024 * 1024)
        for i in range(101):
            chunk = bytes([i]) + block[1:]
            f.write(chunk)
            digest.update(chunk)
        f.write(b"1234567")
        digest.update(b"1234567")
    await backend.put("big.dcm", src)
    out = tmp_path / "big-out"
    assert await backend.get("big.dcm", out) == size
    check = hashlib.sha256()
    with open(out, "rb") as f:
        while chunk := f.read(1 << 20):
            check.update(chunk)
    assert check.hexdigest() == digest.hexdigest()


async def test_get_decrypts_as_the_bytes_arrive(backend: Backend, tmp_path: Path) -> None:
    """A download through a Transform (A1 decryption) gets every piece in order, of an
    object larger than the SDKs' chunks; a tampered object fails with Corrupt, unchanged."""
    ring = codec.KeyRing(7, {7: os.urandom(32)})
    plain = _file(tmp_path, "plain", os.urandom(9 * 1024 * 1024 + 5))
    sealed = tmp_path / "sealed"
    stored = codec.encrypt_file(plain, sealed, ring)
    await backend.put("enc", sealed)
    out = tmp_path / "out"
    assert await backend.get("enc", out, transform=codec.StreamDecryptor(ring)) == stored
    assert out.read_bytes() == plain.read_bytes()
    tampered = bytearray(sealed.read_bytes())
    tampered[5 * 1024 * 1024] ^= 1
    await backend.put("bad", _file(tmp_path, "bad", bytes(tampered)))
    with pytest.raises(errors.Corrupt, match="authentication failed"):
        await backend.get("bad", out, transform=codec.StreamDecryptor(ring))
    with pytest.raises(ValueError, match="whole object"):
        await backend.get("enc", out, 0, 10, transform=codec.StreamDecryptor(ring))


async def test_ranged_get_and_clamping(backend: Backend, tmp_path: Path) -> None:
    data = bytes(range(256)) * 4
    await backend.put("r", _file(tmp_path, "src", data))
    out = tmp_path / "o"
    assert await backend.get("r", out, 10, 20) == 20 and out.read_bytes() == data[10:30]
    assert await backend.get("r", out, 1000, 500) == 24 and out.read_bytes() == data[1000:]
    assert await backend.get("r", out, 5000, 10) == 0 and out.read_bytes() == b""
    assert await backend.get("r", out, 100) == len(data) - 100


async def test_missing_object_and_delete(backend: Backend, tmp_path: Path) -> None:
    with pytest.raises(errors.NotFound):
        await backend.get("nope", tmp_path / "o")
    with pytest.raises(errors.NotFound):
        await backend.head("nope")
    await backend.delete("nope")  # deleting a missing object succeeds
    await backend.put("x/y", _file(tmp_path, "src", b"abc"))
    await backend.delete("x/y")
    with pytest.raises(errors.NotFound):
        await backend.head("x/y")


async def test_batch_delete(backend: Backend, tmp_path: Path) -> None:
    """Stores with a batch delete remove present and absent keys in one call; the others say
    they have none (the store then deletes one key at a time)."""
    if backend.batch_delete_limit == 0:
        with pytest.raises(NotImplementedError):
            await backend.delete_many(["k"])
        return
    src = _file(tmp_path, "src", b"abc")
    for key in ("b/1.dcm", "b/2.dcm", "b/3.dcm"):
        await backend.put(key, src)
    await backend.delete_many(["b/1.dcm", "b/2.dcm", "b/absent.dcm"])
    assert [i.key async for i in backend.list("b/")] == ["b/3.dcm"]


async def test_list_prefix_pagination(backend: Backend, tmp_path: Path) -> None:
    src = _file(tmp_path, "src", b"z")
    keys = [f"p/{i:05d}.dcm" for i in range(1105)]
    limiter = trio.CapacityLimiter(16)

    async def put(key: str) -> None:
        async with limiter:
            await backend.put(key, src)

    async with trio.open_nursery() as nursery:
        for key in keys:
            nursery.start_soon(put, key)
        nursery.start_soon(put, "q/other")
        nursery.start_soon(put, "p0-not-under-p-slash")
    listed = [info.key async for info in backend.list("p/")]
    assert listed == keys
    page, token = await backend.list_page("p/", None, 1000)
    assert len(page) == 1000 and token is not None
    rest, token2 = await backend.list_page("p/", token, 1000)
    assert len(rest) == 105 and token2 is None
    assert [i.key async for i in backend.list("p/0000")] == keys[:10]
    assert [i.key async for i in backend.list("p/", limit=3)] == keys[:3]
    assert {i.key async for i in backend.list("")} >= {"q/other", "p0-not-under-p-slash"}


async def test_a_listing_tells_when_each_object_was_written(backend: Backend,
                                                            tmp_path: Path) -> None:
    """`audit`'s grace period trusts `modified`: seconds since the epoch, for every backend."""
    before = time.time()
    await backend.put("t/one", _file(tmp_path, "src", b"t"))
    [info] = [i async for i in backend.list("t/")]
    assert info.modified is not None
    # Server clocks round to the second (S3: ISO 8601 with milliseconds, often .000).
    assert before - 2 <= info.modified <= time.time() + 2


async def test_conditional_create_read_and_delete(backend: Backend) -> None:
    """The cluster lease's primitives: create-if-absent, versioned read, delete-if-version."""
    assert await backend.create_exclusive("lease/a", b"first")
    assert not await backend.create_exclusive("lease/a", b"second")
    data, version = await backend.read_versioned("lease/a")
    assert data == b"first"
    # fake-gcs-server ignores ifGenerationMatch on DELETE (real GCS honours it: the contract
    # case against a real bucket, OBJFS_TEST_GCS, wraps the backend and checks it).
    if backend.name != "gcs":
        assert not await backend.delete_if("lease/a", version + "0")
        assert (await backend.read_versioned("lease/a"))[0] == b"first"
    assert await backend.delete_if("lease/a", version)
    with pytest.raises(errors.NotFound):
        await backend.read_versioned("lease/a")
    assert not await backend.delete_if("lease/a", version)
    assert not await backend.replace_if("lease/a", version, b"gone")
    assert await backend.create_exclusive("lease/a", b"third")
    _, third = await backend.read_versioned("lease/a")
    assert await backend.replace_if("lease/a", third, b"fourth")
    data, _ = await backend.read_versioned("lease/a")
    assert data == b"fourth"
    if backend.name != "gcs":
        assert not await backend.replace_if("lease/a", third, b"late")
    await backend.delete("lease/a")
    assert await backend.create_exclusive("lease/a", b"third")
    _, newer = await backend.read_versioned("lease/a")
    assert newer != version or backend.name == "local"  # local: the inode may be reused
    if backend.name != "gcs":
        assert not await backend.delete_if("lease/a", version) or newer == version
    await backend.delete("lease/a")


async def test_copy(backend: Backend, tmp_path: Path) -> None:
    await backend.put("a", _file(tmp_path, "src", b"payload"))
    await backend.copy("a", "b/c")
    out = tmp_path / "o"
    await backend.get("b/c", out)
    assert out.read_bytes() == b"payload"


@pytest.mark.parametrize("text", [
    "2026-12-02T12:08:00.000Z", "2026-12-02T12:08:00Z", "2026-12-02T12:08:00.123456+02:00",
    "Wed, 02 Dec 2026 12:08:00 GMT", "Wed, 02 Dec 2026 12:08:00 -0000", "2026-12-02T12:08:00",
    "1764676800"])
def test_s3_timestamps_parse_as_botocore_parses_them(text: str) -> None:
    """The fast forms (listings' ISO 8601, headers' RFC 1123) and the rest (naive, epoch
    seconds), which go to botocore's own parser."""
    assert parse_timestamp(text) == botocore.utils.parse_timestamp(text)
    if text != "2026-12-02T12:08:00":
        assert parse_timestamp(text).utcoffset() is not None


def test_s3_an_unreadable_timestamp_is_an_error() -> None:
    with pytest.raises(ValueError, match="Invalid timestamp"):
        parse_timestamp("yesterday-ish")


async def test_s3_missing_bucket(moto: MotoServer, tmp_path: Path) -> None:
    backend = s3_backend(moto, "no-such-bucket-here")
    with pytest.raises(errors.BucketMissing):
        await backend.put("k", _file(tmp_path, "src", b"x"))
    with pytest.raises(errors.BucketMissing):
        await backend.list_page("", None, 1)


def s3_at_port(port: int, request_timeout: float, max_retries: int) -> S3Backend:
    """An S3 backend for a local port with a 1 s connect timeout."""
    settings = settings_from_tree({"AwsS3Storage": {
        "BucketName": "b", "Region": "us-east-1", "Endpoint": f"http://127.0.0.1:{port}",
        "AccessKey": "a", "SecretKey": "s", "VirtualAddressing": False,
        "ConnectTimeout": 1, "RequestTimeout": request_timeout, "MaxRetries": max_retries}})
    assert settings.s3 is not None
    return S3Backend(settings.s3)


async def test_s3_server_down_fails_within_timeout(tmp_path: Path) -> None:
    backend = s3_at_port(free_port(), 2, 1)  # nothing listens there
    start = time.monotonic()
    with pytest.raises(errors.Unavailable):
        await backend.head("k")
    assert time.monotonic() - start < 10


async def test_s3_server_that_hangs_times_out(tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # accepts connections, never answers
    try:
        backend = s3_at_port(listener.getsockname()[1], 1, 0)
        start = time.monotonic()
        with pytest.raises(errors.Unavailable):
            await backend.get("k", tmp_path / "o")
        assert time.monotonic() - start < 10
    finally:
        listener.close()


def test_local_backend_rejects_escaping_keys(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "b")
    for key in ["../x", "/abs", "a/../b", "", ".objfs-tmp/x", "a//b"]:
        with pytest.raises(errors.BackendError):
            backend._path(key)


async def test_local_backend_never_shows_partial_objects(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "b")
    await backend.put("k", _file(tmp_path, "src", b"x" * 100))
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [".objfs-tmp", "k"]
    assert list((tmp_path / "b" / ".objfs-tmp").iterdir()) == []
    assert [i.key async for i in backend.list("")] == ["k"]


async def test_azure_missing_container_and_bad_key(azurite: AzuriteServer, tmp_path: Path) -> None:
    missing = cloud_backend("AzureBlobStorage", azurite.section("no-such-container"))
    with pytest.raises(errors.BucketMissing):
        await missing.put("k", _file(tmp_path, "src", b"x"))
    with pytest.raises(errors.BucketMissing):
        await missing.list_page("", None, 1)
    name = azurite.new_bucket("bad-key-test")
    wrong = AZ_KEY[:-6] + "AAAA=="
    section = azurite.section(name)
    section["ConnectionString"] = azurite.connection_string(wrong)
    denied = cloud_backend("AzureBlobStorage", section)
    with pytest.raises(errors.Denied):
        await denied.list_page("", None, 1)


async def test_azure_creates_its_container(azurite: AzuriteServer, tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    backend = cloud_backend("AzureBlobStorage", azurite.section(
        "created-by-objfs", CreateContainerIfNotExists=True))
    await backend.prepare()
    await backend.prepare()  # exists now: no error
    await backend.put("k", _file(tmp_path, "src", b"x"))
    assert "check that it is private" in caplog.text


async def test_gcs_missing_bucket(fake_gcs: FakeGcsServer, tmp_path: Path) -> None:
    backend = cloud_backend("GoogleCloudStorage", fake_gcs.section("no-such-bucket"))
    with pytest.raises(errors.BucketMissing):
        await backend.list_page("", None, 1)
    with pytest.raises(errors.BucketMissing):
        await backend.put("k", _file(tmp_path, "src", b"x"))


def cloud_at_port(section_name: str, port: int, request_timeout: float,
                  max_retries: int) -> Backend:
    """An Azure or GCS backend for a local port with a 1 s connect timeout (with their
    direct requests, the default)."""
    section: dict[str, Any] = {"ConnectTimeout": 1, "RequestTimeout": request_timeout,
                               "MaxRetries": max_retries}
    if section_name == "AzureBlobStorage":
        section |= {"ContainerName": "c", "ConnectionString": (
            f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={AZ_KEY};"
            f"BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;")}
    else:
        section |= {"BucketName": "b", "Endpoint": f"http://127.0.0.1:{port}"}
    return cloud_backend(section_name, section)


@pytest.mark.parametrize("section_name", ["AzureBlobStorage", "GoogleCloudStorage"])
async def test_server_down_fails_within_timeout(section_name: str, tmp_path: Path) -> None:
    backend = cloud_at_port(section_name, free_port(), 2, 1)  # nothing listens there
    start = time.monotonic()
    with pytest.raises(errors.Unavailable):
        await backend.get("k", tmp_path / "o")
    with pytest.raises(errors.Unavailable):
        await backend.put("k", _file(tmp_path, "src", b"x"))
    assert time.monotonic() - start < 20


@pytest.mark.parametrize("section_name", ["AzureBlobStorage", "GoogleCloudStorage"])
async def test_server_that_hangs_times_out(section_name: str, tmp_path: Path) -> None:
    """A server that accepts connections and never answers: each request (GET, HEAD, a
    single upload, a delete, a listing: most of them on the direct paths) ends as Unavailable
    on the request timeout, none waits for the SDK's own minutes-long defaults."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)  # accepts connections, never reads nor answers
    try:
        backend = cloud_at_port(section_name, listener.getsockname()[1], 1, 0)
        for name, call in (("get", lambda: backend.get("k", tmp_path / "o")),
                           ("head", lambda: backend.head("k")),
                           ("put", lambda: backend.put("k", _file(tmp_path, "s", b"x" * 999))),
                           ("delete", lambda: backend.delete("k")),
                           ("list", lambda: backend.list_page("k", None, 10))):
            start = time.monotonic()
            with pytest.raises(errors.Unavailable):
                await call()
            assert time.monotonic() - start < 10, name
        # A timeout is the network's failure, not a refusal of the direct request: the
        # backend stays on its direct path (no SDK retry behind it).
        assert getattr(backend, "direct", None) is not None
    finally:
        listener.close()


async def test_s3_bad_credentials(tmp_path: Path) -> None:
    # moto checks signatures once its first (unauthenticated) calls have made a user.
    moto = MotoServer(tmp_path, env={"INITIAL_NO_AUTH_ACTION_COUNT": "4"})
    try:
        good = moto.user_keys()
        boto3.client("s3", endpoint_url=moto.endpoint, region_name="us-east-1",
                     aws_access_key_id=good["AccessKey"],
                     aws_secret_access_key=good["SecretKey"]).create_bucket(Bucket="authed")
        ok = s3_backend(moto, "authed", **good)
        await ok.put("k", _file(tmp_path, "src", b"x"))
        for wrong in ({**good, "SecretKey": "not-the-secret"},
                      {**good, "AccessKey": "AKIANOTAKEY00000000"}):
            with pytest.raises(errors.Denied):
                await s3_backend(moto, "authed", **wrong).put("k", _file(tmp_path, "s", b"x"))
    finally:
        moto.stop()


async def test_s3_bodies_unsigned_but_checksummed(moto: MotoServer, bucket: str,
                                                  tmp_path: Path) -> None:
    """Over http:// too, bodies go as UNSIGNED-PAYLOAD (as the official plugin's S3 client)
    with a signed CRC32 header of exactly the body sent, for single PUTs and for every part,
    which S3 checks (moto does not, so that check is S3's, not tested here); the objects
    read back intact. Through botocore here (tests/test_s3_direct.py: direct PUTs)."""
    backend = s3_backend(moto, bucket, ChunkSize=5, DirectRequests=False)  # 11 MB: in parts
    sent: list[tuple[str, str, str, bytes]] = []

    def text(value: str | bytes) -> str:
        return value.decode() if isinstance(value, bytes) else value

    def record(request: Any, event_name: str, **_: object) -> None:
        body = request.body
        data = body.read() if hasattr(body, "read") else bytes(body or b"")
        if hasattr(body, "seek"):
            body.seek(0)
        sent.append((event_name.rsplit(".", 1)[1], text(request.headers["x-amz-content-sha256"]),
                     text(request.headers.get("x-amz-checksum-crc32", "")), data))

    backend.client.meta.events.register("before-send.s3.PutObject", record)
    backend.client.meta.events.register("before-send.s3.UploadPart", record)
    small = os.urandom(300_000)
    large = os.urandom(11 << 20)
    await backend.put("small", _file(tmp_path, "s", small))
    await backend.put("large", _file(tmp_path, "l", large))
    assert [op for op, *_ in sent] == ["PutObject"] + ["UploadPart"] * 3
    for _op, signed, crc, data in sent:
        assert signed == "UNSIGNED-PAYLOAD"
        expected = base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
        assert crc == expected
    for key, data in (("small", small), ("large", large)):
        await backend.get(key, tmp_path / f"o-{key}")
        assert (tmp_path / f"o-{key}").read_bytes() == data
