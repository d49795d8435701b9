"""The control socket server (protocol: :mod:`vmc.control`), in the runtime's loop.

Each connection is a stream of JSON lines; every request line gets one answer line, in order,
even when answers are ready out of order (``attach``, ``insert --card`` and ``reload`` open
cards in a helper thread).  A line longer than :data:`vmc.control.MAX_LINE` is answered with
an error and skipped up to its newline; the connection stays usable.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections import deque
from collections.abc import Callable
from typing import Any

from ccidemu.errors import CcidemuError, describe_exception
from vmc.control import MAX_LINE, decode_line, encode_line
from vmc.runtime.loop import Loop
from vmc.runtime.transport import Listener, StreamTransport

__all__ = ["ControlServer", "Handler", "Reply", "internal_error"]

log = logging.getLogger(__name__)

#: Answers a request: the JSON object to send back.
Reply = Callable[[dict[str, Any]], None]
#: Handles one request (loop thread): calls ``reply`` now or later, exactly once.
Handler = Callable[[dict[str, Any], "int | None", Reply], None]


#: Control connections open at once; more are closed at once (a client loop that leaks them
#: must not take the daemon's file descriptors).
MAX_CONNECTIONS = 64


class _ControlConnection:
    def __init__(self, server: ControlServer, sock: socket.socket) -> None:
        self._server = server
        server.connections.add(self)
        self.peer_uid = _peer_uid(sock)
        self._buffer = bytearray()
        self._skipping = False  # inside an over-long line
        self._answers: deque[list[dict[str, Any]]] = deque()  # in request order
        self.transport = StreamTransport(server.loop, sock, self)

    def data_received(self, buffer: bytearray, nbytes: int) -> None:
        data = bytes(buffer[:nbytes])
        while data:
            newline = data.find(b"\n")
            if self._skipping:
                if newline < 0:
                    return
                self._skipping = False
                data = data[newline + 1:]
                continue
            if newline < 0:
                self._buffer += data
                if len(self._buffer) > MAX_LINE:
                    self._buffer.clear()
                    self._skipping = True
                    self._answer_now({"ok": False, "error": "request line too long"})
                return
            line = bytes(self._buffer) + data[:newline]
            self._buffer.clear()
            data = data[newline + 1:]
            if len(line) > MAX_LINE:
                self._answer_now({"ok": False, "error": "request line too long"})
            elif line.strip():
                self._request(line)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)

    def _answer_now(self, answer: dict[str, Any]) -> None:
        slot: list[dict[str, Any]] = [answer]
        self._answers.append(slot)
        self._flush()

    def _request(self, line: bytes) -> None:
        slot: list[dict[str, Any]] = []
        self._answers.append(slot)
        answered = False

        def reply(answer: dict[str, Any]) -> None:
            nonlocal answered
            if answered:
                return
            answered = True
            slot.append(answer)
            self._flush()

        try:
            request = decode_line(line)
            self._server.handler(request, self.peer_uid, reply)
        except (ValueError, CcidemuError) as exc:
            reply({"ok": False, "error": str(exc)})
        except Exception as exc:
            internal_error(exc, reply)

    def _flush(self) -> None:
        while self._answers and self._answers[0]:
            self.transport.write(encode_line(self._answers.popleft()[0]))
        if self.transport.closed:
            self._server.connections.discard(self)


def internal_error(exc: BaseException, reply: Reply) -> None:
    """A request met a bug in the daemon: one log line (the traceback at debug level, -vv)
    and an answer that says so; the daemon and the connection go on."""
    text = describe_exception(exc)
    log.error("control request failed: internal error: %s", text)
    log.debug("the control request's traceback", exc_info=exc)
    reply({"ok": False, "error": f"internal error in the daemon: {text} (see its log)"})


class ControlServer:
    """Accepts control connections on a bound unix socket; requests go to ``handler``."""

    def __init__(self, loop: Loop, sock: socket.socket, address: Any, handler: Handler) -> None:
        self.loop = loop
        self.handler = handler
        self.connections: set[_ControlConnection] = set()
        self._listener = Listener(loop, [sock], address, self._accepted)

    def _accepted(self, sock: socket.socket) -> None:
        if len(self.connections) >= MAX_CONNECTIONS:
            log.warning("control socket: %d connections open; refusing one more",
                        len(self.connections))
            sock.close()
            return
        _ControlConnection(self, sock)

    def close(self) -> None:
        self._listener.close()


def _peer_uid(sock: socket.socket) -> int | None:
    """The uid of a unix socket's peer (SO_PEERCRED); None when it cannot be had."""
    if sock.family != socket.AF_UNIX:
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)
