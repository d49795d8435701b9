"""SPICE client engine: the link handshake, the main channel's duties and the smartcard channel.

Layer: sans-I/O protocol engine (no sockets, threads or clocks; time is passed in as ``now``).
The socket adapter is :mod:`vmc.spice`.  Spec: spice-protocol ``spice/protocol.h`` (link
structures, data headers, common capabilities) and ``spice/enums.h`` (channel types, link
errors, message numbers); message bodies from spice-common ``spice.proto``; server behaviour
from spice-server ``server/reds.cpp``, ``red-channel-client.cpp``, ``main-channel-client.cpp``,
``smartcard.cpp`` and ``smartcard-channel-client.cpp``.  The facts, in our own words and with
what QEMU 7.2 (libspice-server 0.15.1) was seen doing, are in docs/PROTOCOL.md, "SPICE".
Everything on the wire is little-endian and packed.

Theory of operation
-------------------
A SPICE *session* is one TCP (or TLS) connection per *channel*; the first is the main channel.
This module implements exactly what a headless smartcard client needs:

1. **Link** (:class:`SpiceChannelConnection`, one per connection).  We send ``"REDQ"``, protocol
   2.2 and a ``SpiceLinkMess`` naming the channel (type, id), the session's connection id (0 for
   the main channel) and our capabilities: common ``PROTOCOL_AUTH_SELECTION``, ``AUTH_SPICE``
   and ``MINI_HEADER``; no channel capabilities.  The server answers with ``SpiceLinkReply``:
   an error code, its 1024-bit RSA public key (DER SubjectPublicKeyInfo, 162 bytes) and its own
   capabilities.  We pick ``AUTH_SPICE`` (a u32) when the server offers auth selection, then send
   the password (empty when ticketing is disabled) plus a NUL byte, RSA-OAEP (SHA-1, MGF1-SHA-1)
   encrypted with that key: 128 bytes.  The server answers with a u32 link result.  Link
   errors, a refused password (``PERMISSION_DENIED``) and a stream that does not start with
   ``"REDQ"`` become :class:`SpiceError` with a :class:`SpiceFailure` saying which.
2. **Data messages**.  After a good link result every message is a header and a body.  The
   header is the 6-byte mini header (u16 type, u32 size) when we asked for ``MINI_HEADER`` and
   the server offered it, else the 18-byte full header (u64 serial, u16 type, u32 size, u32
   sub-list offset).  The framing of a whole connection (link reply, link result, then data
   messages) is one :class:`~ccidemu._wire.FrameStream`, :class:`SpiceStream`.
3. **Base duties, on every channel** (the server drops a client that neglects them): ``PING``
   is answered at once with ``PONG`` (id and timestamp echoed, not the padding); ``SET_ACK``
   with ``ACK_SYNC`` (its generation), after which an ``ACK`` goes out every ``window`` received
   messages.  ``NOTIFY`` and ``DISCONNECTING`` are reported; ``WAIT_FOR_CHANNELS``, ``MIGRATE``
   and unknown messages are logged and otherwise ignored (no migration support).
4. **Session** (:class:`SpiceSmartcardClient`).  The main channel's ``INIT`` carries the
   session id; we answer ``ATTACH_CHANNELS`` and read ``CHANNELS_LIST``.  Without a smartcard
   channel (type 8, id 0) in the list the session fails (``NO_SMARTCARD_CHANNEL``); otherwise
   the adapter is asked (:class:`OpenSmartcardChannel`) to open a second connection, which links
   with the session id as its connection id.  Once it is up (:class:`SmartcardReady`), VSCard
   messages travel little-endian inside ``SPICE_MSG(C)_SMARTCARD_DATA`` (101), exactly one
   VSCard message per SPICE message: :meth:`SpiceSmartcardClient.send_vsc` cuts the byte stream
   it is given into messages; what the server sends comes out as :class:`VscData` bytes.
5. **Time**: :meth:`SpiceSmartcardClient.handle_timeout` fails a session whose setup takes
   longer than ``setup_timeout`` (a silent peer) and, when ``idle_timeout`` is set, one whose
   main channel has been silent that long (the server pings an idle TCP main channel about every
   15 s).  :meth:`next_timeout` says when to call it.

Peer input never raises out of the engines: a bad stream (DecodeError) fails the session with
:class:`SpiceProtocolError`, which is both a :class:`SpiceError` and a
:class:`~ccidemu.errors.DecodeError`.  Nothing here logs the password.
"""

from __future__ import annotations

import enum
import logging
import struct
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import construct
from construct import Bytes, Const, GreedyBytes, Int8ul, Int16ul, Int32ul, Int64ul, Struct, this
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_der_public_key

from ccidemu._wire import DEFAULT_MAX_LENGTH, FrameStream, build, check_length, parse
from ccidemu.errors import CcidemuError, ConfigError, DecodeError, EncodeError

__all__ = [
    "CLIENT_COMMON_CAPS",
    "DATA_HEADER_SIZE",
    "LINK_HEADER_SIZE",
    "LINK_MESS_SIZE",
    "LINK_REPLY_SIZE",
    "MAX_LINK_SIZE",
    "MAX_PASSWORD_LENGTH",
    "MINI_HEADER_SIZE",
    "SMARTCARD_DATA",
    "SPICE_MAGIC",
    "SPICE_VERSION_MAJOR",
    "SPICE_VERSION_MINOR",
    "TICKET_PUBKEY_BYTES",
    "Ack",
    "AckSync",
    "AttachChannels",
    "ChannelClosed",
    "ChannelEvent",
    "ChannelMessage",
    "ChannelReady",
    "ChannelState",
    "ChannelsList",
    "ClientDisconnecting",
    "ClientMessage",
    "Disconnecting",
    "LinkMess",
    "LinkReply",
    "LinkResult",
    "MainInit",
    "Migrate",
    "Notify",
    "OpenSmartcardChannel",
    "Ping",
    "Pong",
    "ServerMessage",
    "ServerNotice",
    "SessionClosed",
    "SessionEvent",
    "SetAck",
    "SmartcardData",
    "SmartcardReady",
    "SpiceChannelConnection",
    "SpiceChannelType",
    "SpiceCommonCap",
    "SpiceError",
    "SpiceFailure",
    "SpiceFrame",
    "SpiceLinkErr",
    "SpiceMainCap",
    "SpiceMessage",
    "SpiceMsg",
    "SpiceMsgMain",
    "SpiceMsgc",
    "SpiceMsgcMain",
    "SpiceNotAServerError",
    "SpiceProtocolError",
    "SpiceSmartcardClient",
    "SpiceStream",
    "TicketEncryptor",
    "VscData",
    "WaitForChannels",
    "caps_from_bits",
    "caps_to_words",
    "decode_link_mess",
    "decode_link_reply_body",
    "decode_server_message",
    "encode_client_message",
    "encode_data_header",
    "encode_link_mess",
    "encode_link_reply",
    "encode_server_message",
    "encrypt_ticket",
    "has_cap",
]

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Constants and wire codes (spice/protocol.h, spice/enums.h)
# ---------------------------------------------------------------------------------------------

#: ``SPICE_MAGIC``: the four bytes "REDQ" that open every link header.
SPICE_MAGIC = b"REDQ"
#: ``SPICE_VERSION_MAJOR`` / ``SPICE_VERSION_MINOR``: protocol 2.2.
SPICE_VERSION_MAJOR = 2
SPICE_VERSION_MINOR = 2
#: ``SPICE_MAX_PASSWORD_LENGTH``: the server refuses longer tickets (spice-gtk too).
MAX_PASSWORD_LENGTH = 60
#: ``SPICE_TICKET_PUBKEY_BYTES`` = 1024 / 8 + 34: a DER SubjectPublicKeyInfo of a 1024-bit key.
TICKET_PUBKEY_BYTES = 1024 // 8 + 34

LINK_HEADER_SIZE = 16  # SpiceLinkHeader: magic, major, minor, size
LINK_MESS_SIZE = 18  # SpiceLinkMess without the capability words
LINK_REPLY_SIZE = 4 + TICKET_PUBKEY_BYTES + 12  # SpiceLinkReply without the capability words
DATA_HEADER_SIZE = 18  # SpiceDataHeader
MINI_HEADER_SIZE = 6  # SpiceMiniDataHeader
#: The server refuses link messages over 4096 bytes (reds.cpp); we hold its reply to the same.
MAX_LINK_SIZE = 4096
_MAX_CAP_WORDS = 1024  # reds.cpp: "Prevent DoS" limit on capability words, both counts


