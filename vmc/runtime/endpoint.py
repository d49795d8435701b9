"""VM endpoints: where a VM's chardev is, its readers, and its one live connection.

A :class:`Vm` owns its readers (and so its card state: the same card instances serve every
connection of the VM, so retry counters and blocked PINs hold across reconnects and across
concurrent connection attempts), a :class:`~vmc.runtime.transport.Listener` (QEMU connects,
``listen``) or a :class:`~vmc.runtime.transport.Connector` (QEMU listens, ``connect``), and
at most one *active* channel.

Connection rules (docs/DESIGN.md, "Runtime"):

1. A new connection is a *pending* channel: our Init goes out, nothing touches a card.  It
   has :data:`HANDSHAKE_TIMEOUT` seconds to send its Init; a VM keeps at most
   :data:`MAX_PENDING` pending connections (a new one beyond that evicts the oldest).
2. The first pending channel to finish the handshake while the VM has no active one becomes
   active and gets the readers.  One that finishes while another is active waits on
   *standby* for :data:`STANDBY_TIMEOUT` seconds: if the active one ends meanwhile (QEMU
   restarted and the old connection's end is still on its way), the newest standby channel
   takes over; else it is closed.  So there is one connection at a time per VM: a second
   concurrent connection never gets a second copy of the card, nor more PIN tries.
3. When the active channel ends, the VM's cards are powered off, so the next connection
   meets a reset card: security status (PIN verified, admin) is cleared, retry counters and
   stored objects are kept.  A connector then reconnects (soon after a real session; with
   backoff after a peer that hung up before the handshake).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import socket
import stat
import time
from collections import deque
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, Protocol

from ccidemu.errors import ConfigError
from vmc import systemd
from vmc.addr import TcpAddress, UnixAddress
from vmc.config import SocketOptions, VmConfig
from vmc.runtime.cards import CardHost, Reader
from vmc.runtime.channel import ChannelStats, VscChannel
from vmc.runtime.loop import Loop, Timer
from vmc.runtime.spice_link import SpiceLink, SpiceStream
from vmc.runtime.transport import Connector, Listener, StreamTransport
from vmc.session import ApduDone
from vmc.throttle import LogThrottle

__all__ = ["HANDSHAKE_TIMEOUT", "MAX_PENDING", "STANDBY_TIMEOUT", "Vm", "VmHost",
           "bind_listen_socket"]

log = logging.getLogger(__name__)

#: Seconds a new connection has to send its Init before it is closed.
HANDSHAKE_TIMEOUT = 10.0
#: Connections a VM keeps waiting for their handshake; a new one evicts the oldest.
MAX_PENDING = 8
#: Seconds a connection that finished its handshake waits for the VM's active one to end.
STANDBY_TIMEOUT = 3.0


class VmHost(Protocol):
    """What a VM needs of the daemon."""

    loop: Loop
    host: CardHost
    stats: ChannelStats
    resolver: Executor
    tracing: bool

    def trace(self, vm: Vm, done: ApduDone) -> None: ...

    def trace_power(self, vm: Vm, kind: str, reader: int, atr: bytes | None = None) -> None: ...

    def session_started(self, vm: Vm, channel: VscChannel) -> None: ...

    def session_ended(self, vm: Vm, channel: VscChannel, exc: Exception | None) -> None: ...


class Vm:
    """One VM endpoint (see the module docstring).  Loop thread only."""

    def __init__(self, config: VmConfig, vm_id: int, readers: list[Reader], daemon: VmHost,
                 *, state_lock: Any = None) -> None:
        self.config = config
        self.name = config.name
        self.id = vm_id
        self.readers = readers
        self.daemon = daemon
        self.state_lock = state_lock
        self.channel: VscChannel | None = None
        self.pending: deque[VscChannel] = deque()
        self.standby: deque[VscChannel] = deque()
        self.listener: Listener | None = None
        self.connector: Connector | None = None
        self.spice: SpiceLink | None = None
        self.unix_path: Path | None = None
        self.sessions_total = 0
        self.closed = False
        self.errors_seen = 0
        self.throttle = LogThrottle(log, f"vm {config.name}")
        self._timers: dict[int, Timer] = {}
        self._serial = 0

    # ---------------------------------------------------------------- start and stop

    def start(self, socks: list[socket.socket] | None = None) -> None:
        """Listen (on ``socks``, bound by :func:`bind_listen_socket`) or start connecting."""
        config = self.config
        if config.listen is not None:
            assert socks is not None
            if isinstance(config.listen, UnixAddress) and not systemd.is_passed(socks[0]):
                self.unix_path = config.listen.path  # ours to remove at the end
            self.listener = Listener(self.daemon.loop, socks, config.listen, self._accepted)
            log.info("vm %s: listening on %s", self.name, config.listen)
        elif config.spice is not None:
            self.spice = SpiceLink(self.daemon.loop, config.spice, f"vm {self.name}",
                                   self._spice_session)
            log.info("vm %s: connecting to the SPICE server %s", self.name, config.spice)
            self.spice.start()
        else:
            assert config.connect is not None
            self.connector = Connector(self.daemon.loop, config.connect, self.daemon.resolver,
                                       self._connected, f"vm {self.name}")
            log.info("vm %s: connecting to %s", self.name, config.connect)
            self.connector.start()
        for reader in self.readers:
            self.daemon.host.watch(reader)

    def stop_accepting(self) -> None:
        if self.listener is not None:
            self.listener.close()
        if self.connector is not None:
            self.connector.close()
        if self.spice is not None:
            self.spice.stop_reconnecting()
        for channel in [*self.pending, *self.standby]:
            channel.close()
        self.pending.clear()
        self.standby.clear()

    def begin_shutdown(self) -> None:
        """Stop taking connections; remove the cards from the live session (politely)."""
        self.closed = True
        self.stop_accepting()
        if self.channel is not None:
            self.channel.shutdown()

    @property
    def finished(self) -> bool:
        return self.channel is None or self.channel.finished

    def finish(self) -> None:
        """Close everything (after :meth:`begin_shutdown` and the grace period)."""
        if self.channel is not None:
            self.channel.close()
        if self.spice is not None:
            self.spice.close()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for reader in self.readers:
            self.daemon.host.retire(reader)
        if self.unix_path is not None:
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(self.unix_path.lstat().st_mode):
                    self.unix_path.unlink()
        if self.state_lock is not None:
            self.state_lock.release()
            self.state_lock = None
        self.throttle.flush()

    # ---------------------------------------------------------------- connections

    def _accepted(self, sock: socket.socket) -> None:
        if self.closed:
            sock.close()
            return
        if len(self.pending) >= MAX_PENDING:
            oldest = self.pending.popleft()
            self.throttle.log(time.monotonic(), logging.WARNING,
                               "vm %s: %d connections waiting for their handshake; closing "
                               "the oldest (%s)", self.name, MAX_PENDING + 1, oldest.peer)
            oldest.close()
        self._new_channel(sock)

    def _connected(self, sock: socket.socket) -> None:
        if self.closed:
            sock.close()
            return
        self._new_channel(sock)

    def _new_channel(self, sock: socket.socket) -> None:
        self._serial += 1
        channel = VscChannel(self, self.daemon.host, self.daemon.stats,
                             label=f"vm {self.name}", tracing=self.daemon.tracing,
                             throttle=self.throttle,
                             shape_responses=self.config.usb_ccid_workaround)
        self.pending.append(channel)
        transport = StreamTransport(self.daemon.loop, sock, channel)
        key = id(channel)
        self._timers[key] = self.daemon.loop.call_later(
            HANDSHAKE_TIMEOUT, lambda: self._handshake_timeout(channel))
        channel.attach(transport)

    def _spice_session(self, stream: SpiceStream) -> VscChannel:
        """A SPICE session reached the smartcard channel: a little-endian VSCard channel on
        it (the server sends no Init; the handshake is done at once)."""
        channel = VscChannel(self, self.daemon.host, self.daemon.stats,
                             label=f"vm {self.name}", tracing=self.daemon.tracing,
                             byteorder="little", peer_init=False, throttle=self.throttle,
                             shape_responses=self.config.usb_ccid_workaround)
        self.pending.append(channel)
        channel.attach(stream)  # type: ignore[arg-type]
        return channel

    def _handshake_timeout(self, channel: VscChannel) -> None:
        self._timers.pop(id(channel), None)
        if channel.active or channel.dead:
            return
        self.throttle.log(time.monotonic(), logging.WARNING,
                           "vm %s: %s sent no VSCard Init within %.0f s; closing it",
                           self.name, channel.peer, HANDSHAKE_TIMEOUT)
        channel.close()

    def channel_ready(self, channel: VscChannel) -> bool:
        """The channel finished its handshake: it serves the readers if nobody else does."""
        timer = self._timers.pop(id(channel), None)
        if timer is not None:
            timer.cancel()
        with contextlib.suppress(ValueError):
            self.pending.remove(channel)
        if self.closed:
            return False
        if self.channel is not None:
            self.throttle.log(time.monotonic(), logging.WARNING,
                               "vm %s: a second connection (%s) waits: %s is connected, and "
                               "a VM has one connection at a time", self.name, channel.peer,
                               self.channel.peer)
            self.standby.append(channel)
            self._timers[id(channel)] = self.daemon.loop.call_later(
                STANDBY_TIMEOUT, lambda: self._standby_timeout(channel))
            return True
        self._activate(channel)
        return True

    def _activate(self, channel: VscChannel) -> None:
        self.channel = channel
        self.sessions_total += 1
        self.daemon.session_started(self, channel)
        channel.activate()

    def _standby_timeout(self, channel: VscChannel) -> None:
        self._timers.pop(id(channel), None)
        if channel in self.standby:
            self.standby.remove(channel)
            self.throttle.log(time.monotonic(), logging.WARNING,
                               "vm %s: closing the second connection (%s): the first is "
                               "still connected", self.name, channel.peer)
            channel.close()

    def channel_lost(self, channel: VscChannel, exc: Exception | None) -> None:
        timer = self._timers.pop(id(channel), None)
        if timer is not None:
            timer.cancel()
        with contextlib.suppress(ValueError):
            self.pending.remove(channel)
        with contextlib.suppress(ValueError):
            self.standby.remove(channel)
        if channel is not self.channel:
            if self.connector is not None and not self.closed and self.channel is None:
                self.connector.retry(handshake=False)
            return
        self.channel = None
        self.daemon.session_ended(self, channel, exc)
        for reader in self.readers:
            if reader.plugged:  # the next peer meets a reset card
                self.daemon.host.power_off(reader)
                if self.daemon.tracing:
                    self.daemon.trace_power(self, "off", reader.index)
        while self.standby and not self.closed:  # the newest waiting connection takes over
            successor = self.standby.pop()
            timer = self._timers.pop(id(successor), None)
            if timer is not None:
                timer.cancel()
            if successor.dead:
                continue
            for other in list(self.standby):
                other.close()
            self.standby.clear()
            self._activate(successor)
            return
        if self.connector is not None and not self.closed:
            self.connector.retry(handshake=True)

    def exchange_done(self, channel: VscChannel, done: ApduDone) -> None:
        self.daemon.trace(self, done)

    def power_event(self, channel: VscChannel, kind: str, index: int,
                    atr: bytes | None) -> None:
        self.daemon.trace_power(self, kind, index, atr)

    # ---------------------------------------------------------------- readers

    def add_reader(self, reader: Reader) -> None:
        self.readers.append(reader)
        self.daemon.host.watch(reader)
        if self.channel is not None:
            self.channel.add_reader(reader)

    # ---------------------------------------------------------------- listing

    def describe(self) -> dict[str, Any]:
        channel = self.channel
        infos = channel.engine.readers() if channel is not None else []
        readers = []
        for i, reader in enumerate(self.readers):
            entry: dict[str, Any] = {"reader": i, "card": reader.card.name,
                                     "spec": reader.spec, "name": reader.name}
            if i < len(infos):
                info = infos[i]
                entry.update(reader_id=info.reader_id, state=str(info.state),
                             present=reader.present, inserted=info.inserted,
                             apdus=info.apdu_count, plugged=reader.plugged)
            else:
                entry.update(reader_id=None, state="offline", present=reader.present,
                             inserted=False, apdus=0, plugged=reader.plugged)
            if reader.touch is not None:
                entry["touch"] = str(self.config.touch)
                entry["touch_waiting"] = bool(getattr(reader.touch, "waiting", False))
            readers.append(entry)
        listening = self.listener is not None and not self.listener.closed
        waiting = None
        if self.connector is not None and channel is None:
            waiting = self.connector.last_error
        if self.spice is not None and channel is None:
            waiting = self.spice.fatal or self.spice.last_error
        return {
            "session": self.id,
            "vm": self.name,
            "mode": self.config.mode,
            "address": str(self.config.address),
            "origin": self.config.origin,
            "listening": listening,
            "peer": channel.peer if channel is not None else None,
            "connected": channel is not None,
            "handshake": channel is not None,
            "pending": len(self.pending),
            "standby": len(self.standby),
            "sessions_total": self.sessions_total,
            "buffered": (channel.transport.buffered
                         if channel is not None and channel.transport is not None else 0),
            "waiting": waiting,
            "readers": readers,
        }


# --------------------------------------------------------------------------- listen sockets


def bind_listen_socket(config: VmConfig) -> list[socket.socket]:
    """The listening sockets of ``config.listen``; ConfigError with what to do when it fails.

    A unix socket gets the VM's owner, group and mode (default 0600, owner the daemon's
    user); a stale socket file is replaced, a live one or another file is refused.  A TCP
    address that other hosts can reach is refused unless ``allow_remote``.
    """
    address = config.listen
    assert address is not None
    if isinstance(address, UnixAddress):
        return [_bind_unix(address.path, config.socket)]
    assert isinstance(address, TcpAddress)
    passed = systemd.take_passed((address.host, address.port))
    try:
        socks = [passed] if passed is not None else _bind_tcp(address)
    except OSError as exc:
        hint = " (another process listens there: ccidemu serve already running?)" if (
            exc.errno == errno.EADDRINUSE) else ""
        raise ConfigError(f"cannot listen on {address}: {exc.strerror or exc}{hint}") from None
    exposed = _beyond_loopback(socks)
    if exposed and not config.allow_remote:
        for sock in socks:
            sock.close()
        raise ConfigError(
            f"--listen {address} accepts connections from other hosts ({exposed}): any host "
            "that reaches it gets the cards; listen on 127.0.0.1 or a unix socket, or give "
            "--allow-remote")
    if exposed:
        log.warning("%s: listening beyond loopback (%s): any host that reaches it gets the "
                    "cards (--allow-remote)", address, exposed)
    else:
        log.info("%s: any local user can connect and act as this VM; a unix socket limits "
                 "that to its owner and group", address)
    return socks


def bind_unix(path: Path, options: SocketOptions | None = None) -> socket.socket:
    """A listening unix socket (the control socket's too); see :func:`bind_listen_socket`."""
    return _bind_unix(path, options or SocketOptions())


def _bind_unix(path: Path, options: SocketOptions) -> socket.socket:
    passed = systemd.take_passed(str(path))  # socket activation: systemd made it
    if passed is not None:
        passed.setblocking(False)
        return passed
    try:
        return _bind_unix_checked(path, options)
    except OSError as exc:  # lstat, unlink or chown refused
        raise ConfigError(f"cannot listen on unix:{path}: {exc.strerror or exc}") from None


def _bind_unix_checked(path: Path, options: SocketOptions) -> socket.socket:
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
            raise ConfigError(f"{path} is in use by another process (ccidemu serve already "
                              "running? give each daemon its own --control and addresses)")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Bound under a private umask, then opened up to the asked mode once the owner and
        # group are right: nobody else can connect in between.
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        if options.owner is not None or options.group is not None:
            os.chown(path, -1 if options.owner is None else options.owner,
                     -1 if options.group is None else options.group)
        os.chmod(path, options.mode)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        with contextlib.suppress(OSError):
            path.unlink()
        what = ("set its owner/group (needs root or membership of the group)"
                if exc.errno == errno.EPERM else "bind it")
        raise ConfigError(f"cannot listen on unix:{path}: cannot {what}: "
                          f"{exc.strerror or exc}") from None
    return sock


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
