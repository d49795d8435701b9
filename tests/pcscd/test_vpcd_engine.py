"""ccidemu.vpcd: vpcd framing (vsmartcard vpcd.c) and the card slot, without sockets."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccidemu.card import BuiltinTestCard
from ccidemu.errors import CardError, DecodeError, EncodeError
from ccidemu.vpcd import (
    MAX_PAYLOAD,
    GetAtr,
    PowerOff,
    PowerOn,
    Reset,
    Transmit,
    VpcdCardSlot,
    VpcdConnection,
    VpcdControl,
    VpcdEvent,
    decode_frame,
    encode_frame,
)

# vpcd.c sendToVICC: u16 big-endian length, then the payload; vpcd.h VPCD_CTRL_* control bytes.
VECTORS = [
    pytest.param(PowerOff(), "0001 00", id="ctrl-power-off"),
    pytest.param(PowerOn(), "0001 01", id="ctrl-power-on"),
    pytest.param(Reset(), "0001 02", id="ctrl-reset"),
    pytest.param(GetAtr(), "0001 04", id="ctrl-get-atr"),
    pytest.param(Transmit(bytes.fromhex("00a4040009a00000030800001000")),
                 "000e 00a4040009a00000030800001000", id="select-piv"),
    pytest.param(Transmit(b"\x03"), "0001 03", id="one-byte-apdu-not-control"),
    pytest.param(Transmit(b"\x80\xe4\x00\x00"), "0004 80e40000", id="case1-apdu"),
    pytest.param(Transmit(b"\x00" * 0x0105), "0105" + "00" * 0x105, id="long-length-be"),
]


@pytest.mark.parametrize(("event", "wire"), VECTORS)
def test_decode_vectors(event: VpcdEvent, wire: str) -> None:
    data = bytes.fromhex(wire.replace(" ", ""))
    assert decode_frame(data) == (event, len(data))
    conn = VpcdConnection()
    conn.receive_data(data)
    assert conn.next_event() == event
    assert conn.next_event() is None


def test_control_codes_match_vpcd_h() -> None:
    assert [int(c) for c in VpcdControl] == [0x00, 0x01, 0x02, 0x04]


@pytest.mark.parametrize(
    ("payload", "wire"),
    [
        (b"\x90\x00", "00029000"),
        (BuiltinTestCard.ATR, "000c 3b0a 6363696465 6d752d5443"),
        (b"", "0000"),
    ],
    ids=["rapdu-9000", "atr", "empty-atr-no-card"],
)
def test_encode_vectors(payload: bytes, wire: str) -> None:
    assert encode_frame(payload) == bytes.fromhex(wire.replace(" ", ""))
    assert VpcdConnection().send(payload) == encode_frame(payload)


def test_encode_rejects_oversize() -> None:
    encode_frame(b"\x00" * MAX_PAYLOAD)
    with pytest.raises(EncodeError):
        encode_frame(b"\x00" * (MAX_PAYLOAD + 1))


@pytest.mark.parametrize(
    ("wire", "why"),
    [("", "empty"), ("00", "half a length"), ("0003 0102", "truncated"), ("0000", "zero length")],
)
def test_decode_frame_errors(wire: str, why: str) -> None:
    with pytest.raises(DecodeError):
        decode_frame(bytes.fromhex(wire.replace(" ", "")))


def test_cap_rejected_before_payload_and_stream_dies() -> None:
    conn = VpcdConnection(max_length=300)
    conn.receive_data(b"\x01\x2d")  # 301 announced: rejected on the two length bytes alone
    with pytest.raises(DecodeError):
        conn.next_event()
    assert conn.buffered == 0
    with pytest.raises(DecodeError):
        conn.receive_data(b"\x00\x01\x04")
    with pytest.raises(DecodeError):
        conn.next_event()


def test_zero_length_frame_is_an_error_in_stream() -> None:
    conn = VpcdConnection()
    conn.receive_data(b"\x00\x00")
    with pytest.raises(DecodeError):
        conn.next_event()


def test_waits_for_complete_frame() -> None:
    conn = VpcdConnection()
    conn.receive_data(b"\x00\x05\x80\xe0")
    assert conn.next_event() is None
    assert conn.buffered == 4
    conn.receive_data(b"\x00\x00\x00\x00\x01\x04")
    assert conn.next_event() == Transmit(b"\x80\xe0\x00\x00\x00")
    assert conn.next_event() == GetAtr()
    assert conn.next_event() is None


events = st.one_of(
    st.sampled_from([PowerOff(), PowerOn(), Reset(), GetAtr()]),
    st.binary(min_size=2, max_size=300).map(Transmit),
    st.sampled_from([0x03, 0x05, 0xFF]).map(lambda b: Transmit(bytes([b]))),
)


def _wire(event: VpcdEvent) -> bytes:
    if isinstance(event, Transmit):
        return encode_frame(event.apdu)
    control = {PowerOff: 0, PowerOn: 1, Reset: 2, GetAtr: 4}[type(event)]
    return encode_frame(bytes([control]))


@settings(max_examples=150, deadline=None)
@given(st.lists(events, max_size=8), st.data())
def test_any_chunking_yields_same_events(evs: list[VpcdEvent], data: st.DataObject) -> None:
    stream = b"".join(_wire(e) for e in evs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    conn = VpcdConnection()
    got: list[VpcdEvent] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        conn.receive_data(stream[start:cut])
        start = cut
        while (ev := conn.next_event()) is not None:
            got.append(ev)
    assert got == evs
    assert conn.buffered == 0


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.integers(1, MAX_PAYLOAD))
def test_garbage_raises_only_decode_error(data: bytes, cap: int) -> None:
    with contextlib.suppress(DecodeError):
        decode_frame(data, cap)
    conn = VpcdConnection(max_length=cap)
    try:
        conn.receive_data(data)
        while conn.next_event() is not None:
            pass
    except DecodeError:
        pass


# --- the card slot: vpcd events applied to a card -------------------------------------------


class _CountingCard(BuiltinTestCard):
    def __init__(self) -> None:
        super().__init__()
        self.power_ons = 0
        self.power_offs = 0

    def power_on(self) -> bytes:
        self.power_ons += 1
        return super().power_on()

    def power_off(self) -> None:
        self.power_offs += 1
        super().power_off()


def test_slot_power_cycle_like_a_reader() -> None:
    card = _CountingCard()
    slot = VpcdCardSlot(card)
    # pcscd's presence poll: the first GET ATR "inserts" (powers) the card once...
    assert slot.handle(GetAtr()) == encode_frame(BuiltinTestCard.ATR)
    assert slot.handle(GetAtr()) == encode_frame(BuiltinTestCard.ATR)
    assert card.power_ons == 1  # ...later polls do not reset it
    assert slot.handle(PowerOn()) == b""  # no answer: vpcd asks GET ATR next
    assert slot.handle(Reset()) == b""
    assert card.power_ons == 3
    assert slot.handle(Transmit(bytes.fromhex("80e00000026869"))) == bytes.fromhex("00046869 9000")
    assert slot.handle(PowerOff()) == b""
    assert (card.power_offs, card.powered, slot.powered) == (1, False, False)
    # an APDU on an unpowered card powers it first (pcscd never does this; be robust)
    assert slot.handle(Transmit(bytes.fromhex("80e4000004"))) == bytes.fromhex("0006 00000002 9000")
    assert card.powered


def test_one_byte_apdu_gets_an_answer() -> None:
    slot = VpcdCardSlot(BuiltinTestCard())
    assert slot.handle(Transmit(b"\x03")) == bytes.fromhex("0002 6700")


class _BrokenCard(BuiltinTestCard):
    def __init__(self, fail_with: type[Exception]) -> None:
        super().__init__()
        self.fail_with = fail_with

    def transmit(self, apdu: bytes) -> bytes:
        raise self.fail_with("card bug")


@pytest.mark.parametrize("exc", [RuntimeError, CardError, ZeroDivisionError])
def test_card_exception_answers_6f00(exc: type[Exception]) -> None:
    card = _BrokenCard(exc)
    slot = VpcdCardSlot(card)
    slot.handle(PowerOn())
    assert slot.handle(Transmit(b"\x00\xa4\x04\x00")) == bytes.fromhex("0002 6f00")


class _HugeAnswerCard(BuiltinTestCard):
    def transmit(self, apdu: bytes) -> bytes:
        return b"\x00" * (MAX_PAYLOAD + 1)


def test_unframeable_answer_becomes_6f00() -> None:
    slot = VpcdCardSlot(_HugeAnswerCard())
    assert slot.handle(Transmit(b"\x00\xb0\x00\x00\x00")) == bytes.fromhex("0002 6f00")
