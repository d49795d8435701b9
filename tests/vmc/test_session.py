"""The sans-I/O VSCard session engine (vmc.session) against docs/PROTOCOL.md, "VSCard".

Wire bytes are written out by hand from the byte-for-byte QEMU 7.2 trace in docs/PROTOCOL.md
(vscard_common.h: big-endian u32 type, reader_id, length, then the payload).
"""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccidemu.card import BuiltinTestCard
from ccidemu.vsc import VscErrorCode
from vmc.session import (
    ApduDone,
    Closed,
    PowerOff,
    PowerOn,
    ReaderState,
    SessionAction,
    Transmit,
    VscSession,
)

H = bytes.fromhex

# docs/PROTOCOL.md, "VSCard", "What QEMU 7.2 does", line by line.
QEMU_INIT = H("00000001 ffffffff 0000000c 56534344 00000002 00000000")
OUR_INIT = H("00000001 00000000 0000000c 56534344 00000002 00000000")
READER_ADD = H("00000003 00000000 0000000f 7673632d746573742d726561646572")  # "vsc-test-reader"
ERROR_OK = H("00000002 00000000 00000004 00000000")
TRACE_ATR = H("3b8f8001804f0ca000000306030001000000006a")
ATR_MSG = H("00000005 00000000 00000014") + TRACE_ATR
GUEST_APDU = H("00000007 00000000 0000000c 00a4040007a0000000031010")
OUR_RESPONSE = H("00000007 00000000 00000002 9000")


def frame(type_: int, reader_id: int, payload: bytes = b"") -> bytes:
    return struct.pack(">III", type_, reader_id, len(payload)) + payload


def error(reader_id: int, code: int = 0) -> bytes:
    return frame(2, reader_id, struct.pack(">I", code))


def apdu(reader_id: int, data: bytes) -> bytes:
    return frame(7, reader_id, data)


def actions(session: VscSession) -> list[SessionAction]:
    out: list[SessionAction] = []
    while (a := session.next_action()) is not None:
        out.append(a)
    return out


def new_session(names: tuple[str, ...] = ("vsc-test-reader",), **kw: object) -> VscSession:
    return VscSession(list(names), **kw)  # type: ignore[arg-type]


def power_all(session: VscSession, atr: bytes = TRACE_ATR) -> list[SessionAction]:
    """Answer every PowerOn with ``atr``; return the other actions."""
    rest: list[SessionAction] = []
    for a in actions(session):
        if isinstance(a, PowerOn):
            session.power_on_done(a.token, atr, 0.0)
        else:
            rest.append(a)
    return rest


def handshake(session: VscSession) -> None:
    """Through ATR acknowledged, as in the trace (server mode)."""
    session.start(0.0)
    power_all(session)
    session.receive_data(QEMU_INIT, 0.0)
    session.receive_data(ERROR_OK, 0.0)
    session.receive_data(ERROR_OK, 0.0)
    session.data_to_send()


def single_transmit(session: VscSession) -> Transmit:
    acts = [a for a in actions(session) if not isinstance(a, ApduDone)]
    assert len(acts) == 1 and isinstance(acts[0], Transmit), acts
    return acts[0]


# ------------------------------------------------------------------------- the QEMU trace


def test_qemu_server_mode_trace_byte_for_byte() -> None:
    """QEMU as chardev server sends nothing first; we speak first (docs/PROTOCOL.md, "VSCard")."""
    s = new_session()
    s.start(0.0)
    assert s.data_to_send() == OUR_INIT
    assert power_all(s) == []  # the ATR is ready early but held until the reader is added
    assert s.data_to_send() == b""
    s.receive_data(QEMU_INIT, 0.0)  # the reply to our Init
    assert s.handshake_done
    assert s.data_to_send() == READER_ADD
    s.receive_data(ERROR_OK, 0.0)  # ReaderAdd accepted, reader id 0
    assert s.data_to_send() == ATR_MSG
    s.receive_data(ERROR_OK, 0.0)  # ATR accepted
    assert s.data_to_send() == b""
    s.receive_data(GUEST_APDU, 1.0)
    t = single_transmit(s)
    assert (t.reader, t.apdu) == (0, H("00a4040007a0000000031010"))
    s.transmit_done(t.token, H("9000"), 1.25)
    assert s.data_to_send() == OUR_RESPONSE
    done = actions(s)
    assert done == [ApduDone(0, 0, t.apdu, H("9000"), 1.0, 0.25)]


