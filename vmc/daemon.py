"""The asyncio adapter around :class:`vmc.session.VscSession`: ``ccidemu serve``.

Connectors (``--connect``: QEMU is the chardev server; we connect and reconnect with capped
backoff) and listeners (``--listen``: QEMU connects; one new session per connection), one
:class:`~vmc.session.VscSession` per connection, cards per reader, the control socket
(:mod:`vmc.control`), the APDU trace (:mod:`ccidemu.trace`) and orderly shutdown.

Theory of operation
-------------------
Each connection is an :class:`asyncio.Protocol` (:class:`_VscProtocol`): ``data_received``
feeds the engine, then :meth:`_VscProtocol.pump` drains the engine's actions (card requests,
finished exchanges, close) and writes everything the engine queued in one ``write`` (so the
replies to a burst of messages are coalesced).  Emulated cards (``blocking = False``) answer
inline; blocking cards run in one shared thread pool and their answers come back to the loop
through the future's callback.  Routing to readers is a dict lookup inside the engine; nothing
is scanned per message.

For ``--connect`` the same card instances serve every reconnection to that address (it is the
same VM, and QEMU keeps the card "present" in the guest while the chardev is down): the ATR is
cached and the card is not reset.  For ``--listen`` every connection gets fresh cards.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import itertools
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

from ccidemu.card import Card
from ccidemu.cards import CardOptions, open_card
from ccidemu.errors import CardError, CcidemuError, ConfigError
from ccidemu.trace import TraceRecord, format_record
from vmc.addr import Address, TcpAddress, UnixAddress
from vmc.control import MAX_LINE, check_control_path, decode_line, encode_line
from vmc.session import ApduDone, Closed, PowerOff, PowerOn, Transmit, VscSession

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

_BACKOFF_START = 0.1
_BACKOFF_MAX = 2.0
_SHUTDOWN_GRACE = 3.0  # seconds to wait for responses in flight at shutdown
_umask_lock = threading.Lock()


@dataclass
class ServeConfig:
    connect: list[Address] = field(default_factory=list)
    listen: list[Address] = field(default_factory=list)
    cards: list[str] = field(default_factory=lambda: [DEFAULT_CARD])
    control: Address | None = None
    trace: Path | None = None
    trace_secrets: bool = False
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

    __slots__ = ("atr", "card", "present", "spec")

    def __init__(self, spec: str, card: Card) -> None:
        self.spec = spec
        self.card = card
        self.atr: bytes | None = None  # cached power-on answer (card powered)
        self.present = True


class _Handle:
    """One VM connection point: a connector (kept across reconnects) or an accepted connection."""

    def __init__(self, sid: int, mode: str, address: Address, slots: list[_Slot]) -> None:
        self.sid = sid
        self.mode = mode
        self.address = address
        self.slots = slots
        self.peer: str | None = None
        self.protocol: _VscProtocol | None = None

    @property
    def engine(self) -> VscSession | None:
        return self.protocol.engine if self.protocol is not None else None


class _VscProtocol(asyncio.BufferedProtocol):
    def __init__(self, daemon: Daemon, handle: _Handle) -> None:
        self.daemon = daemon
        self.handle = handle
        self.transport: asyncio.Transport | None = None
        self.engine = VscSession(
            [f"ccidemu reader {i}" for i in range(len(handle.slots))],
            present=[s.present for s in handle.slots],
            label=f"session {handle.sid}",
            report_exchanges=daemon.trace_file is not None,
        )
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._stats = daemon.stats
        self._dead = False
        # BufferedProtocol: the transport reads into this buffer (no allocation per read)
        self._buffer = bytearray(1 << 16)
        self._view = memoryview(self._buffer)

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (not necessarily an asyncio.Transport subclass: uvloop's are not)
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.handle.peer = _peer_text(peer)
        self.handle.protocol = self
        self.daemon.session_started(self.handle)
        self.engine.start(time.monotonic())
        self.pump()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        self._stats.bytes_in += nbytes
        self.engine.receive_data(self._view[:nbytes], time.monotonic())
        self.pump()

    def connection_lost(self, exc: Exception | None) -> None:
        self._dead = True
        self.engine.connection_lost()
        if self.handle.protocol is self:
            self.handle.protocol = None
        self.daemon.session_ended(self.handle, exc)
        if not self.done.done():
            self.done.set_result(None)

    def pause_writing(self) -> None:  # the peer does not read: stop reading from it too
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self._dead:
            self.transport.resume_reading()

    # -- engine plumbing

    def pump(self) -> None:
        engine = self.engine
        slots = self.handle.slots
        close: Closed | None = None
        while (action := engine.next_action()) is not None:
            kind = type(action)
            if kind is Transmit:
                assert isinstance(action, Transmit)
                self._stats.apdus += 1
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
                        card.transmit, action.apdu, action.token,
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
                        functools.partial(_power_on_arg, slot), b"", action.token,
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
        transport = self.transport
        if out and transport is not None and not self._dead:
            self._stats.bytes_out += len(out)
            transport.write(out)
        if close is not None and transport is not None:
            if close.error:
                self._stats.errors += 1
            transport.close()

    def _card_exception(self, exc: Exception) -> None:
        self._stats.errors += 1
        if not isinstance(exc, CcidemuError):
            log.error("session %d: card raised %r", self.handle.sid, exc, exc_info=exc)

    def _in_thread(
        self,
        func: Callable[[bytes], bytes],
        arg: bytes,
        token: int,
        done: Callable[[int, bytes, float], None],
        failed: Callable[[int, str, float], None],
    ) -> None:
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self.daemon.executor, func, arg)

        def finished(fut: asyncio.Future[bytes]) -> None:
            if self._dead:
                return
            exc = fut.exception()
            if exc is not None:
                self._card_exception(exc if isinstance(exc, Exception) else Exception(exc))
                failed(token, _why(exc), time.monotonic())
            else:
                done(token, fut.result(), time.monotonic())
            self.pump()

        future.add_done_callback(finished)

    def _power_off(self, slot: _Slot) -> None:
        slot.atr = None
        card = slot.card
        try:
            if card.blocking:
                self.daemon.executor.submit(card.power_off)
            else:
                card.power_off()
        except Exception as exc:
            log.warning("session %d: card power-off failed: %s", self.handle.sid, _why(exc))


def _power_on(slot: _Slot) -> bytes:
    atr = slot.card.power_on()
    slot.atr = atr
    return atr


def _power_on_arg(slot: _Slot, _unused: bytes) -> bytes:
    return _power_on(slot)


def _why(exc: BaseException) -> str:
    if isinstance(exc, CardError):
        return f"card error: {exc}"
    return f"{type(exc).__name__}: {exc}"


def _peer_text(peer: Any) -> str:
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
        self.executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="ccidemu-card")
        self.trace_file: IO[str] | None = None
        self._ids = itertools.count(1)
        self._handles: dict[int, _Handle] = {}
        self._servers: list[asyncio.Server] = []
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
        probe = self._open_cards()  # fail early on a bad --card
        if config.trace is not None:
            try:
                self.trace_file = config.trace.open("a", encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"cannot open trace file {config.trace}: {exc}") from None
        try:
            for address in config.listen:
                await self._listen(address, self._accept_factory(address))
                log.info("listening on %s", address)
            if config.control is not None:
                check_control_path(config.control)
                await self._listen(config.control, None)
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
        for server in self._servers:
            server.close()
        for task in self._tasks:
            task.cancel()
        now = time.monotonic()
        live = [h.protocol for h in self._handles.values() if h.protocol is not None]
        for proto in live:
            proto.engine.shutdown(now)
            proto.pump()
        deadline = time.monotonic() + _SHUTDOWN_GRACE
        while any(not p.engine.finished for p in live) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for proto in live:
            if proto.transport is not None:
                proto.transport.close()  # writes what is buffered, then closes
        if live:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(p.done for p in live)), timeout=_SHUTDOWN_GRACE
                )
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                path.unlink()
        if self.trace_file is not None:
            self.trace_file.close()
            self.trace_file = None
        self.executor.shutdown(wait=False, cancel_futures=True)
        log.info("stopped")

    # ---------------------------------------------------------------- sockets

    async def _listen(
        self, address: Address, factory: Callable[[], asyncio.BaseProtocol] | None
    ) -> None:
        loop = asyncio.get_running_loop()
        server: asyncio.Server
        if isinstance(address, UnixAddress):
            sock = _bind_unix(address.path)
            self._unix_paths.append(address.path)
            if factory is None:
                server = await asyncio.start_unix_server(
                    self._control_client, sock=sock, limit=MAX_LINE
                )
            else:
                server = await loop.create_unix_server(factory, sock=sock)
        else:
            assert isinstance(address, TcpAddress)
            if factory is None:
                server = await asyncio.start_server(
                    self._control_client, address.host, address.port, limit=MAX_LINE
                )
            else:
                server = await loop.create_server(factory, address.host, address.port)
        self._servers.append(server)

    def _accept_factory(self, address: Address) -> Callable[[], asyncio.BaseProtocol]:
        def factory() -> asyncio.BaseProtocol:
            try:
                slots = self._open_cards()
            except Exception as exc:  # a card that cannot be opened now: refuse this VM
                log.error("%s: cannot open the cards for a new session: %s", address, exc)
                slots = []
            handle = _Handle(next(self._ids), "listen", address, slots)
            self._handles[handle.sid] = handle
            return _VscProtocol(self, handle)

        return factory

    async def _connector(self, handle: _Handle) -> None:
        loop = asyncio.get_running_loop()
        address = handle.address
        delay = _BACKOFF_START
        waiting_logged = False
        while not self._stopping:
            def factory() -> _VscProtocol:
                return _VscProtocol(self, handle)

            proto: _VscProtocol
            try:
                if isinstance(address, UnixAddress):
                    _, proto = await loop.create_unix_connection(factory, str(address.path))
                else:
                    assert isinstance(address, TcpAddress)
                    _, proto = await loop.create_connection(factory, address.host, address.port)
            except OSError as exc:
                if not waiting_logged:
                    log.info("session %d: waiting for %s (%s)", handle.sid, address,
                             exc.strerror or exc)
                    waiting_logged = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)
                continue
            waiting_logged = False
            delay = _BACKOFF_START
            await asyncio.shield(proto.done)
            if not self._stopping:
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
            for slot in handle.slots:
                with contextlib.suppress(Exception):
                    slot.card.power_off()

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
            f.write(format_record(record, secrets=self.config.trace_secrets) + "\n")
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

    def handle_request(self, request: dict[str, Any]) -> Any:
        """One control request -> result; ValueError/CcidemuError with the reason."""
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
                    new = _Slot(spec, open_card(spec, self.config.card_options))
                    slot.spec, slot.card, slot.atr = new.spec, new.card, None
                if engine is not None:
                    engine.insert_card(index, now)
                slot.present = True
            if handle.protocol is not None:
                handle.protocol.pump()
            return self.describe(handle)
        raise ValueError(f"unknown command {cmd!r} (list, stats, insert, remove)")

    async def _control_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(encode_line({"ok": False, "error": "request line too long"}))
                    break
                if not line:
                    break
                try:
                    result = self.handle_request(decode_line(line))
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


def _bind_unix(path: Path) -> socket.socket:
    """A listening unix socket at ``path`` created mode 0600; a stale socket file is replaced."""
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
