"""T=1, the block transmission protocol (ISO/IEC 7816-3:2006 section 11), interface side.

What a TPDU-level CCID reader needs from its host when the card speaks T=1: the host builds
every block (prologue, information field, epilogue) and the reader only moves them.

Block format (section 11.3)::

    NAD u8 | PCB u8 | LEN u8 (0-254) | INF (LEN bytes) | EDC (LRC: 1 byte, XOR of the rest)

PCB (section 11.3.2.2): an I-block is ``0 N(S) M 00000`` (N(S) its send sequence number, M
"more data follows"), an R-block ``10 0 N(R) 00ee`` (N(R) the N(S) of the I-block expected
next; ``ee`` 00 no error, 01 EDC or parity error, 10 other error), an S-block ``11 r 0tttt``
(``r`` 1 for a response; ``tttt`` 0 RESYNCH, 1 IFS, 2 ABORT, 3 WTX).

Theory of operation
-------------------
:class:`T1Protocol` keeps what lives across APDUs: the two send sequence numbers (ours and the
card's, both 0 after reset or RESYNCH, section 11.6.2), IFSC (the largest information field the
card takes) and IFSD (the largest we take).  :meth:`T1Protocol.transmit` is a generator for
one APDU: it yields a :class:`T1Send` (a block to give to the card, and the BWT multiplier the
reader should apply to it), receives the card's answer block (raw bytes) through ``send()``,
and returns the response APDU.  It chains a command longer than IFSC (section 11.6.2.3),
acknowledges a chained response with R-blocks, answers S(WTX) and S(IFS) requests (section
11.6.2.4), and recovers from bad blocks the section 11.6.3 way in a simplified form: a bad or
unexpected block is answered with an R-block asking for the card's block again, a lost
acknowledgement with our last block again; after :data:`MAX_RETRIES` failures in a row it
asks for RESYNCH and the APDU fails with :class:`T1Error`.  :meth:`T1Protocol.negotiate_ifsd`
is the optional S(IFS request) a host sends after the ATR (section 11.4.2).

Only the LRC epilogue is implemented (the CRC one, chosen by the ATR's first TCi for T=1, is
refused by the CCID driver with a message).  Pure: no I/O, no clocks.
"""

from __future__ import annotations

import enum
from collections.abc import Generator
from dataclasses import dataclass

from ccidemu.errors import CardError, DecodeError, EncodeError

__all__ = [
    "DEFAULT_IFS",
    "MAX_RETRIES",
    "Block",
    "BlockKind",
    "SKind",
    "T1Error",
    "T1Protocol",
    "T1Send",
    "decode_block",
    "i_block",
    "lrc",
    "r_block",
    "s_block",
]

#: IFSC and IFSD before anything else is agreed (section 11.4.2).
DEFAULT_IFS = 32
#: Bad blocks in a row before RESYNCH (section 11.6.3.2 allows up to three retransmissions).
MAX_RETRIES = 3
#: A response APDU longer than this (an extended Ne plus SW1 SW2) is a card fault.
MAX_RESPONSE = 65536 + 2


class T1Error(CardError):
    """The T=1 exchange failed (the card kept sending bad blocks, or aborted)."""


class BlockKind(enum.Enum):
    I = "I"  # noqa: E741 (the spec's name)
    R = "R"
    S = "S"


class SKind(enum.IntEnum):
    """The S-block types, PCB bits 1-5 (section 11.3.2.2, table 17)."""

    RESYNCH = 0
    IFS = 1
    ABORT = 2
    WTX = 3


def lrc(data: bytes) -> int:
    """The LRC epilogue: the XOR of every byte of the prologue and INF (section 11.3.4)."""
    value = 0
    for byte in data:
        value ^= byte
    return value


