"""Yubico's own PIV clients against the emulated card through pcscd + vpcd: ``ykman piv``
(yubikey-manager, from PyPI) and yubico-piv-tool 2.2 (Debian), and yubikit's
``PivSession`` over pyscard.  What they report is checked against the card's files.

The fixture card (fixtures/certs/card.toml: serial 10203040, the default identity with
firmware 5.7.1, 9A RSA-2048, 9C P-256, 9D RSA-2048, 9E P-384, F9 P-256 attestation key
issued by attestation-ca.crt).  ``ykman --reader`` takes a name fragment; vpcd has two
readers ("Virtual PCD 00 00" and "00 01"), so the full name is given.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from tests.pcscd.pivsetup import PivSetup, piv_setup
from vmc.lab.pcscd import READER, PcscdHarness

pytestmark = pytest.mark.pcscd

YKMAN = Path(sys.executable).with_name("ykman")
MGMT = "010203040506070801020304050607080102030405060708"
PIN, PUK = "123456", "12345678"
SERIAL = 10203040


@pytest.fixture(scope="module", autouse=True)
def _ykman_installed() -> None:
    if not YKMAN.exists():
        pytest.fail(f"{YKMAN} missing: install the dev extra (pip install -e '.[dev]', "
                    "yubikey-manager) or run tools/bootstrap.sh", pytrace=False)


def ykman(piv: PivSetup, *args: str, check: bool = True, input: str | None = None) -> str:
    result = piv.pcscd.run(str(YKMAN), "--reader", READER, "piv", *args, check=check,
                           input=input, env={"HOME": str(piv.work)})
    return result.stdout + result.stderr


def _lines(text: str) -> dict[str, str]:
    """``Key:   value`` lines of ykman's output as a dict."""
    return {k.strip(): v.strip() for k, v in re.findall(r"^([^:\n]+):[ \t]+(.*)$", text, re.M)}


def _openssl_verify(piv: PivSetup, cert: Path) -> str:
    return piv.run("openssl", "verify", "-CAfile", str(piv.certs / "attestation-ca.crt"),
                   "-untrusted", str(piv.certs / "f9.crt"), str(cert))


# --- ykman piv ------------------------------------------------------------------------


def test_info_shows_the_card(piv: PivSetup) -> None:
    out = ykman(piv, "info")
    info = _lines(out)
    assert info["PIV version"] == "5.7.1"
    assert info["PIN tries remaining"] == "3/3" and info["PUK tries remaining"] == "3/3"
    assert info["Management key algorithm"] == "TDES"
    assert "WARNING: Using default PIN!" in out
    for slot, name in (("9A", "AUTHENTICATION"), ("9C", "SIGNATURE"),
                       ("9D", "KEY_MANAGEMENT"), ("9E", "CARD_AUTH")):
        cert = piv.cert(slot.lower())
        section = out.split(f"Slot {slot} ({name}):")[1].split("Slot ")[0]
        assert _lines(section)["Subject DN"] == cert.subject.rfc4514_string(), out
        assert _lines(section)["Serial"].replace(":", "") == f"{cert.serial_number:x}".zfill(
            len(_lines(section)["Serial"].replace(":", "")))
    assert "Private key type: RSA2048" in out.split("Slot 9A")[1].split("Slot 9C")[0]


def test_access_commands(piv: PivSetup) -> None:
    assert "New PIN set." in ykman(piv, "access", "change-pin", "-P", PIN, "-n", "654321")
    assert "New PUK set." in ykman(piv, "access", "change-puk", "-p", PUK, "-n", "87654321")
    out = ykman(piv, "access", "unblock-pin", "-p", "87654321", "-n", "111111")
    assert "New PIN set." in out
    out = ykman(piv, "access", "change-management-key", "-m", MGMT, "-a", "AES256",
                "-n", "00" * 32, "--touch", "-f")
    assert "New management key set." in out, out
    info = _lines(ykman(piv, "info"))
    assert info["Management key algorithm"] == "AES256"
    out = ykman(piv, "access", "set-retries", "5", "4", "-m", "00" * 32, "-P", "111111", "-f")
    assert "Number of PIN/PUK retries set." in out, out
    info = _lines(ykman(piv, "info"))
    assert (info["PIN tries remaining"], info["PUK tries remaining"]) == ("5/5", "4/4")
    # set-retries restored the default PIN; the old one is gone
    out = ykman(piv, "access", "change-pin", "-P", "111111", "-n", "222222", check=False)
    assert "PIN change failed - 4 tries left." in out, out
    assert "New PIN set." in ykman(piv, "access", "change-pin", "-P", PIN, "-n", "222222")


