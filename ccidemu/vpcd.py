"""vpcd: the wire protocol between vsmartcard's pcscd driver and a virtual card.

Spec: frankmorgner/vsmartcard ``virtualsmartcard/doc/api.txt`` and ``src/vpcd/vpcd.c``
(Debian 12 package ``vsmartcard-vpcd`` 3.3); behaviour notes in docs/PROTOCOL.md, "vpcd".

vpcd (a pcscd reader driver) listens on TCP (35963 for reader "Virtual PCD 00 00"); the card
connects.  Both directions carry frames of a 2-byte big-endian length followed by that many
payload bytes.  From vpcd, a 1-byte payload is a control byte (:class:`VpcdControl`): power
off, power on and reset expect no answer; GET ATR expects the ATR as one frame.  No frame
says "no card" (an empty ATR stalls vpcd; docs/PROTOCOL.md, "vpcd"): a card side without a
card closes the connection.  Any other payload is a command APDU that expects exactly one
frame with the response APDU.

Theory of operation
-------------------
:class:`VpcdConnection` is a sans-I/O stream decoder (h11 style): ``receive_data()`` buffers
bytes, ``next_event()`` cuts one complete frame off and returns it as a :class:`VpcdEvent`
(:class:`PowerOff`, :class:`PowerOn`, :class:`Reset`, :class:`GetAtr`, :class:`Transmit`), and
``send(payload)`` frames an answer.  A length above ``max_length`` or a zero length (vpcd
never sends one: ``vicc_transmit`` skips empty commands) is a :class:`DecodeError` as soon as
the two length bytes are seen, and the connection is dead afterwards.

vpcd sends only the four control bytes 00, 01, 02 and 04.  A 1-byte frame holding anything
else can only be a 1-byte command APDU that a PC/SC client passed through; vpcd then waits
for an answer (a missed answer would hang the reader), so it is decoded as :class:`Transmit`
and the card answers it (normally 6700).  The ambiguity for a 1-byte APDU 00/01/02/04 is the
protocol's own.

:class:`VpcdCardSlot` applies events to a :class:`~ccidemu.card.Card` the way a reader drives
a real card: power on and reset call ``power_on()`` (cold or warm reset) and remember the ATR;
GET ATR, which pcscd polls about every 400 ms to see whether the card is still there, answers
the remembered ATR without resetting anything (the first GET ATR of a fresh card powers it on
once, as inserting a card into a reader does).  A card that raises never breaks the stream:
the answer is 6F00 ("no precise diagnosis", ISO/IEC 7816-4 section 5.6) and the error is
logged in one line (the traceback at debug level).  The one exception: a card that cannot
power on for the first GET ATR has no ATR to give, so :class:`NoCard` is raised and the
adapter ends the connection (pcscd then sees an empty reader).
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from dataclasses import dataclass

from construct import GreedyBytes, Int16ub, Prefixed

from ccidemu._wire import FrameStream, build, check_length
from ccidemu.card import Card
from ccidemu.errors import CardError, DecodeError, EncodeError, describe_exception
from ccidemu.sw import SW, sw_bytes

__all__ = [
    "LENGTH_SIZE",
    "MAX_PAYLOAD",
    "GetAtr",
    "NoCard",
    "PowerOff",
    "PowerOn",
    "Reset",
    "Transmit",
    "VpcdCardSlot",
    "VpcdConnection",
    "VpcdControl",
    "VpcdEvent",
    "decode_frame",
    "describe_event",
    "encode_frame",
]

log = logging.getLogger(__name__)

#: The length prefix: 2 bytes, big-endian (vpcd.c ``sendToVICC``/``recvFromVICC``, htons/ntohs).
LENGTH_SIZE = 2
#: The largest payload the 16-bit length can carry.
MAX_PAYLOAD = 0xFFFF

# vpcd.c: one frame = u16 big-endian length + payload.
_FRAME = Prefixed(Int16ub, GreedyBytes)


class VpcdControl(enum.IntEnum):
    """Control bytes from vpcd (vpcd.h ``VPCD_CTRL_*``), each sent as a 1-byte frame."""

    POWER_OFF = 0x00
    POWER_ON = 0x01
    RESET = 0x02
    GET_ATR = 0x04


@dataclass(frozen=True)
class PowerOff:
    """Control 00: deactivate the card.  No answer."""


@dataclass(frozen=True)
class PowerOn:
    """Control 01: activate (cold reset) the card.  No answer; vpcd asks GET ATR next."""


@dataclass(frozen=True)
class Reset:
    """Control 02: warm reset.  No answer; vpcd asks GET ATR next."""


@dataclass(frozen=True)
class GetAtr:
    """Control 04: answer with the ATR as one frame."""


@dataclass(frozen=True)
class Transmit:
    """A command APDU; answer with the response APDU as one frame."""

    apdu: bytes


VpcdEvent = PowerOff | PowerOn | Reset | GetAtr | Transmit

_CONTROL_EVENTS: dict[int, VpcdEvent] = {
    VpcdControl.POWER_OFF: PowerOff(),
    VpcdControl.POWER_ON: PowerOn(),
    VpcdControl.RESET: Reset(),
    VpcdControl.GET_ATR: GetAtr(),
}


def encode_frame(payload: bytes) -> bytes:
    """Frame ``payload`` (an ATR or a response APDU) for vpcd; EncodeError above 65,535 bytes."""
    if len(payload) > MAX_PAYLOAD:
        raise EncodeError(f"vpcd frame payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return build(_FRAME, bytes(payload), "vpcd frame")


def _event_for(payload: bytes) -> VpcdEvent:
    if len(payload) == 1:
        event = _CONTROL_EVENTS.get(payload[0])
        if event is not None:
            return event
        log.warning("vpcd sent 1-byte frame %02X, not a control byte: answering it as an APDU",
                    payload[0])
    return Transmit(payload)


def _check_header(length: int, max_length: int) -> None:
    if length == 0:
        raise DecodeError("vpcd frame with length 0 (vpcd never sends an empty frame)")
    check_length(length, max_length, "vpcd frame")


def decode_frame(data: bytes, max_length: int = MAX_PAYLOAD) -> tuple[VpcdEvent, int]:
    """Decode one frame from vpcd at the start of ``data``: (event, bytes consumed).

    DecodeError when ``data`` holds no complete frame, or the length is 0 or above
    ``max_length``.
    """
    if len(data) < LENGTH_SIZE:
        raise DecodeError(f"vpcd frame needs {LENGTH_SIZE} length bytes, got {len(data)}")
    length = int.from_bytes(data[:LENGTH_SIZE], "big")
    _check_header(length, max_length)
    end = LENGTH_SIZE + length
    if len(data) < end:
        raise DecodeError(f"vpcd frame of {length} bytes is truncated to {len(data) - 2}")
    return _event_for(bytes(data[LENGTH_SIZE:end])), end


def describe_event(event: VpcdEvent) -> str:
    """One line for logs.  APDU bytes are not shown (they may carry a PIN)."""
    if isinstance(event, Transmit):
        header = event.apdu[:4].hex().upper()
        return f"APDU {header}.. ({len(event.apdu)} bytes)"
    return type(event).__name__


class VpcdConnection(FrameStream[VpcdEvent]):
    """vpcd framing for one TCP stream.  No sockets here: feed bytes to receive_data(),
    drain next_event() until None, write what send() returns.  Errors follow the contract
    of :class:`ccidemu._wire.FrameStream`."""

    what = "vpcd stream"

    def __init__(self, max_length: int = MAX_PAYLOAD) -> None:
        if not 1 <= max_length <= MAX_PAYLOAD:
            raise ValueError(f"max_length must be 1..{MAX_PAYLOAD}")
        super().__init__(max_length)

    def _cut(self, buf: bytearray, events: deque[VpcdEvent]) -> int:
        start = 0
        size = len(buf)
        while size - start >= LENGTH_SIZE:
            length = int.from_bytes(buf[start : start + LENGTH_SIZE], "big")
            _check_header(length, self.max_length)
            end = start + LENGTH_SIZE + length
            if end > size:
                break
            events.append(_event_for(bytes(buf[start + LENGTH_SIZE : end])))
            start = end
        return start

    def send(self, payload: bytes) -> bytes:
        """The wire bytes that answer GET ATR or a command APDU with ``payload``."""
        return encode_frame(payload)


class NoCard(CardError):
    """The card did not power on for vpcd's first GET ATR: there is no ATR to answer with,
    and vpcd knows "no card" only as a closed connection (see the module docstring)."""


class VpcdCardSlot:
    """Drives a card from vpcd events, as a reader drives a real card.

    ``handle(event)`` returns the wire bytes to send back (``b""`` when vpcd expects no
    answer).  The card object is kept as is; a new connection can reuse the same slot.
    """

    def __init__(self, card: Card) -> None:
        self.card = card
        self.powered = False
        self._atr: bytes | None = None

    @property
    def atr(self) -> bytes | None:
        """The ATR of the last power-on or reset, None before the first."""
        return self._atr

    def _power_on(self) -> bytes:
        atr = bytes(self.card.power_on())
        self._atr = atr
        self.powered = True
        return atr

    def handle(self, event: VpcdEvent) -> bytes:
        """Apply one event to the card; the framed answer, or b"" when none is due.

        NoCard when the card cannot power on for a GET ATR and has never given an ATR."""
        if isinstance(event, Transmit):
            return encode_frame(self._transmit(event.apdu))
        try:
            if isinstance(event, PowerOff):
                self.card.power_off()
                self.powered = False
            elif isinstance(event, PowerOn | Reset):
                self._power_on()
            else:  # GetAtr
                atr = self._atr if self._atr is not None else self._power_on()
                return encode_frame(atr)
        except Exception as exc:  # a card bug must not break the stream: log it, keep going
            if isinstance(event, GetAtr):
                raise NoCard(f"card {self.card.name} did not power on: "
                             f"{_describe(exc)}") from exc
            if isinstance(event, PowerOn | Reset):
                self.powered = False  # a failed reset leaves no card to talk to
            _log_failure(f"card {self.card.name} failed on {describe_event(event)}", exc,
                         "vpcd expects no answer")
        return b""

    def _transmit(self, apdu: bytes) -> bytes:
        if not self.powered:
            log.debug("APDU on an unpowered card; powering it on first")
            try:
                self._power_on()
            except Exception as exc:
                _log_failure(f"card {self.card.name} failed to power on", exc, "answered 6F00")
                return sw_bytes(SW.NO_PRECISE_DIAGNOSIS)
        try:
            rapdu = bytes(self.card.transmit(apdu))
        except Exception as exc:  # CardError or a bug in a card: answer 6F00, keep the bridge up
            _log_failure(f"card {self.card.name} failed on APDU {apdu[:4].hex().upper()}", exc,
                         "answered 6F00")
            return sw_bytes(SW.NO_PRECISE_DIAGNOSIS)
        if not 2 <= len(rapdu) <= MAX_PAYLOAD:
            log.error("card %s answered %d bytes, not a response APDU vpcd can carry",
                      self.card.name, len(rapdu))
            return sw_bytes(SW.NO_PRECISE_DIAGNOSIS)
        return rapdu


def _describe(exc: BaseException) -> str:
    """A card's exception in one line: ours as they are, a bug with where it was raised."""
    if isinstance(exc, CardError):
        return f"card error: {exc}"
    return describe_exception(exc)


def _log_failure(what: str, exc: BaseException, outcome: str) -> None:
    """One error line; the traceback at debug level."""
    log.error("%s: %s (%s; the bridge goes on)", what, _describe(exc), outcome)
    log.debug("%s: traceback", what, exc_info=exc)
