"""The SeriesInstanceUID of a DICOM file, from its first bytes (pure; no I/O).

Series prefetch needs one attribute of an attachment it has just fetched, so this reads the
Part-10 header (explicit VR little endian), then the data set in the transfer syntax it names
(explicit or implicit VR little endian), skipping sequences of any nesting, and stops at
(0020,000E) or at the first tag past it. Anything else (not Part 10, big endian, deflated,
truncated before the attribute) answers None: prefetch is an optimisation and gives up.
"""

from __future__ import annotations

import struct

SERIES_INSTANCE_UID = 0x0020000E
IMPLICIT_LE = "1.2.840.10008.1.2"
UNREADABLE = {"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}  # big endian, deflated
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF
_MAX_DEPTH = 16


class _Truncated(Exception):
    pass


def _header(buf: bytes, pos: int, explicit: bool) -> tuple[int, int, int]:
    """(tag, value length, offset of the value) of the element at `pos`."""
    if pos + 8 > len(buf):
        raise _Truncated
    group, element = struct.unpack_from("<HH", buf, pos)
    tag = group << 16 | element
    if group == 0xFFFE or not explicit:
        return tag, struct.unpack_from("<I", buf, pos + 4)[0], pos + 8
    vr = buf[pos + 4:pos + 6]
    if vr in _LONG_VRS:
        if pos + 12 > len(buf):
            raise _Truncated
        return tag, struct.unpack_from("<I", buf, pos + 8)[0], pos + 12
    return tag, struct.unpack_from("<H", buf, pos + 6)[0], pos + 8


def _skip_undefined(buf: bytes, pos: int, explicit: bool, depth: int) -> int:
    """The offset after the items of an undefined-length value that starts at `pos`."""
    if depth > _MAX_DEPTH:
        raise _Truncated
    while True:
        tag, length, value = _header(buf, pos, explicit)
        if tag == _SEQUENCE_END:
            return value
        if tag != _ITEM:
            raise _Truncated  # not a sequence of items (e.g. encapsulated pixel data)
        if length != UNDEFINED:
            pos = value + length
            continue
        pos = value
        while True:  # the item's elements, up to its delimiter
            tag, length, value = _header(buf, pos, explicit)
            if tag == _ITEM_END:
                pos = value
                break
            pos = (_skip_undefined(buf, value, explicit, depth + 1) if length == UNDEFINED
                   else value + length)


def series_instance_uid(head: bytes) -> str | None:
    """The SeriesInstanceUID in `head` (the file's first bytes), or None."""
    if len(head) < 132 or head[128:132] != b"DICM":
        return None
    try:
        pos, syntax = 132, None
        while True:
            tag, length, value = _header(head, pos, True)
            if tag >> 16 != 0x0002:
                break
            if tag == 0x00020010:
                syntax = head[value:value + length].rstrip(b"\0 ").decode("ascii", "replace")
            pos = value + length
        if syntax is None or syntax in UNREADABLE:
            return None
        explicit = syntax != IMPLICIT_LE
        while True:
            tag, length, value = _header(head, pos, explicit)
            if tag == SERIES_INSTANCE_UID:
                if value + length > len(head):
                    return None
                uid = head[value:value + length].rstrip(b"\0 ").decode("ascii", "replace")
                return uid or None
            if tag > SERIES_INSTANCE_UID:
                return None
            pos = (_skip_undefined(head, value, explicit, 0) if length == UNDEFINED
                   else value + length)
    except _Truncated:
        return None