def test_qemu_client_mode_trace_byte_for_byte() -> None:
    """QEMU as chardev client sends an unsolicited Init, then replies to ours: one handshake."""
    s = new_session()
    s.start(0.0)
    power_all(s)
    assert s.data_to_send() == OUR_INIT
    s.receive_data(QEMU_INIT, 0.0)  # unsolicited
    assert s.data_to_send() == READER_ADD
    s.receive_data(QEMU_INIT, 0.0)  # the reply to our Init: no second handshake
    assert s.data_to_send() == b""
    s.receive_data(ERROR_OK + ERROR_OK + GUEST_APDU, 0.0)
    assert s.data_to_send() == ATR_MSG
    t = single_transmit(s)
    s.transmit_done(t.token, H("9000"), 0.0)
    assert s.data_to_send() == OUR_RESPONSE


def test_whole_trace_in_any_chunking_gives_same_output() -> None:
    stream = QEMU_INIT + QEMU_INIT + ERROR_OK + ERROR_OK + GUEST_APDU
    for size in (1, 2, 5, 11, 12, 13, len(stream)):
        s = new_session()
        s.start(0.0)
        power_all(s)
        out = s.data_to_send()
        transmits = []
        for i in range(0, len(stream), size):
            s.receive_data(stream[i : i + size], 0.0)
            out += s.data_to_send()
            transmits += [a for a in actions(s) if isinstance(a, Transmit)]
        assert out == OUR_INIT + READER_ADD + ATR_MSG, size
        assert [t.apdu for t in transmits] == [GUEST_APDU[12:]]


def test_init_at_any_time_never_repeats_handshake() -> None:
    s = new_session()
    handshake(s)
    for _ in range(3):
        s.receive_data(QEMU_INIT, 0.0)
        assert s.data_to_send() == b""
        assert actions(s) == []
    s.receive_data(GUEST_APDU, 0.0)
    assert isinstance(single_transmit(s), Transmit)


def test_reader_add_waits_for_init() -> None:
    s = new_session()
    s.start(0.0)
    power_all(s)
    assert s.data_to_send() == OUR_INIT
    s.receive_data(GUEST_APDU, 0.0)  # no reader yet: refused, not routed
    assert s.data_to_send() == error(0, VscErrorCode.GENERAL_ERROR)


# ------------------------------------------------------------------------- readers


def test_reader_ids_come_from_the_error_answer_and_route_apdus() -> None:
    """SPICE-style host with its own ids: ReaderAdd one at a time, id from Error.reader_id."""
    s = new_session(("a", "b"))
    s.start(0.0)
    power_all(s, H("3b00"))
    s.data_to_send()
    s.receive_data(QEMU_INIT, 0.0)
    assert s.data_to_send() == frame(3, 0, b"a")  # only the first reader
    s.receive_data(error(5), 0.0)
    assert s.data_to_send() == frame(5, 5, H("3b00")) + frame(3, 0, b"b")
    s.receive_data(error(5) + error(7), 0.0)  # ATR of a ok, then b added with id 7
    assert s.data_to_send() == frame(5, 7, H("3b00"))
    s.receive_data(error(7), 0.0)
    assert [(r.reader_id, r.state) for r in s.readers()] == [
        (5, ReaderState.ADDED), (7, ReaderState.ADDED)
    ]
    s.receive_data(apdu(7, H("80e0000001bb")) + apdu(5, H("80e0000001aa")), 0.0)
    ts = [a for a in actions(s) if isinstance(a, Transmit)]
    assert [(t.reader, t.apdu) for t in ts] == [(1, H("80e0000001bb")), (0, H("80e0000001aa"))]
    s.transmit_done(ts[1].token, H("aa9000"), 0.0)
    s.transmit_done(ts[0].token, H("bb9000"), 0.0)
    assert s.data_to_send() == apdu(5, H("aa9000")) + apdu(7, H("bb9000"))


