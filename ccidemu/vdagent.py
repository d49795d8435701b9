"""SPICE vdagent framing, decode only: the other spicevmc stream QEMU can carry.

Spec: spice-protocol ``spice/vd_agent.h``.  A ``-chardev spicevmc,name=vdagent`` stream is a
sequence of chunks, each ``VDIChunkHeader`` (``u32 port, u32 size``, little-endian) followed by
``size`` bytes.  Per port, the chunk bodies concatenate into a stream of ``VDAgentMessage``
(``u32 protocol, u32 type, u64 opaque, u32 size``, then ``size`` data bytes); a message may
span several chunks (senders cut at ``VD_AGENT_MAX_DATA_SIZE``, 2048 bytes), and its header may
itself be split.

Theory of operation
-------------------
:class:`VdagentStream` is sans-I/O: ``receive_data()`` buffers bytes, cuts complete chunks
out, and appends each chunk's body to its port's message buffer, from which complete messages
are cut.  ``next_event()`` returns, in wire order, every :class:`VdiChunk` and, right after the
chunk that completes it, every :class:`VdAgentMessage`.  Chunk and message sizes above
``max_length`` are rejected as soon as their header is seen, before any body is buffered; the
error is raised by ``next_event()`` after the events before it, and the stream is then dead.
Unknown ports, protocols and message types are kept as plain ints.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from dataclasses import dataclass

import construct
from construct import Int32ul, Int64ul, Struct

from ccidemu._wire import DEFAULT_MAX_LENGTH, FrameStream, check_length, parse
from ccidemu.errors import DecodeError

__all__ = [
    "CHUNK_HEADER_SIZE",
    "MESSAGE_HEADER_SIZE",
    "VD_AGENT_MAX_DATA_SIZE",
    "VD_AGENT_PROTOCOL",
    "VdAgentCap",
    "VdAgentMessage",
    "VdAgentMessageType",
    "VdagentEvent",
    "VdagentStream",
    "VdiChunk",
    "VdiPort",
    "decode_announce_capabilities",
    "decode_chunk",
    "decode_message",
]


#: ``VD_AGENT_PROTOCOL``: the value of ``VDAgentMessage.protocol``.
VD_AGENT_PROTOCOL = 1
#: ``VD_AGENT_MAX_DATA_SIZE``: the largest chunk body senders produce (not enforced here).
VD_AGENT_MAX_DATA_SIZE = 2048
CHUNK_HEADER_SIZE = 8
MESSAGE_HEADER_SIZE = 20


class VdiPort(enum.IntEnum):
    """``VDP_CLIENT_PORT`` / ``VDP_SERVER_PORT``: the chunk's logical port."""

    CLIENT = 1
    SERVER = 2


class VdAgentMessageType(enum.IntEnum):
    """``VD_AGENT_*`` message types (spice-protocol upstream, up to GRAPHICS_DEVICE_INFO)."""

    MOUSE_STATE = 1
    MONITORS_CONFIG = 2
    REPLY = 3
    CLIPBOARD = 4
    DISPLAY_CONFIG = 5
    ANNOUNCE_CAPABILITIES = 6
    CLIPBOARD_GRAB = 7
    CLIPBOARD_REQUEST = 8
    CLIPBOARD_RELEASE = 9
    FILE_XFER_START = 10
    FILE_XFER_STATUS = 11
    FILE_XFER_DATA = 12
    CLIENT_DISCONNECTED = 13
    MAX_CLIPBOARD = 14
    AUDIO_VOLUME_SYNC = 15
    GRAPHICS_DEVICE_INFO = 16


class VdAgentCap(enum.IntEnum):
    """``VD_AGENT_CAP_*`` bit numbers in ``VDAgentAnnounceCapabilities.caps``."""

    MOUSE_STATE = 0
    MONITORS_CONFIG = 1
    REPLY = 2
    CLIPBOARD = 3
    DISPLAY_CONFIG = 4
    CLIPBOARD_BY_DEMAND = 5
    CLIPBOARD_SELECTION = 6
    SPARSE_MONITORS_CONFIG = 7
    GUEST_LINEEND_LF = 8
    GUEST_LINEEND_CRLF = 9
    MAX_CLIPBOARD = 10
    AUDIO_VOLUME_SYNC = 11
    MONITORS_CONFIG_POSITION = 12
    FILE_XFER_DISABLED = 13
    FILE_XFER_DETAILED_ERRORS = 14
    GRAPHICS_DEVICE_INFO = 15
    CLIPBOARD_NO_RELEASE_ON_REGRAB = 16
    CLIPBOARD_GRAB_SERIAL = 17


# vd_agent.h: typedef struct VDIChunkHeader { uint32_t port; uint32_t size; }
_CHUNK_HEADER = Struct("port" / Int32ul, "size" / Int32ul)
# vd_agent.h: typedef struct VDAgentMessage { uint32_t protocol; uint32_t type; uint64_t opaque;
#                                             uint32_t size; uint8_t data[0]; }
_MESSAGE_HEADER = Struct(
    "protocol" / Int32ul, "type" / Int32ul, "opaque" / Int64ul, "size" / Int32ul
)
# vd_agent.h: typedef struct VDAgentAnnounceCapabilities { uint32_t request; uint32_t caps[0]; }
_ANNOUNCE_CAPABILITIES = Struct(
    "request" / Int32ul, "caps" / construct.GreedyRange(Int32ul), construct.Terminated
)
# Hot paths with the same layouts (checked against the declarations in the tests).
_CHUNK_HOT = struct.Struct("<II")
_MESSAGE_HOT = struct.Struct("<IIQI")
assert _CHUNK_HEADER.sizeof() == _CHUNK_HOT.size == CHUNK_HEADER_SIZE
assert _MESSAGE_HEADER.sizeof() == _MESSAGE_HOT.size == MESSAGE_HEADER_SIZE

