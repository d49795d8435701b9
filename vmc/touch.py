"""Touch sensors for emulated cards with a touch button (the PIV card's touch policies).

The card is pure: when a key needs a touch it calls its sensor with a
:class:`ccidemu.cards.piv.TouchRequest` and takes the answer (True: touched).  Waiting
belongs here, on the adapter side, with its clocks and threads; a card given a sensor
through ``CardOptions(touch=...)`` is a blocking card, so the runtime calls it off its
event loop.

* :class:`DelayedTouch`: every touch comes after a fixed delay (tests that want to see a
  client's "Touch your YubiKey" prompt; ``ccidemu vpcd --touch-delay``).
* :class:`TouchButton`: a touch comes when :meth:`TouchButton.press` is called (from a
  test, or from a control command: the hook for a ``ccidemu ctl touch``), or never
  within ``timeout`` seconds (then the card answers 6985).  ``waiting`` tells whether a
  card is waiting now, ``requests`` how many touches were asked for.
"""

from __future__ import annotations

import threading
from typing import Any


class DelayedTouch:
    """Touched ``seconds`` after each request."""

    def __init__(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a touch delay cannot be negative")
        self.seconds = seconds
        self.requests = 0
        self._stop = threading.Event()

    def __call__(self, request: Any) -> bool:
        self.requests += 1
        self._stop.wait(self.seconds)
        return True

    def close(self) -> None:
        """End any delay now (shutdown)."""
        self._stop.set()


class TouchButton:
    """A button pressed from another thread; a request waits up to ``timeout`` for it."""

    def __init__(self, timeout: float = 15.0) -> None:
        self.timeout = timeout
        self.requests = 0
        self._lock = threading.Condition()
        self._presses = 0
        self._waiting = 0

    @property
    def waiting(self) -> bool:
        with self._lock:
            return self._waiting > 0

    def press(self) -> None:
        """Touch: lets one waiting (or the next) request through."""
        with self._lock:
            self._presses += 1
            self._lock.notify_all()

    def wait_for_request(self, timeout: float = 30.0) -> bool:
        """Until a card waits for a touch (True), or ``timeout`` (False)."""
        with self._lock:
            return self._lock.wait_for(lambda: self._waiting > 0, timeout)

    def __call__(self, request: Any) -> bool:
        with self._lock:
            self.requests += 1
            self._waiting += 1
            self._lock.notify_all()
            try:
                if not self._lock.wait_for(lambda: self._presses > 0, self.timeout):
                    return False
                self._presses -= 1
                return True
            finally:
                self._waiting -= 1
