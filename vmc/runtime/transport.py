"""Byte transports in the loop thread: a stream socket, a listener, a connector.

A transport moves bytes and knows nothing of VSCard (or of SPICE, which will be another
transport under the same channel logic).  Its user is a :class:`StreamProtocol`:

* ``data_received(buffer, nbytes)``: ``buffer[:nbytes]`` arrived; the buffer is shared by
  every transport of the loop and reused at the next read, so copy what is kept;
* ``connection_lost(exc)``: the peer closed (``exc`` None) or the socket failed.

Back-pressure: :meth:`StreamTransport.write` sends at once; what the peer does not take is
kept, and the transport stops reading that peer until it is written (a guest that does not
read its answers cannot make the daemon buffer without bound).  The :class:`Listener`
accepts in the loop; running out of file descriptors (EMFILE/ENFILE) pauses accepting with a
backoff and is logged once per pause, never in a tight loop.  The :class:`Connector` connects
without blocking the loop (name resolution runs in a helper thread), retrying with capped
backoff.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, Protocol

from vmc.addr import Address, TcpAddress, UnixAddress
from vmc.runtime.loop import READ, WRITE, Loop, Timer
from vmc.sockets import Backoff, set_nodelay

__all__ = ["AcceptPause", "Connector", "Listener", "StreamProtocol", "StreamTransport"]

log = logging.getLogger(__name__)

_FD_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class StreamProtocol(Protocol):
    def data_received(self, buffer: bytearray, nbytes: int) -> None: ...

    def connection_lost(self, exc: Exception | None) -> None: ...


class StreamTransport:
    """A connected non-blocking stream socket driven by the loop (loop thread only)."""

    def __init__(self, loop: Loop, sock: socket.socket, protocol: StreamProtocol) -> None:
        self._loop = loop
        self.sock = sock
        self.protocol = protocol
        self.peer = _peer_text(sock)
        self.closed = False
        self.bytes_in = 0
        self.bytes_out = 0
        self._out = bytearray()
        self._closing = False
        self._buffer = loop.read_buffer
        sock.setblocking(False)
        loop.register(sock, READ, self._on_events)

    def set_protocol(self, protocol: StreamProtocol) -> None:
        self.protocol = protocol

    def write(self, data: bytes) -> None:
        if self.closed or not data:
            return
        self.bytes_out += len(data)
        if self._out:  # the peer is behind: keep the order
            self._out += data
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._lost(exc)
            return
        if sent < len(data):
            self._out += data[sent:]
            self._loop.modify(self.sock, WRITE, self._on_events)  # and stop reading

    @property
    def buffered(self) -> int:
        return len(self._out)

    def close(self) -> None:
        """Close once everything written so far has gone out."""
        if self.closed:
            return
        self._closing = True
        if not self._out:
            self._lost(None, notify=False)

    def abort(self) -> None:
        """Close now, dropping unsent output; the protocol is not told."""
        self._lost(None, notify=False)

    def _on_events(self, events: int) -> None:
        if self.closed:
            return
        if events & WRITE:
            self._flush()
            return
        try:
            nbytes = self.sock.recv_into(self._buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(exc)
            return
        if not nbytes:
            self._lost(None)
            return
        self.bytes_in += nbytes
        self.protocol.data_received(self._buffer, nbytes)

    def _flush(self) -> None:
        try:
            sent = self.sock.send(self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(exc)
            return
        del self._out[:sent]
        if not self._out:
            if self._closing:
                self._lost(None, notify=False)
            else:
                self._loop.modify(self.sock, READ, self._on_events)

    def _lost(self, exc: Exception | None, *, notify: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        self._loop.unregister(self.sock)
        with contextlib.suppress(OSError):
            self.sock.close()
        self._out.clear()
        if notify:
            self.protocol.connection_lost(exc)


class AcceptPause:
    """Running out of file descriptors is the process's problem, not one listener's: every
    listener of the loop pauses together, with one log line per pause and a backoff."""

    def __init__(self, loop: Loop) -> None:
        self._loop = loop
        self.listeners: set[Listener] = set()
        self._timer: Timer | None = None
        self._backoff = Backoff(0.05, 5.0)
        self.pauses = 0

    @property
    def paused(self) -> bool:
        return self._timer is not None

    def pause(self, address: Address, exc: OSError) -> None:
        if self._timer is not None:
            return
        self.pauses += 1
        delay = self._backoff.next()
        log.error("cannot accept on %s: %s; pausing new connections on every listener for "
                  "%.2f s (connected VMs are not affected)", address, exc.strerror or exc,
                  delay)
        for listener in self.listeners:
            listener.suspend()
        self._timer = self._loop.call_later(delay, self._resume)

    def accepted(self) -> None:
        if self._timer is None:
            self._backoff.reset()

    def _resume(self) -> None:
        self._timer = None
        for listener in list(self.listeners):
            listener.resume()


def accept_pause(loop: Loop) -> AcceptPause:
    """The loop's one :class:`AcceptPause`."""
    pause = getattr(loop, "_accept_pause", None)
    if pause is None:
        pause = AcceptPause(loop)
        loop._accept_pause = pause  # type: ignore[attr-defined]
    assert isinstance(pause, AcceptPause)
    return pause


