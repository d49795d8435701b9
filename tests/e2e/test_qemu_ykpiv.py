"""A key imported over the VSCard channel signs in a real guest.

In the guest, OpenSC's ``piv-tool`` authenticates with the management key (mutual
authentication, SP 800-73-4 part 2 appendix A) and sends IMPORT ASYMMETRIC KEY (the Yubico
extension, INS FE) with a P-256 key the host made, PIN policy "never", and loads a
certificate for it into slot 9A; every APDU crosses QEMU's usb-ccid and the
ccid-card-passthru chardev to ``ccidemu serve``.  Then ``pkcs11-tool`` signs with the
imported key and the host verifies the signature with the key it made.
"""

from __future__ import annotations

import base64
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ccidemu.certs import issue_certificate
from vmc.lab.guest import ChardevMode, Guest, GuestImage, boot_guest
from vmc.lab.serve import ServeProcess

pytestmark = pytest.mark.qemu

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "certs"
PKCS11 = "pkcs11-tool --module /usr/lib/x86_64-linux-gnu/opensc-pkcs11.so"
MGMT = "010203040506070801020304050607080102030405060708"
DATA = b"imported over VSCard, signed in the guest"


@pytest.fixture(scope="module")
def ykpiv_env(guest_image: GuestImage, e2e_dir: Path
              ) -> Iterator[tuple[Guest, ServeProcess, Path]]:
    certs = e2e_dir / "certs"
    shutil.copytree(FIXTURES, certs)
    with boot_guest(guest_image, e2e_dir, ChardevMode.QEMU_SERVER) as guest:
        daemon = ServeProcess(
            e2e_dir / "serve", guest.vsc_socket, ChardevMode.QEMU_SERVER,
            cards=[f"piv:{certs / 'card.toml'}"], trace=e2e_dir / "trace.jsonl",
        )
        daemon.start()
        try:
            guest.wait_card()
            yield guest, daemon, certs
        finally:
            daemon.stop()


def _hex_colons(data: bytes) -> str:
    return ":".join(f"{b:02X}" for b in data)


def test_key_imported_in_the_guest_signs_in_the_guest(
    ykpiv_env: tuple[Guest, ServeProcess, Path]
) -> None:
    guest, _, certs = ykpiv_env
    key = ec.generate_private_key(ec.SECP256R1())
    ca_key = serialization.load_pem_private_key((certs / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    cert = issue_certificate(ca_key, ca, key, "ccidemu guest import")
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    # IMPORT ASYMMETRIC KEY: P1 11 (P-256), P2 9A; 06 the scalar, AA 01 01 (PIN never)
    body = b"\x06\x20" + scalar + b"\xaa\x01\x01"
    apdu = _hex_colons(bytes((0x00, 0xFE, 0x11, 0x9A, len(body))) + body)
    pem = base64.b64encode(cert.public_bytes(serialization.Encoding.PEM)).decode()
    script = (
        f"echo {MGMT} >/tmp/mk && echo {pem} | base64 -d >/tmp/cert.pem && "
        f"PIV_EXT_AUTH_KEY=/tmp/mk piv-tool -A M:9B:03 -s {apdu} -C 9A -i /tmp/cert.pem "
        ">/tmp/import.log 2>&1; cat /tmp/import.log"
    )
    out = guest.check(script, timeout=60)
    assert "Received (SW1=0x90, SW2=0x00)" in out, out
    sign = (
        f"printf '%s' '{DATA.decode()}' >/tmp/data && "
        f"{PKCS11} --login --pin 123456 --sign --id 01 -m ECDSA-SHA256 "
        "--signature-format openssl --input-file /tmp/data --output-file /tmp/sig "
        ">/tmp/log 2>&1 || { cat /tmp/log; exit 1; }; base64 /tmp/sig"
    )
    signature = base64.b64decode("".join(guest.check(sign, timeout=60).split()))
    key.public_key().verify(signature, DATA, ec.ECDSA(hashes.SHA256()))
