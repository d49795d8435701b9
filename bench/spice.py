"""Benchmark the SPICE smartcard channel against the socket chardev (run by hand, real QEMU):
``.venv/bin/python -m bench.spice [--apdus 400] [--rounds 3] [--check]``.

One guest, two readers, the same guest-side driver: QEMU gets two ``usb-ccid`` devices, the
first behind ``-chardev spicevmc,name=smartcard`` (served by tests/e2e/spice_harness.py:
VscSession + the built-in test card on vmc.spice's transport), the second behind a socket
chardev (served by ``ccidemu serve --connect``, test card).  Inside the guest ``opensc-tool
-r N -s APDU ...`` sends the trivial echo APDU (``80 E0``) N times in one process, timed with
the kernel's clock (``now at ... nsecs`` in ``/proc/timer_list``: busybox's ``date`` has no
nanoseconds); the cost of starting opensc-tool is removed by also timing one APDU.  Rounds
alternate between the two readers; the best round of each is reported as APDUs/s seen in the
guest, and their ratio.  ``--check`` exits 1 if SPICE is below 0.8x the socket chardev (the
target of issue 15).

Until the daemon serves SPICE itself (``ccidemu serve --spice``) the SPICE side is the test
harness, not the daemon: both sides answer with an inline emulated card, but the paths differ
(the harness calls the card on the transport's I/O thread; the daemon uses its own loop).
Figures go into docs/PERFORMANCE.md, section "SPICE".
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import tempfile
import time
from pathlib import Path

from ccidemu.card import BuiltinTestCard
from tests.e2e.spice_harness import SpiceCardHost, free_port
from vmc.lab.guest import (
    ECHO,
    ChardevMode,
    Guest,
    GuestError,
    SpiceOptions,
    build_guest,
    missing_host_tools,
    missing_spice_support,
)
from vmc.lab.serve import ServeProcess
from vmc.spice import SpiceTarget


class TwoReaderGuest(Guest):
    """A SPICE-mode guest with a second usb-ccid behind a socket chardev (QEMU listens)."""

    def __init__(self, *args: object, socket_path: Path, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.socket_path = socket_path

    def qemu_command(self) -> list[str]:
        return [*super().qemu_command(),
                "-device", "usb-ccid,bus=xhci.0,id=ccid2",
                "-chardev", f"socket,id=vsc2,path={self.socket_path},server=on,wait=off",
                "-device", "ccid-card-passthru,chardev=vsc2,bus=ccid2.0"]


class QuietServe(ServeProcess):
    """``ccidemu serve`` without ``-vv``: per-APDU debug logging would slow the socket side."""

    def command(self) -> list[str]:
        return [arg for arg in super().command() if arg != "-vv"]


def _driver(reader: int, count: int) -> str:
    apdus = " ".join(["-s", ECHO] * count)
    now = "$(sed -n 's/^now at \\([0-9]*\\) nsecs$/\\1/p' /proc/timer_list)"
    return (f"t0={now}; opensc-tool -r {reader} {apdus} >/tmp/out 2>&1 || "
            f"{{ cat /tmp/out; exit 1; }}; t1={now}; "
            f"n=$(grep -c '^Received (SW1=0x90' /tmp/out); echo \"ns=$((t1 - t0)) ok=$n\"")


def _timed(guest: Guest, reader: int, count: int) -> float:
    out = guest.check(_driver(reader, count), timeout=300)
    m = re.search(r"ns=(\d+) ok=(\d+)", out)
    if not m or int(m.group(2)) != count:
        raise GuestError(f"driver on reader {reader} ({count} APDUs) failed:\n{out}")
    return int(m.group(1)) / 1e9


def per_apdu(guest: Guest, reader: int, count: int) -> float:
    """Seconds per APDU on ``reader``: (time for ``count`` - time for 1) / (count - 1)."""
    return (_timed(guest, reader, count) - _timed(guest, reader, 1)) / (count - 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--apdus", type=int, default=400, help="APDUs per timed run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per reader")
    parser.add_argument("--check", action="store_true", help="exit 1 below 0.8x")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    missing = missing_host_tools() + missing_spice_support()
    if missing:
        print("missing on this host: " + ", ".join(missing), file=sys.stderr)
        return 2
    image = build_guest()
    with tempfile.TemporaryDirectory(prefix="ccidemu-bench-spice-") as tmp:
        work = Path(tmp)
        port = free_port()
        guest = TwoReaderGuest(image, work / "qemu", work / "unused.sock", ChardevMode.SPICE,
                               spice=SpiceOptions(port), socket_path=work / "vsc2.sock")
        spice_card = BuiltinTestCard("spice")
        host = SpiceCardHost(SpiceTarget("127.0.0.1", port), spice_card)
        daemon = QuietServe(work / "serve", work / "vsc2.sock", ChardevMode.QEMU_SERVER,
                            cards=["test:"])
        try:
            guest.start()
            host.start()
            daemon.start()
            host.wait(lambda h: h.connections >= 1, 60, "SPICE session")
            listing = guest.check(
                "i=0; until [ $(opensc-tool -l 2>/dev/null | grep -c 'Yes') -ge 2 ]; do "
                "i=$((i + 1)); [ $i -gt 120 ] && break; sleep 0.25; done; opensc-tool -l", 60)
            # Which reader index is SPICE's: the one whose APDUs reach our in-process card.
            before = spice_card.apdu_count
            _timed(guest, 0, 1)
            spice_reader, socket_reader = (0, 1) if spice_card.apdu_count > before else (1, 0)
            results: dict[str, list[float]] = {"spice": [], "socket": []}
            for _ in range(args.rounds):
                results["spice"].append(per_apdu(guest, spice_reader, args.apdus))
                results["socket"].append(per_apdu(guest, socket_reader, args.apdus))
        finally:
            host.stop()
            daemon.stop()
            guest.close()
    best = {name: min(times) for name, times in results.items()}
    rate = {name: 1 / t for name, t in best.items()}
    ratio = rate["spice"] / rate["socket"]
    print(listing.strip())
    print(f"readers: SPICE = {spice_reader}, socket chardev = {socket_reader}; "
          f"{args.rounds} rounds of {args.apdus} echo APDUs, best round each")
    for name in ("spice", "socket"):
        rounds = ", ".join(f"{1 / t:,.0f}" for t in results[name])
        print(f"  {name:6} {rate[name]:8,.0f} APDUs/s ({best[name] * 1e3:.2f} ms/APDU; "
              f"rounds: {rounds})")
    print(f"  ratio SPICE / socket chardev: {ratio:.2f}x (target >= 0.8x)")
    return 1 if args.check and ratio < 0.8 else 0


if __name__ == "__main__":
    start = time.monotonic()
    code = main()
    print(f"({time.monotonic() - start:.0f} s)", file=sys.stderr)
    sys.exit(code)
