"""T=1 blocks (ISO/IEC 7816-3:2006 section 11, ccidemu.t1): vectors, the block codec's error
contract, and the interface's side of the protocol against a scripted card."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ccidemu.errors import DecodeError
from ccidemu.t1 import (
    Block,
    BlockKind,
    SKind,
    T1Error,
    T1Protocol,
    T1Send,
    decode_block,
    i_block,
    lrc,
    r_block,
    s_block,
)

H = bytes.fromhex

VECTORS = [  # section 11.3: NAD PCB LEN INF LRC
    pytest.param(i_block(0, H("00A4040000")), H("0000 05 00A4040000 A5"), id="I(0)"),
    pytest.param(i_block(1, H("0102"), more=True), H("0060 02 0102 61"), id="I(1,M)"),
    pytest.param(r_block(1), H("0090 00 90"), id="R(1)"),
    pytest.param(r_block(0, 1), H("0081 00 81"), id="R(0) EDC error"),
    pytest.param(r_block(1, 2), H("0092 00 92"), id="R(1) other error"),
    pytest.param(s_block(SKind.IFS, inf=H("FE")), H("00C1 01 FE 3E"), id="S(IFS request 254)"),
    pytest.param(s_block(SKind.IFS, True, H("FE")), H("00E1 01 FE 1E"), id="S(IFS response)"),
    pytest.param(s_block(SKind.WTX, inf=H("02")), H("00C3 01 02 C0"), id="S(WTX request)"),
    pytest.param(s_block(SKind.RESYNCH), H("00C0 00 C0"), id="S(RESYNCH request)"),
    pytest.param(s_block(SKind.ABORT, True), H("00E2 00 E2"), id="S(ABORT response)"),
]


@pytest.mark.parametrize(("block", "wire"), VECTORS)
def test_vectors(block: Block, wire: bytes) -> None:
    assert block.encode() == wire
    assert decode_block(wire) == block


def test_pcb_fields() -> None:
    assert i_block(1, b"", more=True).kind is BlockKind.I
    assert i_block(1, b"", more=True).ns == 1 and i_block(1, b"", True).more
    assert r_block(1, 2).kind is BlockKind.R and r_block(1, 2).nr == 1
    assert r_block(1, 2).error == 2
    block = s_block(SKind.WTX, True, H("05"))
    assert block.kind is BlockKind.S and block.response and block.s_kind == SKind.WTX
    assert Block(0, 0xDF).s_kind == 0x1F  # unknown S type: a plain int
    assert lrc(H("00C101FE")) == 0x3E


@pytest.mark.parametrize(("wire", "text"), [
    (H("000000"), "at least 4"),
    (H("0000FF00"), "reserved"),
    (H("00000201 03"), "LEN says"),
    (H("0000 00 01"), "wrong LRC"),
])
def test_bad_blocks(wire: bytes, text: str) -> None:
    with pytest.raises(DecodeError, match=text):
        decode_block(wire)


@given(st.integers(0, 255), st.integers(0, 255), st.binary(max_size=254))
def test_round_trip(nad: int, pcb: int, inf: bytes) -> None:
    block = Block(nad, pcb, inf)
    assert decode_block(block.encode()) == block


@given(st.binary(max_size=300))
def test_garbage_raises_only_decode_error(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_block(data)


Card = Callable[[Block], bytes]


def drive(protocol: T1Protocol, apdu: bytes, card: Card, limit: int = 50) -> tuple[
        bytes, list[T1Send]]:
    """Run one exchange: ``card`` answers each block we send; (response, what we sent)."""
    exchange = protocol.transmit(apdu)
    sent = [next(exchange)]
    for _ in range(limit):
        try:
            sent.append(exchange.send(card(decode_block(sent[-1].block))))
        except StopIteration as stop:
            return stop.value, sent
    raise AssertionError("no end")


def test_a_chained_answer_is_acknowledged_block_by_block() -> None:
    answers = iter([i_block(0, H("0102"), more=True).encode(),
                    i_block(1, H("0304"), more=True).encode(),
                    i_block(0, H("9000")).encode()])
    response, sent = drive(T1Protocol(), H("00B0000000"), lambda block: next(answers))
    assert response == H("01020304 9000")
    assert [decode_block(s.block) for s in sent] == [i_block(0, H("00B0000000")), r_block(1),
                                                     r_block(0)]


def test_wtx_sets_the_bwt_multiplier_of_the_next_block_only() -> None:
    answers = iter([s_block(SKind.WTX, inf=H("05")).encode(), i_block(0, H("9000")).encode()])
    response, sent = drive(T1Protocol(), H("0084000008"), lambda block: next(answers))
    assert response == H("9000")
    assert sent[1] == T1Send(s_block(SKind.WTX, True, H("05")).encode(), 5)
    assert sent[0].bwi == 0


def test_the_cards_ifs_request_changes_ifsc() -> None:
    protocol = T1Protocol(ifsc=32)
    answers = iter([s_block(SKind.IFS, inf=H("10")).encode(), r_block(1).encode(),  # ack
                    i_block(0, H("9000")).encode()])
    apdu = bytes(40)
    response, sent = drive(protocol, apdu, lambda block: next(answers))
    assert response == H("9000") and protocol.ifsc == 16
    blocks = [decode_block(s.block) for s in sent]
    assert blocks[1] == s_block(SKind.IFS, True, H("10"))
    assert len(blocks[0].inf) == 32  # sent before the request
    assert [len(b.inf) for b in blocks[2:]] == [8]  # the rest cut to 16 (here all of it)


def test_a_lost_acknowledgement_repeats_our_block() -> None:
    answers = iter([r_block(0).encode(), i_block(0, H("9000")).encode()])
    response, sent = drive(T1Protocol(), H("00A40400"), lambda block: next(answers))
    assert response == H("9000")
    assert sent[0].block == sent[1].block  # R(N(R) = our N(S)): send it again


def test_the_card_aborting_fails_the_exchange() -> None:
    protocol = T1Protocol()
    with pytest.raises(T1Error, match="S\\(ABORT\\)"):
        drive(protocol, H("00A40400"), lambda block: s_block(SKind.ABORT).encode())
    assert protocol.ns == protocol.nr == 0


def test_three_bad_blocks_resynchronise_then_fail() -> None:
    protocol = T1Protocol()
    protocol.ns = 1

    def card(block: Block) -> bytes:
        if block.kind is BlockKind.S and block.s_kind == SKind.RESYNCH:
            return s_block(SKind.RESYNCH, True).encode()
        return H("0000000F")  # a wrong LRC

    with pytest.raises(T1Error, match="resynchronised"):
        drive(protocol, H("00A40400"), card)
    assert protocol.ns == 0


def test_ifsd_negotiation() -> None:
    protocol = T1Protocol(ifsd=254)
    exchange = protocol.negotiate_ifsd()
    assert next(exchange).block == H("00C101FE3E")
    with pytest.raises(StopIteration):
        exchange.send(H("00E101FE1E"))
    exchange = protocol.negotiate_ifsd()
    next(exchange)
    with pytest.raises(T1Error, match="answered IFSD"):
        exchange.send(s_block(SKind.IFS, True, H("20")).encode())


def test_bad_sizes() -> None:
    with pytest.raises(ValueError):
        T1Protocol(ifsc=0)
    with pytest.raises(ValueError):
        T1Protocol(ifsd=255)
