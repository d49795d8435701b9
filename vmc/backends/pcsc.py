"""``--card pcsc:READER`` and ``pcsc:*``: the cards in the host's PC/SC readers.

An adapter on pyscard's low-level ``smartcard.scard`` module (PC/SC, as pcsc-lite implements
it; extra ``pcsc``): the library of pcsc-lite talks to the host's pcscd (``PCSCLITE_CSOCK_NAME``
points it at another one).

* :class:`PcscCard` is the card of one reader, chosen by exact name, by index in pcscd's
  reader list, or by a regular expression searched in the names (:func:`parse_reader`; the
  first reader that matches is taken and kept).  ``power_on`` connects (shared, or
  exclusive with ``exclusive``; T=0 or T=1, as the card offers: pcscd chooses) and returns the
  ATR, ``transmit`` is ``SCardTransmit`` (the guest's APDUs go as they are: a T=0 card's 61xx
  and 6Cxx reach the guest, whose GET RESPONSE goes to the card like any APDU), ``power_off``
  disconnects resetting the card (the next connection of the VM meets a reset card).  Each
  PC/SC error becomes :class:`PcscError` (a :class:`~ccidemu.errors.CardError`: the guest sees
  a failed transmit) whose text names the error, e.g. ``PC/SC SCARD_W_REMOVED_CARD
  (0x80100069) in SCardTransmit: Card was removed.``
* :meth:`PcscCard.watch` runs a thread with a context of its own that waits in
  ``SCardGetStatusChange`` and reports: a card put in (CardInserted with its ATR), taken out
  (CardRemoved), swapped (both), the reader gone or pcscd stopped (ReaderUnplugged).  When
  pcscd stops, the thread establishes a new context until it is back, then reports the
  reader's state again: a pcscd restart is survived without restarting the daemon (the card's
  own context and handle are made anew at the next power-on).
* :class:`PcscReaderSet` is ``pcsc:*``: it reports every reader present and each one that
  appears later (``\\\\?PnP?\\Notification`` wakes it; it lists the readers every second
  anyway); the daemon opens a :class:`PcscCard` per reader (docs/DESIGN.md, "Real cards").

``cancel`` cannot interrupt a call pcsc-lite is in (SCardCancel only ends a status wait): the
card host abandons that call, and its late result is dropped.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from ccidemu.card import CardInserted, CardRemoved, ReaderEvent, ReaderUnplugged
from ccidemu.cards import CardOptions
from ccidemu.errors import CardError, ConfigError

__all__ = [
    "PcscCard",
    "PcscError",
    "PcscReaderInfo",
    "PcscReaderSet",
    "ReaderChoice",
    "error_name",
    "list_pcsc_readers",
    "open_pcsc_card",
    "open_pcsc_set",
    "parse_reader",
]

log = logging.getLogger(__name__)

#: Milliseconds one SCardGetStatusChange waits before the watch thread looks at its stop flag
#: (unwatch also wakes it at once with SCardCancel).
WAIT_MS = 1000
#: Seconds between attempts to reach a pcscd that is not running.
RETRY = 0.5
PNP = "\\\\?PnP?\\Notification"

#: Errors after which the context is useless: pcscd stopped or restarted.
_SERVICE_GONE = ("SCARD_E_NO_SERVICE", "SCARD_E_SERVICE_STOPPED", "SCARD_F_COMM_ERROR",
                 "SCARD_E_INVALID_HANDLE")
#: Errors after which the card handle is useless.
_HANDLE_GONE = ("SCARD_W_REMOVED_CARD", "SCARD_E_NO_SMARTCARD", "SCARD_E_READER_UNAVAILABLE",
                "SCARD_E_UNKNOWN_READER", "SCARD_W_UNPOWERED_CARD", "SCARD_W_UNRESPONSIVE_CARD",
                "SCARD_E_NO_READERS_AVAILABLE")


def _scard() -> Any:
    try:
        from smartcard import scard
    except ImportError as exc:
        raise ConfigError(f"the pcsc: cards need pyscard (pip install 'ccidemu[pcsc]'): {exc}"
                          ) from None
    return scard


_NAMES: dict[int, str] = {}


def error_name(code: int) -> str:
    """``SCARD_E_NO_SERVICE`` for 0x8010001D, and so on (pyscard's constants)."""
    if not _NAMES:
        scard = _scard()
        for name, value in vars(scard).items():
            if (name.startswith(("SCARD_E_", "SCARD_W_", "SCARD_F_", "SCARD_P_"))
                    and isinstance(value, int)):
                _NAMES.setdefault(value & 0xFFFFFFFF, name)
    return _NAMES.get(code & 0xFFFFFFFF, f"error {code & 0xFFFFFFFF:#010x}")


class PcscError(CardError):
    """A PC/SC call failed; ``name`` is the error's name (``SCARD_W_REMOVED_CARD``)."""

    def __init__(self, code: int, function: str, reader: str = "") -> None:
        self.code = code & 0xFFFFFFFF
        self.name = error_name(code)
        self.function = function
        try:
            text = str(_scard().SCardGetErrorMessage(code)).strip()
        except Exception:
            text = ""
        where = f" (reader {reader!r})" if reader else ""
        super().__init__(f"PC/SC {self.name} ({self.code:#010x}) in {function}{where}"
                         + (f": {text}" if text else ""))


def _ok(rc: int, function: str, reader: str = "") -> None:
    if rc & 0xFFFFFFFF != 0:
        raise PcscError(rc, function, reader)


# --------------------------------------------------------------------------- choosing


@dataclass(frozen=True, slots=True)
class ReaderChoice:
    """``pcsc:READER``: an exact name, an index in pcscd's list, or a regular expression."""

    text: str

    def resolve(self, names: list[str], allowed: Callable[[str], bool]) -> str | None:
        """The reader this choice names among ``names`` (only allowed ones), or None."""
        visible = [n for n in names if allowed(n)]
        if self.text in visible:
            return self.text
        if self.text.isdigit():
            index = int(self.text)
            return visible[index] if index < len(visible) else None
        pattern = re.compile(self.text)
        for name in visible:
            if pattern.search(name):
                return name
        return None


def parse_reader(argument: str) -> ReaderChoice:
    """Check a ``pcsc:`` argument; ConfigError with the forms when it is unusable."""
    if not argument:
        raise ConfigError("pcsc: needs a reader: pcsc:NAME (exact), pcsc:INDEX (0 = the first), "
                          "pcsc:REGEX (searched in the names) or pcsc:* (every reader); "
                          "'ccidemu readers' lists them")
    if not argument.isdigit():
        try:
            re.compile(argument)
        except re.error as exc:
            raise ConfigError(f"pcsc:{argument}: not a reader name, index or regular "
                              f"expression ({exc})") from None
    return ReaderChoice(argument)


def _allow(patterns: tuple[str, ...]) -> Callable[[str], bool]:
    compiled = [re.compile(p) for p in patterns]
    if not compiled:
        return lambda name: True
    return lambda name: any(p.search(name) for p in compiled)


def _establish() -> Any:
    scard = _scard()
    rc, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    _ok(rc, "SCardEstablishContext")
    return context


def _release(context: Any) -> None:
    if context is not None:
        with contextlib.suppress(Exception):
            _scard().SCardReleaseContext(context)


def _list(context: Any) -> list[str]:
    scard = _scard()
    rc, names = scard.SCardListReaders(context, [])
    if rc & 0xFFFFFFFF != 0 and error_name(rc) == "SCARD_E_NO_READERS_AVAILABLE":
        return []
    _ok(rc, "SCardListReaders")
    return list(names)


# --------------------------------------------------------------------------- the card


class PcscCard:
    """The card in one PC/SC reader (see the module docstring)."""

    blocking: ClassVar[bool] = True

    def __init__(self, choice: ReaderChoice, options: CardOptions | None = None) -> None:
        options = options or CardOptions()
        self.choice = choice
        self.exclusive = options.exclusive
        self.allowed = _allow(options.allow_readers)
        self.reader: str | None = None  # bound at the first successful resolution
        self._lock = threading.Lock()  # the card thread's calls (and close)
        self._context: Any = None
        self._handle: Any = None
        self._protocol = 0
        self._cancelled = False
        self._notify: Callable[[ReaderEvent], None] | None = None
        self._watcher: threading.Thread | None = None
        self._watch_context: Any = None
        self._stop = threading.Event()

    @property
    def name(self) -> str:
        return f"PC/SC reader {self.reader or self.choice.text!r}"

    def _resolve(self, context: Any) -> str | None:
        if self.reader is not None:
            return self.reader
        found = self.choice.resolve(_list(context), self.allowed)
        if found is not None:
            self.reader = found
            if found != self.choice.text:
                log.info("pcsc:%s is reader %r", self.choice.text, found)
        return found

    def check_now(self) -> None:
        """At start: name the reader if pcscd has it, warn if not (it may come later)."""
        try:
            context = _establish()
        except PcscError as exc:
            log.warning("pcsc:%s: %s; waiting for pcscd", self.choice.text, exc)
            return
        try:
            names = _list(context)
            if self.choice.text in names and not self.allowed(self.choice.text):
                raise ConfigError(f"pcsc:{self.choice.text}: that reader is not in this VM's "
                                  "allow-list (--pcsc-allow / pcsc_allow)")
            if self._resolve(context) is None:
                shown = ", ".join(repr(n) for n in names if self.allowed(n)) or "none"
                log.warning("pcsc:%s: no such reader now (readers: %s); waiting for it",
                            self.choice.text, shown)
        except PcscError as exc:
            log.warning("pcsc:%s: %s", self.choice.text, exc)
        finally:
            _release(context)

    # ---------------------------------------------------------------- Card

    def power_on(self) -> bytes:
        with self._lock:
            self._cancelled = False
            try:
                try:
                    atr, reader, protocol = self._connect()
                except PcscError as exc:
                    if exc.name not in _SERVICE_GONE:
                        raise
                    # pcscd was restarted since our context was made: once more, afresh
                    atr, reader, protocol = self._connect()
            except PcscError as exc:
                raise self._explain(exc) from None
        log.info("PC/SC reader %r: connected (%s, T=%d), ATR %s", reader,
                 "exclusive" if self.exclusive else "shared", protocol, atr.hex().upper())
        return atr

    def _connect(self) -> tuple[bytes, str, int]:
        """(Re)connect, resetting the card: (ATR, reader, 0 or 1 for T=0 or T=1)."""
        scard = _scard()
        context = self._ensure_context()
        reader = self._resolve(context)
        if reader is None:
            raise CardError(f"no PC/SC reader matches {self.choice.text!r}")
        share = scard.SCARD_SHARE_EXCLUSIVE if self.exclusive else scard.SCARD_SHARE_SHARED
        protocols = scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1
        protocol = self._protocol
        if self._handle is not None:
            rc, protocol = scard.SCardReconnect(self._handle, share, protocols,
                                                scard.SCARD_RESET_CARD)
            if rc & 0xFFFFFFFF != 0:
                self._drop_handle()
        if self._handle is None:
            rc, handle, protocol = scard.SCardConnect(context, reader, share, protocols)
            self._check(rc, "SCardConnect", reader)
            self._handle = handle
        self._protocol = protocol
        status = scard.SCardStatus(self._handle)
        self._check(status[0], "SCardStatus", reader)
        return bytes(status[-1]), reader, 1 if protocol == scard.SCARD_PROTOCOL_T1 else 0

    def transmit(self, apdu: bytes) -> bytes:
        scard = _scard()
        with self._lock:
            if self._handle is None:
                raise CardError(f"{self.name}: the card is not connected")
            rc, response = scard.SCardTransmit(self._handle, self._protocol, list(apdu))
            if self._cancelled:
                raise CardError(f"{self.name}: the call was abandoned")
            if rc & 0xFFFFFFFF != 0:
                error = PcscError(rc, "SCardTransmit", self.reader or "")
                if error.name == "SCARD_W_RESET_CARD":  # another program reset it (shared)
                    with contextlib.suppress(Exception):
                        scard.SCardReconnect(self._handle, scard.SCARD_SHARE_SHARED,
                                             scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1,
                                             scard.SCARD_LEAVE_CARD)
                self._check(rc, "SCardTransmit", self.reader or "")
            if len(response) < 2:  # ISO/IEC 7816-4 section 5: SW1 SW2 end every answer
                raise CardError(f"{self.name}: the card answered {len(response)} bytes (no "
                                "SW1 SW2)")
            return bytes(response)

    def power_off(self) -> None:
        scard = _scard()
        with self._lock:
            handle, self._handle = self._handle, None
            if handle is not None:
                rc = scard.SCardDisconnect(handle, scard.SCARD_RESET_CARD)
                if rc & 0xFFFFFFFF != 0 and error_name(rc) not in _HANDLE_GONE + _SERVICE_GONE:
                    log.debug("PC/SC reader %r: %s", self.reader,
                              PcscError(rc, "SCardDisconnect"))

    def cancel(self) -> None:
        self._cancelled = True

    def close(self) -> None:
        """Let go of the reader and both contexts."""
        self.unwatch()
        self.power_off()
        with self._lock:
            _release(self._context)
            self._context = None

    def _ensure_context(self) -> Any:
        if self._context is None:
            self._context = _establish()
        return self._context

    def _drop_handle(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            with contextlib.suppress(Exception):
                _scard().SCardDisconnect(handle, _scard().SCARD_LEAVE_CARD)

    def _check(self, rc: int, function: str, reader: str) -> None:
        """Raise PcscError; first forget what the error made useless."""
        if rc & 0xFFFFFFFF == 0:
            return
        error = PcscError(rc, function, reader)
        if error.name in _SERVICE_GONE:
            self._handle = None
            _release(self._context)
            self._context = None
        elif error.name in _HANDLE_GONE:
            self._drop_handle()
        raise error

    def _explain(self, error: PcscError) -> CardError:
        if error.name == "SCARD_E_SHARING_VIOLATION":
            how = ("exclusive access was asked (--pcsc-exclusive) and another program has "
                   "it open" if self.exclusive else "another program holds it exclusively")
            return CardError(f"{error}; the reader is in use: {how}")
        if error.name in ("SCARD_E_NO_SERVICE", "SCARD_E_SERVICE_STOPPED"):
            return CardError(f"{error}; is pcscd running?")
        return error

    # ---------------------------------------------------------------- ReaderEvents

    def watch(self, notify: Callable[[ReaderEvent], None]) -> None:
        self._notify = notify
        if self._watcher is not None and self._watcher.is_alive() and not self._stop.is_set():
            return
        self._stop = stop = threading.Event()  # this watch's own: an old thread sees its own
        self._watcher = threading.Thread(target=self._watch, args=(stop,), daemon=True,
                                         name=f"ccidemu-pcsc-{self.choice.text}"[:60])
        self._watcher.start()

    def unwatch(self) -> None:
        """Stop reporting at once (the card host calls it in its loop: it does not wait for
        the thread, which SCardCancel wakes)."""
        self._stop.set()
        context = self._watch_context
        if context is not None:
            with contextlib.suppress(Exception):
                _scard().SCardCancel(context)
        self._watcher = None
        self._notify = None

    def _say(self, event: ReaderEvent, stop: threading.Event) -> None:
        notify = self._notify
        if notify is not None and not stop.is_set():
            notify(event)

    def _watch(self, stop: threading.Event) -> None:
        """The watch thread (see the module docstring)."""
        scard = _scard()
        shown: str | None = None  # last reported: "present", "empty", "gone"
        atr = b""
        events = -1  # pcsc-lite's event counter (upper 16 bits of the state)
        state = scard.SCARD_STATE_UNAWARE
        gone_reason = ""
        context: Any = None
        while not stop.is_set():
            if context is None:
                try:
                    context = self._watch_context = _establish()
                except PcscError as exc:
                    if shown != "gone":
                        shown = "gone"
                        self._say(ReaderUnplugged(f"pcscd is not reachable ({exc.name})"), stop)
                    stop.wait(RETRY)
                    continue
                state = scard.SCARD_STATE_UNAWARE
            try:
                reader = self._resolve(context)
                if reader is None:
                    if shown != "gone":
                        shown = "gone"
                        self._say(ReaderUnplugged(f"no PC/SC reader matches "
                                                  f"{self.choice.text!r}"), stop)
                    self._wait_pnp(context, stop)
                    continue
                if reader not in _list(context):
                    if shown != "gone":
                        shown, gone_reason = "gone", f"reader {reader!r} was unplugged"
                        self._say(ReaderUnplugged(gone_reason), stop)
                    self._wait_pnp(context, stop)
                    state = scard.SCARD_STATE_UNAWARE
                    continue
                rc, states = scard.SCardGetStatusChange(context, WAIT_MS, [(reader, state)])
            except PcscError as exc:
                rc, states = exc.code, []
            code = rc & 0xFFFFFFFF
            if code != 0:
                name = error_name(code)
                if name in ("SCARD_E_TIMEOUT", "SCARD_E_CANCELLED"):
                    continue
                if name in _SERVICE_GONE or name in ("SCARD_E_NO_READERS_AVAILABLE",
                                                       "SCARD_E_UNKNOWN_READER"):
                    if name in _SERVICE_GONE:
                        _release(context)
                        context = self._watch_context = None
                        reason = f"pcscd stopped ({name})"
                    else:
                        reason = f"reader {self.reader!r} is gone ({name})"
                    if shown != "gone":
                        shown = "gone"
                        self._say(ReaderUnplugged(reason), stop)
                    stop.wait(RETRY)
                    continue
                log.warning("PC/SC reader %r: %s", self.reader,
                            PcscError(rc, "SCardGetStatusChange"))
                stop.wait(RETRY)
                continue
            _, event_state, event_atr = states[0]
            state = event_state & ~scard.SCARD_STATE_CHANGED
            counter = event_state >> 16
            if event_state & (scard.SCARD_STATE_UNKNOWN | scard.SCARD_STATE_IGNORE):
                if shown != "gone":
                    shown = "gone"
                    self._say(ReaderUnplugged(f"reader {self.reader!r} was unplugged"), stop)
                continue
            present = bool(event_state & scard.SCARD_STATE_PRESENT) and not (
                event_state & scard.SCARD_STATE_MUTE)
            new_atr = bytes(event_atr)
            if present:
                swapped = shown == "present" and (new_atr != atr or counter > events + 1)
                if swapped:
                    self._say(CardRemoved(), stop)
                if shown != "present" or swapped:
                    shown, atr = "present", new_atr
                    self._say(CardInserted(new_atr or None), stop)
            elif shown != "empty":
                if shown == "gone":  # the reader is back, empty: nothing to show yet
                    log.info("PC/SC reader %r is back (empty)", self.reader)
                shown = "empty"
                self._say(CardRemoved(), stop)
            events = counter
        _release(context)

    def _wait_pnp(self, context: Any, stop: threading.Event) -> None:
        """Until the reader list may have changed (or a second passed)."""
        scard = _scard()
        rc, _ = scard.SCardGetStatusChange(context, WAIT_MS, [(PNP, scard.SCARD_STATE_UNAWARE)])
        if error_name(rc) in _SERVICE_GONE:  # the caller's next call fails and starts afresh
            stop.wait(RETRY)


# --------------------------------------------------------------------------- pcsc:*


class PcscReaderSet:
    """``pcsc:*``: every reader of the host's pcscd (see the module docstring)."""

    def __init__(self) -> None:
        self._notify: Callable[[str], None] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._context: Any = None
        self._seen: set[str] = set()

    @property
    def name(self) -> str:
        return "every PC/SC reader"

    def open(self, reader: str, options: CardOptions) -> PcscCard:
        return PcscCard(ReaderChoice(reader), options)

    def spec_of(self, reader: str) -> str:
        return f"pcsc:{reader}"

    def watch(self, notify: Callable[[str], None]) -> None:
        self._notify = notify
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(self._stop,),
                                        name="ccidemu-pcsc-readers", daemon=True)
        self._thread.start()

    def unwatch(self) -> None:
        self._stop.set()
        context = self._context
        if context is not None:
            with contextlib.suppress(Exception):
                _scard().SCardCancel(context)
        self._thread = None

    def _run(self, stop: threading.Event) -> None:
        scard = _scard()
        pnp_state = scard.SCARD_STATE_UNAWARE
        while not stop.is_set():
            if self._context is None:
                try:
                    self._context = _establish()
                except PcscError:
                    stop.wait(RETRY)
                    continue
                pnp_state = scard.SCARD_STATE_UNAWARE
            try:
                names = _list(self._context)
            except PcscError as exc:
                if exc.name in _SERVICE_GONE:
                    _release(self._context)
                    self._context = None
                stop.wait(RETRY)
                continue
            for name in names:
                if name not in self._seen:
                    self._seen.add(name)
                    log.info("pcsc:*: reader %r", name)
                    notify = self._notify
                    if notify is not None and not stop.is_set():
                        notify(name)
            rc, states = scard.SCardGetStatusChange(self._context, WAIT_MS, [(PNP, pnp_state)])
            if rc & 0xFFFFFFFF == 0 and states:
                pnp_state = states[0][1] & ~scard.SCARD_STATE_CHANGED
            elif error_name(rc) in _SERVICE_GONE:
                _release(self._context)
                self._context = None
                stop.wait(RETRY)


# --------------------------------------------------------------------------- listing


@dataclass(frozen=True, slots=True)
class PcscReaderInfo:
    """One reader of pcscd, for ``ccidemu readers``."""

    index: int
    name: str
    state: tuple[str, ...]  # SCARD_STATE_* flags without the prefix, e.g. ("PRESENT",)
    atr: bytes | None

    @property
    def present(self) -> bool:
        return "PRESENT" in self.state and "MUTE" not in self.state


_STATE_FLAGS = ("IGNORE", "CHANGED", "UNKNOWN", "UNAVAILABLE", "EMPTY", "PRESENT", "ATRMATCH",
                "EXCLUSIVE", "INUSE", "MUTE", "UNPOWERED")


def list_pcsc_readers() -> list[PcscReaderInfo]:
    """The host's PC/SC readers with their state and ATR.  PcscError when pcscd cannot be
    reached."""
    scard = _scard()
    context = _establish()
    try:
        names = _list(context)
        if not names:
            return []
        rc, states = scard.SCardGetStatusChange(
            context, 0, [(n, scard.SCARD_STATE_UNAWARE) for n in names])
        _ok(rc, "SCardGetStatusChange")
        found = []
        for index, (name, event_state, atr) in enumerate(states):
            flags = tuple(f for f in _STATE_FLAGS
                          if event_state & getattr(scard, f"SCARD_STATE_{f}") and f != "CHANGED")
            found.append(PcscReaderInfo(index, name, flags, bytes(atr) or None))
        return found
    finally:
        _release(context)


# --------------------------------------------------------------------------- factories


def open_pcsc_card(argument: str, options: CardOptions) -> PcscCard:
    """The ``pcsc:`` factory (``pcsc:*`` is :func:`open_pcsc_set`)."""
    choice = parse_reader(argument)
    for pattern in options.allow_readers:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"reader allow-list pattern {pattern!r}: {exc}") from None
    _scard()
    card = PcscCard(choice, options)
    card.check_now()
    return card


def open_pcsc_set(argument: str, options: CardOptions) -> PcscReaderSet:
    _scard()
    return PcscReaderSet()