@dataclass(frozen=True, slots=True)
class Block:
    """One T=1 block (section 11.3)."""

    nad: int
    pcb: int
    inf: bytes = b""

    @property
    def kind(self) -> BlockKind:
        if not self.pcb & 0x80:
            return BlockKind.I
        return BlockKind.R if not self.pcb & 0x40 else BlockKind.S

    @property
    def ns(self) -> int:
        """I-block: N(S)."""
        return self.pcb >> 6 & 1

    @property
    def more(self) -> bool:
        """I-block: M, more data follows."""
        return bool(self.pcb & 0x20)

    @property
    def nr(self) -> int:
        """R-block: N(R)."""
        return self.pcb >> 4 & 1

    @property
    def error(self) -> int:
        """R-block: 0 no error, 1 EDC/parity error, 2 other error."""
        return self.pcb & 0x0F

    @property
    def response(self) -> bool:
        """S-block: a response (else a request)."""
        return bool(self.pcb & 0x20)

    @property
    def s_kind(self) -> int:
        """S-block: :class:`SKind` (a plain int for an unknown type)."""
        value = self.pcb & 0x1F
        try:
            return SKind(value)
        except ValueError:
            return value

    def encode(self) -> bytes:
        if not (0 <= self.nad <= 0xFF and 0 <= self.pcb <= 0xFF) or len(self.inf) > 254:
            raise EncodeError(f"cannot encode T=1 block {self!r}")
        body = bytes((self.nad, self.pcb, len(self.inf))) + self.inf
        return body + bytes((lrc(body),))


def i_block(ns: int, inf: bytes, more: bool = False, nad: int = 0) -> Block:
    return Block(nad, (ns & 1) << 6 | (0x20 if more else 0), inf)


def r_block(nr: int, error: int = 0, nad: int = 0) -> Block:
    return Block(nad, 0x80 | (nr & 1) << 4 | error, b"")


def s_block(kind: SKind, response: bool = False, inf: bytes = b"", nad: int = 0) -> Block:
    return Block(nad, 0xC0 | (0x20 if response else 0) | kind, inf)


def decode_block(data: bytes) -> Block:
    """One block with an LRC epilogue; DecodeError when it is short, long or corrupt."""
    if len(data) < 4:
        raise DecodeError(f"T=1 block of {len(data)} bytes (at least 4)")
    length = data[2]
    if length == 0xFF:
        raise DecodeError("T=1 block with LEN FF (reserved)")
    if len(data) != length + 4:
        raise DecodeError(f"T=1 block of {len(data)} bytes, LEN says {length + 4}")
    if lrc(data[:-1]) != data[-1]:
        raise DecodeError(f"T=1 block with a wrong LRC {data[-1]:02X} (expected "
                          f"{lrc(data[:-1]):02X})")
    return Block(data[0], data[1], bytes(data[3:-1]))


@dataclass(frozen=True, slots=True)
class T1Send:
    """A block for the card; ``bwi`` the BWT multiplier its answer may take (S(WTX)), 0 for
    the normal BWT (the CCID XfrBlock's bBWI)."""

    block: bytes
    bwi: int = 0


class _Phase(enum.Enum):
    SENDING = "sending"  # our chained command goes out; each block is acknowledged
    AWAITING = "awaiting"  # our last block is out; the card's first I-block is due
    RECEIVING = "receiving"  # the card chains its answer; we acknowledge each block


#: One APDU exchange: yields blocks for the card, is sent the card's blocks, returns the
#: response APDU.
Exchange = Generator[T1Send, bytes, bytes]


