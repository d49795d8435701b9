"""``ccidemu trace``: import, export, show, replay and diff APDU traces (docs/TRACES.md)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO

from ccidemu.cards import CardOptions, open_card
from ccidemu.errors import ConfigError
from ccidemu.files import open_private
from ccidemu.redact import Redactor
from ccidemu.traces.compare import DiffStats, diff_exchanges, exchanges_of
from ccidemu.traces.formats import EXPORTERS, IMPORTERS, ImportedTrace, export_lines, open_import
from ccidemu.traces.masks import PRESETS, parse_masks
from ccidemu.traces.model import Exchange, PowerEvent, Record, TraceHeader
from ccidemu.traces.replay import CardReplay
from ccidemu.traces.show import describe_record, parse_filter, record_json

log = logging.getLogger(__name__)

_FORMATS = ", ".join(IMPORTERS)
_DESCRIPTION = f"""\
Work with APDU traces.  Every subcommand reads any trace format it knows, sniffed from the
file or given with --format: {_FORMATS}.
Secrets (PINs, keys, management-key authentication) are redacted on import unless
--secrets; traces recorded with --trace-secrets keep them.
"""

_EPILOG = """\
examples:
  ccidemu trace import capture.pcap -o capture.jsonl          # QEMU usb-ccid,pcap=
  OPENSC_DEBUG=9 pkcs15-tool -D 2>opensc.log; ccidemu trace import opensc.log
  ccidemu trace show trace.jsonl --ins cb --status '!9000'
  ccidemu trace replay trace.jsonl --card piv:fixtures/certs --mask volatile
  ccidemu trace diff a.jsonl b.pcap --mask ..87:response
  ccidemu trace export trace.jsonl --to scriptor -o replay.script
  ccidemu vpcd --card replay:trace.jsonl,match      # the trace as a card for pcscd
