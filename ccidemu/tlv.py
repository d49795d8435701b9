"""BER-TLV and SIMPLE-TLV data objects.

BER-TLV: ISO/IEC 8825-1 section 8.1 as profiled by ISO/IEC 7816-4:2013 section 5.2
(and 6.3): tag fields of 1 to 3 bytes (first byte: class b8-b7, constructed b6,
number b5-b1, ``1F`` = more tag bytes follow; each following byte has b8 = 1 when
another follows), definite lengths only (``00``-``7F`` short form, ``81``-``84``
then 1 to 4 length bytes).  Tags are handled as plain ints of their wire bytes:
``0x5FC105`` is the three bytes ``5F C1 05``.

SIMPLE-TLV: ISO/IEC 7816-4:2013 section 5.2.1: a one-byte tag ``01``-``FE`` and a
length of one byte ``00``-``FE``, or ``FF`` followed by two bytes.  ISO writes the
two bytes big-endian; libcacard's CAC emulation (GSC-IS) writes them little-endian,
hence the ``byteorder`` parameter.

Hand-written: TLV walking is a loop over variable-length fields, simpler and faster
than a construct grammar.  Every decoder raises only DecodeError.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from ccidemu._wire import DEFAULT_MAX_LENGTH
from ccidemu.errors import DecodeError, EncodeError

ByteOrder = Literal["big", "little"]

#: Largest BER length this codec handles: four length bytes (ISO/IEC 7816-4 5.2).
MAX_BER_LENGTH_BYTES = 4
MAX_TAG_BYTES = 3


def tag_bytes(tag: int) -> bytes:
    """The wire bytes of a BER tag int, checked for a well-formed 1-3 byte tag field."""
    if tag < 0:
        raise EncodeError(f"BER tag {tag} is negative")
    size = max(1, (tag.bit_length() + 7) // 8)
    if size > MAX_TAG_BYTES:
        raise EncodeError(f"BER tag {tag:X} is longer than {MAX_TAG_BYTES} bytes")
    raw = tag.to_bytes(size, "big")
    if (raw[0] & 0x1F == 0x1F) != (size > 1):
        raise EncodeError(f"BER tag {tag:X}: first byte number bits and tag length disagree")
    if any(b & 0x80 == 0 for b in raw[1:-1]) or (size > 1 and raw[-1] & 0x80):
        raise EncodeError(f"BER tag {tag:X}: continuation bits (b8) are inconsistent")
    return raw


def tag_is_constructed(tag: int) -> bool:
    """b6 of the first tag byte (ISO/IEC 8825-1 8.1.2.5)."""
    size = max(1, (tag.bit_length() + 7) // 8)
    return bool((tag >> (8 * (size - 1))) & 0x20)


def ber_length(length: int) -> bytes:
    """A definite BER length field, shortest form (ISO/IEC 8825-1 8.1.3)."""
    if length < 0:
        raise EncodeError(f"negative length {length}")
    if length < 0x80:
        return bytes((length,))
    size = (length.bit_length() + 7) // 8
    if size > MAX_BER_LENGTH_BYTES:
        raise EncodeError(f"length {length} needs more than {MAX_BER_LENGTH_BYTES} bytes")
    return bytes((0x80 | size,)) + length.to_bytes(size, "big")


@dataclass(frozen=True, slots=True)
class Tlv:
    """One data object: ``tag`` as the int of its wire bytes and the raw ``value``."""

    tag: int
    value: bytes

    @property
    def constructed(self) -> bool:
        """True when the value is itself a sequence of BER-TLV objects."""
        return tag_is_constructed(self.tag)

    def children(self) -> list[Tlv]:
        """The nested objects of a constructed value.  DecodeError if they do not parse."""
        return ber_decode(self.value)

    def encode(self) -> bytes:
        return ber_encode(self.tag, self.value)


def ber_encode(tag: int, value: bytes) -> bytes:
    """Tag, length and value (ISO/IEC 7816-4:2013 section 5.2)."""
    return tag_bytes(tag) + ber_length(len(value)) + value


def ber_encode_tlvs(items: Iterable[Tlv | tuple[int, bytes]]) -> bytes:
    """The concatenation of several BER-TLV objects."""
    out = bytearray()
    for item in items:
        tag, value = (item.tag, item.value) if isinstance(item, Tlv) else item
        out += ber_encode(tag, value)
    return bytes(out)


def ber_decode_one(
    data: bytes, offset: int = 0, *, max_length: int = DEFAULT_MAX_LENGTH
) -> tuple[Tlv, int]:
    """Decode the object starting at ``offset``; returns it and the offset just after it.

    With the default ``offset=0`` the second item is the number of bytes consumed.
    """
    n = len(data)
    pos = offset
    if pos >= n:
        raise DecodeError("BER-TLV: no tag byte", offset=pos)
    tag = data[pos]
    pos += 1
    if tag & 0x1F == 0x1F:  # more tag bytes follow (8825-1 8.1.2.4)
        while True:
            if pos >= n:
                raise DecodeError("BER-TLV: tag field truncated", offset=pos)
            b = data[pos]
            tag = (tag << 8) | b
            pos += 1
            if pos - offset > MAX_TAG_BYTES:
                raise DecodeError(
                    f"BER-TLV: tag longer than {MAX_TAG_BYTES} bytes", offset=offset
                )
            if not b & 0x80:
                break
    if pos >= n:
        raise DecodeError(f"BER-TLV: tag {tag:X} has no length field", offset=pos)
    first = data[pos]
    pos += 1
    if first < 0x80:
        length = first
    elif first == 0x80:
        raise DecodeError("BER-TLV: indefinite length (80) is not allowed", offset=pos - 1)
    else:
        size = first & 0x7F
        if size > MAX_BER_LENGTH_BYTES:
            raise DecodeError(
                f"BER-TLV: length field of {size} bytes (at most {MAX_BER_LENGTH_BYTES})",
                offset=pos - 1,
            )
        if pos + size > n:
            raise DecodeError("BER-TLV: length field truncated", offset=pos)
        length = int.from_bytes(data[pos : pos + size], "big")
        pos += size
    if length > max_length:
        raise DecodeError(
            f"BER-TLV: length {length} exceeds the cap of {max_length}", offset=pos
        )
    end = pos + length
    if end > n:
        raise DecodeError(
            f"BER-TLV: tag {tag:X} length {length} runs past the data "
            f"({n - pos} bytes left)",
            offset=pos,
        )
    return Tlv(tag, bytes(data[pos:end])), end


def ber_iter(data: bytes) -> Iterator[Tlv]:
    """Decode a sequence of objects lazily."""
    pos = 0
    n = len(data)
    while pos < n:
        tlv, pos = ber_decode_one(data, pos)
        yield tlv


def ber_decode(data: bytes) -> list[Tlv]:
    """Decode a whole sequence of BER-TLV objects (empty data -> empty list)."""
    return list(ber_iter(data))


def ber_find(data: bytes, tag: int, *, recursive: bool = False) -> bytes | None:
    """The value of the first object with ``tag`` at the top level of ``data``.

    With ``recursive=True`` constructed objects are searched depth-first too.
    Returns None when absent; DecodeError when ``data`` does not parse.
    """
    for tlv in ber_iter(data):
        if tlv.tag == tag:
            return tlv.value
        if recursive and tlv.constructed:
            found = ber_find(tlv.value, tag, recursive=True)
            if found is not None:
                return found
    return None


# --- SIMPLE-TLV (ISO/IEC 7816-4:2013 section 5.2.1) -----------------------------------


def simple_tlv_encode(tag: int, value: bytes, *, byteorder: ByteOrder = "big") -> bytes:
    """One SIMPLE-TLV object: tag 01-FE, length 00-FE or FF + two bytes."""
    if not 0x01 <= tag <= 0xFE:
        raise EncodeError(f"SIMPLE-TLV tag {tag!r} outside 01-FE")
    length = len(value)
    if length < 0xFF:
        return bytes((tag, length)) + value
    if length > 0xFFFF:
        raise EncodeError(f"SIMPLE-TLV value of {length} bytes exceeds 65535")
    return bytes((tag, 0xFF)) + length.to_bytes(2, byteorder) + value


def simple_tlv_encode_all(
    items: Iterable[Tlv | tuple[int, bytes]], *, byteorder: ByteOrder = "big"
) -> bytes:
    """The concatenation of several SIMPLE-TLV objects."""
    out = bytearray()
    for item in items:
        tag, value = (item.tag, item.value) if isinstance(item, Tlv) else item
        out += simple_tlv_encode(tag, value, byteorder=byteorder)
    return bytes(out)


def simple_tlv_decode(data: bytes, *, byteorder: ByteOrder = "big") -> list[Tlv]:
    """Decode a sequence of SIMPLE-TLV objects.  DecodeError on a bad tag or length."""
    out: list[Tlv] = []
    pos, n = 0, len(data)
    while pos < n:
        start = pos
        tag = data[pos]
        if tag in (0x00, 0xFF):
            raise DecodeError(f"SIMPLE-TLV tag {tag:02X} is not allowed", offset=pos)
        if pos + 1 >= n:
            raise DecodeError("SIMPLE-TLV: length field missing", offset=pos + 1)
        length = data[pos + 1]
        pos += 2
        if length == 0xFF:
            if pos + 2 > n:
                raise DecodeError("SIMPLE-TLV: 3-byte length field truncated", offset=pos)
            length = int.from_bytes(data[pos : pos + 2], byteorder)
            pos += 2
        if pos + length > n:
            raise DecodeError(
                f"SIMPLE-TLV: tag {tag:02X} length {length} runs past the data", offset=start
            )
        out.append(Tlv(tag, bytes(data[pos : pos + length])))
        pos += length
    return out


def describe_tlv(data: bytes, indent: str = "  ") -> str:
    """A tree view of BER-TLV ``data``, one object per line; values as hex.

    Constructed objects whose value parses are expanded; others are shown flat.
    """
    lines: list[str] = []

    def walk(tlvs: Iterable[Tlv], depth: int) -> None:
        for tlv in tlvs:
            pad = indent * depth
            if tlv.constructed:
                try:
                    kids = tlv.children()
                except DecodeError:
                    kids = None
                if kids is not None:
                    lines.append(f"{pad}{tlv.tag:X} ({len(tlv.value)} bytes, constructed)")
                    walk(kids, depth + 1)
                    continue
            lines.append(f"{pad}{tlv.tag:X} ({len(tlv.value)} bytes): {tlv.value.hex().upper()}")

    walk(ber_iter(data), 0)
    return "\n".join(lines)