def test_second_reader_refused_by_qemu_first_keeps_working() -> None:
    s = new_session(("a", "b"))
    s.start(0.0)
    power_all(s, H("3b00"))
    s.data_to_send()
    s.receive_data(QEMU_INIT + error(0), 0.0)
    s.data_to_send()
    s.receive_data(error(0) + error(0xFFFFFFFF, VscErrorCode.CANNOT_ADD_MORE_READERS), 0.0)
    assert [r.state for r in s.readers()] == [ReaderState.ADDED, ReaderState.REFUSED]
    s.receive_data(apdu(0, H("80e0000001aa")), 0.0)
    assert single_transmit(s).reader == 0


def test_unknown_reader_id_gets_general_error() -> None:
    s = new_session()
    handshake(s)
    s.receive_data(apdu(3, H("00a40400")), 0.0)
    assert s.data_to_send() == error(3, VscErrorCode.GENERAL_ERROR)
    assert actions(s) == []


# ------------------------------------------------------------------------- APDU flow


def test_one_apdu_in_flight_per_reader_rest_queued_in_order() -> None:
    s = new_session()
    handshake(s)
    s.receive_data(apdu(0, H("80e0000001aa")) + apdu(0, H("80e0000001bb")), 0.0)
    first = single_transmit(s)
    assert first.apdu == H("80e0000001aa")
    s.transmit_done(first.token, H("aa9000"), 0.0)
    second = single_transmit(s)
    assert second.apdu == H("80e0000001bb")
    s.transmit_done(second.token, H("bb9000"), 0.0)
    assert s.data_to_send() == apdu(0, H("aa9000")) + apdu(0, H("bb9000"))


def test_queue_is_bounded() -> None:
    s = new_session(max_queue=1)
    handshake(s)
    s.receive_data(apdu(0, H("80e00000")) * 3, 0.0)
    assert s.data_to_send() == error(0, VscErrorCode.GENERAL_ERROR)  # the third


def test_card_remove_deferred_while_response_in_flight() -> None:
    """docs/PROTOCOL.md: never CardRemove while an APDU response is on its way."""
    s = new_session()
    handshake(s)
    s.receive_data(GUEST_APDU, 0.0)
    t = single_transmit(s)
    s.remove_card(0, 0.0)
    assert s.data_to_send() == b""
    s.transmit_done(t.token, H("9000"), 0.0)
    assert s.data_to_send() == OUR_RESPONSE + frame(6, 0)
    assert [a for a in actions(s) if isinstance(a, PowerOff)] == [PowerOff(0)]
    s.receive_data(ERROR_OK + GUEST_APDU, 0.0)  # CardRemove acked; then an APDU: no card
    assert s.data_to_send() == error(0, VscErrorCode.GENERAL_ERROR)
    assert not s.readers()[0].present


def test_remove_then_insert_sends_atr_again() -> None:
    s = new_session()
    handshake(s)
    s.remove_card(0, 0.0)
    assert s.data_to_send() == frame(6, 0)
    with pytest.raises(ValueError):
        s.remove_card(0, 0.0)
    s.insert_card(0, 0.0)
    with pytest.raises(ValueError):
        s.insert_card(0, 0.0)
    power_all(s, H("3b00"))
    assert s.data_to_send() == frame(5, 0, H("3b00"))


def test_late_power_on_answer_after_removal_is_dropped() -> None:
    s = new_session()
    s.start(0.0)
    (power,) = [a for a in actions(s) if isinstance(a, PowerOn)]
    s.remove_card(0, 0.0)
    s.power_on_done(power.token, TRACE_ATR, 0.0)
    s.receive_data(QEMU_INIT + ERROR_OK, 0.0)
    assert s.data_to_send() == OUR_INIT + READER_ADD  # no ATR


