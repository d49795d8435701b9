"""A fake SPICE server, sans-I/O, for engine and adapter tests: what spice-server 0.15 does.

Written independently of :mod:`ccidemu.spice`'s decoders (its own ``struct`` parsing of the
client side) so that paired tests check one implementation against another.  Behaviour taken
from spice-server (docs/PROTOCOL.md, "SPICE"): link reply with a fresh 1024-bit RSA key, OAEP
(SHA-1) ticket, link result; the main channel sends INIT and, on ATTACH_CHANNELS, the channel
list; the smartcard channel drops VSCard Init, answers every ReaderAdd with Error(0, SUCCESS)
(reader id rewritten to 0, as QEMU 7.2 + spice-server do), forwards ATR/APDU/Error/CardRemove
to "the device" (recorded here).
"""

from __future__ import annotations

import contextlib
import functools
import socket
import ssl
import struct
import threading
from collections import deque
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

REDQ = b"REDQ"
LE_VSC = struct.Struct("<III")


@functools.cache
def server_key() -> rsa.RSAPrivateKey:
    """One 1024-bit key per test run (generation takes tens of milliseconds)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


def public_der(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def decrypt_ticket(key: rsa.RSAPrivateKey, data: bytes) -> bytes:
    return key.decrypt(data, padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None))


def link_reply(error: int, *, common: int = 0x0B, channel: tuple[int, ...] = (),
               pub_key: bytes = b"\0" * 162) -> bytes:
    """protocol.h SpiceLinkHeader + SpiceLinkReply (+ caps), little-endian."""
    caps = struct.pack(f"<{1 + len(channel)}I", common, *channel) if error == 0 else b""
    ncommon = 1 if error == 0 else 0
    body = struct.pack("<I", error) + pub_key + struct.pack(
        "<III", ncommon, len(channel) if error == 0 else 0, 178 if error == 0 else 0) + caps
    return REDQ + struct.pack("<III", 2, 2, len(body)) + body


@dataclass
class FakeSpiceServer:
    """Shared state of the fake server: password, sessions, what "the device" received."""

    password: bytes = b""
    smartcard_channel: bool = True
    mini_header: bool = True
    auth_selection: bool = True
    session_id: int = 0x1234ABCD
    sessions: set[int] = field(default_factory=set)
    device: list[tuple[int, int, bytes]] = field(default_factory=list)  # (type, reader, data)
    reader_added: bool = False

    def connection(self) -> FakeServerConnection:
        return FakeServerConnection(self)


class FakeServerConnection:
    """One accepted connection: feed the client's bytes, read what the server answers."""

    def __init__(self, server: FakeSpiceServer) -> None:
        self.server = server
        self.key = server_key()
        self.buf = bytearray()
        self.out = bytearray()
        self.state = "link"
        self.channel_type = 0
        self.mini = False
        self.serial = 0
        self.closed = False
        self.client_caps: tuple[int, ...] = ()
        self.received: deque[tuple[int, bytes]] = deque()  # client messages after the link
        self.auth_selection = False

    # -- server -> client
    def data_to_send(self) -> bytes:
        out = bytes(self.out)
        self.out.clear()
        return out

    def send(self, type_: int, body: bytes = b"") -> None:
        if self.mini:
            self.out += struct.pack("<HI", type_, len(body)) + body
        else:
            self.serial += 1
            self.out += struct.pack("<QHII", self.serial, type_, len(body), 0) + body

    def send_vsc(self, type_: int, reader_id: int, data: bytes = b"") -> None:
        self.send(101, LE_VSC.pack(type_, reader_id, len(data)) + data)

    def ping(self, id_: int, timestamp: int, pad: int = 0) -> None:
        self.send(4, struct.pack("<IQ", id_, timestamp) + b"\0" * pad)

    # -- client -> server
    def receive_data(self, data: bytes) -> None:
        if self.closed:
            return
        self.buf += data
        while not self.closed and self._step():
            pass

    def _take(self, n: int) -> bytes | None:
        if len(self.buf) < n:
            return None
        chunk = bytes(self.buf[:n])
        del self.buf[:n]
        return chunk

    def _step(self) -> bool:
        server = self.server
        if self.state == "link":
            if len(self.buf) < 16:
                return False
            magic, major, minor, size = struct.unpack_from("<4sIII", self.buf)
            if len(self.buf) < 16 + size:
                return False
            body = self._take(16 + size)
            assert body is not None and magic == REDQ and (major, minor) == (2, 2)
            conn_id, ctype, _cid, ncommon, nchan, offset = struct.unpack_from("<IBBIII", body, 16)
            self.client_caps = struct.unpack_from(f"<{ncommon + nchan}I", body, 16 + offset)
            self.channel_type = ctype
            if ctype == 8 and not server.smartcard_channel:
                self.closed = True  # reds.cpp: no reply for an unknown channel
                return False
            if ctype not in (1, 8):
                self.out += link_reply(9)
                self.closed = True
                return False
            common = 0x0A | (0x01 if server.auth_selection else 0)
            if not server.mini_header:
                common &= ~0x08
            self.out += link_reply(0, common=common, channel=(0x0F,) if ctype == 1 else (),
                                   pub_key=public_der(self.key))
            self.auth_selection = bool(self.client_caps[0] & 1) and server.auth_selection
            self.mini = bool(self.client_caps[0] & 8) and server.mini_header
            self.conn_id = conn_id
            self.state = "auth" if self.auth_selection else "ticket"
            return True
        if self.state == "auth":
            mech = self._take(4)
            if mech is None:
                return False
            assert struct.unpack("<I", mech)[0] == 1  # AUTH_SPICE
            self.state = "ticket"
            return True
        if self.state == "ticket":
            ticket = self._take(128)
            if ticket is None:
                return False
            password = decrypt_ticket(self.key, ticket)
            assert password.endswith(b"\0")
            if server.password and password[:-1] != server.password:
                self.out += struct.pack("<I", 7)  # PERMISSION_DENIED
                self.closed = True
                return False
            if self.channel_type == 8 and self.conn_id not in server.sessions:
                self.out += struct.pack("<I", 8)  # BAD_CONNECTION_ID
                self.closed = True
                return False
            self.out += struct.pack("<I", 0)
            self.state = "ready"
            if self.channel_type == 1:
                server.sessions.add(server.session_id)
                self.send(103, struct.pack("<8I", server.session_id, 0, 1, 1, 0, 10, 1234, 0))
            return True
        # ready: client data messages
        header = 6 if self.mini else 18
        if len(self.buf) < header:
            return False
        if self.mini:
            type_, size = struct.unpack_from("<HI", self.buf)
        else:
            _serial, type_, size, _sub = struct.unpack_from("<QHII", self.buf)
        if len(self.buf) < header + size:
            return False
        msg = self._take(header + size)
        assert msg is not None
        self._on_message(type_, msg[header:])
        return True

    def _on_message(self, type_: int, body: bytes) -> None:
        self.received.append((type_, body))
        if self.channel_type == 1 and type_ == 104:  # ATTACH_CHANNELS
            channels = [(3, 0)] + ([(8, 0)] if self.server.smartcard_channel else [])
            self.send(104, struct.pack("<I", len(channels))
                      + b"".join(bytes(c) for c in channels))
        elif self.channel_type == 8 and type_ == 101:
            vtype, reader_id, length = LE_VSC.unpack_from(body)
            data = body[12:12 + length]
            assert len(data) == length and len(body) == 12 + length  # one VSCard message
            if vtype == 1:  # Init: dropped by the server
                return
            if vtype == 3:  # ReaderAdd: to the device, whose answer comes back as reader 0;
                # QEMU 7.2 answers a second one with SUCCESS as well (seen), still reader 0.
                self.server.reader_added = True
                self.send_vsc(2, 0, struct.pack("<I", 0))
                return
            self.server.device.append((vtype, reader_id, data))
            if vtype in (5, 6):  # ATR, CardRemove: QEMU answers Error(SUCCESS)
                self.send_vsc(2, 0, struct.pack("<I", 0))

    def messages(self, type_: int) -> list[bytes]:
        return [body for t, body in self.received if t == type_]


