"""The I/O adapter around :class:`vmc.session.VscSession`: ``ccidemu serve``.

Connectors (``--connect``: QEMU is the chardev server; we connect and reconnect with capped
backoff) and listeners (``--listen``: QEMU connects; one new session per connection), one
:class:`~vmc.session.VscSession` per connection, cards per reader, the control socket
(:mod:`vmc.control`), the APDU trace (:mod:`ccidemu.trace`) and orderly shutdown.

Theory of operation
-------------------
Two threads.  The asyncio loop (the caller's) runs what is rare: start-up, connecting with
backoff, the control socket, shutdown.  Every VM connection lives in the *session thread*
(:class:`_SessionLoop`), a plain selector loop: a round trip through asyncio's loop costs
more than the whole budget of an APDU (measured: an asyncio protocol that answers without
doing anything reaches only 0.7 of a raw socket's round-trip rate; a selector loop reaches
1.0; see docs/PERFORMANCE.md, section "Daemon").  The session thread accepts on the
listeners; connectors hand it the socket once connected.

Per connection (:class:`_VscConn`): a readable socket is read into a per-connection buffer,
the bytes go to the engine, then :meth:`_VscConn.pump_locked` drains the engine's actions
(card requests, finished exchanges, close) and writes everything the engine queued in one
``send`` (the replies to a burst of messages are coalesced).  Output the peer does not take yet is
kept and the connection stops reading until it is written.  Emulated cards
(``blocking = False``) answer inline; every blocking card has a thread of its own (started on
first use; calls to one card stay in order, a slow card never waits for a thread another
VM's card holds) and its answers are handed back to the session thread.  The cards of a new
``--listen`` connection are opened in a small pool (opening a PIV card takes tens of ms), then
the connection starts in the session thread.  A ``--connect`` peer that hangs up before the
handshake is retried with the same capped backoff as a refused connection.

One lock (:attr:`Daemon.lock`) guards every engine, card slot and connection: the session
thread holds it while it handles a read, the control socket while it handles a request.
Only the session thread touches its selector and closes connection sockets; other threads
post those steps to it (:meth:`_SessionLoop.call_soon`).

For ``--connect`` the same card instances serve every reconnection to that address (it is the
same VM, and QEMU keeps the card "present" in the guest while the chardev is down): the ATR is
cached and the card is not reset.  For ``--listen`` every connection gets fresh cards.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import itertools
import logging
import os
import selectors
import socket
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any

from ccidemu.card import Card
from ccidemu.cards import CardOptions, open_card
from ccidemu.errors import CardError, CcidemuError, ConfigError
from ccidemu.files import open_private
from ccidemu.redact import Redactor
from ccidemu.trace import TraceRecord, format_record
from vmc.addr import Address, TcpAddress, UnixAddress
from vmc.control import MAX_LINE, check_control_path, decode_line, encode_line
from vmc.session import ApduDone, Closed, PowerOff, PowerOn, Transmit, VscSession
from vmc.sockets import Backoff, set_nodelay

__all__ = [
    "DEFAULT_CARD",
    "DEFAULT_CONNECT",
    "Daemon",
    "ServeConfig",
]

log = logging.getLogger(__name__)

#: The card every reader gets when no ``--card`` is given.
DEFAULT_CARD = "piv:"
#: Where to connect when neither ``--connect`` nor ``--listen`` is given (QEMU docs' port).
DEFAULT_CONNECT = "tcp:127.0.0.1:2001"

_SHUTDOWN_GRACE = 3.0  # seconds to wait for responses in flight at shutdown
_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE
_umask_lock = threading.Lock()


@dataclass
class ServeConfig:
    connect: list[Address] = field(default_factory=list)
    listen: list[Address] = field(default_factory=list)
    cards: list[str] = field(default_factory=lambda: [DEFAULT_CARD])
    control: UnixAddress | None = None
    trace: Path | None = None
    trace_secrets: bool = False
    allow_remote: bool = False  # --listen beyond loopback
    card_options: CardOptions = field(default_factory=CardOptions)


@dataclass
class _Stats:
    started: float = field(default_factory=time.monotonic)
    sessions: int = 0
    sessions_total: int = 0
    apdus: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    errors: int = 0


class _Slot:
    """The card of one reader and what is cached about it."""

    __slots__ = ("atr", "card", "present", "spec", "worker")

    def __init__(self, spec: str, card: Card) -> None:
        self.spec = spec
        self.card = card
        self.atr: bytes | None = None  # cached power-on answer (card powered)
        self.present = True
        self.worker: ThreadPoolExecutor | None = None

    def submit(self, func: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run a blocking card call in this card's own thread (started on first use).

        One thread per blocking card: calls to one card run one at a time and in order, and a
        card that takes seconds never holds up another VM's card (a shared pool did, once all
        its threads were busy with slow cards).
        """
        if self.worker is None:
            self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ccidemu-card")
        return self.worker.submit(func, *args)

    def retire(self, power_off: bool) -> None:
        """The session is over: power the card off (in its thread if blocking), stop the thread."""
        card = self.card
        if power_off:
            if card.blocking:
                with contextlib.suppress(RuntimeError):  # the worker is shut down already
                    self.submit(_quiet_power_off, card)
            else:
                _quiet_power_off(card)
        if self.worker is not None:
            self.worker.shutdown(wait=False)


