"""The host side of USB CCID: a reader driver without I/O (what libccid is to pcscd).

Spec: USB CCID rev 1.1 (sections cited below; messages in :mod:`ccidemu.ccid`), ISO/IEC
7816-3:2006 sections 11 (T=1, :mod:`ccidemu.t1`) and 12.2 (APDUs over T=0).

Theory of operation
-------------------
:class:`CcidHostDriver` drives one slot of one reader.  The adapter (``vmc/backends/usb.py``)
owns the USB pipes; the driver only turns requests into bulk-OUT frames and bulk-IN and
interrupt-IN bytes into events:

1. Start one operation at a time: :meth:`~CcidHostDriver.power_on`,
   :meth:`~CcidHostDriver.transmit`, :meth:`~CcidHostDriver.slot_status`,
   :meth:`~CcidHostDriver.power_off`.  Each may take several CCID commands (power-on asks
   for the slot's parameters; T=0 answers 61xx / 6Cxx with a second TPDU; T=1 is a dialogue
   of blocks; an extended APDU is chained), run by a generator: it yields a command, the
   driver numbers it (bSeq, section 6.1: the reader echoes it), and its answer is sent back
   in.  Write every frame :meth:`~CcidHostDriver.data_to_send` gives to bulk-OUT.
2. Feed what bulk-IN delivers to :meth:`~CcidHostDriver.receive_bulk` (any chunking; say
   which chunk ends a USB transfer: a transfer carries one message (section 3.2), and the
   bytes a device sends after the message's ``dwLength`` in the same transfer are dropped,
   as QEMU 7.2's usb-ccid sends 7 more with a Parameters answer of dwLength 0; a transfer
   that ends inside a message is an error), interrupt-IN transfers to
   :meth:`~CcidHostDriver.receive_interrupt`, and drain :meth:`~CcidHostDriver.next_event`:
   the operation's result (:class:`PoweredOn`, :class:`Answer`, :class:`Status`,
   :class:`PoweredOff`, or :class:`Failed`), :class:`TimeExtension` while the card asks for
   more time (section 6.2.6: bmCommandStatus 2; the deadline moves on), :class:`SlotChanged`
   and :class:`HardwareError` from the interrupt pipe (section 6.3).
3. Time is passed in (``now``): :attr:`~CcidHostDriver.deadline` is when the answer is
   overdue; :meth:`~CcidHostDriver.check_timeout` then emits :class:`TimedOut` and the
   adapter aborts: the ABORT control request (section 5.3.1: ``wValue`` from
   :meth:`~CcidHostDriver.abort`) then the PC_to_RDR_Abort it queues; :class:`Aborted` comes
   with the reader's SlotStatus.  Answers of abandoned commands are recognised by their
   bSeq and dropped.

Bytes that break the protocol (a malformed frame, a message of the wrong type or slot, a
bSeq nobody asked for) raise :class:`DeviceError` (a :class:`~ccidemu.errors.DecodeError`,
the only exception the receive methods raise): the operation is abandoned and the stream is
dead until :meth:`~CcidHostDriver.abort` starts a fresh one.

Exchange levels (section 5.1, dwFeatures): at short and extended APDU level the reader
speaks T=0 or T=1 itself and the APDU goes whole (extended ones chained with wLevelParameter
/ bChainParameter, section 6.1.4 and 6.2.1, when longer than the reader's message length);
at TPDU level the driver does the protocol: T=0 by ISO/IEC 7816-3 section 12.2 (case 4
without Le, then GET RESPONSE on 61xx; case 2 sent again with P3 from 6Cxx), T=1 by section
11.  Character level, and T=1 at TPDU level on a reader that does not negotiate parameters
itself, are refused with :class:`UnsupportedReader`, saying what is missing.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from ccidemu.apdu import ApduCase, parse_command
from ccidemu.atr import Atr, parse_atr
from ccidemu.ccid import (
    HEADER_LENGTH,
    CcidAbort,
    CcidDataBlock,
    CcidDescriptor,
    CcidDirection,
    CcidError,
    CcidFeatures,
    CcidGetParameters,
    CcidGetSlotStatus,
    CcidHardwareError,
    CcidIccPowerOff,
    CcidIccPowerOn,
    CcidMessage,
    CcidNotifySlotChange,
    CcidParameters,
    CcidSetParameters,
    CcidSlotStatus,
    CcidXfrBlock,
    CommandStatus,
    ExchangeLevel,
    IccStatus,
    PowerSelect,
    SlotStatus,
    T0Parameters,
    T1Parameters,
    decode_ccid,
    describe_ccid,
    encode_ccid,
)
from ccidemu.errors import CardError, DecodeError
from ccidemu.t1 import T1Protocol

__all__ = [
    "ABORT_REQUEST",
    "DEFAULT_RESPONSE_TIMEOUT",
    "Aborted",
    "Answer",
    "CcidHostDriver",
    "DeviceError",
    "DriverEvent",
    "Exchange",
    "Failed",
    "HardwareError",
    "PoweredOff",
    "PoweredOn",
    "SlotChanged",
    "Status",
    "TimeExtension",
    "TimedOut",
    "UnsupportedReader",
    "check_reader",
    "interrupt_event",
]

#: Seconds an answer may take before it is overdue (a card that needs longer says so with
#: time extensions, section 6.2.6; each one gives it this much again, times its multiplier).
DEFAULT_RESPONSE_TIMEOUT = 10.0
#: bRequest of the class-specific ABORT control request (section 5.3.1); bmRequestType 21.
ABORT_REQUEST = 0x01
#: Stale bSeq values remembered (answers of abandoned commands that may still arrive).
_STALE = 8


class DeviceError(DecodeError):
    """The reader's bytes break CCID (malformed, unexpected, out of sequence)."""


