"""The one trace model: a header, then APDU exchanges and power events, in order.

Pure: dataclasses and the rules that relate them; no files.  The file format (JSON Lines)
is :mod:`ccidemu.traces.jsonl`, documented in ``docs/TRACES.md``; every importer
(:mod:`ccidemu.traces.formats`), the writers of ``serve``/``vpcd``/``fake-qemu``
(:class:`ccidemu.traces.writer.TraceWriter`), replay and diff speak these types.

Times are seconds relative to :attr:`TraceHeader.start` (epoch seconds, UTC, when known):
tools that log only a time of day or durations (OpenSC, ``pcsc-spy -n``) still give a
consistent timeline.  ``reader`` is the reader's name as the source knows it (a PC/SC
reader name, a vpcd address, a daemon reader index as text), None when the source does
not say.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

from ccidemu.errors import DecodeError

log = logging.getLogger(__name__)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Exchange",
    "PowerEvent",
    "PowerKind",
    "Problem",
    "Problems",
    "Record",
    "TraceFormatError",
    "TraceHeader",
    "sw_of",
]

#: The ``format`` value of a header line, and the current version (docs/TRACES.md).
FORMAT_NAME = "ccidemu-trace"
FORMAT_VERSION = 1


class TraceFormatError(DecodeError):
    """A trace (ours or a foreign tool's) has a malformed line, packet or record.

    ``position`` names where: ``FILE:LINE`` for text, ``FILE: packet N`` for captures.
    """

    def __init__(self, position: str, reason: str) -> None:
        super().__init__(f"{position}: {reason}")
        self.position = position
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Problem:
    """A malformed line or packet that an import skipped (not ``--strict``)."""

    position: str
    reason: str

    def __str__(self) -> str:
        return f"{self.position}: {self.reason}"


@dataclass(frozen=True, slots=True)
class TraceHeader:
    """What a trace says about itself (the first line of a trace file)."""

    source: str = "unknown"  # the tool that recorded it: "ccidemu vpcd", "pcscd --apdu", ...
    start: float | None = None  # epoch seconds (UTC) of time 0, None when the source has no date
    atr: bytes | None = None  # the card's ATR when the source names one
    protocol: str | None = None  # "T=0", "T=1", ... when known
    reader: str | None = None  # the reader, when the trace has one
    secrets: bool = False  # recorded with secrets shown (--trace-secrets): nothing redacted
    version: int = FORMAT_VERSION
    #: Other header fields, kept as read (a newer writer's additions survive a copy).
    extra: tuple[tuple[str, object], ...] = ()


@dataclass(frozen=True, slots=True)
class Exchange:
    """One command APDU and the card's answer.

    ``response`` is data + SW1 SW2, ``b""`` when there was none (``error`` says why, or the
    source, such as a scriptor script, has only commands).  ``command_redacted`` /
    ``response_redacted``: the secret part was removed when recording (ccidemu.redact);
    ``truncated``: the capture kept fewer bytes than were sent (QEMU's pcap keeps 256).
    """

    command: bytes
    response: bytes
    t: float | None = None  # seconds since the header's start
    duration: float | None = None  # seconds from command to answer
    reader: str | None = None
    session: int | None = None  # the daemon's session id
    command_redacted: bool = False
    response_redacted: bool = False
    truncated: bool = False
    error: str | None = None
    #: ``serve --compare``: the reference card's answer, recorded only when it differed
    #: from ``response`` (redacted like a response: ``compare_redacted``)
    compare: bytes | None = None
    compare_redacted: bool = False
    #: ``serve --compare``: the reference card could not answer
    compare_error: str | None = None

    @property
    def redacted(self) -> bool:
        return self.command_redacted or self.response_redacted or self.compare_redacted

    @property
    def sw(self) -> int | None:
        return sw_of(self.response)


class PowerKind(enum.StrEnum):
    """What happened to the card (ISO/IEC 7816-3 section 6: activation, reset, deactivation)."""

    ON = "on"  # activation (cold reset): ``atr`` is its answer when known
    RESET = "reset"  # warm reset
    OFF = "off"  # deactivation
    INSERT = "insert"  # a card appeared in the reader
    REMOVE = "remove"  # the card left the reader


@dataclass(frozen=True, slots=True)
class PowerEvent:
    """A power or presence change of the card in ``reader``."""

    kind: PowerKind
    t: float | None = None
    reader: str | None = None
    session: int | None = None
    atr: bytes | None = None
    error: str | None = None


Record = Exchange | PowerEvent


class Problems:
    """Where importers and readers report malformed input (never silently dropped).

    ``strict``: the first problem raises :class:`TraceFormatError`.  Otherwise each one is
    counted, the first :attr:`KEEP` are kept for the summary, and the first few are logged.
    """

    KEEP = 20

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.count = 0
        self.first: list[Problem] = []

    def report(self, position: str, reason: str) -> None:
        if self.strict:
            raise TraceFormatError(position, reason)
        self.count += 1
        if len(self.first) < self.KEEP:
            self.first.append(Problem(position, reason))
        if self.count <= 5:
            log.warning("skipped %s: %s", position, reason)

    def summary(self) -> str:
        """``""`` when nothing was skipped, else one line naming the count and the first."""
        if not self.count:
            return ""
        first = self.first[0]
        more = f" (first: {first})" if first else ""
        return f"skipped {self.count} malformed record(s){more}"


def sw_of(response: bytes) -> int | None:
    """SW1 SW2 of a response APDU as an int, None when it has fewer than two bytes."""
    if len(response) < 2:
        return None
    return (response[-2] << 8) | response[-1]
