"""VSCard codec (ccidemu.vsc) against libcacard vscard_common.h and QEMU 7.2's observed bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccidemu import vsc
from ccidemu.errors import DecodeError, EncodeError
from ccidemu.vsc import (
    READER_ID_UNDEFINED,
    VSCARD_MAGIC,
    VSCARD_VERSION,
    ByteOrder,
    VscApdu,
    VscAtr,
    VscCardRemove,
    VscConnection,
    VscError,
    VscErrorCode,
    VscFlush,
    VscFlushComplete,
    VscInit,
    VscMessage,
    VscReaderAdd,
    VscReaderRemove,
    VscType,
    VscUnknown,
    decode_vsc,
    describe_vsc,
    encode_vsc,
    make_version,
    split_version,
)

SAMPLE = Path(__file__).resolve().parents[2] / "fixtures" / "samples" / "qemu-session.hex"
ATR = bytes.fromhex("3b8f8001804f0ca000000306030001000000006a")
SELECT = bytes.fromhex("00a4040007a0000000031010")

# (message, big-endian bytes, little-endian bytes); vscard_common.h VSCMsgHeader + payloads.
VECTORS = [
    pytest.param(
        VscInit(READER_ID_UNDEFINED),
        "00000001 ffffffff 0000000c 56534344 00000002 00000000",
        "01000000 ffffffff 0c000000 56534344 02000000 00000000",
        id="init-qemu",
    ),
    pytest.param(
        VscInit(0, 2, ()),
        "00000001 00000000 00000008 56534344 00000002",
        "01000000 00000000 08000000 56534344 02000000",
        id="init-no-capabilities",
    ),
    pytest.param(
        VscInit(0, make_version(1, 2, 3), (1, 0x80000000)),
        "00000001 00000000 00000010 56534344 00200803 00000001 80000000",
        "01000000 00000000 10000000 56534344 03082000 01000000 00000080",
        id="init-two-capabilities",
    ),
    pytest.param(
        VscError(0, VscErrorCode.SUCCESS),
        "00000002 00000000 00000004 00000000",
        "02000000 00000000 04000000 00000000",
        id="error-success",
    ),
    pytest.param(
        VscError(1, VscErrorCode.CARD_ALREADY_INSERTED),
        "00000002 00000001 00000004 00000003",
        "02000000 01000000 04000000 03000000",
        id="error-card-already-inserted",
    ),
    pytest.param(
        VscError(0, 0x1234),
        "00000002 00000000 00000004 00001234",
        "02000000 00000000 04000000 34120000",
        id="error-unknown-code",
    ),
    pytest.param(
        VscReaderAdd(0, b"vsc-test-reader"),
        "00000003 00000000 0000000f 7673632d746573742d726561646572",
        "03000000 00000000 0f000000 7673632d746573742d726561646572",
        id="reader-add",
    ),
    pytest.param(
        VscReaderAdd(0, b""),
        "00000003 00000000 00000000",
        "03000000 00000000 00000000",
        id="reader-add-empty-name",
    ),
    pytest.param(
        VscReaderRemove(0),
        "00000004 00000000 00000000",
        "04000000 00000000 00000000",
        id="reader-remove",
    ),
    pytest.param(
        VscAtr(0, ATR),
        "00000005 00000000 00000014 " + ATR.hex(),
        "05000000 00000000 14000000 " + ATR.hex(),
        id="atr",
    ),
    pytest.param(
        VscCardRemove(2),
        "00000006 00000002 00000000",
        "06000000 02000000 00000000",
        id="card-remove",
    ),
    pytest.param(
        VscApdu(0, SELECT),
        "00000007 00000000 0000000c " + SELECT.hex(),
        "07000000 00000000 0c000000 " + SELECT.hex(),
        id="apdu-command",
    ),
    pytest.param(
        VscApdu(0, bytes.fromhex("9000")),
        "00000007 00000000 00000002 9000",
        "07000000 00000000 02000000 9000",
        id="apdu-response",
    ),
    pytest.param(
        VscFlush(0),
        "00000008 00000000 00000000",
        "08000000 00000000 00000000",
        id="flush",
    ),
    pytest.param(
        VscFlushComplete(0),
        "00000009 00000000 00000000",
        "09000000 00000000 00000000",
        id="flush-complete",
    ),
    pytest.param(
        VscUnknown(0, 0x42, b"\x01\x02"),
        "00000042 00000000 00000002 0102",
        "42000000 00000000 02000000 0102",
        id="unknown-type",
    ),
]


@pytest.mark.parametrize(("msg", "big", "little"), VECTORS)
@pytest.mark.parametrize("byteorder", ["big", "little"])
def test_vectors(msg: VscMessage, big: str, little: str, byteorder: ByteOrder) -> None:
    wire = bytes.fromhex(big if byteorder == "big" else little)
    assert encode_vsc(msg, byteorder) == wire
    assert decode_vsc(wire, byteorder) == (msg, len(wire))
    assert decode_vsc(wire + b"\xaa\xbb", byteorder) == (msg, len(wire))  # trailing bytes stay


def test_every_type_has_a_vector() -> None:
    types = {p.values[0].type for p in VECTORS}  # type: ignore[union-attr]
    assert set(VscType) <= types


def test_decoded_codes_are_enum_members() -> None:
    msg, _ = decode_vsc(bytes.fromhex("00000002 00000000 00000004 00000002"))
    assert isinstance(msg, VscError)
    assert msg.code is VscErrorCode.CANNOT_ADD_MORE_READERS
    unknown, _ = decode_vsc(bytes.fromhex("00000002 00000000 00000004 00000009"))
    assert isinstance(unknown, VscError)
    assert type(unknown.code) is int
    assert unknown.code == 9


def test_constants() -> None:
    assert VSCARD_MAGIC == b"VSCD"
    assert VSCARD_VERSION == 2 == make_version(0, 0, 2)
    assert READER_ID_UNDEFINED == 0xFFFFFFFF
    assert vsc.READER_ID_MINIMAL == 0
    assert VscErrorCode["CARD_ALREAY_INSERTED"] is VscErrorCode.CARD_ALREADY_INSERTED
    assert [int(t) for t in VscType] == list(range(1, 10))


def test_version_split() -> None:
    assert split_version(VSCARD_VERSION) == (0, 0, 2)
    assert split_version(0xFFFFFFFF) == (2047, 2047, 1023)
    assert make_version(2047, 2047, 1023) == 0xFFFFFFFF
    assert split_version(make_version(1, 2, 3)) == (1, 2, 3)
    assert VscInit(0, make_version(3, 4, 5)).version_parts == (3, 4, 5)
    with pytest.raises(EncodeError):
        make_version(0, 0, 1024)


def test_qemu_trace_from_protocol_notes() -> None:
    """docs/PROTOCOL.md, "VSCard", both directions of a QEMU 7.2 session, in order."""
    lines = [
        line for line in SAMPLE.read_text().splitlines() if line and not line.startswith("#")
    ]
    stream = b"".join(bytes.fromhex(line) for line in lines)
    expected: list[VscMessage] = [
        VscInit(READER_ID_UNDEFINED, 2, (0,)),
        VscInit(0, 2, (0,)),
        VscInit(READER_ID_UNDEFINED, 2, (0,)),
        VscReaderAdd(0, b"vsc-test-reader"),
        VscError(0, VscErrorCode.SUCCESS),
        VscAtr(0, ATR),
        VscError(0, VscErrorCode.SUCCESS),
        VscApdu(0, SELECT),
        VscApdu(0, bytes.fromhex("9000")),
    ]
    conn = VscConnection()
    conn.receive_data(stream)
    got: list[VscMessage] = []
    while (event := conn.next_event()) is not None:
        got.append(event)
    assert got == expected
    assert b"".join(conn.send(m) for m in got) == stream
    for line, msg in zip(lines, expected, strict=True):
        assert encode_vsc(msg) == bytes.fromhex(line)
    assert got[3] == VscReaderAdd.with_name(0, "vsc-test-reader")
    assert isinstance(got[3], VscReaderAdd)
    assert got[3].name == "vsc-test-reader"


def test_reader_name_invalid_utf8_is_kept() -> None:
    wire = bytes.fromhex("00000003 00000000 00000004 41ff4243")
    msg, _ = decode_vsc(wire)
    assert isinstance(msg, VscReaderAdd)
    assert msg.raw_name == b"A\xffBC"
    assert msg.name == "A\ufffdBC"
    assert encode_vsc(msg) == wire
    assert VscReaderAdd.with_name(0, "café") == VscReaderAdd(0, "café".encode())


@pytest.mark.parametrize(
    ("wire", "why"),
    [
        ("", "empty"),
        ("00000007 00000000 0000", "short header"),
        ("00000007 00000000 00000005 00a404", "truncated payload"),
        ("00000001 00000000 0000000c 44435356 00000002 00000000", "magic byte-swapped"),
        ("00000001 00000000 00000004 56534344", "init without version"),
        ("00000001 00000000 0000000a 56534344 00000002 0000", "partial capability word"),
        ("00000002 00000000 00000002 0000", "short error code"),
        ("00000002 00000000 00000008 00000000 00000000", "long error code"),
        ("00000004 00000000 00000001 00", "reader remove with payload"),
        ("00000006 00000000 00000001 00", "card remove with payload"),
        ("00000008 00000000 00000001 00", "flush with payload"),
        ("00000009 00000000 00000001 00", "flush complete with payload"),
        ("00000007 00000000 fffffff0", "over-long length"),
    ],
)
def test_bad_frames(wire: str, why: str) -> None:
    with pytest.raises(DecodeError):
        decode_vsc(bytes.fromhex(wire))


def test_cap_is_configurable() -> None:
    wire = encode_vsc(VscApdu(0, bytes(100)))
    assert decode_vsc(wire, max_length=100)[1] == 112
    with pytest.raises(DecodeError, match="exceeds"):
        decode_vsc(wire, max_length=99)


def test_over_long_rejected_from_header_alone() -> None:
    """Only the 12 header bytes are fed; the error comes at once and nothing is buffered."""
    conn = VscConnection()
    conn.receive_data(bytes.fromhex("00000007 00000000 fffffff0"))
    assert conn.buffered == 0
    with pytest.raises(DecodeError, match="exceeds"):
        conn.next_event()
    assert conn.dead
    with pytest.raises(DecodeError, match="dead"):
        conn.next_event()
    with pytest.raises(DecodeError, match="dead"):
        conn.receive_data(b"\x00" * 100)


def test_good_frames_before_a_bad_one_are_delivered() -> None:
    good = encode_vsc(VscApdu(0, b"\x90\x00"))
    conn = VscConnection(max_length=1000)
    conn.receive_data(good + good + bytes.fromhex("00000007 00000000 000003e9") + b"x" * 50)
    assert conn.next_event() == VscApdu(0, b"\x90\x00")
    assert conn.next_event() == VscApdu(0, b"\x90\x00")
    with pytest.raises(DecodeError):
        conn.next_event()
    assert conn.dead


def test_connection_waits_for_more() -> None:
    conn = VscConnection(byteorder="little")
    wire = encode_vsc(VscAtr(0, ATR), "little")
    conn.receive_data(wire[:5])
    assert conn.next_event() is None
    conn.receive_data(wire[5:-1])
    assert conn.next_event() is None
    assert conn.buffered == len(wire) - 1
    conn.receive_data(wire[-1:])
    assert conn.next_event() == VscAtr(0, ATR)
    assert conn.next_event() is None
    assert conn.buffered == 0
    assert conn.send(VscAtr(0, ATR)) == wire


@pytest.mark.parametrize(
    "msg",
    [
        VscApdu(-1, b""),
        VscApdu(1 << 32, b""),
        VscError(0, 1 << 32),
        VscInit(0, 2, (1 << 32,)),
        VscInit(0, -1),
        VscUnknown(0, 7, b""),  # a known type must use its own class
        VscUnknown(0, 1 << 32, b""),
    ],
)
def test_unencodable(msg: VscMessage) -> None:
    with pytest.raises(EncodeError):
        encode_vsc(msg)


def test_bad_byteorder_is_our_mistake() -> None:
    with pytest.raises(ValueError, match="byteorder"):
        encode_vsc(VscFlush(0), "middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="byteorder"):
        decode_vsc(b"", "middle")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("msg", "text"),
    [
        (VscApdu(0, SELECT), "APDU reader=0 len=12 00a4040007a0000000031010"),
        (VscInit(READER_ID_UNDEFINED), "Init reader=undefined version=0.0.2 caps=[00000000]"),
        (VscError(0, 1), "Error reader=0 code=1(GENERAL_ERROR)"),
        (VscError(0, 77), "Error reader=0 code=77(unknown)"),
        (VscReaderAdd(0, b"r\xff"), "ReaderAdd reader=0 name='r\ufffd'"),
        (VscAtr(1, b"\x3b\x00"), "ATR reader=1 len=2 3b00"),
        (VscCardRemove(0), "CardRemove reader=0"),
        (VscReaderRemove(0), "ReaderRemove reader=0"),
        (VscFlush(0), "Flush reader=0"),
        (VscFlushComplete(0), "FlushComplete reader=0"),
        (VscUnknown(0, 66, b"\x01"), "Unknown(type=66) reader=0 len=1 01"),
        (VscApdu(0, bytes(70)), "APDU reader=0 len=70 " + "00" * 64 + "...(+6 bytes)"),
    ],
)
def test_describe(msg: VscMessage, text: str) -> None:
    assert describe_vsc(msg) == text
    assert "\n" not in describe_vsc(msg, max_hex=None)


# --- hypothesis properties -------------------------------------------------------------------

u32 = st.integers(0, 0xFFFFFFFF)
payloads = st.binary(max_size=300)
messages: st.SearchStrategy[VscMessage] = st.one_of(
    st.builds(VscInit, u32, u32, st.lists(u32, max_size=6).map(tuple)),
    st.builds(VscError, u32, st.one_of(st.sampled_from(VscErrorCode), u32)),
    st.builds(VscReaderAdd, u32, payloads),
    st.builds(VscReaderRemove, u32),
    st.builds(VscAtr, u32, payloads),
    st.builds(VscCardRemove, u32),
    st.builds(VscApdu, u32, payloads),
    st.builds(VscFlush, u32),
    st.builds(VscFlushComplete, u32),
    st.builds(VscUnknown, u32, st.integers(10, 0xFFFFFFFF) | st.just(0), payloads),
)
byteorders = st.sampled_from(["big", "little"])


@settings(max_examples=200)
@given(messages, byteorders)
def test_round_trip(msg: VscMessage, byteorder: ByteOrder) -> None:
    wire = encode_vsc(msg, byteorder)
    assert decode_vsc(wire, byteorder) == (msg, len(wire))


@settings(max_examples=200)
@given(st.binary(max_size=64), byteorders)
def test_garbage_raises_only_decode_error(data: bytes, byteorder: ByteOrder) -> None:
    try:
        msg, used = decode_vsc(data, byteorder)
    except DecodeError:
        return
    assert 12 <= used <= len(data)
    assert encode_vsc(msg, byteorder) == data[:used]  # whatever decodes, re-encodes exactly


@settings(max_examples=150)
@given(st.binary(max_size=200), st.lists(st.integers(1, 40), max_size=20), byteorders)
def test_stream_garbage_raises_only_decode_error(
    data: bytes, cuts: list[int], byteorder: ByteOrder
) -> None:
    conn = VscConnection(byteorder, max_length=64)
    pos = 0
    try:
        for cut in [*cuts, len(data)]:
            conn.receive_data(data[pos : pos + cut])
            pos += cut
            while conn.next_event() is not None:
                pass
    except DecodeError:
        assert conn.dead
        with pytest.raises(DecodeError):
            conn.next_event()


@settings(max_examples=150)
@given(st.lists(messages, max_size=8), st.data(), byteorders)
def test_any_chunking_yields_the_same_messages(
    msgs: list[VscMessage], data: st.DataObject, byteorder: ByteOrder
) -> None:
    stream = b"".join(encode_vsc(m, byteorder) for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    conn = VscConnection(byteorder)
    got: list[VscMessage] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        conn.receive_data(stream[start:end])
        while (event := conn.next_event()) is not None:
            got.append(event)
    assert got == msgs
    assert conn.buffered == 0


@settings(max_examples=150)
@given(messages, byteorders)
def test_construct_declaration_agrees_with_hot_path(msg: VscMessage, byteorder: ByteOrder) -> None:
    """The struct hot path and the construct declaration of VSCMsgHeader are the same format."""
    formats = vsc._FORMATS[byteorder]
    wire = encode_vsc(msg, byteorder)
    frame = formats.frame.parse(wire)
    assert (frame.type, frame.reader_id) == (int(msg.type), msg.reader_id)
    assert frame.length == len(wire) - 12 == len(frame.data)
    fields = {"type": msg.type, "reader_id": msg.reader_id, "length": len(frame.data)}
    rebuilt = formats.frame.build({**fields, "data": frame.data})
    assert rebuilt == wire
    header = formats.header.parse(wire[:12])
    assert (header.type, header.reader_id, header.length) == (
        frame.type,
        frame.reader_id,
        len(frame.data),
    )
    assert formats.hot_header.unpack_from(wire) == (frame.type, frame.reader_id, frame.length)


@settings(max_examples=150)
@given(u32, u32, st.binary(max_size=40), byteorders)
def test_construct_built_frames_decode(
    type_: int, reader_id: int, payload: bytes, byteorder: ByteOrder
) -> None:
    formats = vsc._FORMATS[byteorder]
    wire = formats.frame.build(
        {"type": type_, "reader_id": reader_id, "length": len(payload), "data": payload}
    )
    try:
        msg, used = decode_vsc(wire, byteorder)
    except DecodeError:
        assert type_ in (1, 2, 4, 6, 8, 9)  # only types with a payload format can refuse
        return
    assert used == len(wire)
    assert (int(msg.type), msg.reader_id) == (type_, reader_id)
    assert encode_vsc(msg, byteorder) == wire