class UnsupportedReader(CardError):
    """The reader (or the reader with this card) needs something this driver does not do."""


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class PoweredOn:
    """The card answered reset: its ATR and the protocol in use (0 or 1)."""

    atr: bytes
    protocol: int


@dataclass(frozen=True, slots=True)
class Answer:
    """The response APDU (data + SW1 SW2) to :meth:`CcidHostDriver.transmit`."""

    response: bytes


@dataclass(frozen=True, slots=True)
class Status:
    """:meth:`CcidHostDriver.slot_status`: a card is in the slot / is powered."""

    present: bool
    active: bool


@dataclass(frozen=True, slots=True)
class PoweredOff:
    pass


@dataclass(frozen=True, slots=True)
class Failed:
    """The operation failed on the reader's side; ``absent``: there is no card."""

    reason: str
    absent: bool = False
    unsupported: bool = False


@dataclass(frozen=True, slots=True)
class TimeExtension:
    """The card asks for more time (``multiplier`` of the waiting time, section 6.2.6)."""

    multiplier: int


@dataclass(frozen=True, slots=True)
class TimedOut:
    """The answer is overdue: abort (see the module docstring)."""

    seq: int


@dataclass(frozen=True, slots=True)
class Aborted:
    """The reader confirmed the Abort; the slot takes commands again."""


@dataclass(frozen=True, slots=True)
class SlotChanged:
    """NotifySlotChange for our slot (section 6.3.1)."""

    present: bool
    changed: bool


@dataclass(frozen=True, slots=True)
class HardwareError:
    """RDR_to_PC_HardwareError (section 6.3.2), e.g. 01 overcurrent."""

    code: int


DriverEvent = (PoweredOn | Answer | Status | PoweredOff | Failed | TimeExtension | TimedOut
               | Aborted | SlotChanged | HardwareError)


class Exchange:
    """How APDUs travel after power-on (names for logs and listings)."""

    SHORT_APDU = "short APDU"
    EXTENDED_APDU = "extended APDU"
    TPDU_T0 = "TPDU T=0"
    TPDU_T1 = "TPDU T=1"


# --------------------------------------------------------------------------- reader checks


