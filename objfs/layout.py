"""Pure mapping between Orthanc's storage paths and object keys.

Orthanc stores attachment ``<uuid>`` at ``ab/cd/<uuid>``. The official object-storage plugins
name the object either ``RootPath/ab/cd/<uuid>`` ("legacy") or ``RootPath/<uuid><ext>`` ("flat",
the default) where the extension depends on the attachment's content type and on encryption.
Orthanc gives a filesystem no content type, so in flat mode objfs recognises it from the bytes
(`detect_kind`). Nothing here does I/O.
"""

from __future__ import annotations

import enum
import re
import struct
import zlib
from dataclasses import dataclass

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
HEX2_RE = re.compile(r"^[0-9a-f]{2}$")

ENCRYPTED_SUFFIX = ".enc"

# How many leading bytes of an attachment `detect_kind` wants to see.
DETECT_BYTES = 1024 * 1024


class Kind(enum.Enum):
    """Attachment content types as the flat layout names them (value = file extension)."""

    DICOM = ".dcm"
    DICOM_HEAD = ".dcm.head"
    JSON = ".json"
    UNKNOWN = ".unk"


# Order in which candidate names are preferred when a listing returns several.
_KIND_ORDER = (Kind.DICOM, Kind.DICOM_HEAD, Kind.JSON, Kind.UNKNOWN)


def is_uuid(name: str) -> bool:
    """True for an Orthanc attachment file name (lower-case canonical UUID)."""
    return UUID_RE.match(name) is not None


def is_hex_dir(name: str) -> bool:
    """True for a two-hex-digit directory name of Orthanc's storage tree."""
    return HEX2_RE.match(name) is not None


def attachment_dirs(uuid: str) -> tuple[str, str]:
    """The two directory levels Orthanc puts `uuid` under."""
    return uuid[0:2], uuid[2:4]


def join_root(root_path: str, name: str) -> str:
    """Join like boost::filesystem's ``/=``, which the plugins use: one ``/`` between the parts,
    none added when `root_path` is empty or already ends with ``/``."""
    if not root_path:
        return name
    if root_path.endswith("/"):
        return root_path + name
    return root_path + "/" + name


@dataclass(frozen=True)
class KeyInfo:
    """What an object key says about the attachment it holds.

    `encrypted` is None when the name does not tell (legacy keys): the ``A1`` header decides.
    """

    uuid: str
    kind: Kind | None
    encrypted: bool | None


class StorageStructure(enum.StrEnum):
    """The plugins' object naming: ``RootPath/<uuid>.dcm`` (flat) or ``RootPath/ab/cd/<uuid>``."""

    FLAT = "flat"
    LEGACY = "legacy"


