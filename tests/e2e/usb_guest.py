"""Run inside the test guest (chrooted into the host's files, shared read-only with 9p): the
USB backend (vmc.backends.usb, on pyusb and libusb) drives the guest's usb-ccid reader, a real
CCID device to the guest kernel.  tests/e2e/test_qemu_usb.py starts it in the background with

    python -m tests.e2e.usb_guest FILE APDU[+] ...

and reads FILE, where each step writes one line ``NAME JSON`` as soon as it is done (Python
over 9p under TCG starts slowly: one process does everything):

1. ``readers``: :func:`vmc.backends.usb.list_usb_readers` (what ``ccidemu readers --usb``
   shows);
2. ``in-use``: opening the reader while the guest's pcscd (libccid) holds it;
3. then pcscd is stopped (the chroot has the guest's /proc), and ``apdus``: power-on, the
   ATR, the exchange level and protocol the driver chose, and the answer to each APDU of
   the command line (``+`` after one: follow 61xx with GET RESPONSE and join the parts);
4. ``watching``, then each reader event (``event CardRemoved``...) as the host removes and
   inserts the card (ctl remove/insert: NotifySlotChange on the interrupt pipe); after an
   insertion following a removal, ``select`` with the answer to SELECT PIV;
5. ``permission``: opening the reader again without root;
6. ``done``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from ccidemu.card import CardInserted, ReaderEvent
from ccidemu.errors import CcidemuError
from vmc.backends.usb import UsbCard, UsbSelector, list_usb_readers

SELECTOR = UsbSelector(0x08E6, 0x4433)  # QEMU's usb-ccid (docs/PROTOCOL.md, "usb-ccid")
SELECT_PIV = bytes.fromhex("00A4040009A0000003080000100000")
EVENTS_TIMEOUT = 120.0


def _say(out: IO[str], name: str, value: Any) -> None:
    out.write(f"{name} {json.dumps(value)}\n")
    out.flush()


def _try_open() -> dict[str, Any]:
    card = UsbCard(SELECTOR)
    try:
        card.open()
    except CcidemuError as exc:
        return {"error": str(exc), "kind": type(exc).__name__}
    card.close()
    return {"ok": True}


def _stop_pcscd() -> None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                name = (entry / "comm").read_text().strip()
            except OSError:
                continue
            if name == "pcscd":
                os.kill(int(entry.name), signal.SIGTERM)
                while (entry / "comm").exists():
                    time.sleep(0.05)


def _chain(card: UsbCard, apdu: bytes) -> bytes:
    response = card.transmit(apdu)
    data = bytearray(response[:-2])
    while response[-2] == 0x61:
        response = card.transmit(bytes((0x00, 0xC0, 0x00, 0x00, response[-1])))
        data += response[:-2]
    return bytes(data) + response[-2:]


def _apdus(steps: list[str]) -> dict[str, Any]:
    card = UsbCard(SELECTOR)
    try:
        atr = card.power_on()
        driver = card._driver
        results = []
        for step in steps:
            apdu = bytes.fromhex(step.rstrip("+"))
            answer = _chain(card, apdu) if step.endswith("+") else card.transmit(apdu)
            results.append(answer.hex())
        card.power_off()
        return {"atr": atr.hex(), "exchange": driver.exchange if driver else None,
                "protocol": driver.protocol if driver else None, "results": results}
    finally:
        card.close()


def _events(out: IO[str]) -> None:
    card = UsbCard(SELECTOR)
    done = threading.Event()
    removed = threading.Event()

    def notify(event: ReaderEvent) -> None:
        _say(out, "event", type(event).__name__)
        if not isinstance(event, CardInserted):
            removed.set()
        elif removed.is_set():
            threading.Thread(target=select_again, daemon=True).start()

    def select_again() -> None:
        try:
            card.power_on()
            _say(out, "select", card.transmit(SELECT_PIV).hex())
        except CcidemuError as exc:
            _say(out, "select", f"error {exc}")
        done.set()

    card.watch(notify)
    _say(out, "watching", True)
    done.wait(EVENTS_TIMEOUT)
    card.close()


def main() -> int:
    path, steps = sys.argv[1], sys.argv[2:]
    with open(path, "a") as out:
        started = time.monotonic()
        _say(out, "readers", [{"spec": r.spec, "level": r.level, "protocols": r.protocols,
                               "features": r.features, "problem": r.problem}
                              for r in list_usb_readers()])
        _say(out, "in-use", _try_open())
        _stop_pcscd()
        try:
            _say(out, "apdus", _apdus(steps))
        except CcidemuError as exc:
            _say(out, "apdus", {"error": str(exc)})
        _events(out)
        os.setgid(65534)
        os.setuid(65534)
        _say(out, "permission", _try_open())
        _say(out, "done", round(time.monotonic() - started, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
