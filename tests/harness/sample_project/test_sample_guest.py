"""A card the test writes, in the guest's reader, read by the guest's OpenSC."""

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

import ccidemu
from ccidemu.certs import issue_certificate, make_ca, new_private_key
from vmc.pytest_plugin import GuestShell


@pytest.fixture
def certificate() -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    ca_key, ca_cert = make_ca("sample CA")
    key = new_private_key("rsa2048")
    assert isinstance(key, rsa.RSAPrivateKey)
    return key, issue_certificate(ca_key, ca_cert, key, "sample CAC user")


@pytest.fixture
def ccidemu_card_spec(tmp_path: Path,
                      certificate: tuple[rsa.RSAPrivateKey, x509.Certificate]) -> str:
    return ccidemu.write_cac_card(tmp_path / "cac", [certificate], pin="2468")


def test_the_guest_reads_the_written_card(
        ccidemu_guest: GuestShell, certificate: tuple[rsa.RSAPrivateKey, x509.Certificate]
) -> None:
    out = ccidemu_guest.check("pkcs15-tool -c", timeout=120)
    assert out.count("X.509 Certificate") == 1, out
    serial = certificate[1].serial_number
    der = serial.to_bytes(serial.bit_length() // 8 + 1, "big")  # a positive DER INTEGER
    assert f"Encoded serial : 02 {len(der):02X} {der.hex().upper()}" in out, out