@dataclass(frozen=True)
class Layout:
    """Object naming under one bucket, as configured by ``StorageStructure`` and ``RootPath``."""

    structure: StorageStructure = StorageStructure.FLAT
    root_path: str = ""

    @property
    def legacy(self) -> bool:
        return self.structure == StorageStructure.LEGACY

    def object_key(self, uuid: str, kind: Kind, encrypted: bool) -> str:
        """The key the plugins would give attachment `uuid` of type `kind`."""
        if self.legacy:
            a, b = attachment_dirs(uuid)
            return join_root(join_root(join_root(self.root_path, a), b), uuid)
        suffix = kind.value + (ENCRYPTED_SUFFIX if encrypted else "")
        return join_root(self.root_path, uuid + suffix)

    def lookup_prefix(self, uuid: str) -> str:
        """A listing prefix that returns the attachment's object whatever its extension."""
        if self.legacy:
            return self.object_key(uuid, Kind.UNKNOWN, False)
        return join_root(self.root_path, uuid)

    def possible_keys(self, uuid: str) -> list[str]:
        """Every key `parse_key` maps to attachment `uuid`: what a delete must remove without
        listing (the plugins' names, a rekeyed ``.enc`` sibling, another kind's extension)."""
        if self.legacy:
            return [self.object_key(uuid, Kind.UNKNOWN, False)]
        return [self.object_key(uuid, kind, encrypted)
                for kind in _KIND_ORDER for encrypted in (False, True)]

    def dir_prefix(self, hexdigits: str) -> str:
        """A listing prefix matching every attachment whose uuid starts with `hexdigits`
        (2 or 4 hex digits: Orthanc's first or second directory level)."""
        if self.legacy:
            parts = [hexdigits[0:2]] + ([hexdigits[2:4]] if len(hexdigits) > 2 else [])
            path = self.root_path
            for part in parts:
                path = join_root(path, part)
            return path + "/"
        return join_root(self.root_path, hexdigits)

    def root_prefix(self) -> str:
        """The listing prefix under which every attachment of this layout lives."""
        if not self.root_path:
            return ""
        return self.root_path if self.root_path.endswith("/") else self.root_path + "/"

    def parse_key(self, key: str) -> KeyInfo | None:
        """The attachment an object key names, or None when the key is not one of ours."""
        prefix = self.root_prefix()
        if not key.startswith(prefix):
            return None
        rest = key[len(prefix):]
        if self.legacy:
            parts = rest.split("/")
            if len(parts) != 3 or not is_uuid(parts[2]):
                return None
            if (parts[0], parts[1]) != attachment_dirs(parts[2]):
                return None
            return KeyInfo(parts[2], None, None)
        uuid, suffix = rest[:36], rest[36:]
        if not is_uuid(uuid):
            return None
        encrypted = suffix.endswith(ENCRYPTED_SUFFIX)
        if encrypted:
            suffix = suffix[: -len(ENCRYPTED_SUFFIX)]
        for kind in _KIND_ORDER:
            if suffix == kind.value:
                return KeyInfo(uuid, kind, encrypted)
        return None

    def choose_key(self, uuid: str, keys: list[str], prefer_encrypted: bool) -> str | None:
        """Pick the attachment's object among the keys a prefix listing returned.

        Keys that do not name `uuid` are ignored. When several names exist (which the plugins
        never create), the encrypted or plain one is preferred as configured, then the
        extension order ``.dcm``, ``.dcm.head``, ``.json``, ``.unk``.
        """
        ranked: list[tuple[int, int, str]] = []
        for key in keys:
            info = self.parse_key(key)
            if info is None or info.uuid != uuid:
                continue
            kind_rank = _KIND_ORDER.index(info.kind) if info.kind else 0
            enc_rank = 0 if bool(info.encrypted) == prefer_encrypted else 1
            ranked.append((enc_rank, kind_rank, key))
        return min(ranked)[2] if ranked else None


# --- content-type detection -------------------------------------------------------------------

_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_DEFLATED = "1.2.840.10008.1.2.1.99"
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_PIXEL_DATA = (0x7FE0, 0x0010)


class _Truncated(Exception):
    pass


@dataclass
class DicomScan:
    """What a walk over a DICOM stream found at the top level of its data set."""

    image_attributes: bool = False  # an element of group 0028
    pixel_data: bool = False
    complete: bool = False  # the walk ended exactly at the end of the bytes


def _walk(data: bytes, pos: int, implicit: bool, big: bool, scan: DicomScan,
          stop_group: int | None = None) -> int:
    """Walk data elements from `pos`; returns the position after the last complete element."""
    depth = 0
    end16, end32 = (">H", ">I") if big else ("<H", "<I")
    while pos < len(data):
        if pos + 8 > len(data):
            raise _Truncated
        group = struct.unpack_from(end16, data, pos)[0]
        elem = struct.unpack_from(end16, data, pos + 2)[0]
        if stop_group is not None and group != stop_group:
            return pos
        if group == 0xFFFE:  # items and delimiters: always 4-byte length, no VR
            length = struct.unpack_from(end32, data, pos + 4)[0]
            pos += 8
            if elem == 0xE000:  # item
                if length == _UNDEFINED:
                    depth += 1
                else:
                    pos += length
            elif depth > 0:  # item or sequence delimiter closes one nesting level
                depth -= 1
            continue
        if implicit:
            length = struct.unpack_from(end32, data, pos + 4)[0]
            header = 8
        else:
            vr = data[pos + 4:pos + 6]
            if vr in _LONG_VRS:
                if pos + 12 > len(data):
                    raise _Truncated
                length = struct.unpack_from(end32, data, pos + 8)[0]
                header = 12
            else:
                length = struct.unpack_from(end16, data, pos + 6)[0]
                header = 8
        if depth == 0:
            if (group, elem) == _PIXEL_DATA:
                scan.pixel_data = True
                return pos
            if group == 0x0028:
                scan.image_attributes = True
        pos += header
        if length == _UNDEFINED:
            depth += 1  # a sequence (or UN) of undefined length: its items follow inline
            continue
        if pos + length > len(data):
            raise _Truncated
        pos += length
    if depth == 0:
        scan.complete = True
    return pos


