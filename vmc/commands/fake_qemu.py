"""``ccidemu fake-qemu``: play QEMU's side of ccid-card-passthru against a card-side peer."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ccidemu.errors import CardError, ConfigError
from ccidemu.traces.model import PowerKind
from ccidemu.traces.writer import TraceWriter
from vmc.addr import parse_address
from vmc.fakeqemu import FakeQemu


def _hex(text: str) -> bytes:
    try:
        return bytes.fromhex(text.replace(":", "").replace(" ", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not hex: {text!r}") from None


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "fake-qemu",
        help="play QEMU's side of ccid-card-passthru for tests",
        description="Play QEMU 7.2's side of the VSCard chardev (ccid-card-passthru) and its "
        "usb-ccid slot: do the Init handshake, wait for the card's ATR, power the slot on "
        "and send each --apdu through the CCID XfrBlock path, printing the responses.",
        epilog="examples:\n"
        "  ccidemu fake-qemu --connect unix:/tmp/vsc.sock --apdu 00A4040008F0636369646D7501\n"
        "  ccidemu fake-qemu --listen tcp:127.0.0.1:2001 --timeout 30\n"
        "  ccidemu fake-qemu --connect unix:/tmp/vsc.sock --apdu 80E2000010 --trace t.jsonl",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--connect", metavar="ADDR",
        help="QEMU as chardev client: connect to a card side that listens "
        "(unix:PATH or tcp:HOST:PORT)",
    )
    where.add_argument(
        "--listen", metavar="ADDR",
        help="QEMU as chardev server (server=on): wait for the card side to connect",
    )
    parser.add_argument(
        "--apdu", metavar="HEX", type=_hex, action="append", default=[],
        help="a command APDU to send once the card is in (repeatable, in order)",
    )
    parser.add_argument(
        "--timeout", metavar="S", type=float, default=10.0,
        help="seconds to wait for the connection, the card and each answer (default 10)",
    )
    parser.add_argument(
        "--trace", type=Path, metavar="FILE",
        help="append the exchanges (as the guest sees them) to FILE (ccidemu trace, JSON "
        "Lines, created 0600; docs/TRACES.md)",
    )
    parser.add_argument(
        "--trace-secrets", action="store_true",
        help="write PINs and keys in the trace instead of redacting them",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    timeout: float = args.timeout
    trace = None
    if args.trace is not None:
        trace = TraceWriter(args.trace, source="ccidemu fake-qemu", secrets=args.trace_secrets,
                            reader="0")
    try:
        return _run(args, timeout, trace)
    finally:
        if trace is not None:
            trace.close()


def _run(args: argparse.Namespace, timeout: float, trace: TraceWriter | None) -> int:
    if args.connect:
        address = parse_address(args.connect)
        try:
            qemu = FakeQemu.connect(address, timeout=timeout)
        except OSError as exc:
            raise ConfigError(f"cannot connect to {address}: {exc.strerror or exc} (is the "
                              "card side, e.g. 'ccidemu serve --listen', running?)") from None
    else:
        with FakeQemu.listen(parse_address(args.listen)) as listener:
            print(f"listening on {listener.address}", file=sys.stderr)
            qemu = listener.accept(timeout)
    with qemu:
        try:
            atr = qemu.wait_card(timeout=timeout)
        except TimeoutError as exc:
            raise ConfigError(f"no card: {exc}") from None
        print(f"ATR: {atr.hex().upper()}")
        qemu.power_on(timeout=timeout)
        if trace is not None:
            trace.power(PowerKind.ON, reader="0", atr=atr)
        status = 0
        for apdu in args.apdu:
            started = time.time()
            clock = time.perf_counter()
            try:
                response = qemu.transmit(apdu, timeout=timeout)
            except (CardError, TimeoutError) as exc:
                print(f"> {apdu.hex().upper()}\n< error: {exc}")
                status = 1
                if trace is not None:
                    trace.exchange(apdu, b"", reader="0", at=started, error=str(exc),
                                   duration=time.perf_counter() - clock)
                continue
            if trace is not None:
                trace.exchange(apdu, response, reader="0", at=started,
                               duration=time.perf_counter() - clock)
            sw = response[-2:].hex().upper() if len(response) >= 2 else "----"
            print(f"> {apdu.hex().upper()}\n< {response[:-2].hex().upper()} SW={sw}")
    if trace is not None and trace.failed:
        print(trace.failed, file=sys.stderr)
        status = 1
    return status