def test_keys_generate_attest_info_export_move_delete(piv: PivSetup) -> None:
    pub = piv.work / "82.pub"
    out = ykman(piv, "keys", "generate", "-m", MGMT, "-a", "ECCP384", "--pin-policy", "NEVER",
                "--touch-policy", "CACHED", "82", str(pub))
    assert "Private key generated in slot 82 (RETIRED1)" in out, out
    assert _lines(ykman(piv, "keys", "info", "82")) == {
        "Key slot": "82 (RETIRED1)", "Algorithm": "ECCP384", "Origin": "GENERATED",
        "PIN required for use": "NEVER", "Touch required for use": "CACHED"}
    attestation = piv.work / "att.pem"
    ykman(piv, "keys", "attest", "82", str(attestation))
    assert _openssl_verify(piv, attestation).strip() == f"{attestation}: OK"
    cert = x509.load_pem_x509_certificate(attestation.read_bytes())
    assert cert.public_key() == serialization.load_pem_public_key(pub.read_bytes())
    values = {e.oid.dotted_string: e.value.value for e in cert.extensions}
    assert values["1.3.6.1.4.1.41482.3.3"] == bytes((5, 7, 1))
    assert values["1.3.6.1.4.1.41482.3.8"] == bytes((1, 3))  # never, cached
    assert values["1.3.6.1.4.1.41482.3.7"] == b"\x02\x04" + SERIAL.to_bytes(4, "big")
    exported = piv.work / "export.pem"
    ykman(piv, "keys", "export", "82", str(exported))
    assert exported.read_bytes() == pub.read_bytes()
    assert "Key moved from slot RETIRED1 to slot RETIRED2." in ykman(
        piv, "keys", "move", "-m", MGMT, "82", "83")
    assert _lines(ykman(piv, "keys", "info", "83"))["Origin"] == "GENERATED"
    assert "No key stored in slot 82" in ykman(piv, "keys", "info", "82", check=False)
    assert "Key in slot RETIRED2 deleted." in ykman(piv, "keys", "delete", "-m", MGMT, "83")
    assert "No key stored in slot 83" in ykman(piv, "keys", "info", "83", check=False)
    # the attestation of an imported key (the fixture's 9A) is refused
    assert "Attestation failed." in ykman(piv, "keys", "attest", "9a", "-", check=False)


def test_keys_import_with_touch_policy_always(piv: PivSetup) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path = piv.work / "imported.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    out = ykman(piv, "keys", "import", "-m", MGMT, "--touch-policy", "ALWAYS",
                "--pin-policy", "ALWAYS", "9d", str(path))
    assert "Private key imported into slot KEY_MANAGEMENT." in out, out
    assert _lines(ykman(piv, "keys", "info", "9d")) == {
        "Key slot": "9D (KEY_MANAGEMENT)", "Algorithm": "ECCP256", "Origin": "IMPORTED",
        "PIN required for use": "ALWAYS", "Touch required for use": "ALWAYS"}
    exported = piv.work / "9d.pub"
    ykman(piv, "keys", "export", "9d", str(exported))
    assert serialization.load_pem_public_key(exported.read_bytes()) == key.public_key()


def test_certificates_generate_import_export_request_delete(piv: PivSetup) -> None:
    pub = piv.work / "9a.pub"
    ykman(piv, "keys", "generate", "-m", MGMT, "-a", "RSA2048", "9a", str(pub))
    out = ykman(piv, "certificates", "generate", "-m", MGMT, "-P", PIN, "-s", "CN=ykman gen",
                "9a", str(pub))
    assert "Certificate generated in slot AUTHENTICATION." in out, out
    exported = piv.work / "9a.crt"
    ykman(piv, "certificates", "export", "9a", str(exported))
    cert = x509.load_pem_x509_certificate(exported.read_bytes())
    assert cert.subject.rfc4514_string() == "CN=ykman gen"
    public = cert.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    assert public == serialization.load_pem_public_key(pub.read_bytes())
    cert.verify_directly_issued_by(cert)  # self-signed by the card's new key
    csr_path = piv.work / "req.csr"
    ykman(piv, "certificates", "request", "-P", PIN, "-s", "CN=ykman request", "9a", str(pub),
          str(csr_path))
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    assert csr.is_signature_valid and csr.public_key() == public
    assert csr.subject.rfc4514_string() == "CN=ykman request"
    # import the fixture's 9C certificate into 9C again, then delete it
    assert "Certificate imported into slot SIGNATURE" in ykman(
        piv, "certificates", "import", "-m", MGMT, "9c", str(piv.certs / "9c.crt"))
    ykman(piv, "certificates", "export", "9c", str(exported))
    assert x509.load_pem_x509_certificate(exported.read_bytes()) == piv.cert("9c")
    assert "Certificate in slot SIGNATURE deleted." in ykman(
        piv, "certificates", "delete", "-m", MGMT, "9c")
    assert "No certificate found." in ykman(piv, "certificates", "export", "9c", "-",
                                            check=False)


