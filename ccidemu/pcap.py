"""usbmon captures in pcap and pcapng files, and the CCID traffic inside them.  Streaming.

Formats:

- pcap file format (libpcap ``savefile``, "LibpcapFileFormat"): a 24-byte global header
  (magic ``A1B2C3D4`` for microseconds or ``A1B23C4D`` for nanoseconds, in the writer's
  byte order; version 2.4; thiszone; sigfigs; snaplen; link type) then records of
  ``ts_sec, ts_frac, incl_len, orig_len`` (u32 each) and ``incl_len`` bytes.
- pcapng (IETF draft-ietf-opsawg-pcapng, "PCAP Next Generation Dump File Format"):
  blocks of ``u32 type, u32 total length, body, u32 total length`` padded to 4 bytes.
  A Section Header Block (type ``0A0D0D0A``, byte-order magic ``1A2B3C4D``) starts each
  section and sets its byte order; Interface Description Blocks (type 1: ``u16
  linktype, u16 reserved, u32 snaplen``, options; ``if_tsresol`` = option 9) number the
  interfaces of the section from 0; Enhanced Packet Blocks (type 6: ``u32 interface, u32
  ts high, u32 ts low, u32 captured length, u32 original length``, data), Simple Packet
  Blocks (type 3: ``u32 original length``, data; interface 0, no time) and the obsolete
  Packet Blocks (type 2) carry packets.  Other blocks are skipped.
- Link types 189 LINKTYPE_USB_LINUX (48-byte usbmon header) and 220
  LINKTYPE_USB_LINUX_MMAPPED (64-byte header), Linux ``Documentation/usb/usbmon.rst``
  "binary interface" / libpcap ``pcap/usb.h``::

      0 u64 id | 8 u8 type 'S'/'C'/'E' | 9 u8 xfer_type (0 iso, 1 intr, 2 ctrl, 3 bulk)
      10 u8 epnum (bit 7 = IN) | 11 u8 devnum | 12 u16 busnum | 14 flag_setup | 15 flag_data
      16 s64 ts_sec | 24 s32 ts_usec | 28 s32 status | 32 u32 length | 36 u32 len_cap
      40 setup[8] (or iso error_count, numdesc)
      -- 220 only: 48 s32 interval | 52 s32 start_frame | 56 u32 xfer_flags | 60 u32 ndesc

  in the capturing host's byte order, taken here to be the file's (section's).  For
  isochronous transfers under link type 220, ``ndesc`` 16-byte descriptors precede the data.

QEMU's ``-device usb-ccid,pcap=FILE`` writes classic pcap with link type 220, keeps at most
256 bulk data bytes per transfer and sets ``len_cap`` to data + header, so the data length
is taken from the record, and a packet is truncated when it holds fewer bytes than ``length``.

Everything streams: a file is read record by record, so memory does not grow with it.
:func:`iter_ccid_records` turns the bulk and interrupt traffic into CCID messages
(:mod:`ccidemu.ccid`); :func:`iter_ccid_exchanges` pairs each command with its response by
slot and sequence.  ``on_bad(position, reason)``, when given, receives every packet or
transfer that could not be used (and decoding goes on); without it a broken packet raises
DecodeError.  A file cut inside a record always raises DecodeError at the end, after every
complete packet was delivered.
"""

from __future__ import annotations

import enum
import io
import logging
import os
import struct
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ccidemu._wire import DEFAULT_MAX_LENGTH, check_length
from ccidemu.ccid import (
    CcidDataBlock,
    CcidDirection,
    CcidMessage,
    CcidNotifySlotChange,
    CcidStream,
    CcidXfrBlock,
    CommandStatus,
    decode_ccid,
)
from ccidemu.errors import DecodeError

__all__ = [
    "LINKTYPE_USB_LINUX",
    "LINKTYPE_USB_LINUX_MMAPPED",
    "CcidExchange",
    "CcidRecord",
    "TransferType",
    "UsbPacket",
    "ccid_exchanges",
    "ccid_records",
    "iter_ccid_exchanges",
    "iter_ccid_records",
    "iter_usb_packets",
    "pair_exchanges",
]

log = logging.getLogger(__name__)

LINKTYPE_USB_LINUX = 189
LINKTYPE_USB_LINUX_MMAPPED = 220

_HEADER_SIZES = {LINKTYPE_USB_LINUX: 48, LINKTYPE_USB_LINUX_MMAPPED: 64}
_MAGIC_USEC = 0xA1B2C3D4
_MAGIC_NSEC = 0xA1B23C4D
_PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"

