"""PC/SC passthrough to a real QEMU guest: a private pcscd with vpcd on the host (vmc.lab.pcscd)
holds the "physical" card, the emulated card behind the vpcd bridge; ``ccidemu serve --card
'pcsc:Virtual PCD 00 00'`` passes it through to the guest's usb-ccid.  The guest's OpenSC names
the PIV card and signs with it (verified on the host); stopping the bridge shows the card leave
the guest and starting it again brings it back; a pcscd restart is survived; another card put
in the host reader (the test card) answering 54 bytes, which QEMU 7.2's usb-ccid would lose
(issue 16), reaches the guest whole; with ``pcsc:*`` and two endpoints the guest's two
usb-ccid devices get one host reader each (QEMU takes one reader per usb-ccid device;
docs/DESIGN.md, "Real cards")."""

from __future__ import annotations

import base64
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from ccidemu.cards import open_card
from tests.support import TEST_ATR_TEXT, opensc_responses
from vmc.lab.guest import ChardevMode, Guest, GuestImage, boot_guest
from vmc.lab.pcscd import READER, PcscdHarness
from vmc.lab.serve import ServeProcess

pytestmark = [pytest.mark.qemu, pytest.mark.pcscd]

CERTS = Path(__file__).resolve().parents[2] / "fixtures" / "certs"
PKCS11 = "pkcs11-tool --module /usr/lib/x86_64-linux-gnu/opensc-pkcs11.so"
DATA = b"signed in a QEMU guest with a card passed through PC/SC\n"


@pytest.fixture(scope="module")
def passthrough(guest_image: GuestImage, e2e_dir: Path, host_pcscd: PcscdHarness
                ) -> Iterator[tuple[Guest, ServeProcess]]:
    pcscd = host_pcscd
    pcscd.start_bridge("piv:")
    # two usb-ccid devices: the second one is empty until the last test serves it
    with boot_guest(guest_image, e2e_dir / "guest", ChardevMode.QEMU_SERVER,
                    readers=2) as guest:
        daemon = ServeProcess(e2e_dir / "serve", guest.vsc_socket, ChardevMode.QEMU_SERVER,
                              cards=[f"pcsc:{READER}"], env=pcscd.env)
        daemon.start()
        try:
            guest.wait_card(timeout=40)
            yield guest, daemon
        finally:
            daemon.stop()
            pcscd.stop_bridge()


def _sign(guest: Guest) -> bytes:
    script = (
        f"printf '%s' '{DATA.decode().strip()}' >/tmp/data && echo >>/tmp/data && "
        f"{PKCS11} --login --pin 123456 --sign --id 01 -m SHA256-RSA-PKCS "
        "--input-file /tmp/data --output-file /tmp/sig >/tmp/log 2>&1 || "
        "{ cat /tmp/log; exit 1; }; base64 /tmp/sig"
    )
    return base64.b64decode("".join(guest.check(script, timeout=90).split()))


def _verify(signature: bytes) -> None:
    key = x509.load_pem_x509_certificate((CERTS / "9a.crt").read_bytes()).public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    key.verify(signature, DATA, padding.PKCS1v15(), hashes.SHA256())


def test_opensc_in_the_guest_names_the_card_and_signs(
    passthrough: tuple[Guest, ServeProcess]
) -> None:
    guest, daemon = passthrough
    out = guest.check("opensc-tool -n", timeout=60)
    assert out.splitlines()[-1] == "Personal Identity Verification Card", out
    _verify(_sign(guest))
    assert f"PC/SC reader '{READER}': connected" in daemon.log()


def test_the_card_leaves_and_comes_back_with_the_bridge(
    passthrough: tuple[Guest, ServeProcess], host_pcscd: PcscdHarness
) -> None:
    guest, _ = passthrough
    pcscd = host_pcscd
    mark = len(guest.pcscd_log())
    pcscd.stop_bridge()
    guest.wait_pcscd_log(r"Card Removed From", since=mark, timeout=30)
    gone = guest.run("opensc-tool -a", timeout=20)
    assert gone.status != 0, gone.output
    mark = len(guest.pcscd_log())
    pcscd.start_bridge("piv:")
    guest.wait_pcscd_log(r"Card inserted into", since=mark, timeout=30)
    guest.wait_card(timeout=40)
    assert guest.check("opensc-tool -n", timeout=60).splitlines()[-1] == \
        "Personal Identity Verification Card"


