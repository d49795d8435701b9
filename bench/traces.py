"""Trace import and replay speed, and whether every importer streams.

Run: ``.venv/bin/python bench/traces.py`` (about a minute).  ``--check`` exits 1 when a
target is missed: replay as a card >= 50,000 APDUs/s in process, and for every importer the
peak memory of a 100,000-exchange trace within 2x of a 1,000-exchange one.

Inputs are written in each tool's layout (as the real tools write them, see
tests/pcscd/test_traces_real.py) into a temporary directory; peak memory is tracemalloc's
peak while importing (the records are consumed and dropped, as ``trace import`` does).
Baseline: reading the same file's lines with nothing else done, in the same run.
Results go to docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import gc
import struct
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ccidemu.ccid import CcidDataBlock, CcidXfrBlock, SlotStatus, encode_ccid
from ccidemu.traces import Exchange, TraceHeader
from ccidemu.traces.formats import export_lines, open_import
from ccidemu.traces.replay import ReplayCard

REPLAY_TARGET = 50_000
MEMORY_RATIO = 2.0

COMMAND = bytes.fromhex("00CB3FFF055C035FC10200")
RESPONSE = bytes(range(60)) + b"\x90\x00"


def _spaced(data: bytes) -> str:
    return " ".join(f"{b:02X}" for b in data)


def _rows(data: bytes) -> Iterator[str]:
    for i in range(0, len(data), 16):
        chunk = data[i : i + 16]
        yield _spaced(chunk).ljust(48) + " " + "." * len(chunk)


def lines_ccidemu(n: int) -> Iterator[str]:
    items = (Exchange(COMMAND, RESPONSE, t=i / 1000, duration=0.0001) for i in range(n))
    yield from export_lines("ccidemu", TraceHeader(source="bench"), items)


def lines_apdu4j(n: int) -> Iterator[str]:
    items = (Exchange(COMMAND, RESPONSE, duration=0.001) for i in range(n))
    yield from export_lines("apdu4j", TraceHeader(source="bench", atr=b"\x3b\x00"), items)


def lines_scriptor(n: int) -> Iterator[str]:
    yield from export_lines("scriptor", TraceHeader(source="bench"),
                            (Exchange(COMMAND, RESPONSE) for _ in range(n)))


def lines_pcscd(n: int) -> Iterator[str]:
    yield "00000001 winscard.c:258:SCardConnect() Attempting Connect to R 00 00 using protocol: 3"
    for _ in range(n):
        yield f"00000005 APDU: {_spaced(COMMAND)} "
        yield f"00000131 SW: {_spaced(RESPONSE)} "


def lines_opensc(n: int) -> Iterator[str]:
    for i in range(n):
        stamp = f"{10 + i // 3_600_000 % 10:02d}:{i // 60000 % 60:02d}:{i // 1000 % 60:02d}." \
                f"{i % 1000:03d}"
        prefix = f"P:1; T:0x1 {stamp} [bench] reader-pcsc.c:"
        yield f"{prefix}325:pcsc_transmit: reader 'R 00 00'"
        yield f"{prefix}326:pcsc_transmit: "
        yield f"Outgoing APDU ({len(COMMAND)} bytes):"
        yield from _rows(COMMAND)
        yield ""
        yield f"{prefix}335:pcsc_transmit: "
        yield f"Incoming APDU ({len(RESPONSE)} bytes):"
        yield from _rows(RESPONSE)
        yield ""


def lines_spy(n: int) -> Iterator[str]:
    t = "7F01@"
    yield from (f"{t}>|1700000000|0|SCardConnect", f"{t}0x1", f"{t}R 00 00", f"{t}0x2",
                f"{t}0x3", f"{t}0x0", f"{t}0x0", f"{t}0x00000010", f"{t}0x00000002",
                f"{t}<|1700000000|1|SCardConnect|Command successful.|0x00000000")
    for i in range(n):
        sec, usec = 1700000000 + i // 1000, i % 1000 * 1000
        yield from (f"{t}>|{sec}|{usec}|SCardTransmit", f"{t}0x00000010", f"{t}0x00000002",
                    f"{t}0x00000010", f"{t}0x{len(COMMAND):08X}", f"{t}{_spaced(COMMAND)} ",
                    f"{t}0x00000002", f"{t}0x00000010", f"{t}0x{len(RESPONSE):08X}",
                    f"{t}{_spaced(RESPONSE)} ",
                    f"{t}<|{sec}|{usec + 500}|SCardTransmit|Command successful.|0x00000000")


def write_pcap(path: Path, n: int) -> None:
    """QEMU-style usbmon pcap (link type 220, 64-byte headers)."""

    def record(urb: str, ep: int, data: bytes, ts: int) -> bytes:
        hdr = struct.pack("<QBBBBHccqiiII8s", 7, ord(urb), 3, ep, 5, 1, b"\0", b"=", ts, 0, 0,
                          len(data), len(data) + 64, bytes(8)) + bytes(16)
        body = hdr + data
        return struct.pack("<IIII", ts, 0, len(body), len(body)) + body

    with path.open("wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 4160, 220))
        for i in range(n):
            seq = i & 0xFF
            f.write(record("S", 0x02, encode_ccid(CcidXfrBlock(0, seq, COMMAND)), i))
            f.write(record("C", 0x81, encode_ccid(CcidDataBlock(0, seq, SlotStatus(), RESPONSE)),
                           i))


FORMATS: dict[str, Callable[[int], Iterator[str]] | None] = {
    "ccidemu": lines_ccidemu, "pcsc-spy": lines_spy, "pcscd": lines_pcscd,
    "opensc": lines_opensc, "apdu4j": lines_apdu4j, "scriptor": lines_scriptor, "usbmon": None,
}


def make_input(directory: Path, format: str, n: int) -> Path:
    path = directory / f"{format}-{n}.trace"
    maker = FORMATS[format]
    if maker is None:
        write_pcap(path, n)
    else:
        with path.open("w") as f:
            for line in maker(n):
                f.write(line + "\n")
    return path


def import_run(path: Path, format: str) -> tuple[int, float, int]:
    """(exchanges, seconds, peak bytes) of importing ``path``."""
    gc.collect()
    tracemalloc.start()
    started = time.perf_counter()
    imported = open_import(path, format, strict=True)
    count = sum(1 for r in imported.records if isinstance(r, Exchange))
    took = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return count, took, peak


def baseline_run(path: Path) -> float:
    started = time.perf_counter()
    with path.open("rb") as f:
        for _ in f:
            pass
    return time.perf_counter() - started


def import_rate(path: Path, format: str) -> tuple[int, float]:
    """(exchanges, best seconds) without tracemalloc, which slows everything down."""
    best = float("inf")
    count = 0
    for _ in range(2):
        started = time.perf_counter()
        imported = open_import(path, format, strict=True)
        count = sum(1 for r in imported.records if isinstance(r, Exchange))
        best = min(best, time.perf_counter() - started)
    return count, best


def against_rate(path: Path) -> float:
    from ccidemu.card import BuiltinTestCard
    from ccidemu.traces.replay import CardReplay

    imported = open_import(path, "ccidemu", strict=True)
    replay = CardReplay(imported.header, imported.records, BuiltinTestCard())
    started = time.perf_counter()
    for _ in replay.run():
        pass
    return replay.stats.sent / (time.perf_counter() - started)


def replay_rates(n: int) -> dict[str, float]:
    commands = [COMMAND[:-1] + bytes([i & 0xFF]) for i in range(n)]
    trace = [Exchange(c, RESPONSE) for c in commands]
    rates = {}
    for mode in ("strict", "match"):
        best = float("inf")
        for _ in range(3):
            card = ReplayCard(trace, mode=mode)
            started = time.perf_counter()
            for c in commands:
                card.transmit(c)
            best = min(best, time.perf_counter() - started)
            assert card.mismatch_count == 0
        rates[mode] = n / best
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("-n", type=int, default=100_000, help="exchanges in the big trace")
    args = parser.parse_args(argv)
    ok = True
    small_n, big_n = 1_000, args.n
    against = 0.0
    print(f"{'format':10} {'APDUs/s':>10} {'baseline lines/s':>17} "
          f"{'peak 1k':>9} {f'peak {big_n // 1000}k':>10} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        for format in FORMATS:
            small = make_input(directory, format, small_n)
            big = make_input(directory, format, big_n)
            _, _, peak_small = import_run(small, format)
            count, _, peak_big = import_run(big, format)
            assert count == big_n, (format, count)
            _, seconds = import_rate(big, format)
            base = baseline_run(big)
            lines = sum(1 for _ in big.open("rb"))
            ratio = peak_big / peak_small
            ok &= ratio <= MEMORY_RATIO
            print(f"{format:10} {big_n / seconds:10,.0f} {lines / base:17,.0f} "
                  f"{peak_small / 1024:8.0f}K {peak_big / 1024:9.0f}K {ratio:6.2f}")
            if format == "ccidemu":
                against = against_rate(big)
            big.unlink()
    print(f"replay against the test card (import + send + compare): {against:,.0f} APDUs/s")
    rates = replay_rates(big_n)
    for mode, rate in rates.items():
        print(f"replay as a card ({mode}): {rate:,.0f} APDUs/s in process")
    ok &= rates["strict"] >= REPLAY_TARGET and rates["match"] >= REPLAY_TARGET
    print("targets met" if ok else "TARGET MISSED")
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
