"""QEMU's side of the VSCard chardev (``ccid-card-passthru``) plus its ``usb-ccid`` slot.

For tests, benchmarks and users who want to drive a card-side peer (``ccidemu serve``,
libcacard's ``vscclient``) without booting a guest.  Behaviour follows QEMU 7.2 as
observed byte for byte in docs/PROTOCOL.md, "VSCard" and ``hw/usb/ccid-card-passthru.c`` /
``hw/usb/dev-smartcard-reader.c``; CCID messages are USB CCID rev 1.1 (:mod:`ccidemu.ccid`).

Theory of operation
-------------------
:class:`FakeQemuCore` is sans-I/O.  The chardev side: :meth:`~FakeQemuCore.connected`
(client mode queues the unsolicited Init), :meth:`~FakeQemuCore.receive_data` with bytes
from the card side, :meth:`~FakeQemuCore.data_to_send` for bytes to write back.  The guest
side: :meth:`~FakeQemuCore.send_ccid` with a PC_to_RDR message for a reader, then
:meth:`~FakeQemuCore.next_ccid` for RDR_to_PC answers (and NotifySlotChange on card
insertion/removal) in order, or :meth:`~FakeQemuCore.take_answer` for one command's answer
and :meth:`~FakeQemuCore.take_notifications`; :meth:`~FakeQemuCore.next_seq` numbers the
guest's commands.  Each reader is one usb-ccid device with one slot (slot 0):

* IccPowerOn is answered from the cached ATR (the card side never sees it); IccPowerOff
  makes the card present-inactive; XfrBlock needs a present-active card (else ICC_MUTE)
  and no other XfrBlock in flight (else CMD_SLOT_BUSY); its APDU goes to the card side as
  VSC APDU and the card side's APDU becomes the DataBlock.  VSC Error(code != 0) in place
  of the response fails the transfer (bmCommandStatus failed, bError 00, as QEMU does).
* ReaderAdd, ReaderRemove, CardRemove and a valid ATR get Error(SUCCESS); a bad ATR
  (:func:`ccidemu.atr.qemu_accepts`) and Flush, FlushComplete, unknown types get
  Error(GENERAL_ERROR); every Init gets one Init (reader 0xFFFFFFFF) back.

QEMU has one reader (id 0) whatever ReaderAdd says; ``multi_reader=True`` plays a
SPICE-like host instead, where each ReaderAdd creates a reader with the next id 0, 1, 2...

:class:`FakeQemu` is the blocking adapter (a reader thread per connection) and
:class:`AsyncFakeQemu` the asyncio one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from ccidemu.atr import qemu_accepts
from ccidemu.ccid import (
    CcidDataBlock,
    CcidDataRateAndClockFrequency,
    CcidError,
    CcidEscape,
    CcidEscapeResponse,
    CcidGetParameters,
    CcidGetSlotStatus,
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
    CcidXfrBlock,
    CommandStatus,
    IccStatus,
    SlotState,
    SlotStatus,
    T0Parameters,
    T1Parameters,
    describe_ccid,
)
from ccidemu.errors import CardError, ConfigError, DecodeError
from ccidemu.redact import Redactor
from ccidemu.vsc import (
    READER_ID_UNDEFINED,
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
    VscUnknown,
    describe_vsc,
)
from vmc.addr import Address, TcpAddress, UnixAddress, connect, parse_address

__all__ = [
    "BULK_IN_BUFFER",
    "AsyncFakeQemu",
    "AsyncFakeQemuListener",
    "FakeQemu",
    "FakeQemuCore",
    "FakeQemuListener",
    "Mode",
]

log = logging.getLogger(__name__)

#: usb-ccid's bulk-in buffer; a bigger DataBlock is a hardware error (docs/PROTOCOL.md).
BULK_IN_BUFFER = 384
_MAX_RESPONSE = BULK_IN_BUFFER - 10
#: bError for a bad bSlot: the offset of bSlot in the header (CCID 6.2.6).
_ERROR_BAD_SLOT = 5

Mode = Literal["client", "server"]


@dataclass
class _Slot:
    """One usb-ccid device state (dev-smartcard-reader.c)."""

    reader_id: int
    name: str = ""
    inserted: bool = False
    powered: bool = True  # usb-ccid starts powered
    atr: bytes = b""
    pending: tuple[int, int] | None = None  # (slot, seq) of the XfrBlock in flight
    protocol: int = 0
    parameters: T0Parameters | T1Parameters = field(
        default_factory=lambda: T0Parameters(0x77, 0, 0, 0, 0)
    )
    out: deque[CcidMessage] = field(default_factory=deque)
    seq: int = 0  # the guest's next bSeq (next_seq)

    def icc_status(self) -> IccStatus:
        if not self.inserted:
            return IccStatus.ABSENT
        return IccStatus.PRESENT_ACTIVE if self.powered else IccStatus.PRESENT_INACTIVE

    def status(self, command: int = CommandStatus.PROCESSED, error: int = 0) -> SlotStatus:
        return SlotStatus(self.icc_status(), command, error)

    def failed(self, error: int) -> SlotStatus:
        return self.status(CommandStatus.FAILED, error)

    def notify(self, present: bool) -> None:
        changed = present != self.inserted
        self.inserted = present
        states = (SlotState(present, changed),) + (SlotState(False),) * 3
        self.out.append(CcidNotifySlotChange(states))


class FakeQemuCore:
    """Sans-I/O QEMU: ccid-card-passthru on the VSCard side, usb-ccid on the guest side."""

    def __init__(
        self,
        mode: Mode = "client",
        *,
        multi_reader: bool = False,
        byteorder: Literal["big", "little"] = "big",
    ) -> None:
        self.mode: Mode = mode
        self.multi_reader = multi_reader
        self._vsc = VscConnection(byteorder)
        self._out = bytearray()
        self._slots: dict[int, _Slot] = {} if multi_reader else {0: _Slot(0)}
        self._next_reader = 0
        #: multi_reader: the messages still owed to the guest by removed readers
        self._removed: dict[int, deque[CcidMessage]] = {}
        #: every VSC message received from the card side, in order
        self.received: list[VscMessage] = []
        #: every VSC message sent to the card side, in order
        self.sent: list[VscMessage] = []
        self.handshake_done = False
        self._redactors: dict[int, Redactor] = {}  # reader id -> redaction of its log lines
        self._ccid_redactors: dict[int, Redactor] = {}  # the same for the guest side

    # --- chardev side --------------------------------------------------------------------

    def connected(self) -> None:
        """The chardev connected: QEMU as chardev client sends its Init at once."""
        if self.mode == "client":
            self._send(VscInit(READER_ID_UNDEFINED))

    def receive_data(self, data: bytes) -> None:
        """Bytes from the card side.  DecodeError if they break VSCard framing."""
        self._vsc.receive_data(data)
        while (msg := self._vsc.next_event()) is not None:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("<< %s", self._describe(msg, response=True))
            self.received.append(msg)
            self._handle_vsc(msg)

    def data_to_send(self) -> bytes:
        """Bytes for the card side, and forget them."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def _describe(self, msg: VscMessage, *, response: bool) -> str:
        """A log line for ``msg`` with secrets redacted (ccidemu.redact)."""
        if not isinstance(msg, VscApdu):
            return describe_vsc(msg)
        redactor = self._redactors.setdefault(msg.reader_id, Redactor())
        shown, _ = redactor.response(msg.data) if response else redactor.command(msg.data)
        return describe_vsc(msg, data=shown)

    def _ccid_redactor(self, reader_id: int) -> Redactor:
        return self._ccid_redactors.setdefault(reader_id, Redactor())

    def _send(self, msg: VscMessage) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug(">> %s", self._describe(msg, response=False))
        self.sent.append(msg)
        self._out += self._vsc.send(msg)

    def _reply(self, reader_id: int, code: VscErrorCode) -> None:
        self._send(VscError(reader_id, code))

    def _handle_vsc(self, msg: VscMessage) -> None:
        if isinstance(msg, VscInit):
            self.handshake_done = True
            self._send(VscInit(READER_ID_UNDEFINED))
            return
        if isinstance(msg, VscReaderAdd):
            if self.multi_reader:
                reader_id = self._next_reader
                self._next_reader += 1
                self._slots[reader_id] = _Slot(reader_id, msg.name)
            else:
                reader_id = 0
                self._slots[0].name = msg.name
            self._reply(reader_id, VscErrorCode.SUCCESS)
            return
        if isinstance(msg, VscFlush | VscFlushComplete | VscUnknown):
            self._reply(msg.reader_id, VscErrorCode.GENERAL_ERROR)
            return
        slot = self._slot_for(msg.reader_id)
        if slot is None:
            log.warning("message for unknown reader %d", msg.reader_id)
            if not isinstance(msg, VscApdu | VscError):
                self._reply(msg.reader_id, VscErrorCode.GENERAL_ERROR)
            return
        if isinstance(msg, VscAtr):
            reason = qemu_accepts(msg.atr)
            if reason is not None:
                log.info("ATR refused: %s", reason)
                self._reply(msg.reader_id, VscErrorCode.GENERAL_ERROR)
                return
            slot.atr = bytes(msg.atr)
            self._reply(msg.reader_id, VscErrorCode.SUCCESS)
            self._flush_pending(slot)
            slot.notify(True)
        elif isinstance(msg, VscCardRemove):
            slot.notify(False)
            self._flush_pending(slot)
            self._reply(msg.reader_id, VscErrorCode.SUCCESS)
        elif isinstance(msg, VscReaderRemove):
            if slot.inserted:
                slot.notify(False)
            slot.pending = None  # QEMU's reset drops the answer owed to the guest
            if self.multi_reader:
                self._removed[msg.reader_id] = self._slots.pop(msg.reader_id).out
            self._reply(msg.reader_id, VscErrorCode.SUCCESS)
        elif isinstance(msg, VscApdu):
            self._answer(slot, msg.data)
        elif (
            isinstance(msg, VscError)
            and msg.code != VscErrorCode.SUCCESS
            and slot.pending is not None
        ):
            # ccid_card_card_error: failed, bError left at 00, no data
            slot_no, seq = slot.pending
            slot.pending = None
            slot.out.append(CcidDataBlock(slot_no, seq, slot.failed(0)))

    def _slot_for(self, reader_id: int) -> _Slot | None:
        if not self.multi_reader:
            return self._slots[0]  # QEMU ignores the reader id
        return self._slots.get(reader_id)

    def _flush_pending(self, slot: _Slot) -> None:
        if slot.pending is not None:
            slot_no, seq = slot.pending
            slot.pending = None
            slot.out.append(CcidDataBlock(slot_no, seq, slot.status()))

    def _answer(self, slot: _Slot, data: bytes) -> None:
        if slot.pending is None:
            log.warning("APDU from the card side with no command in flight: dropped")
            return
        slot_no, seq = slot.pending
        slot.pending = None
        if len(data) > _MAX_RESPONSE:
            log.warning("response of %d bytes exceeds usb-ccid's bulk-in buffer", len(data))
            slot.out.append(CcidDataBlock(slot_no, seq, slot.failed(CcidError.HW_ERROR)))
            return
        slot.out.append(CcidDataBlock(slot_no, seq, slot.status(), bytes(data)))

    # --- guest side ----------------------------------------------------------------------

    @property
    def readers(self) -> list[int]:
        return sorted(self._slots)

    def reader_name(self, reader_id: int = 0) -> str:
        return self._require(reader_id).name

    def card_present(self, reader_id: int = 0) -> bool:
        slot = self._slot_for(reader_id)
        return slot is not None and slot.inserted

    def atr(self, reader_id: int = 0) -> bytes | None:
        slot = self._slot_for(reader_id)
        return slot.atr if slot is not None and slot.inserted else None

    def busy(self, reader_id: int = 0) -> bool:
        slot = self._slot_for(reader_id)
        return slot is not None and slot.pending is not None

    def _require(self, reader_id: int) -> _Slot:
        slot = self._slot_for(reader_id)
        if slot is None:
            raise CardError(f"no reader {reader_id}")
        return slot

    def send_ccid(self, msg: CcidMessage, reader_id: int = 0) -> None:
        """A PC_to_RDR message from the guest to the usb-ccid device of ``reader_id``."""
        slot = self._require(reader_id)
        if log.isEnabledFor(logging.DEBUG):
            shown = None
            if isinstance(msg, CcidXfrBlock):
                shown, _ = self._ccid_redactor(reader_id).command(msg.data)
            log.debug("guest -> reader %d: %s", reader_id, describe_ccid(msg, data=shown))
        out = slot.out
        if isinstance(msg, CcidNotifySlotChange):
            raise CardError("NotifySlotChange is not a PC_to_RDR message")
        s, q = msg.slot, msg.seq
        if s != 0:
            response = self._error_response(slot, msg, slot.failed(_ERROR_BAD_SLOT))
            if response is not None:
                out.append(response)
            return
        if isinstance(msg, CcidGetSlotStatus):
            out.append(CcidSlotStatus(s, q, slot.status()))
        elif isinstance(msg, CcidIccPowerOn):
            slot.powered = True
            status = slot.status() if slot.inserted else slot.failed(CcidError.ICC_MUTE)
            if slot.inserted:
                slot.protocol, slot.parameters = 0, T0Parameters(0, 0, 0, 0, 0)
            out.append(CcidDataBlock(s, q, status, slot.atr if slot.inserted else b""))
        elif isinstance(msg, CcidIccPowerOff):
            slot.powered = False
            out.append(CcidSlotStatus(s, q, slot.status()))
        elif isinstance(msg, CcidXfrBlock):
            if slot.icc_status() != IccStatus.PRESENT_ACTIVE:
                out.append(CcidDataBlock(s, q, slot.failed(CcidError.ICC_MUTE)))
            elif slot.pending is not None:
                out.append(CcidDataBlock(s, q, slot.failed(CcidError.CMD_SLOT_BUSY)))
            else:
                slot.pending = (s, q)
                self._send(VscApdu(reader_id, bytes(msg.data)))
        elif isinstance(msg, CcidSetParameters):
            if msg.protocol not in (0, 1) or isinstance(msg.parameters, bytes):
                out.append(self._parameters(slot, s, q, slot.failed(CcidError.CMD_NOT_SUPPORTED)))
            else:
                slot.protocol, slot.parameters = msg.protocol, msg.parameters
                out.append(self._parameters(slot, s, q, slot.status()))
        elif isinstance(msg, CcidResetParameters):
            slot.protocol, slot.parameters = 0, T0Parameters(0x77, 0, 0, 0, 0)
            out.append(self._parameters(slot, s, q, slot.status()))
        elif isinstance(msg, CcidGetParameters):
            out.append(self._parameters(slot, s, q, slot.status()))
        elif isinstance(msg, CcidMechanical):
            out.append(CcidSlotStatus(s, q, slot.failed(0)))
        else:
            response = self._error_response(slot, msg, slot.failed(CcidError.CMD_NOT_SUPPORTED))
            if response is not None:
                out.append(response)

    @staticmethod
    def _parameters(slot: _Slot, s: int, q: int, status: SlotStatus) -> CcidParameters:
        return CcidParameters(s, q, status, slot.protocol, slot.parameters)

    def _error_response(
        self, slot: _Slot, msg: CcidMessage, status: SlotStatus
    ) -> CcidMessage | None:
        """The response type the spec mandates for ``msg``, carrying a failed status."""
        if isinstance(msg, CcidNotifySlotChange):
            return None
        s, q = msg.slot, msg.seq
        if isinstance(msg, CcidIccPowerOn | CcidXfrBlock | CcidSecure):
            return CcidDataBlock(s, q, status)
        if isinstance(msg, CcidGetParameters | CcidResetParameters | CcidSetParameters):
            return self._parameters(slot, s, q, status)
        if isinstance(msg, CcidEscape):
            return CcidEscapeResponse(s, q, status)
        if isinstance(msg, CcidSetDataRateAndClockFrequency):
            return CcidDataRateAndClockFrequency(s, q, status)
        if isinstance(msg, CcidDataBlock | CcidSlotStatus | CcidParameters | CcidEscapeResponse
                      | CcidDataRateAndClockFrequency):
            return None  # RDR_to_PC from the guest: nothing sensible to answer
        return CcidSlotStatus(s, q, status)

    def _queue(self, reader_id: int) -> deque[CcidMessage]:
        """The RDR_to_PC messages owed to the guest by ``reader_id`` (also once removed)."""
        slot = self._slot_for(reader_id)
        if slot is not None:
            return slot.out
        return self._removed.get(reader_id, deque())

    def next_ccid(self, reader_id: int = 0) -> CcidMessage | None:
        """The next RDR_to_PC (or interrupt) message of ``reader_id``'s reader, or None."""
        queue = self._queue(reader_id)
        if not queue:
            return None
        msg = queue.popleft()
        if log.isEnabledFor(logging.DEBUG):
            shown = None
            if isinstance(msg, CcidDataBlock):
                shown, _ = self._ccid_redactor(reader_id).response(msg.data)
            log.debug("reader %d -> guest: %s", reader_id, describe_ccid(msg, data=shown))
        return msg

    def next_seq(self, reader_id: int = 0) -> int:
        """A bSeq for the guest's next command to ``reader_id`` (counts 0..255 and wraps)."""
        slot = self._require(reader_id)
        seq = slot.seq
        slot.seq = (seq + 1) & 0xFF
        return seq

    def take_answer(self, reader_id: int, seq: int) -> CcidMessage | None:
        """The answer to ``reader_id``'s command ``seq`` if it came (and forget it), or None."""
        queue = self._queue(reader_id)
        for msg in queue:
            if not isinstance(msg, CcidNotifySlotChange) and msg.seq == seq:
                queue.remove(msg)
                return msg
        return None

    def take_notifications(self, reader_id: int = 0) -> list[CcidNotifySlotChange]:
        """``reader_id``'s NotifySlotChange messages, oldest first (and forget them)."""
        queue = self._queue(reader_id)
        found = [m for m in queue if isinstance(m, CcidNotifySlotChange)]
        for msg in found:
            queue.remove(msg)
        return found