def scan_dicom(data: bytes) -> DicomScan | None:
    """Walk a Part-10 DICOM stream; None when `data` is not DICOM (no ``DICM`` at 128)."""
    if len(data) < 132 or data[128:132] != b"DICM":
        return None
    scan = DicomScan()
    try:
        meta_end = _walk(data, 132, implicit=False, big=False, scan=DicomScan(), stop_group=2)
        transfer_syntax = _find_transfer_syntax(data, 132, meta_end)
        body = data[meta_end:]
        if transfer_syntax == _DEFLATED:
            body = zlib.decompressobj(-15).decompress(body, DETECT_BYTES)
        _walk(body, 0, implicit=transfer_syntax == _IMPLICIT_LE,
              big=transfer_syntax == _EXPLICIT_BE, scan=scan)
    except (_Truncated, zlib.error, struct.error):
        pass
    return scan


def _find_transfer_syntax(data: bytes, pos: int, end: int) -> str:
    while pos + 8 <= end:
        group, elem = struct.unpack_from("<HH", data, pos)
        vr = data[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            length = struct.unpack_from("<I", data, pos + 8)[0]
            header = 12
        else:
            length = struct.unpack_from("<H", data, pos + 6)[0]
            header = 8
        if (group, elem) == (0x0002, 0x0010):
            raw = data[pos + header:pos + header + length]
            return raw.rstrip(b"\x00 ").decode("ascii", "replace")
        pos += header + length
    return ""


def _orthanc_zlib_payload(head: bytes) -> tuple[bytes, int] | None:
    """Decompress the start of an Orthanc zlib attachment (8-byte LE size + zlib stream);
    returns (first bytes, uncompressed size) or None when `head` is not one."""
    if len(head) < 10:
        return None
    cmf, flg = head[8], head[9]
    if cmf & 0x0F != 8 or (cmf * 256 + flg) % 31 != 0:
        return None
    size = struct.unpack_from("<Q", head, 0)[0]
    try:
        out = zlib.decompressobj().decompress(head[8:], DETECT_BYTES)
    except zlib.error:
        return None
    return out, size


def detect_kind(head: bytes, total_size: int) -> Kind:
    """Recognise an attachment's content type from its first bytes.

    `head` is the first `DETECT_BYTES` (or fewer, if the file is shorter) of a file of
    `total_size` bytes. DICOM -> DICOM, except a DICOM stream with image attributes (group
    0028) that ends before Pixel Data -> DICOM_HEAD (Orthanc's "dicom-until-pixel-data");
    a JSON object -> JSON; Orthanc zlib attachments are judged by their decompressed start;
    anything else -> UNKNOWN.
    """
    payload = _orthanc_zlib_payload(head)
    if payload is not None:
        inner, inner_size = payload
        kind = _detect_plain(inner, inner_size)
        if kind is not Kind.UNKNOWN:
            return kind
    return _detect_plain(head, total_size)


def _detect_plain(head: bytes, total_size: int) -> Kind:
    scan = scan_dicom(head)
    if scan is not None:
        whole = len(head) >= total_size
        if whole and scan.complete and scan.image_attributes and not scan.pixel_data:
            return Kind.DICOM_HEAD
        return Kind.DICOM
    if head.lstrip(b" \t\r\n").startswith(b"{"):
        return Kind.JSON
    return Kind.UNKNOWN
