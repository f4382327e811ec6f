"""Client-side envelope encryption in the format of the official Orthanc object-storage plugins.

Pure: files in, files out, no network. Layout of an encrypted object (all facts measured from
the plugin's code; see ``tests/data/plugin-encryption/``)::

    offset  len  field
    0       2    "A1"
    2       4    master key id, uint32 little-endian
    6       32   EIV  = IV  XOR KS
    38      32   EDEK = DEK XOR KS
    70      n    AES-256-GCM ciphertext of the n-byte plaintext (key DEK, 32-byte IV)
    70+n    16   GCM tag over the ciphertext, with bytes [0, 70) as additional data

    KS = AES-256-CTR(master key, initial counter block 0^16) applied to 32 zero bytes

Files of any size are processed in chunks (memory stays at one chunk). Decryption writes the
plaintext as it goes but reports success only after the tag verified: callers must discard the
output of a failed call.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import (
    AEADDecryptionContext,
    Cipher,
    algorithms,
    modes,
)

from objfs.errors import ConfigError, Corrupt

MAGIC = b"A1"
HEADER_SIZE = 70
TAG_SIZE = 16
OVERHEAD = HEADER_SIZE + TAG_SIZE
KEY_SIZE = 32
CHUNK = 1024 * 1024
MAX_KEY_ID = 2**32 - 1

_BASE64_ALPHABET = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")


def read_key_file(path: str | os.PathLike[str]) -> bytes:
    """A master key: 32 bytes in standard base64, whitespace and line breaks ignored.

    Missing ``=`` padding is accepted (as by the plugin); URL-safe characters, other junk and
    anything that does not decode to exactly 32 bytes raise ConfigError.
    """
    try:
        text = Path(path).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"key file {path}: cannot read: {exc}") from exc
    compact = "".join(text.split())
    if "-" in compact or "_" in compact:
        raise ConfigError(f"key file {path}: URL-safe base64 is not accepted; use standard "
                          "base64 (openssl rand -base64 32)")
    if not _BASE64_ALPHABET.match(compact):
        raise ConfigError(f"key file {path}: not base64")
    compact += "=" * (-len(compact) % 4)
    try:
        key = base64.b64decode(compact, validate=True)
    except binascii.Error as exc:
        raise ConfigError(f"key file {path}: not base64: {exc}") from exc
    if len(key) != KEY_SIZE:
        raise ConfigError(f"key file {path}: decodes to {len(key)} bytes, a master key must "
                          f"be exactly {KEY_SIZE}")
    return key


def write_key_file(path: str | os.PathLike[str]) -> None:
    """Create a new random master key file, mode 0600; refuses to overwrite."""
    key = base64.b64encode(os.urandom(KEY_SIZE)) + b"\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class KeyRing:
    """The current master key (used to encrypt) and every key that may decrypt."""

    current_id: int
    keys: Mapping[int, bytes] = field(repr=False)

    def __post_init__(self) -> None:
        if self.current_id not in self.keys:
            raise ConfigError(f"master key id {self.current_id} has no key")
        for key_id, key in self.keys.items():
            if not 0 <= key_id <= MAX_KEY_ID:
                raise ConfigError(f"master key id {key_id} is not a uint32")
            if len(key) != KEY_SIZE:
                raise ConfigError(f"master key {key_id} is not {KEY_SIZE} bytes")

    def key(self, key_id: int) -> bytes:
        try:
            return self.keys[key_id]
        except KeyError:
            raise Corrupt(f"unknown master key id {key_id} (known: "
                          f"{', '.join(map(str, sorted(self.keys)))})") from None


def _keystream(master: bytes) -> bytes:
    encryptor = Cipher(algorithms.AES(master), modes.CTR(b"\0" * 16)).encryptor()
    return encryptor.update(b"\0" * 32) + encryptor.finalize()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


@dataclass(frozen=True)
class Header:
    key_id: int
    iv: bytes
    dek: bytes
    raw: bytes


def parse_header(raw: bytes, ring: KeyRing) -> Header:
    """Check magic and key id of the first 70 bytes; raises Corrupt naming the problem."""
    if len(raw) < HEADER_SIZE:
        raise Corrupt(f"truncated: {len(raw)} bytes, an encrypted object has at least "
                      f"{OVERHEAD}")
    if raw[:2] != MAGIC:
        raise Corrupt(f"bad version header {raw[:2]!r} (expected {MAGIC!r})")
    key_id = struct.unpack_from("<I", raw, 2)[0]
    stream = _keystream(ring.key(key_id))
    return Header(key_id, _xor(raw[6:38], stream), _xor(raw[38:70], stream), raw[:HEADER_SIZE])


def key_id_of(raw: bytes) -> int | None:
    """The master key id of an encrypted object's first 6+ bytes; None if not ``A1``."""
    if len(raw) < 6 or raw[:2] != MAGIC:
        return None
    return int(struct.unpack_from("<I", raw, 2)[0])