class SpiceChannelType(enum.IntEnum):
    """``SPICE_CHANNEL_*`` (enums.h)."""

    MAIN = 1
    DISPLAY = 2
    INPUTS = 3
    CURSOR = 4
    PLAYBACK = 5
    RECORD = 6
    TUNNEL = 7
    SMARTCARD = 8
    USBREDIR = 9
    PORT = 10
    WEBDAV = 11


class SpiceLinkErr(enum.IntEnum):
    """``SpiceLinkErr`` (enums.h): the error of a link reply, the link result, DISCONNECTING."""

    OK = 0
    ERROR = 1
    INVALID_MAGIC = 2
    INVALID_DATA = 3
    VERSION_MISMATCH = 4
    NEED_SECURED = 5
    NEED_UNSECURED = 6
    PERMISSION_DENIED = 7
    BAD_CONNECTION_ID = 8
    CHANNEL_NOT_AVAILABLE = 9


class SpiceCommonCap(enum.IntEnum):
    """``SPICE_COMMON_CAP_*`` bit numbers (protocol.h); also the values of the auth mechanism."""

    PROTOCOL_AUTH_SELECTION = 0
    AUTH_SPICE = 1
    AUTH_SASL = 2
    MINI_HEADER = 3


class SpiceMainCap(enum.IntEnum):
    """``SPICE_MAIN_CAP_*`` bit numbers (protocol.h)."""

    SEMI_SEAMLESS_MIGRATE = 0
    NAME_AND_UUID = 1
    AGENT_CONNECTED_TOKENS = 2
    SEAMLESS_MIGRATE = 3


class SpiceMsg(enum.IntEnum):
    """Server messages every channel has (``SPICE_MSG_*``, enums.h)."""

    MIGRATE = 1
    MIGRATE_DATA = 2
    SET_ACK = 3
    PING = 4
    WAIT_FOR_CHANNELS = 5
    DISCONNECTING = 6
    NOTIFY = 7
    LIST = 8


class SpiceMsgc(enum.IntEnum):
    """Client messages every channel has (``SPICE_MSGC_*``, enums.h)."""

    ACK_SYNC = 1
    ACK = 2
    PONG = 3
    MIGRATE_FLUSH_MARK = 4
    MIGRATE_DATA = 5
    DISCONNECTING = 6


class SpiceMsgMain(enum.IntEnum):
    """Main channel server messages (``SPICE_MSG_MAIN_*``, enums.h)."""

    MIGRATE_BEGIN = 101
    MIGRATE_CANCEL = 102
    INIT = 103
    CHANNELS_LIST = 104
    MOUSE_MODE = 105
    MULTI_MEDIA_TIME = 106
    AGENT_CONNECTED = 107
    AGENT_DISCONNECTED = 108
    AGENT_DATA = 109
    AGENT_TOKEN = 110
    MIGRATE_SWITCH_HOST = 111
    MIGRATE_END = 112
    NAME = 113
    UUID = 114
    AGENT_CONNECTED_TOKENS = 115
    MIGRATE_BEGIN_SEAMLESS = 116
    MIGRATE_DST_SEAMLESS_ACK = 117
    MIGRATE_DST_SEAMLESS_NACK = 118


class SpiceMsgcMain(enum.IntEnum):
    """Main channel client messages (``SPICE_MSGC_MAIN_*``, enums.h)."""

    CLIENT_INFO = 101
    MIGRATE_CONNECTED = 102
    MIGRATE_CONNECT_ERROR = 103
    ATTACH_CHANNELS = 104
    MOUSE_MODE_REQUEST = 105
    AGENT_START = 106
    AGENT_DATA = 107
    AGENT_TOKEN = 108
    MIGRATE_END = 109
    MIGRATE_DST_DO_SEAMLESS = 110
    MIGRATE_CONNECTED_SEAMLESS = 111


#: ``SPICE_MSG_SMARTCARD_DATA`` and ``SPICE_MSGC_SMARTCARD_DATA``: one VSCard message each.
SMARTCARD_DATA = 101

#: The common capabilities we announce: auth selection, SPICE ticket auth, mini header.
CLIENT_COMMON_CAPS = frozenset(
    {SpiceCommonCap.PROTOCOL_AUTH_SELECTION, SpiceCommonCap.AUTH_SPICE,
     SpiceCommonCap.MINI_HEADER}
)


def _known(enum_type: type[enum.IntEnum], value: int) -> int:
    """An enum member when ``value`` is known, else the plain int (unknown codes are kept)."""
    try:
        return enum_type(value)
    except ValueError:
        return value


