"""``pcscd --debug --apdu`` logs.

Source: pcsc-lite ``src/debuglog.c`` (``DebugXxd``, ``log_msg``) and ``src/winscard.c``
``SCardTransmit`` (Debian 12 pcscd 1.9.9), observed on this machine.  Each line starts with
the time since the previous line in microseconds (8 digits), then the message::

    00000005 APDU: 00 A4 04 00 07 62 76 01 FF 00 00 00
    00000576 SW: 6A 82                       the whole response: data and SW1 SW2
    00000002 eventhandler.c:423:EHStatusHandlerThread() Card inserted into Virtual PCD 00 00
    00000006 Card ATR: 3B 8C 80 01 ...
    00000138 eventhandler.c:358:EHStatusHandlerThread() Card Removed From Virtual PCD 00 00
    00000001 winscard.c:258:SCardConnect() Attempting Connect to Virtual PCD 00 00 using ...

The APDU lines do not name the reader; the importer uses the reader of the last
``Attempting Connect to`` line (right when one client uses one reader, as in a debugging
session).  Times are the running sum of the deltas (the log has no date).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from ccidemu.traces._text import Source, text_lines
from ccidemu.traces.formats._common import AtrTracker, BadHex, Item, parse_hex
from ccidemu.traces.model import Exchange, Problems, TraceHeader

__all__ = ["read_pcscd", "sniff_pcscd"]

_LINE = re.compile(r"^(\d{8}) (.*)$")
_CONNECT = re.compile(r"SCardConnect\(\) Attempting Connect to (.+) using protocol: \d+$")
_INSERTED = re.compile(r"Card inserted into (.+)$")
_REMOVED = re.compile(r"Card Removed From (.+)$")


def sniff_pcscd(head: str) -> bool:
    lines = [line for line in head.splitlines()[:40] if line.strip()]
    hits = sum(1 for line in lines if re.match(r"^\d{8} (\w+\.[cl]:\d+:|APDU: |SW: )", line))
    return hits >= max(1, len(lines) // 2)


def read_pcscd(source: Source, problems: Problems, name: str) -> Iterator[Item]:
    yield TraceHeader(source="pcscd --apdu")
    t = 0.0
    reader: str | None = None
    inserted: str | None = None
    atrs = AtrTracker()
    pending: tuple[bytes, float, str] | None = None  # command, its time, where
    for number, line in text_lines(source, problems, name):
        m = _LINE.match(line)
        if m is None:
            continue  # not a pcscd line (another program's output in the same file)
        t += int(m.group(1)) / 1e6
        message = m.group(2)
        where = f"{name}:{number}"
        if message.startswith("APDU: "):
            if pending is not None:
                yield Exchange(pending[0], b"", t=pending[1], reader=reader,
                               error="no response logged")
            try:
                pending = (parse_hex(message[6:]), t, where)
            except BadHex as exc:
                problems.report(where, f"APDU line: {exc}")
                pending = None
            continue
        if message.startswith("SW: "):
            if pending is None:
                problems.report(where, "SW line without an APDU line before it")
                continue
            command, started, _ = pending
            pending = None
            try:
                response = parse_hex(message[4:])
            except BadHex as exc:
                problems.report(where, f"SW line: {exc}")
                continue
            yield Exchange(command, response, t=started, duration=t - started, reader=reader)
            continue
        if message.startswith("Card ATR: "):
            try:
                atr = parse_hex(message[10:])
            except BadHex as exc:
                problems.report(where, f"ATR line: {exc}")
                continue
            event = atrs.seen(inserted, atr, t)
            if event is not None:
                yield event
            continue
        found = _CONNECT.search(message)
        if found:
            reader = found.group(1)
            continue
        found = _INSERTED.search(message)
        if found:
            inserted = found.group(1)
            atrs.forget(inserted)
            continue
        found = _REMOVED.search(message)
        if found:
            event = atrs.seen(found.group(1), None, t)
            if event is not None:
                yield event
    if pending is not None:
        yield Exchange(pending[0], b"", t=pending[1], reader=reader, error="no response logged")