_LEVEL_NAMES = {
    ExchangeLevel.CHARACTER: "character",
    ExchangeLevel.TPDU: "TPDU",
    ExchangeLevel.SHORT_APDU: "short APDU",
    ExchangeLevel.EXTENDED_APDU: "extended APDU",
}


def check_reader(descriptor: CcidDescriptor) -> str:
    """The reader's exchange level by name; UnsupportedReader when the driver cannot use it."""
    level = descriptor.exchange_level
    if level == ExchangeLevel.CHARACTER:
        raise UnsupportedReader(
            "the reader exchanges characters (dwFeatures has no TPDU or APDU level bit, CCID "
            "section 5.1); only TPDU and APDU level readers are supported: use it through "
            "pcscd and libccid (--card pcsc:READER)")
    if level not in _LEVEL_NAMES:
        raise UnsupportedReader(f"the reader announces an invalid exchange level "
                                f"(dwFeatures {int(descriptor.features):08X})")
    if not descriptor.protocols & 3:
        raise UnsupportedReader(f"the reader supports neither T=0 nor T=1 (dwProtocols "
                                f"{descriptor.protocols:08X})")
    return _LEVEL_NAMES[ExchangeLevel(level)]


def _t1_settings(atr: Atr) -> tuple[int, bool]:
    """(IFSC, CRC) from the ATR: the first TAi and TCi (i > 2) after a TD naming T=1
    (ISO/IEC 7816-3 section 11.4)."""
    ifsc, crc = 32, False
    seen_ta = seen_tc = False
    for previous, level in zip(atr.interface, atr.interface[1:], strict=False):
        if previous.protocol != 1:
            continue
        if level.ta is not None and not seen_ta:
            ifsc, seen_ta = level.ta, True
        if level.tc is not None and not seen_tc:
            crc, seen_tc = bool(level.tc & 1), True
    return ifsc if 1 <= ifsc <= 254 else 32, crc


def _t0_parameters(atr: Atr) -> T0Parameters:
    """SetParameters for T=0 at the default rate (no PPS: Fi/Di 372/1), TC1's guard time and
    TC2's waiting integer (ISO/IEC 7816-3 sections 8.3 and 10.2)."""
    tc1 = atr.interface[0].tc if atr.interface else None
    tc2 = atr.interface[1].tc if len(atr.interface) > 1 else None
    convention = 0x02 if atr.convention == "inverse" else 0x00
    return T0Parameters(0x11, convention, tc1 or 0, tc2 if tc2 else 10, 0)


# --------------------------------------------------------------------------- the driver


#: An operation: yields commands (bSeq filled in by the driver), is sent their answers,
#: returns its result event.
_Operation = Generator[CcidMessage, CcidMessage, "DriverEvent"]