class _Handle:
    """One VM connection point: a connector (kept across reconnects) or an accepted connection."""

    def __init__(self, sid: int, mode: str, address: Address, slots: list[_Slot]) -> None:
        self.sid = sid
        self.mode = mode
        self.address = address
        self.slots = slots
        self.peer: str | None = None
        self.protocol: _VscConn | None = None

    @property
    def engine(self) -> VscSession | None:
        return self.protocol.engine if self.protocol is not None else None


_Callback = Callable[[int], None]


class _SessionLoop:
    """The session thread: a selector loop over the VM connections and the listeners."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, _READ, None)
        self._calls: deque[Callable[[], None]] = deque()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="ccidemu-sessions", daemon=True)
        self._ident: int | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (after the calls posted so far) and wait for it."""
        if not self._thread.is_alive():
            self._close_selector()
            return
        self.call_soon(self._set_stopped)
        self._thread.join(timeout)

    def in_thread(self) -> bool:
        return threading.get_ident() == self._ident

    def call_soon(self, func: Callable[[], None]) -> None:
        """Run ``func`` in the session thread (from any thread; from the thread itself: later)."""
        self._calls.append(func)
        if not self.in_thread():
            with contextlib.suppress(OSError):  # full: a wake-up is pending anyway
                self._wake_w.send(b"\0")

    # the selector: session thread only
    def register(self, sock: socket.socket, events: int, callback: _Callback) -> None:
        self._selector.register(sock, events, callback)

    def modify(self, sock: socket.socket, events: int, callback: _Callback) -> None:
        self._selector.modify(sock, events, callback)

    def unregister(self, sock: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(sock)

    def _set_stopped(self) -> None:
        self._stopped = True

    def _run(self) -> None:
        self._ident = threading.get_ident()
        select = self._selector.select
        calls = self._calls
        while not self._stopped:
            for key, events in select():
                callback = key.data
                if callback is None:
                    with contextlib.suppress(OSError):
                        while self._wake_r.recv(4096):
                            pass
                    continue
                try:
                    callback(events)
                except Exception:
                    log.exception("session thread: unexpected error")
            while calls:
                try:
                    calls.popleft()()
                except Exception:
                    log.exception("session thread: unexpected error")
        self._close_selector()

    def _close_selector(self) -> None:
        if self._selector.get_map() is None:  # closed already
            return
        for key in list(self._selector.get_map().values()):
            if key.data is not None:
                with contextlib.suppress(OSError):
                    key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()


class _VscConn:
    """One VM connection in the session thread.  Methods named ``*_locked`` need Daemon.lock."""

    def __init__(
        self,
        daemon: Daemon,
        handle: _Handle,
        sock: socket.socket,
        on_closed: Callable[[], None] | None = None,
    ) -> None:
        self.daemon = daemon
        self.handle = handle
        self.sock = sock
        self.engine = VscSession(
            [f"ccidemu reader {i}" for i in range(len(handle.slots))],
            present=[s.present for s in handle.slots],
            label=f"session {handle.sid}",
            report_exchanges=daemon.trace_file is not None,
        )
        self.dead = False
        self._on_closed = on_closed
        self._loop = daemon.sessions
        self._lock = daemon.lock
        self._stats = daemon.stats
        self._out = bytearray()  # written when the peer takes it (then reading resumes)
        self._closing = False  # close once _out is written
        self._buffer = bytearray(1 << 16)  # every read lands here: no allocation per read
        self._view = memoryview(self._buffer)
        for index, slot in enumerate(handle.slots):
            # A new peer reaches the card as after a reset: the next power-on is real, and
            # clears the security status (PIN verified, admin) an earlier peer left.
            slot.atr = None
            self.card_changed(index)

    def card_changed(self, index: int) -> None:
        """Tell the engine whether the card of reader ``index`` can answer inline."""
        card = self.handle.slots[index].card
        if card.blocking:
            self.engine.set_inline_card(index, None)
        else:
            self.engine.set_inline_card(index, card.transmit, self._inline_failed)

    def _inline_failed(self, exc: Exception) -> str:
        self._card_exception(exc)
        return _why(exc)

    # ---------------------------------------------------------------- session thread

    def open(self) -> None:
        """Register with the selector and start the engine (session thread)."""
        self._loop.register(self.sock, _READ, self.on_events)
        with self._lock:
            self.handle.peer = _peer_text(self.sock)
            self.handle.protocol = self
            self.daemon.session_started(self.handle)
            self.engine.start(time.monotonic())
            self.pump_locked()

    def on_events(self, events: int) -> None:
        if self.dead:
            return
        if events & _WRITE:
            with self._lock:
                self._flush_locked()
            if self.dead or self._out:
                return
        if not events & _READ:
            return
        try:
            nbytes = self.sock.recv_into(self._buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            with self._lock:
                self.lost_locked(exc)
            return
        with self._lock:
            if not nbytes:
                self.lost_locked(None)
                return
            stats = self._stats
            stats.bytes_in += nbytes
            out = self.engine.exchange_inline(self._buffer, nbytes, time.monotonic())
            if out is not None:  # the hot path: one APDU, answered by an emulated card
                stats.apdus += 1
                self._write_locked(out)
                return
            self.engine.receive_data(self._view[:nbytes], time.monotonic())
            self.pump_locked()

    def _finish(self) -> None:
        """Unregister and close the socket (session thread); then tell the connector."""
        self._loop.unregister(self.sock)
        with contextlib.suppress(OSError):
            self.sock.close()
        if self._on_closed is not None:
            self._on_closed()

    # ---------------------------------------------------------------- any thread, with the lock

    def lost_locked(self, exc: Exception | None) -> None:
        """The connection is gone (or closed by us): stop the engine, release the socket."""
        if self.dead:
            return
        self.dead = True
        self.engine.connection_lost()
        self._stats.errors += self.engine.errors  # the engine counts; keep its count when it goes
        if self.handle.protocol is self:
            self.handle.protocol = None
        self.daemon.session_ended(self.handle, exc)
        if self._loop.in_thread():
            self._finish()
        else:
            self._loop.call_soon(self._finish)

    def close_locked(self) -> None:
        """Close once everything queued is written."""
        self._closing = True
        if not self._out:
            self.lost_locked(None)

    def pump_locked(self) -> None:
        engine = self.engine
        slots = self.handle.slots
        stats = self._stats
        close: Closed | None = None
        while (action := engine.next_action()) is not None:
            kind = type(action)
            if kind is Transmit:
                assert isinstance(action, Transmit)
                stats.apdus += 1
                card = slots[action.reader].card
                if not card.blocking:  # emulated card: answer inline (the hot path)
                    try:
                        response = card.transmit(action.apdu)
                    except Exception as exc:
                        self._card_exception(exc)
                        engine.transmit_failed(action.token, _why(exc), time.monotonic())
                    else:
                        engine.transmit_done(action.token, response, time.monotonic())
                else:
                    self._in_thread(
                        slots[action.reader], partial(card.transmit, action.apdu), action.token,
                        engine.transmit_done, engine.transmit_failed,
                    )
            elif kind is ApduDone:
                assert isinstance(action, ApduDone)
                self.daemon.write_trace(self.handle.sid, action)
            elif kind is PowerOn:
                assert isinstance(action, PowerOn)
                slot = slots[action.reader]
                if slot.atr is not None:  # powered and cached: same card, same state
                    engine.power_on_done(action.token, slot.atr, time.monotonic())
                elif slot.card.blocking:
                    self._in_thread(
                        slot, partial(_power_on, slot), action.token,
                        engine.power_on_done, engine.power_on_failed,
                    )
                else:
                    try:
                        atr = _power_on(slot)
                    except Exception as exc:
                        self._card_exception(exc)
                        engine.power_on_failed(action.token, _why(exc), time.monotonic())
                    else:
                        engine.power_on_done(action.token, atr, time.monotonic())
            elif kind is PowerOff:
                assert isinstance(action, PowerOff)
                self._power_off(slots[action.reader])
            elif kind is Closed:
                assert isinstance(action, Closed)
                close = action
        out = engine.data_to_send()
        if out:
            self._write_locked(out)
        if close is not None:
            self.close_locked()

    def _write_locked(self, data: bytes) -> None:
        if self.dead:
            return
        self._stats.bytes_out += len(data)
        if self._out:  # the peer is behind: keep the order
            self._out += data
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self.lost_locked(exc)
            return
        if sent < len(data):
            self._out += data[sent:]
            self._set_events(_WRITE)  # and stop reading until the peer catches up

    def _flush_locked(self) -> None:
        if self.dead or not self._out:
            return
        try:
            sent = self.sock.send(self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.lost_locked(exc)
            return
        del self._out[:sent]
        if not self._out:
            if self._closing:
                self.lost_locked(None)
            else:
                self._set_events(_READ)

    def _set_events(self, events: int) -> None:
        def apply() -> None:
            if not self.dead:
                self._loop.modify(self.sock, events, self.on_events)

        if self._loop.in_thread():
            apply()
        else:
            self._loop.call_soon(apply)

    def _card_exception(self, exc: BaseException) -> None:
        # Not counted here: the engine counts the failure it is told about next.
        if not isinstance(exc, CcidemuError):
            log.error("session %d: card raised %r", self.handle.sid, exc, exc_info=exc)

    def _in_thread(
        self,
        slot: _Slot,
        call: Callable[[], bytes],
        token: int,
        done: Callable[[int, bytes, float], None],
        failed: Callable[[int, str, float], None],
    ) -> None:
        """Run a blocking card call in the card's thread; its answer is handled in the session
        thread."""
        try:
            future: Future[bytes] = slot.submit(call)
        except RuntimeError:  # shutting down: the card's thread is gone
            failed(token, "the daemon is stopping", time.monotonic())
            return

        def answer() -> None:
            with self._lock:
                if self.dead:
                    return
                exc = future.exception()
                if exc is not None:
                    self._card_exception(exc)
                    failed(token, _why(exc), time.monotonic())
                else:
                    done(token, future.result(), time.monotonic())
                self.pump_locked()

        def finished(_: Future[bytes]) -> None:
            self._loop.call_soon(answer)

        future.add_done_callback(finished)

    def _power_off(self, slot: _Slot) -> None:
        slot.atr = None
        card = slot.card
        try:
            if card.blocking:
                slot.submit(card.power_off)
            else:
                card.power_off()
        except Exception as exc:
            log.warning("session %d: card power-off failed: %s", self.handle.sid, _why(exc))


def _quiet_power_off(card: Card) -> None:
    try:
        card.power_off()
    except Exception as exc:
        log.warning("card power-off failed: %s", _why(exc))


def _power_on(slot: _Slot) -> bytes:
    atr = slot.card.power_on()
    slot.atr = atr
    return atr


def _why(exc: BaseException) -> str:
    if isinstance(exc, CardError):
        return f"card error: {exc}"
    return f"{type(exc).__name__}: {exc}"


def _peer_text(sock: socket.socket) -> str:
    try:
        peer: Any = sock.getpeername()
    except OSError:
        return "local"
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = f"[{peer[0]}]" if ":" in str(peer[0]) else str(peer[0])
        return f"{host}:{peer[1]}"
    return str(peer) if peer else "local"


class Daemon:
    """``ccidemu serve`` in-process: ``await start()``, then ``await run()`` until stopped."""

    def __init__(self, config: ServeConfig) -> None:
        if not config.connect and not config.listen:
            raise ConfigError("nothing to serve: give --connect or --listen")
        self.config = config
        self.stats = _Stats()
        #: Opens the cards of new --listen connections (opening a PIV card takes tens of ms:
        #: never in the session thread).  Blocking cards run in their own threads (_Slot).
        self.opener = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ccidemu-open")
        #: Guards every engine, card slot and connection (see the module docstring).
        self.lock = threading.Lock()
        self.sessions = _SessionLoop()
        self.trace_file: IO[str] | None = None
        self._trace_redactors: dict[tuple[int, int], Redactor] = {}
        self._ids = itertools.count(1)
        self._handles: dict[int, _Handle] = {}
        self._control_server: asyncio.Server | None = None
        self._listeners: list[socket.socket] = []
        self._opening: set[socket.socket] = set()  # accepted; cards being opened (session thread)
        self._unix_paths: list[Path] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stop: asyncio.Event | None = None
        self._stopping = False
        self._closed = False

    # ---------------------------------------------------------------- life cycle

    def _open_cards(self) -> list[_Slot]:
        return [
            _Slot(spec, open_card(spec, self.config.card_options)) for spec in self.config.cards
        ]

    async def start(self) -> None:
        """Open cards, trace, listeners, control socket; start connectors.  ConfigError/OSError."""
        self._stop = asyncio.Event()
        config = self.config
        self.sessions.start()
        probe = self._open_cards()  # fail early on a bad --card
        if config.trace is not None:
            self.trace_file = open_private(config.trace, "trace file")
        try:
            if config.control is not None:
                check_control_path(config.control)
            for address in config.listen:
                self._listen_vm(address)
                log.info("listening on %s", address)
            if config.control is not None:
                await self._listen_control(config.control)
                log.info("control socket on %s", config.control)
            for n, address in enumerate(config.connect):
                slots = probe if n == 0 else self._open_cards()
                handle = _Handle(next(self._ids), "connect", address, slots)
                self._handles[handle.sid] = handle
                log.info("connecting to %s (session %d)", address, handle.sid)
                self._tasks.append(asyncio.create_task(self._connector(handle)))
        except BaseException:
            await self.close()
            raise

    async def run(self) -> None:
        """Serve until :meth:`request_stop`, then shut down in order."""
        assert self._stop is not None, "start() first"
        await self._stop.wait()
        await self.close()

    def request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def close(self) -> None:
        """Remove every card and reader (after responses in flight), close everything."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        if self._control_server is not None:
            self._control_server.close()
        for task in self._tasks:
            task.cancel()
        self.sessions.call_soon(self._close_listeners)
        now = time.monotonic()
        with self.lock:
            live = [h.protocol for h in self._handles.values() if h.protocol is not None]
            for conn in live:
                conn.engine.shutdown(now)
                conn.pump_locked()
        deadline = time.monotonic() + _SHUTDOWN_GRACE
        while time.monotonic() < deadline:
            with self.lock:
                if all(c.engine.finished for c in live):
                    break
            await asyncio.sleep(0.01)
        with self.lock:
            for conn in live:
                conn.close_locked()  # writes what is queued, then closes
        deadline = time.monotonic() + _SHUTDOWN_GRACE
        while any(not c.dead for c in live) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.sessions.stop()
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                path.unlink()
        if self.trace_file is not None:
            self.trace_file.close()
            self.trace_file = None
        self.opener.shutdown(wait=False, cancel_futures=True)
        for handle in self._handles.values():
            for slot in handle.slots:
                slot.retire(power_off=False)
        log.info("stopped")

    # ---------------------------------------------------------------- sockets

    async def _listen_control(self, address: UnixAddress) -> None:
        sock = _bind_unix(address.path)
        self._unix_paths.append(address.path)
        self._control_server = await asyncio.start_unix_server(
            self._control_client, sock=sock, limit=MAX_LINE
        )

    def _listen_vm(self, address: Address) -> None:
        """Listen for VMs: the session thread accepts."""
        if isinstance(address, UnixAddress):
            socks = [_bind_unix(address.path)]
            self._unix_paths.append(address.path)
        else:
            assert isinstance(address, TcpAddress)
            socks = _bind_tcp(address)
            exposed = _beyond_loopback(socks)
            if exposed and not self.config.allow_remote:
                for sock in socks:
                    sock.close()
                raise ConfigError(
                    f"--listen {address} accepts connections from other hosts ({exposed}): any "
                    "host that reaches it gets the cards; listen on 127.0.0.1 or a unix "
                    "socket, or give --allow-remote")
            if exposed:
                log.warning("%s: listening beyond loopback (%s): any host that reaches it "
                            "gets the cards (--allow-remote)", address, exposed)
            else:
                log.info("%s: any local user can connect and act as a VM; a unix socket "
                         "limits that to its owner", address)
        for sock in socks:
            self._listeners.append(sock)
            self.sessions.call_soon(self._register_listener(sock, address))

    def _register_listener(self, sock: socket.socket, address: Address) -> Callable[[], None]:
        def on_accept(events: int) -> None:  # session thread
            while not self._stopping:
                try:
                    conn, _ = sock.accept()
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    log.warning("%s: accept failed: %s", address, exc)
                    return
                conn.setblocking(False)
                set_nodelay(conn)
                # The cards are opened in the opener pool; the connection waits (its bytes
                # stay in the kernel) and starts in the session thread once they are ready.
                self._opening.add(conn)
                sid = next(self._ids)  # in accept order, however long the cards take
                try:
                    future = self.opener.submit(self._open_listen_cards, address)
                except RuntimeError:  # stopping
                    self._opening.discard(conn)
                    conn.close()
                    return
                future.add_done_callback(self._cards_opened(sid, conn, address))

        def register() -> None:
            self.sessions.register(sock, _READ, on_accept)

        return register

    def _close_listeners(self) -> None:  # session thread
        for sock in self._listeners:
            self.sessions.unregister(sock)
            sock.close()
        self._listeners.clear()
        for conn in self._opening:  # accepted, cards still opening: never started
            conn.close()
        self._opening.clear()

    def _open_listen_cards(self, address: Address) -> list[_Slot]:  # opener pool
        try:
            return self._open_cards()
        except Exception as exc:  # a card that cannot be opened now: refuse this VM
            log.error("%s: cannot open the cards for a new session: %s", address, exc)
            return []

    def _cards_opened(
        self, sid: int, conn: socket.socket, address: Address
    ) -> Callable[[Future[list[_Slot]]], None]:
        def start() -> None:  # session thread
            if conn not in self._opening:  # closed by _close_listeners
                return
            self._opening.discard(conn)
            slots = [] if future.cancelled() else future.result()
            if self._stopping or not slots:  # stopping, or the cards failed to open (logged)
                conn.close()
                for slot in slots:
                    slot.retire(power_off=False)
                return
            with self.lock:
                handle = _Handle(sid, "listen", address, slots)
                self._handles[sid] = handle
                proto = _VscConn(self, handle, conn)
            proto.open()

        future: Future[list[_Slot]]

        def done(f: Future[list[_Slot]]) -> None:  # any thread
            nonlocal future
            future = f
            self.sessions.call_soon(start)

        return done

    async def _connector(self, handle: _Handle) -> None:
        loop = asyncio.get_running_loop()
        address = handle.address
        backoff = Backoff()
        waiting_logged = False
        while not self._stopping:
            try:
                sock = await _connect(address)
            except OSError as exc:
                if not waiting_logged:
                    log.info("session %d: waiting for %s (%s)", handle.sid, address,
                             exc.strerror or exc)
                    waiting_logged = True
                await asyncio.sleep(backoff.next())
                continue
            waiting_logged = False
            done: asyncio.Future[None] = loop.create_future()

            def closed(done: asyncio.Future[None] = done) -> None:  # session thread
                with contextlib.suppress(RuntimeError):  # the loop is closed already
                    loop.call_soon_threadsafe(_resolve, done)

            with self.lock:
                proto = _VscConn(self, handle, sock, closed)
            self.sessions.call_soon(proto.open)
            await asyncio.shield(done)
            if self._stopping:
                break
            if proto.engine.handshake_done:  # a real session ended: back soon (QEMU restarted)
                backoff.reset()
                await asyncio.sleep(backoff.start)
                continue
            # The peer hung up before the handshake (accepts, then closes: a busy or broken
            # chardev server): back off as if the connection had been refused.
            delay = backoff.next()
            log.info("session %d: %s closed the connection before the handshake; "
                     "retrying in %.1f s", handle.sid, address, delay)
            await asyncio.sleep(delay)

    # ---------------------------------------------------------------- sessions

    def session_started(self, handle: _Handle) -> None:
        self.stats.sessions += 1
        self.stats.sessions_total += 1
        log.info("session %d: connected (%s %s, peer %s)", handle.sid, handle.mode,
                 handle.address, handle.peer)

    def session_ended(self, handle: _Handle, exc: Exception | None) -> None:
        self.stats.sessions -= 1
        reason = f": {exc}" if exc is not None else ""
        log.info("session %d: disconnected%s", handle.sid, reason)
        if handle.mode == "listen":
            self._handles.pop(handle.sid, None)
            for slot in handle.slots:  # a blocking card powers off in its own thread
                slot.retire(power_off=True)

    def write_trace(self, sid: int, done: ApduDone) -> None:
        f = self.trace_file
        if f is None:
            return
        record = TraceRecord(
            time=time.time() - done.duration,
            session=sid,
            reader=done.reader,
            command=done.command,
            response=done.response,
            duration=done.duration,
            error=done.error,
        )
        try:
            redactor = self._trace_redactors.setdefault(
                (sid, done.reader), Redactor(self.config.trace_secrets))
            f.write(format_record(record, redactor=redactor) + "\n")
            f.flush()
        except OSError as exc:
            log.error("trace file: %s; tracing stopped", exc)
            self.trace_file = None

    # ---------------------------------------------------------------- control

    def describe(self, handle: _Handle) -> dict[str, Any]:
        engine = handle.engine
        infos = engine.readers() if engine is not None else []
        readers = []
        for i, slot in enumerate(handle.slots):
            entry: dict[str, Any] = {
                "reader": i,
                "card": slot.card.name,
                "spec": slot.spec,
            }
            if i < len(infos):
                info = infos[i]
                entry.update(
                    reader_id=info.reader_id, name=info.name, state=str(info.state),
                    present=info.present, inserted=info.inserted, apdus=info.apdu_count,
                )
            else:
                entry.update(
                    reader_id=None, name=f"ccidemu reader {i}", state="offline",
                    present=slot.present, inserted=False, apdus=0,
                )
            readers.append(entry)
        return {
            "session": handle.sid,
            "mode": handle.mode,
            "address": str(handle.address),
            "peer": handle.peer if engine is not None else None,
            "connected": engine is not None,
            "handshake": engine.handshake_done if engine is not None else False,
            "readers": readers,
        }

    def handle_request(self, request: dict[str, Any], peer_uid: int | None = None) -> Any:
        """One control request -> result; ValueError/CcidemuError with the reason.

        ``peer_uid``: the caller's uid (None: in process).  A caller that is not the daemon's
        user may only insert the card specs the daemon was started with.
        """
        card: Card | None = None
        spec = request.get("card")
        if (
            isinstance(spec, str)
            and peer_uid is not None
            and peer_uid != os.geteuid()
            and spec not in self.config.cards
        ):
            raise ValueError(f"card spec {spec!r} is not one this daemon serves; only its own "
                             "user may insert other cards")
        if request.get("cmd") == "insert" and isinstance(spec, str):
            # Open the new card before taking the lock: opening may take long (a PIV card:
            # tens of ms) and the session thread needs the lock for every read.
            card = open_card(spec, self.config.card_options)
        with self.lock:
            return self._request_locked(request, card)

    def _request_locked(self, request: dict[str, Any], card: Card | None) -> Any:
        cmd = request.get("cmd")
        if cmd == "list":
            return [self.describe(h) for h in sorted(self._handles.values(), key=lambda h: h.sid)]
        if cmd == "stats":
            s = self.stats
            return {
                "sessions": s.sessions,
                "sessions_total": s.sessions_total,
                "apdus": s.apdus,
                "bytes_in": s.bytes_in,
                "bytes_out": s.bytes_out,
                "errors": s.errors + sum(
                    h.engine.errors for h in self._handles.values() if h.engine is not None
                ),
                "uptime": round(time.monotonic() - s.started, 3),
            }
        if cmd in ("insert", "remove"):
            sid, index = request.get("session"), request.get("reader", 0)
            if isinstance(sid, bool) or not isinstance(sid, int):
                raise ValueError("'session' must be an integer session id")
            if isinstance(index, bool) or not isinstance(index, int):
                raise ValueError("'reader' must be an integer reader index")
            handle = self._handles.get(sid)
            if handle is None:
                raise ValueError(f"no session {sid}")
            if not 0 <= index < len(handle.slots):
                raise ValueError(f"session {sid} has no reader {index}")
            slot = handle.slots[index]
            engine = handle.engine
            now = time.monotonic()
            if cmd == "remove":
                if engine is not None:
                    engine.remove_card(index, now)
                elif not slot.present:
                    raise ValueError(f"reader {index} has no card")
                slot.present = False
            else:
                spec = request.get("card")
                if spec is not None and not isinstance(spec, str):
                    raise ValueError("'card' must be a card spec string")
                present = engine.readers()[index].present if engine else slot.present
                if present:
                    raise ValueError(f"reader {index} already has a card")
                if spec is not None:
                    assert card is not None  # opened by handle_request, before the lock
                    slot.spec, slot.card, slot.atr = spec, card, None
                if engine is not None:
                    if spec is not None and handle.protocol is not None:
                        handle.protocol.card_changed(index)
                    engine.insert_card(index, now)
                slot.present = True
            if handle.protocol is not None:
                handle.protocol.pump_locked()
            return self.describe(handle)
        raise ValueError(f"unknown command {cmd!r} (list, stats, insert, remove)")

    async def _control_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer_uid = _peer_uid(writer.get_extra_info("socket"))
        try:
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError as exc:
                    line = exc.partial  # the last line without its newline, or b"" at the end
                except asyncio.LimitOverrunError:
                    # Answer, skip the rest of the line and go on: hanging up with the rest
                    # unread would reset the connection and the client would lose the answer.
                    writer.write(encode_line({"ok": False, "error": "request line too long"}))
                    await writer.drain()
                    if await _skip_line(reader):
                        continue
                    break
                if not line:
                    break
                try:
                    result = self.handle_request(decode_line(line), peer_uid)
                    answer: dict[str, Any] = {"ok": True, "result": result}
                except (ValueError, CcidemuError) as exc:
                    answer = {"ok": False, "error": str(exc)}
                except Exception as exc:
                    log.exception("control request failed")
                    answer = {"ok": False, "error": f"internal error: {exc!r}"}
                writer.write(encode_line(answer))
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


async def _skip_line(reader: asyncio.StreamReader) -> bool:
    """Discard input up to and including the next newline; False at the end of the stream."""
    while True:
        try:
            await reader.readuntil(b"\n")
            return True
        except asyncio.LimitOverrunError as exc:
            # (no newline within the limit: drop what is buffered and read on; with a newline
            # beyond it, drop up to it and the next readuntil takes the newline)
            await reader.readexactly(exc.consumed)
        except asyncio.IncompleteReadError:
            return False


def _bind_unix(path: Path) -> socket.socket:
    """A listening unix socket at ``path`` created mode 0600; a stale socket file is replaced."""
    try:
        return _bind_unix_checked(path)
    except OSError as exc:  # lstat or unlink refused (a directory we cannot search)
        raise ConfigError(f"cannot listen on unix:{path}: {exc.strerror or exc}") from None


def _bind_unix_checked(path: Path) -> socket.socket:
    if path.exists() or path.is_symlink():
        mode = path.lstat().st_mode
        if not stat.S_ISSOCK(mode):
            raise ConfigError(f"{path} exists and is not a socket; not replacing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise ConfigError(f"{path}: {exc}") from None
            path.unlink(missing_ok=True)  # stale: nobody listens
        else:
            raise ConfigError(f"{path} is in use by another process")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _umask_lock:
            old = os.umask(0o177)
            try:
                sock.bind(str(path))
            finally:
                os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on unix:{path}: {exc}") from None
    return sock


def _beyond_loopback(socks: list[socket.socket]) -> str:
    """The bound addresses of ``socks`` that are not loopback addresses, joined ("" if none)."""
    exposed = []
    for sock in socks:
        host = sock.getsockname()[0]
        try:
            loopback = ipaddress.ip_address(host.split("%")[0]).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            exposed.append(host)
    return ", ".join(exposed)


def _bind_tcp(address: TcpAddress) -> list[socket.socket]:
    """Listening sockets for every address ``address.host`` resolves to (OSError if none)."""
    socks: list[socket.socket] = []
    try:
        for family, type_, proto, _, sockaddr in socket.getaddrinfo(
            address.host or None, address.port, type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE,
        ):
            sock = socket.socket(family, type_, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            sock.listen(128)
            sock.setblocking(False)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


async def _connect(address: Address) -> socket.socket:
    """A connected non-blocking socket to ``address`` (OSError when nothing answers)."""
    loop = asyncio.get_running_loop()
    targets: list[tuple[int, Any]]
    if isinstance(address, UnixAddress):
        targets = [(socket.AF_UNIX, str(address.path))]
    else:
        assert isinstance(address, TcpAddress)
        infos = await loop.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
        targets = [(info[0], info[4]) for info in infos]
    error: OSError = OSError(errno.EHOSTUNREACH, f"{address}: no address")
    for family, target in targets:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, target)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        set_nodelay(sock)
        return sock
    raise error


def _peer_uid(sock: socket.socket | None) -> int | None:
    """The uid of a unix socket's peer (SO_PEERCRED); None when it cannot be had."""
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
