"""BER-TLV (ISO/IEC 8825-1 8.1, ISO/IEC 7816-4:2013 5.2) and SIMPLE-TLV (7816-4 5.2.1)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccidemu.errors import DecodeError, EncodeError
from ccidemu.tlv import (
    Tlv,
    ber_decode,
    ber_decode_one,
    ber_encode,
    ber_encode_tlvs,
    ber_find,
    describe_tlv,
    simple_tlv_decode,
    simple_tlv_encode,
    tag_bytes,
)

H = bytes.fromhex

BER_VECTORS = [
    pytest.param(Tlv(0x4F, H("A0000003")), H("4F04A0000003"), id="1-byte-tag"),
    pytest.param(Tlv(0x53, b""), H("5300"), id="empty-value"),
    pytest.param(Tlv(0x5F2D, b"en"), H("5F2D02656E"), id="2-byte-tag"),
    pytest.param(Tlv(0x7F49, H("8101AA")), H("7F49038101AA"), id="2-byte-constructed"),
    pytest.param(Tlv(0x5FC105, b"\x01"), H("5FC1050101"), id="3-byte-tag-piv"),
    pytest.param(Tlv(0x53, bytes(0x7F)), H("537F") + bytes(0x7F), id="short-length-7F"),
    pytest.param(Tlv(0x53, bytes(0x80)), H("538180") + bytes(0x80), id="long-81"),
    pytest.param(Tlv(0x53, bytes(0xFF)), H("5381FF") + bytes(0xFF), id="long-81-FF"),
    pytest.param(Tlv(0x53, bytes(0x100)), H("53820100") + bytes(0x100), id="long-82"),
    pytest.param(Tlv(0x53, bytes(0x10000)), H("5383010000") + bytes(0x10000), id="long-83"),
    pytest.param(
        Tlv(0x53, bytes(0x1000000)), H("538401000000") + bytes(0x1000000), id="long-84"
    ),
]


@pytest.mark.parametrize(("tlv", "wire"), BER_VECTORS)
def test_ber_vectors(tlv: Tlv, wire: bytes) -> None:
    assert tlv.encode() == wire
    assert ber_encode(tlv.tag, tlv.value) == wire
    assert ber_decode_one(wire, max_length=1 << 25) == (tlv, len(wire))


def test_nested() -> None:
    # PIV GENERAL AUTHENTICATE template: 7C { 82 (empty), 81 challenge }
    wire = H("7C08 8200 8104 01020304")
    [outer] = ber_decode(wire)
    assert outer == Tlv(0x7C, H("8200810401020304"))
    assert outer.constructed
    assert outer.children() == [Tlv(0x82, b""), Tlv(0x81, H("01020304"))]
    assert not Tlv(0x81, b"").constructed
    assert Tlv(0x7F49, b"").constructed and Tlv(0x3F8101, b"").constructed
    assert ber_find(wire, 0x81) is None
    assert ber_find(wire, 0x81, recursive=True) == H("01020304")
    assert ber_find(wire, 0x7C) == H("8200810401020304")
    assert ber_encode_tlvs([Tlv(0x82, b""), (0x81, H("01020304"))]) == H("8200810401020304")
    assert describe_tlv(wire).splitlines() == [
        "7C (8 bytes, constructed)", "  82 (0 bytes): ", "  81 (4 bytes): 01020304",
    ]


def test_sequence_and_offsets() -> None:
    data = H("4F01AA 5F2D00 5FC10101BB")
    tlvs = ber_decode(data)
    assert [t.tag for t in tlvs] == [0x4F, 0x5F2D, 0x5FC101]
    assert ber_decode_one(data, 3) == (Tlv(0x5F2D, b""), 6)
    assert ber_decode(b"") == []


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(H("5380"), id="indefinite-length"),
        pytest.param(H("5385 0000000001 00"), id="5-length-bytes"),
        pytest.param(H("5F8181 01 00"), id="4-byte-tag"),
        pytest.param(H("5F"), id="tag-truncated"),
        pytest.param(H("5FC1"), id="3-byte-tag-truncated"),
        pytest.param(H("53"), id="no-length"),
        pytest.param(H("5382 01"), id="length-truncated"),
        pytest.param(H("5303 0102"), id="value-past-data"),
        pytest.param(H("4F01AA 53"), id="second-object-truncated"),
    ],
)
def test_ber_malformed(wire: bytes) -> None:
    with pytest.raises(DecodeError):
        ber_decode(wire)


def test_ber_cap() -> None:
    with pytest.raises(DecodeError, match="cap"):
        ber_decode_one(H("5384FFFFFFFF"), max_length=1000)


@pytest.mark.parametrize("tag", [0x5F8181FF, 0x5F, 0x4F5F, 0x5F0101, -1])
def test_bad_tags_refused(tag: int) -> None:
    with pytest.raises(EncodeError):
        tag_bytes(tag)


SIMPLE_VECTORS = [
    pytest.param(1, b"", "big", H("0100"), id="empty"),
    pytest.param(0x70, b"abc", "big", H("7003616263"), id="short"),
    pytest.param(0x71, bytes(0xFE), "big", H("71FE") + bytes(0xFE), id="FE"),
    pytest.param(0x71, bytes(0xFF), "big", H("71FF00FF") + bytes(0xFF), id="FF-big"),
    pytest.param(0x71, bytes(0x123), "big", H("71FF0123") + bytes(0x123), id="3-byte-big"),
    # libcacard (CAC, GSC-IS) writes the two length bytes little-endian
    pytest.param(0x71, bytes(0x123), "little", H("71FF2301") + bytes(0x123), id="3-byte-cac"),
]


@pytest.mark.parametrize(("tag", "value", "order", "wire"), SIMPLE_VECTORS)
def test_simple_tlv_vectors(tag: int, value: bytes, order: str, wire: bytes) -> None:
    assert simple_tlv_encode(tag, value, byteorder=order) == wire  # type: ignore[arg-type]
    assert simple_tlv_decode(wire, byteorder=order) == [Tlv(tag, value)]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "wire",
    [H("00 01 AA"), H("FF 01 AA"), H("01"), H("01 FF 01"), H("01 03 AA"), H("01 FF 0003 AA")],
)
def test_simple_tlv_malformed(wire: bytes) -> None:
    with pytest.raises(DecodeError):
        simple_tlv_decode(wire)


def test_simple_tlv_unencodable() -> None:
    for tag in (0, 0xFF, 0x100):
        with pytest.raises(EncodeError):
            simple_tlv_encode(tag, b"")
    with pytest.raises(EncodeError):
        simple_tlv_encode(1, bytes(0x10000))


# --- properties -------------------------------------------------------------------------

tags = st.one_of(
    st.integers(0, 0xFF).filter(lambda b: b & 0x1F != 0x1F),
    st.builds(lambda a, b: (a << 8) | b,
              st.integers(0, 7).map(lambda c: (c << 5) | 0x1F), st.integers(0, 0x7F)),
    st.builds(lambda a, b, c: (a << 16) | (b << 8) | c,
              st.integers(0, 7).map(lambda c: (c << 5) | 0x1F),
              st.integers(0x80, 0xFF), st.integers(0, 0x7F)),
)


@settings(max_examples=200)
@given(st.lists(st.tuples(tags, st.binary(max_size=300)), max_size=5))
def test_ber_round_trip(items: list[tuple[int, bytes]]) -> None:
    wire = ber_encode_tlvs(items)
    assert ber_decode(wire) == [Tlv(t, v) for t, v in items]


@settings(max_examples=200)
@given(st.lists(st.tuples(st.integers(1, 0xFE), st.binary(max_size=300)), max_size=5),
       st.sampled_from(["big", "little"]))
def test_simple_round_trip(items: list[tuple[int, bytes]], order: str) -> None:
    wire = b"".join(
        simple_tlv_encode(t, v, byteorder=order) for t, v in items  # type: ignore[arg-type]
    )
    assert simple_tlv_decode(wire, byteorder=order) == [  # type: ignore[arg-type]
        Tlv(t, v) for t, v in items
    ]


@settings(max_examples=200)
@given(st.binary(max_size=64))
def test_garbage_raises_only_decode_error(data: bytes) -> None:
    for decode in (ber_decode, simple_tlv_decode, describe_tlv):
        with contextlib.suppress(DecodeError):
            decode(data)
    try:
        tlvs = ber_decode(data)
    except DecodeError:
        return
    again = ber_encode_tlvs(tlvs)  # shortest lengths: never longer than the input
    assert len(again) <= len(data)
    assert ber_decode(again) == tlvs