# --- blocking adapter ----------------------------------------------------------------------


def _address(addr: str | Address) -> Address:
    return parse_address(addr) if isinstance(addr, str) else addr


def _family_and_target(addr: Address) -> tuple[int, str | tuple[str, int]]:
    if isinstance(addr, UnixAddress):
        return socket.AF_UNIX, str(addr.path)
    family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
    return family, (addr.host, addr.port)


class FakeQemu:
    """A blocking fake QEMU on one chardev connection; a thread reads the socket.

    Thread-safe: every method may be called from any thread.  Timeouts raise
    ``TimeoutError``; a failed CCID command raises ``CardError``.
    """

    def __init__(self, sock: socket.socket, core: FakeQemuCore) -> None:
        self._sock = sock
        self.core = core
        self._cond = threading.Condition()
        self._closed = False
        self.error: BaseException | None = None
        with self._cond:
            core.connected()
            self._flush()
        self._thread = threading.Thread(target=self._run, name="fake-qemu", daemon=True)
        self._thread.start()

    @classmethod
    def connect(
        cls, addr: str | Address, *, timeout: float = 5.0, multi_reader: bool = False
    ) -> FakeQemu:
        """QEMU as chardev client (``-chardev socket,path=P``): the card side listens."""
        sock = connect(_address(addr), timeout)
        sock.settimeout(None)
        return cls(sock, FakeQemuCore("client", multi_reader=multi_reader))

    @classmethod
    def listen(cls, addr: str | Address, *, multi_reader: bool = False) -> FakeQemuListener:
        """QEMU as chardev server (``server=on``): the card side connects; call accept()."""
        return FakeQemuListener(_address(addr), multi_reader=multi_reader)

    @classmethod
    def from_socket(
        cls, sock: socket.socket, mode: Mode = "client", *, multi_reader: bool = False
    ) -> FakeQemu:
        """Wrap a connected socket (e.g. one end of a socketpair)."""
        return cls(sock, FakeQemuCore(mode, multi_reader=multi_reader))

    # internals

    def _flush(self) -> None:
        data = self.core.data_to_send()
        if data:
            self._sock.sendall(data)

    def _run(self) -> None:
        try:
            while True:
                data = self._sock.recv(65536)
                if not data:
                    break
                with self._cond:
                    self.core.receive_data(data)
                    self._flush()
                    self._cond.notify_all()
        except (OSError, DecodeError) as exc:
            if not self._closed:
                log.debug("fake QEMU connection ended: %s", exc)
                self.error = exc
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()

    def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"timed out waiting for {what}")
                if self._closed:
                    raise CardError(f"connection closed while waiting for {what}")
                self._cond.wait(remaining)

    # public API

    @property
    def received(self) -> list[VscMessage]:
        """A copy of the VSC messages received so far."""
        with self._cond:
            return list(self.core.received)

    @property
    def closed(self) -> bool:
        return self._closed

    def wait_handshake(self, timeout: float = 5.0) -> None:
        """Wait until the card side has sent its Init."""
        self._wait(lambda: self.core.handshake_done, timeout, "the card side's Init")

    def wait_card(self, reader_id: int = 0, timeout: float = 5.0) -> bytes:
        """Wait until ``reader_id`` holds a card; its ATR."""
        self._wait(lambda: self.core.card_present(reader_id), timeout, "a card")
        with self._cond:
            atr = self.core.atr(reader_id)
        assert atr is not None
        return atr

    def wait_removed(self, reader_id: int = 0, timeout: float = 5.0) -> None:
        self._wait(lambda: not self.core.card_present(reader_id), timeout, "card removal")

    def wait_readers(self, count: int, timeout: float = 5.0) -> list[int]:
        """Multi-reader mode: wait until ``count`` readers exist; their ids."""
        self._wait(lambda: len(self.core.readers) >= count, timeout, f"{count} readers")
        with self._cond:
            return self.core.readers

    def card_present(self, reader_id: int = 0) -> bool:
        with self._cond:
            return self.core.card_present(reader_id)

    def wait_closed(self, timeout: float = 5.0) -> None:
        self._wait(lambda: self._closed, timeout, "the connection to close")

    def ccid(self, msg: CcidMessage, reader_id: int = 0, timeout: float = 5.0) -> CcidMessage:
        """Send one PC_to_RDR message and wait for its RDR_to_PC answer (same seq)."""
        if isinstance(msg, CcidNotifySlotChange):
            raise CardError("not a PC_to_RDR message")
        found: list[CcidMessage] = []

        def ready() -> bool:
            answer = self.core.take_answer(reader_id, msg.seq)
            if answer is not None:
                found.append(answer)
            return bool(found)

        with self._cond:
            self.core.send_ccid(msg, reader_id)
            self._flush()
        self._wait(ready, timeout, f"the answer to seq {msg.seq}")
        return found[0]

    def next_seq(self, reader_id: int = 0) -> int:
        with self._cond:
            return self.core.next_seq(reader_id)

    def notifications(self, reader_id: int = 0) -> list[CcidNotifySlotChange]:
        """NotifySlotChange messages not yet read, oldest first (and forget them)."""
        with self._cond:
            return self.core.take_notifications(reader_id)

    def power_on(self, reader_id: int = 0, timeout: float = 5.0) -> bytes:
        """IccPowerOn; the ATR (CardError if the slot answers with an error)."""
        answer = self.ccid(CcidIccPowerOn(0, self.next_seq(reader_id)), reader_id, timeout)
        return _data_or_raise(answer, "IccPowerOn")

    def power_off(self, reader_id: int = 0, timeout: float = 5.0) -> SlotStatus:
        answer = self.ccid(CcidIccPowerOff(0, self.next_seq(reader_id)), reader_id, timeout)
        assert isinstance(answer, CcidSlotStatus)
        return answer.status

    def slot_status(self, reader_id: int = 0, timeout: float = 5.0) -> SlotStatus:
        answer = self.ccid(CcidGetSlotStatus(0, self.next_seq(reader_id)), reader_id, timeout)
        assert isinstance(answer, CcidSlotStatus)
        return answer.status

    def transmit(self, apdu: bytes, reader_id: int = 0, timeout: float = 5.0) -> bytes:
        """One APDU through the CCID XfrBlock path; the response APDU (data + SW1 SW2)."""
        answer = self.ccid(CcidXfrBlock(0, self.next_seq(reader_id), bytes(apdu)), reader_id,
                           timeout)
        return _data_or_raise(answer, "XfrBlock")

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeQemu:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _data_or_raise(answer: CcidMessage, what: str) -> bytes:
    if not isinstance(answer, CcidDataBlock):
        raise CardError(f"{what} answered with {describe_ccid(answer)}")
    if answer.status.failed:
        raise CardError(f"{what} failed: {answer.status.describe()}")
    return answer.data


