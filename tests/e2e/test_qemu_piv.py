"""The demo PIV card (``--card piv:``, fixtures/certs, PIN 123456) in a real guest: OpenSC
names it PIV, lists its certificates, and ``pkcs11-tool`` signs with its RSA (9A) and EC (9C)
keys; the host verifies the signatures with the fixture certificates.

Last, a key imported over the VSCard channel signs in the guest: OpenSC's ``piv-tool``
authenticates with the management key (mutual authentication, SP 800-73-4 part 2 appendix
A) and sends IMPORT ASYMMETRIC KEY (the Yubico extension, INS FE) with a P-256 key the host
made, PIN policy "never", and loads a certificate for it into slot 9D; every APDU crosses
QEMU's usb-ccid and the ccid-card-passthru chardev to ``ccidemu serve``.  ``pkcs11-tool``
then signs with the imported key and the host verifies the signature with the key it made.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from ccidemu.certs import issue_certificate
from vmc.lab.guest import ChardevMode, Guest, GuestImage, boot_guest
from vmc.lab.serve import ServeProcess

pytestmark = pytest.mark.qemu

CERTS = Path(__file__).resolve().parents[2] / "fixtures" / "certs"
PKCS11 = "pkcs11-tool --module /usr/lib/x86_64-linux-gnu/opensc-pkcs11.so"
DATA = b"signed in a QEMU guest through ccidemu\n"
MGMT = "010203040506070801020304050607080102030405060708"


@pytest.fixture(scope="module")
def piv_env(guest_image: GuestImage, e2e_dir: Path) -> Iterator[tuple[Guest, ServeProcess]]:
    with boot_guest(guest_image, e2e_dir, ChardevMode.QEMU_SERVER) as guest:
        daemon = ServeProcess(
            e2e_dir / "serve", guest.vsc_socket, ChardevMode.QEMU_SERVER, cards=["piv:"],
            trace=e2e_dir / "trace.jsonl", verbose=3,
        )
        daemon.start()
        try:
            guest.wait_card()
            yield guest, daemon
        finally:
            daemon.stop()


def test_opensc_names_the_card_piv(piv_env: tuple[Guest, ServeProcess]) -> None:
    guest, _ = piv_env
    out = guest.check("opensc-tool -n")
    assert out.splitlines()[-1] == "Personal Identity Verification Card", out  # OpenSC card-piv.c
    # The certificates OpenSC read from the card are the fixture ones: compare serial numbers
    # (pkcs15-tool prints the DER INTEGER: tag 02, length, value).
    out = guest.check("pkcs15-tool -c", timeout=60)
    found = dict(re.findall(r"ID\s+: (\w+)\n\s*Encoded serial : 02 \w\w (\w+)", out))
    expected = {}
    for key_id, slot in (("01", "9a"), ("02", "9c"), ("03", "9d"), ("04", "9e")):
        cert = x509.load_pem_x509_certificate((CERTS / f"{slot}.crt").read_bytes())
        serial = cert.serial_number
        der = serial.to_bytes(serial.bit_length() // 8 + 1, "big")  # DER INTEGER, positive
        expected[key_id] = der.hex().upper()
    assert found == expected, out
    # PKCS#11 sees the four key pairs after login (pkcs11-tool -L alone probes ~300 APDUs).
    out = guest.check(f"{PKCS11} -L && {PKCS11} --login --pin 123456 -O", timeout=60)
    assert out.count("Certificate Object") == 4, out
    assert out.count("Private Key Object") == 4, out


def _sign_in_guest(guest: Guest, key_id: str, mechanism: str, extra: str = "") -> bytes:
    script = (
        f"printf '%s' '{DATA.decode().strip()}' >/tmp/data && echo >>/tmp/data && "
        f"{PKCS11} --login --pin 123456 --sign --id {key_id} -m {mechanism} {extra} "
        "--input-file /tmp/data --output-file /tmp/sig >/tmp/log 2>&1 || "
        "{ cat /tmp/log; exit 1; }; base64 /tmp/sig"
    )
    out = guest.check(script, timeout=60)
    return base64.b64decode("".join(out.split()))


def test_pkcs11_rsa_signature_verifies_on_the_host(piv_env: tuple[Guest, ServeProcess]) -> None:
    guest, _ = piv_env
    signature = _sign_in_guest(guest, "01", "SHA256-RSA-PKCS")
    key = x509.load_pem_x509_certificate((CERTS / "9a.crt").read_bytes()).public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    assert len(signature) == key.key_size // 8
    key.verify(signature, DATA, padding.PKCS1v15(), hashes.SHA256())


def test_pkcs11_ecdsa_signature_verifies_on_the_host(piv_env: tuple[Guest, ServeProcess]) -> None:
    guest, _ = piv_env
    signature = _sign_in_guest(guest, "02", "ECDSA-SHA256", "--signature-format openssl")
    key = x509.load_pem_x509_certificate((CERTS / "9c.crt").read_bytes()).public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(signature, DATA, ec.ECDSA(hashes.SHA256()))


def test_the_pin_never_reaches_the_log_or_the_trace(
    piv_env: tuple[Guest, ServeProcess], e2e_dir: Path
) -> None:
    """After the guest's logins (VERIFY with the PIN, run last in this module): the daemon's
    -vvv log and its trace hold the redacted VERIFYs, never the PIN."""
    guest, daemon = piv_env
    _sign_in_guest(guest, "01", "SHA256-RSA-PKCS")
    log = daemon.log().lower()
    trace = (e2e_dir / "trace.jsonl").read_text().lower()
    assert "traffic" in log and "verify" in log  # the log is at its most verbose
    assert '"command":"0020008008"' in trace and '"redacted":["command"]' in trace
    pin = "313233343536ffff"
    for text in (log, trace):
        assert pin not in text and "31 32 33 34 35 36 ff ff" not in text


def _hex_colons(data: bytes) -> str:
    return ":".join(f"{b:02X}" for b in data)


def test_key_imported_over_vscard_signs_in_the_guest(piv_env: tuple[Guest, ServeProcess],
                                                     e2e_dir: Path) -> None:
    """Runs last in this module: it replaces 9D (in memory; the fixtures stay)."""
    guest, daemon = piv_env
    key = ec.generate_private_key(ec.SECP256R1())
    ca_key = serialization.load_pem_private_key((CERTS / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = x509.load_pem_x509_certificate((CERTS / "ca.crt").read_bytes())
    cert = issue_certificate(ca_key, ca, key, "ccidemu guest import")
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    # IMPORT ASYMMETRIC KEY: P1 11 (P-256), P2 9D; 06 the scalar, AA 01 01 (PIN never)
    body = b"\x06\x20" + scalar + b"\xaa\x01\x01"
    apdu = _hex_colons(bytes((0x00, 0xFE, 0x11, 0x9D, len(body))) + body)
    pem = base64.b64encode(cert.public_bytes(serialization.Encoding.PEM)).decode()
    script = (
        f"echo {MGMT} >/tmp/mk && echo {pem} | base64 -d >/tmp/cert.pem && "
        f"PIV_EXT_AUTH_KEY=/tmp/mk piv-tool -A M:9B:03 -s {apdu} -C 9D -i /tmp/cert.pem "
        ">/tmp/import.log 2>&1; cat /tmp/import.log"
    )
    out = guest.check(script, timeout=60)
    assert "Received (SW1=0x90, SW2=0x00)" in out, out
    # the private key went by in IMPORT ASYMMETRIC KEY: not in the daemon's -vvv log or its
    # trace, which holds the command cut to its header
    log = daemon.log().lower()
    trace = (e2e_dir / "trace.jsonl").read_text().lower()
    assert f'"command":"00fe119d{len(body):02x}"' in trace
    for text in (log, trace):
        assert scalar.hex() not in text and scalar.hex(" ") not in text
    signature = _sign_in_guest(guest, "03", "ECDSA-SHA256", "--signature-format openssl")
    key.public_key().verify(signature, DATA, ec.ECDSA(hashes.SHA256()))