def caps_to_words(bits: Iterable[int]) -> tuple[int, ...]:
    """Capability bit numbers as u32 words (bit n is bit n % 32 of word n // 32)."""
    words: list[int] = []
    for bit in bits:
        if bit < 0:
            raise EncodeError(f"capability bit {bit} is negative")
        while len(words) <= bit // 32:
            words.append(0)
        words[bit // 32] |= 1 << (bit % 32)
    return tuple(words)


def caps_from_bits(words: Iterable[int]) -> frozenset[int]:
    """The bit numbers set in capability words."""
    return frozenset(
        index * 32 + bit for index, word in enumerate(words) for bit in range(32) if word >> bit & 1
    )


def has_cap(words: tuple[int, ...], bit: int) -> bool:
    """``test_capability``: is bit ``bit`` set in ``words`` (missing words count as zero)."""
    index = bit // 32
    return index < len(words) and bool(words[index] >> (bit % 32) & 1)


# ---------------------------------------------------------------------------------------------
# Wire formats.  Private: the public API is the dataclasses and functions below.
# ---------------------------------------------------------------------------------------------

# protocol.h: SpiceLinkHeader { uint32 magic; uint32 major_version; uint32 minor_version;
#                               uint32 size; }  -- size counts the bytes after the header
_LINK_HEADER = Struct(
    "magic" / Const(SPICE_MAGIC), "major" / Int32ul, "minor" / Int32ul, "size" / Int32ul
)
# protocol.h: SpiceLinkMess { uint32 connection_id; uint8 channel_type; uint8 channel_id;
#   uint32 num_common_caps; uint32 num_channel_caps; uint32 caps_offset; }, caps after it
_LINK_MESS = Struct(
    "connection_id" / Int32ul, "channel_type" / Int8ul, "channel_id" / Int8ul,
    "num_common_caps" / Int32ul, "num_channel_caps" / Int32ul, "caps_offset" / Int32ul,
)
# protocol.h: SpiceLinkReply { uint32 error; uint8 pub_key[SPICE_TICKET_PUBKEY_BYTES];
#   uint32 num_common_caps; uint32 num_channel_caps; uint32 caps_offset; }, caps after it
_LINK_REPLY = Struct(
    "error" / Int32ul, "pub_key" / Bytes(TICKET_PUBKEY_BYTES),
    "num_common_caps" / Int32ul, "num_channel_caps" / Int32ul, "caps_offset" / Int32ul,
)
# protocol.h: SpiceDataHeader { uint64 serial; uint16 type; uint32 size; uint32 sub_list; }
_DATA_HEADER = Struct(
    "serial" / Int64ul, "type" / Int16ul, "size" / Int32ul, "sub_list" / Int32ul
)
# protocol.h: SpiceMiniDataHeader { uint16 type; uint32 size; }
_MINI_HEADER = Struct("type" / Int16ul, "size" / Int32ul)

# Hot paths with the same layouts (the tests check them against the declarations).
_LINK_HEADER_HOT = struct.Struct("<4sIII")
_DATA_HEADER_HOT = struct.Struct("<QHII")
_MINI_HEADER_HOT = struct.Struct("<HI")
_U32 = struct.Struct("<I")
assert _LINK_HEADER.sizeof() == _LINK_HEADER_HOT.size == LINK_HEADER_SIZE
assert _LINK_MESS.sizeof() == LINK_MESS_SIZE
assert _LINK_REPLY.sizeof() == LINK_REPLY_SIZE
assert _DATA_HEADER.sizeof() == _DATA_HEADER_HOT.size == DATA_HEADER_SIZE
assert _MINI_HEADER.sizeof() == _MINI_HEADER_HOT.size == MINI_HEADER_SIZE

# spice.proto, BaseChannel server messages.  Generated demarshallers check a minimum size and
# allow trailing bytes, so these declarations take what they need and ignore the rest.
_SET_ACK = Struct("generation" / Int32ul, "window" / Int32ul)
_PING = Struct("id" / Int32ul, "timestamp" / Int64ul, "data" / GreedyBytes)
_WAIT_FOR_CHANNELS = Struct(
    "wait_count" / Int8ul,
    "wait_list" / construct.Array(
        this.wait_count,
        Struct("channel_type" / Int8ul, "channel_id" / Int8ul, "message_serial" / Int64ul),
    ),
)
_DISCONNECTING = Struct("time_stamp" / Int64ul, "reason" / Int32ul)
_NOTIFY = Struct(
    "time_stamp" / Int64ul, "severity" / Int32ul, "visibility" / Int32ul, "what" / Int32ul,
    "message_len" / Int32ul, "message" / Bytes(this.message_len), "rest" / GreedyBytes,
)
_MIGRATE = Struct("flags" / Int32ul)
# spice.proto, MainChannel server messages.
_MAIN_INIT = Struct(
    "session_id" / Int32ul, "display_channels_hint" / Int32ul,
    "supported_mouse_modes" / Int32ul, "current_mouse_mode" / Int32ul,
    "agent_connected" / Int32ul, "agent_tokens" / Int32ul, "multi_media_time" / Int32ul,
    "ram_hint" / Int32ul,
)
_CHANNELS_LIST = Struct(
    "num_of_channels" / Int32ul,
    "channels" / construct.Array(this.num_of_channels, Struct("type" / Int8ul, "id" / Int8ul)),
)
# spice.proto, BaseChannel client messages.
_ACK_SYNC = Struct("generation" / Int32ul)
_PONG = Struct("id" / Int32ul, "timestamp" / Int64ul)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


class SpiceFailure(enum.Enum):
    """Why a SPICE session ended or could not start; ``fatal`` ones need the user to act."""

    WRONG_PASSWORD = "wrong password"
    CHANNEL_REFUSED = "channel refused"
    NO_SMARTCARD_CHANNEL = "server without a smartcard channel"
    NOT_SPICE = "not a SPICE server"
    NEED_TLS = "server requires TLS"
    NEED_PLAIN = "server refuses TLS on this channel"
    AUTH_UNSUPPORTED = "server requires an unsupported authentication"
    VERSION_MISMATCH = "protocol version mismatch"
    TLS_FAILED = "TLS handshake failed"
    UNREACHABLE = "server unreachable"
    CLOSED = "server closed the connection"
    PROTOCOL = "bad data from the server"
    TIMEOUT = "server did not answer in time"

    @property
    def fatal(self) -> bool:
        """True when retrying cannot help without a change of configuration."""
        return self not in _TRANSIENT


_TRANSIENT = frozenset(
    {SpiceFailure.UNREACHABLE, SpiceFailure.CLOSED, SpiceFailure.PROTOCOL, SpiceFailure.TIMEOUT}
)


class SpiceError(CcidemuError):
    """A SPICE session failed; :attr:`failure` says which way, the text says the details."""

    def __init__(self, failure: SpiceFailure, message: str) -> None:
        super().__init__(message)
        self.failure = failure

    @property
    def fatal(self) -> bool:
        return self.failure.fatal


class SpiceProtocolError(SpiceError, DecodeError):
    """The server's bytes broke the protocol: a :class:`SpiceError` and a DecodeError."""

    def __init__(self, message: str, failure: SpiceFailure = SpiceFailure.PROTOCOL) -> None:
        DecodeError.__init__(self, message)
        self.failure = failure


class SpiceNotAServerError(SpiceProtocolError):
    """The peer's first bytes are not a SPICE link header ("REDQ")."""

    def __init__(self, message: str) -> None:
        super().__init__(message, SpiceFailure.NOT_SPICE)


_LINK_FAILURES: dict[int, SpiceFailure] = {
    SpiceLinkErr.PERMISSION_DENIED: SpiceFailure.WRONG_PASSWORD,
    SpiceLinkErr.NEED_SECURED: SpiceFailure.NEED_TLS,
    SpiceLinkErr.NEED_UNSECURED: SpiceFailure.NEED_PLAIN,
    SpiceLinkErr.VERSION_MISMATCH: SpiceFailure.VERSION_MISMATCH,
    SpiceLinkErr.CHANNEL_NOT_AVAILABLE: SpiceFailure.CHANNEL_REFUSED,
    SpiceLinkErr.BAD_CONNECTION_ID: SpiceFailure.CHANNEL_REFUSED,
}


def _link_error_name(code: int) -> str:
    return code.name if isinstance(code, SpiceLinkErr) else f"error {code}"


# ---------------------------------------------------------------------------------------------
# Link structures
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LinkMess:
    """``SpiceLinkHeader`` + ``SpiceLinkMess`` + capability words: what a client sends first."""

    connection_id: int
    channel_type: int
    channel_id: int = 0
    common_caps: tuple[int, ...] = ()
    channel_caps: tuple[int, ...] = ()
    major: int = SPICE_VERSION_MAJOR
    minor: int = SPICE_VERSION_MINOR


@dataclass(frozen=True, slots=True)
class LinkReply:
    """``SpiceLinkReply`` and the server's capability words.

    ``error`` is a :class:`SpiceLinkErr` when known; on an error the rest is zero.
    """

    error: int
    pub_key: bytes
    common_caps: tuple[int, ...] = ()
    channel_caps: tuple[int, ...] = ()
    major: int = SPICE_VERSION_MAJOR
    minor: int = SPICE_VERSION_MINOR


@dataclass(frozen=True, slots=True)
class LinkResult:
    """The u32 the server sends after the ticket: :class:`SpiceLinkErr` (OK = linked)."""

    error: int


@dataclass(frozen=True, slots=True)
class SpiceMessage:
    """One data message: ``type`` and body bytes; ``serial`` only with the full header."""

    type: int
    data: bytes
    serial: int | None = None


def _caps_block(common: tuple[int, ...], channel: tuple[int, ...]) -> bytes:
    for word in (*common, *channel):
        if not 0 <= word <= 0xFFFFFFFF:
            raise EncodeError(f"capability word {word:#x} is not a u32")
    return struct.pack(f"<{len(common) + len(channel)}I", *common, *channel)


def encode_link_mess(msg: LinkMess) -> bytes:
    """The client's link bytes: header, ``SpiceLinkMess`` (caps at offset 18), caps."""
    caps = _caps_block(msg.common_caps, msg.channel_caps)
    body = build(_LINK_MESS, {
        "connection_id": msg.connection_id, "channel_type": msg.channel_type,
        "channel_id": msg.channel_id, "num_common_caps": len(msg.common_caps),
        "num_channel_caps": len(msg.channel_caps), "caps_offset": LINK_MESS_SIZE,
    }, "SpiceLinkMess") + caps
    header = build(_LINK_HEADER, {"major": msg.major, "minor": msg.minor, "size": len(body)},
                   "SpiceLinkHeader")
    return header + body


def encode_link_reply(reply: LinkReply) -> bytes:
    """A server's link reply bytes (for tests and fake servers): header, reply, caps."""
    if len(reply.pub_key) != TICKET_PUBKEY_BYTES:
        raise EncodeError(f"pub_key must be {TICKET_PUBKEY_BYTES} bytes, not {len(reply.pub_key)}")
    caps = _caps_block(reply.common_caps, reply.channel_caps)
    body = build(_LINK_REPLY, {
        "error": reply.error, "pub_key": reply.pub_key,
        "num_common_caps": len(reply.common_caps), "num_channel_caps": len(reply.channel_caps),
        "caps_offset": LINK_REPLY_SIZE,
    }, "SpiceLinkReply") + caps
    header = build(_LINK_HEADER, {"major": reply.major, "minor": reply.minor, "size": len(body)},
                   "SpiceLinkHeader")
    return header + body


def _split_caps(
    body: bytes, fixed: int, num_common: int, num_channel: int, offset: int, what: str
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The capability words of a link message/reply body, checked as reds.cpp checks them."""
    if num_common > _MAX_CAP_WORDS or num_channel > _MAX_CAP_WORDS:
        raise DecodeError(f"{what}: {num_common}+{num_channel} capability words (at most "
                          f"{_MAX_CAP_WORDS} each)")
    count = num_common + num_channel
    if count and (offset < fixed or offset + 4 * count > len(body)):
        raise DecodeError(f"{what}: {count} capability words at offset {offset} do not fit "
                          f"in {len(body)} bytes")
    words = struct.unpack_from(f"<{count}I", body, offset) if count else ()
    return tuple(words[:num_common]), tuple(words[num_common:])


def _not_spice(first: bytes) -> SpiceNotAServerError:
    return SpiceNotAServerError(
        f"the peer is not a SPICE server: its first bytes are {first!r}, not {SPICE_MAGIC!r}")


def _decode_link_header(data: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    magic, major, minor, size = _LINK_HEADER_HOT.unpack_from(data)
    if magic != SPICE_MAGIC:
        raise _not_spice(bytes(magic))
    return major, minor, size


def decode_link_reply_body(body: bytes, major: int = 2, minor: int = 2) -> LinkReply:
    """A ``SpiceLinkReply`` body (after the link header) into :class:`LinkReply`."""
    if len(body) < LINK_REPLY_SIZE:
        raise DecodeError(f"SpiceLinkReply needs {LINK_REPLY_SIZE} bytes, got {len(body)}")
    fields = parse(_LINK_REPLY, body, "SpiceLinkReply")
    error = _known(SpiceLinkErr, fields.error)
    if error != SpiceLinkErr.OK:  # the server zeroes the rest of a refusal
        return LinkReply(error, bytes(fields.pub_key), (), (), major, minor)
    common, channel = _split_caps(body, LINK_REPLY_SIZE, fields.num_common_caps,
                                  fields.num_channel_caps, fields.caps_offset, "SpiceLinkReply")
    return LinkReply(error, bytes(fields.pub_key), common, channel, major, minor)


def decode_link_mess(data: bytes | bytearray | memoryview) -> tuple[LinkMess, int]:
    """A client's link bytes (header + ``SpiceLinkMess``): the message and the bytes used."""
    if len(data) < LINK_HEADER_SIZE:
        raise DecodeError(f"SpiceLinkHeader needs {LINK_HEADER_SIZE} bytes, got {len(data)}")
    major, minor, size = _decode_link_header(data)
    if size < LINK_MESS_SIZE or size > MAX_LINK_SIZE:
        raise DecodeError(f"SpiceLinkMess size {size} outside {LINK_MESS_SIZE}..{MAX_LINK_SIZE}")
    end = LINK_HEADER_SIZE + size
    if len(data) < end:
        raise DecodeError(f"SpiceLinkMess truncated: need {end} bytes, got {len(data)}")
    body = bytes(data[LINK_HEADER_SIZE:end])
    fields = parse(_LINK_MESS, body, "SpiceLinkMess")
    common, channel = _split_caps(body, LINK_MESS_SIZE, fields.num_common_caps,
                                  fields.num_channel_caps, fields.caps_offset, "SpiceLinkMess")
    return LinkMess(fields.connection_id, fields.channel_type, fields.channel_id, common, channel,
                    major, minor), end


def encode_data_header(type_: int, size: int, *, mini: bool, serial: int = 0) -> bytes:
    """The header of a data message (mini: type, size; full: serial, type, size, sub_list 0)."""
    if mini:
        return build(_MINI_HEADER, {"type": type_, "size": size}, "SpiceMiniDataHeader")
    return build(_DATA_HEADER, {"serial": serial, "type": type_, "size": size, "sub_list": 0},
                 "SpiceDataHeader")


def encrypt_ticket(pub_key: bytes, password: bytes) -> bytes:
    """``password`` + NUL, RSA-OAEP (SHA-1, MGF1-SHA-1) with the server's DER public key.

    reds.cpp decrypts with ``RSA_PKCS1_OAEP_PADDING`` (OpenSSL's OAEP is SHA-1) and compares up
    to the NUL; spice-gtk encrypts ``strlen(password) + 1`` bytes.  DecodeError if ``pub_key``
    is not an RSA key; the result is as long as the key's modulus (128 bytes for 1024 bits).
    """
    try:
        key = load_der_public_key(bytes(pub_key))
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise DecodeError(f"the server's ticket key is not a DER public key: {exc}") from None
    if not isinstance(key, RSAPublicKey):
        raise DecodeError(f"the server's ticket key is {type(key).__name__}, not RSA")
    try:
        return key.encrypt(
            bytes(password) + b"\0",
            padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None),
        )
    except ValueError as exc:  # a tiny modulus from a broken server
        raise DecodeError(f"cannot encrypt the ticket with the server's key: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Message bodies
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SetAck:
    """``SPICE_MSG_SET_ACK``: answer ``ACK_SYNC(generation)``, then ``ACK`` every ``window``."""

    generation: int
    window: int


@dataclass(frozen=True, slots=True)
class Ping:
    """``SPICE_MSG_PING``: id, timestamp, then padding (the net test pads 256,000 bytes)."""

    id: int
    timestamp: int
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class WaitForChannels:
    """``SPICE_MSG_WAIT_FOR_CHANNELS``: (channel type, id, message serial) triples."""

    waits: tuple[tuple[int, int, int], ...]


@dataclass(frozen=True, slots=True)
class Disconnecting:
    """``SPICE_MSG_DISCONNECTING``: the server is about to close; ``reason`` a link error."""

    time_stamp: int
    reason: int


@dataclass(frozen=True, slots=True)
class Notify:
    """``SPICE_MSG_NOTIFY``: severity (0 info, 1 warn, 2 error), visibility, code, text."""

    time_stamp: int
    severity: int
    visibility: int
    what: int
    message: bytes

    @property
    def text(self) -> str:
        return self.message.decode("utf-8", errors="replace")


@dataclass(frozen=True, slots=True)
class Migrate:
    """``SPICE_MSG_MIGRATE`` (flags: 1 need flush, 2 need data transfer); not supported."""

    flags: int


@dataclass(frozen=True, slots=True)
class MainInit:
    """``SPICE_MSG_MAIN_INIT``; ``session_id`` is the connection id of the other channels."""

    session_id: int
    display_channels_hint: int = 0
    supported_mouse_modes: int = 1
    current_mouse_mode: int = 1
    agent_connected: int = 0
    agent_tokens: int = 0
    multi_media_time: int = 0
    ram_hint: int = 0


@dataclass(frozen=True, slots=True)
class ChannelsList:
    """``SPICE_MSG_MAIN_CHANNELS_LIST``: (type, id) of every channel the server offers."""

    channels: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class SmartcardData:
    """``SPICE_MSG(C)_SMARTCARD_DATA``: one little-endian VSCard message (header + payload)."""

    data: bytes


ServerMessage = (
    SetAck | Ping | WaitForChannels | Disconnecting | Notify | Migrate | MainInit | ChannelsList
    | SmartcardData | SpiceMessage
)


@dataclass(frozen=True, slots=True)
class AckSync:
    """``SPICE_MSGC_ACK_SYNC``: the generation of the SET_ACK it answers."""

    generation: int


@dataclass(frozen=True, slots=True)
class Ack:
    """``SPICE_MSGC_ACK``: ``window`` more messages received (empty body)."""


@dataclass(frozen=True, slots=True)
class Pong:
    """``SPICE_MSGC_PONG``: the id and timestamp of the PING it answers."""

    id: int
    timestamp: int


@dataclass(frozen=True, slots=True)
class AttachChannels:
    """``SPICE_MSGC_MAIN_ATTACH_CHANNELS`` (empty): asks for ``CHANNELS_LIST``."""


@dataclass(frozen=True, slots=True)
class ClientDisconnecting:
    """``SPICE_MSGC_DISCONNECTING``: a polite goodbye (the server only logs it)."""

    time_stamp: int = 0
    reason: int = SpiceLinkErr.OK


ClientMessage = AckSync | Ack | Pong | AttachChannels | ClientDisconnecting | SmartcardData


def decode_server_message(channel_type: int, msg: SpiceMessage) -> ServerMessage:
    """The typed body of a server message on a channel of ``channel_type``.

    Base messages on every channel, INIT and CHANNELS_LIST on the main channel, DATA on the
    smartcard channel; anything else comes back as ``msg`` itself.  DecodeError on a body that
    is too short for its type.
    """
    t, data = msg.type, msg.data
    if t == SMARTCARD_DATA and channel_type == SpiceChannelType.SMARTCARD:
        return SmartcardData(data)
    if t == SpiceMsg.PING:
        f = parse(_PING, data, "SpiceMsgPing")
        return Ping(f.id, f.timestamp, bytes(f.data))
    if t == SpiceMsg.SET_ACK:
        f = parse(_SET_ACK, data, "SpiceMsgSetAck")
        return SetAck(f.generation, f.window)
    if t == SpiceMsg.NOTIFY:
        f = parse(_NOTIFY, data, "SpiceMsgNotify")
        return Notify(f.time_stamp, f.severity, f.visibility, f.what, bytes(f.message))
    if t == SpiceMsg.DISCONNECTING:
        f = parse(_DISCONNECTING, data, "SpiceMsgDisconnect")
        return Disconnecting(f.time_stamp, _known(SpiceLinkErr, f.reason))
    if t == SpiceMsg.WAIT_FOR_CHANNELS:
        f = parse(_WAIT_FOR_CHANNELS, data, "SpiceMsgWaitForChannels")
        return WaitForChannels(tuple(
            (w.channel_type, w.channel_id, w.message_serial) for w in f.wait_list
        ))
    if t == SpiceMsg.MIGRATE:
        return Migrate(parse(_MIGRATE, data, "SpiceMsgMigrate").flags)
    if channel_type == SpiceChannelType.MAIN:
        if t == SpiceMsgMain.INIT:
            f = parse(_MAIN_INIT, data, "SpiceMsgMainInit")
            return MainInit(f.session_id, f.display_channels_hint, f.supported_mouse_modes,
                            f.current_mouse_mode, f.agent_connected, f.agent_tokens,
                            f.multi_media_time, f.ram_hint)
        if t == SpiceMsgMain.CHANNELS_LIST:
            f = parse(_CHANNELS_LIST, data, "SpiceMsgChannels")
            return ChannelsList(tuple((c.type, c.id) for c in f.channels))
    return msg


def encode_server_message(msg: ServerMessage) -> SpiceMessage:
    """The type and body of a server message (for tests and fake servers)."""
    if isinstance(msg, SpiceMessage):
        return msg
    if isinstance(msg, SmartcardData):
        return SpiceMessage(SMARTCARD_DATA, bytes(msg.data))
    if isinstance(msg, Ping):
        return SpiceMessage(SpiceMsg.PING, build(
            _PING, {"id": msg.id, "timestamp": msg.timestamp, "data": msg.data}, "SpiceMsgPing"))
    if isinstance(msg, SetAck):
        return SpiceMessage(SpiceMsg.SET_ACK, build(
            _SET_ACK, {"generation": msg.generation, "window": msg.window}, "SpiceMsgSetAck"))
    if isinstance(msg, Notify):
        return SpiceMessage(SpiceMsg.NOTIFY, build(_NOTIFY, {
            "time_stamp": msg.time_stamp, "severity": msg.severity,
            "visibility": msg.visibility, "what": msg.what, "message_len": len(msg.message),
            "message": msg.message, "rest": b"\0",  # the server sends the NUL too
        }, "SpiceMsgNotify"))
    if isinstance(msg, Disconnecting):
        return SpiceMessage(SpiceMsg.DISCONNECTING, build(
            _DISCONNECTING, {"time_stamp": msg.time_stamp, "reason": msg.reason},
            "SpiceMsgDisconnect"))
    if isinstance(msg, WaitForChannels):
        return SpiceMessage(SpiceMsg.WAIT_FOR_CHANNELS, build(_WAIT_FOR_CHANNELS, {
            "wait_count": len(msg.waits),
            "wait_list": [{"channel_type": t, "channel_id": i, "message_serial": s}
                          for t, i, s in msg.waits],
        }, "SpiceMsgWaitForChannels"))
    if isinstance(msg, Migrate):
        return SpiceMessage(SpiceMsg.MIGRATE, build(_MIGRATE, {"flags": msg.flags},
                                                    "SpiceMsgMigrate"))
    if isinstance(msg, MainInit):
        return SpiceMessage(SpiceMsgMain.INIT, build(_MAIN_INIT, {
            "session_id": msg.session_id, "display_channels_hint": msg.display_channels_hint,
            "supported_mouse_modes": msg.supported_mouse_modes,
            "current_mouse_mode": msg.current_mouse_mode, "agent_connected": msg.agent_connected,
            "agent_tokens": msg.agent_tokens, "multi_media_time": msg.multi_media_time,
            "ram_hint": msg.ram_hint,
        }, "SpiceMsgMainInit"))
    if isinstance(msg, ChannelsList):
        return SpiceMessage(SpiceMsgMain.CHANNELS_LIST, build(_CHANNELS_LIST, {
            "num_of_channels": len(msg.channels),
            "channels": [{"type": t, "id": i} for t, i in msg.channels],
        }, "SpiceMsgChannels"))
    raise EncodeError(f"cannot encode {msg!r}")


def encode_client_message(msg: ClientMessage) -> SpiceMessage:
    """The type and body of one of our messages."""
    if isinstance(msg, SmartcardData):
        return SpiceMessage(SMARTCARD_DATA, bytes(msg.data))
    if isinstance(msg, Pong):
        return SpiceMessage(SpiceMsgc.PONG, build(
            _PONG, {"id": msg.id, "timestamp": msg.timestamp}, "SpiceMsgPing"))
    if isinstance(msg, AckSync):
        return SpiceMessage(SpiceMsgc.ACK_SYNC, build(
            _ACK_SYNC, {"generation": msg.generation}, "SpiceMsgcAckSync"))
    if isinstance(msg, Ack):
        return SpiceMessage(SpiceMsgc.ACK, b"")
    if isinstance(msg, AttachChannels):
        return SpiceMessage(SpiceMsgcMain.ATTACH_CHANNELS, b"")
    if isinstance(msg, ClientDisconnecting):
        return SpiceMessage(SpiceMsgc.DISCONNECTING, build(
            _DISCONNECTING, {"time_stamp": msg.time_stamp, "reason": msg.reason},
            "SpiceMsgDisconnect"))
    raise EncodeError(f"cannot encode {msg!r}")


# ---------------------------------------------------------------------------------------------
# Framing of one connection
# ---------------------------------------------------------------------------------------------

SpiceFrame = LinkReply | LinkResult | SpiceMessage


class _Phase(enum.Enum):
    REPLY = "link reply"
    RESULT = "link result"
    MESSAGES = "messages"
    DONE = "done"


class SpiceStream(FrameStream[SpiceFrame]):
    """The server's side of one SPICE connection, framed: link reply, link result, messages.

    ``mini_header``: we asked for ``MINI_HEADER``; the messages use it when the server's reply
    offers it too.  A refused link (reply error) or a failed link result ends the stream: any
    byte after it is a DecodeError.  Message sizes above ``max_length`` are refused as soon as
    their header is in.  Errors follow :class:`ccidemu._wire.FrameStream`.
    """

    what = "SPICE stream"

    def __init__(self, *, mini_header: bool = True, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        super().__init__(max_length)
        self.asked_mini = mini_header
        self.mini: bool | None = None  # decided by the link reply
        self._phase = _Phase.REPLY

    def _cut(self, buf: bytearray, events: deque[SpiceFrame]) -> int:
        start = 0
        size = len(buf)
        while True:
            phase = self._phase
            if phase is _Phase.MESSAGES:
                return start + self._cut_messages(buf, start, events)
            if phase is _Phase.DONE:
                if size > start:
                    raise DecodeError(f"{size - start} bytes after the link ended")
                return start
            if phase is _Phase.REPLY:
                if size - start >= 4 and buf[start:start + 4] != SPICE_MAGIC:
                    raise _not_spice(bytes(buf[start:start + 4]))
                if size - start < LINK_HEADER_SIZE:
                    return start
                _magic, major, minor, length = _LINK_HEADER_HOT.unpack_from(buf, start)
                if major != SPICE_VERSION_MAJOR:
                    raise SpiceProtocolError(
                        f"server speaks SPICE protocol {major}.{minor}, not "
                        f"{SPICE_VERSION_MAJOR}.x", SpiceFailure.VERSION_MISMATCH)
                if length < 4:
                    raise DecodeError(f"SpiceLinkReply size {length} is too small")
                check_length(length, MAX_LINK_SIZE, "SpiceLinkReply")
                end = start + LINK_HEADER_SIZE + length
                if end > size:
                    return start
                body = bytes(buf[start + LINK_HEADER_SIZE:end])
                if len(body) < LINK_REPLY_SIZE:
                    # reds_send_link_error writes a whole zeroed reply, but accept an error
                    # code alone; an OK reply must be whole.
                    code = _known(SpiceLinkErr, _U32.unpack_from(body)[0])
                    if code == SpiceLinkErr.OK:
                        raise DecodeError(
                            f"SpiceLinkReply needs {LINK_REPLY_SIZE} bytes, got {len(body)}")
                    reply = LinkReply(code, b"", (), (), major, minor)
                else:
                    reply = decode_link_reply_body(body, major, minor)
                events.append(reply)
                start = end
                if reply.error != SpiceLinkErr.OK:
                    self._phase = _Phase.DONE
                else:
                    self.mini = self.asked_mini and has_cap(
                        reply.common_caps, SpiceCommonCap.MINI_HEADER)
                    self._phase = _Phase.RESULT
                continue
            # _Phase.RESULT
            if size - start < 4:
                return start
            result = LinkResult(_known(SpiceLinkErr, _U32.unpack_from(buf, start)[0]))
            events.append(result)
            start += 4
            self._phase = _Phase.MESSAGES if result.error == SpiceLinkErr.OK else _Phase.DONE

    def _cut_messages(self, buf: bytearray, start: int, events: deque[SpiceFrame]) -> int:
        begin = start
        size = len(buf)
        max_length = self.max_length
        if self.mini:
            unpack = _MINI_HEADER_HOT.unpack_from
            while size - start >= MINI_HEADER_SIZE:
                type_, length = unpack(buf, start)
                check_length(length, max_length, "SPICE message")
                end = start + MINI_HEADER_SIZE + length
                if end > size:
                    break
                events.append(SpiceMessage(type_, bytes(buf[start + MINI_HEADER_SIZE:end])))
                start = end
        else:
            unpack_full = _DATA_HEADER_HOT.unpack_from
            while size - start >= DATA_HEADER_SIZE:
                serial, type_, length, _sub_list = unpack_full(buf, start)
                check_length(length, max_length, "SPICE message")
                end = start + DATA_HEADER_SIZE + length
                if end > size:
                    break
                events.append(
                    SpiceMessage(type_, bytes(buf[start + DATA_HEADER_SIZE:end]), serial))
                start = end
        return start - begin


# ---------------------------------------------------------------------------------------------
# One channel connection
# ---------------------------------------------------------------------------------------------


class ChannelState(enum.Enum):
    IDLE = "idle"
    LINKING = "linking"  # link message sent, waiting for the reply
    AUTHENTICATING = "authenticating"  # ticket sent, waiting for the result
    READY = "ready"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class ChannelReady:
    """The link succeeded; the server's capabilities; ``mini_header`` in use."""

    common_caps: tuple[int, ...]
    channel_caps: tuple[int, ...]
    mini_header: bool


@dataclass(frozen=True, slots=True)
class ChannelMessage:
    """A message for the channel's user (anything but PING, SET_ACK and LIST)."""

    message: ServerMessage


@dataclass(frozen=True, slots=True)
class ChannelClosed:
    """The connection is over (``error`` None: we closed it, or the server did cleanly)."""

    error: SpiceError | None


ChannelEvent = ChannelReady | ChannelMessage | ChannelClosed

#: Encrypts the ticket: (server's DER public key, password) -> encrypted bytes.
TicketEncryptor = Callable[[bytes, bytes], bytes]


class SpiceChannelConnection:
    """One SPICE channel connection, client side.  Sans-I/O: feed :meth:`receive_data`, drain
    :meth:`next_event`, write what :meth:`data_to_send` returns (see the module docstring,
    steps 1 to 3).  PING and SET_ACK are answered inside; :attr:`pings` counts the PONGs.
    """

    def __init__(
        self,
        channel_type: int,
        channel_id: int = 0,
        *,
        connection_id: int = 0,
        password: bytes = b"",
        mini_header: bool = True,
        max_length: int = DEFAULT_MAX_LENGTH,
        encrypt: TicketEncryptor = encrypt_ticket,
        label: str = "spice",
    ) -> None:
        if len(password) > MAX_PASSWORD_LENGTH:
            raise ConfigError(f"SPICE passwords are at most {MAX_PASSWORD_LENGTH} bytes")
        self.channel_type = channel_type
        self.channel_id = channel_id
        self.connection_id = connection_id
        self.label = label
        self._password = password
        self._encrypt = encrypt
        self._stream = SpiceStream(mini_header=mini_header, max_length=max_length)
        self._state = ChannelState.IDLE
        self._out: list[bytes] = []
        self._events: deque[ChannelEvent] = deque()
        self._serial = 0
        self._ack_window = 0
        self._ack_count = 0
        self.server_common_caps: tuple[int, ...] = ()
        self.server_channel_caps: tuple[int, ...] = ()
        self.error: SpiceError | None = None
        #: PINGs answered, ACKs sent, messages received after the link.
        self.pings = 0
        self.acks = 0
        self.received = 0
        self.last_received = 0.0

    def __repr__(self) -> str:
        name = _known(SpiceChannelType, self.channel_type)
        return f"<SpiceChannelConnection {getattr(name, 'name', name)} {self._state.value}>"

    @property
    def state(self) -> ChannelState:
        return self._state

    @property
    def ready(self) -> bool:
        return self._state is ChannelState.READY

    @property
    def closed(self) -> bool:
        return self._state is ChannelState.CLOSED

    @property
    def mini_header(self) -> bool:
        return bool(self._stream.mini)

    def start(self, now: float) -> None:
        """Queue the link message.  Call once, when the connection is open."""
        if self._state is not ChannelState.IDLE:
            return
        self._state = ChannelState.LINKING
        self.last_received = now
        self._out.append(encode_link_mess(LinkMess(
            self.connection_id, self.channel_type, self.channel_id,
            caps_to_words(CLIENT_COMMON_CAPS if self._stream.asked_mini
                          else CLIENT_COMMON_CAPS - {SpiceCommonCap.MINI_HEADER}),
        )))

    def data_to_send(self) -> bytes:
        """Everything queued for the server since the last call, possibly b""."""
        if not self._out:
            return b""
        out, self._out = self._out, []
        return out[0] if len(out) == 1 else b"".join(out)

    def next_event(self) -> ChannelEvent | None:
        return self._events.popleft() if self._events else None

    def send(self, msg: ClientMessage) -> None:
        """Queue one of our messages (the link must be up)."""
        if self._state is not ChannelState.READY:
            raise EncodeError(f"cannot send {type(msg).__name__} on a channel that is "
                              f"{self._state.value}")
        self._queue(encode_client_message(msg))

    def send_raw(self, type_: int, body: bytes) -> None:
        """Queue a message given by type and body (the link must be up)."""
        if self._state is not ChannelState.READY:
            raise EncodeError(f"cannot send message {type_} on a channel that is "
                              f"{self._state.value}")
        self._queue(SpiceMessage(type_, body))

    def _queue(self, msg: SpiceMessage) -> None:
        self._serial += 1
        mini = bool(self._stream.mini)
        if mini:
            header = _MINI_HEADER_HOT.pack(msg.type, len(msg.data))
        else:
            header = _DATA_HEADER_HOT.pack(self._serial, msg.type, len(msg.data), 0)
        self._out.append(header + msg.data)

    def close(self, error: SpiceError | None = None) -> None:
        """End the connection now (nothing more is sent or reported after the event)."""
        if self._state is ChannelState.CLOSED:
            return
        self._state = ChannelState.CLOSED
        self.error = error
        self._out.clear()
        self._events.append(ChannelClosed(error))

    def connection_lost(self, now: float) -> None:
        """The server closed the connection (EOF)."""
        if self._state is ChannelState.CLOSED:
            return
        if self._state is ChannelState.READY:
            error = SpiceError(SpiceFailure.CLOSED, f"{self.label}: the server closed the "
                               "connection")
        elif self._state is ChannelState.LINKING:
            error = self._closed_while_linking()
        else:
            error = SpiceError(SpiceFailure.CLOSED, f"{self.label}: the server closed the "
                               "connection during authentication")
        self.close(error)

    def _closed_while_linking(self) -> SpiceError:
        if self.channel_type != SpiceChannelType.MAIN:
            # reds.cpp: a link to a channel the server does not have is dropped without a
            # reply ("Received wrong header: channel_type != SPICE_CHANNEL_MAIN").
            name = _known(SpiceChannelType, self.channel_type)
            return SpiceError(SpiceFailure.CHANNEL_REFUSED, f"{self.label}: the server closed "
                              f"the connection without a link reply: it has no "
                              f"{getattr(name, 'name', name)} channel {self.channel_id}")
        return SpiceError(SpiceFailure.NOT_SPICE, f"{self.label}: the peer closed the "
                          "connection without a SPICE link reply")

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> None:
        """Bytes from the server.  Never raises: a bad stream closes the connection."""
        if self._state is ChannelState.CLOSED or not data:
            return
        self.last_received = now
        stream = self._stream
        try:
            stream.receive_data(data)
            while (frame := stream.next_event()) is not None:
                self._on_frame(frame)
                if self.closed:
                    return
        except SpiceError as exc:  # SpiceProtocolError: also a DecodeError
            self.close(exc)
        except DecodeError as exc:
            self.close(SpiceProtocolError(f"{self.label}: {exc}"))

    def _on_frame(self, frame: SpiceFrame) -> None:
        if type(frame) is SpiceMessage:
            self._on_message(frame)
        elif isinstance(frame, LinkReply):
            self._on_link_reply(frame)
        elif isinstance(frame, LinkResult):
            self._on_link_result(frame)

    def _on_link_reply(self, reply: LinkReply) -> None:
        if self._state is not ChannelState.LINKING:
            raise DecodeError("a link reply outside the link phase")
        if reply.error != SpiceLinkErr.OK:
            self._refused(reply.error, "link")
            return
        self.server_common_caps = reply.common_caps
        self.server_channel_caps = reply.channel_caps
        if has_cap(reply.common_caps, SpiceCommonCap.PROTOCOL_AUTH_SELECTION):
            if not has_cap(reply.common_caps, SpiceCommonCap.AUTH_SPICE):
                sasl = has_cap(reply.common_caps, SpiceCommonCap.AUTH_SASL)
                self.close(SpiceError(
                    SpiceFailure.AUTH_UNSUPPORTED,
                    f"{self.label}: the server offers "
                    f"{'only SASL' if sasl else 'no'} authentication; ccidemu supports the "
                    "SPICE ticket (password) only"))
                return
            self._out.append(_U32.pack(SpiceCommonCap.AUTH_SPICE))
        self._out.append(self._encrypt(reply.pub_key, self._password))
        self._state = ChannelState.AUTHENTICATING

    def _on_link_result(self, result: LinkResult) -> None:
        if self._state is not ChannelState.AUTHENTICATING:
            raise DecodeError("a link result before the ticket was sent")
        if result.error != SpiceLinkErr.OK:
            self._refused(result.error, "ticket")
            return
        self._state = ChannelState.READY
        self._events.append(ChannelReady(
            self.server_common_caps, self.server_channel_caps, bool(self._stream.mini)))

    def _refused(self, code: int, step: str) -> None:
        failure = _LINK_FAILURES.get(code, SpiceFailure.CHANNEL_REFUSED)
        name = _known(SpiceChannelType, self.channel_type)
        channel = f"{getattr(name, 'name', name)} channel".lower()
        if failure is SpiceFailure.WRONG_PASSWORD:
            text = "the server refused the password (wrong SPICE password, or expired)"
        elif failure is SpiceFailure.NEED_TLS:
            text = f"the server requires TLS for the {channel}: use its TLS port"
        elif failure is SpiceFailure.NEED_PLAIN:
            text = f"the server refuses TLS for the {channel}: use its plain port"
        else:
            text = f"the server refused the {channel} ({_link_error_name(code)} at the {step})"
        self.close(SpiceError(failure, f"{self.label}: {text}"))

    def _on_message(self, msg: SpiceMessage) -> None:
        self.received += 1
        # Flow control (spice-gtk spice_channel_recv_msg): count every message, ACK a window.
        if self._ack_count:
            self._ack_count -= 1
            if not self._ack_count:
                self._queue(SpiceMessage(SpiceMsgc.ACK, b""))
                self.acks += 1
                self._ack_count = self._ack_window
        t = msg.type
        if t == SMARTCARD_DATA and self.channel_type == SpiceChannelType.SMARTCARD:
            self._events.append(ChannelMessage(SmartcardData(msg.data)))  # the hot path
            return
        typed = decode_server_message(self.channel_type, msg)
        if isinstance(typed, Ping):
            self.pings += 1
            self._queue(encode_client_message(Pong(typed.id, typed.timestamp)))
            return
        if isinstance(typed, SetAck):
            self._queue(encode_client_message(AckSync(typed.generation)))
            self._ack_window = self._ack_count = typed.window
            return
        if t == SpiceMsg.LIST:
            log.warning("%s: SPICE_MSG_LIST (sub-messages) not supported; ignored", self.label)
            return
        self._events.append(ChannelMessage(typed))


# ---------------------------------------------------------------------------------------------
# The session: main channel + smartcard channel
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpenSmartcardChannel:
    """Open a second connection to the same server, then call ``smartcard_connected``."""

    session_id: int


@dataclass(frozen=True, slots=True)
class SmartcardReady:
    """The smartcard channel is up: VSCard bytes may flow (:meth:`send_vsc`)."""

    session_id: int


@dataclass(frozen=True, slots=True)
class VscData:
    """VSCard bytes from the server (one or more whole messages, little-endian)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class ServerNotice:
    """A NOTIFY or DISCONNECTING from the server, as text for the log."""

    channel: int
    text: str


@dataclass(frozen=True, slots=True)
class SessionClosed:
    """The session is over: close both connections.  ``error`` None after :meth:`close`."""

    error: SpiceError | None


SessionEvent = OpenSmartcardChannel | SmartcardReady | VscData | ServerNotice | SessionClosed


class _SessionPhase(enum.Enum):
    MAIN_LINK = "linking the main channel"
    MAIN_INIT = "waiting for the main channel's INIT"
    CHANNELS = "waiting for the channel list"
    SMARTCARD_OPEN = "opening the smartcard channel"
    SMARTCARD_LINK = "linking the smartcard channel"
    READY = "ready"
    CLOSED = "closed"


_VSC_HEADER = struct.Struct("<III")  # VSCMsgHeader inside SPICE: u32 type, reader_id, length


class _VscFrames(FrameStream[bytes]):
    """Our own VSCard byte stream cut into whole messages (header + payload bytes), one per
    SPICE message 101: the framing of vscard_common.h, little-endian, payloads untouched."""

    what = "VSCard stream for the server"

    def _cut(self, buf: bytearray, events: deque[bytes]) -> int:
        start = 0
        size = len(buf)
        while size - start >= 12:
            _type, _reader, length = _VSC_HEADER.unpack_from(buf, start)
            check_length(length, self.max_length, "VSCard message")
            end = start + 12 + length
            if end > size:
                break
            events.append(bytes(buf[start:end]))
            start = end
        return start


class SpiceSmartcardClient:
    """A SPICE session that carries one VSCard stream (see the module docstring, steps 4, 5).

    Sans-I/O over two connections, named by :class:`SpiceChannelType` (``MAIN``,
    ``SMARTCARD``): feed each one's bytes to :meth:`receive_data`, write
    :meth:`data_to_send` for each, drain :meth:`next_event`.  ``password``: the SPICE ticket
    (empty when ticketing is disabled).  ``setup_timeout``: seconds from :meth:`start` until
    the smartcard channel must be up.  ``idle_timeout``: fail when the main channel is silent
    that long (None: never; the server pings idle TCP main channels every 15 s or so).
    """

    def __init__(
        self,
        password: str | bytes = b"",
        *,
        channel_id: int = 0,
        setup_timeout: float = 10.0,
        idle_timeout: float | None = None,
        max_length: int = DEFAULT_MAX_LENGTH,
        encrypt: TicketEncryptor = encrypt_ticket,
        label: str = "spice",
    ) -> None:
        secret = password.encode("utf-8") if isinstance(password, str) else bytes(password)
        if len(secret) > MAX_PASSWORD_LENGTH:
            raise ConfigError(f"SPICE passwords are at most {MAX_PASSWORD_LENGTH} bytes")
        self.label = label
        self.channel_id = channel_id
        self.setup_timeout = setup_timeout
        self.idle_timeout = idle_timeout
        self._password = secret
        self._encrypt = encrypt
        self._max_length = max_length
        self.main = SpiceChannelConnection(
            SpiceChannelType.MAIN, 0, password=secret, max_length=max_length, encrypt=encrypt,
            label=f"{label} main channel")
        self.smartcard: SpiceChannelConnection | None = None
        self.session_id: int | None = None
        self.channels: tuple[tuple[int, int], ...] | None = None
        self._phase = _SessionPhase.MAIN_LINK
        self._events: deque[SessionEvent] = deque()
        self._vsc_out = _VscFrames(max_length)  # our VSCard bytes, cut into messages
        self._started_at: float | None = None
        self.error: SpiceError | None = None

    # ---------------------------------------------------------------- state

    @property
    def phase(self) -> str:
        return self._phase.value

    @property
    def ready(self) -> bool:
        return self._phase is _SessionPhase.READY

    @property
    def closed(self) -> bool:
        return self._phase is _SessionPhase.CLOSED

    def _channel(self, channel: int) -> SpiceChannelConnection | None:
        if channel == SpiceChannelType.MAIN:
            return self.main
        if channel == SpiceChannelType.SMARTCARD:
            return self.smartcard
        raise ValueError(f"no connection for channel type {channel}")

    # ---------------------------------------------------------------- I/O side

    def start(self, now: float) -> None:
        """The main connection is open: queue its link message."""
        if self._started_at is None:
            self._started_at = now
            self.main.start(now)

    def smartcard_connected(self, now: float) -> None:
        """The connection asked for by :class:`OpenSmartcardChannel` is open."""
        if self._phase is not _SessionPhase.SMARTCARD_OPEN or self.smartcard is None:
            return
        self._phase = _SessionPhase.SMARTCARD_LINK
        self.smartcard.start(now)

    def receive_data(self, channel: int, data: bytes | bytearray | memoryview, now: float) -> None:
        """Bytes from the server on ``channel``.  Never raises."""
        conn = self._channel(channel)
        if conn is None or self._phase is _SessionPhase.CLOSED:
            return
        conn.receive_data(data, now)
        self._pump(conn, now)

    def connection_lost(self, channel: int, now: float) -> None:
        """The server closed ``channel``'s connection (EOF or a socket error)."""
        conn = self._channel(channel)
        if conn is None or self._phase is _SessionPhase.CLOSED:
            return
        conn.connection_lost(now)
        self._pump(conn, now)

    def connect_failed(self, channel: int, error: SpiceError | str) -> None:
        """Opening ``channel``'s connection failed (refused, unreachable, TLS): the session
        ends with ``error`` (a reason string becomes an ``UNREACHABLE`` error)."""
        if isinstance(error, str):
            error = SpiceError(SpiceFailure.UNREACHABLE, f"{self.label}: cannot connect the "
                               f"{_channel_name(channel)} channel: {error}")
        self._fail(error)

    def data_to_send(self, channel: int) -> bytes:
        conn = self._channel(channel)
        return b"" if conn is None else conn.data_to_send()

    def next_event(self) -> SessionEvent | None:
        return self._events.popleft() if self._events else None

    def send_vsc(self, data: bytes | bytearray | memoryview) -> None:
        """VSCard bytes (little-endian, whole or partial messages) for the server.

        Cut into messages, one per ``SPICE_MSGC_SMARTCARD_DATA``; held until the smartcard
        channel is up; dropped once the session is closed.  EncodeError for a message longer
        than ``max_length`` (our own bug: the session never builds one).
        """
        if self._phase is _SessionPhase.CLOSED or not data:
            return
        try:
            self._vsc_out.receive_data(data)
        except DecodeError as exc:  # only after an earlier over-long message of ours
            raise EncodeError(str(exc)) from None
        if self._phase is _SessionPhase.READY:
            self._flush_vsc()

    def _flush_vsc(self) -> None:
        conn = self.smartcard
        assert conn is not None
        frames = self._vsc_out
        try:
            while (message := frames.next_event()) is not None:
                conn.send_raw(SMARTCARD_DATA, message)
        except DecodeError as exc:
            raise EncodeError(f"{self.label}: {exc}") from None

    def close(self, now: float) -> None:
        """We end the session (polite DISCONNECTING on the main channel first, if up)."""
        if self._phase is _SessionPhase.CLOSED:
            return
        if self.main.ready:
            self.main.send(ClientDisconnecting(0, SpiceLinkErr.OK))
        self._phase = _SessionPhase.CLOSED
        self._events.append(SessionClosed(None))

    def next_timeout(self) -> float | None:
        """When :meth:`handle_timeout` should run next (same clock as ``now``), or None."""
        if self._phase is _SessionPhase.CLOSED or self._started_at is None:
            return None
        if self._phase is not _SessionPhase.READY:
            return self._started_at + self.setup_timeout
        if self.idle_timeout is not None:
            return self.main.last_received + self.idle_timeout
        return None

    def handle_timeout(self, now: float) -> None:
        """Fail the session whose setup or main channel has overrun its time."""
        if self._phase is _SessionPhase.CLOSED or self._started_at is None:
            return
        if self._phase is not _SessionPhase.READY:
            if now >= self._started_at + self.setup_timeout:
                hint = " (is it a SPICE port?)" if self._phase is _SessionPhase.MAIN_LINK else ""
                self._fail(SpiceError(SpiceFailure.TIMEOUT, f"{self.label}: no answer while "
                           f"{self._phase.value} for {self.setup_timeout:g} s{hint}"))
        elif self.idle_timeout is not None and now >= self.main.last_received + self.idle_timeout:
            self._fail(SpiceError(SpiceFailure.TIMEOUT, f"{self.label}: the server has been "
                       f"silent for {self.idle_timeout:g} s"))

    # ---------------------------------------------------------------- internals

    def _fail(self, error: SpiceError) -> None:
        if self._phase is _SessionPhase.CLOSED:
            return
        self._phase = _SessionPhase.CLOSED
        self.error = error
        for conn in (self.main, self.smartcard):
            if conn is not None and not conn.closed:
                conn.close(error)
                while conn.next_event() is not None:  # consumed: the session reports it
                    pass
        self._events.append(SessionClosed(error))

    def _pump(self, conn: SpiceChannelConnection, now: float) -> None:
        while (event := conn.next_event()) is not None:
            if self._phase is _SessionPhase.CLOSED:
                return
            if isinstance(event, ChannelMessage):
                message = event.message
                if type(message) is SmartcardData:
                    if self._phase is _SessionPhase.READY:
                        self._events.append(VscData(message.data))
                    continue
                self._on_message(conn, message)
            elif isinstance(event, ChannelReady):
                self._on_ready(conn, now)
            elif isinstance(event, ChannelClosed):
                if event.error is not None:
                    self._fail(event.error)
                else:
                    self._fail(SpiceError(SpiceFailure.CLOSED, f"{conn.label} closed"))

    def _on_ready(self, conn: SpiceChannelConnection, now: float) -> None:
        if conn is self.main:
            self._phase = _SessionPhase.MAIN_INIT
            log.debug("%s: main channel linked (mini header: %s)", self.label, conn.mini_header)
        elif conn is self.smartcard:
            self._phase = _SessionPhase.READY
            assert self.session_id is not None
            log.debug("%s: smartcard channel up (session %#x)", self.label, self.session_id)
            self._events.append(SmartcardReady(self.session_id))
            try:
                self._flush_vsc()
            except EncodeError as exc:  # our own over-long message, queued before now
                self._fail(SpiceError(SpiceFailure.PROTOCOL, f"{self.label}: {exc}"))

    def _on_message(self, conn: SpiceChannelConnection, message: ServerMessage) -> None:
        channel = conn.channel_type
        if isinstance(message, Notify):
            severity = ("info", "warning", "error")[message.severity] \
                if message.severity < 3 else f"severity {message.severity}"
            self._events.append(ServerNotice(channel, f"{severity}: {message.text}"))
        elif isinstance(message, Disconnecting):
            self._events.append(ServerNotice(
                channel, f"server disconnecting: {_link_error_name(message.reason)}"))
        elif isinstance(message, Migrate):
            log.warning("%s: server migration started; not supported (the session will be "
                        "reconnected when this server goes away)", self.label)
        elif conn is self.main and isinstance(message, MainInit):
            self._on_main_init(message)
        elif conn is self.main and isinstance(message, ChannelsList):
            self._on_channels(message)
        else:
            log.debug("%s: %s message ignored: %r", self.label, _channel_name(channel),
                      message if not isinstance(message, SpiceMessage)
                      else f"type {message.type}, {len(message.data)} bytes")

    def _on_main_init(self, init: MainInit) -> None:
        if self.session_id is not None:
            log.debug("%s: extra MAIN_INIT ignored", self.label)
            return
        self.session_id = init.session_id
        self._phase = _SessionPhase.CHANNELS
        self.main.send(AttachChannels())

    def _on_channels(self, channels: ChannelsList) -> None:
        if self.channels is not None:  # later lists announce channels registered since
            self.channels = tuple(dict.fromkeys((*self.channels, *channels.channels)))
            return
        self.channels = channels.channels
        if (SpiceChannelType.SMARTCARD, self.channel_id) not in channels.channels:
            offered = ", ".join(f"{_channel_name(t)} {i}" for t, i in channels.channels)
            self._fail(SpiceError(
                SpiceFailure.NO_SMARTCARD_CHANNEL,
                f"{self.label}: the server has no smartcard channel {self.channel_id} (it "
                f"offers: {offered or 'nothing'}); the VM needs -chardev "
                "spicevmc,name=smartcard with -device ccid-card-passthru (libvirt: <smartcard "
                "mode='passthrough' type='spicevmc'/>)"))
            return
        assert self.session_id is not None
        self.smartcard = SpiceChannelConnection(
            SpiceChannelType.SMARTCARD, self.channel_id, connection_id=self.session_id,
            password=self._password, max_length=self._max_length, encrypt=self._encrypt,
            label=f"{self.label} smartcard channel")
        self._phase = _SessionPhase.SMARTCARD_OPEN
        self._events.append(OpenSmartcardChannel(self.session_id))


def _channel_name(channel: int) -> str:
    name = _known(SpiceChannelType, channel)
    return name.name.lower() if isinstance(name, SpiceChannelType) else f"type-{channel}"

