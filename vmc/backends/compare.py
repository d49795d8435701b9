"""``--compare SPEC``: every APDU of a reader also goes to a second card, and the answers are
compared (vscclient's ``-p``, but per APDU, in the log and in the trace).

:class:`ComparingCard` wraps the reader's card (typically a passed-through real card) and a
*reference* card (typically the emulated PIV card, opened in memory: its state is never
written).  The VM gets the first card's answers, always; the reference gets the same calls in
the same order (power-on, every APDU, power-off), so that both move through the same
states.  Each APDU whose answers differ is a warning line (``compare: APDU 12 00CB3FFF...:
card 6A82, reference 53..9000``; secrets redacted by the one rule set of
:mod:`ccidemu.redact`, for each card's stream on its own) and, when tracing, the trace record
of that exchange gets ``"compare"`` with the reference's answer (or ``"compare_error"``).
Equal answers leave no trace: the comparison is silent where the cards agree.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from ccidemu.card import Cancellable, Card, CardInserted, ReaderEvent, ReaderEvents
from ccidemu.redact import Redactor

__all__ = ["ComparingCard", "Comparison"]

log = logging.getLogger(__name__)

#: Comparisons kept for the trace (the daemon takes each right after its exchange; this only
#: bounds what is kept when nobody traces).
_KEPT = 16


@dataclass(frozen=True, slots=True)
class Comparison:
    """One APDU given to both cards: the reference's answer, or its error."""

    number: int
    command: bytes
    response: bytes  # the card's (what the VM got before any shaping)
    reference: bytes
    error: str | None = None

    @property
    def differs(self) -> bool:
        return self.error is not None or self.reference != self.response


class ComparingCard:
    """A card whose every call also goes to a reference card (module docstring)."""

    blocking: ClassVar[bool] = True  # one thread per reader: the two calls stay in order

    def __init__(self, card: Card, reference: Card, reference_spec: str) -> None:
        self.card = card
        self.reference = reference
        self.reference_spec = reference_spec
        self.apdus = 0
        self.differences = 0
        self._kept: deque[Comparison] = deque(maxlen=_KEPT)
        self._lock = threading.Lock()
        self._shown = Redactor()  # the card's stream, for log lines
        self._shown_reference = Redactor()  # the reference's

    @property
    def name(self) -> str:
        return f"{self.card.name} (compared with {self.reference_spec})"

    def power_on(self) -> bytes:
        atr = self.card.power_on()
        try:
            reference = self.reference.power_on()
        except Exception as exc:
            log.warning("compare: power-on: %s failed: %s", self.reference_spec, exc)
        else:
            if reference != atr:
                log.warning("compare: ATR: card %s, %s %s", atr.hex().upper(),
                            self.reference_spec, reference.hex().upper())
        self._shown.reset()
        self._shown_reference.reset()
        return atr

    def power_off(self) -> None:
        try:
            self.reference.power_off()
        finally:
            self.card.power_off()

    def transmit(self, apdu: bytes) -> bytes:
        failure: Exception | None = None
        response = b""
        try:
            response = self.card.transmit(apdu)
        except Exception as exc:
            failure = exc
        error = None
        reference = b""
        try:
            reference = self.reference.transmit(apdu)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self.apdus += 1
            comparison = Comparison(self.apdus, apdu, response, reference, error)
            shown = self._shown.exchange(apdu, response)
            other = self._shown_reference.exchange(apdu, reference)
            if failure is None:
                self._kept.append(comparison)
            if failure is None and comparison.differs:
                self.differences += 1
                log.warning("compare: APDU %d %s: card %s, %s %s", comparison.number,
                            shown.command.hex().upper(), shown.response.hex().upper(),
                            self.reference_spec,
                            error if error is not None else other.response.hex().upper())
        if failure is not None:
            raise failure
        return response

    def take(self, command: bytes) -> Comparison | None:
        """The comparison of the exchange of ``command`` just finished (its trace record is
        being written), or None when that exchange never reached the cards."""
        with self._lock:
            while self._kept:
                comparison = self._kept.popleft()
                if comparison.command == command:
                    return comparison
            return None

    # ---------------------------------------------------------------- the card's own events

    def watch(self, notify: Callable[[ReaderEvent], None]) -> None:
        if isinstance(self.card, ReaderEvents):
            self.card.watch(notify)
        else:  # a card that is always there: say so (ReaderEvents.watch)
            notify(CardInserted())

    def unwatch(self) -> None:
        if isinstance(self.card, ReaderEvents):
            self.card.unwatch()

    def cancel(self) -> None:
        if isinstance(self.card, Cancellable):
            self.card.cancel()

    def close(self) -> None:
        close = getattr(self.card, "close", None)
        if callable(close):
            close()