"""

_MASK_HELP = ("a part that changes every run, not counted as a difference: "
              "PATTERN[:response|command|both[:START-END]] with PATTERN header bytes in hex, "
              f".. for any (e.g. ..87:response); presets: {', '.join(PRESETS)}; repeatable")

#: Progress bars only for inputs this big (bytes), and only when stderr is a terminal.
PROGRESS_MIN_BYTES = 256 * 1024


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "trace", help="import, show, replay, diff and export APDU traces",
        description=_DESCRIPTION, epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="trace_command", metavar="ACTION", required=True)

    p = sub.add_parser("import", help="convert a trace of another tool into a ccidemu trace",
                       description="Read a trace of another tool (streaming) and write it as "
                       "a ccidemu trace (JSON Lines).  A malformed line or packet is reported "
                       "with its position and skipped (counted), or is fatal with --strict.")
    _input(p, strict=True)
    p.add_argument("-o", "--output", metavar="OUT", type=Path,
                   help="write here (created 0600) instead of standard output")
    p.add_argument("--secrets", action="store_true",
                   help="keep secret APDU data (PINs, keys) instead of redacting it")
    p.set_defaults(func=run_import)

    p = sub.add_parser("export", help="write a trace as an apdu4j dump or a scriptor script")
    _input(p, strict=True)
    p.add_argument("--to", required=True, choices=sorted(EXPORTERS), help="output format")
    p.add_argument("-o", "--output", metavar="OUT", type=Path, help="default: standard output")
    p.add_argument("--reader", metavar="NAME", help="only this reader's records")
    p.set_defaults(func=run_export)

    p = sub.add_parser("show", help="list a trace readably (INS names, SW meanings, PIV TLV)")
    _input(p)
    p.add_argument("--reader", action="append", default=[], metavar="NAME",
                   help="only this reader (repeatable)")
    p.add_argument("--ins", action="append", default=[], metavar="HEX",
                   help="only these instructions, e.g. a4 or cb,87 (repeatable)")
    p.add_argument("--status", action="append", default=[], metavar="SW",
                   help="only these status words: 9000, 61xx, !9000 (repeatable)")
    p.add_argument("--since", type=float, metavar="S", help="only from S seconds on")
    p.add_argument("--until", type=float, metavar="S", help="only up to S seconds")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per record")
    p.add_argument("--no-decode", action="store_true", help="no TLV decoding")
    p.set_defaults(func=run_show)

    p = sub.add_parser("replay", help="send a trace's commands to a card and report differences",
                       description="Send every command of the trace to --card, in order "
                       "(power events too, unless --no-power), and report each difference in "
                       "ATR, status word or response data.  Exit status 1 when there are "
                       "differences.")
    _input(p, strict=True)
    p.add_argument("--card", required=True, metavar="SPEC",
                   help="the card to replay against: piv:, piv:DIR, test:, replay:TRACE, ...")
    p.add_argument("--state-dir", type=Path, metavar="DIR",
                   help="the card's state directory (default: in memory)")
    p.add_argument("--mask", action="append", default=[], metavar="MASK", help=_MASK_HELP)
    p.add_argument("--reader", metavar="NAME",
                   help="replay this reader's exchanges (default: the first reader's)")
    p.add_argument("--no-power", action="store_true",
                   help="do not apply the trace's power events to the card")
    p.add_argument("--json", action="store_true", help="the report as one JSON object")
    p.set_defaults(func=run_replay)

    p = sub.add_parser("diff", help="compare two traces' exchanges, with masks")
    p.add_argument("first", metavar="A", help="a trace (any format)")
    p.add_argument("second", metavar="B", help="another trace (any format)")
    p.add_argument("--format", choices=sorted(IMPORTERS), help="format of A (default: sniff)")
    p.add_argument("--format-b", choices=sorted(IMPORTERS), help="format of B (default: sniff)")
    p.add_argument("--mask", action="append", default=[], metavar="MASK", help=_MASK_HELP)
    p.add_argument("--reader", metavar="NAME", help="only this reader in A")
    p.add_argument("--reader-b", metavar="NAME", help="only this reader in B")
    p.add_argument("--json", action="store_true", help="the report as one JSON object")
    p.set_defaults(func=run_diff)


def _input(parser: argparse.ArgumentParser, *, strict: bool = False) -> None:
    parser.add_argument("file", metavar="FILE", help="the trace (any known format)")
    parser.add_argument("--format", choices=sorted(IMPORTERS),
                        help="the trace's format (default: sniffed from the file)")
    if strict:
        parser.add_argument("--strict", action="store_true",
                            help="a malformed line or packet is an error (default: skip it)")


# --- helpers -------------------------------------------------------------------------------


def _open_input(args: argparse.Namespace, name: str | None = None, format: str | None = None
                ) -> tuple[ImportedTrace, BinaryIO, int]:
    path = Path(name or args.file)
    try:
        stream: BinaryIO = path.open("rb")
        size = os.fstat(stream.fileno()).st_size
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        imported = open_import(stream, format if name else args.format,
                               strict=getattr(args, "strict", False), name=str(path))
    except BaseException:
        stream.close()
        raise
    return imported, stream, size


@contextlib.contextmanager
def _output(path: Path | None) -> Iterator[IO[str]]:
    if path is None:
        yield sys.stdout
        return
    f = open_private(path, "output file", append=False)
    try:
        yield f
    finally:
        f.close()


def _progress(stream: BinaryIO, size: int) -> tuple[Callable[[int], None] | None,
                                                     Callable[[], None]]:
    """A progress callback and its closer: a bar on a terminal for big inputs, else none."""
    if size < PROGRESS_MIN_BYTES or not sys.stderr.isatty():
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=size, unit="B", unit_scale=True, file=sys.stderr, leave=False,
               desc="replaying")

    def update(_: int) -> None:
        try:
            position = stream.tell()
        except (OSError, ValueError):
            return
        bar.update(position - bar.n)

    return update, bar.close


def _summary(imported: ImportedTrace, what: str) -> None:
    text = imported.problems.summary()
    if text:
        print(f"{what}: {text}", file=sys.stderr)


def _redacted(records: Iterator[Record]) -> Iterator[Record]:
    redactors: dict[tuple[int | None, str | None], Redactor] = {}
    for record in records:
        key = (record.session, record.reader)
        if isinstance(record, PowerEvent):
            if key in redactors:
                redactors[key].reset()
            yield record
            continue
        redactor = redactors.setdefault(key, Redactor())
        shown = redactor.exchange(record.command, record.response)
        if not shown.redacted:
            yield record
            continue
        yield Exchange(
            shown.command, shown.response, t=record.t, duration=record.duration,
            reader=record.reader, session=record.session,
            command_redacted=record.command_redacted or len(shown.command) != len(
                record.command),
            response_redacted=record.response_redacted or len(shown.response) != len(
                record.response),
            truncated=record.truncated, error=record.error)


def _only_reader(records: Iterator[Record], reader: str | None) -> Iterator[Record]:
    if reader is None:
        yield from records
        return
    for record in records:
        if record.reader == reader or (isinstance(record, PowerEvent) and record.reader is None):
            yield record


def _pipe_safe(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """'ccidemu trace show ... | head' ends quietly when head leaves."""
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except BrokenPipeError:
            with contextlib.suppress(OSError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            return 0
    return run


# --- subcommands -----------------------------------------------------------------------------


def run_import(args: argparse.Namespace) -> int:
    imported, stream, _ = _open_input(args)
    counts = {"apdu": 0, "power": 0}
    header = imported.header
    if args.secrets:
        header = TraceHeader(source=header.source, start=header.start, atr=header.atr,
                             protocol=header.protocol, reader=header.reader, secrets=True,
                             extra=header.extra)
    records = imported.records if args.secrets or header.secrets else _redacted(
        imported.records)

    def counted() -> Iterator[Record]:
        for record in records:
            counts["apdu" if isinstance(record, Exchange) else "power"] += 1
            yield record

    with stream, _output(args.output) as out:
        for line in export_lines("ccidemu", header, counted()):
            out.write(line + "\n")
    print(f"imported {counts['apdu']} exchanges and {counts['power']} power events from "
          f"{args.file} ({imported.format})", file=sys.stderr)
    _summary(imported, args.file)
    return 0


@_pipe_safe
def run_export(args: argparse.Namespace) -> int:
    imported, stream, _ = _open_input(args)
    with stream, _output(args.output) as out:
        for line in export_lines(args.to, imported.header,
                                 _only_reader(imported.records, args.reader)):
            out.write(line + "\n")
    _summary(imported, args.file)
    return 0


@_pipe_safe
def run_show(args: argparse.Namespace) -> int:
    selected = parse_filter(args.reader, args.ins, args.status, args.since, args.until)
    imported, stream, _ = _open_input(args)
    header = imported.header
    with stream:
        if args.json:
            print(json.dumps({"header": _header_json(header), "format": imported.format}))
        else:
            print(_header_text(header, imported.format))
        for number, record in enumerate(imported.records, 1):
            if not selected.keeps(record):
                continue
            if args.json:
                print(json.dumps(record_json(number, record)))
            else:
                for line in describe_record(number, record, decode=not args.no_decode):
                    print(line)
    _summary(imported, args.file)
    return 0


def _header_json(header: TraceHeader) -> dict[str, Any]:
    from ccidemu.traces.jsonl import format_header

    obj: dict[str, Any] = json.loads(format_header(header))
    return obj


def _header_text(header: TraceHeader, format: str) -> str:
    from ccidemu.traces.jsonl import iso_time

    parts = [f"trace from {header.source} ({format})"]
    if header.start is not None:
        parts.append(f"started {iso_time(header.start)}")
    if header.reader is not None:
        parts.append(f"reader {header.reader}")
    if header.atr is not None:
        parts.append(f"ATR {header.atr.hex().upper()}")
    if header.protocol is not None:
        parts.append(header.protocol)
    if header.secrets:
        parts.append("secrets not redacted")
    return "; ".join(parts)


def run_replay(args: argparse.Namespace) -> int:
    masks = parse_masks(args.mask)
    card = open_card(args.card, CardOptions(state_dir=args.state_dir))
    imported, stream, size = _open_input(args)
    progress, close_progress = _progress(stream, size)
    replay = CardReplay(imported.header, imported.records, card, masks=masks,
                        reader=args.reader, power=not args.no_power, progress=progress)
    differences = []
    with stream:
        try:
            for diff in replay.run():
                if args.json:
                    differences.append(diff.as_json())
                else:
                    print(diff.describe())
        finally:
            close_progress()
    stats = replay.stats
    if args.json:
        print(json.dumps({"differences": differences, "stats": vars(stats),
                          "problems": [str(p) for p in imported.problems.first],
                          "skipped_malformed": imported.problems.count}))
    else:
        text = (f"replayed {stats.sent} commands to {card.name}: {stats.differences} "
                f"difference(s); {stats.masked} equal only under masks, {stats.skipped} "
                f"redacted command(s) not sent, {stats.uncomparable} without a recorded "
                "response")
        print(text)
    _summary(imported, args.file)
    return 1 if stats.differences else 0


def run_diff(args: argparse.Namespace) -> int:
    masks = parse_masks(args.mask)
    a, stream_a, _ = _open_input(args, args.first, args.format)
    b, stream_b, _ = _open_input(args, args.second, args.format_b)
    stats = DiffStats()
    count = 0
    out: list[dict[str, Any]] = []
    with stream_a, stream_b:
        for diff in diff_exchanges(exchanges_of(a.records, args.reader),
                                   exchanges_of(b.records, args.reader_b), masks, stats):
            count += 1
            if args.json:
                out.append(diff.as_json())
            else:
                print(diff.describe())
    if args.json:
        print(json.dumps({"differences": out, "stats": vars(stats)}))
    else:
        print(f"compared {stats.compared} exchanges: {count} difference(s); {stats.masked} "
              f"equal only under masks, {stats.uncomparable} without responses on both sides")
    _summary(a, args.first)
    _summary(b, args.second)
    return 1 if count else 0
