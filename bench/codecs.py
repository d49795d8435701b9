"""Codec throughput: our APIs against a plain ``struct`` baseline measured in the same run.

Run: ``.venv/bin/python bench/codecs.py`` (about 10-20 s).  ``--check`` exits 1 when the
VSCard target (>= 100,000 frames/s and within 3x of its baseline) is missed.

Every figure is the best of several interleaved repeats (ours, baseline, ours, ...), so that
a noisy neighbour on a shared core hurts both sides alike.  Results go to docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import platform
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VSC_TARGET_RATE = 100_000
VSC_TARGET_RATIO = 3.0

# docs/PROTOCOL.md, "VSCard": the guest's SELECT as QEMU sends it (big-endian VSCard APDU).
VSC_FRAME = bytes.fromhex("00000007 00000000 0000000c 00a4040007a0000000031010")
# The same SELECT (case 4, Le 00) inside a CCID PC_to_RDR_XfrBlock (CCID 1.1 section 6.1.4).
APDU = bytes.fromhex("00a4040007a000000003101000")
CCID_XFR = bytes.fromhex("6f 0d000000 00 07 00 0000") + APDU


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _rate(func: Callable[[], object], seconds: float) -> float:
    """Calls per second of ``func`` over a run of about ``seconds``."""
    number = 1000
    while True:  # calibrate
        start = time.perf_counter()
        for _ in range(number):
            func()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds / 4:
            break
        number *= 4
    number = max(1, int(number * seconds / elapsed))
    start = time.perf_counter()
    for _ in range(number):
        func()
    return number / (time.perf_counter() - start)


def compare(
    ours: Callable[[], object], baseline: Callable[[], object], repeats: int, seconds: float
) -> tuple[float, float]:
    """Best rates of ``ours`` and ``baseline``, measured interleaved."""
    best_ours = best_base = 0.0
    for _ in range(repeats):
        best_ours = max(best_ours, _rate(ours, seconds))
        best_base = max(best_base, _rate(baseline, seconds))
    return best_ours, best_base


# --- the three cases ------------------------------------------------------------------------

_VSC_HEADER = struct.Struct(">III")


def vsc_case() -> tuple[Callable[[], object], Callable[[], object]]:
    from ccidemu.vsc import decode_vsc, encode_vsc

    def ours() -> bytes:
        msg, _ = decode_vsc(VSC_FRAME)
        return encode_vsc(msg)

    def baseline() -> bytes:
        type_, reader_id, length = _VSC_HEADER.unpack_from(VSC_FRAME)
        payload = VSC_FRAME[12 : 12 + length]
        return _VSC_HEADER.pack(type_, reader_id, len(payload)) + payload

    assert ours() == baseline() == VSC_FRAME
    return ours, baseline


_CCID_HEADER = struct.Struct("<BIBBBH")


def ccid_case() -> tuple[Callable[[], object], Callable[[], object]]:
    ccid: Any = importlib.import_module("ccidemu.ccid")
    decode_ccid = ccid.decode_ccid
    encode_ccid = ccid.encode_ccid

    def ours() -> bytes:
        msg, _ = decode_ccid(CCID_XFR)
        out: bytes = encode_ccid(msg)
        return out

    def baseline() -> bytes:
        mtype, length, slot, seq, bwi, level = _CCID_HEADER.unpack_from(CCID_XFR)
        data = CCID_XFR[10 : 10 + length]
        return _CCID_HEADER.pack(mtype, len(data), slot, seq, bwi, level) + data

    assert type(ccid.decode_ccid(CCID_XFR)[0]).__name__ == "CcidXfrBlock"
    assert ours() == baseline() == CCID_XFR
    return ours, baseline


def apdu_case() -> tuple[Callable[[], object], Callable[[], object]]:
    apdu: Any = importlib.import_module("ccidemu.apdu")
    parse_command = apdu.parse_command

    def ours() -> object:
        return parse_command(APDU)

    def baseline() -> object:
        # Short APDUs only (what QEMU carries): header, Lc, data, optional Le.
        data = APDU
        cla, ins, p1, p2 = data[0], data[1], data[2], data[3]
        if len(data) == 4:
            return cla, ins, p1, p2, b"", 0
        if len(data) == 5:
            return cla, ins, p1, p2, b"", data[4] or 256
        lc = data[4]
        body = data[5 : 5 + lc]
        le = (data[5 + lc] or 256) if len(data) == 6 + lc else 0
        return cla, ins, p1, p2, body, le

    cmd = parse_command(APDU)
    assert (cmd.cla, cmd.ins, cmd.p1, cmd.p2, cmd.data, cmd.ne) == baseline()
    return ours, baseline


CASES: list[tuple[str, str, Callable[[], tuple[Callable[[], object], Callable[[], object]]]]] = [
    ("vsc", "VSCard APDU frame decode+encode (ccidemu.vsc)", vsc_case),
    ("ccid", "CCID XfrBlock decode+encode (ccidemu.ccid)", ccid_case),
    ("apdu", "APDU parse, case 4 short (ccidemu.apdu.parse_command)", apdu_case),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=0.4, help="per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats")
    parser.add_argument("--check", action="store_true", help="exit 1 if the VSCard target fails")
    args = parser.parse_args(argv)

    construct: Any = importlib.import_module("construct")
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"date:     {now}")
    print(f"machine:  {_cpu_model()}, {platform.machine()}, {platform.system()}")
    print(f"python:   {platform.python_implementation()} {platform.python_version()}")
    print(f"construct {construct.__version__}")
    print()
    ok = True
    for key, title, setup in CASES:
        try:
            ours, baseline = setup()
        except (ImportError, AttributeError) as exc:
            print(f"{title}\n  skipped: module not available ({exc})\n")
            if key == "vsc":
                ok = False
            continue
        rate, base = compare(ours, baseline, args.repeats, args.seconds)
        ratio = base / rate
        print(title)
        print(f"  ours:     {rate:>12,.0f} msg/s  ({1e9 / rate:,.0f} ns)")
        print(f"  baseline: {base:>12,.0f} msg/s  ({1e9 / base:,.0f} ns)  plain struct / slicing")
        line = f"  ratio:    {ratio:.2f}x slower than the baseline"
        if key == "vsc":
            met = rate >= VSC_TARGET_RATE and ratio <= VSC_TARGET_RATIO
            ok = ok and met
            line += (
                f"  (target >= {VSC_TARGET_RATE:,}/s and <= {VSC_TARGET_RATIO:g}x: "
                f"{'met' if met else 'MISSED'})"
            )
        print(line)
        print()
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
