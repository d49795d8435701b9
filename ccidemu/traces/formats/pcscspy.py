"""pcsc-spy: the raw lines libpcscspy writes to its FIFO, and ``pcsc-spy -n`` output.

Source: pcsc-lite ``src/spy/libpcscspy.c`` and ``src/spy/pcsc-spy`` (Debian 12
``libpcsclite-dev`` 1.9.9), observed on this machine (docs/TRACES.md, "pcsc-spy").

Raw lines (what ``cat ~/pcsc-spy > FILE`` records), each optionally prefixed by the
calling thread's id and ``@``::

    >|SEC|USEC|SCardTransmit          a call starts (epoch time)
    ARGUMENT                          one line per argument, in the function's order
    <|SEC|USEC|SCardTransmit|TEXT|0xRV   the call returns: result text and code

``SCardTransmit``'s arguments: hCard, send dwProtocol, cbPciLength, bSendLength, the
command bytes (spaced hex), receive dwProtocol, cbPciLength, bRecvLength, the response
bytes.  ``SCardConnect``: hContext, the reader, share mode, preferred protocols, phCard and
pdwActiveProtocol in, phCard and dwActiveProtocol out.  ``SCardReconnect``: hCard, share
mode, protocols, dwInitialization, active protocol; ``SCardDisconnect``: hCard,
dwDisposition (1 reset, 2 unpower, 3 eject).  ``SCardGetStatusChange``: hContext,
timeout, cReaders, then per reader in and out: name, current state, event state, ATR
length, ATR.

``pcsc-spy -n`` prints the same calls decoded: the function name on its own line, then
`` i NAME VALUE`` / `` o NAME VALUE`` lines (buffers as 16-byte hex-dump rows), then
`` => TEXT (CODE [0xRV])  [DURATION]``; other threads' calls are indented by four spaces
per thread.  It has durations but no absolute times, so times are unknown (None).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from ccidemu.traces._text import Source, text_lines
from ccidemu.traces.formats._common import AtrTracker, BadHex, Item, hex_tokens, parse_hex
from ccidemu.traces.model import Exchange, PowerEvent, PowerKind, Problems, TraceHeader

__all__ = ["read_pcsc_spy", "sniff_pcsc_spy"]

_RAW = re.compile(r"^(?:([0-9A-Fa-f]+)@)?([<>])\|(\d+)\|(\d+)\|([A-Za-z0-9_]+)(?:\|(.*))?$")
_RAW_ARG = re.compile(r"^(?:([0-9A-Fa-f]+)@)?(.*)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RV = re.compile(r"\((\w+) \[0x([0-9A-Fa-f]+)\]\)\s+\[(\d+\.\d+|\?\?\.\?\?)\]\s*$")
_STATS = re.compile(r"^(Thread \d+/\d+|Results sorted|total time:|\d+\.\d+ sec \()")

#: dwInitialization of SCardReconnect / dwDisposition of SCardDisconnect (winscard.h).
_RECONNECT = {1: PowerKind.RESET, 2: PowerKind.ON}
_DISCONNECT = {1: PowerKind.RESET, 2: PowerKind.OFF, 3: PowerKind.REMOVE}
_PROTOCOLS = ((1, "T=0"), (2, "T=1"), (4, "raw"))


def sniff_pcsc_spy(head: str) -> bool:
    for line in head.splitlines()[:20]:
        line = _ANSI.sub("", line)
        if _RAW.match(line) or line.startswith("SCardEstablishContext") or (
            line.startswith(" i hContext:")
        ):
            return True
    return False


def _protocol(value: int) -> str | None:
    return next((name for bit, name in _PROTOCOLS if value & bit), None)


@dataclass
class _Call:
    function: str
    start: float
    where: str
    args: list[str] = field(default_factory=list)


class _State:
    """What both forms need: hCard -> reader, ATR sightings."""

    def __init__(self) -> None:
        self.readers: dict[str, str] = {}
        self.atrs = AtrTracker()
        self.protocol: str | None = None


def read_pcsc_spy(source: Source, problems: Problems, name: str) -> Iterator[Item]:
    lines = text_lines(source, problems, name)
    first: list[tuple[int, str]] = []
    for number, line in lines:
        if line.strip():
            first.append((number, line))
            break
    if not first:
        yield TraceHeader(source="pcsc-spy")
        return
    if _RAW.match(first[0][1]):
        yield from _raw(_chain(first, lines), problems, name)
    else:
        yield from _text(_chain(first, lines), problems, name)


def _chain(first: list[tuple[int, str]], rest: Iterator[tuple[int, str]]
           ) -> Iterator[tuple[int, str]]:
    yield from first
    yield from rest


# --- raw FIFO lines ----------------------------------------------------------------------


def _hex_arg(call: _Call, index: int) -> bytes:
    value = call.args[index].strip()
    if value in ("", "NULL"):
        return b""
    return parse_hex(value)


def _int_arg(call: _Call, index: int) -> int:
    return int(call.args[index].strip(), 16)


def _raw(lines: Iterator[tuple[int, str]], problems: Problems, name: str) -> Iterator[Item]:
    calls: dict[str, _Call] = {}  # thread -> call in progress
    state = _State()
    start: int | None = None
    header_sent = False
    for number, line in lines:
        where = f"{name}:{number}"
        m = _RAW.match(line)
        if m is None:
            arg = _RAW_ARG.match(line)
            assert arg is not None
            thread = arg.group(1) or ""
            call = calls.get(thread)
            if call is None:
                if line.strip():
                    problems.report(where, "an argument line outside a call")
                continue
            call.args.append(arg.group(2))
            continue
        thread, direction, sec, usec, function, tail = m.groups()
        thread = thread or ""
        micros = int(sec) * 1_000_000 + int(usec)  # exact: no float rounding in durations
        if start is None:
            start = micros
        when = (micros - start) / 1e6
        if not header_sent:
            header_sent = True
            yield TraceHeader(source="pcsc-spy", start=start / 1e6)
        if direction == ">":
            old = calls.pop(thread, None)
            if old is not None:
                problems.report(old.where, f"{old.function} call never returned")
            calls[thread] = _Call(function, when, where)
            continue
        call = calls.pop(thread, None)
        if call is None or call.function != function:
            problems.report(where, f"{function} returns without a call")
            continue
        text, _, rv_hex = (tail or "").rpartition("|")
        try:
            rv = int(rv_hex, 16)
        except ValueError:
            problems.report(where, f"bad return code {rv_hex!r}")
            continue
        try:
            yield from _raw_call(call, rv, text, round(when - call.start, 6), call.start, state)
        except (IndexError, ValueError) as exc:
            problems.report(call.where, f"malformed {function} call: {exc or 'missing argument'}")
    if not header_sent:
        yield TraceHeader(source="pcsc-spy")
    for call in calls.values():
        problems.report(call.where, f"{call.function} call never returned (file ends)")


def _raw_call(call: _Call, rv: int, text: str, duration: float, t: float, state: _State
              ) -> Iterator[Item]:
    function = call.function
    if function == "SCardTransmit":
        reader = state.readers.get(call.args[0].strip())
        command = _hex_arg(call, 4)
        response = _hex_arg(call, 8) if rv == 0 else b""
        yield Exchange(command, response, t=t, duration=duration, reader=reader,
                       error=None if rv == 0 else f"{text} (0x{rv:08X})")
    elif function == "SCardConnect" and rv == 0:
        reader = call.args[1]
        state.readers[call.args[6].strip()] = reader
        state.protocol = _protocol(_int_arg(call, 7))
    elif function == "SCardReconnect" and rv == 0:
        kind = _RECONNECT.get(_int_arg(call, 3))
        if kind is not None:
            yield PowerEvent(kind, t=t, reader=state.readers.get(call.args[0].strip()))
    elif function == "SCardDisconnect" and rv == 0:
        handle = call.args[0].strip()
        reader = state.readers.pop(handle, None)
        kind = _DISCONNECT.get(_int_arg(call, 1))
        if kind is not None:
            yield PowerEvent(kind, t=t, reader=reader)
    elif function == "SCardGetStatusChange" and rv == 0:
        count = _int_arg(call, 2)
        base = 3 + 5 * count  # the "out" states follow the "in" states
        for i in range(count):
            entry = base + 5 * i
            reader = call.args[entry]
            atr = _hex_arg(call, entry + 4) or None
            event = state.atrs.seen(reader, atr, t)
            if event is not None:
                yield event


# --- pcsc-spy -n output ------------------------------------------------------------------


@dataclass
class _TextCall:
    function: str
    where: str
    fields: dict[str, str] = field(default_factory=dict)
    buffers: dict[str, list[str]] = field(default_factory=dict)
    readers: list[tuple[str, str]] = field(default_factory=list)  # (direction+name, value)
    open_buffer: str | None = None


def _split_text(line: str) -> tuple[str, str]:
    """(thread key, content) of a ``pcsc-spy -n`` line."""
    spaces = len(line) - len(line.lstrip(" "))
    content = line.lstrip(" ")
    m = re.match(r"\(t(\d+)\) ", content)
    if m:
        return m.group(1), content[m.end():]
    return str(spaces // 4), content


def _text(lines: Iterator[tuple[int, str]], problems: Problems, name: str) -> Iterator[Item]:
    yield TraceHeader(source="pcsc-spy -n")
    calls: dict[str, _TextCall] = {}
    state = _State()
    for number, raw in lines:
        line = _ANSI.sub("", raw)
        where = f"{name}:{number}"
        if not line.strip():
            continue
        if _STATS.match(line.strip()):
            continue
        thread, content = _split_text(line)
        if content.startswith(("i ", "o ")):
            call = calls.get(thread)
            if call is None:
                problems.report(where, "an argument line outside a call")
                continue
            _text_field(call, content[0], content[2:])
            continue
        if content.startswith("=> "):
            call = calls.pop(thread, None)
            if call is None:
                problems.report(where, "a result line outside a call")
                continue
            m = _RV.search(content)
            if m is None:
                problems.report(where, "result line without a return code")
                continue
            try:
                rv = int(m.group(2), 16)
                duration = None if "?" in m.group(3) else float(m.group(3))
                yield from _text_call(call, rv, content[3:m.start()].strip(), duration, state)
            except (KeyError, IndexError, ValueError) as exc:
                problems.report(call.where, f"malformed {call.function} call: {exc}")
            continue
        if re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", content):
            old = calls.get(thread)
            if old is not None:
                problems.report(old.where, f"{old.function} call has no result line")
            calls[thread] = _TextCall(content, where)
            continue
        problems.report(where, "not a pcsc-spy -n line")
    for call in calls.values():
        problems.report(call.where, f"{call.function} call has no result line (file ends)")


def _text_field(call: _TextCall, direction: str, text: str) -> None:
    if text.startswith(" ") and call.open_buffer is not None:  # a hex-dump row
        call.buffers[call.open_buffer].append(text)
        return
    call.open_buffer = None
    text = text.strip()
    if text.startswith("Atr length"):
        return
    if text.startswith("Atr:"):
        call.readers.append((direction + "atr", text[4:].strip()))
        return
    key, _, value = text.partition(" ")
    key = key.rstrip(":")
    if key in ("bSendBuffer", "bRecvBuffer"):
        call.open_buffer = direction + key
        call.buffers[call.open_buffer] = []
        return
    if key == "szReader":
        call.readers.append((direction, value.strip()))
        return
    call.fields[direction + key] = value.strip()


def _rows(rows: list[str], length: int) -> bytes:
    out = bytearray()
    for row in rows:
        parts = row.split()
        if not parts or len(parts[0]) != 4:
            raise ValueError(f"bad hex-dump row {row.strip()!r}")
        want = min(16, length - len(out))
        tokens = hex_tokens(" ".join(parts[1:]))[:want]
        if len(tokens) < want and len(out) + len(tokens) < length:
            raise ValueError(f"hex-dump row {row.strip()!r} is short")
        out += bytes(int(t, 16) for t in tokens)
    if len(out) != length:
        raise ValueError(f"buffer holds {len(out)} bytes, its length says {length}")
    return bytes(out)


def _length(value: str) -> int:
    return int(value.split()[0], 16)


def _text_call(call: _TextCall, rv: int, text: str, duration: float | None, state: _State
               ) -> Iterator[Item]:
    f = call.fields
    function = call.function
    if function == "SCardTransmit":
        reader = state.readers.get(f["ihCard"].split()[0])
        command = _rows(call.buffers.get("ibSendBuffer", []), _length(f["ibSendLength"]))
        response = b""
        if rv == 0:
            response = _rows(call.buffers.get("obRecvBuffer", []), _length(f["obRecvLength"]))
        yield Exchange(command, response, duration=duration, reader=reader,
                       error=None if rv == 0 else f"{text} (0x{rv:08X})")
    elif function == "SCardConnect" and rv == 0:
        reader = next((value for d, value in call.readers if d == "i"), None)
        if reader is None:
            raise ValueError("no szReader")
        state.readers[f["ophCard"].split()[0]] = reader
        active = f.get("odwActiveProtocol", "")
        state.protocol = active.split()[0] if active else None
    elif function == "SCardReconnect" and rv == 0:
        kind = _RECONNECT.get(_length(f["idwInitialization"]))
        if kind is not None:
            yield PowerEvent(kind, reader=state.readers.get(f["ihCard"].split()[0]))
    elif function == "SCardDisconnect" and rv == 0:
        reader = state.readers.pop(f["ihCard"].split()[0], None)
        code = re.search(r"\((0x[0-9A-Fa-f]+)\)", f["idwDisposition"])
        kind = _DISCONNECT.get(int(code.group(1), 16)) if code else None
        if kind is not None:
            yield PowerEvent(kind, reader=reader)
    elif function == "SCardGetStatusChange" and rv == 0:
        current: str | None = None
        for direction, value in call.readers:
            if direction == "o":
                current = value
            elif direction == "oatr":
                try:
                    atr = parse_hex(value) or None
                except BadHex:
                    raise ValueError(f"bad ATR {value!r}") from None
                event = state.atrs.seen(current, atr, None)
                if event is not None:
                    yield event
