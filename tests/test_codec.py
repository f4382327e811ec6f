"""The A1 envelope format against the official plugin's own ciphertexts, and key files."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from objfs import codec
from objfs.config import settings_from_tree
from objfs.errors import ConfigError, Corrupt

# Made by the official plugin's own code (see the README beside them); copied in so that the
# suite needs nothing outside the repository.
VECTORS = Path(__file__).resolve().parent / "data" / "plugin-encryption"
MANIFEST = json.loads((VECTORS / "manifest.json").read_text())


def key(n: int) -> bytes:
    return codec.read_key_file(VECTORS / "keys" / f"key{n}.b64")


def ring(current: int = 3, previous: tuple[int, ...] = (1, 2)) -> codec.KeyRing:
    return codec.KeyRing(current, {i: key(i) for i in (current, *previous)})


def test_master_keys_read_as_the_plugin_reads_them() -> None:
    for entry in MANIFEST["master_keys"]:
        assert codec.read_key_file(VECTORS / entry["file"]).hex() == \
            entry["key_hex_as_read_by_plugin"]


@pytest.mark.parametrize("vector", MANIFEST["vectors"], ids=lambda v: v["name"])
def test_plugin_ciphertexts_decrypt(vector: dict[str, object], tmp_path: Path) -> None:
    out = tmp_path / "plain"
    size = codec.decrypt_file(VECTORS / str(vector["ciphertext_file"]), out, ring())
    assert size == vector["plaintext_size"]
    assert hashlib.sha256(out.read_bytes()).hexdigest() == vector["plaintext_sha256"]
    assert out.read_bytes() == (VECTORS / str(vector["plaintext_file"])).read_bytes()
    assert codec.plaintext_size(int(vector["ciphertext_size"])) == size  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "previous", "reason"), [
    ("n1_tampered_ciphertext_byte", (1, 2), "authentication failed"),
    ("n2_tampered_tag", (1, 2), "authentication failed"),
    ("n3_unknown_master_key_id", (1,), "unknown master key id 2"),
    ("n4_bad_version_header", (1, 2), "bad version header b'B1'"),
])
def test_plugin_refusals(name: str, previous: tuple[int, ...], reason: str,
                         tmp_path: Path) -> None:
    case = next(c for c in MANIFEST["negative_cases"] if c["name"] == name)
    assert not case["plugin_decrypt_accepts"]
    with pytest.raises(Corrupt, match=reason.replace("(", r"\(")):
        codec.decrypt_file(VECTORS / case["ciphertext_file"], tmp_path / "out", ring(3, previous))


def test_truncated_ciphertext(tmp_path: Path) -> None:
    src = VECTORS / "enc" / "v09_json.key3.enc"
    for size in (0, 10, 69, 85):
        cut = tmp_path / f"cut{size}"
        cut.write_bytes(src.read_bytes()[:size])
        with pytest.raises(Corrupt, match="truncated"):
            codec.decrypt_file(cut, tmp_path / "out", ring())
    cut = tmp_path / "cut-tail"
    cut.write_bytes(src.read_bytes()[:-1])
    with pytest.raises(Corrupt, match="authentication failed"):
        codec.decrypt_file(cut, tmp_path / "out", ring())


@pytest.mark.parametrize(("file", "accepted"), [
    ("key3_wrapped_ws.b64", True), ("key3_nopad.b64", True), ("key3_plus_junk.b64", False),
    ("key3_then_16_more_bytes.b64", False), ("key_hex_not_base64.txt", False),
])
def test_key_file_parsing(file: str, accepted: bool) -> None:
    path = VECTORS / "keys" / file
    if accepted:
        assert codec.read_key_file(path) == key(3)
    else:  # stricter than the plugin, which silently used a different or truncated key
        with pytest.raises(ConfigError, match=file):
            codec.read_key_file(path)


def test_url_safe_and_unreadable_keys_are_refused(tmp_path: Path) -> None:
    url_safe = tmp_path / "k"
    url_safe.write_text("-_" + "A" * 41 + "=")
    with pytest.raises(ConfigError, match="URL-safe"):
        codec.read_key_file(url_safe)
    with pytest.raises(ConfigError, match="cannot read"):
        codec.read_key_file(tmp_path / "missing")


def independent_decrypt(blob: bytes, keys: dict[int, bytes]) -> bytes:
    """A second reading of the format, written from its description, one-shot AES-GCM."""
    assert blob[:2] == b"A1"
    (key_id,) = struct.unpack("<I", blob[2:6])
    stream = Cipher(algorithms.AES(keys[key_id]), modes.CTR(bytes(16))).encryptor() \
        .update(bytes(32))
    iv = bytes(a ^ b for a, b in zip(blob[6:38], stream, strict=True))
    dek = bytes(a ^ b for a, b in zip(blob[38:70], stream, strict=True))
    return AESGCM(dek).decrypt(iv, blob[70:], blob[:70])


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 4096, 1024 * 1024 + 3, 100 * 1024 * 1024])
def test_objfs_ciphertexts_decrypt_independently(size: int, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_bytes(os.urandom(size))
    sealed = tmp_path / "sealed"
    keys = ring(3, (1,))
    assert codec.encrypt_file(plain, sealed, keys) == size + codec.OVERHEAD
    blob = sealed.read_bytes()
    assert blob[:6] == b"A1" + struct.pack("<I", 3)
    assert independent_decrypt(blob, {3: key(3)}) == plain.read_bytes()
    assert codec.decrypt_file(sealed, tmp_path / "back", keys) == size
    assert (tmp_path / "back").read_bytes() == plain.read_bytes()


def test_key_generation(tmp_path: Path) -> None:
    path = tmp_path / "new.key"
    codec.write_key_file(path)
    assert len(codec.read_key_file(path)) == 32
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        codec.write_key_file(path)


def enc_section(current: tuple[object, ...] | list[object], *previous: list[object]) -> dict:
    section: dict[str, object] = {"MasterKey": list(current)}
    if previous:
        section["PreviousMasterKeys"] = [list(p) for p in previous]
    return section


K1, K3 = str(VECTORS / "keys" / "key1.b64"), str(VECTORS / "keys" / "key3.b64")


def test_encryption_config() -> None:
    s = settings_from_tree({"Objfs": {"StorageEncryption": enc_section((3, K3), [1, K1])}})
    assert s.encryption is not None and s.encryption.ring.current_id == 3
    assert set(s.encryption.ring.keys) == {1, 3}
    assert s.encryption.max_concurrent_input == 1024 * 1024 * 1024
    off = settings_from_tree({"Objfs": {"StorageEncryption": {"Enable": False}}})
    assert off.encryption is None


@pytest.mark.parametrize(("section", "message"), [
    ({}, "StorageEncryption.MasterKey: missing"),
    ({"MasterKey": [3]}, "StorageEncryption.MasterKey: expected [id"),
    ({"MasterKey": ["3", K3]}, "StorageEncryption.MasterKey: expected [id"),
    ({"MasterKey": [-1, K3]}, "is not a uint32"),
    ({"MasterKey": [2**32, K3]}, "is not a uint32"),
    ({"MasterKey": [3, "/nonexistent/key"]}, "cannot read"),
    ({"MasterKey": [3, K3], "PreviousMasterKeys": [[3, K1]]}, "key id 3 is used twice"),
    ({"MasterKey": [3, K3], "PreviousMasterKeys": [[1]]}, "PreviousMasterKeys[0]"),
    ({"MasterKey": [3, K3], "Extra": 1}, "StorageEncryption.Extra: unknown option"),
    ({"MasterKey": [3, K3], "MaxConcurrentInputSize": 0}, "MaxConcurrentInputSize"),
])
def test_encryption_config_errors(section: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_tree({"Objfs": {"StorageEncryption": section}})
    assert message in str(info.value)


@pytest.mark.parametrize("vector", MANIFEST["vectors"][:3], ids=lambda v: v["name"])
@pytest.mark.parametrize("piece", [1, 7, 16, 17, 70, 71, 86, 4096, 1 << 20])
def test_stream_decryptor_takes_pieces_of_any_size(vector: dict[str, object],
                                                    piece: int) -> None:
    """What a download feeds it: the plugin's ciphertexts in pieces of every awkward size
    (inside the header, the tag's length, the whole object) decrypt as in one go."""
    blob = (VECTORS / str(vector["ciphertext_file"])).read_bytes()
    expected = (VECTORS / str(vector["plaintext_file"])).read_bytes()
    decryptor = codec.StreamDecryptor(ring())
    out = b"".join(decryptor.update(blob[i:i + piece]) for i in range(0, len(blob), piece))
    assert out + decryptor.finalize() == expected
    assert decryptor.received == len(blob)


def test_stream_decryptor_refuses_what_decrypt_file_refuses() -> None:
    blob = (VECTORS / "enc" / "v09_json.key3.enc").read_bytes()
    for size in (0, 10, 69, 85):
        decryptor = codec.StreamDecryptor(ring())
        decryptor.update(blob[:size])
        with pytest.raises(Corrupt, match="truncated"):
            decryptor.finalize()
    for cut, reason in ((blob[:-1], "authentication failed \\(wrong key 3"),
                        (blob[:80] + bytes([blob[80] ^ 1]) + blob[81:], "authentication failed")):
        decryptor = codec.StreamDecryptor(ring())
        decryptor.update(cut)
        with pytest.raises(Corrupt, match=reason):
            decryptor.finalize()
    with pytest.raises(Corrupt, match="unknown master key id 3"):
        codec.StreamDecryptor(ring(1, (2,))).update(blob)
    with pytest.raises(Corrupt, match="bad version header"):
        codec.StreamDecryptor(ring()).update(b"B1" + blob[2:])
