"""The card interface every virtual reader talks to, reader events, and the built-in test card.

A card answers power-on with its ATR (ISO/IEC 7816-3 section 8) and command
APDUs with response APDUs (ISO/IEC 7816-4 section 5).  Emulated cards are pure
objects: no I/O, no clocks, no threads.  Adapters (PC/SC, USB, trace replay)
implement the same protocol and say so with ``blocking = True`` so that the
daemon runs them off its event loop.

A card whose presence can change by itself (a real card in a host reader: pulled out, put
back, the reader unplugged) also implements :class:`ReaderEvents`: the daemon calls
:meth:`~ReaderEvents.watch` with a callback, which the card calls from any thread with a
:class:`CardInserted`, :class:`CardRemoved` or :class:`ReaderUnplugged`.  A blocking card may
implement :class:`Cancellable` so that a call stuck on a dead device can be abandoned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ccidemu.cards import CardOptions


@runtime_checkable
class Card(Protocol):
    """Answers command APDUs.  Emulated cards are pure; adapters may block."""

    #: True when transmit()/power_on() may block on I/O (passthrough, remote).
    blocking: ClassVar[bool]

    @property
    def name(self) -> str:
        """A short human-readable description, e.g. ``"PIV (fixtures/certs)"``."""
        ...

    def power_on(self) -> bytes:
        """Cold or warm reset.  Returns the ATR."""
        ...

    def power_off(self) -> None:
        """Deactivate the card (ISO/IEC 7816-3 section 6.4)."""
        ...

    def transmit(self, apdu: bytes) -> bytes:
        """Answer one command APDU with one response APDU (data + SW1 SW2).

        Never raises for anything the command bytes contain: a malformed
        command gets an ISO 7816-4 status word.  Raises ``CardError`` only
        when the card cannot answer at all.
        """
        ...


@dataclass(frozen=True, slots=True)
class CardInserted:
    """A card is in the reader now (``atr``: its answer to reset, when already known)."""

    atr: bytes | None = None


@dataclass(frozen=True, slots=True)
class CardRemoved:
    """The card left the reader; the reader itself is still there."""


@dataclass(frozen=True, slots=True)
class ReaderUnplugged:
    """The reader is gone (unplugged, or its service died); ``reason`` says what happened."""

    reason: str = ""


ReaderEvent = CardInserted | CardRemoved | ReaderUnplugged


@runtime_checkable
class ReaderEvents(Protocol):
    """A card that reports presence changes by itself (see the module docstring)."""

    def watch(self, notify: Callable[[ReaderEvent], None]) -> None:
        """Start reporting: ``notify`` may be called from any thread, at any time, until
        :meth:`unwatch`.  The first report is the current state (CardInserted when a card is
        in the reader, else CardRemoved or ReaderUnplugged): until it comes the reader counts
        as empty.  A report of the state the caller already has is ignored.  The caller
        powers the card on; :meth:`watch` may be called again after :meth:`unwatch` (the
        card passes to another VM)."""
        ...

    def unwatch(self) -> None:
        """Stop reporting (and release what watching needed).  Idempotent."""
        ...


class ReaderSet(Protocol):
    """Many readers behind one spec (``pcsc:*``): the readers present now and those plugged
    in later.  Not a card: the daemon asks it for one card per reader it reports."""

    @property
    def name(self) -> str:
        """What the set is, e.g. ``"every PC/SC reader"``."""
        ...

    def watch(self, notify: Callable[[str], None]) -> None:
        """Report the name of every reader there now and of each one that appears later, each
        once (from any thread) until :meth:`unwatch`."""
        ...

    def unwatch(self) -> None:
        """Stop reporting.  Idempotent."""
        ...

    def open(self, reader: str, options: CardOptions) -> Card:
        """The card of reader ``reader`` (a name :meth:`watch` reported), opened with the
        receiving VM's card options; no I/O."""
        ...

    def spec_of(self, reader: str) -> str:
        """The one-card spec of that reader (``pcsc:NAME``), for listings and traces."""
        ...


@runtime_checkable
class CostHint(Protocol):
    """A non-blocking card that knows which commands take long to answer (heavy crypto, key
    generation, a state write to disk): the daemon answers those off its loop thread, so that
    one VM's RSA work never delays another VM's SELECT.  Must be cheap: it runs per APDU."""

    def costly(self, apdu: bytes) -> bool:
        """True when answering ``apdu`` may take more than a few microseconds."""
        ...


@runtime_checkable
class Cancellable(Protocol):
    """A blocking card whose current call can be abandoned from another thread."""

    def cancel(self) -> None:
        """Make a transmit/power_on in progress raise CardError soon; idempotent."""
        ...


class BuiltinTestCard:
    """``--card test:``: a tiny card for exercising readers, not a real application.

    Class 80 commands (proprietary, ISO/IEC 7816-4 section 5.4.1):

    ======================  ==================================================
    ``80 E0 00 00 Lc data``  echo: returns ``data`` + 9000
    ``80 E2 00 00 Le``       returns ``Le`` bytes 00 01 02 ... + 9000 (Le 00 = 256)
    ``80 E4 00 00 04``       returns the number of APDUs seen (u32 BE) + 9000
    ======================  ==================================================

    ``00 A4 04 00 Lc AID`` selects :data:`AID` (9000) or answers 6A82.
    Anything else: 6E00 for an unknown class, 6D00 for an unknown instruction.
    """

    blocking: ClassVar[bool] = False
    AID = bytes.fromhex("F0636369646D7501")  # "\xF0ccidmu\x01": proprietary RID range F
    #: TS=3B (direct convention), T0=0A (no interface bytes, 10 historical bytes).
    ATR = bytes.fromhex("3B0A") + b"ccidemu-TC"

    def __init__(self, label: str = "") -> None:
        self._label = label
        self.apdu_count = 0
        self.powered = False

    @property
    def name(self) -> str:
        return "built-in test card" + (f" ({self._label})" if self._label else "")

    def power_on(self) -> bytes:
        self.powered = True
        return self.ATR

    def power_off(self) -> None:
        self.powered = False

    def transmit(self, apdu: bytes) -> bytes:
        self.apdu_count += 1
        if len(apdu) < 4:
            return b"\x67\x00"
        cla, ins, p1 = apdu[0], apdu[1], apdu[2]
        body = apdu[4:]
        if cla == 0x00 and ins == 0xA4:
            if p1 != 0x04 or not body:
                return b"\x6a\x86"
            lc = body[0]
            aid = body[1 : 1 + lc]
            if len(aid) != lc:
                return b"\x67\x00"
            return b"\x90\x00" if self.AID.startswith(aid) and aid else b"\x6a\x82"
        if cla != 0x80:
            return b"\x6e\x00"
        if ins == 0xE0:
            if not body:
                return b"\x90\x00"
            lc = body[0]
            data = body[1 : 1 + lc]
            if len(data) != lc or len(body) > lc + 2:
                return b"\x67\x00"
            return data + b"\x90\x00"
        if ins == 0xE2:
            if len(body) != 1:
                return b"\x67\x00"
            le = body[0] or 256
            return bytes(i & 0xFF for i in range(le)) + b"\x90\x00"
        if ins == 0xE4:
            return self.apdu_count.to_bytes(4, "big") + b"\x90\x00"
        return b"\x6d\x00"
