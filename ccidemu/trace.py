"""Compatibility names for the trace code before :mod:`ccidemu.traces` (format 0).

``ccidemu serve --trace`` wrote header-less JSON Lines (format 0, docs/TRACES.md): one
object per exchange with ``time`` (ISO-8601 UTC, or epoch seconds), ``session``, ``reader``
(index), ``command``, ``response``, ``duration``, optional ``redacted`` (true) and
``error``.  :func:`format_record` still writes that line; :func:`read_trace` reads format 0
*and* format 1 files (the exchanges, as :class:`TraceRecord`; power events are skipped),
raising ConfigError with ``FILE:LINE`` for a malformed line.  New code uses
:class:`ccidemu.traces.TraceWriter` and :func:`ccidemu.traces.read_trace`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ccidemu.errors import ConfigError
from ccidemu.redact import SECRET_INS, Redactor, is_secret_command, redact_command
from ccidemu.traces.describe import TRAFFIC, describe_exchange
from ccidemu.traces.jsonl import TraceReader, iso_time
from ccidemu.traces.model import Exchange, Problems, TraceFormatError

__all__ = [
    "SECRET_INS",
    "TRAFFIC",
    "Redactor",
    "TraceRecord",
    "describe_exchange",
    "format_record",
    "is_secret_command",
    "parse_record",
    "read_trace",
    "redact_command",
]


@dataclass(frozen=True)
class TraceRecord:
    """One APDU exchange as format 0 stored it."""

    time: float  # epoch seconds, UTC
    session: int
    reader: int
    command: bytes
    response: bytes
    duration: float
    redacted: bool = False
    error: str | None = None
    #: ``serve --compare``: the reference card's answer when it differed from the card's
    compare: bytes | None = None
    #: ``serve --compare``: the reference card could not answer
    compare_error: str | None = None


def format_record(
    record: TraceRecord, *, secrets: bool = False, redactor: Redactor | None = None
) -> str:
    """The format-0 JSON line (without the newline) for ``record``; redacts unless ``secrets``.

    Give the reader's ``redactor`` when records are written in order, so that a GET RESPONSE
    continuing a secret answer is redacted too.
    """
    shown = (redactor or Redactor(secrets)).exchange(record.command, record.response)
    obj: dict[str, Any] = {
        "time": iso_time(record.time),
        "session": record.session,
        "reader": record.reader,
        "command": shown.command.hex(),
        "response": shown.response.hex(),
        "duration": round(record.duration, 6),
    }
    if shown.redacted or record.redacted:
        obj["redacted"] = True
    if record.error is not None:
        obj["error"] = record.error
    return json.dumps(obj, separators=(",", ":"))


def _record(exchange: Exchange, start: float) -> TraceRecord:
    reader = exchange.reader
    return TraceRecord(
        time=start + (exchange.t or 0.0),
        session=exchange.session or 0,
        reader=int(reader) if reader is not None and reader.isdigit() else 0,
        command=exchange.command,
        response=exchange.response,
        duration=exchange.duration or 0.0,
        redacted=exchange.redacted,
        error=exchange.error,
        compare=exchange.compare,
        compare_error=exchange.compare_error,
    )


def _records(reader: TraceReader) -> Iterator[TraceRecord]:
    start = reader.header.start or 0.0
    try:
        for record in reader:
            if isinstance(record, Exchange):
                yield _record(record, start)
    except TraceFormatError as exc:
        raise ConfigError(str(exc)) from None


def parse_record(line: str, where: str = "trace") -> TraceRecord:
    """One format-0 (or format-1 exchange) line -> TraceRecord; ConfigError naming ``where``."""
    try:
        reader = TraceReader([line], Problems(strict=True), name=where)
        records = list(_records(reader))
    except TraceFormatError as exc:
        raise ConfigError(f"{where}: {exc.reason}") from None
    except ConfigError as exc:
        raise ConfigError(str(exc).replace(f"{where}:1:", f"{where}:", 1)) from None
    if len(records) != 1:
        raise ConfigError(f"{where}: not an exchange record")
    return records[0]


def read_trace(source: str | Path | Iterable[str]) -> Iterator[TraceRecord]:
    """Exchanges of a trace file (a path) or of lines; blank lines are skipped.

    Raises ConfigError with ``NAME:LINE`` for the first malformed line.
    """
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"cannot read trace {path}: no such file")
    try:
        reader = TraceReader(source, Problems(strict=True),
                             name=None if isinstance(source, str | Path) else "trace")
    except TraceFormatError as exc:
        raise ConfigError(str(exc)) from None
    yield from _records(reader)