class FakeSpiceSocketServer:
    """:class:`FakeSpiceServer` on a real TCP socket (127.0.0.1, a free port), one thread per
    connection.  ``push(channel_type, raw)`` sends raw bytes on the live connection of that
    channel type; ``tls`` wraps accepted sockets with that server context."""

    def __init__(self, fake: FakeSpiceServer | None = None, tls: ssl.SSLContext | None = None
                 ) -> None:
        self.fake = fake or FakeSpiceServer()
        self.tls = tls
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.live: dict[int, tuple[socket.socket, FakeServerConnection]] = {}
        self.closed_channels: list[int] = []
        self.threads: list[threading.Thread] = []
        self._stop = False
        self._accept = threading.Thread(target=self._accept_loop, daemon=True)

    def __enter__(self) -> FakeSpiceSocketServer:
        self._accept.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self.listener.close()
        with self.lock:
            for sock, _ in self.live.values():
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        for thread in self.threads:
            thread.join(5)

    def _accept_loop(self) -> None:
        while not self._stop:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, raw: socket.socket) -> None:
        conn = self.fake.connection()
        # No Nagle: a small message must not wait for the ACK of the one before it, so that
        # bytes pushed on one connection before another are on the wire first.
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock = self.tls.wrap_socket(raw, server_side=True) if self.tls else raw
        except (OSError, ssl.SSLError):
            raw.close()
            return
        with sock:
            while True:
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    break
                with self.lock:
                    conn.receive_data(data)
                    if conn.channel_type and conn.state != "link":
                        self.live[conn.channel_type] = (sock, conn)
                    out = conn.data_to_send()
                if out:
                    with contextlib.suppress(OSError):
                        sock.sendall(out)
                if conn.closed:
                    break
        with self.lock:
            if self.live.get(conn.channel_type, (None, None))[1] is conn:
                del self.live[conn.channel_type]
            self.closed_channels.append(conn.channel_type)

    def connection(self, channel_type: int) -> FakeServerConnection | None:
        with self.lock:
            entry = self.live.get(channel_type)
            return entry[1] if entry else None

    def push(self, channel_type: int, raw: bytes = b"", *, flush: bool = True) -> None:
        """Send ``raw`` (and, with ``flush``, what the fake queued) on that live connection."""
        with self.lock:
            sock, conn = self.live[channel_type]
            out = (conn.data_to_send() if flush else b"") + raw
        sock.sendall(out)