class CcidHostDriver:
    """One slot of one CCID reader, without I/O (see the module docstring)."""

    def __init__(self, descriptor: CcidDescriptor, *, slot: int = 0,
                 response_timeout: float = DEFAULT_RESPONSE_TIMEOUT) -> None:
        self.level = check_reader(descriptor)
        if not 0 <= slot <= descriptor.max_slot_index:
            raise UnsupportedReader(f"the reader has no slot {slot} (bMaxSlotIndex "
                                    f"{descriptor.max_slot_index})")
        self.descriptor = descriptor
        self.slot = slot
        self.response_timeout = response_timeout
        #: dwMaxCCIDMessageLength, header included; at least a short APDU's worth
        self.max_message = max(descriptor.max_message_length, HEADER_LENGTH + 261)
        self.exchange: str | None = None  # how APDUs travel, known after power-on
        self.protocol: int | None = None
        self._t1: T1Protocol | None = None
        self._seq = 0
        self._stale: deque[int] = deque(maxlen=_STALE)
        self._buffer = bytearray()  # bulk-IN bytes of a message not complete yet
        self._limit = max(self.max_message, 65546 + HEADER_LENGTH)
        self._out: deque[bytes] = deque()
        self._events: deque[DriverEvent] = deque()
        self._operation: _Operation | None = None
        self._waiting: CcidMessage | None = None  # the command whose answer is due
        self._waiting_seq: int | None = None  # its bSeq
        self._aborting: int | None = None  # bSeq of our Abort
        self.deadline: float | None = None
        self._timed_out = False

    # ---------------------------------------------------------------- state

    @property
    def busy(self) -> bool:
        """An operation (or an Abort) waits for the reader."""
        return self._operation is not None or self._aborting is not None

    def data_to_send(self) -> bytes | None:
        """The next frame for bulk-OUT, or None."""
        return self._out.popleft() if self._out else None

    def next_event(self) -> DriverEvent | None:
        return self._events.popleft() if self._events else None

    # ---------------------------------------------------------------- operations

    def power_on(self, now: float) -> None:
        """IccPowerOn (section 6.1.1), then the protocol set-up the exchange level needs."""
        self._begin(self._power_on(), now)

    def power_off(self, now: float) -> None:
        """IccPowerOff (section 6.1.2)."""
        self._begin(self._simple(CcidIccPowerOff(self.slot, 0), PoweredOff), now)

    def slot_status(self, now: float) -> None:
        """GetSlotStatus (section 6.1.3)."""
        self._begin(self._slot_status(), now)

    def transmit(self, apdu: bytes, now: float) -> None:
        """One command APDU; :class:`Answer` with the response APDU."""
        self._begin(self._transmit(bytes(apdu)), now)

    def abort(self, now: float) -> int:
        """Abandon the operation in progress and resynchronise (section 5.3.1): returns the
        ``wValue`` (bSeq << 8 | bSlot) of the ABORT control request the adapter sends first;
        the PC_to_RDR_Abort with the same bSeq is queued for bulk-OUT after it."""
        self._abandon()
        self._out.clear()
        self._buffer.clear()
        seq = self._next_seq()
        self._aborting = seq
        self._timed_out = False
        self.deadline = now + self.response_timeout
        self._out.append(encode_ccid(CcidAbort(self.slot, seq)))
        return seq << 8 | self.slot

    def give_up(self) -> None:
        """Forget the operation in progress (the adapter could not abort it: the device is
        gone or will be reset).  Its answer, should one come, is dropped."""
        self._abandon()
        self._aborting = None
        self._out.clear()
        self._buffer.clear()
        self.deadline = None
        self._timed_out = False

    def check_timeout(self, now: float) -> bool:
        """True (and a :class:`TimedOut` event, once) when the answer is overdue."""
        if self.deadline is None or now < self.deadline or not self.busy:
            return False
        if not self._timed_out:
            self._timed_out = True
            seq = self._waiting_seq if self._waiting_seq is not None else self._aborting or 0
            self._events.append(TimedOut(seq))
        return True

    # ---------------------------------------------------------------- input

    def receive_bulk(self, data: bytes, now: float, *, transfer_end: bool = False) -> None:
        """Bytes from bulk-IN; ``transfer_end``: this chunk ends a USB transfer (a short or
        zero-length packet).  Raises only :class:`DeviceError` (then the buffered bytes are
        gone: :meth:`abort` to go on)."""
        buffer = self._buffer
        buffer += data
        completed = False
        try:
            while len(buffer) >= HEADER_LENGTH:
                length = int.from_bytes(buffer[1:5], "little")
                if length > self._limit - HEADER_LENGTH:  # before anything is buffered
                    raise DeviceError(f"the reader announces a {length}-byte message (dwLength "
                                      f"above {self._limit - HEADER_LENGTH})")
                end = HEADER_LENGTH + length
                if len(buffer) < end:
                    break
                try:
                    message, _ = decode_ccid(bytes(buffer[:end]), self._limit,
                                             direction=CcidDirection.RDR_TO_PC)
                except DecodeError as exc:
                    raise DeviceError(f"bad CCID frame from the reader: {exc}") from None
                del buffer[:end]
                completed = True
                if transfer_end and buffer:  # one message per transfer: the rest is not one
                    buffer.clear()
                self._on_message(message, now)
            if transfer_end and buffer:
                if not completed:
                    raise DeviceError(f"the reader's transfer ended inside a message "
                                      f"({len(buffer)} bytes of it)")
                buffer.clear()
        except DeviceError:
            buffer.clear()
            self._abandon()
            raise

    def receive_interrupt(self, data: bytes) -> None:
        """One interrupt-IN transfer.  Raises only :class:`DeviceError`."""
        event = interrupt_event(data, self.slot)
        if event is not None:
            self._events.append(event)

    # ---------------------------------------------------------------- internals

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq = (seq + 1) & 0xFF
        return seq

    def _abandon(self) -> None:
        if self._waiting_seq is not None:
            self._stale.append(self._waiting_seq)
        if self._operation is not None:
            self._operation.close()
        self._operation = None
        self._waiting = None
        self._waiting_seq = None

    def _begin(self, operation: _Operation, now: float) -> None:
        if self.busy:
            operation.close()
            raise RuntimeError("CcidHostDriver: one operation at a time")
        self._operation = operation
        self._timed_out = False
        self._step(lambda: next(operation), now)

    def _step(self, advance: Callable[[], CcidMessage], now: float) -> None:
        try:
            command = advance()
        except StopIteration as stop:
            self._finish(stop.value)
            return
        except CardError as exc:
            self._finish(Failed(str(exc), unsupported=isinstance(exc, UnsupportedReader)))
            return
        except _Absent as exc:
            self._finish(Failed(str(exc), absent=True))
            return
        seq = self._next_seq()
        command = dataclasses.replace(command, seq=seq)  # type: ignore[arg-type]
        self._waiting = command
        self._waiting_seq = seq
        self.deadline = now + self.response_timeout
        self._out.append(encode_ccid(command))

    def _finish(self, event: DriverEvent) -> None:
        self._operation = None
        self._waiting = None
        self._waiting_seq = None
        self.deadline = None
        self._events.append(event)

    def _on_message(self, message: CcidMessage, now: float) -> None:
        seq = getattr(message, "seq", None)
        slot = getattr(message, "slot", None)
        if self._aborting is not None and seq == self._aborting:
            if not isinstance(message, CcidSlotStatus):
                raise DeviceError(f"the reader answered Abort with {describe_ccid(message)}")
            if message.status.command_status == CommandStatus.TIME_EXTENSION:
                self.deadline = now + self.response_timeout
                return
            self._aborting = None
            self.deadline = None
            self._events.append(Aborted())
            return
        if seq is not None and seq in self._stale:
            self._stale.remove(seq)  # a late answer of an abandoned command
            return
        waiting = self._waiting_seq
        if waiting is None or self._operation is None:
            raise DeviceError(f"the reader sent {describe_ccid(message)} unasked")
        if seq != waiting or slot != self.slot:
            raise DeviceError(f"the reader answered bSeq {waiting} slot {self.slot} with "
                              f"{describe_ccid(message)}")
        status: SlotStatus | None = getattr(message, "status", None)
        if status is not None and status.command_status == CommandStatus.TIME_EXTENSION:
            multiplier = status.error
            self.deadline = now + self.response_timeout * max(1, multiplier)
            self._events.append(TimeExtension(multiplier))
            return
        operation = self._operation
        self._waiting = None
        self._waiting_seq = None
        self._step(lambda: operation.send(message), now)

    # ---------------------------------------------------------------- operations' bodies

    def _simple(self, command: CcidMessage, result: Callable[[], DriverEvent]) -> _Operation:
        answer = yield command
        _expect(answer, CcidSlotStatus, command)
        _check(answer, command)
        return result()

    def _slot_status(self) -> _Operation:
        command = CcidGetSlotStatus(self.slot, 0)
        answer = yield command
        _expect(answer, CcidSlotStatus, command)
        status = answer.status  # type: ignore[union-attr]
        if status.failed and status.icc_status != IccStatus.ABSENT:
            raise CardError(f"GetSlotStatus failed: {status.describe()}")
        present = status.icc_status != IccStatus.ABSENT
        return Status(present, status.icc_status == IccStatus.PRESENT_ACTIVE)

    def _power_on(self) -> _Operation:
        self.exchange = self.protocol = None
        self._t1 = None
        command: CcidMessage = CcidIccPowerOn(self.slot, 0, PowerSelect.AUTOMATIC)
        answer = yield command
        _expect(answer, CcidDataBlock, command)
        _check(answer, command)
        atr_bytes = answer.data  # type: ignore[union-attr]
        try:
            atr = parse_atr(atr_bytes)
        except DecodeError as exc:
            raise CardError(f"the card's ATR {atr_bytes.hex()} is malformed: {exc}") from None
        level = self.descriptor.exchange_level
        if level in (ExchangeLevel.SHORT_APDU, ExchangeLevel.EXTENDED_APDU):
            self.exchange = (Exchange.SHORT_APDU if level == ExchangeLevel.SHORT_APDU
                             else Exchange.EXTENDED_APDU)
            command = CcidGetParameters(self.slot, 0)
            answer = yield command
            protocol = min(atr.protocols)
            if isinstance(answer, CcidParameters) and not answer.status.failed:
                protocol = answer.protocol
            self.protocol = protocol
            return PoweredOn(atr_bytes, protocol)
        # TPDU level: we speak the protocol (section 12.2 / 11 of ISO/IEC 7816-3)
        features = self.descriptor.features
        negotiates = bool(features & (CcidFeatures.AUTO_PARAMETERS_NEGOTIATION
                                      | CcidFeatures.AUTO_PPS))
        command = CcidGetParameters(self.slot, 0)
        answer = yield command
        current = answer if isinstance(answer, CcidParameters) and not answer.status.failed \
            else None
        if negotiates and current is not None and current.protocol in (0, 1):
            protocol = current.protocol
        elif 0 in atr.protocols and self.descriptor.supports_t0:
            protocol = 0
            if not negotiates:
                command = CcidSetParameters(self.slot, 0, 0, _t0_parameters(atr))
                answer = yield command
                _expect(answer, CcidParameters, command)
                _check(answer, command)
        elif 1 in atr.protocols and negotiates:
            protocol = 1
        else:
            raise UnsupportedReader(
                f"the card speaks {_protocols(atr)} and the reader exchanges TPDUs without "
                "negotiating the protocol parameters itself (dwFeatures "
                f"{int(features):08X} lacks 'automatic parameters negotiation' 00000040 and "
                "'automatic PPS' 00000080, CCID section 5.1); this driver does T=1 at TPDU "
                "level only with such readers: use the reader through pcscd and libccid "
                "(--card pcsc:READER)")
        self.protocol = protocol
        if protocol == 0:
            self.exchange = Exchange.TPDU_T0
            return PoweredOn(atr_bytes, 0)
        ifsc, crc = _t1_settings(atr)
        if current is not None and current.protocol == 1 and isinstance(
                current.parameters, T1Parameters):
            ifsc = current.parameters.ifsc or ifsc
            crc = bool(current.parameters.tcckst1 & 1)
        if crc:
            raise UnsupportedReader("the card uses T=1 with a CRC epilogue; this driver does "
                                    "LRC only: use the reader through pcscd and libccid "
                                    "(--card pcsc:READER)")
        ifsd = self.descriptor.max_ifsd
        self._t1 = T1Protocol(ifsc=min(max(ifsc, 1), 254),
                              ifsd=min(ifsd, 254) if ifsd else 254)
        self.exchange = Exchange.TPDU_T1
        if not features & CcidFeatures.AUTO_IFSD:
            yield from self._t1_exchange(self._t1.negotiate_ifsd())
        return PoweredOn(atr_bytes, 1)

    def _xfr(self, data: bytes, bwi: int = 0, level: int = 0) -> Generator[
            CcidMessage, CcidMessage, CcidDataBlock]:
        command = CcidXfrBlock(self.slot, 0, data, bwi, level)
        answer = yield command
        _expect(answer, CcidDataBlock, command)
        _check(answer, command)
        assert isinstance(answer, CcidDataBlock)
        return answer

    def _transmit(self, apdu: bytes) -> _Operation:
        exchange = self.exchange
        if exchange is None:
            raise CardError("the card is not powered on")
        if exchange == Exchange.TPDU_T0:
            response = yield from self._t0(apdu)
        elif exchange == Exchange.TPDU_T1:
            assert self._t1 is not None
            response = yield from self._t1_exchange(self._t1.transmit(apdu))
        else:
            response = yield from self._apdu_level(apdu)
        if len(response) < 2:
            raise CardError(f"the card answered {len(response)} bytes (no SW1 SW2)")
        return Answer(response)

    def _apdu_level(self, apdu: bytes) -> Generator[CcidMessage, CcidMessage, bytes]:
        room = self.max_message - HEADER_LENGTH
        if len(apdu) <= room:
            answer = yield from self._xfr(apdu)
        elif self.exchange != Exchange.EXTENDED_APDU:
            raise CardError(f"a {len(apdu)}-byte command does not fit the reader's "
                            f"{room}-byte messages (short APDU level)")
        else:  # command chaining, section 6.1.4 wLevelParameter 1, 3, ..., 2
            parts = [apdu[i:i + room] for i in range(0, len(apdu), room)]
            for i, part in enumerate(parts):
                level = 1 if i == 0 else 2 if i == len(parts) - 1 else 3
                answer = yield from self._xfr(part, level=level)
                if level != 2 and answer.chain_parameter != 0x10:
                    raise DeviceError(f"the reader answered a chained command block with "
                                      f"bChainParameter {answer.chain_parameter:02X}, not 10")
        data = bytearray(answer.data)
        # response chaining, section 6.2.1 bChainParameter 1, 3, ..., 2
        if answer.chain_parameter == 0x01:
            while True:
                answer = yield from self._xfr(b"", level=0x10)
                data += answer.data
                if len(data) > 65538:
                    raise CardError("the reader's chained answer exceeds 65538 bytes")
                if answer.chain_parameter == 0x02:
                    break
                if answer.chain_parameter != 0x03:
                    raise DeviceError(f"bChainParameter {answer.chain_parameter:02X} in a "
                                      "chained answer (expected 02 or 03)")
        elif answer.chain_parameter not in (0x00,):
            raise DeviceError(f"bChainParameter {answer.chain_parameter:02X} in an answer")
        return bytes(data)

    def _t0(self, apdu: bytes) -> Generator[CcidMessage, CcidMessage, bytes]:
        """ISO/IEC 7816-3:2006 section 12.2: a short command APDU over T=0."""
        try:
            command = parse_command(apdu)
        except DecodeError:
            answer = yield from self._xfr(apdu)  # not an APDU: the card judges it
            return answer.data
        if command.is_extended:
            raise CardError("an extended APDU cannot go over T=0 at TPDU level (ISO/IEC 7816-3 "
                            "section 12.2.6 needs the card's ENVELOPE)")
        header = apdu[:4]
        case = command.case
        if case == ApduCase.CASE_1:
            answer = yield from self._xfr(header + b"\x00")  # 12.2.2: P3 = 00
            return answer.data
        if case == ApduCase.CASE_3S:
            answer = yield from self._xfr(apdu)
            return answer.data
        ne = command.ne
        if case == ApduCase.CASE_2S:
            answer = yield from self._xfr(apdu)
            data = answer.data
            if len(data) == 2 and data[0] == 0x6C:  # 12.2.3: wrong Le, send again with P3=xx
                answer = yield from self._xfr(header + data[1:2])
                data = answer.data
                if len(data) - 2 > ne:  # at most Ne bytes reach the application
                    data = data[:ne] + data[-2:]
        else:  # case 4: 12.2.5, the command goes without Le
            answer = yield from self._xfr(apdu[:5 + command.nc])
            data = answer.data
        if len(data) == 2 and data[0] == 0x61:  # 12.2.3 / 12.2.5: fetch with GET RESPONSE
            available = data[1] or 256
            cla = apdu[0] & 0x03  # GET RESPONSE on the command's logical channel
            answer = yield from self._xfr(bytes((cla, 0xC0, 0x00, 0x00,
                                                 min(available, ne) & 0xFF)))
            data = answer.data
        return data

    def _t1_exchange(self, exchange: Generator[Any, bytes, bytes]) -> Generator[
            CcidMessage, CcidMessage, bytes]:
        try:
            send = next(exchange)
            while True:
                answer = yield from self._xfr(send.block, bwi=send.bwi)
                send = exchange.send(answer.data)
        except StopIteration as stop:
            result: bytes = stop.value
            return result