def test_card_failure_answers_general_error() -> None:
    s = new_session()
    handshake(s)
    s.receive_data(GUEST_APDU, 0.0)
    t = single_transmit(s)
    s.transmit_failed(t.token, "card error: gone", 0.5)
    assert s.data_to_send() == error(0, VscErrorCode.GENERAL_ERROR)
    (done,) = actions(s)
    assert isinstance(done, ApduDone) and done.error == "card error: gone"
    s.receive_data(GUEST_APDU, 1.0)  # the reader still works
    assert isinstance(single_transmit(s), Transmit)


def test_stale_transmit_answer_is_ignored() -> None:
    s = new_session()
    handshake(s)
    s.receive_data(GUEST_APDU, 0.0)
    t = single_transmit(s)
    s.transmit_done(t.token, H("9000"), 0.0)
    s.transmit_done(t.token, H("9000"), 0.0)  # twice: the second is dropped
    assert s.data_to_send() == OUR_RESPONSE


# ------------------------------------------------------------------------- other messages


def test_flush_answered_with_flush_complete() -> None:
    s = new_session()
    handshake(s)
    s.receive_data(frame(8, 0), 0.0)
    assert s.data_to_send() == frame(9, 0)


def test_flush_complete_waits_for_responses_in_flight() -> None:
    s = new_session()
    handshake(s)
    s.receive_data(GUEST_APDU + frame(8, 0), 0.0)
    assert s.data_to_send() == b""
    t = single_transmit(s)
    s.transmit_done(t.token, H("9000"), 0.0)
    assert s.data_to_send() == OUR_RESPONSE + frame(9, 0)


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(frame(42, 0, b"xyz"), id="unknown-type"),
        pytest.param(frame(3, 0, b"name"), id="reader-add-from-host"),
        pytest.param(frame(5, 0, H("3b00")), id="atr-from-host"),
    ],
)
def test_unexpected_message_gets_general_error(message: bytes) -> None:
    s = new_session()
    handshake(s)
    s.receive_data(message, 0.0)
    assert s.data_to_send() == error(0, VscErrorCode.GENERAL_ERROR)
    assert not s.closed
    s.receive_data(GUEST_APDU, 0.0)
    assert isinstance(single_transmit(s), Transmit)


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(frame(7, 0, b"") [:8] + H("7fffffff"), id="over-long-length"),
        pytest.param(frame(1, 0xFFFFFFFF, b"XXXX" + bytes(8)), id="bad-init-magic"),
        pytest.param(frame(2, 0, b"\x00"), id="short-error"),
        pytest.param(frame(6, 0, b"\x00"), id="card-remove-with-payload"),
    ],
)
def test_malformed_stream_closes_session(garbage: bytes) -> None:
    s = new_session()
    handshake(s)
    s.receive_data(GUEST_APDU + garbage, 0.0)
    acts = actions(s)
    assert isinstance(acts[0], Transmit)  # the good frame before the bad one was served
    assert isinstance(acts[-1], Closed) and acts[-1].error
    assert s.closed and "malformed" in (s.close_reason or "")
    s.receive_data(GUEST_APDU, 0.0)  # ignored from now on
    assert actions(s) == []


def test_little_endian_for_spice() -> None:
    s = VscSession(["r"], byteorder="little")
    s.start(0.0)
    assert s.data_to_send() == struct.pack("<III", 1, 0, 12) + b"VSCD" + struct.pack("<II", 2, 0)


# ------------------------------------------------------------------------- shutdown


def test_shutdown_removes_cards_and_readers_after_in_flight() -> None:
    s = new_session()
    handshake(s)
    s.receive_data(GUEST_APDU, 0.0)
    t = single_transmit(s)
    s.shutdown(0.0)
    assert not s.finished
    assert s.data_to_send() == b""
    s.receive_data(GUEST_APDU, 0.0)  # arrives during shutdown: refused
    assert s.data_to_send() == error(0, VscErrorCode.GENERAL_ERROR)
    s.transmit_done(t.token, H("9000"), 0.0)
    assert s.data_to_send() == OUR_RESPONSE + frame(6, 0) + frame(4, 0)
    assert s.finished


