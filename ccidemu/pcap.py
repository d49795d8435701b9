"""usbmon captures in classic pcap files, and the CCID traffic inside them.

Formats:

- pcap file format (libpcap ``savefile``, "LibpcapFileFormat"): a 24-byte global header
  (magic ``A1B2C3D4`` for microseconds or ``A1B23C4D`` for nanoseconds, in the writer's
  byte order; version 2.4; thiszone; sigfigs; snaplen; link type) then records of
  ``ts_sec, ts_frac, incl_len, orig_len`` (u32 each) and ``incl_len`` bytes.  pcapng
  (block type ``0A0D0D0A``) is refused with a DecodeError.
- Link types 189 LINKTYPE_USB_LINUX (48-byte usbmon header) and 220
  LINKTYPE_USB_LINUX_MMAPPED (64-byte header), Linux ``Documentation/usb/usbmon.rst``
  "binary interface" / libpcap ``pcap/usb.h``::

      0 u64 id | 8 u8 type 'S'/'C'/'E' | 9 u8 xfer_type (0 iso, 1 intr, 2 ctrl, 3 bulk)
      10 u8 epnum (bit 7 = IN) | 11 u8 devnum | 12 u16 busnum | 14 flag_setup | 15 flag_data
      16 s64 ts_sec | 24 s32 ts_usec | 28 s32 status | 32 u32 length | 36 u32 len_cap
      40 setup[8] (or iso error_count, numdesc)
      -- 220 only: 48 s32 interval | 52 s32 start_frame | 56 u32 xfer_flags | 60 u32 ndesc

  in the capturing host's byte order, taken here to be the pcap file's.  For isochronous
  transfers under link type 220, ``ndesc`` 16-byte descriptors precede the data.

QEMU's ``-device usb-ccid,pcap=FILE`` writes link type 220, keeps at most 256 bulk data
bytes per transfer and sets ``len_cap`` to data + header, so the data length is taken
from the record, and a packet is truncated when it holds fewer bytes than ``length``.

:func:`ccid_exchanges` turns the bulk and interrupt traffic into CCID messages
(:mod:`ccidemu.ccid`) and pairs each command with its response by slot and sequence.
"""

from __future__ import annotations

import enum
import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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
    "iter_usb_packets",
]

log = logging.getLogger(__name__)

LINKTYPE_USB_LINUX = 189
LINKTYPE_USB_LINUX_MMAPPED = 220

_HEADER_SIZES = {LINKTYPE_USB_LINUX: 48, LINKTYPE_USB_LINUX_MMAPPED: 64}
_MAGIC_USEC = 0xA1B2C3D4
_MAGIC_NSEC = 0xA1B23C4D
_PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"

Source = str | os.PathLike[str] | bytes


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


def _load(source: Source) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    return Path(source).read_bytes()


