"""The SPICE transport: one SPICE session's smartcard channel as a VSCard byte pipe.

The protocol is :mod:`ccidemu.spice` (sans-I/O); this module does the socket work, and only
that: TCP connections to QEMU's SPICE server (TLS when a TLS port is given), the main channel
and then the smartcard channel of the same session, answering the server's pings on both, and
handing the *VSCard byte stream* of the smartcard channel (little-endian) to a handler.  It
knows nothing of cards or of VSCard beyond where one message ends: run
:class:`vmc.session.VscSession` with ``byteorder="little", peer_init=False`` on top of it
(docs/PROTOCOL.md, "SPICE").

Shape (asyncio's transport/protocol pair, on a thread): :class:`SpiceTransport` runs its own
I/O thread.  The handler's :meth:`~SpiceTransportHandler.connection_made` is called once the
smartcard channel is up, :meth:`~SpiceTransportHandler.data_received` with VSCard bytes,
:meth:`~SpiceTransportHandler.connection_lost` exactly once at the end (``None`` after
:meth:`SpiceTransport.close`, else the :class:`~ccidemu.spice.SpiceError` that ended it; a
failure to connect ends it too, without ``connection_made``).  All three run on the I/O
thread.  :meth:`~SpiceTransport.write`, :meth:`~SpiceTransport.close`,
:meth:`~SpiceTransport.abort`, :meth:`~SpiceTransport.pause_reading` and
:meth:`~SpiceTransport.resume_reading` may be called from any thread, the handler's included.

One transport is one session attempt: reconnecting is the owner's job (a new transport), after
a pause, when the error is not :attr:`~ccidemu.spice.SpiceError.fatal`.

TLS (``tls_port``): the certificate is checked against ``ca_file`` (else the system's CAs) and
the host name, or, with ``host_subject`` (spice-gtk's ``--spice-host-subject``, e.g.
``"C=IL, L=Raanana, O=Red Hat, CN=my server"``), against that subject instead of the name.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ccidemu.errors import ConfigError
from ccidemu.spice import (
    MAX_PASSWORD_LENGTH,
    OpenSmartcardChannel,
    ServerNotice,
    SessionClosed,
    SmartcardReady,
    SpiceChannelType,
    SpiceError,
    SpiceFailure,
    SpiceSmartcardClient,
    VscData,
)
from vmc.addr import split_host_port
from vmc.sockets import set_nodelay

__all__ = [
    "ONE_READER_HELP",
    "SPICE_OPTION_KEYS",
    "SpiceTarget",
    "SpiceTransport",
    "SpiceTransportHandler",
    "add_spice_arguments",
    "check_one_card",
    "make_tls_context",
    "match_host_subject",
    "parse_host_subject",
    "parse_spice_address",
    "read_password_file",
    "target_from_args",
]

log = logging.getLogger(__name__)

MAIN = SpiceChannelType.MAIN
SMARTCARD = SpiceChannelType.SMARTCARD

#: What --help and errors say about readers (docs/PROTOCOL.md, "SPICE": one reader a session).
ONE_READER_HELP = (
    "A SPICE session carries exactly one reader: spice-server attaches a client to the first "
    "free spicevmc smartcard chardev, a second ReaderAdd adds no reader, and QEMU 7.2 does not "
    "start with two spicevmc smartcard chardevs."
)

_RECV_SIZE = 1 << 18
_CONNECT_TIMEOUT = 10.0
_SEND_TIMEOUT = 30.0


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpiceTarget:
    """Where a SPICE server listens and how to log in.  ``password`` never shows in repr."""

    host: str
    port: int | None = None
    tls_port: int | None = None
    ca_file: Path | None = None
    host_subject: str | None = None
    password: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if self.port is None and self.tls_port is None:
            raise ConfigError("a SPICE server needs a port or a TLS port")
        for name, port in (("port", self.port), ("TLS port", self.tls_port)):
            if port is not None and not 0 < port <= 65535:
                raise ConfigError(f"SPICE {name} {port} is out of range")
        if len(self.password.encode("utf-8")) > MAX_PASSWORD_LENGTH:
            raise ConfigError(f"SPICE passwords are at most {MAX_PASSWORD_LENGTH} bytes")
        if self.tls_port is None and (self.ca_file is not None or self.host_subject):
            raise ConfigError("a CA file or host subject needs a SPICE TLS port")
        if self.host_subject is not None:
            parse_host_subject(self.host_subject)

    @property
    def tls(self) -> bool:
        """Both channels go over TLS when a TLS port is given."""
        return self.tls_port is not None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"spice://{host}:{self.tls_port if self.tls else self.port}" + (
            " (TLS)" if self.tls else "")


def parse_spice_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[HOST]:PORT``) into (host, port); ConfigError otherwise."""
    return split_host_port(text, f"SPICE address {text!r}", "HOST:PORT", min_port=1)