class T1Protocol:
    """The state of T=1 with one card (see the module docstring)."""

    def __init__(self, ifsc: int = DEFAULT_IFS, ifsd: int = DEFAULT_IFS, nad: int = 0) -> None:
        if not 1 <= ifsc <= 254 or not 1 <= ifsd <= 254:
            raise ValueError("IFSC and IFSD are 1 to 254 (section 11.4.2)")
        self.ifsc = ifsc
        self.ifsd = ifsd
        self.nad = nad
        self.ns = 0  # N(S) of our next I-block
        self.nr = 0  # N(S) of the card's next I-block

    def reset(self) -> None:
        """After a reset of the card or RESYNCH: both sequence numbers start again at 0."""
        self.ns = self.nr = 0

    # ---------------------------------------------------------------- exchanges

    def negotiate_ifsd(self) -> Exchange:
        """S(IFS request) with our IFSD; returns b"" once the card confirmed it."""
        request = s_block(SKind.IFS, inf=bytes((self.ifsd,)), nad=self.nad)
        for _ in range(MAX_RETRIES):
            answer = yield T1Send(request.encode())
            try:
                block = decode_block(answer)
            except DecodeError:
                continue
            if block.kind is BlockKind.S and block.response and block.s_kind == SKind.IFS:
                if block.inf != request.inf:
                    raise T1Error(f"the card answered IFSD {self.ifsd} with {block.inf.hex()}")
                return b""
        raise T1Error("the card did not confirm the IFSD")

    def transmit(self, apdu: bytes) -> Exchange:
        """Send ``apdu``, return the card's response APDU (see the module docstring)."""
        rest = bytes(apdu)
        response = bytearray()
        phase = _Phase.SENDING
        failures = 0

        def next_i() -> bytes:
            nonlocal rest, phase
            chunk, rest = rest[:self.ifsc], rest[self.ifsc:]
            if not rest:
                phase = _Phase.AWAITING
            return i_block(self.ns, chunk, bool(rest), self.nad).encode()

        sent = sent_i = next_i()  # our last block, our last I-block
        bwi = 0
        while True:
            answer = yield T1Send(sent, bwi)
            bwi = 0
            try:
                block: Block | None = decode_block(answer)
            except DecodeError:
                block = None
            if block is not None and (len(block.inf) > self.ifsd or (
                    block.kind is BlockKind.S and block.response)):
                block = None  # longer than we take, or an answer to nothing we asked
            progress = False
            if block is None:
                # Section 11.6.3.2: ask for the card's block again (R-block with an error),
                # or, while our chain goes out, repeat our block (the card acknowledges it).
                sent = sent_i if phase is _Phase.SENDING else r_block(self.nr, 1, self.nad).encode()
            elif block.kind is BlockKind.S:
                sent, bwi = self._answer_s(block)
                if block.s_kind == SKind.ABORT:
                    yield T1Send(sent)
                    self.reset()
                    raise T1Error("the card aborted the exchange (S(ABORT) request)")
                progress = True  # (after S(IFS), the rest of a chain goes out cut to IFSC)
            elif block.kind is BlockKind.R:
                if phase is _Phase.SENDING and block.nr != self.ns:
                    self.ns ^= 1  # our chained block was acknowledged: the next one
                    sent = sent_i = next_i()
                    progress = True
                else:  # the card did not get our last block: repeat it
                    sent = sent if phase is _Phase.RECEIVING else sent_i
            elif phase is _Phase.SENDING:
                sent = sent_i  # an I-block before our chain ended: repeat our block
            else:
                if phase is _Phase.AWAITING:  # its first I-block acknowledges our last one
                    self.ns ^= 1
                    phase = _Phase.RECEIVING
                if block.ns == self.nr:
                    self.nr ^= 1
                    response += block.inf
                    if len(response) > MAX_RESPONSE:
                        raise T1Error(f"the card's answer exceeds {MAX_RESPONSE} bytes")
                    if not block.more:
                        return bytes(response)
                    progress = True
                # acknowledge it (or, for a block we already had, ask for the next one)
                sent = r_block(self.nr, 0, self.nad).encode()
            if progress:
                failures = 0
                continue
            failures += 1
            if failures >= MAX_RETRIES:
                yield from self._resynch()
                raise T1Error(f"{MAX_RETRIES} bad or unexpected blocks from the card in a "
                              "row; resynchronised")

    def _answer_s(self, block: Block) -> tuple[bytes, int]:
        """Our response to an S(request) of the card, and the BWT multiplier to ask for."""
        kind = block.s_kind
        if kind == SKind.WTX:
            multiplier = block.inf[0] if block.inf else 1
            return s_block(SKind.WTX, True, block.inf, self.nad).encode(), multiplier
        if kind == SKind.IFS:
            if len(block.inf) == 1 and 1 <= block.inf[0] <= 254:
                self.ifsc = block.inf[0]
            return s_block(SKind.IFS, True, block.inf, self.nad).encode(), 0
        if kind == SKind.ABORT:
            return s_block(SKind.ABORT, True, b"", self.nad).encode(), 0
        # RESYNCH is only asked by the interface device; anything else: repeat "other error"
        return r_block(self.nr, 2, self.nad).encode(), 0

    def _resynch(self) -> Generator[T1Send, bytes, None]:
        request = s_block(SKind.RESYNCH, nad=self.nad).encode()
        for _ in range(MAX_RETRIES):
            answer = yield T1Send(request)
            try:
                block = decode_block(answer)
            except DecodeError:
                continue
            if block.kind is BlockKind.S and block.response and block.s_kind == SKind.RESYNCH:
                self.reset()
                return
        self.reset()
        raise T1Error("the card does not answer RESYNCH")