def is_encrypted(head: bytes) -> bool:
    return head[:2] == MAGIC


def encrypt_file(src: Path, dst: Path, ring: KeyRing, chunk: int = CHUNK) -> int:
    """Encrypt `src` into `dst` under the current master key; returns the bytes written."""
    iv, dek = os.urandom(KEY_SIZE), os.urandom(KEY_SIZE)
    stream = _keystream(ring.key(ring.current_id))
    header = MAGIC + struct.pack("<I", ring.current_id) + _xor(iv, stream) + _xor(dek, stream)
    encryptor = Cipher(algorithms.AES(dek), modes.GCM(iv)).encryptor()
    encryptor.authenticate_additional_data(header)
    written = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(header)
        written += len(header)
        while block := fin.read(chunk):
            out = encryptor.update(block)
            fout.write(out)
            written += len(out)
        tail = encryptor.finalize()
        fout.write(tail + encryptor.tag)
        written += len(tail) + TAG_SIZE
    return written


class StreamDecryptor:
    """Decrypts one ``A1`` object fed in pieces of any size, as they arrive (a download):
    `update` returns the plaintext of every byte that is certainly not part of the tag (the
    last TAG_SIZE bytes received are held back), `finalize` verifies the tag.

    Raises Corrupt (bad header, unknown key id, truncated, authentication failure) from
    `update` or `finalize`; until `finalize` returned, the plaintext is unverified and must be
    discarded on any failure. One instance per object and attempt.
    """

    def __init__(self, ring: KeyRing) -> None:
        self._ring = ring
        self._head = b""  # the header's bytes until all HEADER_SIZE arrived
        self._decryptor: AEADDecryptionContext | None = None
        self._held = b""  # the last TAG_SIZE bytes received (perhaps the tag)
        self._key_id = 0
        self.received = 0

    def update(self, data: bytes | memoryview) -> bytes:
        self.received += len(data)
        if self._decryptor is None:
            self._head += data
            if len(self._head) < HEADER_SIZE:
                return b""
            header = parse_header(self._head[:HEADER_SIZE], self._ring)
            self._key_id = header.key_id
            data, self._head = self._head[HEADER_SIZE:], b""
            # The tag comes last: GCM takes it at `finalize_with_tag`.
            self._decryptor = Cipher(algorithms.AES(header.dek), modes.GCM(header.iv)).decryptor()
            self._decryptor.authenticate_additional_data(header.raw)
        if len(data) < TAG_SIZE:
            joined = self._held + data
            self._held = joined[-TAG_SIZE:]
            return self._decryptor.update(joined[:-TAG_SIZE])
        view = memoryview(data)
        out = self._decryptor.update(self._held) + self._decryptor.update(view[:-TAG_SIZE])
        self._held = bytes(view[-TAG_SIZE:])
        return out

    def finalize(self) -> bytes:
        """The last plaintext bytes, once the tag verified."""
        if self._decryptor is None or len(self._held) < TAG_SIZE:
            raise Corrupt(f"truncated: {self.received} bytes, an encrypted object has at least "
                          f"{OVERHEAD}")
        try:
            return self._decryptor.finalize_with_tag(self._held)
        except InvalidTag:
            raise Corrupt(f"authentication failed (wrong key {self._key_id}, or the object was "
                          "altered)") from None


def decrypt_file(src: Path, dst: Path, ring: KeyRing, chunk: int = CHUNK) -> int:
    """Decrypt and verify `src` into `dst`; returns the plaintext size.

    Raises Corrupt (bad header, unknown key id, truncated, authentication failure); `dst`
    then holds unverified bytes and must be discarded.
    """
    decryptor = StreamDecryptor(ring)
    written = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while block := fin.read(chunk):
            written += fout.write(decryptor.update(block))
        written += fout.write(decryptor.finalize())
    return written


def plaintext_size(ciphertext_size: int) -> int:
    return max(0, ciphertext_size - OVERHEAD)