Source = str | os.PathLike[str] | bytes | BinaryIO


class TransferType(enum.IntEnum):
    """usbmon xfer_type (usbmon.rst, binary interface)."""

    ISOCHRONOUS = 0
    INTERRUPT = 1
    CONTROL = 2
    BULK = 3


@dataclass(frozen=True, slots=True)
class UsbPacket:
    """One usbmon event: a URB submission ('S'), completion ('C') or error ('E')."""

    timestamp: float  # seconds since the epoch, from the pcap record
    urb_id: int
    urb_type: str  # 'S', 'C' or 'E'
    transfer_type: int  # TransferType, or the raw value
    endpoint: int  # bEndpointAddress: number | 0x80 for IN
    device: int
    bus: int
    status: int
    length: int  # the URB's data length (submitted or actual): the original size
    data: bytes  # the captured data bytes
    truncated: bool  # fewer bytes captured than ``length``
    setup: bytes = b""  # the 8 setup bytes of a control submission

    @property
    def endpoint_number(self) -> int:
        return self.endpoint & 0x0F

    @property
    def is_in(self) -> bool:
        return bool(self.endpoint & 0x80)


OnBad = Callable[[str, str], None]


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    data = stream.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = stream.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _usbmon_packet(
    body: bytes, header_size: int, order: str, timestamp: float
) -> UsbPacket:
    """Decode one usbmon record; DecodeError when shorter than its header."""
    if len(body) < header_size:
        raise DecodeError(f"record of {len(body)} bytes is shorter than the usbmon header")
    (urb_id, urb_type, xfer_type, epnum, devnum, busnum, _flag_setup, flag_data,
     _sec, _usec, status, length, _len_cap, setup) = _USBMON[order].unpack_from(body)
    data_start = header_size
    if header_size == 64 and xfer_type == TransferType.ISOCHRONOUS:
        ndesc = _MMAPPED_TAIL[order].unpack_from(body, 48)[3]
        data_start += 16 * ndesc
    payload = body[data_start:]
    has_data = flag_data in (0, ord("="))
    try:
        transfer_type: int = TransferType(xfer_type)
    except ValueError:
        transfer_type = xfer_type
    return UsbPacket(
        timestamp=timestamp,
        urb_id=urb_id,
        urb_type=chr(urb_type),
        transfer_type=transfer_type,
        endpoint=epnum,
        device=devnum,
        bus=busnum,
        status=status,
        length=length,
        data=payload if has_data else b"",
        truncated=has_data and len(payload) < length,
        setup=setup if xfer_type == TransferType.CONTROL and urb_type == ord("S") else b"",
    )


_USBMON = {o: struct.Struct(o + "QBBBBHBBqiiII8s") for o in "<>"}
_MMAPPED_TAIL = {o: struct.Struct(o + "iiII") for o in "<>"}
_RECORD = {o: struct.Struct(o + "IIII") for o in "<>"}