def test_shutdown_before_handshake_sends_nothing() -> None:
    s = new_session()
    s.start(0.0)
    s.data_to_send()
    s.shutdown(0.0)
    assert s.finished and s.data_to_send() == b""


def test_shutdown_while_reader_add_pending_removes_it_when_added() -> None:
    s = new_session()
    s.start(0.0)
    power_all(s)
    s.receive_data(QEMU_INIT, 0.0)
    s.data_to_send()
    s.shutdown(0.0)
    assert not s.finished
    s.receive_data(ERROR_OK, 0.0)
    assert s.data_to_send() == frame(4, 0)
    assert s.finished


# ------------------------------------------------------------------------- with a real card


def test_with_builtin_test_card_echo() -> None:
    card = BuiltinTestCard()
    s = new_session()
    s.start(0.0)
    power_all(s, card.power_on())
    s.receive_data(QEMU_INIT + ERROR_OK + ERROR_OK, 0.0)
    s.data_to_send()
    s.receive_data(apdu(0, H("80e0000003010203")), 0.0)
    t = single_transmit(s)
    s.transmit_done(t.token, card.transmit(t.apdu), 0.0)
    assert s.data_to_send() == apdu(0, H("0102039000"))


# ------------------------------------------------------------------------- fuzzing


@settings(max_examples=150, deadline=None)
@given(data=st.lists(st.binary(max_size=64), max_size=8), handshaken=st.booleans())
def test_arbitrary_bytes_never_raise(data: list[bytes], handshaken: bool) -> None:
    s = new_session()
    if handshaken:
        handshake(s)
    else:
        s.start(0.0)
    for chunk in data:
        s.receive_data(chunk, 0.0)
        while (a := s.next_action()) is not None:
            if isinstance(a, Transmit):
                s.transmit_done(a.token, H("9000"), 0.0)
            elif isinstance(a, PowerOn):
                s.power_on_done(a.token, TRACE_ATR, 0.0)
            elif isinstance(a, Closed):
                assert a.error and s.closed
        s.data_to_send()


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [QEMU_INIT, ERROR_OK, GUEST_APDU, frame(8, 0), frame(42, 1, b"z"), error(9, 1)]
        ),
        max_size=12,
    ),
    st.integers(1, 40),
)
def test_valid_messages_any_chunking_same_output(messages: list[bytes], size: int) -> None:
    def run(chunk: int) -> bytes:
        s = new_session()
        s.start(0.0)
        power_all(s)
        stream = b"".join(messages)
        out = s.data_to_send()
        for i in range(0, len(stream), chunk):
            s.receive_data(stream[i : i + chunk], 0.0)
            out += s.data_to_send()
        # the card answers after the whole stream (same moment in both runs)
        while (a := s.next_action()) is not None:  # answers may queue more requests
            if isinstance(a, Transmit):
                s.transmit_done(a.token, H("9000"), 0.0)
        out += s.data_to_send()
        assert not s.closed
        return out

    assert run(size) == run(len(b"".join(messages)) or 1)


# --------------------------------------------------------------------------- the inline hot path


class _RaisingCard(BuiltinTestCard):
    """The test card, but INS EE raises (a card bug or CardError)."""

    def transmit(self, apdu: bytes) -> bytes:
        if apdu[1:2] == b"\xee":
            raise RuntimeError("card bug")
        return super().transmit(apdu)


