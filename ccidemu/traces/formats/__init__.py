"""Trace formats in the wild: importers (streaming) and exporters, and format sniffing.

=============  ==========================================================  =======  =======
name           what                                                        import   export
=============  ==========================================================  =======  =======
ccidemu        our JSON Lines (docs/TRACES.md), format 1 and format 0      yes      yes
pcsc-spy       libpcscspy FIFO lines, and ``pcsc-spy -n`` output            yes
pcscd          ``pcscd --debug --apdu`` logs                                yes
opensc         ``OPENSC_DEBUG=9`` logs                                      yes
usbmon         usbmon pcap / pcapng, link types 189 and 220 (QEMU pcap=)    yes
apdu4j         apdu4j dumps                                                 yes      yes
scriptor       scriptor scripts and transcripts                             yes      yes
=============  ==========================================================  =======  =======

:func:`open_import` gives the header and an iterator of records; the file is read as the
records are taken.  Malformed lines and packets go to :class:`~ccidemu.traces.model.Problems`
(strict: the first one raises TraceFormatError; otherwise skipped and counted).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from ccidemu.errors import ConfigError
from ccidemu.traces._text import Source, open_binary, source_name
from ccidemu.traces.formats._common import Importer, Item
from ccidemu.traces.formats.apdu4j import export_apdu4j, read_apdu4j, sniff_apdu4j
from ccidemu.traces.formats.opensc import read_opensc, sniff_opensc
from ccidemu.traces.formats.pcscd import read_pcscd, sniff_pcscd
from ccidemu.traces.formats.pcscspy import read_pcsc_spy, sniff_pcsc_spy
from ccidemu.traces.formats.scriptor import export_scriptor, read_scriptor, sniff_scriptor
from ccidemu.traces.formats.usbmon import read_usbmon, sniff_usbmon
from ccidemu.traces.jsonl import TraceReader, format_header, format_record
from ccidemu.traces.model import Problems, Record, TraceHeader

__all__ = [
    "EXPORTERS",
    "IMPORTERS",
    "ImportedTrace",
    "export_lines",
    "open_import",
    "sniff",
]

Exporter = Callable[[TraceHeader, Iterable[Record]], Iterator[str]]


def _read_native(source: Source, problems: Problems, name: str) -> Iterator[Item]:
    reader = TraceReader(source, problems, name)
    yield reader.header
    yield from reader


def _sniff_native(head: str) -> bool:
    first = next((line for line in head.splitlines() if line.strip()), "")
    return first.lstrip().startswith("{") and ('"type"' in first or '"time"' in first)


def _export_native(header: TraceHeader, records: Iterable[Record]) -> Iterator[str]:
    yield format_header(header)
    for record in records:
        yield format_record(record)


#: name -> (importer, one-line description)
IMPORTERS: dict[str, tuple[Importer, str]] = {
    "ccidemu": (_read_native, "ccidemu JSON Lines trace (formats 1 and 0)"),
    "usbmon": (read_usbmon, "usbmon pcap or pcapng (link types 189, 220; QEMU usb-ccid,pcap=)"),
    "pcsc-spy": (read_pcsc_spy, "pcsc-spy FIFO lines or 'pcsc-spy -n' output"),
    "pcscd": (read_pcscd, "'pcscd --debug --apdu' log"),
    "opensc": (read_opensc, "OPENSC_DEBUG=9 log"),
    "apdu4j": (read_apdu4j, "apdu4j dump"),
    "scriptor": (read_scriptor, "scriptor script or transcript"),
}

EXPORTERS: dict[str, tuple[Exporter, str]] = {
    "ccidemu": (_export_native, "ccidemu JSON Lines trace"),
    "apdu4j": (export_apdu4j, "apdu4j dump"),
    "scriptor": (export_scriptor, "scriptor script (responses in comments)"),
}

_TEXT_SNIFFERS: list[tuple[str, Callable[[str], bool]]] = [
    ("ccidemu", _sniff_native),
    ("pcsc-spy", sniff_pcsc_spy),
    ("opensc", sniff_opensc),
    ("pcscd", sniff_pcscd),
    ("apdu4j", sniff_apdu4j),
    ("scriptor", sniff_scriptor),
]

_SNIFF_BYTES = 1 << 16


def sniff(head: bytes) -> str | None:
    """The format the first bytes of a file look like, None when none fits."""
    if sniff_usbmon(head):
        return "usbmon"
    text = head.decode("utf-8", "replace")
    # a cut last line must not spoil the guess
    text = text.rsplit("\n", 1)[0] if len(head) >= _SNIFF_BYTES else text
    for name, check in _TEXT_SNIFFERS:
        if check(text):
            return name
    return None


@dataclass
class ImportedTrace:
    """An import in progress: the header, then the records as they are read."""

    format: str
    header: TraceHeader
    records: Iterator[Record]
    problems: Problems


def open_import(
    path: str | os.PathLike[str] | BinaryIO,
    format: str | None = None,
    *,
    strict: bool = False,
    name: str | None = None,
) -> ImportedTrace:
    """Start importing ``path`` (a file name or an open binary file that can seek).

    ``format``: one of :data:`IMPORTERS`, or None to sniff it from the first 64 KiB.
    ConfigError for an unknown or unrecognised format or a file that cannot be read.
    """
    label = name or source_name(path)
    if format is not None and format not in IMPORTERS:
        raise ConfigError(f"unknown trace format {format!r} (known: {', '.join(IMPORTERS)})")
    stream_cm = open_binary(path)
    stream = stream_cm.__enter__()
    try:
        if format is None:
            chunks: list[bytes] = []
            size = 0
            while size < _SNIFF_BYTES and (chunk := stream.read(_SNIFF_BYTES - size)):
                chunks.append(chunk)
                size += len(chunk)
            head = b"".join(chunks)
            stream.seek(0)
            format = sniff(head)
            if format is None:
                raise ConfigError(f"{label}: cannot tell the trace format; give --format "
                                  f"({', '.join(IMPORTERS)})")
        problems = Problems(strict=strict)
        items = IMPORTERS[format][0](stream, problems, label)
        header = next(items)
    except BaseException:
        stream_cm.__exit__(None, None, None)
        raise
    assert isinstance(header, TraceHeader)

    def records() -> Iterator[Record]:
        try:
            for item in items:
                assert not isinstance(item, TraceHeader)
                yield item
        finally:
            stream_cm.__exit__(None, None, None)

    return ImportedTrace(format, header, records(), problems)


def export_lines(format: str, header: TraceHeader, records: Iterable[Record]) -> Iterator[str]:
    """The lines (no newlines) of ``records`` in an export format; ConfigError if unknown."""
    exporter = EXPORTERS.get(format)
    if exporter is None:
        raise ConfigError(f"unknown export format {format!r} (known: {', '.join(EXPORTERS)})")
    return exporter[0](header, records)
