"""vpcd's side of the bridge protocol (docs/PROTOCOL.md, "vpcd") on a real TCP socket, driven by
a test: it listens, accepts the bridge (the card), sends frames and reads the answers.

Frames are a 2-byte big-endian length and the payload.  ``split_writes`` sends the two in
separate writes, as Debian 12's vpcd does.
"""

from __future__ import annotations

import socket
import struct


class ScriptedVpcd:
    def __init__(self, timeout: float = 30, *, split_writes: bool = False) -> None:
        self.timeout = timeout
        self.split_writes = split_writes
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(timeout)
        self.port: int = self.listener.getsockname()[1]
        self.conn: socket.socket | None = None

    def accept(self) -> socket.socket:
        conn, _ = self.listener.accept()
        conn.settimeout(self.timeout)
        self.conn = conn
        return conn

    def send(self, payload: bytes) -> None:
        assert self.conn is not None
        header = len(payload).to_bytes(2, "big")
        if self.split_writes:
            self.conn.sendall(header)
            self.conn.sendall(payload)
        else:
            self.conn.sendall(header + payload)

    def recv_frame(self) -> bytes:
        """The bridge's next frame (its payload)."""
        size = int.from_bytes(self._exactly(2), "big")
        return self._exactly(size)

    def ask(self, payload: bytes) -> bytes:
        """Send a frame and read the answer."""
        self.send(payload)
        return self.recv_frame()

    def _exactly(self, n: int) -> bytes:
        assert self.conn is not None
        data = b""
        while len(data) < n:
            chunk = self.conn.recv(n - len(data))
            assert chunk, "the bridge closed the connection"
            data += chunk
        return data

    def reset(self) -> None:
        """Close the connection with an RST (SO_LINGER on, 0 s)."""
        assert self.conn is not None
        self.conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.conn.close()
        self.conn = None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.listener.close()
