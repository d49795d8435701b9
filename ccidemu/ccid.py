"""USB CCID messages: the bulk and interrupt wire format between a host and a CCID reader.

Spec: USB "Specification for Integrated Circuit(s) Cards Interface Devices", revision 1.1
(CCID rev 1.1).  Section numbers below refer to it.

Every bulk message (section 6.1 PC_to_RDR, section 6.2 RDR_to_PC) starts with the same
10-byte header, all multi-byte fields little-endian::

    bMessageType u8 | dwLength u32 | bSlot u8 | bSeq u8 | 3 message-specific bytes

followed by ``dwLength`` bytes of data.  The message type byte alone tells the direction
(0x6x/0x7x host to reader, 0x8x reader to host, 0x5x interrupt-IN, section 6.3), so
:func:`decode_ccid` needs no direction argument.  Interrupt-IN messages have no header:
they are one USB transfer each and :func:`decode_ccid` consumes the whole buffer for them.

Theory of operation: one frozen dataclass per message type, each with ``slot`` and ``seq``
first (except NotifySlotChange, which describes all slots).  The header is packed with a
precompiled :mod:`struct` (the XfrBlock/DataBlock path is benchmarked); the construct
declaration :data:`_HEADER` documents the same layout and the tests check both agree.
Unknown message types decode to :class:`CcidUnknown` instead of failing; unknown error
and status codes stay plain ints.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import construct
from construct import Bytes, Int8ul, Int16ul, Int32ul, this

from ccidemu._wire import DEFAULT_MAX_LENGTH, FrameStream, check_length
from ccidemu._wire import build as _build
from ccidemu._wire import parse as _parse
from ccidemu.errors import DecodeError, EncodeError

__all__ = [
    "HEADER_LENGTH",
    "CcidAbort",
    "CcidDataBlock",
    "CcidDataRateAndClockFrequency",
    "CcidDescriptor",
    "CcidDirection",
    "CcidError",
    "CcidEscape",
    "CcidEscapeResponse",
    "CcidFeatures",
    "CcidGetParameters",
    "CcidGetSlotStatus",
    "CcidHardwareError",
    "CcidIccClock",
    "CcidIccPowerOff",
    "CcidIccPowerOn",
    "CcidMechanical",
    "CcidMessage",
    "CcidMessageType",
    "CcidNotifySlotChange",
    "CcidParameters",
    "CcidResetParameters",
    "CcidSecure",
    "CcidSetDataRateAndClockFrequency",
    "CcidSetParameters",
    "CcidSlotStatus",
    "CcidStream",
    "CcidT0Apdu",
    "CcidUnknown",
    "CcidXfrBlock",
    "ClockStatus",
    "CommandStatus",
    "ExchangeLevel",
    "IccStatus",
    "PowerSelect",
    "SlotState",
    "SlotStatus",
    "T0Parameters",
    "T1Parameters",
    "build_ccid_descriptor",
    "decode_ccid",
    "describe_ccid",
    "encode_ccid",
    "parse_ccid_descriptor",
]

HEADER_LENGTH = 10


class CcidMessageType(enum.IntEnum):
    """bMessageType values: section 6.1 (PC_to_RDR), 6.2 (RDR_to_PC), 6.3 (interrupt-IN)."""

    PC_TO_RDR_SET_PARAMETERS = 0x61  # 6.1.7
    PC_TO_RDR_ICC_POWER_ON = 0x62  # 6.1.1
    PC_TO_RDR_ICC_POWER_OFF = 0x63  # 6.1.2
    PC_TO_RDR_GET_SLOT_STATUS = 0x65  # 6.1.3
    PC_TO_RDR_SECURE = 0x69  # 6.1.11
    PC_TO_RDR_T0_APDU = 0x6A  # 6.1.10
    PC_TO_RDR_ESCAPE = 0x6B  # 6.1.8
    PC_TO_RDR_GET_PARAMETERS = 0x6C  # 6.1.5
    PC_TO_RDR_RESET_PARAMETERS = 0x6D  # 6.1.6
    PC_TO_RDR_ICC_CLOCK = 0x6E  # 6.1.9
    PC_TO_RDR_XFR_BLOCK = 0x6F  # 6.1.4
    PC_TO_RDR_MECHANICAL = 0x71  # 6.1.12
    PC_TO_RDR_ABORT = 0x72  # 6.1.13
    PC_TO_RDR_SET_DATA_RATE_AND_CLOCK_FREQUENCY = 0x73  # 6.1.14
    RDR_TO_PC_DATA_BLOCK = 0x80  # 6.2.1
    RDR_TO_PC_SLOT_STATUS = 0x81  # 6.2.2
    RDR_TO_PC_PARAMETERS = 0x82  # 6.2.3
    RDR_TO_PC_ESCAPE = 0x83  # 6.2.4
    RDR_TO_PC_DATA_RATE_AND_CLOCK_FREQUENCY = 0x84  # 6.2.5
    RDR_TO_PC_NOTIFY_SLOT_CHANGE = 0x50  # 6.3.1
    RDR_TO_PC_HARDWARE_ERROR = 0x51  # 6.3.2


class CcidDirection(enum.Enum):
    """Which pipe a message travels on (section 3.2: bulk-OUT, bulk-IN, interrupt-IN)."""

    PC_TO_RDR = "out"
    RDR_TO_PC = "in"
    INTERRUPT = "interrupt"


class IccStatus(enum.IntEnum):
    """bStatus bits 0-1, bmICCStatus (section 6.2.6)."""

    PRESENT_ACTIVE = 0
    PRESENT_INACTIVE = 1
    ABSENT = 2


class CommandStatus(enum.IntEnum):
    """bStatus bits 6-7, bmCommandStatus (section 6.2.6)."""

    PROCESSED = 0
    FAILED = 1
    TIME_EXTENSION = 2


class CcidError(enum.IntEnum):
    """bError slot error register when bmCommandStatus is FAILED (section 6.2.6, table 6.2-2).

    Values 0x01-0x7F (not listed) name the offset of a bad header field; 0x81-0xC0 are
    user-defined; both stay plain ints.
    """

    CMD_NOT_SUPPORTED = 0x00
    CMD_ABORTED = 0xFF
    ICC_MUTE = 0xFE
    XFR_PARITY_ERROR = 0xFD
    XFR_OVERRUN = 0xFC
    HW_ERROR = 0xFB
    BAD_ATR_TS = 0xF8
    BAD_ATR_TCK = 0xF7
    ICC_PROTOCOL_NOT_SUPPORTED = 0xF6
    ICC_CLASS_NOT_SUPPORTED = 0xF5
    PROCEDURE_BYTE_CONFLICT = 0xF4
    DEACTIVATED_PROTOCOL = 0xF3
    BUSY_WITH_AUTO_SEQUENCE = 0xF2
    PIN_TIMEOUT = 0xF0
    PIN_CANCELLED = 0xEF
    CMD_SLOT_BUSY = 0xE0


class PowerSelect(enum.IntEnum):
    """IccPowerOn bPowerSelect (section 6.1.1)."""

    AUTOMATIC = 0
    V5_0 = 1
    V3_0 = 2
    V1_8 = 3


class ClockStatus(enum.IntEnum):
    """SlotStatus bClockStatus (section 6.2.2)."""

    RUNNING = 0
    STOPPED_LOW = 1
    STOPPED_HIGH = 2
    STOPPED_UNKNOWN = 3


class ExchangeLevel(enum.IntEnum):
    """dwFeatures bits 16-18: the exchange level (section 5.1, table 5.1-1)."""

    CHARACTER = 0x00000000
    TPDU = 0x00010000
    SHORT_APDU = 0x00020000
    EXTENDED_APDU = 0x00040000


class CcidFeatures(enum.IntFlag):
    """dwFeatures (section 5.1, table 5.1-1).  Unknown bits are kept."""

    AUTO_PARAMETERS_FROM_ATR = 0x00000002
    AUTO_ACTIVATION_ON_INSERT = 0x00000004
    AUTO_VOLTAGE = 0x00000008
    AUTO_CLOCK_FREQUENCY = 0x00000010
    AUTO_BAUD_RATE = 0x00000020
    AUTO_PARAMETERS_NEGOTIATION = 0x00000040
    AUTO_PPS = 0x00000080
    CLOCK_STOP = 0x00000100
    NAD_NOT_ZERO = 0x00000200
    AUTO_IFSD = 0x00000400
    TPDU_LEVEL = 0x00010000
    SHORT_APDU_LEVEL = 0x00020000
    EXTENDED_APDU_LEVEL = 0x00040000
    USB_WAKE_UP = 0x00100000


_EXCHANGE_MASK = 0x00070000


# --- status and protocol data structures -------------------------------------------------


def _enum_or_int(enum_type: type[enum.IntEnum], value: int) -> int:
    try:
        return enum_type(value)
    except ValueError:
        return value


@dataclass(frozen=True, slots=True)
class SlotStatus:
    """bStatus + bError of every RDR_to_PC message (section 6.2.6).

    ``error`` is a :class:`CcidError` when the command failed; otherwise it is the raw
    bError (0, or the BWT multiplier for a time extension request).
    """

    icc_status: int = IccStatus.PRESENT_ACTIVE
    command_status: int = CommandStatus.PROCESSED
    error: int = 0

    @property
    def failed(self) -> bool:
        return self.command_status == CommandStatus.FAILED

    def describe(self) -> str:
        icc = self.icc_status
        icc_text = (
            icc.name.lower().replace("_", "-") if isinstance(icc, IccStatus) else f"rfu{icc}"
        )
        cmd = self.command_status
        cmd_text = (
            cmd.name.lower().replace("_", "-") if isinstance(cmd, CommandStatus) else f"rfu{cmd}"
        )
        text = f"icc={icc_text} cmd={cmd_text}"
        if self.failed:
            err = self.error
            text += f" error={err.name if isinstance(err, CcidError) else f'{err:02X}'}"
        elif self.error:
            text += f" bError={self.error:02X}"
        return text


def _decode_status(b_status: int, b_error: int) -> SlotStatus:
    icc = _enum_or_int(IccStatus, b_status & 0x03)
    cmd = _enum_or_int(CommandStatus, b_status >> 6)
    err = _enum_or_int(CcidError, b_error) if cmd == CommandStatus.FAILED else b_error
    return SlotStatus(icc, cmd, err)


def _encode_status(status: SlotStatus) -> tuple[int, int]:
    if not (0 <= status.icc_status <= 3 and 0 <= status.command_status <= 3):
        raise EncodeError(f"slot status out of range: {status}")
    return status.icc_status | (status.command_status << 6), status.error


@dataclass(frozen=True, slots=True)
class T0Parameters:
    """abProtocolDataStructure for T=0, 5 bytes (section 6.1.7, table 6.1-1 ... protocol T=0).

    ``tcckst0`` bit 1 is the convention (0 direct, 1 inverse).
    """

    findex_dindex: int = 0x11
    tcckst0: int = 0x00
    guard_time: int = 0x00
    waiting_integer: int = 0x0A
    clock_stop: int = 0x00

    def encode(self) -> bytes:
        try:
            return _T0_STRUCT.pack(
                self.findex_dindex, self.tcckst0, self.guard_time,
                self.waiting_integer, self.clock_stop,
            )
        except struct.error as exc:
            raise EncodeError(f"cannot encode T=0 parameters: {exc}") from None


@dataclass(frozen=True, slots=True)
class T1Parameters:
    """abProtocolDataStructure for T=1, 7 bytes (section 6.1.7, protocol T=1).

    ``tcckst1`` bit 0 selects CRC (else LRC), bit 1 the inverse convention.
    """

    findex_dindex: int = 0x11
    tcckst1: int = 0x10
    guard_time: int = 0x00
    waiting_integers: int = 0x4D
    clock_stop: int = 0x00
    ifsc: int = 0x20
    nad: int = 0x00

    def encode(self) -> bytes:
        try:
            return _T1_STRUCT.pack(
                self.findex_dindex, self.tcckst1, self.guard_time, self.waiting_integers,
                self.clock_stop, self.ifsc, self.nad,
            )
        except struct.error as exc:
            raise EncodeError(f"cannot encode T=1 parameters: {exc}") from None


ProtocolData = T0Parameters | T1Parameters | bytes

_T0_STRUCT = struct.Struct("<5B")
_T1_STRUCT = struct.Struct("<7B")


def _decode_protocol_data(protocol: int, data: bytes) -> ProtocolData:
    """bProtocolNum 0 with 5 bytes or 1 with 7 bytes is decoded; anything else stays raw."""
    if protocol == 0 and len(data) == 5:
        return T0Parameters(*_T0_STRUCT.unpack(data))
    if protocol == 1 and len(data) == 7:
        return T1Parameters(*_T1_STRUCT.unpack(data))
    return bytes(data)


def _encode_protocol_data(protocol: int, params: ProtocolData) -> bytes:
    if isinstance(params, T0Parameters):
        if protocol != 0:
            raise EncodeError(f"T=0 parameters with bProtocolNum {protocol}")
        return params.encode()
    if isinstance(params, T1Parameters):
        if protocol != 1:
            raise EncodeError(f"T=1 parameters with bProtocolNum {protocol}")
        return params.encode()
    if (protocol, len(params)) in ((0, 5), (1, 7)):
        raise EncodeError("raw protocol data that decodes as T0/T1Parameters: use the dataclass")
    return bytes(params)


# --- messages ------------------------------------------------------------------------------
# PC_to_RDR, section 6.1


@dataclass(frozen=True, slots=True)
class CcidIccPowerOn:
    """6.1.1 PC_to_RDR_IccPowerOn: bPowerSelect, abRFU[2]; no data."""

    slot: int
    seq: int
    power_select: int = PowerSelect.AUTOMATIC


@dataclass(frozen=True, slots=True)
class CcidIccPowerOff:
    """6.1.2 PC_to_RDR_IccPowerOff."""

    slot: int
    seq: int


@dataclass(frozen=True, slots=True)
class CcidGetSlotStatus:
    """6.1.3 PC_to_RDR_GetSlotStatus."""

    slot: int
    seq: int


@dataclass(frozen=True, slots=True)
class CcidXfrBlock:
    """6.1.4 PC_to_RDR_XfrBlock: bBWI, wLevelParameter; data = TPDU/APDU/characters."""

    slot: int
    seq: int
    data: bytes = b""
    bwi: int = 0
    level_parameter: int = 0


@dataclass(frozen=True, slots=True)
class CcidGetParameters:
    """6.1.5 PC_to_RDR_GetParameters."""

    slot: int
    seq: int


@dataclass(frozen=True, slots=True)
class CcidResetParameters:
    """6.1.6 PC_to_RDR_ResetParameters."""

    slot: int
    seq: int


@dataclass(frozen=True, slots=True)
class CcidSetParameters:
    """6.1.7 PC_to_RDR_SetParameters: bProtocolNum, abRFU[2]; abProtocolDataStructure."""

    slot: int
    seq: int
    protocol: int
    parameters: ProtocolData


@dataclass(frozen=True, slots=True)
class CcidEscape:
    """6.1.8 PC_to_RDR_Escape: vendor data."""

    slot: int
    seq: int
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class CcidIccClock:
    """6.1.9 PC_to_RDR_IccClock: bClockCommand 0 restart, 1 stop."""

    slot: int
    seq: int
    clock_command: int = 0


@dataclass(frozen=True, slots=True)
class CcidT0Apdu:
    """6.1.10 PC_to_RDR_T0APDU: bmChanges, bClassGetResponse, bClassEnvelope."""

    slot: int
    seq: int
    changes: int = 0
    class_get_response: int = 0
    class_envelope: int = 0


@dataclass(frozen=True, slots=True)
class CcidSecure:
    """6.1.11 PC_to_RDR_Secure: bBWI, wLevelParameter; abPINOperationDataStructure (raw)."""

    slot: int
    seq: int
    data: bytes = b""
    bwi: int = 0
    level_parameter: int = 0

    @property
    def pin_operation(self) -> int | None:
        """bPINOperation: 0 verify, 1 modify, 2 transfer, 3 wait ICC, 4 cancel, ..."""
        return self.data[0] if self.data else None


@dataclass(frozen=True, slots=True)
class CcidMechanical:
    """6.1.12 PC_to_RDR_Mechanical: bFunction 1 accept, 2 eject, 3 capture, 4 lock, 5 unlock."""

    slot: int
    seq: int
    function: int = 0


@dataclass(frozen=True, slots=True)
class CcidAbort:
    """6.1.13 PC_to_RDR_Abort."""

    slot: int
    seq: int


@dataclass(frozen=True, slots=True)
class CcidSetDataRateAndClockFrequency:
    """6.1.14 PC_to_RDR_SetDataRateAndClockFrequency: dwClockFrequency (kHz), dwDataRate."""

    slot: int
    seq: int
    clock_frequency: int = 0
    data_rate: int = 0


# RDR_to_PC, section 6.2


@dataclass(frozen=True, slots=True)
class CcidDataBlock:
    """6.2.1 RDR_to_PC_DataBlock: bStatus, bError, bChainParameter; data (ATR or response)."""

    slot: int
    seq: int
    status: SlotStatus = field(default_factory=SlotStatus)
    data: bytes = b""
    chain_parameter: int = 0


@dataclass(frozen=True, slots=True)
class CcidSlotStatus:
    """6.2.2 RDR_to_PC_SlotStatus: bStatus, bError, bClockStatus."""

    slot: int
    seq: int
    status: SlotStatus = field(default_factory=SlotStatus)
    clock_status: int = ClockStatus.RUNNING


@dataclass(frozen=True, slots=True)
class CcidParameters:
    """6.2.3 RDR_to_PC_Parameters: bStatus, bError, bProtocolNum; abProtocolDataStructure."""

    slot: int
    seq: int
    status: SlotStatus = field(default_factory=SlotStatus)
    protocol: int = 0
    parameters: ProtocolData = b""


@dataclass(frozen=True, slots=True)
class CcidEscapeResponse:
    """6.2.4 RDR_to_PC_Escape: bStatus, bError, bRFU; vendor data."""

    slot: int
    seq: int
    status: SlotStatus = field(default_factory=SlotStatus)
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class CcidDataRateAndClockFrequency:
    """6.2.5 RDR_to_PC_DataRateAndClockFrequency: dwClockFrequency, dwDataRate."""

    slot: int
    seq: int
    status: SlotStatus = field(default_factory=SlotStatus)
    clock_frequency: int = 0
    data_rate: int = 0


# Interrupt-IN, section 6.3


@dataclass(frozen=True, slots=True)
class SlotState:
    """Two bits of bmSlotICCState (section 6.3.1): bit 0 card present, bit 1 changed."""

    present: bool
    changed: bool = False


@dataclass(frozen=True, slots=True)
class CcidNotifySlotChange:
    """6.3.1 RDR_to_PC_NotifySlotChange: bmSlotICCState, 2 bits per slot, slot 0 lowest.

    No slot/seq: it covers every slot.  Decoding yields 4 states per byte received.
    """

    states: tuple[SlotState, ...]


@dataclass(frozen=True, slots=True)
class CcidHardwareError:
    """6.3.2 RDR_to_PC_HardwareError: bSlot, bSeq, bHardwareErrorCode (01 = overcurrent)."""

    slot: int
    seq: int
    code: int = 1


@dataclass(frozen=True, slots=True)
class CcidUnknown:
    """A bulk message of a type this module does not know, kept whole."""

    slot: int
    seq: int
    message_type: int
    specific: bytes = b"\x00\x00\x00"
    data: bytes = b""


CcidMessage = (
    CcidIccPowerOn | CcidIccPowerOff | CcidGetSlotStatus | CcidXfrBlock | CcidGetParameters
    | CcidResetParameters | CcidSetParameters | CcidEscape | CcidIccClock | CcidT0Apdu
    | CcidSecure | CcidMechanical | CcidAbort | CcidSetDataRateAndClockFrequency
    | CcidDataBlock | CcidSlotStatus | CcidParameters | CcidEscapeResponse
    | CcidDataRateAndClockFrequency | CcidNotifySlotChange | CcidHardwareError | CcidUnknown
)

_T = CcidMessageType

#: class -> message type, for encoding and describing.
_TYPE_OF: dict[type, CcidMessageType] = {
    CcidSetParameters: _T.PC_TO_RDR_SET_PARAMETERS,
    CcidIccPowerOn: _T.PC_TO_RDR_ICC_POWER_ON,
    CcidIccPowerOff: _T.PC_TO_RDR_ICC_POWER_OFF,
    CcidGetSlotStatus: _T.PC_TO_RDR_GET_SLOT_STATUS,
    CcidSecure: _T.PC_TO_RDR_SECURE,
    CcidT0Apdu: _T.PC_TO_RDR_T0_APDU,
    CcidEscape: _T.PC_TO_RDR_ESCAPE,
    CcidGetParameters: _T.PC_TO_RDR_GET_PARAMETERS,
    CcidResetParameters: _T.PC_TO_RDR_RESET_PARAMETERS,
    CcidIccClock: _T.PC_TO_RDR_ICC_CLOCK,
    CcidXfrBlock: _T.PC_TO_RDR_XFR_BLOCK,
    CcidMechanical: _T.PC_TO_RDR_MECHANICAL,
    CcidAbort: _T.PC_TO_RDR_ABORT,
    CcidSetDataRateAndClockFrequency: _T.PC_TO_RDR_SET_DATA_RATE_AND_CLOCK_FREQUENCY,
    CcidDataBlock: _T.RDR_TO_PC_DATA_BLOCK,
    CcidSlotStatus: _T.RDR_TO_PC_SLOT_STATUS,
    CcidParameters: _T.RDR_TO_PC_PARAMETERS,
    CcidEscapeResponse: _T.RDR_TO_PC_ESCAPE,
    CcidDataRateAndClockFrequency: _T.RDR_TO_PC_DATA_RATE_AND_CLOCK_FREQUENCY,
    CcidNotifySlotChange: _T.RDR_TO_PC_NOTIFY_SLOT_CHANGE,
    CcidHardwareError: _T.RDR_TO_PC_HARDWARE_ERROR,
}


def direction_of(message_type: int) -> CcidDirection | None:
    """The pipe a message type travels on (section 6), None for an unknown type."""
    if message_type in (0x50, 0x51):
        return CcidDirection.INTERRUPT
    if message_type in _DECODERS:
        return CcidDirection.PC_TO_RDR if message_type < 0x80 else CcidDirection.RDR_TO_PC
    return None


# --- wire format ---------------------------------------------------------------------------

#: Section 6.1/6.2 common header, the declaration the hand-written fast path must match.
_HEADER = construct.Struct(
    "message_type" / Int8ul,
    "length" / Int32ul,
    "slot" / Int8ul,
    "seq" / Int8ul,
    "specific" / Bytes(3),
)
#: A whole bulk message: header then dwLength bytes.
_BULK_MESSAGE = construct.Struct(
    "header" / _HEADER,
    "data" / Bytes(this.header.length),
)

# Fast path: bMessageType, dwLength, bSlot, bSeq, then the 3 specific bytes as
# (u8, u8, u8) or (u8, u16) (bBWI + wLevelParameter in XfrBlock/Secure).
_HDR_BBB = struct.Struct("<BIBBBBB")
_U32X2 = struct.Struct("<II")


def _need_length(name: str, length: int, expected: int) -> None:
    if length != expected:
        raise DecodeError(f"{name}: dwLength {length}, expected {expected}")


def _d_power_on(slot: int, seq: int, a: int, b: int, c: int, data: bytes) -> CcidMessage:
    _need_length("IccPowerOn", len(data), 0)
    return CcidIccPowerOn(slot, seq, _enum_or_int(PowerSelect, a))


_Decoder = Callable[[int, int, int, int, int, bytes], CcidMessage]


def _simple(
    cls: type[CcidIccPowerOff | CcidGetSlotStatus | CcidGetParameters | CcidResetParameters
              | CcidAbort],
    name: str,
) -> _Decoder:
    def decode(slot: int, seq: int, a: int, b: int, c: int, data: bytes) -> CcidMessage:
        _need_length(name, len(data), 0)
        return cls(slot, seq)

    return decode


def _d_xfr(slot: int, seq: int, a: int, b: int, c: int, data: bytes) -> CcidMessage:
    return CcidXfrBlock(slot, seq, data, a, b | (c << 8))


def _d_secure(slot: int, seq: int, a: int, b: int, c: int, data: bytes) -> CcidMessage:
    return CcidSecure(slot, seq, data, a, b | (c << 8))


def _d_set_params(slot: int, seq: int, a: int, b: int, c: int, data: bytes) -> CcidMessage:
    return CcidSetParameters(slot, seq, a, _decode_protocol_data(a, data))


def _d_escape(slot: int, seq: int, a: int, b: int, c: int, data: bytes) -> CcidMessage:
    return CcidEscape(slot, seq, data)


def _d_clock(slot: int, seq: int, a: int, b: int, c: int, data: bytes) -> CcidMessage:
    _need_length("IccClock", len(data), 0)
    return CcidIccClock(slot, seq, a)


def _d_t0apdu(slot: int, seq: int, a: int, b: int, c: int, data: bytes) -> CcidMessage:
    _need_length("T0APDU", len(data), 0)
    return CcidT0Apdu(slot, seq, a, b, c)


def _d_mechanical(slot: int, seq: int, a: int, b: int, c: int, data: bytes) -> CcidMessage:
    _need_length("Mechanical", len(data), 0)
    return CcidMechanical(slot, seq, a)


def _d_set_rate(slot: int, seq: int, a: int, b: int, c: int, data: bytes) -> CcidMessage:
    _need_length("SetDataRateAndClockFrequency", len(data), 8)
    clock, rate = _U32X2.unpack(data)
    return CcidSetDataRateAndClockFrequency(slot, seq, clock, rate)


def _d_data_block(slot: int, seq: int, a: int, b: int, c: int, data: bytes) -> CcidMessage:
    return CcidDataBlock(slot, seq, _decode_status(a, b), data, c)


def _d_slot_status(slot: int, seq: int, a: int, b: int, c: int, data: bytes) -> CcidMessage:
    _need_length("SlotStatus", len(data), 0)
    return CcidSlotStatus(slot, seq, _decode_status(a, b), _enum_or_int(ClockStatus, c))


def _d_parameters(slot: int, seq: int, a: int, b: int, c: int, data: bytes) -> CcidMessage:
    return CcidParameters(slot, seq, _decode_status(a, b), c, _decode_protocol_data(c, data))


def _d_escape_resp(slot: int, seq: int, a: int, b: int, c: int, data: bytes) -> CcidMessage:
    return CcidEscapeResponse(slot, seq, _decode_status(a, b), data)


def _d_rate(slot: int, seq: int, a: int, b: int, c: int, data: bytes) -> CcidMessage:
    _need_length("DataRateAndClockFrequency", len(data), 8)
    clock, rate = _U32X2.unpack(data)
    return CcidDataRateAndClockFrequency(slot, seq, _decode_status(a, b), clock, rate)


_DECODERS: dict[int, _Decoder] = {
    0x61: _d_set_params,
    0x62: _d_power_on,
    0x63: _simple(CcidIccPowerOff, "IccPowerOff"),
    0x65: _simple(CcidGetSlotStatus, "GetSlotStatus"),
    0x69: _d_secure,
    0x6A: _d_t0apdu,
    0x6B: _d_escape,
    0x6C: _simple(CcidGetParameters, "GetParameters"),
    0x6D: _simple(CcidResetParameters, "ResetParameters"),
    0x6E: _d_clock,
    0x6F: _d_xfr,
    0x71: _d_mechanical,
    0x72: _simple(CcidAbort, "Abort"),
    0x73: _d_set_rate,
    0x80: _d_data_block,
    0x81: _d_slot_status,
    0x82: _d_parameters,
    0x83: _d_escape_resp,
    0x84: _d_rate,
}


def _decode_interrupt(data: bytes | bytearray | memoryview) -> tuple[CcidMessage, int]:
    if data[0] == 0x50:
        if len(data) < 2:
            raise DecodeError("NotifySlotChange without bmSlotICCState")
        states = tuple(
            SlotState(bool(byte >> shift & 1), bool(byte >> shift & 2))
            for byte in data[1:]
            for shift in (0, 2, 4, 6)
        )
        return CcidNotifySlotChange(states), len(data)
    if len(data) < 4:
        raise DecodeError(f"HardwareError needs 4 bytes, got {len(data)}")
    return CcidHardwareError(data[1], data[2], data[3]), 4


def _check_direction(message_type: int, direction: CcidDirection) -> None:
    actual = direction_of(message_type)
    if actual is not None and actual is not direction:
        raise DecodeError(
            f"message type {message_type:02X} is {actual.value}, expected {direction.value}"
        )


def _decode_bulk(data: bytes | bytearray | memoryview, max_length: int) -> tuple[CcidMessage, int]:
    if len(data) < HEADER_LENGTH:
        raise DecodeError(f"CCID header needs {HEADER_LENGTH} bytes, got {len(data)}")
    header = _HDR_BBB.unpack_from(data)
    check_length(header[1], max_length, "CCID dwLength")
    end = HEADER_LENGTH + header[1]
    if len(data) < end:
        raise DecodeError(f"CCID message needs {end} bytes, got {len(data)}")
    return _bulk_message(header, bytes(data[HEADER_LENGTH:end])), end


def _bulk_message(header: tuple[int, ...], payload: bytes) -> CcidMessage:
    """The message of an unpacked ``_HDR_BBB`` header and its ``dwLength`` data bytes."""
    message_type, _, slot, seq, a, b, c = header
    decoder = _DECODERS.get(message_type)
    if decoder is None:
        if message_type in (0x50, 0x51):
            raise DecodeError(f"interrupt message {message_type:02X} on a bulk pipe")
        return CcidUnknown(slot, seq, message_type, bytes((a, b, c)), payload)
    return decoder(slot, seq, a, b, c, payload)


def decode_ccid(
    data: bytes | bytearray | memoryview,
    max_length: int = DEFAULT_MAX_LENGTH,
    *,
    direction: CcidDirection | None = None,
) -> tuple[CcidMessage, int]:
    """Decode one message from the start of ``data``: (message, bytes consumed).

    The message type tells the direction; pass ``direction`` to insist on one.  Bulk
    messages need the full header and ``dwLength`` data bytes (DecodeError when short,
    or when ``dwLength`` exceeds ``max_length``); interrupt messages (0x50, 0x51) are one
    transfer each and NotifySlotChange consumes the whole buffer.
    """
    if not data:
        raise DecodeError("empty CCID message")
    message_type = data[0]
    if direction is not None:
        _check_direction(message_type, direction)
    if message_type in (0x50, 0x51):
        return _decode_interrupt(data)
    return _decode_bulk(data, max_length)


def _specific_and_data(msg: CcidMessage) -> tuple[int, int, int, bytes]:
    if isinstance(msg, CcidXfrBlock | CcidSecure):
        lp = msg.level_parameter
        if not 0 <= lp <= 0xFFFF:
            raise EncodeError(f"wLevelParameter {lp} out of range")
        return msg.bwi, lp & 0xFF, lp >> 8, msg.data
    if isinstance(msg, CcidDataBlock):
        st, err = _encode_status(msg.status)
        return st, err, msg.chain_parameter, msg.data
    if isinstance(msg, CcidSlotStatus):
        st, err = _encode_status(msg.status)
        return st, err, msg.clock_status, b""
    if isinstance(msg, CcidIccPowerOn):
        return msg.power_select, 0, 0, b""
    if isinstance(msg, CcidSetParameters):
        return msg.protocol, 0, 0, _encode_protocol_data(msg.protocol, msg.parameters)
    if isinstance(msg, CcidParameters):
        st, err = _encode_status(msg.status)
        return st, err, msg.protocol, _encode_protocol_data(msg.protocol, msg.parameters)
    if isinstance(msg, CcidEscape):
        return 0, 0, 0, msg.data
    if isinstance(msg, CcidEscapeResponse):
        st, err = _encode_status(msg.status)
        return st, err, 0, msg.data
    if isinstance(msg, CcidIccClock):
        return msg.clock_command, 0, 0, b""
    if isinstance(msg, CcidT0Apdu):
        return msg.changes, msg.class_get_response, msg.class_envelope, b""
    if isinstance(msg, CcidMechanical):
        return msg.function, 0, 0, b""
    if isinstance(msg, CcidSetDataRateAndClockFrequency):
        return 0, 0, 0, _pack_u32x2(msg.clock_frequency, msg.data_rate)
    if isinstance(msg, CcidDataRateAndClockFrequency):
        st, err = _encode_status(msg.status)
        return st, err, 0, _pack_u32x2(msg.clock_frequency, msg.data_rate)
    if isinstance(msg, CcidUnknown):
        if len(msg.specific) != 3:
            raise EncodeError("CcidUnknown.specific must be 3 bytes")
        if msg.message_type in _DECODERS or msg.message_type in (0x50, 0x51):
            raise EncodeError(f"CcidUnknown with known message type {msg.message_type:02X}")
        return msg.specific[0], msg.specific[1], msg.specific[2], msg.data
    # IccPowerOff, GetSlotStatus, GetParameters, ResetParameters, Abort: abRFU only
    return 0, 0, 0, b""


def _pack_u32x2(a: int, b: int) -> bytes:
    try:
        return _U32X2.pack(a, b)
    except struct.error as exc:
        raise EncodeError(f"cannot encode clock/data rate: {exc}") from None


def encode_ccid(msg: CcidMessage) -> bytes:
    """The wire bytes of ``msg`` (header + data for bulk, the raw transfer for interrupt)."""
    if type(msg) is CcidXfrBlock:  # the benchmarked path
        lp = msg.level_parameter
        try:
            return (
                _HDR_BBB.pack(0x6F, len(msg.data), msg.slot, msg.seq, msg.bwi, lp & 0xFF, lp >> 8)
                + msg.data
            )
        except (struct.error, TypeError) as exc:
            raise EncodeError(f"cannot encode XfrBlock: {exc}") from None
    if isinstance(msg, CcidNotifySlotChange):
        out = bytearray([0x50])
        for i in range(0, max(len(msg.states), 1), 4):
            byte = 0
            for j, state in enumerate(msg.states[i : i + 4]):
                byte |= (int(state.present) | int(state.changed) << 1) << (2 * j)
            out.append(byte)
        return bytes(out)
    if isinstance(msg, CcidHardwareError):
        try:
            return bytes((0x51, msg.slot, msg.seq, msg.code))
        except ValueError as exc:
            raise EncodeError(f"cannot encode HardwareError: {exc}") from None
    a, b, c, data = _specific_and_data(msg)
    message_type = msg.message_type if isinstance(msg, CcidUnknown) else _TYPE_OF[type(msg)]
    try:
        return _HDR_BBB.pack(message_type, len(data), msg.slot, msg.seq, a, b, c) + bytes(data)
    except struct.error as exc:
        raise EncodeError(f"cannot encode {type(msg).__name__}: {exc}") from None


class CcidStream(FrameStream[CcidMessage]):
    """CCID framing for one bulk pipe (either direction).  No I/O here: feed bytes to
    :meth:`receive_data`, drain :meth:`next_event` until None.  A ``dwLength`` above
    ``max_length`` is an error as soon as the header arrives, and so is a message of the
    other direction when ``direction`` is given; errors follow the contract of
    :class:`ccidemu._wire.FrameStream`."""

    what = "CCID stream"

    def __init__(
        self, max_length: int = DEFAULT_MAX_LENGTH, direction: CcidDirection | None = None
    ) -> None:
        super().__init__(max_length)
        self.direction = direction

    def _cut(self, buf: bytearray, events: deque[CcidMessage]) -> int:
        start = 0
        size = len(buf)
        while size - start >= HEADER_LENGTH:
            header = _HDR_BBB.unpack_from(buf, start)
            if self.direction is not None:
                _check_direction(header[0], self.direction)
            check_length(header[1], self.max_length, "CCID dwLength")
            end = start + HEADER_LENGTH + header[1]
            if end > size:
                break
            events.append(_bulk_message(header, bytes(buf[start + HEADER_LENGTH : end])))
            start = end
        return start


# --- class descriptor, section 5.1 ---------------------------------------------------------

#: Section 5.1, table 5.1-1: Smart Card Device Class Descriptor, 54 bytes, little-endian.
_DESCRIPTOR = construct.Struct(
    "length" / construct.Const(0x36, Int8ul),
    "descriptor_type" / construct.Const(0x21, Int8ul),
    "bcd_ccid" / Int16ul,
    "max_slot_index" / Int8ul,
    "voltage_support" / Int8ul,
    "protocols" / Int32ul,
    "default_clock" / Int32ul,
    "maximum_clock" / Int32ul,
    "num_clock_supported" / Int8ul,
    "data_rate" / Int32ul,
    "max_data_rate" / Int32ul,
    "num_data_rates_supported" / Int8ul,
    "max_ifsd" / Int32ul,
    "synch_protocols" / Int32ul,
    "mechanical" / Int32ul,
    "features" / Int32ul,
    "max_message_length" / Int32ul,
    "class_get_response" / Int8ul,
    "class_envelope" / Int8ul,
    "lcd_layout" / Int16ul,
    "pin_support" / Int8ul,
    "max_busy_slots" / Int8ul,
)
DESCRIPTOR_LENGTH = 54


@dataclass(frozen=True, slots=True)
class CcidDescriptor:
    """The CCID class descriptor (section 5.1), bDescriptorType 0x21."""

    bcd_ccid: int
    max_slot_index: int
    voltage_support: int
    protocols: int
    default_clock: int
    maximum_clock: int
    num_clock_supported: int
    data_rate: int
    max_data_rate: int
    num_data_rates_supported: int
    max_ifsd: int
    synch_protocols: int
    mechanical: int
    features: CcidFeatures
    max_message_length: int
    class_get_response: int
    class_envelope: int
    lcd_layout: int
    pin_support: int
    max_busy_slots: int

    @property
    def version(self) -> str:
        """bcdCCID as text, e.g. ``"1.10"``."""
        return f"{self.bcd_ccid >> 8:x}.{self.bcd_ccid & 0xFF:02x}"

    @property
    def exchange_level(self) -> int:
        """:class:`ExchangeLevel` (raw int for an illegal combination of level bits)."""
        return _enum_or_int(ExchangeLevel, int(self.features) & _EXCHANGE_MASK)

    @property
    def slots(self) -> int:
        return self.max_slot_index + 1

    @property
    def supports_t0(self) -> bool:
        return bool(self.protocols & 1)

    @property
    def supports_t1(self) -> bool:
        return bool(self.protocols & 2)


_DESCRIPTOR_FIELDS = [name for name in CcidDescriptor.__dataclass_fields__]


def parse_ccid_descriptor(data: bytes) -> CcidDescriptor:
    """Parse the 54-byte class descriptor (bLength 0x36, bDescriptorType 0x21)."""
    if len(data) != DESCRIPTOR_LENGTH:
        raise DecodeError(f"CCID class descriptor is {DESCRIPTOR_LENGTH} bytes, got {len(data)}")
    parsed = _parse(_DESCRIPTOR, data, "CCID class descriptor")
    values = {name: parsed[name] for name in _DESCRIPTOR_FIELDS}
    values["features"] = CcidFeatures(values["features"])
    return CcidDescriptor(**values)


def build_ccid_descriptor(desc: CcidDescriptor) -> bytes:
    """The 54 wire bytes of ``desc``."""
    values = {name: int(getattr(desc, name)) for name in _DESCRIPTOR_FIELDS}
    return _build(_DESCRIPTOR, values, "CCID class descriptor")


# --- describe ------------------------------------------------------------------------------


def _shown(data: bytes, shown: bytes | None) -> str:
    if shown is None or shown == data:
        return _hex(data)
    return f"{_hex(shown)} [redacted, {len(data)} bytes]"


def _hex(data: bytes, limit: int = 64) -> str:
    if len(data) <= limit:
        return data.hex()
    return f"{data[:limit].hex()}...({len(data)} bytes)"


def _name(msg: CcidMessage) -> str:
    if isinstance(msg, CcidUnknown):
        return f"Unknown({msg.message_type:02X})"
    t = _TYPE_OF[type(msg)]
    prefix = "PC_to_RDR_" if t.name.startswith("PC_TO_RDR") else "RDR_to_PC_"
    return prefix + type(msg).__name__.removeprefix("Ccid").removesuffix("Response")


def describe_ccid(msg: CcidMessage, *, data: bytes | None = None) -> str:
    """One readable line, e.g. ``PC_to_RDR_XfrBlock slot=0 seq=3 bwi=0 data=00a40400``.

    ``data``: the XfrBlock / DataBlock bytes to show instead of the message's (redacted by the
    caller with :mod:`ccidemu.redact`).
    """
    name = _name(msg)
    if isinstance(msg, CcidNotifySlotChange):
        states = " ".join(
            f"{i}:{'present' if s.present else 'absent'}{'*' if s.changed else ''}"
            for i, s in enumerate(msg.states)
        )
        return f"{name} {states}"
    parts = [name, f"slot={msg.slot}", f"seq={msg.seq}"]
    status = getattr(msg, "status", None)
    if isinstance(status, SlotStatus):
        parts.append(status.describe())
    if isinstance(msg, CcidIccPowerOn):
        ps = msg.power_select
        parts.append(f"power={ps.name if isinstance(ps, PowerSelect) else ps}")
    elif isinstance(msg, CcidXfrBlock | CcidSecure):
        shown = _shown(msg.data, data)
        parts.append(f"bwi={msg.bwi} level={msg.level_parameter:04X} data={shown}")
    elif isinstance(msg, CcidDataBlock):
        if msg.chain_parameter:
            parts.append(f"chain={msg.chain_parameter:02X}")
        parts.append(f"data={_shown(msg.data, data)}")
    elif isinstance(msg, CcidSlotStatus):
        cs = msg.clock_status
        parts.append(f"clock={cs.name.lower() if isinstance(cs, ClockStatus) else cs}")
    elif isinstance(msg, CcidSetParameters | CcidParameters):
        parts.append(f"T={msg.protocol} {msg.parameters!r}")
    elif isinstance(msg, CcidEscape | CcidEscapeResponse):
        parts.append(f"data={_hex(msg.data)}")
    elif isinstance(msg, CcidIccClock):
        parts.append("restart" if msg.clock_command == 0 else f"stop({msg.clock_command})")
    elif isinstance(msg, CcidT0Apdu):
        parts.append(
            f"changes={msg.changes:02X} get_response_cla={msg.class_get_response:02X} "
            f"envelope_cla={msg.class_envelope:02X}"
        )
    elif isinstance(msg, CcidMechanical):
        parts.append(f"function={msg.function}")
    elif isinstance(msg, CcidSetDataRateAndClockFrequency | CcidDataRateAndClockFrequency):
        parts.append(f"clock={msg.clock_frequency}kHz rate={msg.data_rate}bps")
    elif isinstance(msg, CcidHardwareError):
        parts.append(f"code={msg.code:02X}")
    elif isinstance(msg, CcidUnknown):
        parts.append(f"specific={msg.specific.hex()} data={_hex(msg.data)}")
    return " ".join(parts)