def test_objects_import_export(piv: PivSetup) -> None:
    # a chained PUT DATA and a chained answer (steps of 7: no run like "12345678", which
    # the fixture's secret check would find in the trace)
    data = bytes(i * 7 % 256 for i in range(600))
    (piv.work / "obj.bin").write_bytes(data)
    assert "Object imported." in ykman(piv, "objects", "import", "-m", MGMT, "5fc110",
                                       str(piv.work / "obj.bin"))
    ykman(piv, "objects", "export", "5fc110", str(piv.work / "back.bin"))
    assert (piv.work / "back.bin").read_bytes() == data
    # a PIN-protected object: ykman verifies the PIN when the card asks for it; neither its
    # PUT DATA nor its answer reaches the bridge's trace
    protected = bytes(i * 11 % 256 for i in range(300))
    (piv.work / "protected.bin").write_bytes(protected)
    ykman(piv, "objects", "import", "-m", MGMT, "5fc109", str(piv.work / "protected.bin"))
    ykman(piv, "objects", "export", "-P", PIN, "5fc109", str(piv.work / "printed.bin"))
    assert (piv.work / "printed.bin").read_bytes() == protected
    traced = b"".join(r.command + r.response for r in piv.trace_records())
    assert data[:64] in traced and protected[:64] not in traced


def test_reset(piv: PivSetup) -> None:
    ykman(piv, "access", "change-pin", "-P", PIN, "-n", "654321")
    out = ykman(piv, "reset", "-f")
    assert "Reset complete. All PIV data has been cleared from the YubiKey." in out, out
    out = ykman(piv, "info")
    info = _lines(out)
    assert info["PIN tries remaining"] == "3/3"
    assert info["Management key algorithm"] == "AES192"  # firmware 5.7's factory key
    assert "WARNING: Using default PIN!" in out and "Slot 9A" not in out
    assert "CHUID" in info and info["CHUID"] == "No data available"
    # the factory management key works, the attestation key survived
    pub = piv.work / "new.pub"
    ykman(piv, "keys", "generate", "-m", MGMT, "-a", "ECCP256", "9a", str(pub))
    ykman(piv, "keys", "attest", "9a", str(piv.work / "att.pem"))
    assert _openssl_verify(piv, piv.work / "att.pem").endswith("OK\n")


# --- yubikit PivSession over pyscard -----------------------------------------------------

_PYSCARD_SCRIPT = r'''
import sys
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, x25519
from ykman.pcsc import list_devices
from yubikit.core.smartcard import ApduError, SmartCardConnection
from yubikit.piv import (DEFAULT_MANAGEMENT_KEY, KEY_TYPE, PIN_POLICY, SLOT, PivSession)

device, = list_devices(sys.argv[1])
with device.open_connection(SmartCardConnection) as conn:
    s = PivSession(conn)
    s.authenticate(DEFAULT_MANAGEMENT_KEY)
    slots = iter(range(0x82, 0x96))
    for key_type in (KEY_TYPE.RSA2048, KEY_TYPE.RSA3072, KEY_TYPE.ECCP256, KEY_TYPE.ECCP384,
                     KEY_TYPE.ED25519, KEY_TYPE.X25519):
        slot = SLOT(next(slots))
        public = s.generate_key(slot, key_type, PIN_POLICY.NEVER)
        msg = b"pyscard " + key_type.name.encode()
        if isinstance(public, rsa.RSAPublicKey):
            sig = s.sign(slot, key_type, msg, hashes.SHA256(), padding.PKCS1v15())
            public.verify(sig, msg, padding.PKCS1v15(), hashes.SHA256())
            ct = public.encrypt(b"session key", padding.PKCS1v15())
            assert s.decrypt(slot, ct, padding.PKCS1v15()) == b"session key"
        elif isinstance(public, ec.EllipticCurvePublicKey):
            h = hashes.SHA256() if public.curve.key_size == 256 else hashes.SHA384()
            public.verify(s.sign(slot, key_type, msg, h), msg, ec.ECDSA(h))
            peer = ec.generate_private_key(public.curve)
            assert s.calculate_secret(slot, peer.public_key()) == peer.exchange(ec.ECDH(), public)
        elif isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(s.sign(slot, key_type, msg, None), msg)
        else:
            peer = x25519.X25519PrivateKey.generate()
            assert s.calculate_secret(slot, peer.public_key()) == peer.exchange(public)
        print("ok", key_type.name)
    # PIN policy always: one use per VERIFY
    public = s.generate_key(SLOT.SIGNATURE, KEY_TYPE.ECCP256, PIN_POLICY.ALWAYS)
    s.verify_pin("123456")
    public.verify(s.sign(SLOT.SIGNATURE, KEY_TYPE.ECCP256, b"m", hashes.SHA256()), b"m",
                  ec.ECDSA(hashes.SHA256()))
    try:
        s.sign(SLOT.SIGNATURE, KEY_TYPE.ECCP256, b"m", hashes.SHA256())
        print("signed twice")
    except ApduError as exc:
        print("always: %04X" % exc.sw)
'''