def interrupt_event(data: bytes, slot: int = 0) -> SlotChanged | HardwareError | None:
    """What one interrupt-IN transfer (section 6.3) says about ``slot`` (None: nothing).
    Raises only :class:`DeviceError`."""
    try:
        message, _ = decode_ccid(data, direction=CcidDirection.INTERRUPT)
    except DecodeError as exc:
        raise DeviceError(f"bad interrupt message from the reader: {exc}") from None
    if isinstance(message, CcidNotifySlotChange):
        if slot < len(message.states):
            state = message.states[slot]
            return SlotChanged(state.present, state.changed)
    elif isinstance(message, CcidHardwareError) and message.slot == slot:
        return HardwareError(message.code)
    return None


class _Absent(Exception):
    """There is no card in the slot (internal: becomes Failed(absent=True))."""


def _protocols(atr: Atr) -> str:
    return " and ".join(f"T={p}" for p in sorted(atr.protocols))


def _expect(answer: CcidMessage, kind: type, command: CcidMessage) -> None:
    """The answer type section 6.2 mandates for ``command``; a failed SlotStatus instead
    is tolerated (some readers answer unknown commands with one)."""
    if isinstance(answer, kind):
        return
    if isinstance(answer, CcidSlotStatus) and answer.status.failed:
        _check(answer, command)
    raise DeviceError(f"the reader answered {type(command).__name__.removeprefix('Ccid')} "
                      f"with {describe_ccid(answer)}")