def _why(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


class _Driven:
    """An engine with two readers, driven through ``ops``; ``inline`` tries the hot path."""

    def __init__(self, inline: bool, report: bool) -> None:
        self.engine = VscSession(["a", "b"], report_exchanges=report)
        self.cards = [_RaisingCard(""), _RaisingCard("")]
        self.inline = inline
        self.hits = 0
        if inline:
            for i in range(len(self.cards)):
                self.engine.set_inline(i, True)

    def drain(self, now: float) -> list[object]:
        seen: list[object] = []
        while (a := self.engine.next_action()) is not None:
            seen.append(a)
            if isinstance(a, PowerOn):
                self.engine.power_on_done(a.token, self.cards[a.reader].power_on(), now)
            elif isinstance(a, Transmit):
                try:
                    response = self.cards[a.reader].transmit(a.apdu)
                except Exception as exc:
                    self.engine.transmit_failed(a.token, _why(exc), now)
                else:
                    self.engine.transmit_done(a.token, response, now)
        return seen

    def step(self, op: tuple[str, object], now: float) -> tuple[bytes, list[object]]:
        kind, arg = op
        engine = self.engine
        if kind == "read":
            assert isinstance(arg, bytes)
            out = None
            index = engine.fast_reader(bytearray(arg), len(arg)) if self.inline else -1
            if index >= 0:  # the adapter's side of the hot path, as vmc.runtime.channel does
                command = arg[12:]
                try:
                    response = self.cards[index].transmit(command)
                except Exception as exc:
                    out = engine.fast_failed(index, command, _why(exc), now)
                else:
                    out = engine.fast_answer(index, command, response, now)
            if out is not None:
                self.hits += 1
                assert engine.next_action() is None  # the hot path emits no action
                return out, []
            engine.receive_data(arg, now)
        elif kind == "shutdown":
            engine.shutdown(now)
        elif kind == "replug_reader":
            assert isinstance(arg, int)
            with contextlib.suppress(ValueError):
                engine.replug_reader(arg, True, now)
        else:
            assert isinstance(arg, int)
            with contextlib.suppress(ValueError):
                getattr(engine, kind)(arg, now)
        seen = self.drain(now)
        return engine.data_to_send(), seen

    def state(self) -> object:
        e = self.engine
        return (e.readers(), e.apdus, e.errors, e.closed, e.finished, e.close_reason,
                [c.apdu_count for c in self.cards])


def _setup(driven: _Driven) -> bytes:
    """Multi-reader host: both readers added (ids 0 and 1) and their ATRs acknowledged."""
    e = driven.engine
    e.start(0.0)
    driven.drain(0.0)
    for chunk in (QEMU_INIT, error(0), error(0), error(1), error(1)):
        e.receive_data(chunk, 0.0)
        driven.drain(0.0)
    return e.data_to_send()


_APDUS = [H("80e00000"), H("80e0000003aabbcc"), H("80ee0000"), H("00a4040000"), H("80")]
_frames = st.one_of(
    st.builds(apdu, st.sampled_from([0, 1, 5]), st.sampled_from(_APDUS)),
    st.just(frame(8, 0)),  # Flush
    st.just(error(0)),
    st.just(frame(99, 0)),  # unknown type
)
_ops = st.one_of(
    st.tuples(st.just("read"), _frames),
    st.tuples(st.just("read"), st.lists(_frames, min_size=2, max_size=3).map(b"".join)),
    st.tuples(st.just("read"), _frames.map(lambda f: f[:7])),  # a partial frame
    st.tuples(st.just("read"), st.just(apdu(0, H("80e00000"))[:13])),
    st.tuples(st.sampled_from(["remove_card", "insert_card"]), st.integers(0, 1)),
    st.tuples(st.just("unplug_reader"), st.integers(0, 1)),
    st.tuples(st.just("replug_reader"), st.integers(0, 1)),
    st.tuples(st.just("shutdown"), st.just(0)),
)


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(_ops, max_size=25), report=st.booleans())
def test_exchange_inline_is_byte_identical_to_the_general_path(
    ops: list[tuple[str, object]], report: bool
) -> None:
    general, fast = _Driven(False, report), _Driven(True, report)
    assert _setup(general) == _setup(fast)
    hits = 0
    for n, op in enumerate(ops, start=1):
        now = float(n)
        out_g, actions_g = general.step(op, now)
        out_f, actions_f = fast.step(op, now)
        assert out_f == out_g, op
        if fast.hits > hits:  # the hot path took it: the general path's Transmit is internal
            hits = fast.hits
            assert [type(a) for a in actions_g] == [Transmit], op
            actions_g = []
        assert actions_f == actions_g, op
        assert fast.state() == general.state(), op


