"""The demo PIV card (``--card piv:``, fixtures/certs, PIN 123456) in a real guest: OpenSC
names it PIV, lists its certificates, and ``pkcs11-tool`` signs with its RSA (9A) and EC (9C)
keys; the host verifies the signatures with the fixture certificates.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from vmc.lab.guest import ChardevMode, Guest, GuestImage, boot_guest
from vmc.lab.serve import ServeProcess

pytestmark = pytest.mark.qemu

CERTS = Path(__file__).resolve().parents[2] / "fixtures" / "certs"
PKCS11 = "pkcs11-tool --module /usr/lib/x86_64-linux-gnu/opensc-pkcs11.so"
DATA = b"signed in a QEMU guest through ccidemu\n"


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