def iter_usb_packets(source: Source, max_length: int = DEFAULT_MAX_LENGTH) -> Iterator[UsbPacket]:
    """Iterate the usbmon packets of a classic pcap file (a path or the file's bytes).

    DecodeError for pcapng, another link type, or a broken header or record.
    """
    data = _load(source)
    if data[:4] == _PCAPNG_MAGIC:
        raise DecodeError("pcapng files are not supported: convert with 'editcap -F pcap'")
    if len(data) < 24:
        raise DecodeError(f"pcap global header needs 24 bytes, got {len(data)}")
    for order in ("<", ">"):
        magic = struct.unpack_from(order + "I", data)[0]
        if magic in (_MAGIC_USEC, _MAGIC_NSEC):
            break
    else:
        raise DecodeError(f"not a pcap file (magic {data[:4].hex()})")
    divisor = 1e9 if magic == _MAGIC_NSEC else 1e6
    _major, _minor, _zone, _sigfigs, _snaplen, link_type = struct.unpack_from(
        order + "HHiIII", data, 4
    )
    header_size = _HEADER_SIZES.get(link_type & 0x0FFFFFFF)
    if header_size is None:
        raise DecodeError(f"pcap link type {link_type} is not usbmon (189 or 220)")
    usbmon = struct.Struct(order + "QBBBBHBBqiiII8s")
    mmapped_tail = struct.Struct(order + "iiII")
    record = struct.Struct(order + "IIII")
    offset = 24
    while offset < len(data):
        if len(data) - offset < record.size:
            raise DecodeError("truncated pcap record header", offset=offset)
        ts_sec, ts_frac, incl_len, _orig_len = record.unpack_from(data, offset)
        check_length(incl_len, max_length, "pcap record")
        body_start = offset + record.size
        offset = body_start + incl_len
        if offset > len(data):
            raise DecodeError("truncated pcap record", offset=body_start)
        if incl_len < header_size:
            raise DecodeError(
                f"pcap record of {incl_len} bytes is shorter than the usbmon header",
                offset=body_start,
            )
        (urb_id, urb_type, xfer_type, epnum, devnum, busnum, _flag_setup, flag_data,
         _sec, _usec, status, length, _len_cap, setup) = usbmon.unpack_from(data, body_start)
        data_start = body_start + header_size
        if header_size == 64 and xfer_type == TransferType.ISOCHRONOUS:
            ndesc = mmapped_tail.unpack_from(data, body_start + 48)[3]
            data_start += 16 * ndesc
        payload = data[data_start:offset]
        has_data = flag_data in (0, ord("="))
        try:
            transfer_type: int = TransferType(xfer_type)
        except ValueError:
            transfer_type = xfer_type
        yield UsbPacket(
            timestamp=ts_sec + ts_frac / divisor,
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


def ccid_records(
    source: Source, device: int | None = None, max_length: int = DEFAULT_MAX_LENGTH
) -> list[CcidRecord]:
    """The CCID messages of a usbmon capture, in order.

    Bulk-OUT submissions carry PC_to_RDR messages, bulk-IN completions RDR_to_PC
    messages (a message may span several transfers), interrupt-IN completions
    NotifySlotChange/HardwareError.  ``device`` keeps one USB device address only.
    Undecodable data is logged and skipped.
    """
    records: list[CcidRecord] = []
    # One stream per bulk pipe; a fresh one after bad data (drop it and go on).
    streams = {d: CcidStream(max_length, d) for d in (CcidDirection.PC_TO_RDR,
                                                      CcidDirection.RDR_TO_PC)}
    for packet in iter_usb_packets(source, max_length):
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
                log.debug("skipping interrupt transfer: %s", exc)
                continue
            records.append(CcidRecord(packet.timestamp, CcidDirection.INTERRUPT, msg,
                                      packet.truncated))
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
                log.debug("skipping truncated bulk transfer at %.6f", packet.timestamp)
            else:
                records.append(CcidRecord(packet.timestamp, direction, cut, True))
            continue
        stream.receive_data(packet.data)
        try:
            while (event := stream.next_event()) is not None:
                records.append(CcidRecord(packet.timestamp, direction, event))
        except DecodeError as exc:
            log.debug("dropping undecodable bulk data: %s", exc)
            streams[direction] = CcidStream(max_length, direction)
    return records


def ccid_exchanges(
    source: Source, device: int | None = None, max_length: int = DEFAULT_MAX_LENGTH
) -> list[CcidExchange]:
    """Every PC_to_RDR command of a capture with its answer, in command order.

    The answer is the next RDR_to_PC message with the same slot and seq that is not a
    time-extension request (CCID section 6.2.6); None when the capture has none.
    """
    exchanges: list[CcidExchange] = []
    waiting: dict[tuple[int, int], int] = {}
    for record in ccid_records(source, device, max_length):
        msg = record.message
        if record.direction is CcidDirection.PC_TO_RDR:
            assert not isinstance(msg, CcidNotifySlotChange)
            waiting[(msg.slot, msg.seq)] = len(exchanges)
            exchanges.append(CcidExchange(record, None))
        elif record.direction is CcidDirection.RDR_TO_PC:
            assert not isinstance(msg, CcidNotifySlotChange)
            status = getattr(msg, "status", None)
            if status is not None and status.command_status == CommandStatus.TIME_EXTENSION:
                continue
            index = waiting.pop((msg.slot, msg.seq), None)
            if index is not None:
                exchanges[index] = CcidExchange(exchanges[index].command, record)
    return exchanges