def iter_usb_packets(
    source: Source, max_length: int = DEFAULT_MAX_LENGTH, *, on_bad: OnBad | None = None
) -> Iterator[UsbPacket]:
    """The usbmon packets of a pcap or pcapng file (a path, an open binary file, or bytes).

    DecodeError for another file type, a link type that is not usbmon (classic pcap), or a
    file cut inside a record; a broken packet raises too unless ``on_bad`` takes it.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        yield from _packets(io.BytesIO(bytes(source)), max_length, on_bad)
    elif isinstance(source, str | os.PathLike):
        with Path(source).open("rb") as stream:
            yield from _packets(stream, max_length, on_bad)
    else:
        yield from _packets(source, max_length, on_bad)


def _packets(stream: BinaryIO, max_length: int, on_bad: OnBad | None) -> Iterator[UsbPacket]:
    head = _read_exact(stream, 4)
    if head == _PCAPNG_MAGIC:
        yield from _pcapng_packets(stream, max_length, on_bad)
        return
    rest = _read_exact(stream, 20)
    data = head + rest
    if len(data) < 24:
        raise DecodeError(f"pcap global header needs 24 bytes, got {len(data)}")
    for order in ("<", ">"):
        magic = struct.unpack_from(order + "I", data)[0]
        if magic in (_MAGIC_USEC, _MAGIC_NSEC):
            break
    else:
        raise DecodeError(f"not a pcap or pcapng file (magic {data[:4].hex()})")
    divisor = 1e9 if magic == _MAGIC_NSEC else 1e6
    link_type = struct.unpack_from(order + "I", data, 20)[0]
    header_size = _HEADER_SIZES.get(link_type & 0x0FFFFFFF)
    if header_size is None:
        raise DecodeError(f"pcap link type {link_type} is not usbmon (189 or 220)")
    record = _RECORD[order]
    offset = 24
    number = 0
    while True:
        raw = _read_exact(stream, record.size)
        if not raw:
            return
        number += 1
        if len(raw) < record.size:
            raise DecodeError(f"packet {number}: truncated pcap record header", offset=offset)
        ts_sec, ts_frac, incl_len, _orig_len = record.unpack(raw)
        check_length(incl_len, max_length, f"pcap record (packet {number})")
        body_start = offset + record.size
        body = _read_exact(stream, incl_len)
        offset = body_start + incl_len
        if len(body) < incl_len:
            raise DecodeError(f"packet {number}: truncated pcap record", offset=body_start)
        try:
            yield _usbmon_packet(body, header_size, order, ts_sec + ts_frac / divisor)
        except DecodeError as exc:
            if on_bad is None:
                raise DecodeError(f"packet {number}: {exc}", offset=body_start) from None
            on_bad(f"packet {number} (byte {body_start})", str(exc))


def _options(body: bytes, start: int, order: str) -> Iterator[tuple[int, bytes]]:
    pos = start
    while pos + 4 <= len(body):
        code, length = struct.unpack_from(order + "HH", body, pos)
        if code == 0:  # opt_endofopt
            return
        value = body[pos + 4 : pos + 4 + length]
        yield code, value
        pos += 4 + ((length + 3) & ~3)


def _tsresol(value: bytes) -> float:
    """Seconds per timestamp unit of pcapng option if_tsresol (default microseconds)."""
    if not value:
        return 1e-6
    v = value[0]
    return 2.0 ** -(v & 0x7F) if v & 0x80 else 10.0 ** -v


def _pcapng_packets(
    stream: BinaryIO, max_length: int, on_bad: OnBad | None
) -> Iterator[UsbPacket]:
    order = "<"
    interfaces: list[tuple[int | None, float]] = []  # (usbmon header size or None, unit)
    reported: set[int] = set()
    offset = 0
    number = 0
    first = True
    pending_type = _PCAPNG_MAGIC  # the first block's type was read by the caller
    while True:
        if pending_type:
            raw_type, pending_type = pending_type, b""
        else:
            raw_type = _read_exact(stream, 4)
            if not raw_type:
                return
        raw_len = _read_exact(stream, 4)
        if len(raw_type) < 4 or len(raw_len) < 4:
            raise DecodeError("pcapng file ends inside a block header", offset=offset)
        if raw_type == _PCAPNG_MAGIC:
            magic = _read_exact(stream, 4)
            if len(magic) < 4:
                raise DecodeError("pcapng file ends inside a section header", offset=offset)
            if magic == b"\x4d\x3c\x2b\x1a":
                order = "<"
            elif magic == b"\x1a\x2b\x3c\x4d":
                order = ">"
            else:
                raise DecodeError(f"pcapng byte-order magic {magic.hex()} is unknown",
                                  offset=offset + 8)
            (total,) = struct.unpack(order + "I", raw_len)
            prefix = magic
            interfaces = []
            reported = set()
        else:
            if first:
                raise DecodeError("pcapng file does not start with a section header")
            (total,) = struct.unpack(order + "I", raw_len)
            prefix = b""
        first = False
        (block_type,) = struct.unpack(order + "I", raw_type)
        if total < 12 or total % 4:
            raise DecodeError(f"pcapng block length {total} is not a multiple of 4 >= 12",
                              offset=offset)
        check_length(total, max_length + 64, "pcapng block")
        rest = _read_exact(stream, total - 8 - len(prefix))
        if len(rest) < total - 8 - len(prefix):
            raise DecodeError("pcapng file ends inside a block", offset=offset)
        body = prefix + rest[:-4]
        if struct.unpack(order + "I", rest[-4:])[0] != total:
            raise DecodeError("pcapng block lengths at both ends differ", offset=offset)
        where = offset
        offset += total
        if block_type == 1:  # Interface Description Block
            if len(body) < 8:
                raise DecodeError("pcapng interface block too short", offset=where)
            link_type = struct.unpack_from(order + "H", body)[0]
            unit = 1e-6
            for code, value in _options(body, 8, order):
                if code == 9:
                    unit = _tsresol(value)
            interfaces.append((_HEADER_SIZES.get(link_type), unit))
            if link_type not in _HEADER_SIZES and on_bad is not None:
                on_bad(f"interface {len(interfaces) - 1} (byte {where})",
                       f"link type {link_type} is not usbmon (189 or 220): its packets "
                       "are skipped")
            continue
        if block_type == 6:  # Enhanced Packet Block
            if len(body) < 20:
                raise DecodeError("pcapng packet block too short", offset=where)
            iface, high, low, captured, _orig = struct.unpack_from(order + "IIIII", body)
            data = body[20 : 20 + captured]
            stamp: int | None = (high << 32) | low
        elif block_type == 3:  # Simple Packet Block: interface 0, no time stamp
            if len(body) < 4:
                raise DecodeError("pcapng simple packet block too short", offset=where)
            iface, stamp = 0, None
            data = body[4:]
            (orig,) = struct.unpack_from(order + "I", body)
            data = data[:orig]
        elif block_type == 2:  # obsolete Packet Block
            if len(body) < 20:
                raise DecodeError("pcapng packet block too short", offset=where)
            iface, _drops, high, low, captured, _orig = struct.unpack_from(order + "HHIIII", body)
            data = body[20 : 20 + captured]
            stamp = (high << 32) | low
        else:
            continue  # name resolution, statistics, custom blocks: nothing of ours
        number += 1
        if iface >= len(interfaces):
            problem = f"packet on interface {iface}, which no interface block describes"
            if on_bad is None:
                raise DecodeError(f"packet {number}: {problem}", offset=where)
            on_bad(f"packet {number} (byte {where})", problem)
            continue
        header_size, unit = interfaces[iface]
        if header_size is None:
            if on_bad is None and iface not in reported:
                reported.add(iface)
                log.debug("pcapng interface %d is not usbmon: skipping its packets", iface)
            continue
        try:
            yield _usbmon_packet(data, header_size, order, 0.0 if stamp is None else stamp * unit)
        except DecodeError as exc:
            if on_bad is None:
                raise DecodeError(f"packet {number}: {exc}", offset=where) from None
            on_bad(f"packet {number} (byte {where})", str(exc))


@dataclass(frozen=True, slots=True)
class CcidRecord:
    """One CCID message seen in a capture."""

    timestamp: float
    direction: CcidDirection
    message: CcidMessage
    #: the transfer was cut by the capture: data fields hold only the captured bytes
    truncated: bool = False


@dataclass(frozen=True, slots=True)
class CcidExchange:
    """A PC_to_RDR command and the RDR_to_PC message answering it (same slot and seq)."""

    command: CcidRecord
    response: CcidRecord | None

    @property
    def apdu(self) -> bytes | None:
        """The command APDU/TPDU of an XfrBlock, else None."""
        msg = self.command.message
        return msg.data if isinstance(msg, CcidXfrBlock) else None

    @property
    def response_data(self) -> bytes | None:
        """The data of a DataBlock answer (response APDU or ATR), else None."""
        msg = self.response.message if self.response else None
        return msg.data if isinstance(msg, CcidDataBlock) else None

    @property
    def truncated(self) -> bool:
        return self.command.truncated or bool(self.response and self.response.truncated)


def _decode_truncated(data: bytes, direction: CcidDirection) -> CcidMessage | None:
    """Decode a cut bulk transfer by shrinking dwLength to what was captured."""
    if len(data) < 10:
        return None
    patched = data[:1] + struct.pack("<I", len(data) - 10) + data[5:]
    try:
        return decode_ccid(patched, direction=direction)[0]
    except DecodeError:
        return None


def iter_ccid_records(
    source: Source,
    device: int | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    *,
    on_bad: OnBad | None = None,
) -> Iterator[CcidRecord]:
    """The CCID messages of a usbmon capture, in order, as the file is read.

    Bulk-OUT submissions carry PC_to_RDR messages, bulk-IN completions RDR_to_PC
    messages (a message may span several transfers), interrupt-IN completions
    NotifySlotChange/HardwareError.  ``device`` keeps one USB device address only.
    Undecodable data is skipped (and given to ``on_bad``, else logged) and decoding goes on.
    """
    # One stream per bulk pipe; a fresh one after bad data (drop it and go on).
    streams = {d: CcidStream(max_length, d) for d in (CcidDirection.PC_TO_RDR,
                                                      CcidDirection.RDR_TO_PC)}
    number = 0

    def bad(reason: str) -> None:
        where = f"packet at {packet.timestamp:.6f}"
        if on_bad is None:
            log.debug("skipping %s: %s", where, reason)
        else:
            on_bad(where, reason)

    for packet in iter_usb_packets(source, max_length, on_bad=on_bad):
        number += 1
        if device is not None and packet.device != device:
            continue
        if not packet.data:
            continue
        if packet.transfer_type == TransferType.INTERRUPT and packet.is_in:
            if packet.urb_type != "C":
                continue
            try:
                msg, _ = decode_ccid(packet.data, direction=CcidDirection.INTERRUPT)
            except DecodeError as exc:
                bad(f"interrupt transfer: {exc}")
                continue
            yield CcidRecord(packet.timestamp, CcidDirection.INTERRUPT, msg, packet.truncated)
            continue
        if packet.transfer_type != TransferType.BULK:
            continue
        if packet.is_in:
            if packet.urb_type != "C":
                continue
            direction = CcidDirection.RDR_TO_PC
        else:
            if packet.urb_type != "S":
                continue
            direction = CcidDirection.PC_TO_RDR
        stream = streams[direction]
        if packet.truncated:
            cut = _decode_truncated(packet.data, direction) if not stream.buffered else None
            streams[direction] = CcidStream(max_length, direction)
            if cut is None:
                bad(f"truncated bulk transfer ({len(packet.data)} of {packet.length} bytes) "
                    "that does not decode")
            else:
                yield CcidRecord(packet.timestamp, direction, cut, True)
            continue
        stream.receive_data(packet.data)
        try:
            while (event := stream.next_event()) is not None:
                yield CcidRecord(packet.timestamp, direction, event)
        except DecodeError as exc:
            bad(f"undecodable bulk data: {exc}")
            streams[direction] = CcidStream(max_length, direction)


def ccid_records(
    source: Source, device: int | None = None, max_length: int = DEFAULT_MAX_LENGTH
) -> list[CcidRecord]:
    """:func:`iter_ccid_records` as a list."""
    return list(iter_ccid_records(source, device, max_length))


#: Commands waiting for answers before the oldest is given up as unanswered (streaming).
PAIRING_WINDOW = 256


class _Open:
    __slots__ = ("answer", "command", "done")

    def __init__(self, command: CcidRecord) -> None:
        self.command = command
        self.answer: CcidRecord | None = None
        self.done = False  # answered, or given up


def pair_exchanges(
    records: Iterable[CcidRecord], window: int = PAIRING_WINDOW
) -> Iterator[CcidExchange]:
    """Pair commands with answers, in command order, holding at most ``window`` open.

    The answer is the next RDR_to_PC message with the same slot and seq that is not a
    time-extension request (CCID section 6.2.6).  A command is unanswered (response None)
    when the capture ends first, when a later command reuses its slot and seq, or when
    ``window`` newer commands wait behind it.
    """
    queue: deque[_Open] = deque()  # in command order
    waiting: dict[tuple[int, int], _Open] = {}
    for record in records:
        msg = record.message
        if record.direction is CcidDirection.INTERRUPT or isinstance(msg, CcidNotifySlotChange):
            continue
        key = (msg.slot, msg.seq)
        if record.direction is CcidDirection.PC_TO_RDR:
            old = waiting.get(key)
            if old is not None:
                old.done = True  # a new command took its slot and seq: never answered
            entry = waiting[key] = _Open(record)
            queue.append(entry)
        else:
            status = getattr(msg, "status", None)
            if status is not None and status.command_status == CommandStatus.TIME_EXTENSION:
                continue
            entry_ = waiting.pop(key, None)
            if entry_ is not None:
                entry_.answer = record
                entry_.done = True
        while queue and (queue[0].done or len(queue) > window):
            head = queue.popleft()
            head_msg = head.command.message
            head_key = (head_msg.slot, head_msg.seq)  # type: ignore[union-attr]
            if waiting.get(head_key) is head:
                del waiting[head_key]
            yield CcidExchange(head.command, head.answer)
    for entry in queue:
        yield CcidExchange(entry.command, entry.answer)


def iter_ccid_exchanges(
    source: Source,
    device: int | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    *,
    on_bad: OnBad | None = None,
) -> Iterator[CcidExchange]:
    """Every PC_to_RDR command of a capture with its answer, in command order (streaming)."""
    return pair_exchanges(iter_ccid_records(source, device, max_length, on_bad=on_bad))


def ccid_exchanges(
    source: Source, device: int | None = None, max_length: int = DEFAULT_MAX_LENGTH
) -> list[CcidExchange]:
    """:func:`iter_ccid_exchanges` as a list."""
    return list(iter_ccid_exchanges(source, device, max_length))
