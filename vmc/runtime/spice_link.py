"""A VM endpoint's SPICE link: :class:`vmc.spice.SpiceTransport` under the runtime's channels.

The SPICE transport runs its own I/O thread (the link handshake, the main channel's pings,
TLS); its callbacks are posted to the loop, where the VSCard bytes reach an ordinary
:class:`~vmc.runtime.channel.VscChannel` (little-endian, ``peer_init=False``: the SPICE
server drops QEMU's Init and never sends one).  :class:`SpiceStream` gives that channel the
face of a stream transport.

Reconnecting is this module's job: a transient failure (the server unreachable, the session
closed, bad bytes, a timeout) is retried with capped backoff, reset after a session that
reached the smartcard channel; a fatal one (a wrong password, no smartcard channel in that
VM, not a SPICE server, TLS problems) stops the endpoint with its reason in ``ctl list``
(docs/PROTOCOL.md, "SPICE").  A refused password is retried for :data:`PASSWORD_GRACE`
seconds first: libvirt starts QEMU without the VM's SPICE password and sets it over QMP a
moment later, and in that window the server refuses every password (docs/DEPLOY.md, "SPICE").
A SPICE session carries one reader: the server attaches one client connection to one
smartcard chardev.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ccidemu.spice import SpiceError, SpiceFailure
from vmc.runtime.loop import Loop, Timer
from vmc.runtime.transport import StreamProtocol
from vmc.sockets import Backoff
from vmc.spice import SpiceTarget, SpiceTransport

__all__ = ["SpiceLink", "SpiceStream"]

log = logging.getLogger(__name__)

#: How long refused passwords in a row are retried before the endpoint gives up (seconds).
PASSWORD_GRACE = 10.0


class SpiceStream:
    """The transport face a channel sees for one SPICE session (loop thread)."""

    def __init__(self, transport: SpiceTransport, peer: str) -> None:
        self._spice = transport
        self.protocol: StreamProtocol | None = None
        self.peer = peer
        self.closed = False

    @property
    def bytes_in(self) -> int:
        return self._spice.bytes_in

    @property
    def bytes_out(self) -> int:
        return self._spice.bytes_out

    @property
    def buffered(self) -> int:
        return self._spice.get_write_buffer_size()

    def write(self, data: bytes) -> None:
        if not self.closed:
            self._spice.write(data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._spice.close()

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self._spice.abort()

    def deliver(self, data: bytes) -> None:
        if not self.closed and self.protocol is not None:
            buffer = bytearray(data)
            self.protocol.data_received(buffer, len(buffer))


class SpiceLink:
    """Keeps one VM's card on its SPICE server (see the module docstring)."""

    def __init__(
        self,
        loop: Loop,
        target: SpiceTarget,
        label: str,
        on_session: Callable[[SpiceStream], StreamProtocol],
    ) -> None:
        self._loop = loop
        self.target = target
        self.label = label
        self._on_session = on_session
        self.backoff = Backoff()
        self.closed = False
        self.last_error: str | None = None
        self.fatal: str | None = None
        self._transport: SpiceTransport | None = None
        self._stream: SpiceStream | None = None
        self._timer: Timer | None = None
        self._reached = False
        self._waiting_logged = False
        self._refused_since: float | None = None  # first of the refused passwords in a row

    def start(self) -> None:
        self._attempt()

    def stop_reconnecting(self) -> None:
        """No new session after the current one (which the VM's shutdown ends politely)."""
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()

    def close(self) -> None:
        self.stop_reconnecting()
        if self._stream is not None:
            self._stream.close()
        elif self._transport is not None:
            self._transport.close()

    # ---------------------------------------------------------------- loop thread

    def _attempt(self) -> None:
        self._timer = None
        if self.closed:
            return
        self._reached = False
        link = self

        class Handler:  # runs on the SPICE I/O thread: everything goes to the loop
            def connection_made(self, transport: SpiceTransport) -> None:
                link._loop.call_soon(lambda: link._made(transport))

            def data_received(self, data: bytes) -> None:
                link._loop.call_soon(lambda: link._data(transport_ref[0], data))

            def connection_lost(self, error: SpiceError | None) -> None:
                link._loop.call_soon(lambda: link._lost(transport_ref[0], error))

        transport = SpiceTransport(self.target, Handler(), name=f"spice[{self.label}]")
        transport_ref = [transport]
        self._transport = transport
        try:
            transport.start()
        except OSError as exc:
            self._lost(transport, None, why=str(exc))

    def _made(self, transport: SpiceTransport) -> None:
        if transport is not self._transport or self.closed:
            transport.close()
            return
        self._reached = True
        self._refused_since = None
        self._waiting_logged = False
        self.last_error = None
        stream = SpiceStream(transport, f"spice session {transport.session_id}")
        self._stream = stream
        stream.protocol = self._on_session(stream)

    def _data(self, transport: SpiceTransport, data: bytes) -> None:
        stream = self._stream
        if stream is not None and transport is self._transport:
            stream.deliver(data)

    def _in_password_grace(self, error: SpiceError | None) -> bool:
        """A refused password, and the first of a run of them less than PASSWORD_GRACE ago."""
        if error is None or error.failure is not SpiceFailure.WRONG_PASSWORD:
            self._refused_since = None
            return False
        now = time.monotonic()
        if self._refused_since is None:
            self._refused_since = now
        return now - self._refused_since < PASSWORD_GRACE

    def _lost(self, transport: SpiceTransport, error: SpiceError | None, *,
              why: str | None = None) -> None:
        if transport is not self._transport:
            return
        stream, self._stream = self._stream, None
        self._transport = None
        if stream is not None:
            stream.closed = True
            if stream.protocol is not None:
                stream.protocol.connection_lost(error)
        if self.closed:
            return
        reason = why or (str(error) if error is not None else "the session ended")
        self.last_error = reason
        if self._in_password_grace(error):
            delay = self.backoff.next()
            log.info("%s: SPICE %s: %s; retrying in %.1f s (for up to %.0f s: libvirt sets the "
                     "password just after QEMU starts)", self.label, self.target, reason, delay,
                     PASSWORD_GRACE)
            self._timer = self._loop.call_later(delay, self._attempt)
            return
        if error is not None and error.fatal:
            self.fatal = reason
            log.error("%s: SPICE: %s; not retrying (fix it, then ctl reload for a VM of the "
                      "config file, or restart ccidemu)", self.label, reason)
            return
        if self._reached:
            self.backoff.reset()
        delay = self.backoff.next()
        if not self._waiting_logged or self._reached:
            log.info("%s: SPICE %s: %s; retrying in %.1f s", self.label, self.target, reason,
                     delay)
            self._waiting_logged = True
        self._timer = self._loop.call_later(delay, self._attempt)
