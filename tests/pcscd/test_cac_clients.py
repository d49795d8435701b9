"""The emulated CAC card (``--card cac:``) proved with OpenSC 0.23 through pcscd + vpcd.

opensc-tool, pkcs15-tool and pkcs11-tool (opensc-pkcs11.so) against the demo card
(fixtures/cac: three RSA-2048 keys, PIN 123456, 3 tries).  OpenSC's CAC driver names the
PKCS#11 objects 0001, 0002, 0003 (PKI applets 0, 1, 2).  Every test works on a fresh copy
of fixtures/cac and its own state directory.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.support import opensc_responses
from vmc.lab.pcscd import OPENSC_PKCS11, READER, PcscdHarness

pytestmark = pytest.mark.pcscd

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "cac"
PIN = "123456"
IDS = ("0001", "0002", "0003")
LABELS = ("CAC ID Certificate", "CAC Email Signature Certificate",
          "CAC Email Encryption Certificate")
SELECT_ACA = "00a4040007a0000000790300"


@dataclass
class CacSetup:
    pcscd: PcscdHarness
    certs: Path  # this test's copy of fixtures/cac
    state: Path
    work: Path

    def start(self) -> None:
        self.pcscd.start_bridge(f"cac:{self.certs}", "--state-dir", str(self.state))

    def restart_bridge(self) -> None:
        assert self.pcscd.stop_bridge() == 0
        self.start()

    def run(self, *argv: str, check: bool = True) -> str:
        # HOME: OpenSC's file cache (~/.cache/opensc) stays per test
        result = self.pcscd.run(*argv, check=check, env={"HOME": str(self.work)})
        return result.stdout + result.stderr

    def p11(self, *args: str, check: bool = True) -> str:
        return self.run("pkcs11-tool", "--module", str(OPENSC_PKCS11), *args, check=check)

    def cert(self, number: int) -> x509.Certificate:
        return x509.load_pem_x509_certificate((self.certs / f"cert{number}.crt").read_bytes())

    def pin_state(self) -> bytes:
        """The answer to VERIFY without data (after selecting the ACA)."""
        out = self.run("opensc-tool", "-r", READER, "-s", SELECT_ACA, "-s", "0020000000")
        return opensc_responses(out)[-1]


@pytest.fixture
def cac(pcscd: PcscdHarness, tmp_path: Path) -> Iterator[CacSetup]:
    certs = tmp_path / "cac"
    shutil.copytree(FIXTURES, certs)
    setup = CacSetup(pcscd, certs, tmp_path / "state", tmp_path)
    setup.state.mkdir()
    setup.start()
    yield setup


def _public(cert: x509.Certificate) -> rsa.RSAPublicKey:
    key = cert.public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    return key


def test_opensc_names_a_cac_card(cac: CacSetup) -> None:
    out = cac.run("opensc-tool", "-r", READER, "-n")
    assert out.strip() == "Common Access Card (CAC)", out  # OpenSC card-cac.c


def test_pkcs15_lists_the_certificates(cac: CacSetup) -> None:
    out = cac.run("pkcs15-tool", "--reader", READER, "-D")
    found = re.findall(r"^X\.509 Certificate \[(.*)\]\n(?:\t.*\n)*?\tID\s*: (\w+)\n"
                       r"\tEncoded serial : 02 \w\w (\w+)", out, re.M)
    expected = []
    for number, (label, key_id) in enumerate(zip(LABELS, IDS, strict=True), start=1):
        serial = cac.cert(number).serial_number
        der = serial.to_bytes(serial.bit_length() // 8 + 1, "big")  # DER INTEGER, positive
        expected.append((label, key_id, der.hex().upper()))
    assert found == expected, out
    # the token label is the first certificate's CN
    assert "PKCS#15 Card [ccidemu CAC Test User (ID)]" in out, out


def test_pkcs11_lists_three_certificates_and_keys(cac: CacSetup) -> None:
    slots = cac.p11("-L")
    assert re.search(r"Virtual PCD 00 00\n\s+token label\s+: ccidemu CAC Test User \(ID\)",
                     slots), slots
    objects = cac.p11("--login", "--pin", PIN, "-O")
    for kind in ("Certificate Object", "Private Key Object", "Public Key Object"):
        assert objects.count(kind) == 3, objects
    for number in (1, 2, 3):
        subject = cac.cert(number).subject.rfc4514_string()
        cn = subject.split("CN=")[1].split(",")[0]
        assert f"CN={cn}" in objects, (cn, objects)


@pytest.mark.parametrize("number", [1, 2, 3])
def test_pkcs11_sign_verifies_with_the_certificate(cac: CacSetup, number: int) -> None:
    data = f"ccidemu CAC signature test {number}".encode()
    (cac.work / "data").write_bytes(data)
    cac.p11("--login", "--pin", PIN, "--sign", "--id", IDS[number - 1], "-m", "SHA256-RSA-PKCS",
            "-i", str(cac.work / "data"), "-o", str(cac.work / "sig"))
    signature = (cac.work / "sig").read_bytes()
    _public(cac.cert(number)).verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    # and not with another certificate
    other = cac.cert(number % 3 + 1)
    with pytest.raises(InvalidSignature):
        _public(other).verify(signature, data, padding.PKCS1v15(), hashes.SHA256())


def test_pkcs11_decrypt(cac: CacSetup) -> None:
    secret = b"a session key for the encryption certificate"
    (cac.work / "ct").write_bytes(_public(cac.cert(3)).encrypt(secret, padding.PKCS1v15()))
    cac.p11("--login", "--pin", PIN, "--decrypt", "--id", "0003", "-m", "RSA-PKCS",
            "-i", str(cac.work / "ct"), "-o", str(cac.work / "pt"))
    assert (cac.work / "pt").read_bytes() == secret


def test_pkcs11_self_test(cac: CacSetup) -> None:
    out = cac.p11("--test", "--login", "--pin", PIN)
    assert "No errors" in out, out
    assert out.count("RSA-X-509: OK") >= 3, out  # signing with all keys, decrypting with one


def test_wrong_pin_is_refused_and_counted(cac: CacSetup) -> None:
    assert cac.pin_state() == b"\x63\xc3"
    out = cac.p11("--login", "--pin", "654321", "-O", check=False)
    assert "CKR_PIN_INCORRECT" in out, out
    assert cac.pin_state() == b"\x63\xc2"
    # the counter survives a restart (the state file), and the right PIN resets it
    cac.restart_bridge()
    assert cac.pin_state() == b"\x63\xc2"
    assert [p.name[:4] for p in cac.state.iterdir()] == ["cac-"]
    cac.p11("--login", "--pin", PIN, "-O")
    cac.restart_bridge()
    assert cac.pin_state() == b"\x63\xc3"


def test_blocked_pin_refuses_the_right_one(cac: CacSetup) -> None:
    for _ in range(3):
        out = cac.p11("--login", "--pin", "000000", "-O", check=False)
        assert "C_Login failed" in out, out
    assert cac.pin_state() == b"\x69\x83"
    out = cac.p11("--login", "--pin", PIN, "-O", check=False)
    assert "C_Login failed" in out and "Private Key Object" not in out, out


# --- OpenSC's own APDUs, replayed to the real libcacard and to our card -----------------

_OUTGOING = re.compile(r"^Outgoing APDU \((\d+) bytes\):\n((?:.*\n)+?)\n", re.M)


def _outgoing_apdus(debug_log: str) -> list[bytes]:
    """The command APDUs in an ``OPENSC_DEBUG=9`` log (sc_apdu_log: hex rows of up to 16
    bytes, each followed by its ASCII column)."""
    apdus = []
    for match in _OUTGOING.finditer(debug_log):
        size, data = int(match.group(1)), bytearray()
        for row in match.group(2).splitlines():
            data += bytes.fromhex("".join(row.split()[: min(16, size - len(data))]))
        assert len(data) == size, match.group(0)
        apdus.append(bytes(data))
    return apdus


def test_opensc_self_test_apdus_get_libcacard_answers(cac: CacSetup, tmp_path: Path,
                                                       request: pytest.FixtureRequest) -> None:
    """Every APDU of ``pkcs11-tool --test --login`` (about 200: OpenSC's probing of other card
    types, the CAC driver's reads, VERIFY, signatures, decryptions) sent again to libcacard
    and to our card: the same answers, but for the by-design steps of
    tests/cards/test_cac_libcacard.py (VERIFY state, GET CHALLENGE)."""
    from ccidemu.cards.cac import CacCard, CacState
    from ccidemu.cards.cac_files import load_directory
    from tests.cards.libcacard_peer import (
        PACKAGES,
        LibcacardCard,
        build_harness,
        make_nss_db,
        missing_peers,
    )
    from tests.support import require_peers

    require_peers(request.config, "libcacard", missing_peers(), PACKAGES)
    result = cac.pcscd.run("pkcs11-tool", "--module", str(OPENSC_PKCS11), "--test", "--login",
                           "--pin", PIN, env={"HOME": str(cac.work), "OPENSC_DEBUG": "9"})
    assert "No errors" in result.stdout, result.stdout
    commands = _outgoing_apdus(result.stderr + result.stdout)
    assert len(commands) > 150
    pin_apdu = bytes.fromhex("0020000008") + PIN.encode() + b"\xff\xff"
    config = load_directory(cac.certs)
    db, nicknames = make_nss_db(tmp_path, [(x509.load_der_x509_certificate(c.certificate), c.key)
                                           for c in config.credentials], PIN)
    reference = LibcacardCard(build_harness(tmp_path), db, nicknames)
    try:
        ours = CacCard(config.credentials, CacState())
        assert reference.power_on() == ours.power_on()
        compared = signed = 0
        for command in commands:
            if command[1] == 0x20 and len(command) > 5:  # OpenSC may mask the PIN in logs
                command = pin_apdu
            theirs, mine = reference.transmit(command), ours.transmit(command)
            if command[1] == 0x84:  # GET CHALLENGE: answered by ours only (by design)
                assert theirs in (b"\x6d\x00", b"\x69\x00") and mine[-2:] == b"\x90\x00"
                continue
            if command[1] == 0x20 and len(command) <= 5 and mine[:1] == b"\x63":
                assert theirs in (b"\x6a\x88", b"\x63\xc3"), theirs.hex()  # VERIFY state
                continue
            assert mine == theirs, f"{command.hex()}: libcacard {theirs.hex()}, ours {mine.hex()}"
            compared += 1
            signed += command[1] == 0x42 and command[2] == 0x00
        print(f"replayed {len(commands)} OpenSC APDUs: {compared} compared, {signed} SIGN/DECRYPT")
        assert compared > 150 and signed >= 8
    finally:
        reference.close()
