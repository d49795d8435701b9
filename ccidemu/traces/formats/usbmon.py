"""usbmon captures (pcap and pcapng, link types 189 and 220) to trace records.

The capture is read by :mod:`ccidemu.pcap` (streaming); its CCID messages
(:mod:`ccidemu.ccid`) are paired by slot and sequence.  XfrBlock + DataBlock is an
exchange (``truncated`` when the capture cut either: QEMU's ``usb-ccid,pcap=`` keeps 256
bytes per transfer); IccPowerOn + DataBlock is a power-on with the ATR; IccPowerOff is a
power-off.  The reader is ``"slot N"``.  A command the capture never answers becomes an
exchange with an error; a failed DataBlock (bmCommandStatus failed) is an exchange with
the CCID error.  Other CCID commands (GetSlotStatus, SetParameters, Escape...) are not
APDUs and are not recorded.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO, cast

from ccidemu.ccid import (
    CcidDataBlock,
    CcidIccPowerOff,
    CcidIccPowerOn,
    CcidXfrBlock,
)
from ccidemu.errors import DecodeError
from ccidemu.pcap import iter_ccid_exchanges
from ccidemu.traces._text import Source
from ccidemu.traces.formats._common import Item
from ccidemu.traces.model import Exchange, PowerEvent, PowerKind, Problems, TraceHeader

__all__ = ["read_usbmon", "sniff_usbmon"]

_MAGICS = (b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d",
           b"\x0a\x0d\x0d\x0a")


def sniff_usbmon(head: bytes) -> bool:
    return head[:4] in _MAGICS


def read_usbmon(source: Source, problems: Problems, name: str) -> Iterator[Item]:
    def on_bad(position: str, reason: str) -> None:
        problems.report(f"{name}: {position}", reason)

    start: float | None = None
    header_sent = False
    exchanges = iter_ccid_exchanges(cast(str | bytes | BinaryIO, source), on_bad=on_bad)
    try:
        for exchange in exchanges:
            command = exchange.command
            if start is None:
                start = command.timestamp
            if not header_sent:
                header_sent = True
                yield TraceHeader(source="usbmon", start=start)
            msg = command.message
            t = command.timestamp - start
            answer = exchange.response
            duration = None if answer is None else answer.timestamp - command.timestamp
            reader = f"slot {msg.slot}"  # type: ignore[union-attr]
            reply = answer.message if answer is not None else None
            if isinstance(msg, CcidXfrBlock):
                error = None
                response = b""
                if reply is None:
                    error = "no answer in the capture"
                elif isinstance(reply, CcidDataBlock) and not reply.status.failed:
                    response = reply.data
                else:
                    status = getattr(reply, "status", None)
                    error = status.describe() if status is not None else type(reply).__name__
                yield Exchange(msg.data, response, t=t, duration=duration, reader=reader,
                               truncated=exchange.truncated, error=error)
            elif isinstance(msg, CcidIccPowerOn):
                atr = None
                error = None
                if isinstance(reply, CcidDataBlock) and not reply.status.failed:
                    atr = reply.data
                else:
                    error = "no ATR in the capture" if reply is None else "power-on failed"
                yield PowerEvent(PowerKind.ON, t=t, reader=reader, atr=atr, error=error)
            elif isinstance(msg, CcidIccPowerOff):
                yield PowerEvent(PowerKind.OFF, t=t, reader=reader)
    except DecodeError as exc:  # the file itself is cut or not a capture
        if not header_sent:
            header_sent = True
            yield TraceHeader(source="usbmon")
        problems.report(f"{name}", str(exc))
    if not header_sent:
        yield TraceHeader(source="usbmon")
