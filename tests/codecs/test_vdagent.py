"""vdagent chunk/message decoder (ccidemu.vdagent) against spice-protocol vd_agent.h."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccidemu import vdagent
from ccidemu.errors import DecodeError
from ccidemu.vdagent import (
    VdAgentCap,
    VdagentEvent,
    VdAgentMessage,
    VdAgentMessageType,
    VdagentStream,
    VdiChunk,
    VdiPort,
    decode_announce_capabilities,
    decode_chunk,
    decode_message,
)


# Independent test-side encoders (the module decodes only): vd_agent.h, little-endian.
def chunk(port: int, body: bytes) -> bytes:
    return struct.pack("<II", port, len(body)) + body


def message(type_: int, data: bytes, opaque: int = 0, protocol: int = 1) -> bytes:
    return struct.pack("<IIQI", protocol, type_, opaque, len(data)) + data


# ANNOUNCE_CAPABILITIES from the client, request=1, caps word 0 = bits 0..3 (0x0000000f).
ANNOUNCE = bytes.fromhex(
    "01000000 06000000 0000000000000000 08000000 01000000 0f000000"
)
ANNOUNCE_CHUNK = bytes.fromhex("01000000 1c000000") + ANNOUNCE


def drain(stream: VdagentStream) -> list[VdagentEvent]:
    out: list[VdagentEvent] = []
    while (event := stream.next_event()) is not None:
        out.append(event)
    return out


def test_vector_announce_capabilities() -> None:
    assert chunk(1, message(6, struct.pack("<II", 1, 0xF))) == ANNOUNCE_CHUNK
    got, used = decode_chunk(ANNOUNCE_CHUNK)
    assert (got, used) == (VdiChunk(VdiPort.CLIENT, ANNOUNCE), 36)
    assert got.port is VdiPort.CLIENT
    msg, used = decode_message(got.data, got.port)
    assert used == 28
    assert msg == VdAgentMessage(1, 1, VdAgentMessageType.ANNOUNCE_CAPABILITIES, 0, bytes.fromhex(
        "01000000 0f000000"
    ))
    assert msg.type is VdAgentMessageType.ANNOUNCE_CAPABILITIES
    request, caps = decode_announce_capabilities(msg.data)
    assert request is True
    assert caps == {
        VdAgentCap.MOUSE_STATE,
        VdAgentCap.MONITORS_CONFIG,
        VdAgentCap.REPLY,
        VdAgentCap.CLIPBOARD,
    }


def test_message_header_layout() -> None:
    """VDAgentMessage: u32 protocol, u32 type, u64 opaque, u32 size, all little-endian."""
    wire = bytes.fromhex("01000000 04000000 0807060504030201 03000000 616263")
    msg, used = decode_message(wire, VdiPort.SERVER)
    assert used == len(wire)
    assert msg == VdAgentMessage(2, 1, VdAgentMessageType.CLIPBOARD, 0x0102030405060708, b"abc")


def test_capabilities_beyond_known() -> None:
    request, caps = decode_announce_capabilities(struct.pack("<III", 0, 1 << 17, 1 << 3))
    assert request is False
    assert caps == {VdAgentCap.CLIPBOARD_GRAB_SERIAL, 35}
    with pytest.raises(DecodeError):
        decode_announce_capabilities(b"\x00\x00\x00")
    with pytest.raises(DecodeError):
        decode_announce_capabilities(b"\x00\x00\x00\x00\x01")


def test_enums() -> None:
    assert [int(t) for t in VdAgentMessageType] == list(range(1, 17))
    assert [int(c) for c in VdAgentCap] == list(range(18))
    assert vdagent.VD_AGENT_PROTOCOL == 1


def test_unknown_values_kept() -> None:
    msg, _ = decode_message(message(99, b"x", protocol=7), 5)
    assert (msg.port, msg.protocol, msg.type, msg.data) == (5, 7, 99, b"x")
    assert type(msg.type) is int
    assert type(msg.port) is int


def test_message_spanning_chunks_and_split_header() -> None:
    clip = message(VdAgentMessageType.CLIPBOARD, b"\x01\x00\x00\x00" + b"x" * 5000, opaque=9)
    grab = message(VdAgentMessageType.CLIPBOARD_GRAB, b"\x01\x00\x00\x00")
    body = clip + grab
    # Cut at 2048 like senders, and once inside grab's 20-byte header.
    pieces = [body[i : i + 2048] for i in range(0, len(clip), 2048)]
    pieces[-1] = body[len(pieces) * 2048 - 2048 : len(clip) + 7]
    pieces.append(body[len(clip) + 7 :])
    assert b"".join(pieces) == body
    stream = VdagentStream()
    stream.receive_data(b"".join(chunk(VdiPort.CLIENT, p) for p in pieces))
    events = drain(stream)
    chunks = [e for e in events if isinstance(e, VdiChunk)]
    messages = [e for e in events if isinstance(e, VdAgentMessage)]
    assert [c.data for c in chunks] == pieces
    assert [(m.type, m.opaque, len(m.data)) for m in messages] == [
        (VdAgentMessageType.CLIPBOARD, 9, 5004),
        (VdAgentMessageType.CLIPBOARD_GRAB, 0, 4),
    ]
    # A message comes right after the chunk that completes it.
    assert isinstance(events[-1], VdAgentMessage)
    assert isinstance(events[-2], VdiChunk)
    assert stream.buffered == 0


def test_ports_reassemble_separately() -> None:
    a = message(4, b"A" * 30)
    b = message(5, b"B" * 30)
    stream = VdagentStream()
    stream.receive_data(chunk(1, a[:25]) + chunk(2, b[:10]) + chunk(1, a[25:]) + chunk(2, b[10:]))
    messages = [e for e in drain(stream) if isinstance(e, VdAgentMessage)]
    assert [(m.port, m.type, m.data) for m in messages] == [(1, 4, b"A" * 30), (2, 5, b"B" * 30)]


@pytest.mark.parametrize(
    "wire",
    ["", "01000000", "01000000 05000000 0102"],
)
def test_short_chunk(wire: str) -> None:
    with pytest.raises(DecodeError):
        decode_chunk(bytes.fromhex(wire))


def test_short_message() -> None:
    with pytest.raises(DecodeError):
        decode_message(message(1, b"abc")[:-1])
    with pytest.raises(DecodeError):
        decode_message(b"\x01" * 19)


def test_over_long_chunk_rejected_from_header_alone() -> None:
    stream = VdagentStream()
    stream.receive_data(bytes.fromhex("01000000 f0ffffff"))
    assert stream.buffered == 0
    with pytest.raises(DecodeError, match="exceeds"):
        stream.next_event()
    assert stream.dead
    with pytest.raises(DecodeError, match="dead"):
        stream.receive_data(b"\x00")
    with pytest.raises(DecodeError, match="dead"):
        stream.next_event()
    with pytest.raises(DecodeError, match="exceeds"):
        decode_chunk(bytes.fromhex("01000000 f0ffffff"))


def test_over_long_message_rejected_from_header_alone() -> None:
    header = struct.pack("<IIQI", 1, 4, 0, 0xFFFFFFF0)
    stream = VdagentStream(max_length=4096)
    stream.receive_data(chunk(1, header))
    assert isinstance(stream.next_event(), VdiChunk)  # the chunk before the error still comes
    with pytest.raises(DecodeError, match="exceeds"):
        stream.next_event()
    with pytest.raises(DecodeError, match="exceeds"):
        decode_message(header)


# --- hypothesis properties -------------------------------------------------------------------

u32 = st.integers(0, 0xFFFFFFFF)
agent_messages = st.tuples(
    u32, u32, st.integers(0, (1 << 64) - 1), st.binary(max_size=200)
)  # protocol, type, opaque, data


@settings(max_examples=150)
@given(agent_messages, st.sampled_from([1, 2, 3]))
def test_message_round_trip(m: tuple[int, int, int, bytes], port: int) -> None:
    protocol, type_, opaque, data = m
    wire = message(type_, data, opaque, protocol)
    msg, used = decode_message(wire + b"tail", port)
    assert used == len(wire)
    assert (msg.port, msg.protocol, msg.type, msg.opaque, msg.data) == (
        port,
        protocol,
        type_,
        opaque,
        data,
    )


@settings(max_examples=150)
@given(u32, st.binary(max_size=200))
def test_chunk_round_trip_and_declaration_agrees(port: int, body: bytes) -> None:
    wire = chunk(port, body)
    assert decode_chunk(wire) == (VdiChunk(port, body), len(wire))
    header = vdagent._CHUNK_HEADER.parse(wire)
    assert (header.port, header.size) == (port, len(body))
    assert vdagent._CHUNK_HEADER.build({"port": port, "size": len(body)}) == wire[:8]


@settings(max_examples=150)
@given(agent_messages)
def test_message_declaration_agrees(m: tuple[int, int, int, bytes]) -> None:
    protocol, type_, opaque, data = m
    fields = {"protocol": protocol, "type": type_, "opaque": opaque, "size": len(data)}
    assert vdagent._MESSAGE_HEADER.build(fields) == message(type_, data, opaque, protocol)[:20]


@settings(max_examples=200)
@given(st.binary(max_size=80))
def test_garbage_raises_only_decode_error(data: bytes) -> None:
    for decode in (decode_chunk, decode_message):
        try:
            _, used = decode(data)
        except DecodeError:
            continue
        assert used <= len(data)
    try:
        _, caps = decode_announce_capabilities(data)
    except DecodeError:
        assert len(data) < 4 or len(data) % 4 != 0
    else:
        assert all(n < 8 * len(data) for n in caps)


@settings(max_examples=150)
@given(st.binary(max_size=200), st.lists(st.integers(1, 40), max_size=20))
def test_stream_garbage_raises_only_decode_error(data: bytes, cuts: list[int]) -> None:
    stream = VdagentStream(max_length=64)
    pos = 0
    try:
        for cut in [*cuts, len(data)]:
            stream.receive_data(data[pos : pos + cut])
            pos += cut
            drain(stream)
    except DecodeError:
        assert stream.dead


@settings(max_examples=150)
@given(
    st.lists(st.tuples(st.sampled_from([1, 2]), agent_messages), max_size=6),
    st.integers(1, 64),
    st.data(),
)
def test_any_chunking_yields_the_same_events(
    msgs: list[tuple[int, tuple[int, int, int, bytes]]], chunk_size: int, data: st.DataObject
) -> None:
    # Build a chunk stream: each port's messages cut into chunks of chunk_size bytes.
    wire = b""
    expected: list[tuple[int, int, int, int, bytes]] = []
    for port, (protocol, type_, opaque, body) in msgs:
        raw = message(type_, body, opaque, protocol)
        for i in range(0, len(raw), chunk_size):
            wire += chunk(port, raw[i : i + chunk_size])
        expected.append((port, protocol, type_, opaque, body))
    reference = VdagentStream()
    reference.receive_data(wire)
    whole = drain(reference)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=12)))
    stream = VdagentStream()
    got: list[VdagentEvent] = []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        stream.receive_data(wire[start:end])
        got.extend(drain(stream))
    assert got == whole
    assert [
        (m.port, m.protocol, m.type, m.opaque, m.data) for m in got if isinstance(m, VdAgentMessage)
    ] == expected
    assert stream.buffered == 0