def test_a_pcscd_restart_is_survived(passthrough: tuple[Guest, ServeProcess],
                                     host_pcscd: PcscdHarness) -> None:
    guest, daemon = passthrough
    pcscd = host_pcscd
    mark = len(guest.pcscd_log())
    pcscd.restart_pcscd()  # the bridge reconnects to the new vpcd by itself
    guest.wait_pcscd_log(r"Card Removed From", since=mark, timeout=30)
    guest.wait_pcscd_log(r"Card inserted into", since=mark, timeout=60)
    guest.wait_card(timeout=40)
    _verify(_sign(guest))
    assert "pcscd stopped" in daemon.log() and daemon.running()


def test_another_card_answering_54_bytes_passes_through(
    passthrough: tuple[Guest, ServeProcess], host_pcscd: PcscdHarness
) -> None:
    """Issue 16 with a passed-through card: the test card behind the vpcd bridge answers 52
    data bytes; the daemon sends it in parts; the guest's next APDU works."""
    guest, daemon = passthrough
    pcscd = host_pcscd
    mark = len(guest.pcscd_log())
    pcscd.stop_bridge()
    guest.wait_pcscd_log(r"Card Removed From", since=mark, timeout=30)
    pcscd.start_bridge("test:")
    guest.wait_pcscd_log(r"Card inserted into", since=mark, timeout=30)
    assert guest.wait_card(timeout=40).strip().splitlines()[-1] == TEST_ATR_TEXT
    out = guest.check("opensc-tool -c default -s 80E2000034 -s 80E2000010")
    assert opensc_responses(out) == [bytes(range(52)) + b"\x90\x00",
                                     bytes(range(16)) + b"\x90\x00"], out
    assert "went out in parts" in daemon.log()


def test_every_reader_one_per_usb_ccid(passthrough: tuple[Guest, ServeProcess],
                                       host_pcscd: PcscdHarness, e2e_dir: Path) -> None:
    """``pcsc:*`` with two endpoints, the guest's two usb-ccid devices: one host reader each."""
    guest, first = passthrough
    pcscd = host_pcscd
    first.stop()
    pcscd.stop_bridge()
    pcscd.start_bridge("test:")
    log = (e2e_dir / "bridge2.log").open("wb")
    bridge = subprocess.Popen([sys.executable, "-m", "vmc", "vpcd", "--card", "piv:",
                               "--vpcd", f"tcp:127.0.0.1:{pcscd.port + 1}"],
                              stdout=log, stderr=log, start_new_session=True)
    daemon = ServeProcess(e2e_dir / "serve-all", guest.vsc_sockets[0], ChardevMode.QEMU_SERVER,
                          cards=["pcsc:*"], env=pcscd.env, more_sockets=guest.vsc_sockets[1:])
    try:
        daemon.start()
        want = {"vm1": [f"pcsc:{READER}"], "vm2": ["pcsc:Virtual PCD 00 01"]}
        deadline = time.monotonic() + 30
        while (listing := {vm["vm"]: [r["spec"] for r in vm["readers"]]
                           for vm in daemon.ctl_json("list")}) != want:
            assert time.monotonic() < deadline, listing
            time.sleep(0.1)
        script = ("i=0; while [ $i -lt 120 ]; do opensc-tool -l >/tmp/l 2>&1; "
                  "[ $(grep -c '^[0-9].*Yes' /tmp/l) -eq 2 ] && { cat /tmp/l; exit 0; }; "
                  "i=$((i + 1)); sleep 0.25; done; cat /tmp/l; exit 1")
        out = guest.check(script, timeout=60)
        readers = [line for line in out.splitlines() if line[:1].isdigit()]
        assert len(readers) == 2 and all("Yes" in line for line in readers), out
        atrs = [guest.check(f"opensc-tool -r {i} -a", timeout=20).strip().splitlines()[-1]
                for i in (0, 1)]
        piv_atr = ":".join(f"{b:02x}" for b in open_card("piv:").power_on())
        assert sorted(atrs) == sorted([TEST_ATR_TEXT, piv_atr])
    finally:
        daemon.stop()
        bridge.terminate()
        bridge.wait(10)
