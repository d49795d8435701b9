"""The emulated PIV card (``--card piv:``) proved with real clients through pcscd + vpcd.

OpenSC 0.23 (opensc-tool, pkcs15-tool, pkcs11-tool with opensc-pkcs11.so) and
yubico-piv-tool 2.2, as OpenSC's own CI proves PIV cards.  Fixture keys: 9A RSA-2048,
9C EC P-256, 9D RSA-2048, 9E EC P-384; PIN 123456, PUK 12345678, default 3DES management key.
Every test works on a fresh copy of fixtures/certs and its own state directory.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from tests.pcscd.pivsetup import FIXTURES, PIN, PUK, PivSetup
from vmc.lab.pcscd import READER

pytestmark = pytest.mark.pcscd


def _verify(cert: x509.Certificate, signature: bytes, data: bytes) -> None:
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    else:
        assert isinstance(key, ec.EllipticCurvePublicKey)
        half = len(signature) // 2  # pkcs11-tool writes raw r || s
        der = encode_dss_signature(int.from_bytes(signature[:half], "big"),
                                   int.from_bytes(signature[half:], "big"))
        key.verify(der, data, ec.ECDSA(hashes.SHA256()))


def _sign(piv: PivSetup, key_id: str, mechanism: str, pin: str = PIN) -> tuple[bytes, bytes]:
    data = b"ccidemu PIV signature test " + key_id.encode()
    (piv.work / "data").write_bytes(data)
    piv.p11("--login", "--pin", pin, "--sign", "--id", key_id, "-m", mechanism,
            "-i", str(piv.work / "data"), "-o", str(piv.work / "sig"))
    return data, (piv.work / "sig").read_bytes()


# --- OpenSC ---------------------------------------------------------------------------------


def test_opensc_names_piv_card(piv: PivSetup) -> None:
    out = piv.run("opensc-tool", "-r", READER, "-n")
    assert out.strip() == "Personal Identity Verification Card", out


def test_pkcs15_lists_the_certificates(piv: PivSetup) -> None:
    out = piv.run("pkcs15-tool", "--reader", READER, "-D")
    certs = re.findall(r"^X\.509 Certificate \[(.*)\]\n(?:\t.*\n)*?\tID\s*: (\w+)", out, re.M)
    assert certs == [
        ("Certificate for PIV Authentication", "01"),
        ("Certificate for Digital Signature", "02"),
        ("Certificate for Key Management", "03"),
        ("Certificate for Card Authentication", "04"),
    ], out
    # the token label comes from the first certificate's CN
    assert "PKCS#15 Card [ccidemu Test User (PIV Authentication)]" in out, out


def test_pkcs11_lists_token_and_objects(piv: PivSetup) -> None:
    slots = piv.p11("-L")
    assert "Virtual PCD 00 00" in slots, slots
    assert "token label" in slots, slots
    objects = piv.p11("-O")
    assert objects.count("Certificate Object") == 4, objects
    assert objects.count("Public Key Object") >= 4, objects


def test_pkcs11_sign_rsa_9a(piv: PivSetup) -> None:
    data, sig = _sign(piv, "01", "SHA256-RSA-PKCS")
    _verify(piv.cert("9a"), sig, data)


def test_pkcs11_sign_ecdsa_9c(piv: PivSetup) -> None:
    data, sig = _sign(piv, "02", "ECDSA-SHA256")
    _verify(piv.cert("9c"), sig, data)


def test_pkcs11_decrypt_rsa_9d(piv: PivSetup) -> None:
    secret = b"a session key for the key management slot"
    key = piv.cert("9d").public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    (piv.work / "ct").write_bytes(key.encrypt(secret, padding.PKCS1v15()))
    piv.p11("--login", "--pin", PIN, "--decrypt", "--id", "03", "-m", "RSA-PKCS",
            "-i", str(piv.work / "ct"), "-o", str(piv.work / "pt"))
    assert (piv.work / "pt").read_bytes() == secret


def test_pkcs11_self_test(piv: PivSetup) -> None:
    out = piv.p11("--test", "--login", "--pin", PIN)
    assert "No errors" in out, out


# --- yubico-piv-tool ------------------------------------------------------------------------


def test_ykpiv_status_and_verify_pin(piv: PivSetup) -> None:
    status = piv.ykpiv("-a", "status")
    assert re.search(r"Slot 9a:", status, re.I), status
    assert re.search(r"PIN tries left:\s*3", status), status
    assert "Successfully verified PIN" in piv.ykpiv("-a", "verify-pin", "-P", PIN)


def test_select_forgets_a_pin_verified_by_another_client(piv: PivSetup) -> None:
    """OpenSC leaves the card verified (SCardDisconnect with LEAVE_CARD); the next client's
    SELECT must start from scratch: yubico-piv-tool's status sends VERIFY without data
    after its SELECT and prints the 63Cx count ("-1" if the card said 9000)."""
    data, sig = _sign(piv, "01", "SHA256-RSA-PKCS")
    _verify(piv.cert("9a"), sig, data)
    status = piv.ykpiv("-a", "status")
    assert re.search(r"PIN tries left:\s*3", status), status
    # and OpenSC still works afterwards (it VERIFYs again in its own session)
    data, sig = _sign(piv, "02", "ECDSA-SHA256")
    _verify(piv.cert("9c"), sig, data)


def _issue(piv: PivSetup, public_pem: Path, cn: str) -> Path:
    """A certificate for a card-generated public key, signed by the fixture CA
    (Debian's yubico-piv-tool 2.2 cannot self-sign under OpenSSL 3)."""
    w = piv.work
    piv.run("openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", str(w / "throwaway.key"), "-subj", f"/CN={cn}",
            "-out", str(w / "req.csr"))
    out = w / f"{cn}.crt"
    piv.run("openssl", "x509", "-req", "-in", str(w / "req.csr"), "-CA", str(piv.certs / "ca.crt"),
            "-CAkey", str(piv.certs / "ca.key"), "-force_pubkey", str(public_pem), "-days", "30",
            "-set_serial", "4242", "-out", str(out))
    return out


@pytest.mark.parametrize(("algorithm", "mechanism"),
                         [("RSA2048", "SHA256-RSA-PKCS"), ("ECCP256", "ECDSA-SHA256")])
def test_ykpiv_generate_import_read_and_sign(piv: PivSetup, algorithm: str, mechanism: str
                                             ) -> None:
    public = piv.work / "new.pub.pem"
    piv.ykpiv("-a", "generate", "-s", "9a", "-A", algorithm, "-o", str(public))
    cert_path = _issue(piv, public, f"generated-{algorithm}")
    piv.ykpiv("-a", "import-certificate", "-s", "9a", "-i", str(cert_path))
    read_back = piv.work / "read.pem"
    piv.ykpiv("-a", "read-certificate", "-s", "9a", "-o", str(read_back))
    new_cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert x509.load_pem_x509_certificate(read_back.read_bytes()) == new_cert
    data, sig = _sign(piv, "01", mechanism)
    _verify(new_cert, sig, data)


def test_ykpiv_pin_block_and_unblock(piv: PivSetup) -> None:
    for left in (2, 1):
        out = piv.ykpiv("-a", "verify-pin", "-P", "000000", check=False)
        assert f"Pin verification failed, {left} tries left before pin is blocked" in out, out
    out = piv.ykpiv("-a", "verify-pin", "-P", "000000", check=False)
    assert "Pin code blocked" in out and "tries left" not in out, out  # the third: blocked
    out = piv.ykpiv("-a", "verify-pin", "-P", PIN, check=False)
    assert "Successfully" not in out, out  # the right PIN no longer helps
    assert re.search(r"PIN tries left:\s*0", piv.ykpiv("-a", "status")), "PIN not blocked"
    piv.ykpiv("-a", "unblock-pin", "-P", PUK, "-N", "654321")
    assert "Successfully verified PIN" in piv.ykpiv("-a", "verify-pin", "-P", "654321")
    assert re.search(r"PIN tries left:\s*3", piv.ykpiv("-a", "status"))
    # the bridge's trace holds every VERIFY with a PIN, cut to its header, and the unblock
    verifies = [r for r in piv.trace_records() if r.command[:4] == bytes.fromhex("00200080")]
    assert [r.command for r in verifies if r.redacted] == [bytes.fromhex("0020008008")] * 5
    assert [r.response for r in verifies if r.redacted] == [
        bytes.fromhex(sw) for sw in ("63c2", "63c1", "63c0", "6983", "9000")]
    assert [r.command for r in piv.trace_records() if r.command[1] == 0x2C] == [
        bytes.fromhex("002c008010")]


def test_state_survives_bridge_restart(piv: PivSetup) -> None:
    piv.ykpiv("-a", "change-pin", "-P", PIN, "-N", "111111")
    public = piv.work / "new.pub.pem"
    piv.ykpiv("-a", "generate", "-s", "9e", "-A", "ECCP256", "-o", str(public))
    cert_path = _issue(piv, public, "persisted")
    piv.ykpiv("-a", "import-certificate", "-s", "9e", "-i", str(cert_path))

    piv.restart_bridge()

    assert "Successfully verified PIN" in piv.ykpiv("-a", "verify-pin", "-P", "111111")
    read_back = piv.work / "read.pem"
    piv.ykpiv("-a", "read-certificate", "-s", "9e", "-o", str(read_back))
    assert read_back.read_bytes().strip() == cert_path.read_bytes().strip() or (
        x509.load_pem_x509_certificate(read_back.read_bytes())
        == x509.load_pem_x509_certificate(cert_path.read_bytes())
    )
    # the card's files were never touched (none changed, none added): what the guest changed
    # lives in the state directory
    names = sorted(p.name for p in FIXTURES.iterdir())
    assert sorted(p.name for p in piv.certs.iterdir()) == names
    for name in names:
        assert (piv.certs / name).read_bytes() == (FIXTURES / name).read_bytes(), name
    assert any(p.name.startswith("piv-") for p in piv.state.iterdir())


def test_pkcs11_derive_ecdh_9e(piv: PivSetup) -> None:
    """``pkcs11-tool --derive`` (ECDH) with the 9E key: OpenSC allows it only because the
    certificate's key usage has keyAgreement (``ccidemu certs generate``)."""
    from cryptography.hazmat.primitives import serialization

    card_key = piv.cert("9e").public_key()
    assert isinstance(card_key, ec.EllipticCurvePublicKey)
    peer = ec.generate_private_key(card_key.curve)
    (piv.work / "peer.der").write_bytes(peer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
    piv.p11("--login", "--pin", PIN, "--derive", "--id", "04", "-m", "ECDH1-DERIVE",
            "-i", str(piv.work / "peer.der"), "-o", str(piv.work / "shared"))
    assert (piv.work / "shared").read_bytes() == peer.exchange(ec.ECDH(), card_key)
