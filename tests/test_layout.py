"""Object naming and content-type detection, as the official plugins name objects."""

from __future__ import annotations

import struct
import zlib

import pytest

from objfs.layout import Kind, Layout, detect_kind, join_root, scan_dicom
from tests.support.dicom import make_dicom

U = "0a1b2c3d-4e5f-4a6b-8c7d-0e1f2a3b4c5d"


@pytest.mark.parametrize(("root", "name", "expected"), [
    ("", "x", "x"), ("r", "x", "r/x"), ("r/", "x", "r/x"), ("a/b", "x", "a/b/x"),
    ("a/b/", "x", "a/b/x"),
])
def test_root_join(root: str, name: str, expected: str) -> None:
    assert join_root(root, name) == expected


@pytest.mark.parametrize("root", ["", "orthanc", "orthanc/", "site/a"])
@pytest.mark.parametrize("kind", list(Kind))
@pytest.mark.parametrize("encrypted", [False, True])
def test_flat_keys(root: str, kind: Kind, encrypted: bool) -> None:
    layout = Layout("flat", root)
    key = layout.object_key(U, kind, encrypted)
    prefix = "" if not root else root.rstrip("/") + "/"
    assert key == prefix + U + kind.value + (".enc" if encrypted else "")
    info = layout.parse_key(key)
    assert info is not None and (info.uuid, info.kind, info.encrypted) == (U, kind, encrypted)
    assert key.startswith(layout.lookup_prefix(U))
    assert key.startswith(layout.dir_prefix("0a1b")) and key.startswith(layout.dir_prefix("0a"))


@pytest.mark.parametrize("root", ["", "orthanc", "orthanc/"])
@pytest.mark.parametrize("kind", list(Kind))
@pytest.mark.parametrize("encrypted", [False, True])
def test_legacy_keys_ignore_type_and_encryption(root: str, kind: Kind, encrypted: bool) -> None:
    layout = Layout("legacy", root)
    key = layout.object_key(U, kind, encrypted)
    prefix = "" if not root else root.rstrip("/") + "/"
    assert key == f"{prefix}0a/1b/{U}"
    info = layout.parse_key(key)
    assert info is not None and info.uuid == U and info.encrypted is None
    assert layout.lookup_prefix(U) == key
    assert layout.dir_prefix("0a1b") == f"{prefix}0a/1b/"
    assert layout.dir_prefix("0a") == f"{prefix}0a/"


@pytest.mark.parametrize("structure", ["flat", "legacy"])
@pytest.mark.parametrize("root", ["", "orthanc/"])
def test_possible_keys_are_every_name_of_the_uuid(structure: str, root: str) -> None:
    """A batch delete sends these instead of listing: each is parsed back to the uuid, and
    every key the layout gives the uuid is among them."""
    layout = Layout(structure, root)
    keys = layout.possible_keys(U)
    assert len(keys) == len(set(keys)) == (8 if structure == "flat" else 1)
    assert all((info := layout.parse_key(k)) is not None and info.uuid == U for k in keys)
    assert {layout.object_key(U, kind, enc) for kind in Kind for enc in (False, True)} \
        == set(keys)


def test_parse_rejects_foreign_keys() -> None:
    flat, legacy = Layout("flat", "r"), Layout("legacy", "r")
    for key in [f"other/{U}.dcm", f"r/{U}.txt", f"r/{U}", "r/not-a-uuid.dcm", f"r/{U}.dcm.x",
                f"r/{U.upper()}.dcm"]:
        assert flat.parse_key(key) is None, key
    for key in [f"r/0a/1c/{U}", f"r/{U}", f"r/0a/1b/{U}.dcm", "r/0a/1b/x"]:
        assert legacy.parse_key(key) is None, key


def test_choose_key_prefers_configured_encryption_and_order() -> None:
    layout = Layout("flat", "")
    keys = [f"{U}.unk", f"{U}.dcm.enc", f"{U}.dcm", "0a1b2c3d-4e5f-4a6b-8c7d-0e1f2a3b4c5e.dcm"]
    assert layout.choose_key(U, keys, prefer_encrypted=False) == f"{U}.dcm"
    assert layout.choose_key(U, keys, prefer_encrypted=True) == f"{U}.dcm.enc"
    assert layout.choose_key(U, [f"{U}.unk", f"{U}.json"], False) == f"{U}.json"
    assert layout.choose_key(U, ["x", "y"], False) is None


def _header_until_pixel_data(dicom: bytes) -> bytes:
    """What Orthanc stores as "dicom-until-pixel-data": the bytes before (7FE0,0010)."""
    return dicom[: dicom.rindex(b"\xe0\x7f\x10\x00")]


def orthanc_zlib(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + zlib.compress(data)


def test_detect_dicom_and_header() -> None:
    dicom = make_dicom(1)
    assert detect_kind(dicom, len(dicom)) is Kind.DICOM
    head = _header_until_pixel_data(dicom)
    scan = scan_dicom(head)
    assert scan is not None and scan.complete and scan.image_attributes and not scan.pixel_data
    assert detect_kind(head, len(head)) is Kind.DICOM_HEAD
    # Only the first bytes of a large file were seen: a header cannot be that large.
    assert detect_kind(head, len(head) + 10_000_000) is Kind.DICOM


def test_detect_compressed_attachments() -> None:
    dicom = make_dicom(2)
    assert detect_kind(orthanc_zlib(dicom), 10**6) is Kind.DICOM
    head = _header_until_pixel_data(dicom)
    blob = orthanc_zlib(head)
    assert detect_kind(blob, len(blob)) is Kind.DICOM_HEAD
    blob = orthanc_zlib(b'{"0010,0010": {}}')
    assert detect_kind(blob, len(blob)) is Kind.JSON


def test_detect_json_and_unknown() -> None:
    assert detect_kind(b'  {"a": 1}', 10) is Kind.JSON
    assert detect_kind(b"", 0) is Kind.UNKNOWN
    assert detect_kind(b"\x00" * 200, 200) is Kind.UNKNOWN
    assert detect_kind(b"\x00" * 128 + b"DICM", 132) is Kind.DICOM  # truncated meta: still DICOM


def test_dicom_without_image_attributes_is_dicom() -> None:
    # An SR-like stream: no group 0028, no pixel data, complete.
    dicom = make_dicom(3)
    head = _header_until_pixel_data(dicom)
    scan = scan_dicom(head)
    assert scan is not None
    stripped = head.replace(b"\x28\x00", b"\x29\x00")  # move group 0028 elements to 0029
    assert detect_kind(stripped, len(stripped)) is Kind.DICOM


def test_icon_pixel_data_in_a_sequence_does_not_count() -> None:
    # (0088,0200) IconImageSequence, undefined length, with an item holding (7FE0,0010).
    dicom = make_dicom(4)
    head = _header_until_pixel_data(dicom)
    pixel = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, 4) + b"\0\0\0\0"
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + pixel \
        + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    seq = struct.pack("<HH2sHI", 0x0088, 0x0200, b"SQ", 0, 0xFFFFFFFF) + item \
        + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    with_icon = head + seq
    assert detect_kind(with_icon, len(with_icon)) is Kind.DICOM_HEAD