def read_password_file(path: Path) -> str:
    """The SPICE password in ``path`` (one trailing newline dropped); ConfigError otherwise.

    A file that others may read or write is used, with a warning: it should be private.
    """
    try:
        with path.open("rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            data = file.read()
    except OSError as exc:
        raise ConfigError(f"cannot read the SPICE password file {path}: "
                          f"{exc.strerror or exc}") from None
    if mode & 0o077:
        log.warning("the SPICE password file %s is mode %04o: it should be private to its "
                    "owner (chmod 600 %s)", path, mode & 0o7777, path)
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    try:
        password = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"the SPICE password file {path} is not UTF-8 text") from None
    if "\n" in password or "\0" in password:
        raise ConfigError(f"the SPICE password file {path} must hold one line")
    if len(data) > MAX_PASSWORD_LENGTH:
        raise ConfigError(f"the SPICE password in {path} is longer than {MAX_PASSWORD_LENGTH} "
                          "bytes (the most a SPICE server accepts)")
    return password


def add_spice_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--spice*`` options of ``ccidemu serve`` (see :func:`target_from_args`)."""
    group = parser.add_argument_group(
        "SPICE smartcard channel",
        "Serve the card to a VM whose smartcard chardev is SPICE's (-chardev "
        "spicevmc,name=smartcard; libvirt <smartcard mode='passthrough' type='spicevmc'/>) by "
        "connecting to its SPICE server as a headless client. " + ONE_READER_HELP + " Example: "
        "--spice 127.0.0.1:5930 --spice-password-file /etc/ccidemu/vm1.spice --card piv:",
    )
    group.add_argument("--spice", metavar="HOST:PORT",
                       help="the SPICE server (QEMU -spice port=PORT,addr=HOST)")
    group.add_argument("--spice-tls-port", type=int, metavar="PORT",
                       help="its TLS port (QEMU -spice tls-port=PORT); both channels then use "
                       "TLS")
    group.add_argument("--spice-ca-file", type=Path, metavar="FILE",
                       help="CA certificate(s) that signed the server's (default: the "
                       "system's CAs)")
    group.add_argument("--spice-host-subject", metavar="SUBJECT",
                       help="check the server certificate's subject instead of the host name, "
                       "e.g. 'C=IL, L=Raanana, O=Red Hat, CN=my server'")
    group.add_argument("--spice-password-file", type=Path, metavar="FILE",
                       help="file holding the SPICE password (QEMU password-secret); none "
                       "when the server has disable-ticketing=on")


#: The options (and config keys) that only a SPICE endpoint takes, besides ``spice`` itself.
SPICE_OPTION_KEYS = ("spice_tls_port", "spice_ca_file", "spice_host_subject",
                     "spice_password_file")


def target_from_args(args: argparse.Namespace) -> SpiceTarget | None:
    """The :class:`SpiceTarget` of parsed ``--spice*`` options (None without ``--spice``)."""
    if args.spice is None:
        given = [name for name in SPICE_OPTION_KEYS if getattr(args, name, None) is not None]
        if given:
            raise ConfigError("--" + given[0].replace("_", "-") + " needs --spice HOST:PORT")
        return None
    host, port = parse_spice_address(args.spice)
    password = ""
    if args.spice_password_file is not None:
        password = read_password_file(args.spice_password_file)
    tls_port = args.spice_tls_port
    return SpiceTarget(host, port, tls_port, args.spice_ca_file, args.spice_host_subject,
                       password)


def check_one_card(cards: Sequence[str], where: str = "--spice") -> None:
    """ConfigError unless exactly one card is given for a SPICE endpoint."""
    if len(cards) > 1:
        raise ConfigError(f"{where}: {len(cards)} cards given, but {ONE_READER_HELP[0].lower()}"
                          f"{ONE_READER_HELP[1:]} Give one --card.")


# ---------------------------------------------------------------------------------------------
# TLS
# ---------------------------------------------------------------------------------------------

_SUBJECT_KEYS = {
    "C": "countryName", "ST": "stateOrProvinceName", "L": "localityName",
    "O": "organizationName", "OU": "organizationalUnitName", "CN": "commonName",
    "EMAILADDRESS": "emailAddress", "E": "emailAddress", "DC": "domainComponent",
    "SN": "surname", "GN": "givenName", "SERIALNUMBER": "serialNumber",
}


def parse_host_subject(text: str) -> tuple[tuple[str, str], ...]:
    """``"C=IL, L=Raanana, O=Red Hat, CN=x"`` into ((long name, value), ...) in that order.

    Commas inside a value are written ``\\,`` (spice-gtk's syntax).  ConfigError on a part
    without ``=`` or with an unknown key.
    """
    parts: list[str] = []
    current = ""
    escaped = False
    for char in text:
        if escaped:
            current += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ",":
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    out: list[tuple[str, str]] = []
    for part in parts:
        key, eq, value = part.strip().partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"SPICE host subject {text!r}: {part.strip()!r} is not KEY=VALUE")
        name = _SUBJECT_KEYS.get(key.strip().upper())
        if name is None:
            raise ConfigError(f"SPICE host subject {text!r}: unknown key {key.strip()!r} (use "
                              f"{', '.join(sorted(k for k in _SUBJECT_KEYS if len(k) <= 2))})")
        out.append((name, value.strip()))
    return tuple(out)


def match_host_subject(cert: Mapping[str, object], expected: str) -> bool:
    """Does the subject of ``cert`` (``SSLSocket.getpeercert()``) equal ``expected``?"""
    subject = cert.get("subject", ())
    got: list[tuple[str, str]] = []
    if isinstance(subject, tuple):
        for rdn in subject:
            for pair in rdn:
                if isinstance(pair, tuple) and len(pair) == 2:
                    got.append((str(pair[0]), str(pair[1])))
    return tuple(got) == parse_host_subject(expected)


def make_tls_context(target: SpiceTarget) -> ssl.SSLContext:
    """A client context: certificate required; host name checked unless a subject is given."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if target.ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(target.ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the SPICE CA file {target.ca_file}: {exc}") from None
    if target.host_subject is not None:
        context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    return context


