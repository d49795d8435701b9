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
* :class:`TouchSetting`: what ``ccidemu serve --touch MODE`` (and a VM's ``touch`` key)
  asks for: ``auto`` (touched at once: no sensor), ``delay:SECONDS`` or
  ``button[:TIMEOUT]`` (``ccidemu ctl touch VM`` presses it); each reader gets its own.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from ccidemu.errors import ConfigError

DEFAULT_BUTTON_TIMEOUT = 15.0


class TouchMode(StrEnum):
    AUTO = "auto"
    DELAY = "delay"
    BUTTON = "button"


class TouchSensor(Protocol):
    """What a reader holds: called by its card (may wait), closed at shutdown."""

    def __call__(self, request: Any) -> bool: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class TouchSetting:
    """How a VM's readers are touched (see the module docstring)."""

    mode: TouchMode = TouchMode.AUTO
    seconds: float = 0.0  # DELAY: the delay; BUTTON: how long a request waits

    def __str__(self) -> str:
        if self.mode is TouchMode.AUTO:
            return "auto"
        return f"{self.mode.value}:{self.seconds:g}"

    def sensor(self) -> DelayedTouch | TouchButton | None:
        """A new sensor for one reader (None: touched at once, the card stays inline)."""
        if self.mode is TouchMode.DELAY:
            return DelayedTouch(self.seconds)
        if self.mode is TouchMode.BUTTON:
            return TouchButton(self.seconds)
        return None


def parse_touch(text: str) -> TouchSetting:
    """``auto``, ``delay:SECONDS``, ``button`` or ``button:TIMEOUT``; ConfigError otherwise."""
    name, _, value = text.strip().lower().partition(":")
    try:
        mode = TouchMode(name)
    except ValueError:
        raise ConfigError(f"touch mode {text!r} is not auto, delay:SECONDS or "
                          "button[:TIMEOUT]") from None
    if mode is TouchMode.AUTO:
        if value:
            raise ConfigError(f"touch mode {text!r}: auto takes no value")
        return TouchSetting()
    if not value and mode is TouchMode.BUTTON:
        return TouchSetting(mode, DEFAULT_BUTTON_TIMEOUT)
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigError(f"touch mode {text!r}: {value or 'nothing'} is not a number of "
                          "seconds") from None
    if not 0 <= seconds <= 3600 or (mode is TouchMode.BUTTON and seconds == 0):
        raise ConfigError(f"touch mode {text!r}: seconds must be from "
                          f"{'0' if mode is TouchMode.DELAY else 'above 0'} to 3600")
    return TouchSetting(mode, seconds)


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

    def __init__(self, timeout: float = DEFAULT_BUTTON_TIMEOUT) -> None:
        self.timeout = timeout
        self.requests = 0
        self._lock = threading.Condition()
        self._presses = 0
        self._waiting = 0
        self._closed = False

    def close(self) -> None:
        """No touch will come (shutdown): waiting requests end now, untouched."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()

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
                if not self._lock.wait_for(lambda: self._presses > 0 or self._closed,
                                           self.timeout) or self._presses == 0:
                    return False
                self._presses -= 1
                return True
            finally:
                self._waiting -= 1
