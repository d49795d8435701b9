"""``pcsc:*`` with a real QEMU guest (see test_qemu_pcsc.py for one reader): with two
endpoints, the guest's two usb-ccid devices get one host reader each (QEMU takes one reader
per usb-ccid device; docs/DESIGN.md, "Real cards")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import TEST_ATR_TEXT
from vmc.lab.guest import ChardevMode, GuestImage, boot_guest
from vmc.lab.pcscd import READER, PcscdHarness
from vmc.lab.serve import ServeProcess

pytestmark = [pytest.mark.qemu, pytest.mark.pcscd]


def test_every_reader_one_per_usb_ccid(guest_image: GuestImage, e2e_dir: Path,
                                        host_pcscd: PcscdHarness) -> None:
    """``pcsc:*`` with two endpoints, the guest with two usb-ccid devices: one host reader
    each (QEMU takes one reader per usb-ccid device)."""
    pcscd = host_pcscd
    pcscd.start_bridge("test:")
    log = (e2e_dir / "bridge2.log").open("wb")
    bridge = subprocess.Popen([sys.executable, "-m", "vmc", "vpcd", "--card", "piv:",
                               "--vpcd", f"tcp:127.0.0.1:{pcscd.port + 1}"],
                              stdout=log, stderr=log, start_new_session=True)
    try:
        with boot_guest(guest_image, e2e_dir / "two", ChardevMode.QEMU_SERVER,
                        readers=2) as guest:
            daemon = ServeProcess(e2e_dir / "serve-two", guest.vsc_sockets[0],
                                  ChardevMode.QEMU_SERVER, cards=["pcsc:*"], env=pcscd.env,
                                  more_sockets=guest.vsc_sockets[1:])
            daemon.start()
            try:
                listing = {vm["vm"]: [r["spec"] for r in vm["readers"]]
                           for vm in daemon.ctl_json("list")}
                assert listing == {"vm1": [f"pcsc:{READER}"],
                                   "vm2": ["pcsc:Virtual PCD 00 01"]}
                script = ("i=0; while [ $i -lt 120 ]; do opensc-tool -l >/tmp/l 2>&1; "
                          "[ $(grep -c '^[0-9].*Yes' /tmp/l) -eq 2 ] && { cat /tmp/l; exit 0; }; "
                          "i=$((i + 1)); sleep 0.25; done; cat /tmp/l; exit 1")
                out = guest.check(script, timeout=60)
                readers = [line for line in out.splitlines() if line[:1].isdigit()]
                assert len(readers) == 2 and all("Yes" in line for line in readers), out
                atrs = [guest.check(f"opensc-tool -r {i} -a", timeout=20).strip().splitlines()[-1]
                        for i in (0, 1)]
                assert TEST_ATR_TEXT in atrs, atrs
                assert "3b:8c:80:01:63:63:69:64:65:6d:75:2d:50:49:56:31:2e" in atrs, atrs
            finally:
                daemon.stop()
    finally:
        bridge.terminate()
        bridge.wait(10)
        pcscd.stop_bridge()
