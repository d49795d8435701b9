"""ISO/IEC 7816-4 command and response APDUs, command chaining and response chaining.

Spec: ISO/IEC 7816-4:2013 section 5.1 (command-response pairs, table 1 and the
length fields Lc/Le), section 5.1.1.1 (command chaining, CLA bit b5 = 0x10),
section 5.3 / 5.6 (61xx GET RESPONSE and 6Cxx "wrong Le" response chaining).
The decoding rules for the seven cases are those of ISO/IEC 7816-3:2006
section 12.1.3 ("Decoding conventions for command APDUs"):

========  ======================================  ==============================
case      bytes after the header CLA INS P1 P2    Nc / Ne
========  ======================================  ==============================
1         (none)                                  Nc=0, Ne=0 (no Le field)
2S        Le (1 byte)                             Ne = Le, 00 means 256
3S        Lc (1 byte, 01-FF) data                 Nc = Lc
4S        Lc data Le                              Nc = Lc, Ne as 2S
2E        00 Le1 Le2                              Ne = Le1Le2, 0000 means 65536
3E        00 Lc1 Lc2 (not 0000) data              Nc = Lc1Lc2
4E        00 Lc1 Lc2 data Le1 Le2                 Nc as 3E, Ne as 2E
========  ======================================  ==============================

Any other length is malformed (DecodeError).  A case 4 command sent without its
Le is simply a case 3 command; ``Ne = 0`` here always means "no Le field".

The parser is written by hand (no construct) because APDUs are parsed on every
exchange and the seven variable-length forms are simplest as a length switch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from enum import IntEnum, StrEnum

from ccidemu.errors import DecodeError, EncodeError
from ccidemu.sw import SW, sw_meaning

log = logging.getLogger(__name__)

#: CLA bit b5: "command is not the last of a chain" (ISO/IEC 7816-4:2013 section 5.1.1.1).
CLA_CHAINING = 0x10

#: The largest Nc and Ne of each form (ISO/IEC 7816-4:2013 section 5.1).
MAX_SHORT_NC = 255
MAX_SHORT_NE = 256
MAX_EXTENDED_NC = 65535
MAX_EXTENDED_NE = 65536


class ApduCase(StrEnum):
    """The command APDU cases of ISO/IEC 7816-3:2006 section 12.1.3."""

    CASE_1 = "1"
    CASE_2S = "2S"
    CASE_3S = "3S"
    CASE_4S = "4S"
    CASE_2E = "2E"
    CASE_3E = "3E"
    CASE_4E = "4E"


class InsName(IntEnum):
    """Interindustry instruction bytes (ISO/IEC 7816-4:2013 table 4, plus 7816-8/-9)."""

    DEACTIVATE_FILE = 0x04
    ERASE_RECORD = 0x0C
    ERASE_BINARY = 0x0E
    PERFORM_SCQL_OPERATION = 0x10
    PERFORM_TRANSACTION_OPERATION = 0x12
    PERFORM_USER_OPERATION = 0x14
    VERIFY = 0x20
    VERIFY_ODD = 0x21
    MANAGE_SECURITY_ENVIRONMENT = 0x22
    CHANGE_REFERENCE_DATA = 0x24
    DISABLE_VERIFICATION_REQUIREMENT = 0x26
    ENABLE_VERIFICATION_REQUIREMENT = 0x28
    PERFORM_SECURITY_OPERATION = 0x2A
    RESET_RETRY_COUNTER = 0x2C
    ACTIVATE_FILE = 0x44
    GENERATE_ASYMMETRIC_KEY_PAIR = 0x46
    GENERATE_ASYMMETRIC_KEY_PAIR_ODD = 0x47
    MANAGE_CHANNEL = 0x70
    EXTERNAL_AUTHENTICATE = 0x82
    GET_CHALLENGE = 0x84
    GENERAL_AUTHENTICATE = 0x86
    GENERAL_AUTHENTICATE_ODD = 0x87
    INTERNAL_AUTHENTICATE = 0x88
    SEARCH_BINARY = 0xA0
    SEARCH_RECORD = 0xA2
    SELECT = 0xA4
    READ_BINARY = 0xB0
    READ_BINARY_ODD = 0xB1
    READ_RECORD = 0xB2
    GET_RESPONSE = 0xC0
    ENVELOPE = 0xC2
    GET_DATA = 0xCA
    GET_DATA_ODD = 0xCB
    WRITE_BINARY = 0xD0
    WRITE_RECORD = 0xD2
    UPDATE_BINARY = 0xD6
    PUT_DATA = 0xDA
    PUT_DATA_ODD = 0xDB
    UPDATE_RECORD = 0xDC
    CREATE_FILE = 0xE0
    APPEND_RECORD = 0xE2
    DELETE_FILE = 0xE4
    TERMINATE_DF = 0xE6
    TERMINATE_EF = 0xE8
    TERMINATE_CARD_USAGE = 0xFE


_INS_TEXT: dict[int, str] = {
    int(m): m.name.removesuffix("_ODD").replace("_", " ") for m in InsName
}


def ins_name(ins: int) -> str:
    """The name of an interindustry instruction, or ``"INS xx"`` when unknown."""
    return _INS_TEXT.get(ins, f"INS {ins:02X}")


def ins_label(cla: int, ins: int) -> str:
    """``ins`` named under class ``cla``: ISO's name when CLA b8 = 0, else proprietary.

    CLA b8 = 1 is a proprietary class (ISO/IEC 7816-4:2013 section 5.1.1) whose INS codes
    are its own; this includes CLA FF (PC/SC reader pseudo-APDUs).
    """
    return ins_name(ins) if cla < 0x80 else f"proprietary INS {ins:02X}"


def _check_byte(value: int, what: str) -> None:
    if not 0 <= value <= 0xFF:
        raise EncodeError(f"{what} {value!r} is not a byte")


@dataclass(frozen=True, slots=True)
class CommandApdu:
    """A command APDU (ISO/IEC 7816-4:2013 section 5.1).

    ``ne`` is the expected response length Ne: 0 means no Le field, 256 is the short
    Le 00, 65536 the extended Le 0000.  ``extended`` forces the extended length form
    (True), forbids it (False) or lets :meth:`encode` pick the short form whenever it
    fits (None).  It records the wire form after parsing and is not part of equality.
    """

    cla: int
    ins: int
    p1: int
    p2: int
    data: bytes = b""
    ne: int = 0
    extended: bool | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not (0 <= self.cla <= 0xFF and 0 <= self.ins <= 0xFF
                and 0 <= self.p1 <= 0xFF and 0 <= self.p2 <= 0xFF):
            for name in ("cla", "ins", "p1", "p2"):
                _check_byte(getattr(self, name), name)
        if len(self.data) > MAX_EXTENDED_NC:
            raise EncodeError(f"Nc {len(self.data)} exceeds {MAX_EXTENDED_NC}")
        if not 0 <= self.ne <= MAX_EXTENDED_NE:
            raise EncodeError(f"Ne {self.ne} outside 0..{MAX_EXTENDED_NE}")
        if self.extended is False and (
            len(self.data) > MAX_SHORT_NC or self.ne > MAX_SHORT_NE
        ):
            raise EncodeError(
                f"Nc {len(self.data)} / Ne {self.ne} need extended lengths (extended=False)"
            )

    @property
    def nc(self) -> int:
        """Nc: the number of bytes in the command data field."""
        return len(self.data)

    @property
    def is_extended(self) -> bool:
        """True when :meth:`encode` uses the extended length form."""
        if not self.data and not self.ne:
            return False
        if self.extended is not None:
            return self.extended
        return len(self.data) > MAX_SHORT_NC or self.ne > MAX_SHORT_NE

    @property
    def case(self) -> ApduCase:
        """The ISO/IEC 7816-3 case of the encoded form."""
        if not self.data:
            if not self.ne:
                return ApduCase.CASE_1
            return ApduCase.CASE_2E if self.is_extended else ApduCase.CASE_2S
        if not self.ne:
            return ApduCase.CASE_3E if self.is_extended else ApduCase.CASE_3S
        return ApduCase.CASE_4E if self.is_extended else ApduCase.CASE_4S

    @property
    def chained(self) -> bool:
        """CLA b5 set: more commands of this chain follow (section 5.1.1.1)."""
        return bool(self.cla & CLA_CHAINING)

    def encode(self) -> bytes:
        """The wire bytes (ISO/IEC 7816-4:2013 section 5.1)."""
        header = bytes((self.cla, self.ins, self.p1, self.p2))
        nc, ne = len(self.data), self.ne
        if not nc and not ne:
            return header
        if not self.is_extended:
            out = header
            if nc:
                out += bytes((nc,)) + self.data
            if ne:
                out += bytes((ne & 0xFF,))  # 256 -> 00
            return out
        out = header + b"\x00"
        if nc:
            out += nc.to_bytes(2, "big") + self.data
        if ne:
            out += (ne & 0xFFFF).to_bytes(2, "big")  # 65536 -> 0000
        return out


# parse_command builds its (already valid) results without __init__/__post_init__: the
# slot descriptors set the fields directly, about 3x faster on this hot path.
_new = object.__new__
_SET_CLA, _SET_INS, _SET_P1, _SET_P2, _SET_DATA, _SET_NE, _SET_EXT = (
    CommandApdu.__dict__[name].__set__
    for name in ("cla", "ins", "p1", "p2", "data", "ne", "extended")
)


def _trusted(
    cla: int, ins: int, p1: int, p2: int, data: bytes, ne: int, extended: bool
) -> CommandApdu:
    cmd: CommandApdu = _new(CommandApdu)
    _SET_CLA(cmd, cla)
    _SET_INS(cmd, ins)
    _SET_P1(cmd, p1)
    _SET_P2(cmd, p2)
    _SET_DATA(cmd, data)
    _SET_NE(cmd, ne)
    _SET_EXT(cmd, extended)
    return cmd


def parse_command(data: bytes) -> CommandApdu:
    """Decode a command APDU (ISO/IEC 7816-3:2006 section 12.1.3).  DecodeError if malformed."""
    n = len(data)
    if n < 4:
        raise DecodeError(f"command APDU of {n} bytes is shorter than its 4-byte header")
    cla, ins, p1, p2 = data[0], data[1], data[2], data[3]
    if n == 4:  # case 1
        return _trusted(cla, ins, p1, p2, b"", 0, False)
    b5 = data[4]
    if n == 5:  # case 2S
        return _trusted(cla, ins, p1, p2, b"", b5 or 256, False)
    if b5:
        if n == 5 + b5:  # case 3S
            return _trusted(cla, ins, p1, p2, bytes(data[5:]), 0, False)
        if n == 6 + b5:  # case 4S
            return _trusted(cla, ins, p1, p2, bytes(data[5:-1]), data[-1] or 256, False)
        raise DecodeError(
            f"short Lc {b5} does not match the {n - 5} bytes after it "
            f"(expected {b5} or {b5 + 1})",
            offset=4,
        )
    # B5 = 00 with more bytes: an extended length field (or a malformed short Lc 00).
    if n == 6:
        raise DecodeError("short Lc 00 is not allowed (Nc must be 1..255)", offset=4)
    if n == 7:  # case 2E
        le = (data[5] << 8) | data[6]
        return _trusted(cla, ins, p1, p2, b"", le or 65536, True)
    lc = (data[5] << 8) | data[6]
    if lc == 0:
        raise DecodeError("extended Lc 0000 followed by more bytes", offset=5)
    if n == 7 + lc:  # case 3E
        return _trusted(cla, ins, p1, p2, bytes(data[7:]), 0, True)
    if n == 9 + lc:  # case 4E
        le = (data[-2] << 8) | data[-1]
        return _trusted(cla, ins, p1, p2, bytes(data[7:-2]), le or 65536, True)
    raise DecodeError(
        f"extended Lc {lc} does not match the {n - 7} bytes after it "
        f"(expected {lc} or {lc + 2})",
        offset=5,
    )


@dataclass(frozen=True, slots=True)
class ResponseApdu:
    """A response APDU: data field then SW1 SW2 (ISO/IEC 7816-4:2013 section 5.1)."""

    data: bytes
    sw: int

    def __post_init__(self) -> None:
        if not 0 <= self.sw <= 0xFFFF:
            raise EncodeError(f"status word {self.sw!r} out of range")

    @property
    def sw1(self) -> int:
        return self.sw >> 8

    @property
    def sw2(self) -> int:
        return self.sw & 0xFF

    def encode(self) -> bytes:
        return self.data + self.sw.to_bytes(2, "big")


def parse_response(data: bytes) -> ResponseApdu:
    """Decode a response APDU (at least SW1 SW2).  DecodeError if shorter than 2 bytes."""
    if len(data) < 2:
        raise DecodeError(f"response APDU of {len(data)} bytes has no SW1 SW2")
    return ResponseApdu(bytes(data[:-2]), (data[-2] << 8) | data[-1])


# --- command chaining (ISO/IEC 7816-4:2013 section 5.1.1.1) --------------------------


class ChainError(DecodeError):
    """A command chain broke its rules; ``sw`` is the status word a card should answer."""

    def __init__(self, message: str, sw: int) -> None:
        super().__init__(message)
        self.sw = sw


def split_chain(cmd: CommandApdu, max_nc: int = MAX_SHORT_NC) -> list[CommandApdu]:
    """Cut ``cmd`` into a command chain of links carrying at most ``max_nc`` data bytes.

    Every link but the last has CLA b5 (0x10) set and no Le field; the last link
    keeps the original CLA and Ne (section 5.1.1.1).  A command that fits is
    returned alone.
    """
    if max_nc < 1:
        raise EncodeError(f"max_nc {max_nc} must be at least 1")
    if len(cmd.data) <= max_nc:
        return [cmd]
    if cmd.cla & CLA_CHAINING:
        raise EncodeError(f"CLA {cmd.cla:02X} already has the chaining bit set")
    chunks = [cmd.data[i : i + max_nc] for i in range(0, len(cmd.data), max_nc)]
    links = [
        CommandApdu(cmd.cla | CLA_CHAINING, cmd.ins, cmd.p1, cmd.p2, chunk, 0)
        for chunk in chunks[:-1]
    ]
    links.append(CommandApdu(cmd.cla, cmd.ins, cmd.p1, cmd.p2, chunks[-1], cmd.ne))
    return links


class ChainAssembler:
    """Rebuilds chained commands on the card side (ISO/IEC 7816-4:2013 section 5.1.1.1).

    Theory of operation: :meth:`feed` every command in order.  A link with CLA b5
    set is stored and ``None`` returned (the card answers 9000).  A command without
    b5 ends the chain: the joined command (CLA without b5, the last link's Ne) is
    returned.  A command that does not continue the pending chain (different
    INS/P1/P2/CLA) raises :class:`ChainError` with 6883 "last command expected",
    and the chain is dropped; too much data raises it with 6700.
    """

    def __init__(self, max_length: int = MAX_EXTENDED_NC) -> None:
        # A joined command holds at most MAX_EXTENDED_NC data bytes, whatever the cap.
        self._max_length = min(max_length, MAX_EXTENDED_NC)
        self._first: CommandApdu | None = None
        self._parts: list[bytes] = []
        self._size = 0

    @property
    def pending(self) -> bool:
        """True while a chain has started and its last link has not arrived."""
        return self._first is not None

    def reset(self) -> None:
        """Forget any pending chain (card reset, SELECT of another application...)."""
        self._first = None
        self._parts = []
        self._size = 0

    def feed(self, cmd: CommandApdu) -> CommandApdu | None:
        first = self._first
        if first is None:
            if not cmd.cla & CLA_CHAINING:
                return cmd
            self._first = cmd
            self._parts = [cmd.data]
            self._size = len(cmd.data)
            self._check_size()
            return None
        if (
            (cmd.cla & ~CLA_CHAINING) != (first.cla & ~CLA_CHAINING)
            or cmd.ins != first.ins
            or cmd.p1 != first.p1
            or cmd.p2 != first.p2
        ):
            self.reset()
            raise ChainError(
                f"command {cmd.cla:02X} {cmd.ins:02X} {cmd.p1:02X} {cmd.p2:02X} does not "
                f"continue the chain of {first.cla:02X} {first.ins:02X} {first.p1:02X} "
                f"{first.p2:02X}",
                SW.LAST_COMMAND_EXPECTED,
            )
        self._parts.append(cmd.data)
        self._size += len(cmd.data)
        self._check_size()
        if cmd.cla & CLA_CHAINING:
            return None
        data = b"".join(self._parts)
        self.reset()
        # Keep the extended length form of the chain (short links leave the choice open).
        return CommandApdu(cmd.cla, cmd.ins, cmd.p1, cmd.p2, data, cmd.ne, cmd.extended or None)

    def _check_size(self) -> None:
        if self._size > self._max_length:
            size = self._size
            self.reset()
            raise ChainError(
                f"command chain of {size} bytes exceeds the cap of {self._max_length}",
                SW.WRONG_LENGTH,
            )


def join_chain(commands: Iterable[CommandApdu]) -> CommandApdu:
    """Join a complete command chain into one command.  ChainError if it is not one."""
    assembler = ChainAssembler()
    result: CommandApdu | None = None
    for cmd in commands:
        if result is not None:
            raise ChainError(
                "commands after the last link of the chain", SW.CONDITIONS_NOT_SATISFIED
            )
        result = assembler.feed(cmd)
    if result is None:
        raise ChainError("command chain has no last link", SW.LAST_COMMAND_EXPECTED)
    return result


# --- response chaining (ISO/IEC 7816-4:2013 section 5.3, 61xx and 6Cxx) ---------------


def get_response_command(sw2: int, cla: int = 0) -> CommandApdu:
    """GET RESPONSE (``CLA C0 00 00 Le``) for a ``61xx`` answer; xx = 00 asks for 256."""
    _check_byte(sw2, "SW2")
    return CommandApdu(cla, InsName.GET_RESPONSE, 0, 0, b"", sw2 or 256)


def reissue_with_le(cmd: CommandApdu, sw2: int) -> CommandApdu:
    """The same command with Ne = xx after a ``6Cxx`` "wrong Le" answer (00 = 256)."""
    _check_byte(sw2, "SW2")
    return replace(cmd, ne=sw2 or 256, extended=None)


# --- readable one-liners ----------------------------------------------------------------


def describe_command(cmd: CommandApdu, *, hide_data: bool = False) -> str:
    """E.g. ``SELECT (00 A4 04 00) case 4S Nc=7 Ne=256 data=A0000000031010``.

    ``hide_data``: the data field is a secret (:mod:`ccidemu.redact`); only its length shows.
    """
    parts = [
        f"{ins_label(cmd.cla, cmd.ins)} ({cmd.cla:02X} {cmd.ins:02X} {cmd.p1:02X} {cmd.p2:02X})",
        f"case {cmd.case.value}",
    ]
    if cmd.chained:
        parts.append("[chained]")
    if cmd.data:
        parts.append(f"Nc={len(cmd.data)}")
    if cmd.ne:
        parts.append(f"Ne={cmd.ne}")
    if cmd.data:
        parts.append("data=[redacted]" if hide_data else f"data={cmd.data.hex().upper()}")
    return " ".join(parts)


def describe_response(rsp: ResponseApdu, *, hide_data: bool = False) -> str:
    """E.g. ``9000 success, 2 data bytes: 0102`` (``hide_data``: a secret, length only)."""
    text = f"{rsp.sw:04X} {sw_meaning(rsp.sw)}"
    if rsp.data:
        shown = "[redacted]" if hide_data else rsp.data.hex().upper()
        text += f", {len(rsp.data)} data bytes: {shown}"
    return text
