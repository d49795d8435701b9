"""One VSCard connection: the session engine between a transport and a VM's readers.

The channel feeds the transport's bytes to :class:`vmc.session.VscSession`, runs the
engine's actions (card work through the :class:`~vmc.runtime.cards.CardHost`, finished
exchanges to the trace, close) and writes what the engine queued, coalesced into one write.

A new channel starts with no readers: it sends our Init and waits for the peer's.  When the
handshake is done it asks its VM (:meth:`ChannelOwner.channel_ready`) whether it may serve the
VM's readers: the first connection of a VM to finish its handshake does, and then offers each
reader (ReaderAdd, ATR); a second one is closed.  Connections that have not finished their
handshake hold no card and cost almost nothing, so many of them never delay a real VM.

The hot path: a read holding exactly one APDU frame for a reader whose card can answer a
cheap command inline is answered right there (:meth:`~vmc.session.VscSession.fast_reader`),
with no action object and no queue; everything else takes the general path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

from ccidemu.card import CardInserted, CardRemoved, ReaderEvent, ReaderUnplugged
from ccidemu.errors import describe_exception
from vmc.runtime.cards import CardHost, Reader, describe_error
from vmc.runtime.shaping import ResponseShaper
from vmc.runtime.transport import StreamTransport
from vmc.session import (
    ApduDone,
    Closed,
    PowerOff,
    PowerOn,
    ReaderState,
    Transmit,
    VscSession,
)
from vmc.throttle import LogThrottle

__all__ = ["ChannelOwner", "ChannelStats", "VscChannel"]

log = logging.getLogger(__name__)


class ChannelStats:
    """Counters shared by every channel of a daemon (loop thread)."""

    __slots__ = ("apdus", "errors")

    def __init__(self) -> None:
        self.apdus = 0
        self.errors = 0  # of channels that ended (live ones count in their engine)


class ChannelOwner(Protocol):
    """What a channel needs of its VM endpoint."""

    name: str
    readers: list[Reader]

    def channel_ready(self, channel: VscChannel) -> bool: ...

    def channel_lost(self, channel: VscChannel, exc: Exception | None) -> None: ...

    def exchange_done(self, channel: VscChannel, done: ApduDone) -> None: ...

    def power_event(self, channel: VscChannel, kind: str, index: int,
                    atr: bytes | None) -> None: ...


class VscChannel:
    """A VSCard session on one transport (see the module docstring).  Loop thread only."""

    def __init__(
        self,
        owner: ChannelOwner,
        host: CardHost,
        stats: ChannelStats,
        *,
        label: str,
        tracing: bool,
        byteorder: str = "big",
        peer_init: bool = True,
        throttle: LogThrottle | None = None,
        shape_responses: bool = True,
    ) -> None:
        self.owner = owner
        self.host = host
        self.stats = stats
        self.label = label
        self.engine = VscSession(
            [], label=label, report_exchanges=tracing, byteorder=byteorder,  # type: ignore[arg-type]
            peer_init=peer_init, throttle=throttle,
        )
        self.transport: StreamTransport | None = None
        self.active = False  # serving the VM's readers
        self.ready = False  # handshake done and reported to the owner
        self.dead = False
        self.started = time.monotonic()
        self._readers: list[Reader] = []  # engine reader index -> VM reader
        self._shapers: list[ResponseShaper] = []  # per reader: usb-ccid's answer sizes
        self._shape = shape_responses
        self._pumping = False
        self._on_close: Callable[[], None] | None = None

    # ---------------------------------------------------------------- life cycle

    def attach(self, transport: StreamTransport) -> None:
        self.transport = transport
        self.engine.start(time.monotonic())
        self._pump()
        self._check_handshake()

    @property
    def peer(self) -> str:
        return self.transport.peer if self.transport is not None else "-"

    def activate(self) -> None:
        """Serve the owner's readers (called by the owner from channel_ready)."""
        self.active = True
        now = time.monotonic()
        for reader in self.owner.readers:
            self._add(reader, now)
        self._pump()

    def add_reader(self, reader: Reader) -> None:
        """A reader the VM gained while this channel serves it."""
        if self.active and not self.dead:
            self._add(reader, time.monotonic())
            self._pump()

    def card_changed(self, reader: Reader) -> None:
        """The reader got another card (blocking or not): tell the engine's hot path."""
        if reader in self._readers:
            self.engine.set_inline(self._readers.index(reader), not reader.card.blocking)

    def _add(self, reader: Reader, now: float) -> None:
        index = self.engine.add_reader(reader.name, reader.present and reader.plugged, now)
        assert index == len(self._readers)
        self._readers.append(reader)
        self._shapers.append(ResponseShaper(self._shape))
        self.engine.set_inline(index, not reader.card.blocking)
        reader.listener = self._reader_event
        if not reader.plugged:
            self.engine.unplug_reader(index, now)

    def shutdown(self) -> None:
        """Remove every card and reader (after the responses in flight); see :attr:`finished`."""
        if not self.dead:
            self.engine.shutdown(time.monotonic())
            self._pump()

    @property
    def finished(self) -> bool:
        return self.dead or self.engine.finished

    def close(self) -> None:
        """Close once what is queued is written."""
        if self.transport is not None and not self.dead:
            self.transport.close()
            self._lost(None)

    # ---------------------------------------------------------------- transport side

    def data_received(self, buffer: bytearray, nbytes: int) -> None:
        try:
            engine = self.engine
            index = engine.fast_reader(buffer, nbytes) if self.active else -1
            if index >= 0:
                command = bytes(buffer[12:nbytes])
                reader = self._readers[index]
                shaper = self._shapers[index]
                kept = shaper.intercept(command) if shaper.pending else None
                if kept is not None or reader.cheap(command):
                    now = time.monotonic()
                    if kept is not None:  # a part of an answer we split (vmc.runtime.shaping)
                        out = engine.fast_answer(index, command, kept, now)
                    else:
                        try:
                            response = self.host.transmit_inline(reader, command)
                        except Exception as exc:
                            out = engine.fast_failed(index, command, describe_error(exc), now)
                        else:
                            out = engine.fast_answer(index, command,
                                                     self._shaped(index, command, response), now)
                    self.stats.apdus += 1
                    assert self.transport is not None
                    self.transport.write(out)
                    return
            engine.receive_data(memoryview(buffer)[:nbytes], time.monotonic())
            if not self.ready:
                self._check_handshake()
            self._pump()
        except Exception as exc:  # a bug: this connection ends, the others go on
            self._internal_error(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(exc)

    def _lost(self, exc: Exception | None) -> None:
        if self.dead:
            return
        self.dead = True
        self.engine.connection_lost()
        self.engine.flush_log()
        self.stats.errors += self.engine.errors
        for reader in self._readers:
            if reader.listener == self._reader_event:
                reader.listener = None
        self.owner.channel_lost(self, exc)

    def _check_handshake(self) -> None:
        engine = self.engine
        if self.ready or self.dead or not engine.handshake_done or engine.closed:
            return
        self.ready = True
        if not self.owner.channel_ready(self):
            self.close()

    # ---------------------------------------------------------------- readers

    def _reader_event(self, reader: Reader, event: ReaderEvent) -> None:
        try:
            self._apply_reader_event(reader, event)
        except Exception as exc:
            self._internal_error(exc)

    def _apply_reader_event(self, reader: Reader, event: ReaderEvent) -> None:
        if self.dead or reader not in self._readers:
            return
        index = self._readers.index(reader)
        now = time.monotonic()
        engine = self.engine
        info = engine.readers()[index]
        try:
            if isinstance(event, CardInserted):
                if info.state is ReaderState.REMOVED:  # unplugged before: offer the reader again
                    engine.replug_reader(index, True, now)
                elif not info.present:
                    engine.insert_card(index, now)
            elif isinstance(event, CardRemoved):
                if info.present:
                    engine.remove_card(index, now)
            elif isinstance(event, ReaderUnplugged):
                engine.unplug_reader(index, now)
        except ValueError as exc:
            log.warning("%s: reader %d: %s", self.label, index, exc)
        self._pump()

    # ---------------------------------------------------------------- the engine's actions

    def _pump(self) -> None:
        if self._pumping or self.dead:
            return
        self._pumping = True
        try:
            engine = self.engine
            close = False
            while (action := engine.next_action()) is not None:
                kind = type(action)
                if kind is Transmit:
                    assert isinstance(action, Transmit)
                    self.stats.apdus += 1
                    shaper = self._shapers[action.reader]
                    kept = shaper.intercept(action.apdu) if shaper.pending else None
                    if kept is not None:
                        engine.transmit_done(action.token, kept, time.monotonic())
                        continue
                    self.host.transmit(self._readers[action.reader], action.apdu,
                                       self._answer(action.token, action.reader, action.apdu),
                                       self._failure(action.token))
                elif kind is ApduDone:
                    assert isinstance(action, ApduDone)
                    self.owner.exchange_done(self, action)
                elif kind is PowerOn:
                    assert isinstance(action, PowerOn)
                    self._shapers[action.reader].reset()
                    self.host.power_on(self._readers[action.reader],
                                       self._powered(action.token, action.reader),
                                       self._power_failure(action.token))
                elif kind is PowerOff:
                    assert isinstance(action, PowerOff)
                    self.host.power_off(self._readers[action.reader])
                    if engine.tracing:
                        self.owner.power_event(self, "off", action.reader, None)
                elif kind is Closed:
                    close = True
            out = engine.data_to_send()
            if out and self.transport is not None:
                self.transport.write(out)
        finally:
            self._pumping = False
        if close:
            self.close()
        elif engine.next_action() is not None or engine.has_output:
            self._pump()  # a card answered inline while we were pumping

    def _powered(self, token: int, index: int) -> Callable[[object], None]:
        engine = self.engine

        def done(atr: object) -> None:
            if not isinstance(atr, bytes):
                self._card_answer(lambda: engine.power_on_failed(
                    token, f"power-on gave {type(atr).__name__}, not an ATR", time.monotonic()))
                return
            if not self.dead and self.engine.tracing:
                self.owner.power_event(self, "on", index, atr)
            self._card_answer(lambda: engine.power_on_done(token, atr, time.monotonic()))

        return done

    def _power_failure(self, token: int) -> Callable[[str], None]:
        engine = self.engine
        return lambda why: self._card_answer(
            lambda: engine.power_on_failed(token, why, time.monotonic()))

    def _answer(self, token: int, index: int, command: bytes) -> Callable[[object], None]:
        engine = self.engine

        def done(response: object) -> None:
            if not isinstance(response, bytes):
                self._card_answer(lambda: engine.transmit_failed(
                    token, f"the card answered {type(response).__name__}, not bytes",
                    time.monotonic()))
                return
            shaped = self._shaped(index, command, response)
            self._card_answer(lambda: engine.transmit_done(token, shaped, time.monotonic()))

        return done

    def _shaped(self, index: int, command: bytes, response: bytes) -> bytes:
        shaper = self._shapers[index]
        acted = shaper.acted
        out = shaper.shape(command, response)
        if shaper.acted == 1 and acted == 0:
            log.info("%s: reader %d: a %d-byte answer went out in parts (61xx): QEMU's usb-ccid "
                     "loses or refuses answers of that size (docs/PROTOCOL.md, \"usb-ccid\"); "
                     "said once per connection", self.label, index, len(response))
        return out

    def _failure(self, token: int) -> Callable[[str], None]:
        engine = self.engine
        return lambda why: self._card_answer(
            lambda: engine.transmit_failed(token, why, time.monotonic()))

    def _card_answer(self, apply: Callable[[], None]) -> None:
        if self.dead:
            return
        try:
            apply()
            self._pump()
        except Exception as exc:
            self._internal_error(exc)

    def _internal_error(self, exc: Exception) -> None:
        """A bug met while serving this connection: close it (its VM's cards stay as they
        are and the next connection is served as usual); other VMs are not touched."""
        log.error("%s: internal error: %s; closing this connection (other VMs are not "
                  "affected)", self.label, describe_exception(exc))
        log.debug("%s: the internal error's traceback", self.label, exc_info=exc)
        if self.transport is not None:
            self.transport.abort()
        self._lost(exc)
