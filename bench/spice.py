"""Benchmark the SPICE smartcard channel against the socket chardev (run by hand, real QEMU):
``.venv/bin/python -m bench.spice [--apdus 400] [--rounds 3] [--check]``.

One guest, two readers, the same guest-side driver, the daemon on both: QEMU gets two
``usb-ccid`` devices, the first behind ``-chardev spicevmc,name=smartcard`` (served by
``ccidemu serve --spice``), the second behind a socket chardev (served by ``ccidemu serve
--connect``); both with the built-in test card and no ``-v``.  Inside the guest
``opensc-tool -r N -s APDU ...`` sends the trivial echo APDU (``80 E0``) N times in one
process, timed with the kernel's clock (``now at ... nsecs`` in ``/proc/timer_list``:
busybox's ``date`` has no nanoseconds); the cost of starting opensc-tool is removed by also
timing one APDU.  Rounds alternate between the two readers; the best round of each is
reported as APDUs/s seen in the guest, and their ratio.  ``--check`` exits 1 if SPICE is
below 0.8x the socket chardev (the target of issue 15).  Figures go into
docs/PERFORMANCE.md, section "SPICE".
"""

from __future__ import annotations

import argparse
import logging
import re
import socket
import sys
import tempfile
import time
from pathlib import Path

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


def _apdus(daemon: ServeProcess) -> int:
    """APDUs the daemon's readers have answered (``ctl list``)."""
    return sum(reader.get("apdus", 0) for vm in daemon.ctl_json("list")
               for reader in vm.get("readers", []))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


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
        spice = QuietServe(work / "serve-spice", work / "unused.sock", ChardevMode.SPICE,
                           cards=["test:"], extra_args=("--spice", f"127.0.0.1:{port}"))
        daemon = QuietServe(work / "serve", work / "vsc2.sock", ChardevMode.QEMU_SERVER,
                            cards=["test:"])
        try:
            guest.start()
            spice.start()
            daemon.start()
            listing = guest.check(
                "i=0; until [ $(opensc-tool -l 2>/dev/null | grep -c 'Yes') -ge 2 ]; do "
                "i=$((i + 1)); [ $i -gt 120 ] && break; sleep 0.25; done; opensc-tool -l", 60)
            # Which reader index is SPICE's: the one whose APDU the SPICE daemon counts.
            before = _apdus(spice)
            _timed(guest, 0, 1)
            spice_reader, socket_reader = (0, 1) if _apdus(spice) > before else (1, 0)
            results: dict[str, list[float]] = {"spice": [], "socket": []}
            for _ in range(args.rounds):
                results["spice"].append(per_apdu(guest, spice_reader, args.apdus))
                results["socket"].append(per_apdu(guest, socket_reader, args.apdus))
        finally:
            spice.stop()
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