# ---------------------------------------------------------------------------------------------
# The transport
# ---------------------------------------------------------------------------------------------


class SpiceTransportHandler(Protocol):
    """What the owner of a :class:`SpiceTransport` implements (called on its I/O thread)."""

    def connection_made(self, transport: SpiceTransport) -> None:
        """The smartcard channel is up: start the VSCard session, write its bytes."""

    def data_received(self, data: bytes) -> None:
        """VSCard bytes from the server (whole messages, little-endian)."""

    def connection_lost(self, error: SpiceError | None) -> None:
        """The end, exactly once: None after :meth:`SpiceTransport.close`, else the error."""


class SpiceTransport:
    """One SPICE session to ``target`` carrying a VSCard stream (see the module docstring).

    ``setup_timeout``: seconds to connect and link both channels.  ``idle_timeout``: fail
    when the main channel has been silent that long (the server pings idle TCP channels).
    ``clock``: monotonic seconds (tests may pass their own).
    """

    def __init__(
        self,
        target: SpiceTarget,
        handler: SpiceTransportHandler,
        *,
        setup_timeout: float = 10.0,
        idle_timeout: float | None = 120.0,
        name: str = "spice",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target = target
        self.handler = handler
        self.name = name
        self._clock = clock
        self._tls = make_tls_context(target) if target.tls else None
        self._client = SpiceSmartcardClient(
            target.password, setup_timeout=setup_timeout, idle_timeout=idle_timeout,
            label=name)
        self._setup_timeout = setup_timeout
        self._lock = threading.Lock()
        self._out: deque[bytes] = deque()  # VSCard bytes written by the owner
        self._out_size = 0
        self._closing: str | None = None  # "close" or "abort"
        self._paused = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._pipe_open = True
        self._socks: dict[SpiceChannelType, socket.socket] = {}
        self._thread: threading.Thread | None = None
        self._io_thread_id: int | None = None
        self._done = threading.Event()
        self._ready = threading.Event()
        #: Set at the end: None after close(), else the error.
        self.error: SpiceError | None = None
        self.bytes_in = 0
        self.bytes_out = 0

    # ---------------------------------------------------------------- state

    @property
    def session_id(self) -> int | None:
        return self._client.session_id

    @property
    def ready(self) -> bool:
        """The smartcard channel is up and the transport not yet closed."""
        return self._ready.is_set() and not self._done.is_set()

    @property
    def pings(self) -> tuple[int, int]:
        """PINGs answered on the (main, smartcard) channel."""
        card = self._client.smartcard
        return self._client.main.pings, card.pings if card is not None else 0

    def wait_ready(self, timeout: float) -> bool:
        """Block until the smartcard channel is up (True), or the end or timeout (False)."""
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self._done.is_set() or time.monotonic() > deadline:
                return False
        return not self._done.is_set()

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Block until connection_lost has been called."""
        return self._done.wait(timeout)

    # ---------------------------------------------------------------- owner side

    def start(self) -> None:
        """Connect and run the session on a new I/O thread."""
        if self._thread is not None:
            raise RuntimeError("a SpiceTransport starts once; make a new one to reconnect")
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-io", daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def write(self, data: bytes) -> None:
        """Queue VSCard bytes for the server (whole or partial messages; never blocks)."""
        if not data:
            return
        with self._lock:
            if self._closing is not None or self._done.is_set():
                return
            self._out.append(bytes(data))
            self._out_size += len(data)
        if threading.get_ident() != self._io_thread_id:
            self._wake()

    def get_write_buffer_size(self) -> int:
        """VSCard bytes written but not yet handed to the socket."""
        with self._lock:
            return self._out_size

    def pause_reading(self) -> None:
        """Stop reading the smartcard channel (the main channel is still served)."""
        self._paused = True
        self._wake()

    def resume_reading(self) -> None:
        self._paused = False
        self._wake()

    def close(self) -> None:
        """End the session politely (DISCONNECTING, pending bytes sent); idempotent."""
        self._request("close")

    def abort(self) -> None:
        """End the session at once: sockets closed, nothing more sent."""
        self._request("abort")

    def _request(self, what: str) -> None:
        with self._lock:
            if self._closing is None:
                self._closing = what
        self._wake()
        if self._thread is None and not self._done.is_set():  # never started
            self._finish(None)

    def _wake(self) -> None:
        with self._lock:  # never write to a closed (and perhaps reused) descriptor
            if self._pipe_open:
                with contextlib.suppress(OSError):
                    os.write(self._wake_w, b"x")

    # ---------------------------------------------------------------- I/O thread

    def _connect(self, channel: SpiceChannelType, deadline: float) -> socket.socket:
        target = self.target
        port = target.tls_port if target.tls else target.port
        assert port is not None
        timeout = max(0.1, min(_CONNECT_TIMEOUT, deadline - self._clock()))
        sock = socket.create_connection((target.host, port), timeout=timeout)
        try:
            set_nodelay(sock)
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_hostname=target.host)
                if target.host_subject is not None:
                    cert = sock.getpeercert()
                    if not cert or not match_host_subject(dict(cert), target.host_subject):
                        raise _SubjectMismatch(
                            f"its subject {_subject_text(cert)!r} is not the expected "
                            f"{target.host_subject!r}")
            sock.settimeout(_SEND_TIMEOUT)
        except BaseException:
            sock.close()
            raise
        return sock

    def _run(self) -> None:
        self._io_thread_id = threading.get_ident()
        client = self._client
        started = self._clock()
        error: SpiceError | None = None
        try:
            try:
                self._socks[MAIN] = self._connect(MAIN, started + self._setup_timeout)
            except (OSError, ssl.SSLError, _SubjectMismatch) as exc:
                error = self._connect_error(MAIN, exc)
            else:
                client.start(self._clock())
                error = self._loop()
        except Exception as exc:  # a bug of ours: never let the thread die silently
            log.exception("%s: I/O thread failed", self.name)
            error = SpiceError(SpiceFailure.PROTOCOL, f"{self.name}: internal error: {exc!r}")
        finally:
            for sock in self._socks.values():
                with contextlib.suppress(OSError):
                    sock.close()
            self._socks.clear()
        self._finish(error)

    def _connect_error(self, channel: SpiceChannelType, exc: BaseException) -> SpiceError:
        what = "main" if channel is MAIN else "smartcard"
        if isinstance(exc, ssl.SSLCertVerificationError | _SubjectMismatch):
            reason = getattr(exc, "verify_message", None) or str(exc)
            return SpiceError(SpiceFailure.TLS_FAILED, f"{self.name}: the {what} channel's TLS "
                              f"certificate was refused: {reason}")
        if isinstance(exc, ssl.SSLError):
            return SpiceError(SpiceFailure.TLS_FAILED, f"{self.name}: TLS handshake with "
                              f"{self.target} failed ({what} channel): {exc}")
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return SpiceError(SpiceFailure.UNREACHABLE, f"{self.name}: cannot connect the {what} "
                          f"channel to {self.target}: {reason or type(exc).__name__}")

    def _finish(self, error: SpiceError | None) -> None:
        if self._done.is_set():
            return
        self.error = error
        with self._lock:
            self._pipe_open = False
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._done.set()
        if error is None:
            log.info("%s: closed", self.name)
        else:
            # A fatal one is worth a warning here; a transient one (a VM that is down) would
            # repeat at every retry: its owner (vmc/runtime/spice_link.py) says it once.
            (log.warning if error.fatal else log.info)("%s", error)
        try:
            self.handler.connection_lost(error)
        except Exception:
            log.exception("%s: connection_lost handler failed", self.name)

    def _loop(self) -> SpiceError | None:
        client = self._client
        selector = selectors.DefaultSelector()
        selector.register(self._wake_r, selectors.EVENT_READ, None)
        selector.register(self._socks[MAIN], selectors.EVENT_READ, MAIN)
        reading_card = False
        try:
            while True:
                if not self._flush():
                    return client.error
                closing = self._closing
                if closing is not None:
                    if closing == "close":
                        client.close(self._clock())
                        self._send_all()
                    return None
                card = self._socks.get(SMARTCARD)
                if card is not None and reading_card == self._paused:
                    if self._paused:
                        selector.unregister(card)
                    else:
                        selector.register(card, selectors.EVENT_READ, SMARTCARD)
                    reading_card = not self._paused
                deadline = client.next_timeout()
                timeout = None if deadline is None else max(0.0, deadline - self._clock())
                for key, _mask in selector.select(timeout):
                    if key.data is None:
                        with contextlib.suppress(OSError):
                            os.read(self._wake_r, 4096)
                        continue
                    self._read(key.data)
                client.handle_timeout(self._clock())
                if not self._dispatch(selector):
                    return client.error
        finally:
            selector.close()

    def _read(self, channel: SpiceChannelType) -> None:
        sock = self._socks.get(channel)
        if sock is None or (channel is SMARTCARD and self._paused):
            return  # paused: effective at once (the selector drops the socket next round)
        client = self._client
        while True:
            try:
                data = sock.recv(_RECV_SIZE)
            except ssl.SSLWantReadError:
                return
            except TimeoutError:
                return
            except (OSError, ssl.SSLError) as exc:
                log.debug("%s: %s channel receive failed: %s", self.name, channel.name, exc)
                client.connection_lost(channel, self._clock())
                return
            if not data:
                client.connection_lost(channel, self._clock())
                return
            self.bytes_in += len(data)
            client.receive_data(channel, data, self._clock())
            # A TLS record may hold more than one recv's worth: drain what is decrypted.
            if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                return

    def _dispatch(self, selector: selectors.BaseSelector) -> bool:
        """Handle the session's events; False once it is over."""
        client = self._client
        while (event := client.next_event()) is not None:
            if isinstance(event, VscData):
                self.handler.data_received(event.data)
            elif isinstance(event, OpenSmartcardChannel):
                try:
                    self._socks[SMARTCARD] = self._connect(
                        SMARTCARD, self._clock() + self._setup_timeout)
                except (OSError, ssl.SSLError, _SubjectMismatch) as exc:
                    client.connect_failed(SMARTCARD, self._connect_error(SMARTCARD, exc))
                    continue
                client.smartcard_connected(self._clock())
            elif isinstance(event, SmartcardReady):
                log.info("%s: connected to %s, smartcard channel up (session %#x)", self.name,
                         self.target, event.session_id)
                self._ready.set()
                self.handler.connection_made(self)
            elif isinstance(event, ServerNotice):
                log.info("%s: server says: %s", self.name, event.text)
            elif isinstance(event, SessionClosed):
                self._send_all()
                return False
        return True

    def _flush(self) -> bool:
        """Move the owner's VSCard bytes into the engine and send everything; False on error."""
        with self._lock:
            if self._out:
                chunks = list(self._out)
                self._out.clear()
                self._out_size = 0
            else:
                chunks = []
        for chunk in chunks:
            self._client.send_vsc(chunk)
        return self._send_all()

    def _send_all(self) -> bool:
        client = self._client
        for channel, sock in list(self._socks.items()):
            data = client.data_to_send(channel)
            if not data:
                continue
            try:
                sock.sendall(data)
            except (OSError, ssl.SSLError) as exc:
                log.debug("%s: %s channel send failed: %s", self.name, channel.name, exc)
                client.connection_lost(channel, self._clock())
                self._dispatch_closed_only()
                return False
            self.bytes_out += len(data)
        return not client.closed

    def _dispatch_closed_only(self) -> None:
        while (event := self._client.next_event()) is not None:
            if isinstance(event, VscData):
                self.handler.data_received(event.data)


class _SubjectMismatch(Exception):
    """The server certificate is valid but its subject is not ``host_subject``."""


def _subject_text(cert: object) -> str:
    if not isinstance(cert, dict):
        return "?"
    parts = []
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            short = next((k for k, v in _SUBJECT_KEYS.items() if v == key and len(k) <= 2), key)
            parts.append(f"{short}={value}")
    return ", ".join(parts)