def test_the_hot_path_is_taken_for_a_lone_apdu_and_not_otherwise() -> None:
    driven = _Driven(True, report=False)
    _setup(driven)
    e = driven.engine
    one = apdu(0, H("80e0000002abcd"))
    assert e.fast_reader(bytearray(one), len(one)) == 0
    assert e.fast_answer(0, one[12:], H("abcd9000"), 1.0) == apdu(0, H("abcd9000"))
    failing = apdu(1, H("80ee0000"))
    assert e.fast_reader(bytearray(failing), len(failing)) == 1
    assert e.fast_failed(1, failing[12:], "card bug", 1.0) == error(1, VscErrorCode.GENERAL_ERROR)
    assert e.errors == 1 and e.apdus == 2
    two = apdu(0, H("80e00000")) * 2
    assert e.fast_reader(bytearray(two), len(two)) == -1  # two frames: general path
    unknown = apdu(5, H("80e00000"))
    assert e.fast_reader(bytearray(unknown), len(unknown)) == -1  # unknown id
    e.set_inline(0, False)
    lone = apdu(0, H("80e00000"))
    assert e.fast_reader(bytearray(lone), len(lone)) == -1
    assert e.next_action() is None and e.data_to_send() == b""


def test_readers_come_and_go() -> None:
    """add_reader offers a new reader at once; unplug sends CardRemove + ReaderRemove (after
    the response in flight); replug offers it again with a new id."""
    session = new_session()
    handshake(session)
    session.data_to_send()
    index = session.add_reader("hot-plugged", True, 1.0)
    assert index == 1
    power_all(session)
    assert session.data_to_send() == frame(3, 0, b"hot-plugged")
    session.receive_data(error(1), 1.0)  # the host gives it id 1
    assert session.data_to_send() == frame(5, 1, TRACE_ATR)
    session.receive_data(error(1), 1.0)
    session.receive_data(apdu(1, H("80e00000")), 1.0)
    (transmit,) = actions(session)
    assert isinstance(transmit, Transmit)
    session.unplug_reader(1, 2.0)
    assert session.data_to_send() == b""  # a response is owed: the removal waits
    session.transmit_done(transmit.token, H("9000"), 2.0)
    assert session.data_to_send() == apdu(1, H("9000")) + frame(6, 1) + frame(4, 1)
    session.receive_data(error(1) + error(1), 2.0)
    assert [r.state for r in session.readers()] == [ReaderState.ADDED, ReaderState.REMOVED]
    session.receive_data(apdu(1, H("80e00000")), 2.5)  # the old id is gone
    assert session.data_to_send() == error(1, VscErrorCode.GENERAL_ERROR)
    session.replug_reader(1, True, 3.0)
    power_all(session)
    assert session.data_to_send() == frame(3, 0, b"hot-plugged")
    session.receive_data(error(2), 3.0)
    assert session.data_to_send() == frame(5, 2, TRACE_ATR)
    assert session.readers()[1].reader_id == 2


def test_a_peer_without_init_gets_the_reader_at_once() -> None:
    """peer_init=False (the SPICE server never forwards QEMU's Init): Init, ReaderAdd and,
    once the reader is acknowledged, the ATR go out without waiting for the peer."""
    session = new_session(peer_init=False)
    session.start(0.0)
    assert session.handshake_done
    power_all(session)
    assert session.data_to_send() == OUR_INIT + READER_ADD
    session.receive_data(ERROR_OK, 0.0)
    assert session.data_to_send() == ATR_MSG
    session.receive_data(ERROR_OK, 0.0)
    session.receive_data(GUEST_APDU, 0.0)
    (transmit,) = actions(session)
    assert isinstance(transmit, Transmit) and transmit.apdu == GUEST_APDU[12:]
    session.receive_data(QEMU_INIT, 0.0)  # an Init after all: ignored, nothing runs twice
    assert session.data_to_send() == b""