def test_yubikit_over_pyscard(piv: PivSetup) -> None:
    """yubikit's PivSession through pyscard, libpcsclite, pcscd, vpcd and the bridge:
    every algorithm generated with PIN policy "never" signs (decrypts, agrees) without a
    VERIFY, signatures verified with the returned public keys; "always" allows one use."""
    result = piv.pcscd.run(sys.executable, "-c", _PYSCARD_SCRIPT, READER, timeout=240)
    assert result.stdout.split() == [
        "ok", "RSA2048", "ok", "RSA3072", "ok", "ECCP256", "ok", "ECCP384", "ok", "ED25519",
        "ok", "X25519", "always:", "6982"], result.stdout + result.stderr


# --- yubico-piv-tool ----------------------------------------------------------------------


def test_ykpiv_version_status_and_pin_retries(piv: PivSetup) -> None:
    assert piv.ykpiv("-a", "version").strip() == "Application version 5.7.1 found."
    status = piv.ykpiv("-a", "status")
    assert re.search(r"^Version:\s+5\.7\.1$", status, re.M), status
    assert re.search(rf"^Serial Number:\s+{SERIAL}$", status, re.M), status
    out = piv.ykpiv("-a", "verify-pin", "-P", PIN, "-a", "pin-retries", "--pin-retries", "7",
                    "--puk-retries", "6")
    assert "Successfully changed pin retries to 7 and puk retries to 6" in out, out
    assert re.search(r"PIN tries left:\s*7", piv.ykpiv("-a", "status"))
    assert _lines(ykman(piv, "info"))["PUK tries remaining"] == "6/6"


@pytest.mark.parametrize("kind", ["rsa-pem", "ec-pem", "ec-pkcs12"])
def test_ykpiv_import_key(piv: PivSetup, kind: str) -> None:
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = (
        rsa.generate_private_key(65537, 2048) if kind.startswith("rsa")
        else ec.generate_private_key(ec.SECP384R1()))
    path = piv.work / "key"
    if kind.endswith("pkcs12"):
        cert = piv.cert("9c")  # any certificate: yubico-piv-tool imports only the key
        path.write_bytes(pkcs12.serialize_key_and_certificates(
            b"k", key, None, None, serialization.BestAvailableEncryption(b"pw")))
        del cert
        args = ["-K", "PKCS12", "-p", "pw"]
    else:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
        args = []
    out = piv.ykpiv("-a", "import-key", "-s", "9e", "-i", str(path), *args,
                    "--pin-policy", "once", "--touch-policy", "always")
    assert "Successfully imported a new private key." in out, out
    info = _lines(ykman(piv, "keys", "info", "9e"))
    assert info == {"Key slot": "9E (CARD_AUTH)",
                    "Algorithm": "RSA2048" if kind.startswith("rsa") else "ECCP384",
                    "Origin": "IMPORTED", "PIN required for use": "ONCE",
                    "Touch required for use": "ALWAYS"}
    ykman(piv, "keys", "export", "9e", str(piv.work / "pub.pem"))
    assert serialization.load_pem_public_key((piv.work / "pub.pem").read_bytes()
                                             ) == key.public_key()


def test_ykpiv_attest(piv: PivSetup) -> None:
    piv.ykpiv("-a", "generate", "-s", "9c", "-A", "ECCP256", "-o", str(piv.work / "9c.pub"))
    piv.ykpiv("-a", "attest", "-s", "9c", "-o", str(piv.work / "9c.att"))
    assert _openssl_verify(piv, piv.work / "9c.att").strip() == f"{piv.work / '9c.att'}: OK"
    cert = x509.load_pem_x509_certificate((piv.work / "9c.att").read_bytes())
    assert cert.public_key() == serialization.load_pem_public_key(
        (piv.work / "9c.pub").read_bytes())
    assert cert.subject.rfc4514_string() == "CN=YubiKey PIV Attestation 9c"