class Listener:
    """Accepts connections on listening sockets in the loop (see the module docstring)."""

    def __init__(
        self,
        loop: Loop,
        socks: list[socket.socket],
        address: Address,
        on_accept: Callable[[socket.socket], None],
    ) -> None:
        self._loop = loop
        self.socks = socks
        self.address = address
        self._on_accept = on_accept
        self._pause = accept_pause(loop)
        self.closed = False
        self._registered = False
        for sock in socks:
            sock.setblocking(False)
        self._pause.listeners.add(self)
        if not self._pause.paused:
            self.resume()

    def _callback(self, sock: socket.socket) -> Callable[[int], None]:
        def on_events(events: int) -> None:
            self._accept(sock)

        return on_events

    def suspend(self) -> None:
        if self._registered:
            for sock in self.socks:
                self._loop.unregister(sock)
            self._registered = False

    def resume(self) -> None:
        if not self._registered and not self.closed:
            for sock in self.socks:
                self._loop.register(sock, READ, self._callback(sock))
            self._registered = True

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(64):  # a burst at a time, then let the loop serve everyone else
            if self.closed or not self._registered:
                return
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _FD_ERRORS:
                    self._pause.pause(self.address, exc)
                else:
                    log.warning("%s: accept failed: %s", self.address, exc)
                return
            self._pause.accepted()
            conn.setblocking(False)
            set_nodelay(conn)
            self._on_accept(conn)

    def close(self) -> None:
        self.closed = True
        self.suspend()
        self._pause.listeners.discard(self)
        for sock in self.socks:
            with contextlib.suppress(OSError):
                sock.close()


class Connector:
    """Connects to ``address`` without blocking the loop; retries with capped backoff.

    ``on_connected(sock)`` gets each connected socket; call :meth:`retry` when it is over
    (``handshake``: it did real work, so back soon; else back off as for a refusal).
    """

    def __init__(
        self,
        loop: Loop,
        address: Address,
        resolver: Executor,
        on_connected: Callable[[socket.socket], None],
        label: str,
    ) -> None:
        self._loop = loop
        self.address = address
        self._resolver = resolver
        self._on_connected = on_connected
        self.label = label
        self.backoff = Backoff()
        self.closed = False
        self.waiting_since: float | None = None
        self._sock: socket.socket | None = None
        self._timer: Timer | None = None
        self._waiting_logged = False
        self.last_error: str | None = None

    def start(self) -> None:
        self._attempt()

    def retry(self, *, handshake: bool) -> None:
        if self.closed:
            return
        if handshake:  # a real session ended (QEMU restarted): back soon
            self.backoff.reset()
            delay = self.backoff.start
        else:
            delay = self.backoff.next()
            log.info("%s: %s closed the connection before the handshake; retrying in "
                     "%.1f s", self.label, self.address, delay)
        self._timer = self._loop.call_later(delay, self._attempt)

    def close(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._sock is not None:
            self._loop.unregister(self._sock)
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def _attempt(self) -> None:
        self._timer = None
        if self.closed:
            return
        address = self.address
        if isinstance(address, UnixAddress):
            self._connect([(socket.AF_UNIX, str(address.path))])
            return
        assert isinstance(address, TcpAddress)
        try:
            future = self._resolver.submit(
                socket.getaddrinfo, address.host, address.port, type=socket.SOCK_STREAM)
        except RuntimeError:  # stopping
            return

        def resolved(f: Any) -> None:  # resolver thread
            def apply() -> None:
                if self.closed:
                    return
                exc = f.exception()
                if exc is not None:
                    self._failed(exc)
                    return
                self._connect([(info[0], info[4]) for info in f.result()])

            self._loop.call_soon(apply)

        future.add_done_callback(resolved)

    def _connect(self, targets: list[tuple[int, Any]]) -> None:
        if not targets:
            self._failed(OSError(errno.EHOSTUNREACH, "no address"))
            return
        (family, target), rest = targets[0], targets[1:]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            code = sock.connect_ex(target)
        except OSError as exc:
            code = exc.errno or errno.EIO
        if code == 0:
            self._connected(sock)
            return
        if code not in (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
            sock.close()
            if rest:
                self._connect(rest)
            else:
                self._failed(OSError(code, _strerror(code)))
            return
        self._sock = sock

        def on_ready(events: int) -> None:
            self._loop.unregister(sock)
            self._sock = None
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                sock.close()
                if rest:
                    self._connect(rest)
                else:
                    self._failed(OSError(err, _strerror(err)))
                return
            self._connected(sock)

        self._loop.register(sock, WRITE, on_ready)

    def _connected(self, sock: socket.socket) -> None:
        self._waiting_logged = False
        self.waiting_since = None
        self.last_error = None
        set_nodelay(sock)
        self._on_connected(sock)

    def _failed(self, exc: BaseException) -> None:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        self.last_error = why
        if not self._waiting_logged:
            self.waiting_since = time.monotonic()
            hint = ""
            if isinstance(exc, OSError) and exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                hint = (" (start QEMU with -chardev socket,...,server=on,wait=off for this "
                        "address, or use --listen)")
            log.info("%s: waiting for %s: %s%s; retrying every %.1f s at most", self.label,
                     self.address, why, hint, self.backoff.cap)
            self._waiting_logged = True
        self._timer = self._loop.call_later(self.backoff.next(), self._attempt)


def _strerror(code: int) -> str:
    import os

    return os.strerror(code)


def _peer_text(sock: socket.socket) -> str:
    try:
        peer: Any = sock.getpeername()
    except OSError:
        return "local"
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = f"[{peer[0]}]" if ":" in str(peer[0]) else str(peer[0])
        return f"{host}:{peer[1]}"
    return str(peer) if peer else "local"
