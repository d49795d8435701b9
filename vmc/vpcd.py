"""The vpcd bridge: connects one card to vsmartcard's vpcd so the host's pcscd sees it.

The protocol lives in :mod:`ccidemu.vpcd` (sans-I/O); this module only does the socket work:
connect to vpcd (TCP, by default 127.0.0.1:35963 = reader "Virtual PCD 00 00"), feed what
arrives to a :class:`~ccidemu.vpcd.VpcdConnection`, let a :class:`~ccidemu.vpcd.VpcdCardSlot`
answer, and reconnect with exponential backoff whenever pcscd (and with it vpcd) goes away.
The card object, and so its state, lives across reconnects.  A card that cannot power on
for vpcd's first GET ATR has no ATR to answer with; the bridge closes the connection (pcscd
then sees an empty reader: docs/PROTOCOL.md, "vpcd"), says so once, and tries again with
backoff at each reconnection.

Latency (docs/PROTOCOL.md, "vpcd"): Debian 12's vpcd writes the length and the APDU in two
``send()`` calls; with Nagle on its side and delayed ACKs on ours every APDU stalls about
40 ms.  The card's socket therefore sets ``TCP_NODELAY`` and re-arms ``TCP_QUICKACK`` (which
Linux clears again after a while) before every ``recv``.

Stopping: :meth:`VpcdBridge.stop` (thread-safe) wakes the loop through a self-pipe; the
command installs SIGINT/SIGTERM handlers that call it.

Tracing (``--trace``): a :class:`~ccidemu.traces.writer.TraceWriter` gets every exchange
(command, response, time to answer) and the power events vpcd asks for (power on and
reset with the ATR, power off; the first GET ATR of a fresh card, which powers it on, as a
power on).  pcscd's GET ATR presence polls (about every 400 ms) are not recorded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
import time

from ccidemu.card import Card
from ccidemu.errors import ConfigError, DecodeError
from ccidemu.traces.model import PowerKind
from ccidemu.traces.writer import TraceWriter
from ccidemu.vpcd import (
    GetAtr,
    NoCard,
    PowerOff,
    PowerOn,
    Reset,
    Transmit,
    VpcdCardSlot,
    VpcdConnection,
    VpcdEvent,
    describe_event,
)
from vmc.addr import Address, TcpAddress, connect
from vmc.sockets import BACKOFF_MAX, BACKOFF_START, Backoff, set_nodelay

__all__ = ["DEFAULT_VPCD_ADDRESS", "VpcdBridge"]

log = logging.getLogger(__name__)

#: vsmartcard-vpcd's reader.conf: DEVICENAME /dev/null:0x8C7B, reader "Virtual PCD 00 00".
DEFAULT_VPCD_ADDRESS = TcpAddress("127.0.0.1", 35963)

_RECV_SIZE = 65536 + 2


def _quickack(sock: socket.socket) -> None:
    quickack = getattr(socket, "TCP_QUICKACK", None)
    if quickack is not None:
        with contextlib.suppress(OSError):  # not every stack has it
            sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)


def tune_socket(sock: socket.socket) -> None:
    """TCP_NODELAY and TCP_QUICKACK on the card's socket (the 40 ms trap)."""
    set_nodelay(sock)
    _quickack(sock)


