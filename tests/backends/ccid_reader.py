"""A CCID reader with one slot, device side, for the driver tests (no I/O).

It answers PC_to_RDR frames the way CCID rev 1.1 says, for a card given as an ISO 7816-4
:class:`~ccidemu.card.Card` (APDUs in, APDUs out), at any exchange level:

* ``short`` / ``extended``: the APDU goes to the card whole; extended level chains long
  commands and answers with wLevelParameter / bChainParameter (sections 6.1.4, 6.2.1);
* ``tpdu`` with ``protocol=0``: a T=0 card as ISO/IEC 7816-3 section 12.2 describes one (the
  card answers a case 4 TPDU with 61xx and keeps the data for GET RESPONSE; a case 2 TPDU
  with the wrong P3 with 6Cxx), built on the APDU card;
* ``tpdu`` with ``protocol=1``: the card side of T=1 blocks (section 11), acknowledging
  chained blocks, chaining its answer to IFSD, asking for WTX when told to.

Faults for the tests: ``time_extensions`` (that many time-extension DataBlocks before each
answer), ``mute`` (commands are never answered), ``corrupt`` (a function applied to each
bulk-IN message), ``t1_faults`` (a list of per-block hooks for T=1).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ccidemu.card import Card
from ccidemu.ccid import (
    CcidAbort,
    CcidDataBlock,
    CcidDescriptor,
    CcidError,
    CcidFeatures,
    CcidGetParameters,
    CcidGetSlotStatus,
    CcidIccPowerOff,
    CcidIccPowerOn,
    CcidMessage,
    CcidNotifySlotChange,
    CcidParameters,
    CcidSetParameters,
    CcidSlotStatus,
    CcidStream,
    CcidXfrBlock,
    CommandStatus,
    IccStatus,
    SlotState,
    SlotStatus,
    T0Parameters,
    T1Parameters,
    encode_ccid,
)
from ccidemu.t1 import BlockKind, SKind, decode_block, i_block, r_block, s_block

LEVELS = {
    "character": 0x00000000,
    "tpdu": 0x00010000,
    "short": 0x00020000,
    "extended": 0x00040000,
}
#: QEMU 7.2's usb-ccid features minus the level bits (docs/PROTOCOL.md, "usb-ccid").
QEMU_FEATURES = 0x000004FE


def descriptor(level: str = "tpdu", *, features: int = QEMU_FEATURES, protocols: int = 3,
               max_message: int = 271, max_ifsd: int = 254) -> CcidDescriptor:
    return CcidDescriptor(
        bcd_ccid=0x0110, max_slot_index=0, voltage_support=7, protocols=protocols,
        default_clock=4000, maximum_clock=4000, num_clock_supported=0, data_rate=9600,
        max_data_rate=9600, num_data_rates_supported=0, max_ifsd=max_ifsd,
        synch_protocols=0, mechanical=0, features=CcidFeatures(features | LEVELS[level]),
        max_message_length=max_message, class_get_response=0xFF, class_envelope=0xFF,
        lcd_layout=0, pin_support=0, max_busy_slots=1,
    )


@dataclass
class _T1Card:
    """The card's side of T=1."""

    ns: int = 0  # the card's next N(S)
    nr: int = 0  # the N(S) the card expects next
    ifsc: int = 32  # the card's own IFSC (how much it takes)
    ifsd: int = 32  # what the interface takes
    command: bytes = b""
    pending: bytes = b""  # the answer still to send
    last: bytes = b""  # the last block sent


