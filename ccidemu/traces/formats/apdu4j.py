"""apdu4j dumps (``apdu4j --dump FILE``): import and export.

Source: martinpaljak/apdu4j ``DumpFormat`` / ``DumpingBIBO`` (facts, no code).  A dump is
text: a header of ``#`` comments (``# ATR: HEX``, ``# PROTOCOL: T=1``, optionally
``# UID: HEX``, ended by a bare ``#``), then for every exchange a command line (hex, no
spaces), a ``# Nms`` comment with the time taken, and the response line (hex).  A failed
transmit writes ``# Nms MESSAGE`` and no response line.  Other comments are ignored;
older apdu4j versions wrote ``# Sent`` / ``# Received in Nms``.  Hex lines pair up as
command, response in order.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from ccidemu.traces._text import Source, text_lines
from ccidemu.traces.formats._common import BadHex, Item, parse_hex
from ccidemu.traces.model import Exchange, PowerEvent, Problems, Record, TraceHeader

__all__ = ["export_apdu4j", "read_apdu4j", "sniff_apdu4j"]

_TIME = re.compile(r"^#\s*(?:Received in\s*)?(\d+)\s*ms\b\s*(.*)$", re.IGNORECASE)


def sniff_apdu4j(head: str) -> bool:
    return any(line.startswith(("# ATR: ", "# PROTOCOL: ")) or _TIME.match(line)
               for line in head.splitlines()[:50])


def read_apdu4j(source: Source, problems: Problems, name: str) -> Iterator[Item]:
    atr: bytes | None = None
    protocol: str | None = None
    header_sent = False
    command: bytes | None = None
    command_at = ""
    elapsed: float | None = None
    t = 0.0
    for number, raw in text_lines(source, problems, name):
        line = raw.strip()
        where = f"{name}:{number}"
        if not line:
            continue
        if line.startswith("#"):
            if not header_sent:
                if line.startswith("# ATR:"):
                    try:
                        atr = parse_hex(line[6:])
                    except BadHex as exc:
                        problems.report(where, f"ATR comment: {exc}")
                    continue
                if line.startswith("# PROTOCOL:"):
                    protocol = line[11:].strip() or None
                    continue
            m = _TIME.match(line)
            if m is not None and command is not None:
                elapsed = int(m.group(1)) / 1000
                if m.group(2):  # the transmit failed: no response line follows
                    yield Exchange(command, b"", t=t, duration=elapsed, error=m.group(2))
                    t += elapsed
                    command, elapsed = None, None
            continue
        if not header_sent:
            header_sent = True
            yield TraceHeader(source="apdu4j", atr=atr, protocol=protocol)
        try:
            data = parse_hex(line)
        except BadHex as exc:
            problems.report(where, str(exc))
            if command is not None:  # keep the pairing: this was meant as its response
                command, elapsed = None, None
            continue
        if command is None:
            command, command_at = data, where
            continue
        yield Exchange(command, data, t=t, duration=elapsed)
        t += elapsed or 0.0
        command, elapsed = None, None
    if not header_sent:
        yield TraceHeader(source="apdu4j", atr=atr, protocol=protocol)
    if command is not None:
        problems.report(command_at, "command without a response (file ends)")


def export_apdu4j(header: TraceHeader, records: Iterable[Record]) -> Iterator[str]:
    """Lines (no newlines) of an apdu4j dump of ``records``' exchanges.

    apdu4j has no place for power events or readers: they are left out (the header's ATR,
    or the first power-on's, is written).  An exchange without a response is written with
    apdu4j's failed-transmit comment.
    """
    atr = header.atr
    body: list[str] = []
    head_written = False

    def head() -> Iterator[str]:
        if atr is not None:
            yield f"# ATR: {atr.hex().upper()}"
        if header.protocol is not None:
            yield f"# PROTOCOL: {header.protocol}"
        yield "#"

    for record in records:
        if isinstance(record, PowerEvent):
            if atr is None and record.atr is not None and not head_written:
                atr = record.atr
            continue
        if not head_written:
            head_written = True
            yield from head()
        body.clear()
        millis = round((record.duration or 0.0) * 1000)
        yield record.command.hex().upper()
        if record.response or record.error is None:
            yield f"# {millis}ms"
            yield record.response.hex().upper()
        else:
            yield f"# {millis}ms {record.error}"
    if not head_written:
        yield from head()