class VpcdBridge:
    """One card, one vpcd reader.  ``run()`` blocks until ``stop()``.

    ``backoff_initial``/``backoff_max``: seconds between connection attempts, doubling from
    the first to the second while vpcd stays unreachable or hangs up before asking anything.
    """

    def __init__(
        self,
        card: Card,
        address: Address = DEFAULT_VPCD_ADDRESS,
        *,
        backoff_initial: float = BACKOFF_START,
        backoff_max: float = BACKOFF_MAX,
        trace: TraceWriter | None = None,
    ) -> None:
        if not isinstance(address, TcpAddress):
            raise ConfigError(f"vpcd listens on TCP; {address} is not a tcp:HOST:PORT address")
        self.address = address
        self.slot = VpcdCardSlot(card)
        self.trace = trace
        self.trace_reader = f"vpcd {address}"
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        #: Completed connections (a test can wait for a reconnect with it).
        self.connections = 0
        #: Requests from vpcd answered, over all connections.
        self.requests = 0
        self._sock: socket.socket | None = None
        self._no_card: str | None = None  # why the last connection ended: no ATR to give
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

    @property
    def card(self) -> Card:
        return self.slot.card

    @property
    def sock(self) -> socket.socket | None:
        """The socket to vpcd while connected (for inspection), else None."""
        return self._sock

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected to vpcd (True) or ``timeout`` seconds pass (False)."""
        return self._connected.wait(timeout)

    def stop(self) -> None:
        """Make ``run()`` return soon.  Safe from signal handlers and other threads."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def close(self) -> None:
        """Release the wake-up pipe (after ``run()`` returned)."""
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _sleep(self, seconds: float) -> None:
        readable, _, _ = select.select([self._wake_r], [], [], seconds)
        if readable:
            os.read(self._wake_r, 64)

    def _connect(self) -> socket.socket:
        sock = connect(self.address, timeout=5.0)
        sock.settimeout(None)
        tune_socket(sock)
        return sock

    def run(self) -> None:
        """Connect, serve, reconnect; return after ``stop()``."""
        backoff = Backoff(self.backoff_initial, self.backoff_max)
        trouble_logged = False  # warned that vpcd is unreachable or hangs up at once
        card_logged = False  # said that the card does not power on
        while not self._stopping.is_set():
            try:
                sock = self._connect()
            except OSError as exc:
                if not trouble_logged:
                    log.warning("vpcd at %s not reachable (%s); retrying until it is",
                                self.address, exc.strerror or exc)
                    trouble_logged = True
                self._sleep(backoff.next())
                continue
            self.connections += 1
            log.info("connected to vpcd at %s: card %s inserted", self.address, self.card.name)
            self._sock = sock
            self._connected.set()
            requests = self.requests
            try:
                reason = self._serve(sock)
            finally:
                self._connected.clear()
                self._sock = None
                sock.close()
            if self._stopping.is_set():
                break
            no_card, self._no_card = self._no_card, None
            if no_card is not None:  # pcscd sees an empty reader until the card powers on
                if not card_logged:
                    log.error("%s; pcscd sees no card in the reader; trying again at each "
                              "reconnection (every %.1f s at most)", no_card, backoff.cap)
                    card_logged = True
                self._sleep(backoff.next())
                continue
            card_logged = False
            if self.requests > requests:  # a real connection ended (pcscd restarted): back soon
                backoff.reset()
                trouble_logged = False
                log.warning("vpcd connection lost (%s); reconnecting", reason)
                self._sleep(backoff.start)
                continue
            # vpcd hung up before asking anything (accepts, then closes): back off as if
            # it had refused the connection.
            if not trouble_logged:
                log.warning("vpcd at %s closed the connection before any request (%s); "
                            "retrying until it asks", self.address, reason)
                trouble_logged = True
            self._sleep(backoff.next())
        log.info("vpcd bridge stopped")

    def _traced(self, event: VpcdEvent) -> bytes:
        """``slot.handle(event)``, recorded in the trace."""
        trace = self.trace
        assert trace is not None
        before = self.slot.atr
        started = time.time()
        clock = time.perf_counter()
        reply = self.slot.handle(event)
        took = time.perf_counter() - clock
        reader = self.trace_reader
        if isinstance(event, Transmit):
            trace.exchange(event.apdu, reply[2:], reader=reader, duration=took, at=started)
        elif isinstance(event, PowerOn | Reset):
            kind = PowerKind.ON if isinstance(event, PowerOn) else PowerKind.RESET
            trace.power(kind, reader=reader, atr=self.slot.atr, at=started)
        elif isinstance(event, PowerOff):
            trace.power(PowerKind.OFF, reader=reader, at=started)
        elif isinstance(event, GetAtr) and before is None and self.slot.atr is not None:
            trace.power(PowerKind.ON, reader=reader, atr=self.slot.atr, at=started)
        return reply

    def _serve(self, sock: socket.socket) -> str:
        """Answer vpcd until the connection ends; the reason it ended."""
        conn = VpcdConnection()
        while True:
            readable, _, _ = select.select([sock.fileno(), self._wake_r], [], [])
            if self._wake_r in readable:
                os.read(self._wake_r, 64)
                if self._stopping.is_set():
                    return "stopping"
            if sock.fileno() not in readable:
                continue
            _quickack(sock)
            try:
                data = sock.recv(_RECV_SIZE)
            except OSError as exc:
                return f"receive failed: {exc.strerror or exc}"
            if not data:
                return "closed by vpcd"
            try:
                conn.receive_data(data)
                while (event := conn.next_event()) is not None:
                    traced = self.trace is not None
                    reply = self._traced(event) if traced else self.slot.handle(event)
                    self.requests += 1
                    if log.isEnabledFor(logging.DEBUG):
                        log.debug("vpcd %s -> %d bytes", describe_event(event), len(reply))
                    if reply:
                        sock.sendall(reply)
                    _quickack(sock)
            except NoCard as exc:  # no ATR to give: closing is how vpcd learns "no card"
                self._no_card = str(exc)
                return str(exc)
            except DecodeError as exc:
                return f"bad frame from vpcd: {exc}"
            except OSError as exc:
                return f"send failed: {exc.strerror or exc}"