class FakeQemuListener:
    """A listening chardev server socket; :meth:`accept` gives one :class:`FakeQemu`."""

    def __init__(self, addr: Address, *, multi_reader: bool = False) -> None:
        family, target = _family_and_target(addr)
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        if family != socket.AF_UNIX:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind(target)
            self._sock.listen(8)
        except OSError as exc:
            self._sock.close()
            raise ConfigError(f"cannot listen on {addr}: {exc}") from exc
        self.multi_reader = multi_reader
        if isinstance(addr, TcpAddress):
            self.address: Address = TcpAddress(addr.host, self._sock.getsockname()[1])
        else:
            self.address = addr

    def accept(self, timeout: float = 5.0) -> FakeQemu:
        self._sock.settimeout(timeout)
        try:
            conn, _ = self._sock.accept()
        except TimeoutError:
            raise TimeoutError(f"no connection on {self.address} within {timeout} s") from None
        conn.settimeout(None)
        return FakeQemu(conn, FakeQemuCore("server", multi_reader=self.multi_reader))

    def close(self) -> None:
        self._sock.close()
        if isinstance(self.address, UnixAddress):
            with contextlib.suppress(OSError):
                self.address.path.unlink()

    def __enter__(self) -> FakeQemuListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- asyncio adapter -----------------------------------------------------------------------


