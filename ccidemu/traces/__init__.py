"""APDU traces: one model, its file format, importers, exporters, replay and diff.

- :mod:`~ccidemu.traces.model`: :class:`TraceHeader`, :class:`Exchange`,
  :class:`PowerEvent`, :class:`Problems` (malformed input is reported, never dropped).
- :mod:`~ccidemu.traces.jsonl`: the JSON Lines file (docs/TRACES.md), :class:`TraceReader`.
- :mod:`~ccidemu.traces.writer`: :class:`TraceWriter`, used by every ``--trace``.
- :mod:`~ccidemu.traces.formats`: importers (pcsc-spy, pcscd, OpenSC, usbmon pcap/pcapng,
  apdu4j, scriptor) and exporters (apdu4j, scriptor).
- :mod:`~ccidemu.traces.masks`, :mod:`~ccidemu.traces.compare`: masks for fields that
  change every run, comparison of exchanges; :mod:`~ccidemu.traces.replay`: the replay card
  and replay against a card; :mod:`~ccidemu.traces.show`: the readable listing.

Pure apart from reading the files a caller names and :class:`TraceWriter`'s one file.
"""

from ccidemu.traces.describe import TRAFFIC, describe_exchange
from ccidemu.traces.jsonl import TraceReader, format_header, format_record, read_trace
from ccidemu.traces.model import (
    FORMAT_VERSION,
    Exchange,
    PowerEvent,
    PowerKind,
    Problem,
    Problems,
    Record,
    TraceFormatError,
    TraceHeader,
)
from ccidemu.traces.writer import TraceWriter

__all__ = [
    "FORMAT_VERSION",
    "TRAFFIC",
    "Exchange",
    "PowerEvent",
    "PowerKind",
    "Problem",
    "Problems",
    "Record",
    "TraceFormatError",
    "TraceHeader",
    "TraceReader",
    "TraceWriter",
    "describe_exchange",
    "format_header",
    "format_record",
    "read_trace",
]