_PORTS = frozenset(int(p) for p in VdiPort)
_TYPES = frozenset(int(t) for t in VdAgentMessageType)


@dataclass(frozen=True, slots=True)
class VdiChunk:
    """One ``VDIChunkHeader`` and its body.  ``port`` is a :class:`VdiPort` when known."""

    port: int
    data: bytes


@dataclass(frozen=True, slots=True)
class VdAgentMessage:
    """One reassembled ``VDAgentMessage``; ``port`` is the port of the chunks that carried it.

    ``type`` is a :class:`VdAgentMessageType` when known, a plain ``int`` otherwise.
    """

    port: int
    protocol: int
    type: int
    opaque: int
    data: bytes


VdagentEvent = VdiChunk | VdAgentMessage


def _port(value: int) -> int:
    return VdiPort(value) if value in _PORTS else value


def _message_type(value: int) -> int:
    return VdAgentMessageType(value) if value in _TYPES else value


def decode_chunk(
    data: bytes | bytearray | memoryview, max_length: int = DEFAULT_MAX_LENGTH
) -> tuple[VdiChunk, int]:
    """The chunk at the start of ``data`` and the bytes it used; DecodeError if short/over cap."""
    if len(data) < CHUNK_HEADER_SIZE:
        raise DecodeError(f"VDIChunkHeader needs {CHUNK_HEADER_SIZE} bytes, got {len(data)}")
    port, size = _CHUNK_HOT.unpack_from(data)
    check_length(size, max_length, "VDIChunk")
    end = CHUNK_HEADER_SIZE + size
    if len(data) < end:
        raise DecodeError(f"VDIChunk truncated: need {end} bytes, got {len(data)}")
    return VdiChunk(_port(port), bytes(data[CHUNK_HEADER_SIZE:end])), end


def decode_message(
    data: bytes | bytearray | memoryview, port: int = VdiPort.CLIENT,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> tuple[VdAgentMessage, int]:
    """The VDAgentMessage at the start of reassembled chunk bodies and the bytes it used."""
    if len(data) < MESSAGE_HEADER_SIZE:
        raise DecodeError(f"VDAgentMessage needs {MESSAGE_HEADER_SIZE} bytes, got {len(data)}")
    protocol, type_, opaque, size = _MESSAGE_HOT.unpack_from(data)
    check_length(size, max_length, "VDAgentMessage")
    end = MESSAGE_HEADER_SIZE + size
    if len(data) < end:
        raise DecodeError(f"VDAgentMessage truncated: need {end} bytes, got {len(data)}")
    msg = VdAgentMessage(
        _port(port), protocol, _message_type(type_), opaque, bytes(data[MESSAGE_HEADER_SIZE:end])
    )
    return msg, end


def decode_announce_capabilities(data: bytes) -> tuple[bool, frozenset[int]]:
    """The body of ANNOUNCE_CAPABILITIES: (request flag, set bit numbers as VdAgentCap/int)."""
    parsed = parse(_ANNOUNCE_CAPABILITIES, data, "VDAgentAnnounceCapabilities")
    caps: set[int] = set()
    for word_index, word in enumerate(parsed.caps):
        for bit in range(32):
            if word >> bit & 1:
                n = word_index * 32 + bit
                caps.add(VdAgentCap(n) if n < len(VdAgentCap) else n)
    return bool(parsed.request), frozenset(caps)


class VdagentStream(FrameStream[VdagentEvent]):
    """Decoder for one vdagent chunk stream: :meth:`receive_data` in, :meth:`next_event` out.

    Every chunk is an event, and each message follows the chunk that completes it
    (messages are reassembled per port).  Errors follow :class:`ccidemu._wire.FrameStream`.
    """

    what = "vdagent stream"

    def __init__(self, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        super().__init__(max_length)
        self._ports: dict[int, bytearray] = {}

    @property
    def buffered(self) -> int:
        """Bytes held: an incomplete chunk plus incomplete messages on every port."""
        return len(self._buffer) + sum(len(b) for b in self._ports.values())

    def _broken(self) -> None:
        self._ports.clear()

    def _cut(self, buf: bytearray, events: deque[VdagentEvent]) -> int:
        start = 0
        while len(buf) - start >= CHUNK_HEADER_SIZE:
            port, size = _CHUNK_HOT.unpack_from(buf, start)
            check_length(size, self.max_length, "VDIChunk")
            end = start + CHUNK_HEADER_SIZE + size
            if end > len(buf):
                break
            body = bytes(buf[start + CHUNK_HEADER_SIZE : end])
            start = end
            events.append(VdiChunk(_port(port), body))
            self._feed_port(port, body)
        return start

    def _feed_port(self, port: int, body: bytes) -> None:
        pending = self._ports.setdefault(port, bytearray())
        pending += body
        start = 0
        while len(pending) - start >= MESSAGE_HEADER_SIZE:
            protocol, type_, opaque, size = _MESSAGE_HOT.unpack_from(pending, start)
            check_length(size, self.max_length, "VDAgentMessage")
            end = start + MESSAGE_HEADER_SIZE + size
            if end > len(pending):
                break
            data = bytes(pending[start + MESSAGE_HEADER_SIZE : end])
            start = end
            self._events.append(
                VdAgentMessage(_port(port), protocol, _message_type(type_), opaque, data)
            )
        if start:
            del pending[:start]