class AsyncFakeQemu:
    """The asyncio fake QEMU (load benchmarks: many sessions on one loop)."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, core: FakeQemuCore
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.core = core
        self._changed = asyncio.Condition()
        self._closed = False
        core.connected()
        self._write()
        self._task = asyncio.get_running_loop().create_task(self._run())

    @classmethod
    async def connect(cls, addr: str | Address, *, multi_reader: bool = False) -> AsyncFakeQemu:
        """QEMU as chardev client: connect to the card side."""
        address = _address(addr)
        if isinstance(address, UnixAddress):
            reader, writer = await asyncio.open_unix_connection(str(address.path))
        else:
            reader, writer = await asyncio.open_connection(address.host, address.port)
        return cls(reader, writer, FakeQemuCore("client", multi_reader=multi_reader))

    @classmethod
    async def listen(
        cls, addr: str | Address, *, multi_reader: bool = False
    ) -> AsyncFakeQemuListener:
        """QEMU as chardev server: sessions arrive through ``accept()``."""
        listener = AsyncFakeQemuListener(multi_reader)
        await listener.start(_address(addr))
        return listener

    def _write(self) -> None:
        data = self.core.data_to_send()
        if data:
            self._writer.write(data)

    async def _run(self) -> None:
        try:
            while data := await self._reader.read(65536):
                self.core.receive_data(data)
                self._write()
                async with self._changed:
                    self._changed.notify_all()
        except (OSError, DecodeError) as exc:
            log.debug("fake QEMU connection ended: %s", exc)
        finally:
            self._closed = True
            async with self._changed:
                self._changed.notify_all()

    async def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        async def waiter() -> None:
            async with self._changed:
                while not predicate():
                    if self._closed:
                        raise CardError(f"connection closed while waiting for {what}")
                    await self._changed.wait()

        try:
            await asyncio.wait_for(waiter(), timeout)
        except TimeoutError:
            raise TimeoutError(f"timed out waiting for {what}") from None

    async def wait_card(self, reader_id: int = 0, timeout: float = 5.0) -> bytes:
        await self._wait(lambda: self.core.card_present(reader_id), timeout, "a card")
        atr = self.core.atr(reader_id)
        assert atr is not None
        return atr

    async def ccid(self, msg: CcidMessage, reader_id: int = 0, timeout: float = 5.0) -> CcidMessage:
        if isinstance(msg, CcidNotifySlotChange):
            raise CardError("not a PC_to_RDR message")
        found: list[CcidMessage] = []

        def ready() -> bool:
            answer = self.core.take_answer(reader_id, msg.seq)
            if answer is not None:
                found.append(answer)
            return bool(found)

        self.core.send_ccid(msg, reader_id)
        self._write()
        await self._writer.drain()
        await self._wait(ready, timeout, f"the answer to seq {msg.seq}")
        return found[0]

    async def transmit(self, apdu: bytes, reader_id: int = 0, timeout: float = 5.0) -> bytes:
        seq = self.core.next_seq(reader_id)
        answer = await self.ccid(CcidXfrBlock(0, seq, bytes(apdu)), reader_id, timeout)
        return _data_or_raise(answer, "XfrBlock")

    async def power_on(self, reader_id: int = 0, timeout: float = 5.0) -> bytes:
        answer = await self.ccid(CcidIccPowerOn(0, self.core.next_seq(reader_id)), reader_id,
                                 timeout)
        return _data_or_raise(answer, "IccPowerOn")

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class AsyncFakeQemuListener:
    """Accepts card-side connections for :meth:`AsyncFakeQemu.listen`."""

    def __init__(self, multi_reader: bool = False) -> None:
        self.multi_reader = multi_reader
        self._sessions: asyncio.Queue[AsyncFakeQemu] = asyncio.Queue()
        self._server: asyncio.Server | None = None
        self.address: Address | None = None

    async def start(self, addr: Address) -> None:
        def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            core = FakeQemuCore("server", multi_reader=self.multi_reader)
            self._sessions.put_nowait(AsyncFakeQemu(reader, writer, core))

        if isinstance(addr, UnixAddress):
            self._server = await asyncio.start_unix_server(on_connect, str(addr.path))
            self.address = addr
        else:
            self._server = await asyncio.start_server(on_connect, addr.host, addr.port)
            port = self._server.sockets[0].getsockname()[1]
            self.address = TcpAddress(addr.host, port)

    async def accept(self, timeout: float = 5.0) -> AsyncFakeQemu:
        try:
            return await asyncio.wait_for(self._sessions.get(), timeout)
        except TimeoutError:
            raise TimeoutError(f"no connection on {self.address} within {timeout} s") from None

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