def test_ykpiv_set_mgm_key(piv: PivSetup) -> None:
    new = "0f0e0d0c0b0a09080706050403020100f0e0d0c0b0a09080"
    assert "Successfully set new management key." in piv.ykpiv("-a", "set-mgm-key", "-n", new)
    out = piv.ykpiv("-a", "set-mgm-key", "-n", MGMT, check=False)  # the old key is gone
    assert "Successfully" not in out, out
    assert "Successfully set new management key." in piv.ykpiv(
        f"--key={new}", "-a", "set-mgm-key", "-n", MGMT)


@pytest.fixture
def piv_543(pcscd: PcscdHarness, tmp_path: Path) -> Iterator[PivSetup]:
    """A card whose firmware is 5.4.3: its factory management key is 3DES."""
    yield from piv_setup(pcscd, tmp_path, 'firmware = "5.4.3"')


def test_ykpiv_reset_after_blocking_pin_and_puk(piv_543: PivSetup) -> None:
    piv = piv_543
    out = piv.ykpiv("-a", "reset", check=False)
    assert "Successfully" not in out  # PIN and PUK still usable
    for _ in range(3):
        piv.ykpiv("-a", "verify-pin", "-P", "000000", check=False)
    for _ in range(3):
        piv.ykpiv("-a", "unblock-pin", "-P", "00000000", "-N", "999999", check=False)
    assert "Successfully reset the application." in piv.ykpiv("-a", "reset")
    status = piv.ykpiv("-a", "status")
    assert re.search(r"PIN tries left:\s*3", status) and "Slot 9a" not in status, status
    # 3DES factory key on 5.4.3: yubico-piv-tool 2.2's default key works again
    assert "Successfully set new management key." in piv.ykpiv("-a", "set-mgm-key", "-n", MGMT)
    assert "Successfully verified PIN." in piv.ykpiv("-a", "verify-pin", "-P", PIN)


def test_ykpiv_with_a_yubikey5_identity(pcscd: PcscdHarness, tmp_path: Path) -> None:
    """identity = "yubikey5": a YubiKey 5 NFC ATR; OpenSC still signs, ykman reads the
    serial and form factor from the management application."""
    for piv in piv_setup(pcscd, tmp_path, 'identity = "yubikey5"\nform_factor = "usb-c-nano"'):
        atr = piv.run("opensc-tool", "-r", READER, "-a").strip()
        assert atr == "3b:8d:80:01:80:73:c0:21:c0:57:59:75:62:69:4b:65:79:f9"
        result = piv.pcscd.run(str(YKMAN), "--reader", READER, "info",
                               env={"HOME": str(piv.work)})
        info = _lines(result.stdout)
        assert info["Serial number"] == str(SERIAL), result.stdout
        assert info["Firmware version"] == "5.7.1"
        assert info["Form factor"] == "Nano (USB-C)"
        data = b"signed by a YubiKey 5 lookalike"
        (piv.work / "d").write_bytes(data)
        piv.p11("--login", "--pin", PIN, "--sign", "--id", "01", "-m", "SHA256-RSA-PKCS",
                "-i", str(piv.work / "d"), "-o", str(piv.work / "s"))
        key = piv.cert("9a").public_key()
        assert isinstance(key, rsa.RSAPublicKey)
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding
        key.verify((piv.work / "s").read_bytes(), data, padding.PKCS1v15(), hashes.SHA256())


def test_touch_delay_through_the_bridge(piv: PivSetup) -> None:
    """``ccidemu vpcd --touch-delay``: the card waits for its (delayed) touch in the bridge's
    thread; ykman's certificate generation with a touch-always key completes."""
    assert piv.pcscd.stop_bridge() == 0
    piv.pcscd.start_bridge(piv.spec, "--state-dir", str(piv.state), "--touch-delay", "0.5")
    pub = piv.work / "9a.pub"
    ykman(piv, "keys", "generate", "-m", MGMT, "-a", "ECCP256", "--touch-policy", "ALWAYS",
          "9a", str(pub))
    out = ykman(piv, "certificates", "generate", "-m", MGMT, "-P", PIN, "-s", "CN=touched",
                "9a", str(pub))
    assert "Certificate generated in slot AUTHENTICATION." in out, out
    ykman(piv, "certificates", "export", "9a", str(piv.work / "c.pem"))
    cert = x509.load_pem_x509_certificate((piv.work / "c.pem").read_bytes())
    cert.verify_directly_issued_by(cert)
