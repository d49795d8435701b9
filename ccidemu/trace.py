"""APDU trace records (JSON Lines) and the redaction of secrets in them.

Pure: no files are opened here except by :func:`read_trace` when given a path; the daemon
(``ccidemu serve --trace FILE``) writes the lines this module formats.

Record format, one JSON object per line (UTF-8, ``\\n``-terminated)::

    {"time": "2024-05-01T12:00:00.123456Z",  # ISO-8601 UTC (readers also accept epoch seconds)
     "session": 1,                           # daemon session id
     "reader": 0,                            # reader index in the session (order of --card)
     "command": "00a4040007a0000000031010",  # command APDU, hex
     "response": "9000",                     # response APDU (data + SW1 SW2), hex; "" if none
     "duration": 0.000123,                   # seconds from command received to response sent
     "redacted": true,                       # optional: command data removed (see below)
     "error": "card error: ...",             # optional: the card could not answer
     "compare": "6a82",                      # optional (--compare): the reference card's
                                             # answer, when it differs from the card's
     "compare_error": "CardError: ..."}      # optional (--compare): the reference failed

Redaction follows :mod:`ccidemu.redact`: unless secrets are asked for, a command whose data
is a secret (PINs, PUKs, management keys, imported keys, symmetric authentication) is cut to
its header and Lc field, a secret response (a management-key witness or challenge) to its
SW1 SW2, and the record gets ``"redacted": true``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ccidemu.apdu import ins_label
from ccidemu.errors import ConfigError
from ccidemu.redact import SECRET_INS, Redactor, Shown, is_secret_command, redact_command
from ccidemu.sw import sw_meaning

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

#: Log level below DEBUG for raw frame dumps (``-vvv``; ``vmc.cli`` names it TRAFFIC).
TRAFFIC = 5



@dataclass(frozen=True)
class TraceRecord:
    """One APDU exchange as stored in a trace file."""

    time: float  # epoch seconds, UTC
    session: int
    reader: int
    command: bytes
    response: bytes
    duration: float
    redacted: bool = False
    error: str | None = None
    #: ``--compare``: the reference card's answer when it differed from the card's
    compare: bytes | None = None
    #: ``--compare``: the reference card could not answer
    compare_error: str | None = None


def _iso_time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def format_record(
    record: TraceRecord, *, secrets: bool = False, redactor: Redactor | None = None,
    compare_redactor: Redactor | None = None,
) -> str:
    """The JSON line (without the newline) for ``record``; redacts unless ``secrets``.

    Give the reader's ``redactor`` when records are written in order, so that a GET RESPONSE
    continuing a secret answer is redacted too (and ``compare_redactor`` for the stream of
    the ``--compare`` card's answers).
    """
    shown = (redactor or Redactor(secrets)).exchange(record.command, record.response)
    redacted = shown.redacted
    compared = None
    if record.compare is not None:
        other = (compare_redactor or Redactor(secrets)).exchange(record.command,
                                                                   record.compare)
        compared = other.response
        redacted = redacted or other.redacted
    obj: dict[str, Any] = {
        "time": _iso_time(record.time),
        "session": record.session,
        "reader": record.reader,
        "command": shown.command.hex(),
        "response": shown.response.hex(),
        "duration": round(record.duration, 6),
    }
    if redacted or record.redacted:
        obj["redacted"] = True
    if record.error is not None:
        obj["error"] = record.error
    if compared is not None:
        obj["compare"] = compared.hex()
    if record.compare_error is not None:
        obj["compare_error"] = record.compare_error
    return json.dumps(obj, separators=(",", ":"))


def _bad(where: str, reason: str) -> ConfigError:
    return ConfigError(f"{where}: {reason}")


def _parse_time(value: object, where: str) -> float:
    if isinstance(value, bool):
        raise _bad(where, "'time' must be an ISO-8601 string or epoch seconds")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise _bad(where, "'time' is not a finite number")
        return float(value)
    if isinstance(value, str):
        text = value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value
        try:
            stamp = datetime.fromisoformat(text)
        except ValueError:
            raise _bad(where, f"'time' {value!r} is not ISO-8601") from None
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=UTC)
        try:
            return stamp.timestamp()
        except (OverflowError, ValueError):
            raise _bad(where, f"'time' {value!r} is out of range") from None
    raise _bad(where, "'time' must be an ISO-8601 string or epoch seconds")


def _parse_hex(obj: dict[str, Any], key: str, where: str) -> bytes:
    value = obj.get(key)
    if not isinstance(value, str):
        raise _bad(where, f"{key!r} must be a hex string")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise _bad(where, f"{key!r} is not valid hex") from None


def _parse_int(obj: dict[str, Any], key: str, where: str) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad(where, f"{key!r} must be a non-negative integer")
    return value


def parse_record(line: str, where: str = "trace") -> TraceRecord:
    """One trace line -> TraceRecord.  ConfigError naming ``where`` (e.g. ``file:12``)."""
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise _bad(where, f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise _bad(where, "a trace line must be a JSON object")
    if "time" not in obj:
        raise _bad(where, "missing 'time'")
    time = _parse_time(obj["time"], where)
    duration = obj.get("duration", 0.0)
    if isinstance(duration, bool) or not isinstance(duration, int | float) or not (
        math.isfinite(duration) and duration >= 0
    ):
        raise _bad(where, "'duration' must be a non-negative number of seconds")
    redacted = obj.get("redacted", False)
    if not isinstance(redacted, bool):
        raise _bad(where, "'redacted' must be true or false")
    error = obj.get("error")
    if error is not None and not isinstance(error, str):
        raise _bad(where, "'error' must be a string")
    compare = _parse_hex(obj, "compare", where) if "compare" in obj else None
    compare_error = obj.get("compare_error")
    if compare_error is not None and not isinstance(compare_error, str):
        raise _bad(where, "'compare_error' must be a string")
    return TraceRecord(
        time=time,
        session=_parse_int(obj, "session", where),
        reader=_parse_int(obj, "reader", where),
        command=_parse_hex(obj, "command", where),
        response=_parse_hex(obj, "response", where),
        duration=float(duration),
        redacted=redacted,
        error=error,
        compare=compare,
        compare_error=compare_error,
    )


def read_trace(source: str | Path | Iterable[str]) -> Iterator[TraceRecord]:
    """Records of a trace file (a path) or of lines; blank lines are skipped.

    Raises ConfigError with ``NAME:LINE`` for the first malformed line.
    """
    if isinstance(source, str | Path):
        path = Path(source)
        try:
            with path.open(encoding="utf-8") as f:
                yield from _read_lines(f, str(path))
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"cannot read trace {path}: {exc}") from None
    else:
        yield from _read_lines(source, "trace")


def _read_lines(lines: Iterable[str], name: str) -> Iterator[TraceRecord]:
    for number, line in enumerate(lines, 1):
        if line.strip():
            yield parse_record(line, f"{name}:{number}")


def describe_exchange(
    command: bytes,
    response: bytes,
    *,
    secrets: bool = False,
    redactor: Redactor | None = None,
    shown: Shown | None = None,
) -> str:
    """One log line for an APDU exchange: INS name, command and answer (redacted), SW meaning.

    ``shown``: the exchange as a :class:`~ccidemu.redact.Redactor` already redacted it.
    """
    if shown is None:
        shown = (redactor or Redactor(secrets)).exchange(command, response)
    ins = ins_label(command[0], command[1]) if len(command) >= 2 else "short command"
    cut = len(command) - len(shown.command)
    text = f"{ins}: {shown.command.hex().upper()}"
    text += f" [{cut} data bytes redacted] -> " if cut else " -> "
    if len(response) >= 2:
        sw = int.from_bytes(response[-2:], "big")
        data = response[:-2]
        text += f"{sw:04X} ({sw_meaning(sw)})"
        if data and len(shown.response) == 2:
            text += f" +{len(data)} bytes [redacted]"
        elif data:
            text += f" +{len(data)} bytes {data[:32].hex().upper()}"
            if len(data) > 32:
                text += "..."
    else:
        text += f"bad response {response.hex().upper()!r}"
    return text
