"""VSCard: the virtual smartcard protocol on QEMU's ``ccid-card-passthru`` chardev.

Spec: spice-libcacard ``src/vscard_common.h`` (also ``libcacard/vscard_common.h`` in old QEMU
trees); behaviour of QEMU 7.2 in docs/PROTOCOL.md, "VSCard".

Every message is a 12-byte header ``u32 type, u32 reader_id, u32 length`` followed by ``length``
payload bytes.  The header (and the u32 fields of Init and Error payloads) is big-endian on a
socket chardev and little-endian inside SPICE's smartcard channel, hence the ``byteorder``
parameter everywhere.  The Init magic ``"VSCD"`` is four bytes that are never byte-swapped.

Theory of operation
-------------------
The formats are declared once with construct (:data:`_FORMATS`, one set per byte order).  Init
and Error payloads are parsed and built through those declarations.  The frame header, which is
on the path of every APDU, is packed and unpacked with a precompiled :class:`struct.Struct` of
the same layout; ``tests/codecs/test_vsc.py`` checks with hypothesis that the construct
declaration and this hot path agree byte for byte.

:class:`VscConnection` is a sans-I/O stream decoder (h11 style): ``receive_data()`` buffers
bytes and cuts complete frames out of them; ``next_event()`` hands them out one by one.  A
header whose length exceeds ``max_length`` is rejected as soon as its 12 bytes are seen, and no
payload byte is buffered for it.  After a :class:`~ccidemu.errors.DecodeError` has been raised
by ``next_event()`` the connection is dead: every later ``next_event()`` or ``receive_data()``
raises ``DecodeError`` again.

Reader names (ReaderAdd) are kept as the raw bytes from the wire (:attr:`VscReaderAdd.raw_name`)
so that invalid UTF-8 from a peer round-trips exactly and never fails to decode;
:attr:`VscReaderAdd.name` decodes them with ``errors="replace"``.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import construct
from construct import Const, GreedyRange, Int32ub, Int32ul, Struct, Terminated, this

from ccidemu._wire import DEFAULT_MAX_LENGTH, FrameStream, build, check_length, parse
from ccidemu.errors import DecodeError, EncodeError

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "HEADER_SIZE",
    "READER_ID_MINIMAL",
    "READER_ID_UNDEFINED",
    "VSCARD_MAGIC",
    "VSCARD_VERSION",
    "ByteOrder",
    "VscApdu",
    "VscAtr",
    "VscCardRemove",
    "VscConnection",
    "VscError",
    "VscErrorCode",
    "VscFlush",
    "VscFlushComplete",
    "VscInit",
    "VscMessage",
    "VscReaderAdd",
    "VscReaderRemove",
    "VscType",
    "VscUnknown",
    "decode_vsc",
    "describe_vsc",
    "encode_vsc",
    "make_version",
    "split_version",
]


ByteOrder = Literal["big", "little"]

#: Size of ``VSCMsgHeader`` (three u32).
HEADER_SIZE = 12
#: ``VSCARD_MAGIC``: the first four payload bytes of Init, in this order whatever the byte order.
VSCARD_MAGIC = b"VSCD"
#: ``VSCARD_UNDEFINED_READER_ID``: used by Init (QEMU sends it) and messages not tied to a reader.
READER_ID_UNDEFINED = 0xFFFFFFFF
#: ``VSCARD_MINIMAL_READER_ID``: the first reader id a host allocates (QEMU always uses 0).
READER_ID_MINIMAL = 0

_U32_MAX = 0xFFFFFFFF

# vscard_common.h: VERSION_MAJOR_BITS 11, VERSION_MIDDLE_BITS 11, VERSION_MINOR_BITS 10.
_MAJOR_BITS, _MIDDLE_BITS, _MINOR_BITS = 11, 11, 10


def make_version(major: int, middle: int, minor: int) -> int:
    """``MAKE_VERSION(major, middle, minor)``: pack 11/11/10 bits into one u32."""
    if not (
        0 <= major < 1 << _MAJOR_BITS
        and 0 <= middle < 1 << _MIDDLE_BITS
        and 0 <= minor < 1 << _MINOR_BITS
    ):
        raise EncodeError(f"version {major}.{middle}.{minor} does not fit 11/11/10 bits")
    return (major << (_MINOR_BITS + _MIDDLE_BITS)) | (middle << _MINOR_BITS) | minor


def split_version(version: int) -> tuple[int, int, int]:
    """The (major, middle, minor) parts of a packed VSCard version u32."""
    return (
        (version >> (_MINOR_BITS + _MIDDLE_BITS)) & ((1 << _MAJOR_BITS) - 1),
        (version >> _MINOR_BITS) & ((1 << _MIDDLE_BITS) - 1),
        version & ((1 << _MINOR_BITS) - 1),
    )


#: ``VSCARD_VERSION`` = ``MAKE_VERSION(0, 0, 2)`` = 2.
VSCARD_VERSION = make_version(0, 0, 2)


class VscType(enum.IntEnum):
    """``enum VSCMsgType``."""

    INIT = 1
    ERROR = 2
    READER_ADD = 3
    READER_REMOVE = 4
    ATR = 5
    CARD_REMOVE = 6
    APDU = 7
    FLUSH = 8
    FLUSH_COMPLETE = 9


class VscErrorCode(enum.IntEnum):
    """``enum VSCErrorCode``, the payload of ``VSC_Error``.

    The header spells code 3 ``VSC_CARD_ALREAY_INSERTED``; ``CARD_ALREAY_INSERTED`` is kept as
    an alias of ``CARD_ALREADY_INSERTED`` so both spellings work.
    """

    SUCCESS = 0
    GENERAL_ERROR = 1
    CANNOT_ADD_MORE_READERS = 2
    CARD_ALREADY_INSERTED = 3
    CARD_ALREAY_INSERTED = 3  # the spec's spelling: an alias on purpose


# ---------------------------------------------------------------------------------------------
# Wire formats (vscard_common.h), one set per byte order.  Private: the public API is below.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Formats:
    header: construct.Construct
    frame: construct.Construct
    init: construct.Construct
    error: construct.Construct
    hot_header: struct.Struct


def _declare(u32: construct.Construct, struct_prefix: str) -> _Formats:
    # typedef struct VSCMsgHeader { uint32_t type; uint32_t reader_id; uint32_t length;
    #                               uint8_t data[0]; }  -- length excludes the header
    header = Struct("type" / u32, "reader_id" / u32, "length" / u32)
    frame = Struct(
        "type" / u32, "reader_id" / u32, "length" / u32, "data" / construct.Bytes(this.length)
    )
    # typedef struct VSCMsgInit { uint32_t magic; uint32_t version; uint32_t capabilities[1]; }
    # "receiver must check length, array may grow in the future": any number of whole words.
    init = Struct(
        "magic" / Const(VSCARD_MAGIC),
        "version" / u32,
        "capabilities" / GreedyRange(u32),
        Terminated,
    )
    # typedef struct VSCMsgError { uint32_t code; }
    error = Struct("code" / u32, Terminated)
    # The hot path for VSCMsgHeader: same layout as ``header``, checked by the tests.
    hot = struct.Struct(struct_prefix + "III")
    return _Formats(header, frame, init, error, hot)


_FORMATS: dict[str, _Formats] = {
    "big": _declare(Int32ub, ">"),
    "little": _declare(Int32ul, "<"),
}
assert all(f.header.sizeof() == f.hot_header.size == HEADER_SIZE for f in _FORMATS.values())


def _formats(byteorder: str) -> _Formats:
    try:
        return _FORMATS[byteorder]
    except KeyError:
        raise ValueError(f"byteorder must be 'big' or 'little', not {byteorder!r}") from None


# ---------------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------------


def _check_u32(value: int, what: str) -> None:
    if not 0 <= value <= _U32_MAX:
        raise EncodeError(f"{what} {value} is not a u32")


@dataclass(frozen=True, slots=True)
class VscInit:
    """``VSC_Init`` (VSCMsgInit), both directions: magic, version, capabilities.

    No capability is defined yet; libcacard and QEMU send one zero word, and a receiver accepts
    any number of words (including none).
    """

    type: ClassVar[VscType] = VscType.INIT
    reader_id: int
    version: int = VSCARD_VERSION
    capabilities: tuple[int, ...] = (0,)

    def payload(self, byteorder: ByteOrder = "big") -> bytes:
        _check_u32(self.version, "Init version")
        value = {"version": self.version, "capabilities": list(self.capabilities)}
        return build(_formats(byteorder).init, value, "VSCMsgInit")

    @property
    def version_parts(self) -> tuple[int, int, int]:
        """(major, middle, minor) of :attr:`version`."""
        return split_version(self.version)


@dataclass(frozen=True, slots=True)
class VscError:
    """``VSC_Error`` (VSCMsgError): the answer to ReaderAdd/Remove, ATR, CardRemove, ...

    ``code`` is a :class:`VscErrorCode` when known, a plain ``int`` otherwise.
    """

    type: ClassVar[VscType] = VscType.ERROR
    reader_id: int
    code: int = VscErrorCode.SUCCESS

    def payload(self, byteorder: ByteOrder = "big") -> bytes:
        return build(_formats(byteorder).error, {"code": self.code}, "VSCMsgError")


@dataclass(frozen=True, slots=True)
class VscReaderAdd:
    """``VSC_ReaderAdd`` (VSCMsgReaderAdd), client -> host: a reader name, UTF-8, may be empty.

    ``raw_name`` holds the bytes exactly as on the wire (invalid UTF-8 from a peer is kept, not
    fatal).  :meth:`with_name` builds one from a ``str``.
    """

    type: ClassVar[VscType] = VscType.READER_ADD
    reader_id: int
    raw_name: bytes = b""

    @classmethod
    def with_name(cls, reader_id: int, name: str) -> VscReaderAdd:
        """A ReaderAdd carrying ``name`` encoded as UTF-8."""
        return cls(reader_id, name.encode("utf-8"))

    @property
    def name(self) -> str:
        """The reader name; bytes that are not UTF-8 become U+FFFD."""
        return self.raw_name.decode("utf-8", errors="replace")

    def payload(self, byteorder: ByteOrder = "big") -> bytes:
        return bytes(self.raw_name)


@dataclass(frozen=True, slots=True)
class VscReaderRemove:
    """``VSC_ReaderRemove`` (VSCMsgReaderRemove), client -> host; empty payload."""

    type: ClassVar[VscType] = VscType.READER_REMOVE
    reader_id: int

    def payload(self, byteorder: ByteOrder = "big") -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class VscAtr:
    """``VSC_ATR`` (VSCMsgATR), client -> host: card inserted or reset; the raw ATR bytes."""

    type: ClassVar[VscType] = VscType.ATR
    reader_id: int
    atr: bytes

    def payload(self, byteorder: ByteOrder = "big") -> bytes:
        return bytes(self.atr)


@dataclass(frozen=True, slots=True)
class VscCardRemove:
    """``VSC_CardRemove`` (VSCMsgCardRemove), client -> host; empty payload."""

    type: ClassVar[VscType] = VscType.CARD_REMOVE
    reader_id: int

    def payload(self, byteorder: ByteOrder = "big") -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class VscApdu:
    """``VSC_APDU`` (VSCMsgAPDU), both directions: one raw command or response APDU."""

    type: ClassVar[VscType] = VscType.APDU
    reader_id: int
    data: bytes

    def payload(self, byteorder: ByteOrder = "big") -> bytes:
        return bytes(self.data)


@dataclass(frozen=True, slots=True)
class VscFlush:
    """``VSC_Flush`` (VSCMsgFlush), host -> client; empty payload."""

    type: ClassVar[VscType] = VscType.FLUSH
    reader_id: int

    def payload(self, byteorder: ByteOrder = "big") -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class VscFlushComplete:
    """``VSC_FlushComplete`` (VSCMsgFlushComplete), client -> host; empty payload."""

    type: ClassVar[VscType] = VscType.FLUSH_COMPLETE
    reader_id: int

    def payload(self, byteorder: ByteOrder = "big") -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class VscUnknown:
    """A message whose type this module does not know, kept raw (``type`` is a plain int)."""

    reader_id: int
    type: int
    data: bytes = field(default=b"")

    def payload(self, byteorder: ByteOrder = "big") -> bytes:
        if self.type in _KNOWN_TYPES:
            raise EncodeError(f"VscUnknown with known type {self.type}; use its own class")
        return bytes(self.data)


VscMessage = (
    VscInit
    | VscError
    | VscReaderAdd
    | VscReaderRemove
    | VscAtr
    | VscCardRemove
    | VscApdu
    | VscFlush
    | VscFlushComplete
    | VscUnknown
)

_KNOWN_TYPES = frozenset(int(t) for t in VscType)
_EMPTY_TYPES: dict[int, type[VscReaderRemove | VscCardRemove | VscFlush | VscFlushComplete]] = {
    VscType.READER_REMOVE: VscReaderRemove,
    VscType.CARD_REMOVE: VscCardRemove,
    VscType.FLUSH: VscFlush,
    VscType.FLUSH_COMPLETE: VscFlushComplete,
}


# ---------------------------------------------------------------------------------------------
# Encoding and decoding
# ---------------------------------------------------------------------------------------------


def encode_vsc(msg: VscMessage, byteorder: ByteOrder = "big") -> bytes:
    """The wire bytes of ``msg`` (header + payload); EncodeError if a field does not fit."""
    hot = _HOT_BIG if byteorder == "big" else _hot_header(byteorder)
    try:
        if type(msg) is VscApdu:  # the hot path: no method call
            data = msg.data
            return hot.pack(7, msg.reader_id, len(data)) + data
        payload = msg.payload(byteorder)
        return hot.pack(msg.type, msg.reader_id, len(payload)) + payload
    except (struct.error, TypeError) as exc:
        raise EncodeError(f"cannot encode {msg!r}: {exc}") from None


def _decode_payload(type_: int, reader_id: int, payload: bytes, formats: _Formats) -> VscMessage:
    """The message of ``type_`` from its complete payload bytes (any DecodeError propagates)."""
    if type_ == 7:  # VscType.APDU, first: the hot case
        return _new_apdu(reader_id, payload)
    if type_ == 5:
        return VscAtr(reader_id, payload)
    if type_ == 2:
        code = parse(formats.error, payload, "VSCMsgError").code
        return VscError(reader_id, VscErrorCode(code) if code in _ERROR_CODES else code)
    if type_ == 1:
        init = parse(formats.init, payload, "VSCMsgInit")
        return VscInit(reader_id, init.version, tuple(init.capabilities))
    if type_ == 3:
        return VscReaderAdd(reader_id, payload)
    empty = _EMPTY_TYPES.get(type_)
    if empty is not None:
        if payload:
            raise DecodeError(
                f"{VscType(type_).name} carries {len(payload)} payload bytes; expected none"
            )
        return empty(reader_id)
    return VscUnknown(reader_id, type_, payload)


_ERROR_CODES = frozenset(int(c) for c in VscErrorCode)
_HOT_BIG = _FORMATS["big"].hot_header


def _hot_header(byteorder: str) -> struct.Struct:
    return _formats(byteorder).hot_header

# VscApdu without the frozen dataclass __init__ (which goes through object.__setattr__): the
# decoder sets the two slots directly.  Same object as VscApdu(reader_id, data), about 50 ns less.
_new_object = object.__new__
_set_apdu_reader_id = VscApdu.__dict__["reader_id"].__set__
_set_apdu_data = VscApdu.__dict__["data"].__set__


def _new_apdu(reader_id: int, data: bytes) -> VscApdu:
    msg: VscApdu = _new_object(VscApdu)
    _set_apdu_reader_id(msg, reader_id)
    _set_apdu_data(msg, data)
    return msg


def decode_vsc(
    data: bytes | bytearray | memoryview,
    byteorder: ByteOrder = "big",
    max_length: int = DEFAULT_MAX_LENGTH,
) -> tuple[VscMessage, int]:
    """Decode the frame at the start of ``data``: ``(message, bytes consumed)``.

    Bytes after the frame are left alone.  DecodeError if ``data`` is shorter than the frame,
    the length field exceeds ``max_length`` (checked before anything else is read), or the
    payload is malformed for its type.
    """
    hot = _HOT_BIG if byteorder == "big" else _hot_header(byteorder)
    size = len(data)
    if size < HEADER_SIZE:
        raise DecodeError(f"VSCMsgHeader needs {HEADER_SIZE} bytes, got {size}")
    type_, reader_id, length = hot.unpack_from(data)
    if length > max_length:  # tested inline: skipping the call is ~30 ns (bench.codecs)
        check_length(length, max_length, "VSCard payload")
    end = HEADER_SIZE + length
    if size < end:
        raise DecodeError(f"VSCard frame truncated: need {end} bytes, got {size}")
    payload = data[HEADER_SIZE:end]
    if type(payload) is not bytes:
        payload = bytes(payload)
    if type_ == 7:  # the hot path, _new_apdu inlined
        msg: VscApdu = _new_object(VscApdu)
        _set_apdu_reader_id(msg, reader_id)
        _set_apdu_data(msg, payload)
        return msg, end
    return _decode_payload(type_, reader_id, payload, _FORMATS[byteorder]), end


def describe_vsc(msg: VscMessage, max_hex: int | None = 64, *, data: bytes | None = None) -> str:
    """One readable line for logs and ``ccidemu decode``; payload hex cut after ``max_hex`` bytes.

    ``data``: the APDU bytes to show instead of the message's (the caller redacted them with
    :mod:`ccidemu.redact`; this function cannot tell a command from a response).
    """
    reader = "undefined" if msg.reader_id == READER_ID_UNDEFINED else str(msg.reader_id)
    head = f"reader={reader}"

    def hexdump(data: bytes) -> str:
        if max_hex is not None and len(data) > max_hex:
            return f"{data[:max_hex].hex()}...(+{len(data) - max_hex} bytes)"
        return data.hex()

    if isinstance(msg, VscInit):
        major, middle, minor = msg.version_parts
        caps = " ".join(f"{c:08x}" for c in msg.capabilities)
        return f"Init {head} version={major}.{middle}.{minor} caps=[{caps}]"
    if isinstance(msg, VscError):
        name = VscErrorCode(msg.code).name if msg.code in _ERROR_CODES else "unknown"
        return f"Error {head} code={int(msg.code)}({name})"
    if isinstance(msg, VscReaderAdd):
        return f"ReaderAdd {head} name={msg.name!r}"
    if isinstance(msg, VscAtr):
        return f"ATR {head} len={len(msg.atr)} {hexdump(msg.atr)}".rstrip()
    if isinstance(msg, VscApdu):
        shown = msg.data if data is None else data
        cut = " [redacted]" if len(shown) != len(msg.data) else ""
        return f"APDU {head} len={len(msg.data)} {hexdump(shown)}{cut}".rstrip()
    if isinstance(msg, VscUnknown):
        return f"Unknown(type={msg.type}) {head} len={len(msg.data)} {hexdump(msg.data)}".rstrip()
    names = {
        VscReaderRemove: "ReaderRemove",
        VscCardRemove: "CardRemove",
        VscFlush: "Flush",
        VscFlushComplete: "FlushComplete",
    }
    return f"{names[type(msg)]} {head}"


class VscConnection(FrameStream[VscMessage]):
    """VSCard framing for one chardev stream.  No sockets here: feed bytes to
    :meth:`receive_data`, drain :meth:`next_event` until None, write what :meth:`send` returns.

    Frames are cut out of the buffer as soon as they are complete, whatever the split of the
    incoming bytes.  A bad frame (over-long length, malformed payload) is reported by
    :meth:`next_event` after the good frames before it; from then on the connection is dead
    (the error contract of :class:`ccidemu._wire.FrameStream`).
    """

    what = "VSCard connection"

    def __init__(self, byteorder: ByteOrder = "big", max_length: int = DEFAULT_MAX_LENGTH) -> None:
        super().__init__(max_length)
        self._formats = _formats(byteorder)
        self.byteorder: ByteOrder = byteorder

    def _cut(self, buf: bytearray, events: deque[VscMessage]) -> int:
        hot = self._formats.hot_header
        formats = self._formats
        max_length = self.max_length
        start = 0
        size = len(buf)
        while size - start >= HEADER_SIZE:
            type_, reader_id, length = hot.unpack_from(buf, start)
            check_length(length, max_length, "VSCard payload")
            end = start + HEADER_SIZE + length
            if end > size:
                break
            events.append(
                _decode_payload(type_, reader_id, bytes(buf[start + HEADER_SIZE : end]), formats)
            )
            start = end
        return start

    def send(self, msg: VscMessage) -> bytes:
        """The bytes to write to the peer for ``msg`` (in this connection's byte order)."""
        return encode_vsc(msg, self.byteorder)
