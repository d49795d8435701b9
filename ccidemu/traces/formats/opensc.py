"""``OPENSC_DEBUG=9`` logs (OpenSC 0.23 ``sc_do_log`` lines and ``sc_apdu_log`` blocks).

Source: OpenSC ``src/libopensc/log.c``, ``apdu.c`` ``sc_apdu_log``, ``reader-pcsc.c``
``pcsc_transmit``, observed on this machine.  Log lines::

    P:11602; T:0x1405.. 19:42:17.803 [opensc-tool] reader-pcsc.c:325:pcsc_transmit: reader 'R'
    P:11602; T:0x1405.. 19:42:17.803 [opensc-tool] reader-pcsc.c:326:pcsc_transmit:
    Outgoing APDU (12 bytes):
    00 A4 04 00 07 62 76 01 FF 00 00 00 .....bv.....
                                          (blank line ends the block)
    ... Incoming APDU (2 bytes):
    6A 82 j.

The hex rows hold 16 bytes followed by an ASCII column; the byte count in the block's
first line says how many to take.  ``match_atr_table: ATR     : 3b:8c:...`` names the
card's ATR, ``pcsc_connect: Initial protocol: T=1`` the protocol.  Times are the time of
day with milliseconds (the log has no date): seconds since the first line, a step back
of more than 12 hours taken as midnight.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from ccidemu.traces._text import Source, text_lines
from ccidemu.traces.formats._common import AtrTracker, BadHex, Item, hex_tokens, parse_hex
from ccidemu.traces.model import Exchange, Problems, TraceHeader

__all__ = ["read_opensc", "sniff_opensc"]

_LINE = re.compile(
    r"^(?:P:\d+; T:0x[0-9a-fA-F]+ )?(\d\d):(\d\d):(\d\d)\.(\d{3}) "
    r"\[[^\]]*\] ([^:]+):\d+:(\w+): ?(.*)$")
_BLOCK = re.compile(r"^(Outgoing|Incoming) APDU \((\d+) bytes\):$")
_READER = re.compile(r"^reader '(.*)'$")
_ATR = re.compile(r"^ATR\s+: ([0-9a-fA-F:]+)$")
_PROTOCOL = re.compile(r"^Initial protocol: (T=\d)$")
_DAY = 86400.0


def sniff_opensc(head: str) -> bool:
    return any(_LINE.match(line) and line.startswith("P:") for line in head.splitlines()[:20])


def read_opensc(source: Source, problems: Problems, name: str) -> Iterator[Item]:
    yield TraceHeader(source="OPENSC_DEBUG")
    lines = text_lines(source, problems, name)
    first: float | None = None
    last = 0.0
    days = 0.0
    now: float | None = None
    reader: str | None = None
    atrs = AtrTracker()
    outgoing: tuple[bytes, float | None, str] | None = None
    for number, line in lines:
        where = f"{name}:{number}"
        m = _LINE.match(line)
        if m is not None:
            clock = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + int(m.group(3)) + int(
                m.group(4)) / 1000
            if first is None:
                first = clock
            if clock + days < last - _DAY / 2:
                days += _DAY
            last = clock + days
            now = last - first
            message = m.group(7)
            if m.group(6) == "pcsc_transmit":
                found = _READER.match(message)
                if found:
                    reader = found.group(1)
            elif m.group(6) == "match_atr_table":
                found = _ATR.match(message)
                if found:
                    try:
                        event = atrs.seen(reader, parse_hex(found.group(1)), now)
                    except BadHex:
                        event = None
                    if event is not None:
                        yield event
            continue
        block = _BLOCK.match(line.strip())
        if block is None:
            continue
        try:
            data = _read_block(lines, int(block.group(2)))
        except ValueError as exc:
            problems.report(where, f"{block.group(1)} APDU block: {exc}")
            continue
        if block.group(1) == "Outgoing":
            if outgoing is not None:
                yield Exchange(outgoing[0], b"", t=outgoing[1], reader=reader,
                               error="no incoming APDU logged")
            outgoing = (data, now, where)
        else:
            if outgoing is None:
                problems.report(where, "incoming APDU without an outgoing one")
                continue
            command, started, _ = outgoing
            outgoing = None
            duration = None if started is None or now is None else now - started
            yield Exchange(command, data, t=started, duration=duration, reader=reader)
    if outgoing is not None:
        yield Exchange(outgoing[0], b"", t=outgoing[1], reader=reader,
                       error="no incoming APDU logged")


def _read_block(lines: Iterator[tuple[int, str]], length: int) -> bytes:
    out = bytearray()
    while len(out) < length:
        item = next(lines, None)
        if item is None:
            raise ValueError(f"file ends after {len(out)} of {length} bytes")
        want = min(16, length - len(out))
        tokens = hex_tokens(item[1])[:want]
        if len(tokens) < want:
            raise ValueError(f"line {item[0]} holds {len(tokens)} bytes, expected {want}")
        out += bytes(int(t, 16) for t in tokens)
    return bytes(out)
