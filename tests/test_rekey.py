"""`objfs rekey`'s rewrite of one object (`Rekeyer.one`) against a local bucket, with the
attachment deleted at the steps where objfs may delete it while rekey works: a delete must
stay a delete, and count as neither a rewrite nor a failure. (The whole command, and its
resumption after SIGKILL, run in tests/test_encryption_mount.py.)"""

from __future__ import annotations

import os
import uuid as uuid_mod
from pathlib import Path

import pytest

from objfs import codec
from objfs.backends.base import ObjectInfo
from objfs.backends.local import TMP_DIR as LOCAL_TMP
from objfs.backends.local import LocalBackend
from objfs.layout import Kind, Layout
from objfs.rekey import TEMP_DIR, Rekeyer

OLD, NEW = 1, 3


class DeletingBackend(LocalBackend):
    """A local bucket where Orthanc's delete of the attachment `victim` (its object removed,
    as objfs does) comes at `strike`: "upload" (while rekey uploads the new ciphertext to its
    temporary key), "look" (right before rekey's last look at the object, after the read-back
    of the temporary object) or "copied" (right after the copy over the final key: objfs'
    delete then removes the rewritten object)."""

    strike = ""
    victim = ""

    def _delete_victim(self, at: str) -> None:
        if at == self.strike and self.victim:
            self._path(self.victim).unlink()
            self.victim = ""

    async def put(self, key: str, path: Path) -> None:
        if key.startswith(TEMP_DIR):
            self._delete_victim("upload")
        await super().put(key, path)

    async def head(self, key: str) -> ObjectInfo:
        if key == self.victim:
            self._delete_victim("look")
        return await super().head(key)

    async def copy(self, src: str, dst: str) -> None:
        await super().copy(src, dst)
        if dst == self.victim:
            self._delete_victim("copied")


@pytest.fixture
def ring() -> codec.KeyRing:
    return codec.KeyRing(NEW, {OLD: os.urandom(codec.KEY_SIZE), NEW: os.urandom(codec.KEY_SIZE)})


def stored(tmp_path: Path, backend: LocalBackend, ring: codec.KeyRing) -> tuple[str, bytes]:
    """An attachment object encrypted under the old key; its key and plaintext."""
    uuid = str(uuid_mod.uuid4())
    data = os.urandom(300_000)
    plain, sealed = tmp_path / "plain", tmp_path / "sealed"
    plain.write_bytes(data)
    codec.encrypt_file(plain, sealed, codec.KeyRing(OLD, ring.keys))
    key = Layout().object_key(uuid, Kind.DICOM, True)
    backend._path(key).parent.mkdir(parents=True, exist_ok=True)
    backend._path(key).write_bytes(sealed.read_bytes())
    return key, data


def rekeyer(tmp_path: Path, backend: LocalBackend, ring: codec.KeyRing) -> Rekeyer:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return Rekeyer(backend, Layout(), ring, work, include_unencrypted=False, dry_run=False)


def objects(bucket: Path) -> list[str]:
    return sorted(str(p.relative_to(bucket)) for p in bucket.rglob("*")
                  if p.is_file() and p.relative_to(bucket).parts[0] != LOCAL_TMP)


async def test_an_object_of_an_old_key_is_rewritten_under_the_current_one(
        tmp_path: Path, ring: codec.KeyRing) -> None:
    backend = DeletingBackend(tmp_path / "bucket")
    key, data = stored(tmp_path, backend, ring)
    worker = rekeyer(tmp_path, backend, ring)
    await worker.one(key)
    assert (worker.summary.rewritten, worker.summary.failed, worker.summary.vanished) == (1, 0, 0)
    assert objects(tmp_path / "bucket") == [key]
    raw = backend._path(key).read_bytes()
    assert codec.key_id_of(raw[:6]) == NEW
    out = tmp_path / "out"
    codec.decrypt_file(backend._path(key), out, ring)
    assert out.read_bytes() == data


@pytest.mark.parametrize("strike", ["upload", "look", "copied"])
async def test_an_attachment_deleted_while_it_is_rewritten_stays_deleted(
        tmp_path: Path, ring: codec.KeyRing, strike: str) -> None:
    backend = DeletingBackend(tmp_path / "bucket")
    key, _ = stored(tmp_path, backend, ring)
    backend.strike, backend.victim = strike, key
    worker = rekeyer(tmp_path, backend, ring)
    await worker.one(key)
    assert not backend.victim, "the delete came"
    assert (worker.summary.rewritten, worker.summary.failed, worker.summary.vanished) == (0, 0, 1)
    assert objects(tmp_path / "bucket") == [], "nothing of the deleted attachment is left"


async def test_an_attachment_deleted_before_rekey_reads_it_is_not_a_failure(
        tmp_path: Path, ring: codec.KeyRing) -> None:
    backend = DeletingBackend(tmp_path / "bucket")
    key, _ = stored(tmp_path, backend, ring)
    backend._path(key).unlink()  # listed, then deleted by Orthanc
    worker = rekeyer(tmp_path, backend, ring)
    await worker.one(key)
    assert (worker.summary.rewritten, worker.summary.failed, worker.summary.vanished) == (0, 0, 1)
    assert objects(tmp_path / "bucket") == []


async def test_a_temporary_object_that_goes_missing_is_a_failure_and_the_original_stays(
        tmp_path: Path, ring: codec.KeyRing) -> None:
    """Not found, but not the attachment: counted as failed (a rerun rewrites it)."""
    backend = DeletingBackend(tmp_path / "bucket")
    key, _ = stored(tmp_path, backend, ring)
    put = LocalBackend.put

    async def put_then_lose(self: LocalBackend, dst: str, path: Path) -> None:
        await put(self, dst, path)
        self._path(dst).unlink()

    backend.put = put_then_lose.__get__(backend)  # type: ignore[method-assign]
    before = backend._path(key).read_bytes()
    worker = rekeyer(tmp_path, backend, ring)
    await worker.one(key)
    assert (worker.summary.rewritten, worker.summary.failed, worker.summary.vanished) == (0, 1, 0)
    assert objects(tmp_path / "bucket") == [key]
    assert backend._path(key).read_bytes() == before
