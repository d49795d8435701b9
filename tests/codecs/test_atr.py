"""ATR: ISO/IEC 7816-3:2006 section 8.2; QEMU ccid-card-passthru's ATR check."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccidemu.atr import (
    Atr,
    InterfaceBytes,
    build_atr,
    compute_tck,
    describe_atr,
    parse_atr,
    qemu_accepts,
)
from ccidemu.card import BuiltinTestCard
from ccidemu.errors import DecodeError, EncodeError

H = bytes.fromhex
IB = InterfaceBytes

TRACE_HIST = H("804F0CA000000306030001000000 00")

VECTORS = [
    # docs/PROTOCOL.md, "VSCard": the ATR sent to QEMU in the observed session.
    # T0=8F: TD1 only, K=15; TD1=80: T=0, TD2 follows; TD2=01: T=1 -> TCK required.
    pytest.param(
        Atr(0x3B, 0x8F, (IB(td=0x80), IB(td=0x01)), TRACE_HIST, 0x6A),
        H("3b8f8001804f0ca000000306030001000000006a"),
        {0, 1}, id="qemu-trace",
    ),
    # docs/PROTOCOL.md, "Real clients": libcacard's CAC ATR; TA1 TB1 TC1, T=0 only, no TCK.
    pytest.param(
        Atr(0x3B, 0x7A, (IB(0x18, 0x00, 0x00),), b"sfte cd144", None),
        H("3B 7A 18 00 00 73 66 74 65 20 63 64 31 34 34"),
        {0}, id="cac",
    ),
    # ccidemu/card.py BuiltinTestCard: no interface bytes, 10 historical bytes.
    pytest.param(
        Atr(0x3B, 0x0A, (), b"ccidemu-TC", None),
        BuiltinTestCard.ATR,
        {0}, id="builtin-test-card",
    ),
    # A T=1 card: T0=F8 (TA1 TB1 TC1 TD1, K=8), TD1=81 (T=1, TD2 follows),
    # TD2=31 (T=1, TA3 TB3: IFSC=FE, BWI=1 CWI=5), TCK required (8.2.5).
    pytest.param(
        Atr(0x3B, 0xF8, (IB(0x13, 0x00, 0x00, 0x81), IB(td=0x31), IB(0xFE, 0x15)),
            H("597562696B657934"), 0xD4),
        H("3BF813000081 31 FE15 597562696B657934 D4"),
        {1}, id="t1-with-tck",
    ),
    # Inverse convention TS, T=0 only.
    pytest.param(
        Atr(0x3F, 0x00, (), b"", None), H("3F00"), {0}, id="inverse-empty",
    ),
]


@pytest.mark.parametrize(("atr", "wire", "protocols"), VECTORS)
def test_atr_vectors(atr: Atr, wire: bytes, protocols: set[int]) -> None:
    assert parse_atr(wire) == atr
    assert atr.encode() == wire
    assert atr.protocols == protocols
    assert qemu_accepts(wire) is None
    levels = [IB(lvl.ta, lvl.tb, lvl.tc, lvl.td) for lvl in atr.interface]
    assert build_atr(atr.ts, levels, atr.historical) == atr


def test_tck_value() -> None:
    wire = H("3b8f8001804f0ca000000306030001000000006a")
    assert compute_tck(wire[:-1]) == 0x6A
    assert compute_tck(wire) == 0  # XOR of T0..TCK is zero (8.2.5)


def test_build_with_protocols() -> None:
    atr = build_atr(historical=TRACE_HIST, protocols=[0, 1])
    assert atr.encode() == H("3b8f8001804f0ca000000306030001000000006a")
    assert build_atr(protocols=[1]).encode() == H("3B 80 01 81")
    assert build_atr(interface=[IB(ta=0x96)]).encode() == H("3B 10 96")
    with pytest.raises(EncodeError):
        build_atr(historical=bytes(16))
    with pytest.raises(EncodeError):
        build_atr(ts=0x3C)
    with pytest.raises(EncodeError):
        build_atr(interface=[IB(ta=1), IB(ta=2)])  # level 1 has no TD
    with pytest.raises(EncodeError):
        build_atr(interface=[IB(td=0x01)], protocols=[0])


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(b"", id="empty"),
        pytest.param(H("3C00"), id="bad-TS"),
        pytest.param(H("3B"), id="no-T0"),
        pytest.param(H("3B0A636369"), id="historical-truncated"),
        pytest.param(H("3B7A1800"), id="interface-truncated"),
        pytest.param(H("3b8f8001804f0ca000000306030001000000006b"), id="bad-TCK"),
        pytest.param(H("3b8f8001804f0ca000000306030001000000 00"), id="TCK-missing"),
        pytest.param(H("3B0A") + b"ccidemu-TC" + b"\x00", id="trailing-byte"),
        pytest.param(H("3B0F") + bytes(15) + bytes(17), id="over-33-bytes"),
    ],
)
def test_malformed_atrs(wire: bytes) -> None:
    with pytest.raises(DecodeError):
        parse_atr(wire)


def test_qemu_rules() -> None:
    # Facts from QEMU hw/usb/ccid-card-passthru.c's ATR check.
    assert qemu_accepts(H("3B0A") + bytes(10)) is None
    assert qemu_accepts(H("3B0A") + bytes(9)) is not None  # shorter than K announces
    assert qemu_accepts(H("3B0A") + bytes(11)) is None  # longer is let through
    assert "3C" in (qemu_accepts(H("3C00")) or "")
    assert qemu_accepts(b"\x3b") is not None
    assert "40" in (qemu_accepts(H("3B0F") + bytes(39)) or "")
    assert qemu_accepts(H("3B0F") + bytes(38)) is None  # 40 bytes: accepted by QEMU
    # The 34-byte ATR is over ISO's 33 but QEMU lets it through.
    assert qemu_accepts(H("3B0F") + bytes(32)) is None
    # TD1 announces TA2 that is missing: QEMU reads the Y nibble from the byte after TD1
    # (here the first historical byte 00 -> nothing more), so it only counts TA1 TD1.
    assert qemu_accepts(H("3B 91 11 10") + H("AA")) is None
    # The loop only runs while 2 + K + counted bytes < length: here it never runs.
    assert qemu_accepts(H("3B 91 11")) is None


def test_qemu_refuses_some_valid_iso_atrs() -> None:
    # A valid T=1 ATR (TD1=01, K=1, TCK): QEMU takes Y2 from the historical byte 50
    # (TA2, TC2 "present"), counts 3 interface bytes and finds the ATR too short.
    wire = H("3B 81 01 50 D0")
    assert parse_atr(wire).protocols == {1}
    assert "inconsistent" in (qemu_accepts(wire) or "")
    # With a historical byte whose high nibble is 0 the same shape is accepted.
    assert qemu_accepts(build_atr(protocols=[1], historical=b"\x05").encode()) is None


def test_describe() -> None:
    text = describe_atr(parse_atr(H("3b8f8001804f0ca000000306030001000000006a")))
    assert "direct convention" in text
    assert "protocols: T=0, T=1" in text
    assert "TCK = 6A" in text
    assert "QEMU ccid-card-passthru: accepts" in text
    text = describe_atr(parse_atr(H("3B 7A 18 00 00 73 66 74 65 20 63 64 31 34 34")))
    assert "Fi=372 (fmax 5 MHz), Di=12" in text
    assert '"sfte cd144"' in text
    text = describe_atr(parse_atr(BuiltinTestCard.ATR))
    assert '"ccidemu-TC"' in text and "Fi=372, Di=1 by default" in text
    t1 = describe_atr(parse_atr(H("3BF813000081 31 FE15 597562696B657934 D4")))
    assert "T=1 IFSC=254" in t1 and "BWI=1, CWI=5" in t1


# --- properties ---------------------------------------------------------------------------

opt = st.one_of(st.none(), st.integers(0, 255))
levels = st.lists(st.builds(IB, opt, opt, opt, st.integers(0, 15)), max_size=4)


@settings(max_examples=200)
@given(st.sampled_from([0x3B, 0x3F]), levels, st.binary(max_size=15),
       st.booleans())
def test_build_parse_round_trip(
    ts: int, lvls: list[InterfaceBytes], hist: bytes, drop_last_td: bool
) -> None:
    if lvls and drop_last_td:
        last = lvls[-1]
        lvls[-1] = IB(last.ta, last.tb, last.tc, None)
    try:
        atr = build_atr(ts, lvls, hist)
    except EncodeError:
        return  # over 33 bytes
    wire = atr.encode()
    assert parse_atr(wire) == atr
    reason = qemu_accepts(wire)
    assert reason is None or "inconsistent" in reason  # QEMU's quirks, never a crash


@settings(max_examples=200)
@given(st.binary(max_size=40))
def test_garbage_raises_only_decode_error(data: bytes) -> None:
    try:
        atr = parse_atr(data)
    except DecodeError:
        pass
    else:
        assert atr.encode() == data
        describe_atr(atr)
    reason = qemu_accepts(data)
    assert reason is None or isinstance(reason, str)
