"""The ISO/IEC 7816-4 applet dispatcher: chaining both ways, status words, no escapes."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccidemu.apdu import CommandApdu
from ccidemu.cards.iso import ISO_RULES, T0_RULES, IsoDispatcher
from ccidemu.errors import StatusWordError

BIG = bytes(range(256)) * 3  # 768 bytes


def _echo(cmd: CommandApdu) -> bytes:
    return cmd.data


def _big(cmd: CommandApdu) -> bytes:
    return BIG[: cmd.p1 * 256 + cmd.p2]


def _refuse(cmd: CommandApdu) -> bytes:
    raise StatusWordError(0x6A88)


def _crash(cmd: CommandApdu) -> bytes:
    raise ZeroDivisionError("bug")


def _bad_sw(cmd: CommandApdu) -> bytes:
    raise StatusWordError(0x19000)


def _make() -> IsoDispatcher:
    return IsoDispatcher(
        {0xE0: _echo, 0xE2: _big, 0xE4: _refuse, 0xE6: _crash, 0xE8: _bad_sw},
        chaining=(0xE0,),
    )


@pytest.mark.parametrize(
    ("apdu", "response"),
    [
        # ISO/IEC 7816-4 section 5.1: cases 1-4 short, answered 9000
        pytest.param("00e0000003010203", "0102039000", id="case3-echo"),
        pytest.param("00e000000301020300", "0102039000", id="case4-echo"),
        pytest.param("00e0000000", "9000", id="case2"),
        pytest.param("00e00000", "9000", id="case1"),
        # section 5.6 table 6: wrong length, unknown INS, class, P1-P2 refused by handler
        pytest.param("00e0", "6700", id="short-header"),
        pytest.param("00e000000501", "6700", id="lc-mismatch"),
        pytest.param("00aa0000", "6d00", id="unknown-ins"),
        pytest.param("80e00000", "6e00", id="proprietary-class"),
        pytest.param("0ce00000", "6882", id="secure-messaging"),
        pytest.param("01e00000", "6881", id="logical-channel"),
        pytest.param("ffe00000", "6e00", id="cla-ff"),
        pytest.param("00e40000", "6a88", id="status-word-error"),
        pytest.param("00c0000000", "6985", id="get-response-nothing-pending"),
        # extended APDU (case 4E): answered in one piece when Ne allows
        pytest.param("00e0000000000301020300 00".replace(" ", ""), "0102039000", id="case4e"),
    ],
)
def test_dispatcher_vectors(apdu: str, response: str) -> None:
    assert _make().process(bytes.fromhex(apdu)).hex() == response


def test_exception_becomes_6f00_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        assert _make().process(bytes.fromhex("00e60000")) == b"\x6f\x00"
    assert "ZeroDivisionError" in caplog.text


def test_out_of_range_status_word_from_an_applet_is_6f00() -> None:
    """A handler bug (a 'status word' over 16 bits) never escapes the card as an exception."""
    assert _make().process(bytes.fromhex("00e80000")) == b"\x6f\x00"


def _collect(dispatcher: IsoDispatcher, first: bytes, le: int = 0) -> tuple[bytes, int]:
    """Follow 61xx with GET RESPONSE (ISO/IEC 7816-4 section 7.6.1) like a reader would."""
    rsp = dispatcher.process(first)
    data = rsp[:-2]
    rounds = 0
    while rsp[-2] == 0x61:
        rounds += 1
        rsp = dispatcher.process(bytes((0, 0xC0, 0, 0, le if le else rsp[-1])))
        data += rsp[:-2]
    assert rsp[-2:] == b"\x90\x00"
    return data, rounds


def test_response_chaining_short() -> None:
    # 768 bytes to a short Le=00 (256): 256 + 61 00, 256 + 61 00, 256 + 90 00
    d = _make()
    rsp = d.process(bytes.fromhex("00e2030000"))
    assert rsp[:-2] == BIG[:256] and rsp[-2:] == b"\x61\x00"
    data, rounds = _collect(_make(), bytes.fromhex("00e2030000"))
    assert data == BIG and rounds == 2


def test_response_chaining_small_le_then_exact() -> None:
    # Le=08 (OpenSC's first certificate read): 8 bytes and 61 xx with what is left
    d = _make()
    rsp = d.process(bytes.fromhex("00e2012c08"))  # 300 bytes
    assert rsp == BIG[:8] + b"\x61\x00"
    rsp = d.process(bytes.fromhex("00c0000000"))
    assert rsp == BIG[8:264] + b"\x61\x24"
    rsp = d.process(bytes.fromhex("00c0000024"))
    assert rsp == BIG[264:300] + b"\x90\x00"
    assert d.process(bytes.fromhex("00c0000000")) == b"\x69\x85"


def test_response_pending_dropped_by_other_command() -> None:
    d = _make()
    assert d.process(bytes.fromhex("00e2012c00"))[-2:] == b"\x61\x2c"
    assert d.process(bytes.fromhex("00e0000000")) == b"\x90\x00"
    assert d.process(bytes.fromhex("00c0000000")) == b"\x69\x85"


def test_extended_le_gets_everything_at_once() -> None:
    rsp = _make().process(bytes.fromhex("00e20300000000"))  # case 2E, Le 0000 = 65536
    assert rsp == BIG + b"\x90\x00"


def test_case3_without_le_answers_up_to_256() -> None:
    rsp = _make().process(bytes.fromhex("00e20100"))  # case 1: Ne absent -> 256 short
    assert rsp == BIG[:256] + b"\x90\x00"


def test_command_chaining_joins_links() -> None:
    # ISO/IEC 7816-4 section 5.1.1.1: CLA 10 links answered 9000, the last carries all
    d = _make()
    assert d.process(bytes.fromhex("10e0000002aabb")) == b"\x90\x00"
    assert d.process(bytes.fromhex("10e0000001cc")) == b"\x90\x00"
    assert d.process(bytes.fromhex("00e0000001dd00")) == bytes.fromhex("aabbccdd9000")


def test_command_chain_mismatch_is_6883() -> None:
    d = _make()
    assert d.process(bytes.fromhex("10e0000002aabb")) == b"\x90\x00"
    assert d.process(bytes.fromhex("00e0010001dd")) == b"\x68\x83"
    # the broken chain is gone: a fresh command works
    assert d.process(bytes.fromhex("00e0000001ee")) == bytes.fromhex("ee9000")


def test_command_chaining_refused_where_unsupported() -> None:
    assert _make().process(bytes.fromhex("10e2000001aa")) == b"\x68\x84"


def test_chain_cap() -> None:
    d = IsoDispatcher({0xE0: _echo}, chaining=(0xE0,), max_chain=4)
    assert d.process(bytes.fromhex("10e0000003010203")) == b"\x90\x00"
    assert d.process(bytes.fromhex("00e0000003010203")) == b"\x67\x00"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=6))
def test_arbitrary_apdus_always_end_in_a_status_word(apdus: list[bytes]) -> None:
    d = _make()
    for apdu in apdus:
        rsp = d.process(apdu)
        assert isinstance(rsp, bytes) and len(rsp) >= 2


# --- T0_RULES: how libcacard sizes answers (card_7816.c vcard_response_new, GET RESPONSE) ---


def _t0() -> IsoDispatcher:
    return IsoDispatcher({0xE0: _echo, 0xE2: _big}, rules=T0_RULES)


@pytest.mark.parametrize(
    ("apdus", "answers"),
    [
        # no Le field: Ne = 0, so any data is announced with 61xx and none of it sent
        pytest.param(["00e20010"], ["6110"], id="no-le-announces"),
        pytest.param(["00e20000", "00c0000000"], ["9000", "6a88"], id="empty-answer"),
        pytest.param(["00e20010", "00c0000000"], ["6110", BIG[:16].hex() + "9000"],
                     id="get-response"),
        # Le smaller than the answer: still none of it, the whole answer is held back
        pytest.param(["00e2001004"], ["6110"], id="short-le-holds-back"),
        # GET RESPONSE parts: partial data with 61xx; P1 P2 and data ignored (libcacard)
        pytest.param(["00e20010", "00c0123404", "00c000000100"],
                     ["6110", BIG[:4].hex() + "610c", "610c"], id="parts"),
        pytest.param(["00e20100", "00c0000000"], ["6100", BIG[:256].hex() + "9000"],
                     id="256-bytes"),
        pytest.param(["00c0000000"], ["6a88"], id="nothing-pending"),
        pytest.param(["00e2001000", "00c0000000"], [BIG[:16].hex() + "9000", "6a88"],
                     id="le-enough"),
    ],
)
def test_t0_rules(apdus: list[str], answers: list[str]) -> None:
    d = _t0()
    assert [d.process(bytes.fromhex(a)).hex() for a in apdus] == answers


def test_iso_rules_unchanged_by_default() -> None:
    d = _make()
    assert d.rules == ISO_RULES
    assert d.process(bytes.fromhex("00c0000000")).hex() == "6985"
