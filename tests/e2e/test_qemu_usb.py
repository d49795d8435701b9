"""The USB backend against a CCID device nobody here wrote: QEMU 7.2's usb-ccid, real to the
test guest's kernel.  The guest gets the host's files read-only (9p) and runs, chrooted into
them, the backend on pyusb and libusb against its usb-ccid reader, whose card is the demo PIV
card of ``ccidemu serve --card piv:`` on the host (tests/e2e/usb_guest.py does the guest's
part).  Proven: the reader found by class and class descriptor, "in use" while the guest's
pcscd has it and the permission message without root, each with what to do; power-on and the
ATR; TPDU-level T=0 as the reader dictates (case 4 without Le, 61xx followed); a PIV SELECT, the
9A certificate read through 61xx chaining (byte for byte the fixture's), a signature made in
the guest with the 9A key, verified on the host; ``ctl remove`` / ``ctl insert`` on the host
seen in the guest through NotifySlotChange, and the card powered again after."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from ccidemu.apdu import CommandApdu, split_chain
from ccidemu.cards import open_card
from ccidemu.tlv import ber_decode
from ccidemu.trace import read_trace
from vmc.backends.usb import UsbSelector, parse_usb_spec
from vmc.lab.guest import ChardevMode, Guest, GuestError, GuestImage, boot_guest
from vmc.lab.serve import ServeProcess

pytestmark = pytest.mark.qemu

H = bytes.fromhex
REPO = Path(__file__).resolve().parents[2]
CERTS = REPO / "fixtures" / "certs"
DATA = b"signed in a QEMU guest by the USB backend\n"
#: SHA-256 DigestInfo prefix (RFC 8017 section 9.2, note 1)
SHA256_INFO = H("3031300d060960864801650304020105000420")


def _signature_apdus() -> list[bytes]:
    """VERIFY, then GENERAL AUTHENTICATE with the 9A key on the PKCS#1 v1.5 block of DATA,
    chained (CLA 10) since usb-ccid takes short APDUs only (SP 800-73-4 part 2 3.2.4)."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(DATA)
    info = SHA256_INFO + digest.finalize()
    block = b"\x00\x01" + b"\xff" * (256 - 3 - len(info)) + b"\x00" + info
    template = H("7C820106 8200 81820100") + block
    command = CommandApdu(0x00, 0x87, 0x07, 0x9A, template, ne=256)
    return [H("0020008008313233343536FFFF")] + [c.encode() for c in split_chain(command)]


@dataclass
class Session:
    guest: Guest
    daemon: ServeProcess
    file: Path  # inside the guest
    lines: dict[str, Any]

    def wait(self, name: str, timeout: float = 180.0) -> Any:
        """The value of the first line ``name`` the guest's session wrote (polling its file)."""
        deadline = time.monotonic() + timeout
        while name not in self.lines:
            out = self.guest.run(f"cat /host{self.file} 2>/dev/null; true", timeout=20).output
            for line in out.splitlines():
                key, _, value = line.partition(" ")
                if key and value and key not in self.lines:
                    try:
                        self.lines[key] = json.loads(value)
                    except ValueError:
                        continue
            if name in self.lines:
                break
            if time.monotonic() > deadline:
                raise GuestError(f"no {name!r} from the guest's USB session after {timeout} s:"
                                 f"\n{out}\n{self.guest.run('cat /tmp/usb.out').output}")
            time.sleep(0.5)
        return self.lines[name]

    def events(self) -> list[str]:
        out = self.guest.run(f"cat /host{self.file}", timeout=20).output
        return [json.loads(line.split(" ", 1)[1]) for line in out.splitlines()
                if line.startswith("event ")]


@pytest.fixture(scope="module")
def session(guest_image: GuestImage, e2e_dir: Path) -> Iterator[Session]:
    with boot_guest(guest_image, e2e_dir, ChardevMode.QEMU_SERVER, share_host=True) as guest:
        daemon = ServeProcess(e2e_dir / "serve", guest.vsc_socket, ChardevMode.QEMU_SERVER,
                              cards=["piv:"], trace=e2e_dir / "trace.jsonl")
        daemon.start()
        try:
            guest.wait_card()  # the guest's pcscd sees the card (and holds the reader)
            steps = ["00A4040009A0000003080000100000+", "00CB3FFF055C035FC10500+",
                     *(a.hex() for a in _signature_apdus())]
            steps[-1] += "+"
            events = Path("/tmp/ccidemu-usb-session")
            python = (f"cd {REPO} && PYTHONDONTWRITEBYTECODE=1 exec {sys.executable} -m "
                      f"tests.e2e.usb_guest {events} {' '.join(steps)}")
            # /host/tmp is the guest's own: a checkout under the host's /tmp is bound back.
            checkout = ""
            if REPO.is_relative_to("/tmp"):
                checkout = (f"mkdir -p /host{REPO} && mount -o bind "
                            f"/host-tmp/{REPO.relative_to('/tmp')} /host{REPO} && ")
            guest.check(f"{checkout}rm -f /host{events}; setsid chroot /host sh -c '{python}' "
                        ">/tmp/usb.out 2>&1 </dev/null &")
            yield Session(guest, daemon, events, {})
        finally:
            daemon.stop()


