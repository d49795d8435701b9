"""ccidemu.ccid against USB CCID rev 1.1 byte layouts and QEMU 7.2's usb-ccid descriptor."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccidemu import ccid
from ccidemu.ccid import (
    CcidAbort,
    CcidDataBlock,
    CcidDataRateAndClockFrequency,
    CcidDirection,
    CcidError,
    CcidEscape,
    CcidEscapeResponse,
    CcidFeatures,
    CcidGetParameters,
    CcidGetSlotStatus,
    CcidHardwareError,
    CcidIccClock,
    CcidIccPowerOff,
    CcidIccPowerOn,
    CcidMechanical,
    CcidMessage,
    CcidNotifySlotChange,
    CcidParameters,
    CcidResetParameters,
    CcidSecure,
    CcidSetDataRateAndClockFrequency,
    CcidSetParameters,
    CcidSlotStatus,
    CcidStream,
    CcidT0Apdu,
    CcidUnknown,
    CcidXfrBlock,
    ClockStatus,
    CommandStatus,
    ExchangeLevel,
    IccStatus,
    PowerSelect,
    SlotState,
    SlotStatus,
    T0Parameters,
    T1Parameters,
    build_ccid_descriptor,
    decode_ccid,
    describe_ccid,
    encode_ccid,
    parse_ccid_descriptor,
)
from ccidemu.errors import DecodeError, EncodeError

OK = SlotStatus(IccStatus.PRESENT_ACTIVE, CommandStatus.PROCESSED, 0)
MUTE = SlotStatus(IccStatus.ABSENT, CommandStatus.FAILED, CcidError.ICC_MUTE)


h = bytes.fromhex


# (message, wire bytes): header = type | dwLength LE | slot | seq | 3 specific bytes
VECTORS = [
    # 6.1.1 IccPowerOn: bPowerSelect 01 = 5.0 V
    pytest.param(CcidIccPowerOn(0, 1, PowerSelect.V5_0), h("62 00000000 00 01 01 0000"),
                 id="6.1.1-power-on"),
    pytest.param(CcidIccPowerOn(0, 2), h("62 00000000 00 02 00 0000"), id="6.1.1-power-on-auto"),
    # 6.1.2 IccPowerOff
    pytest.param(CcidIccPowerOff(0, 7), h("63 00000000 00 07 000000"), id="6.1.2-power-off"),
    # 6.1.3 GetSlotStatus
    pytest.param(CcidGetSlotStatus(1, 0xFF), h("65 00000000 01 ff 000000"), id="6.1.3-status"),
    # 6.1.4 XfrBlock: bBWI 04, wLevelParameter 0x1234 LE; the docs/PROTOCOL.md SELECT APDU
    pytest.param(CcidXfrBlock(0, 3, h("00a4040007a0000000031010")),
                 h("6f 0c000000 00 03 00 0000 00a4040007a0000000031010"), id="6.1.4-xfr"),
    pytest.param(CcidXfrBlock(0, 4, b"\x01", bwi=4, level_parameter=0x1234),
                 h("6f 01000000 00 04 04 3412 01"), id="6.1.4-xfr-bwi-level"),
    # 6.1.5 GetParameters, 6.1.6 ResetParameters
    pytest.param(CcidGetParameters(0, 5), h("6c 00000000 00 05 000000"), id="6.1.5-get-params"),
    pytest.param(CcidResetParameters(0, 6), h("6d 00000000 00 06 000000"), id="6.1.6-reset-params"),
    # 6.1.7 SetParameters, T=0 (5 bytes) and T=1 (7 bytes)
    pytest.param(CcidSetParameters(0, 8, 0, T0Parameters(0x11, 0x00, 0x02, 0x0A, 0x03)),
                 h("61 05000000 00 08 00 0000 11 00 02 0a 03"), id="6.1.7-set-params-t0"),
    pytest.param(CcidSetParameters(0, 9, 1, T1Parameters(0x96, 0x11, 0xFF, 0x4D, 0x00, 0xFE, 0x00)),
                 h("61 07000000 00 09 01 0000 96 11 ff 4d 00 fe 00"), id="6.1.7-set-params-t1"),
    pytest.param(CcidSetParameters(0, 9, 2, b"\xaa"), h("61 01000000 00 09 02 0000 aa"),
                 id="6.1.7-set-params-raw"),
    # 6.1.8 Escape
    pytest.param(CcidEscape(0, 10, b"\x01\x02"), h("6b 02000000 00 0a 000000 0102"),
                 id="6.1.8-escape"),
    # 6.1.9 IccClock: 01 stop
    pytest.param(CcidIccClock(0, 11, 1), h("6e 00000000 00 0b 01 0000"), id="6.1.9-clock"),
    # 6.1.10 T0APDU: bmChanges, bClassGetResponse, bClassEnvelope
    pytest.param(CcidT0Apdu(0, 12, 3, 0x00, 0x80), h("6a 00000000 00 0c 03 00 80"),
                 id="6.1.10-t0apdu"),
    # 6.1.11 Secure: bBWI, wLevelParameter, PIN verification data structure
    pytest.param(CcidSecure(0, 13, h("00 1e 82"), 0, 0), h("69 03000000 00 0d 00 0000 001e82"),
                 id="6.1.11-secure"),
    # 6.1.12 Mechanical: 02 eject
    pytest.param(CcidMechanical(0, 14, 2), h("71 00000000 00 0e 02 0000"), id="6.1.12-mechanical"),
    # 6.1.13 Abort
    pytest.param(CcidAbort(0, 15), h("72 00000000 00 0f 000000"), id="6.1.13-abort"),
    # 6.1.14 SetDataRateAndClockFrequency: dwClockFrequency 4000 kHz, dwDataRate 9600
    pytest.param(CcidSetDataRateAndClockFrequency(0, 16, 4000, 9600),
                 h("73 08000000 00 10 000000 a00f0000 80250000"), id="6.1.14-set-rate"),
    # 6.2.1 DataBlock: bStatus, bError, bChainParameter; the docs/PROTOCOL.md answer 9000
    pytest.param(CcidDataBlock(0, 3, OK, h("9000")), h("80 02000000 00 03 00 00 00 9000"),
                 id="6.2.1-data-block"),
    # 6.2.6: ICC absent (2) + command failed (1 << 6) = 0x42, bError FE ICC_MUTE
    pytest.param(CcidDataBlock(0, 4, MUTE), h("80 00000000 00 04 42 fe 00"),
                 id="6.2.1-data-block-mute"),
    pytest.param(CcidDataBlock(0, 4, SlotStatus(0, CommandStatus.FAILED, CcidError.CMD_SLOT_BUSY)),
                 h("80 00000000 00 04 40 e0 00"), id="6.2.6-slot-busy"),
    # time extension (2 << 6): bError is the BWT multiplier, not an error
    pytest.param(CcidDataBlock(0, 5, SlotStatus(0, CommandStatus.TIME_EXTENSION, 3), b"", 0),
                 h("80 00000000 00 05 80 03 00"), id="6.2.6-time-extension"),
    pytest.param(CcidDataBlock(0, 6, OK, b"\x01", 0x10), h("80 01000000 00 06 00 00 10 01"),
                 id="6.2.1-data-block-chain"),
    # 6.2.2 SlotStatus: present-inactive (1), clock stopped high (2)
    pytest.param(CcidSlotStatus(0, 7, SlotStatus(IccStatus.PRESENT_INACTIVE),
                                ClockStatus.STOPPED_HIGH),
                 h("81 00000000 00 07 01 00 02"), id="6.2.2-slot-status"),
    # 6.2.3 Parameters
    pytest.param(CcidParameters(0, 8, OK, 0, T0Parameters(0x11, 0x00, 0x00, 0x0A, 0x00)),
                 h("82 05000000 00 08 00 00 00 1100000a00"), id="6.2.3-parameters-t0"),
    pytest.param(CcidParameters(0, 8, OK, 1, T1Parameters()),
                 h("82 07000000 00 08 00 00 01 1110004d002000"), id="6.2.3-parameters-t1"),
    # 6.2.4 Escape: command not supported (bError 00) as QEMU answers it
    pytest.param(CcidEscapeResponse(0, 9, SlotStatus(0, 1, CcidError.CMD_NOT_SUPPORTED)),
                 h("83 00000000 00 09 40 00 00"), id="6.2.4-escape"),
    # 6.2.5 DataRateAndClockFrequency
    pytest.param(CcidDataRateAndClockFrequency(0, 10, OK, 4000, 10752),
                 h("84 08000000 00 0a 00 00 00 a00f0000 002a0000"), id="6.2.5-rate"),
    # 6.3.1 NotifySlotChange: slot 0 present+changed (bits 0,1), slot 1 changed only (bit 3)
    pytest.param(CcidNotifySlotChange((SlotState(True, True), SlotState(False, True),
                                       SlotState(False), SlotState(False))),
                 h("50 0b"), id="6.3.1-notify"),
    # 6.3.2 HardwareError: 01 overcurrent
    pytest.param(CcidHardwareError(0, 0x22, 1), h("51 00 22 01"), id="6.3.2-hw-error"),
    # unknown type kept whole
    pytest.param(CcidUnknown(0, 1, 0x99, h("010203"), b"\xff"), h("99 01000000 00 01 010203 ff"),
                 id="unknown"),
]


@pytest.mark.parametrize(("msg", "wire"), VECTORS)
def test_vectors(msg: CcidMessage, wire: bytes) -> None:
    assert encode_ccid(msg) == wire
    # a bulk message stops at dwLength; NotifySlotChange takes the whole interrupt transfer
    trailer = b"" if isinstance(msg, CcidNotifySlotChange) else b"\xee\xee"
    decoded, used = decode_ccid(wire + trailer)
    assert decoded == msg
    assert used == len(wire)
    assert describe_ccid(decoded)


def test_every_message_type_has_a_vector() -> None:
    covered = {encode_ccid(p.values[0])[0] for p in VECTORS}  # type: ignore[arg-type]
    assert {int(t) for t in ccid.CcidMessageType} <= covered


def test_status_decoding() -> None:
    msg, _ = decode_ccid(h("80 00000000 00 04 42 fe 00"))
    assert isinstance(msg, CcidDataBlock)
    assert msg.status.icc_status is IccStatus.ABSENT
    assert msg.status.command_status is CommandStatus.FAILED
    assert msg.status.error is CcidError.ICC_MUTE
    assert msg.status.failed
    assert "error=ICC_MUTE" in describe_ccid(msg)
    # an unlisted bError (offset of a bad parameter) stays a plain int
    msg, _ = decode_ccid(h("81 00000000 00 04 40 05 00"))
    assert isinstance(msg, CcidSlotStatus)
    assert msg.status.error == 5 and not isinstance(msg.status.error, CcidError)
    # bError of a processed command is not an error name
    msg, _ = decode_ccid(h("81 00000000 00 04 00 fe 00"))
    assert isinstance(msg, CcidSlotStatus)
    assert not isinstance(msg.status.error, CcidError)


@pytest.mark.parametrize(
    ("name", "value"),
    [("CMD_ABORTED", 0xFF), ("ICC_MUTE", 0xFE), ("XFR_PARITY_ERROR", 0xFD),
     ("XFR_OVERRUN", 0xFC), ("HW_ERROR", 0xFB), ("BAD_ATR_TS", 0xF8), ("BAD_ATR_TCK", 0xF7),
     ("ICC_PROTOCOL_NOT_SUPPORTED", 0xF6), ("ICC_CLASS_NOT_SUPPORTED", 0xF5),
     ("PROCEDURE_BYTE_CONFLICT", 0xF4), ("DEACTIVATED_PROTOCOL", 0xF3),
     ("BUSY_WITH_AUTO_SEQUENCE", 0xF2), ("PIN_TIMEOUT", 0xF0), ("PIN_CANCELLED", 0xEF),
     ("CMD_SLOT_BUSY", 0xE0)],
)
def test_error_codes_table_6_2_2(name: str, value: int) -> None:
    assert CcidError[name] == value


# QEMU 7.2 hw/usb/dev-smartcard-reader.c qemu_ccid_descriptor (section 5.1, 54 bytes)
QEMU_DESCRIPTOR = h(
    "36 21 1001 00 07 01000000 a00f0000 00000100 00 80250000 00c20100 00"
    " fe000000 00000000 00000000 fe040100 12000100 ff ff 0000 01 01"
)


def test_qemu_descriptor() -> None:
    desc = parse_ccid_descriptor(QEMU_DESCRIPTOR)
    assert desc.bcd_ccid == 0x0110 and desc.version == "1.10"
    assert int(desc.features) == 0x000104FE
    assert desc.exchange_level is ExchangeLevel.TPDU
    assert CcidFeatures.AUTO_IFSD in desc.features
    assert CcidFeatures.AUTO_PARAMETERS_FROM_ATR in desc.features
    assert CcidFeatures.SHORT_APDU_LEVEL not in desc.features
    assert desc.slots == 1 and desc.supports_t0 and not desc.supports_t1
    assert desc.default_clock == 4000 and desc.max_data_rate == 115200
    assert desc.max_message_length == 0x00010012
    assert desc.pin_support == 1 and desc.max_busy_slots == 1
    assert build_ccid_descriptor(desc) == QEMU_DESCRIPTOR


@pytest.mark.parametrize(
    "bad",
    [QEMU_DESCRIPTOR[:-1], b"\x37" + QEMU_DESCRIPTOR[1:], QEMU_DESCRIPTOR[:1] + b"\x22"
     + QEMU_DESCRIPTOR[2:], b""],
)
def test_bad_descriptor(bad: bytes) -> None:
    with pytest.raises(DecodeError):
        parse_ccid_descriptor(bad)


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(h("6f 0c000000 00 03 00 0000 00a4"), id="short-data"),
        pytest.param(h("6f 00000000 00"), id="short-header"),
        pytest.param(b"", id="empty"),
        pytest.param(h("62 01000000 00 01 00 0000 00"), id="power-on-with-data"),
        pytest.param(h("73 04000000 00 01 00 0000 00000000"), id="set-rate-wrong-length"),
        pytest.param(h("50"), id="notify-empty"),
        pytest.param(h("51 00 01"), id="hw-error-short"),
    ],
)
def test_malformed(wire: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_ccid(wire)


def test_direction_check() -> None:
    wire = encode_ccid(CcidXfrBlock(0, 1, b"\x00"))
    assert decode_ccid(wire, direction=CcidDirection.PC_TO_RDR)[0] == CcidXfrBlock(0, 1, b"\x00")
    with pytest.raises(DecodeError):
        decode_ccid(wire, direction=CcidDirection.RDR_TO_PC)


def test_over_long_length_rejected_before_data() -> None:
    header = h("6f ffffff7f 00 01 000000")  # dwLength 2 GiB, no data
    with pytest.raises(DecodeError, match="cap"):
        decode_ccid(header, max_length=4096)
    stream = CcidStream(max_length=4096)
    stream.receive_data(header)
    with pytest.raises(DecodeError, match="cap"):
        stream.next_event()


@pytest.mark.parametrize(
    "msg",
    [
        CcidXfrBlock(256, 0),
        CcidXfrBlock(0, 0, b"", level_parameter=0x10000),
        CcidDataBlock(0, 0, SlotStatus(4, 0, 0)),
        CcidSetParameters(0, 0, 1, T0Parameters()),
        CcidSetParameters(0, 0, 0, b"\x00" * 5),
        CcidUnknown(0, 0, 0x6F),
        CcidUnknown(0, 0, 0x99, b"\x00"),
        CcidHardwareError(0, 0, 256),
    ],
)
def test_unencodable(msg: CcidMessage) -> None:
    with pytest.raises(EncodeError):
        encode_ccid(msg)


# --- hypothesis --------------------------------------------------------------------------

u8 = st.integers(0, 255)
u32 = st.integers(0, 0xFFFFFFFF)
data = st.binary(max_size=300)
statuses = st.builds(
    SlotStatus,
    st.integers(0, 3),
    st.integers(0, 3),
    u8,
).map(lambda s: decode_ccid(encode_ccid(CcidSlotStatus(0, 0, s)))[0].status)  # type: ignore[union-attr]
t0 = st.builds(T0Parameters, u8, u8, u8, u8, u8)
t1 = st.builds(T1Parameters, u8, u8, u8, u8, u8, u8, u8)
raw_params = st.tuples(st.integers(2, 255), data).map(lambda pd: (pd[0], pd[1]))
params = st.one_of(
    t0.map(lambda p: (0, p)), t1.map(lambda p: (1, p)), raw_params,
)

messages: st.SearchStrategy[CcidMessage] = st.one_of(
    st.builds(CcidIccPowerOn, u8, u8, u8),
    st.builds(CcidIccPowerOff, u8, u8),
    st.builds(CcidGetSlotStatus, u8, u8),
    st.builds(CcidXfrBlock, u8, u8, data, u8, st.integers(0, 0xFFFF)),
    st.builds(CcidGetParameters, u8, u8),
    st.builds(CcidResetParameters, u8, u8),
    st.tuples(u8, u8, params).map(lambda t: CcidSetParameters(t[0], t[1], t[2][0], t[2][1])),
    st.builds(CcidEscape, u8, u8, data),
    st.builds(CcidIccClock, u8, u8, u8),
    st.builds(CcidT0Apdu, u8, u8, u8, u8, u8),
    st.builds(CcidSecure, u8, u8, data, u8, st.integers(0, 0xFFFF)),
    st.builds(CcidMechanical, u8, u8, u8),
    st.builds(CcidAbort, u8, u8),
    st.builds(CcidSetDataRateAndClockFrequency, u8, u8, u32, u32),
    st.builds(CcidDataBlock, u8, u8, statuses, data, u8),
    st.builds(CcidSlotStatus, u8, u8, statuses, u8),
    st.tuples(u8, u8, statuses, params).map(
        lambda t: CcidParameters(t[0], t[1], t[2], t[3][0], t[3][1])
    ),
    st.builds(CcidEscapeResponse, u8, u8, statuses, data),
    st.builds(CcidDataRateAndClockFrequency, u8, u8, statuses, u32, u32),
    st.builds(CcidHardwareError, u8, u8, u8),
    st.builds(
        CcidNotifySlotChange,
        st.lists(st.builds(SlotState, st.booleans(), st.booleans()), min_size=1, max_size=3)
        .map(lambda states: tuple(states * 4)),
    ),
    st.builds(CcidUnknown, u8, u8, st.integers(0x00, 0x4F) | st.integers(0x85, 0xFF),
              st.binary(min_size=3, max_size=3), data),
)

BULK = messages.filter(lambda m: not isinstance(m, CcidNotifySlotChange | CcidHardwareError))


@settings(max_examples=200)
@given(messages)
def test_round_trip(msg: CcidMessage) -> None:
    wire = encode_ccid(msg)
    decoded, used = decode_ccid(wire)
    assert decoded == msg
    assert used == len(wire)
    assert encode_ccid(decoded) == wire
    describe_ccid(decoded)


@settings(max_examples=200)
@given(st.binary(max_size=64), st.integers(0, 255))
def test_garbage_raises_only_decode_error(blob: bytes, first: int) -> None:
    for candidate in (blob, bytes([first]) + blob):
        try:
            msg, used = decode_ccid(candidate, max_length=1024)
        except DecodeError:
            continue
        assert 0 < used <= len(candidate)
        describe_ccid(msg)


@settings(max_examples=100)
@given(st.lists(BULK, min_size=1, max_size=6), st.data())
def test_stream_chunking_invariance(msgs: list[CcidMessage], draw: st.DataObject) -> None:
    wire = b"".join(encode_ccid(m) for m in msgs)
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    stream = CcidStream()
    out: list[CcidMessage] = []
    last = 0
    for cut in [*cuts, len(wire)]:
        stream.receive_data(wire[last:cut])
        last = cut
        while (event := stream.next_event()) is not None:
            out.append(event)
    assert out == msgs
    assert stream.buffered == 0


@settings(max_examples=200)
@given(st.binary(min_size=10, max_size=40))
def test_fast_header_matches_construct_declaration(blob: bytes) -> None:
    """The struct fast path reads the header exactly as the construct declaration does."""
    declared = ccid._HEADER.parse(blob)
    fields = struct.unpack_from("<BIBBBBB", blob)
    assert (declared.message_type, declared.length, declared.slot, declared.seq) == fields[:4]
    assert declared.specific == bytes(fields[4:])
    length = declared.length
    try:
        msg, used = decode_ccid(blob, max_length=1 << 32)
    except DecodeError:
        assert len(blob) < 10 + length or blob[0] in (0x62, 0x63, 0x65, 0x6C, 0x6D, 0x6E,
                                                      0x6A, 0x71, 0x72, 0x73, 0x81, 0x84)
        return
    if blob[0] not in (0x50, 0x51):
        assert used == 10 + length
        whole = ccid._BULK_MESSAGE.parse(blob)
        assert encode_ccid(msg)[:1] == blob[:1]
        assert len(whole.data) == length


@settings(max_examples=100)
@given(st.builds(CcidXfrBlock, u8, u8, data, u8, st.integers(0, 0xFFFF)))
def test_fast_encode_matches_construct_declaration(msg: CcidXfrBlock) -> None:
    wire = encode_ccid(msg)
    declared = ccid._BULK_MESSAGE.build(
        {
            "header": {
                "message_type": 0x6F,
                "length": len(msg.data),
                "slot": msg.slot,
                "seq": msg.seq,
                "specific": bytes([msg.bwi]) + msg.level_parameter.to_bytes(2, "little"),
            },
            "data": msg.data,
        }
    )
    assert wire == declared
