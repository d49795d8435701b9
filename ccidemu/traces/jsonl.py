"""The ccidemu trace file: JSON Lines, a header line then one line per record.

Format (docs/TRACES.md has the full description)::

    {"type":"header","format":"ccidemu-trace","version":1,"source":"ccidemu vpcd",
     "start":"2026-12-01T19:42:17.803000Z","atr":"3b8c...","protocol":"T=1",
     "reader":"Virtual PCD 00 00","secrets":false}
    {"type":"power","event":"on","t":0.0,"reader":"0","atr":"3b8c..."}
    {"type":"apdu","t":0.0123,"reader":"0","command":"00a4040009a00000030800001000",
     "response":"61..9000","duration":0.000131}
    {"type":"apdu",...,"command":"0020008008","response":"9000","redacted":["command"]}

Format 0, the header-less lines ``ccidemu serve --trace`` wrote before (``time`` as
ISO-8601 or epoch seconds, ``session``, ``reader`` index, ``command``, ``response``,
``duration``, ``redacted``, ``error``), is still read: its first record's time becomes the
start.  A file may hold several runs (trace files are appended to): each header starts a
run, and later runs' times are shifted onto the first run's clock when both have a start.

Readers raise only :class:`~ccidemu.traces.model.TraceFormatError` (with ``FILE:LINE``) in
strict mode; otherwise a malformed line is reported to :class:`Problems` and skipped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from ccidemu.redact import is_secret_command, secret_response
from ccidemu.traces._text import Source, source_name, text_lines
from ccidemu.traces.model import (
    FORMAT_NAME,
    FORMAT_VERSION,
    Exchange,
    PowerEvent,
    PowerKind,
    Problems,
    Record,
    TraceFormatError,
    TraceHeader,
)

__all__ = [
    "TraceReader",
    "format_header",
    "format_record",
    "iso_time",
    "parse_iso_time",
    "read_trace",
]

_HEADER_KEYS = frozenset(
    {"type", "format", "version", "source", "start", "atr", "protocol", "reader", "secrets"})
_DUMPS = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def iso_time(epoch: float) -> str:
    """ISO-8601 UTC with microseconds and ``Z``."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso_time(value: str) -> float:
    """Epoch seconds of an ISO-8601 time (UTC when no zone); ValueError when it is not one."""
    text = value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value
    stamp = datetime.fromisoformat(text)
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    try:
        return stamp.timestamp()
    except (OverflowError, OSError) as exc:
        raise ValueError(str(exc)) from None


def format_header(header: TraceHeader) -> str:
    obj: dict[str, Any] = {"type": "header", "format": FORMAT_NAME, "version": FORMAT_VERSION,
                           "source": header.source}
    obj["start"] = iso_time(header.start) if header.start is not None else None
    if header.atr is not None:
        obj["atr"] = header.atr.hex()
    if header.protocol is not None:
        obj["protocol"] = header.protocol
    if header.reader is not None:
        obj["reader"] = header.reader
    obj["secrets"] = header.secrets
    for key, value in header.extra:
        obj.setdefault(key, value)
    return _DUMPS(obj)


def _round(value: float) -> float:
    return round(value, 6)


def format_record(record: Record) -> str:
    """The JSON line (no newline) of one record, exactly as it is (no redaction here)."""
    obj: dict[str, Any]
    if isinstance(record, Exchange):
        obj = {"type": "apdu"}
        if record.t is not None:
            obj["t"] = _round(record.t)
        if record.reader is not None:
            obj["reader"] = record.reader
        if record.session is not None:
            obj["session"] = record.session
        obj["command"] = record.command.hex()
        obj["response"] = record.response.hex()
        if record.duration is not None:
            obj["duration"] = _round(record.duration)
        if record.compare is not None:
            obj["compare"] = record.compare.hex()
        if record.compare_error is not None:
            obj["compare_error"] = record.compare_error
        if record.redacted:
            obj["redacted"] = [part for part, cut in (("command", record.command_redacted),
                                                      ("response", record.response_redacted),
                                                      ("compare", record.compare_redacted))
                               if cut]
        if record.truncated:
            obj["truncated"] = True
        if record.error is not None:
            obj["error"] = record.error
        return _DUMPS(obj)
    obj = {"type": "power", "event": record.kind.value}
    if record.t is not None:
        obj["t"] = _round(record.t)
    if record.reader is not None:
        obj["reader"] = record.reader
    if record.session is not None:
        obj["session"] = record.session
    if record.atr is not None:
        obj["atr"] = record.atr.hex()
    if record.error is not None:
        obj["error"] = record.error
    return _DUMPS(obj)


