"""scriptor (pcsc-tools) scripts and transcripts: import and export.

Source: pcsc-tools ``scriptor`` (Debian 12, 1.6.2) and its manual page (facts, no code).

A *script* is lines of commands: hex APDUs (spaced ``00 A4 04 00 ...`` or packed
``00A40400...``; a line ending in ``\\`` continues on the next), ``reset`` (warm reset of
the card), ``exit`` (stop), blank lines and ``#`` comments.  A script has no responses.
scriptor's *output* (a transcript) is ``> COMMAND`` / ``< RESPONSE : MEANING`` pairs (the
response wrapped every 16 bytes), ``> RESET`` / ``< OK: ATR``; both are read.

The exporter writes a script that scriptor runs as it is: the ATR and the recorded
responses go into comments (``# < 6A 82``), which this importer reads back as the
responses, so an export re-imports to the same exchanges.  A command whose data was
redacted when recorded is left out (in a comment): sent cut, it would only get 6700.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from ccidemu.traces._text import Source, text_lines
from ccidemu.traces.formats._common import BadHex, Item, parse_hex
from ccidemu.traces.model import Exchange, PowerEvent, PowerKind, Problems, Record, TraceHeader

__all__ = ["export_scriptor", "read_scriptor", "sniff_scriptor"]

_EXPECTED = re.compile(r"^#\s*<\s*([0-9A-Fa-f ]*)$")
_ATR = re.compile(r"^#\s*ATR:\s*([0-9A-Fa-f ]+)$", re.IGNORECASE)
_HEX_LINE = re.compile(r"^[0-9A-Fa-f ]+\\?$")


def sniff_scriptor(head: str) -> bool:
    lines = [line.strip() for line in head.splitlines()[:50] if line.strip()]
    useful = [line for line in lines if not line.startswith("#")]
    if not useful:
        return False
    return all(
        _HEX_LINE.match(line) or line.lower() in ("reset", "exit")
        or line.startswith(("> ", "< ", "Using ")) or line.endswith(": Normal processing.")
        or re.fullmatch(r"([0-9A-Fa-f]{2} )*[0-9A-Fa-f]{2} ?(: .*)?", line) is not None
        for line in useful
    )


def _spaced(data: bytes) -> str:
    return " ".join(f"{b:02X}" for b in data)


def read_scriptor(source: Source, problems: Problems, name: str) -> Iterator[Item]:
    header_sent = False
    atr: bytes | None = None
    pending: Exchange | None = None  # the last command, waiting for a recorded response
    continued = ""
    answer: list[str] | None = None  # a transcript response still being read
    number = 0
    for number, raw in text_lines(source, problems, name):
        line = raw.strip()
        where = f"{name}:{number}"
        if answer is not None:  # "< 61 33 ... " wrapped every 16 bytes, then " : meaning"
            body, colon, _ = line.partition(":")
            answer.append(body)
            if colon:
                yield from _finish(pending, " ".join(answer), where, problems)
                pending, answer = None, None
            continue
        if not line:
            continue
        if line.startswith("#"):
            found = _EXPECTED.match(line)
            if found and pending is not None:
                yield from _finish(pending, found.group(1), where, problems)
                pending = None
            elif not header_sent and (found := _ATR.match(line)):
                try:
                    atr = parse_hex(found.group(1))
                except BadHex as exc:
                    problems.report(where, f"ATR comment: {exc}")
            continue
        if not header_sent:
            header_sent = True
            yield TraceHeader(source="scriptor", atr=atr)
        if line.startswith(("< OK:", "< KO:")):  # the answer to "> RESET"
            continue
        if line.startswith("<"):
            if pending is None:
                problems.report(where, "a response line without a command before it")
                continue
            body, colon, _ = line[1:].partition(":")
            if colon:
                yield from _finish(pending, body, where, problems)
                pending = None
            else:
                answer = [body]
            continue
        if pending is not None:
            yield pending
            pending = None
        lowered = line.lower()
        if "exit" in lowered:  # scriptor stops at any line that says exit
            break
        if "reset" in lowered:
            yield PowerEvent(PowerKind.RESET)
            continue
        if line.startswith(("Using ", "Trying ", "Reading commands", "No reader given")):
            continue  # scriptor's own messages in a transcript
        text = line[1:].strip() if line.startswith(">") else line
        if text.endswith("\\"):
            continued += text[:-1] + " "
            continue
        text, continued = continued + text, ""
        try:
            command = parse_hex(text)
        except BadHex as exc:
            problems.report(where, str(exc))
            continue
        if not command:
            problems.report(where, "an empty command")
            continue
        pending = Exchange(command, b"")
    if answer is not None:
        problems.report(f"{name}:{number}", "a response cut off by the end of the file")
    elif pending is not None:
        yield pending
    if not header_sent:
        yield TraceHeader(source="scriptor", atr=atr)
    if continued:
        problems.report(f"{name}:{number}", "a continued command line at the end of the file")


def _finish(pending: Exchange | None, text: str, where: str, problems: Problems
            ) -> Iterator[Exchange]:
    if pending is None:
        return
    try:
        response = parse_hex(text)
    except BadHex as exc:
        problems.report(where, f"recorded response: {exc}")
        yield pending
        return
    yield Exchange(pending.command, response)


def export_scriptor(header: TraceHeader, records: Iterable[Record]) -> Iterator[str]:
    """Lines of a scriptor script replaying ``records``' commands, responses in comments.

    A reset or power-on after the first exchange becomes ``reset``.  scriptor does not send
    GET RESPONSE by itself: the script holds every command the trace has, GET RESPONSEs
    included, so it replays as recorded.
    """
    yield f"# scriptor script exported by ccidemu from a {header.source} trace"
    if header.atr is not None:
        yield f"# ATR: {_spaced(header.atr)}"
    seen_exchange = False
    for record in records:
        if isinstance(record, PowerEvent):
            if record.atr is not None:
                yield f"# power {record.kind.value}, ATR: {_spaced(record.atr)}"
            if record.kind in (PowerKind.ON, PowerKind.RESET) and seen_exchange:
                yield "reset"
            continue
        seen_exchange = True
        if record.command_redacted:  # sending the cut command would only get 6700
            yield f"# left out, its data was redacted when recorded: {_spaced(record.command)}"
            continue
        yield _spaced(record.command)
        if record.response:
            yield f"# < {_spaced(record.response)}"
        elif record.error:
            yield f"# no response: {record.error}"