def test_the_reader_is_found_and_refused_while_pcscd_has_it(session: Session) -> None:
    (reader,) = session.wait("readers")
    # usb-ccid's serial number is its USB path (QEMU's hw/usb/desc.c); ids from docs/PROTOCOL.md
    assert reader == {"spec": "usb:08e6:4433:1-0000:00:01.0-1", "level": "TPDU",
                      "protocols": "T=0", "features": 0x000104FE, "problem": None}
    assert parse_usb_spec(reader["spec"].removeprefix("usb:")) == UsbSelector(
        0x08E6, 0x4433, "1-0000:00:01.0-1")
    in_use = session.wait("in-use")
    assert in_use["kind"] == "ConfigError"
    assert "is in use" in in_use["error"] and "pcscd" in in_use["error"]
    assert "--card pcsc:READER" in in_use["error"]


def test_apdus_a_certificate_through_61xx_and_a_signature(session: Session) -> None:
    result = session.wait("apdus")
    assert "error" not in result, result
    reference = open_card("piv:")
    assert bytes.fromhex(result["atr"]) == reference.power_on()
    assert result["exchange"] == "TPDU T=0" and result["protocol"] == 0
    select, certificate, verify, *chain = (bytes.fromhex(r) for r in result["results"])
    assert select == reference.transmit(H("00A4040009A0000003080000100000"))
    assert select[-2:] == H("9000") and select[0] == 0x61
    # the certificate object: 53 { 70 DER, 71 01 00, FE 00 }, byte for byte the fixture
    assert certificate[-2:] == H("9000") and len(certificate) > 700
    (outer,) = ber_decode(certificate[:-2])
    inner = {t.tag: t.value for t in ber_decode(outer.value)}
    cert = x509.load_pem_x509_certificate((CERTS / "9a.crt").read_bytes())
    assert inner[0x70] == cert.public_bytes(Encoding.DER)
    assert verify == H("9000")
    assert all(part == H("9000") for part in chain[:-1])
    answer = chain[-1]
    assert answer[-2:] == H("9000")
    (template,) = ber_decode(answer[:-2])
    (response,) = ber_decode(template.value)
    assert template.tag == 0x7C and response.tag == 0x82
    key = x509.load_pem_x509_certificate((CERTS / "9a.crt").read_bytes()).public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    key.verify(response.value, DATA, padding.PKCS1v15(), hashes.SHA256())
    # what reached the card on the host: the TPDUs the driver made (case 4 went without Le)
    traced = [r.command for r in read_trace(session.daemon.trace or Path("/nonexistent"))]
    assert H("00CB3FFF055C035FC105") in traced and H("00CB3FFF055C035FC10500") not in traced


def test_remove_and_insert_are_seen_through_notify_slot_change(session: Session) -> None:
    session.wait("watching")
    assert session.events()[:1] == ["CardInserted"]  # the state when watching began
    session.daemon.ctl_ok("remove", "1")
    deadline = time.monotonic() + 60
    while "CardRemoved" not in session.events():
        assert time.monotonic() < deadline, session.events()
        time.sleep(0.5)
    session.daemon.ctl_ok("insert", "1")
    select = session.wait("select")
    assert session.events() == ["CardInserted", "CardRemoved", "CardInserted"]
    reference = open_card("piv:")
    reference.power_on()
    assert select == reference.transmit(H("00A4040009A0000003080000100000")).hex()


def test_without_root_the_message_names_the_udev_rule(session: Session) -> None:
    result = session.wait("permission")
    assert result["kind"] == "ConfigError"
    assert "permission denied" in result["error"]
    assert 'ATTR{idVendor}=="08e6", ATTR{idProduct}=="4433"' in result["error"]
    assert "usermod -aG plugdev" in result["error"]
    assert isinstance(session.wait("done"), float)
