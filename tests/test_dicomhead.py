"""objfs.dicomhead: the SeriesInstanceUID from a file's first bytes, whatever comes before."""

from __future__ import annotations

import io
import struct

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from objfs.dicomhead import series_instance_uid
from tests.support.dicom import make_dicom

SERIES = "1.2.826.0.1.3680043.8.498.77"


def element(group: int, elem: int, vr: bytes, value: bytes, explicit: bool = True,
            undefined: bool = False) -> bytes:
    length = 0xFFFFFFFF if undefined else len(value)
    tag = struct.pack("<HH", group, elem)
    if not explicit:
        return tag + struct.pack("<I", length) + value
    if vr in (b"OB", b"SQ", b"UN", b"UT", b"OW"):
        return tag + vr + b"\0\0" + struct.pack("<I", length) + value
    return tag + vr + struct.pack("<H", length) + value


def item(body: bytes, undefined: bool) -> bytes:
    if undefined:
        return struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + body + \
            struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body


def part10(dataset: bytes, syntax: str) -> bytes:
    ts = syntax.encode() + (b"\0" if len(syntax) % 2 else b"")
    meta = element(0x0002, 0x0010, b"UI", ts)
    group_length = element(0x0002, 0x0000, b"UL", struct.pack("<I", len(meta)))
    return b"\0" * 128 + b"DICM" + group_length + meta + dataset


def uid_value(uid: str) -> bytes:
    return uid.encode() + (b"\0" if len(uid) % 2 else b"")


@pytest.mark.parametrize("explicit", [True, False], ids=["explicit", "implicit"])
def test_nested_undefined_length_sequences_are_skipped(explicit: bool) -> None:
    inner = element(0x0008, 0x0100, b"SH", b"CODE", explicit)
    nested = element(0x0040, 0xA170, b"SQ", item(inner, True) + struct.pack(
        "<HHI", 0xFFFE, 0xE0DD, 0), explicit, undefined=True)
    first = element(0x0008, 0x1155, b"UI", uid_value("1.2.3"), explicit) + nested
    sequence = element(0x0008, 0x1140, b"SQ", item(first, True) + item(first, False)
                       + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0), explicit, undefined=True)
    dataset = (element(0x0008, 0x0060, b"CS", b"CT", explicit) + sequence
               + element(0x0020, 0x000D, b"UI", uid_value("1.2.9"), explicit)
               + element(0x0020, 0x000E, b"UI", uid_value(SERIES), explicit)
               + element(0x7FE0, 0x0010, b"OW", b"\0" * 64, explicit))
    syntax = "1.2.840.10008.1.2.1" if explicit else "1.2.840.10008.1.2"
    assert series_instance_uid(part10(dataset, syntax)) == SERIES


def test_files_made_by_pydicom_with_sequences() -> None:
    ds = pydicom.dcmread(io.BytesIO(make_dicom(3)))
    ref = Dataset()
    ref.ReferencedSOPInstanceUID = "1.2.3.4"
    ds.ReferencedImageSequence = Sequence([ref, ref])
    for implicit in (False, True):
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2" if implicit \
            else "1.2.840.10008.1.2.1"
        out = io.BytesIO()
        ds.save_as(out, implicit_vr=implicit, little_endian=True, enforce_file_format=True)
        assert series_instance_uid(out.getvalue()[:65536]) == ds.SeriesInstanceUID


@pytest.mark.parametrize("data", [
    b"", b"\0" * 200, b"\0" * 128 + b"DICM",  # not Part 10, or nothing after the preamble
    part10(element(0x0020, 0x000E, b"UI", uid_value(SERIES)), "1.2.840.10008.1.2.2"),
    part10(element(0x0020, 0x000D, b"UI", uid_value(SERIES)), "1.2.840.10008.1.2.1"),
    part10(element(0x0008, 0x1140, b"SQ", item(b"\x08\x00", True), undefined=True),
           "1.2.840.10008.1.2.1"),  # truncated inside a sequence
])
def test_what_cannot_be_read_is_none(data: bytes) -> None:
    assert series_instance_uid(data) is None