# --- parsing ---------------------------------------------------------------------------


class _Bad(Exception):
    """A malformed field (turned into TraceFormatError with the line's position)."""


def _hex(obj: dict[str, Any], key: str, *, optional: bool = False) -> bytes | None:
    value = obj.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise _Bad(f"{key!r} must be a hex string")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise _Bad(f"{key!r} is not valid hex") from None


def _number(obj: dict[str, Any], key: str, *, minimum: float | None = None) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Bad(f"{key!r} must be a number")
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        raise _Bad(f"{key!r} must be a finite number" + (
            f" >= {minimum:g}" if minimum is not None else ""))
    return float(value)


def _text(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Bad(f"{key!r} must be a string")
    return value


def _reader(obj: dict[str, Any]) -> str | None:
    value = obj.get("reader")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _Bad("'reader' must be a name or an index")
    return str(value)


def _session(obj: dict[str, Any]) -> int | None:
    value = obj.get("session")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Bad("'session' must be a non-negative integer")
    return value


def _flag(obj: dict[str, Any], key: str) -> bool:
    value = obj.get(key, False)
    if not isinstance(value, bool):
        raise _Bad(f"{key!r} must be true or false")
    return value


def _start(obj: dict[str, Any]) -> float | None:
    value = obj.get("start")
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return parse_iso_time(value)
        except ValueError:
            raise _Bad(f"'start' {value[:40]!r} is not ISO-8601") from None
    return _number(obj, "start")


def _parse_header(obj: dict[str, Any]) -> TraceHeader:
    if obj.get("format") != FORMAT_NAME:
        raise _Bad(f"header 'format' must be {FORMAT_NAME!r}")
    version = obj.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise _Bad("header 'version' must be a positive integer")
    if version > FORMAT_VERSION:
        raise _Bad(f"trace format version {version} is newer than this ccidemu reads "
                   f"({FORMAT_VERSION})")
    extra = tuple((k, v) for k, v in obj.items() if k not in _HEADER_KEYS)
    return TraceHeader(
        source=_text(obj, "source") or "unknown", start=_start(obj), atr=_hex(obj, "atr",
        optional=True), protocol=_text(obj, "protocol"), reader=_reader(obj),
        secrets=_flag(obj, "secrets"), version=version, extra=extra)


def _redaction(obj: dict[str, Any]) -> tuple[bool, bool, bool]:
    value = obj.get("redacted")
    if value is None:
        return False, False, False
    if (not isinstance(value, list)
            or not all(p in ("command", "response", "compare") for p in value)):
        raise _Bad("'redacted' must be a list of \"command\", \"response\", \"compare\"")
    return "command" in value, "response" in value, "compare" in value


def _parse_apdu(obj: dict[str, Any]) -> Exchange:
    command = _hex(obj, "command")
    response = _hex(obj, "response")
    assert command is not None and response is not None
    cut_command, cut_response, cut_compare = _redaction(obj)
    return Exchange(
        command=command, response=response, t=_number(obj, "t"),
        duration=_number(obj, "duration", minimum=0), reader=_reader(obj),
        session=_session(obj), command_redacted=cut_command, response_redacted=cut_response,
        truncated=_flag(obj, "truncated"), error=_text(obj, "error"),
        compare=_hex(obj, "compare", optional=True), compare_redacted=cut_compare,
        compare_error=_text(obj, "compare_error"))


def _parse_power(obj: dict[str, Any]) -> PowerEvent:
    event = obj.get("event")
    try:
        kind = PowerKind(str(event))
    except ValueError:
        raise _Bad(f"'event' must be one of {', '.join(k.value for k in PowerKind)}") from None
    return PowerEvent(kind=kind, t=_number(obj, "t"), reader=_reader(obj),
                      session=_session(obj), atr=_hex(obj, "atr", optional=True),
                      error=_text(obj, "error"))


def _old_time(obj: dict[str, Any]) -> float:
    value = obj.get("time")
    if isinstance(value, str):
        try:
            return parse_iso_time(value)
        except ValueError:
            raise _Bad(f"'time' {value[:40]!r} is not ISO-8601") from None
    number = _number(obj, "time")
    if number is None:
        raise _Bad("missing 'time'")
    return number


def _parse_old(obj: dict[str, Any], start: float) -> Exchange:
    """A format-0 line (``ccidemu serve --trace`` before format 1)."""
    when = _old_time(obj)
    command = _hex(obj, "command")
    response = _hex(obj, "response")
    assert command is not None and response is not None
    redacted = obj.get("redacted", False)
    if not isinstance(redacted, bool):
        raise _Bad("'redacted' must be true or false")
    # Format 0 said only "something was cut": the rules of ccidemu.redact say what.
    cut_command = redacted and is_secret_command(command)
    cut_response = redacted and (secret_response(command) or (
        len(command) >= 2 and command[1] == 0xC0))
    session = _session(obj)
    if session is None:
        raise _Bad("missing 'session'")
    if _reader(obj) is None:
        raise _Bad("missing 'reader'")
    return Exchange(
        command=command, response=response, t=when - start,
        duration=_number(obj, "duration", minimum=0) or 0.0, reader=_reader(obj),
        session=session, command_redacted=cut_command, response_redacted=cut_response,
        error=_text(obj, "error"))


def _load(line: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise _Bad(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise _Bad("a trace line must be a JSON object")
    return obj


class TraceReader:
    """The header and records of a trace file, read as they are iterated (streaming).

    ``source``: a path, an open binary file, bytes, or lines of text.  ``problems``:
    where malformed lines go (default: strict, the first one raises TraceFormatError).
    :attr:`header` is read when the reader is made.
    """

    def __init__(self, source: Source, problems: Problems | None = None,
                 name: str | None = None) -> None:
        self.name = name or source_name(source)
        self.problems = problems if problems is not None else Problems(strict=True)
        self._lines = text_lines(source, self.problems, self.name)
        self._first: dict[str, Any] | None = None
        self._first_at = ""
        self.header = self._read_header()
        self._used = False

    def _where(self, number: int) -> str:
        return f"{self.name}:{number}"

    def _read_header(self) -> TraceHeader:
        for number, line in self._lines:
            if not line.strip():
                continue
            try:
                obj = _load(line)
                if obj.get("type") == "header":
                    return _parse_header(obj)
                if "type" in obj or "time" not in obj:
                    raise _Bad("the first line is neither a trace header nor a format-0 record")
                start = _old_time(obj)
            except _Bad as exc:
                self.problems.report(self._where(number), str(exc))
                continue
            self._first, self._first_at = obj, self._where(number)
            return TraceHeader(source="ccidemu serve (trace format 0)", start=start, version=0)
        return TraceHeader(source="empty trace")

    def __iter__(self) -> Iterator[Record]:
        if self._used:
            raise RuntimeError("a TraceReader is read once")
        self._used = True
        header = self.header
        run_start = header.start
        offset = 0.0  # shifts a later run's times onto the first run's clock
        if self._first is not None:
            try:
                yield _parse_old(self._first, run_start or 0.0)
            except _Bad as exc:
                self.problems.report(self._first_at, str(exc))
        for number, line in self._lines:
            if not line.strip():
                continue
            try:
                obj = _load(line)
                kind = obj.get("type")
                if kind == "apdu":
                    record: Record = _parse_apdu(obj)
                elif kind == "power":
                    record = _parse_power(obj)
                elif kind == "header":
                    again = _parse_header(obj)
                    if again.start is not None and header.start is not None:
                        offset = again.start - header.start
                    continue
                elif kind is None and header.version == 0:
                    record = _parse_old(obj, run_start or 0.0)
                else:
                    raise _Bad(f"unknown record type {kind!r}")
            except _Bad as exc:
                self.problems.report(self._where(number), str(exc))
                continue
            if offset and record.t is not None:
                record = _shift(record, offset)
            yield record


def _shift(record: Record, offset: float) -> Record:
    from dataclasses import replace

    assert record.t is not None
    return replace(record, t=record.t + offset)


def read_trace(source: Source, *, strict: bool = True) -> TraceReader:
    """A :class:`TraceReader` (strict by default: the first malformed line raises)."""
    return TraceReader(source, Problems(strict=strict))


def check_header_line(line: str) -> TraceHeader:
    """Parse one header line (TraceFormatError if it is not one)."""
    try:
        obj = _load(line)
        if obj.get("type") != "header":
            raise _Bad("not a header line")
        return _parse_header(obj)
    except _Bad as exc:
        raise TraceFormatError("header", str(exc)) from None