_ERROR_TEXT = {
    CcidError.ICC_MUTE: "the card does not answer (ICC mute)",
    CcidError.XFR_PARITY_ERROR: "parity error on the card's line",
    CcidError.XFR_OVERRUN: "overrun on the card's line",
    CcidError.HW_ERROR: "the reader reports a hardware error",
    CcidError.BAD_ATR_TS: "the card's ATR has a bad TS",
    CcidError.BAD_ATR_TCK: "the card's ATR has a bad TCK",
    CcidError.ICC_PROTOCOL_NOT_SUPPORTED: "the reader does not support the card's protocol",
    CcidError.ICC_CLASS_NOT_SUPPORTED: "the reader does not support the card's voltage class",
    CcidError.PROCEDURE_BYTE_CONFLICT: "procedure byte conflict (T=0)",
    CcidError.DEACTIVATED_PROTOCOL: "the protocol is deactivated",
    CcidError.BUSY_WITH_AUTO_SEQUENCE: "the reader is busy with an automatic sequence",
    CcidError.CMD_SLOT_BUSY: "the slot is busy with another command",
    CcidError.CMD_ABORTED: "the command was aborted",
    CcidError.CMD_NOT_SUPPORTED: "the reader does not support the command",
}


def _check(answer: CcidMessage, command: CcidMessage) -> None:
    """Raise for a failed answer (section 6.2.6): _Absent without a card, else CardError."""
    status: SlotStatus | None = getattr(answer, "status", None)
    if status is None or not status.failed:
        return
    what = type(command).__name__.removeprefix("Ccid")
    if status.icc_status == IccStatus.ABSENT:
        raise _Absent(f"{what}: no card in the reader")
    error = status.error
    text = _ERROR_TEXT.get(error) if isinstance(error, CcidError) else None
    raise CardError(f"{what} failed: {text or f'bError {error:02X}'}")