class EmulatedReader:
    """See the module docstring.  Feed :meth:`bulk_out`; read :attr:`bulk_in` (bytes) and
    :attr:`interrupts` (one transfer each)."""

    def __init__(self, card: Card | None, level: str = "tpdu", *, protocol: int = 0,
                 features: int = QEMU_FEATURES, max_message: int = 271, ifsc: int = 32,
                 t1_wtx: int = 0, interrupt: bool = True) -> None:
        self.card = card
        self.level = level
        self.protocol = protocol
        self.descriptor = descriptor(level, features=features, max_message=max_message)
        self.present = card is not None
        self.powered = False
        self.bulk_in = bytearray()
        self._transfers: deque[int] = deque()  # the length of each bulk-IN transfer in bulk_in
        self.interrupts: deque[bytes] = deque()
        self.has_interrupt = interrupt
        self.time_extensions = 0
        self.mute = False
        self.corrupt: Callable[[bytes], bytes] | None = None
        self.commands: list[CcidMessage] = []
        self.aborted: list[int] = []
        self._stream = CcidStream()
        self._t0_pending = b""
        self._t0_sw = b"\x90\x00"
        self._chain = bytearray()  # extended level: command blocks so far
        self._response_rest = b""  # extended level: answer blocks still to send
        self._t1 = _T1Card(ifsc=ifsc)
        self.t1_wtx = t1_wtx  # ask for WTX before that many answers
        #: T=1 faults: each call may return replacement bytes for the card's next block
        self.t1_faults: deque[Callable[[bytes], bytes]] = deque()
        self.t1_blocks: list[bytes] = []  # every block the interface sent

    # ---------------------------------------------------------------- host side

    def bulk_out(self, frame: bytes) -> None:
        self._stream.receive_data(frame)
        while (message := self._stream.next_event()) is not None:
            self.commands.append(message)
            answer = self._answer(message)
            if answer is None:
                continue
            for _ in range(self.time_extensions):
                self._emit(_time_extension(answer))
            self._emit(answer)

    def take(self, size: int) -> bytes:
        """Up to ``size`` bytes of bulk-IN as a stream (transfers run together)."""
        data = bytes(self.bulk_in[:size])
        del self.bulk_in[:size]
        left = len(data)
        while left and self._transfers:
            if self._transfers[0] <= left:
                left -= self._transfers.popleft()
            else:
                self._transfers[0] -= left
                left = 0
        return data

    def take_transfer(self, size: int) -> bytes:
        """Up to ``size`` bytes of the current bulk-IN transfer (a USB read of ``size``: it
        ends at the transfer's end); b"" for a zero-length one."""
        if not self._transfers:
            return b""
        size = min(size, self._transfers[0])
        data = bytes(self.bulk_in[:size])
        del self.bulk_in[:size]
        self._transfers[0] -= size
        if not self._transfers[0]:
            self._transfers.popleft()
        return data

    @property
    def pending_transfers(self) -> int:
        return len(self._transfers)

    def insert(self, card: Card) -> None:
        self.card, self.present, self.powered = card, True, False
        self.interrupts.append(encode_ccid(CcidNotifySlotChange((SlotState(True, True),))))

    def remove(self) -> None:
        self.present = self.powered = False
        self.interrupts.append(encode_ccid(CcidNotifySlotChange((SlotState(False, True),))))

    def _emit(self, message: CcidMessage) -> None:
        data = encode_ccid(message)
        if self.corrupt is not None:
            data = self.corrupt(data)
        self.bulk_in += data
        self._transfers.append(len(data))

    # ---------------------------------------------------------------- device side

    def _status(self, command: int = CommandStatus.PROCESSED, error: int = 0) -> SlotStatus:
        icc = (IccStatus.ABSENT if not self.present else
               IccStatus.PRESENT_ACTIVE if self.powered else IccStatus.PRESENT_INACTIVE)
        return SlotStatus(icc, command, error)

    def _answer(self, message: CcidMessage) -> CcidMessage | None:
        if isinstance(message, CcidAbort):
            self.aborted.append(message.seq)
            return CcidSlotStatus(message.slot, message.seq, self._status())
        if self.mute:
            return None
        assert not isinstance(message, CcidNotifySlotChange)
        slot, seq = message.slot, message.seq
        if isinstance(message, CcidGetSlotStatus):
            return CcidSlotStatus(slot, seq, self._status())
        if isinstance(message, CcidIccPowerOff):
            self.powered = False
            return CcidSlotStatus(slot, seq, self._status())
        if isinstance(message, CcidIccPowerOn):
            if not self.present or self.card is None:
                return CcidDataBlock(slot, seq, self._status(CommandStatus.FAILED,
                                                             CcidError.ICC_MUTE))
            self.powered = True
            auto_ifsd = bool(self.descriptor.features & CcidFeatures.AUTO_IFSD)
            self._t1 = _T1Card(ifsc=self._t1.ifsc, ifsd=254 if auto_ifsd else 32)
            self._t0_pending = b""
            return CcidDataBlock(slot, seq, self._status(), self.card.power_on())
        if isinstance(message, CcidGetParameters):
            return self._parameters(slot, seq)
        if isinstance(message, CcidSetParameters):
            self.protocol = message.protocol
            return self._parameters(slot, seq)
        if isinstance(message, CcidXfrBlock):
            if not self.powered or self.card is None:
                failed = self._status(CommandStatus.FAILED, CcidError.ICC_MUTE)
                return CcidDataBlock(slot, seq, failed)
            return self._xfr(message)
        return CcidSlotStatus(slot, seq, self._status(CommandStatus.FAILED,
                                                      CcidError.CMD_NOT_SUPPORTED))

    def _parameters(self, slot: int, seq: int) -> CcidParameters:
        params: T0Parameters | T1Parameters = (
            T0Parameters(0x11, 0, 0, 10, 0) if self.protocol == 0
            else T1Parameters(0x11, 0x10, 0, 0x45, 0, self._t1.ifsc, 0))
        return CcidParameters(slot, seq, self._status(), self.protocol, params)

    def _xfr(self, message: CcidXfrBlock) -> CcidMessage:
        assert self.card is not None
        slot, seq = message.slot, message.seq
        if self.level == "tpdu" and self.protocol == 0:
            data = self._t0(message.data)
        elif self.level == "tpdu":
            data = self._t1_block(message.data)
        elif self.level == "extended":
            return self._extended(message)
        else:
            data = self.card.transmit(message.data)
        return CcidDataBlock(slot, seq, self._status(), data)

    def _extended(self, message: CcidXfrBlock) -> CcidMessage:
        assert self.card is not None
        slot, seq, level = message.slot, message.seq, message.level_parameter
        room = self.descriptor.max_message_length - 10
        if level == 0x10:  # the host asks for the next part of the answer
            part, self._response_rest = (self._response_rest[:room],
                                         self._response_rest[room:])
            chain = 0x03 if self._response_rest else 0x02
            return CcidDataBlock(slot, seq, self._status(), part, chain)
        if level in (0x01, 0x03):
            if level == 0x01:
                self._chain.clear()
            self._chain += message.data
            return CcidDataBlock(slot, seq, self._status(), b"", 0x10)
        apdu = message.data if level == 0x00 else bytes(self._chain + message.data)
        response = self.card.transmit(apdu)
        if len(response) <= room:
            return CcidDataBlock(slot, seq, self._status(), response)
        self._response_rest = response[room:]
        return CcidDataBlock(slot, seq, self._status(), response[:room], 0x01)

    def _t0(self, tpdu: bytes) -> bytes:
        """A T=0 card (ISO/IEC 7816-3 section 12.2) made of an APDU card."""
        assert self.card is not None
        if len(tpdu) < 5:
            return b"\x67\x00"
        p3 = tpdu[4]
        if tpdu[1] == 0xC0 and len(tpdu) == 5 and self._t0_pending:  # GET RESPONSE, ours
            wanted = p3 or 256
            part, self._t0_pending = self._t0_pending[:wanted], self._t0_pending[wanted:]
            if self._t0_pending:
                left = len(self._t0_pending)
                return part + bytes((0x61, left if left < 256 else 0))
            return part + self._t0_sw  # the card's own status (61xx: it has more)
        self._t0_pending = b""
        if len(tpdu) == 5:  # case 1 or 2: P3 is Le
            response = self.card.transmit(tpdu[:4] + bytes((p3,)))
            data, sw = response[:-2], response[-2:]
            wanted = p3 or 256
            if data and len(data) != wanted and sw == b"\x90\x00":
                return bytes((0x6C, len(data) & 0xFF))
            return response
        # case 3 or 4: the data goes, the answer waits for GET RESPONSE
        response = self.card.transmit(tpdu + b"\x00")
        data, sw = response[:-2], response[-2:]
        if data:
            self._t0_pending, self._t0_sw = data, sw
            return bytes((0x61, len(data) & 0xFF))
        return sw

    def _t1_block(self, raw: bytes) -> bytes:
        """The card's answer to one T=1 block from the interface."""
        assert self.card is not None
        self.t1_blocks.append(raw)
        state = self._t1
        answer = self._t1_logic(raw, state)
        state.last = answer
        if self.t1_faults:
            answer = self.t1_faults.popleft()(answer)
        return answer

    def _t1_logic(self, raw: bytes, state: _T1Card) -> bytes:
        assert self.card is not None
        try:
            block = decode_block(raw)
        except Exception:
            return r_block(state.nr, 1).encode()
        if block.kind is BlockKind.S:
            if block.s_kind == SKind.IFS and not block.response:
                state.ifsd = block.inf[0]
                return s_block(SKind.IFS, True, block.inf).encode()
            if block.s_kind == SKind.RESYNCH and not block.response:
                state.ns = state.nr = 0
                return s_block(SKind.RESYNCH, True).encode()
            if block.s_kind == SKind.WTX and block.response:
                return self._t1_next(state)
            return r_block(state.nr, 2).encode()
        if block.kind is BlockKind.R:
            if state.pending and block.nr == state.ns:  # the next part of our answer
                return self._t1_next(state)
            return state.last  # repeat
        if block.ns != state.nr:  # a repeated block: acknowledge it again
            return state.last
        state.nr ^= 1
        state.command += block.inf
        if block.more:
            return r_block(state.nr).encode()
        response = self.card.transmit(state.command)
        state.command = b""
        state.pending = response
        if self.t1_wtx:
            self.t1_wtx -= 1
            return s_block(SKind.WTX, False, b"\x02").encode()
        return self._t1_next(state)

    def _t1_next(self, state: _T1Card) -> bytes:
        part, state.pending = state.pending[:state.ifsd], state.pending[state.ifsd:]
        block = i_block(state.ns, part, bool(state.pending))
        state.ns ^= 1
        return block.encode()


def _time_extension(answer: CcidMessage) -> CcidMessage:
    status = SlotStatus(IccStatus.PRESENT_ACTIVE, CommandStatus.TIME_EXTENSION, 1)
    assert not isinstance(answer, CcidNotifySlotChange)
    return CcidDataBlock(answer.slot, answer.seq, status)
