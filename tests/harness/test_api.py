"""The public API for test writers: ``import ccidemu`` (cards from specs and objects,
CardSession, PivClient) and ``vmc.lab`` (ServeThread, open_channel, open_qemu_card).

CardSession is checked against a scripted card (the exact wire exchanges of command and
response chaining, ISO/IEC 7816-4:2013 sections 5.1.1.1 and 5.3) and against the emulated
cards; PivClient's results are checked with ``cryptography`` (signatures verify, decryption
gives the plaintext, ECDH agrees with the host's own computation).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, x25519

import ccidemu
import vmc.lab
from ccidemu.apdu import CommandApdu
from ccidemu.cards.cac import CacCard
from ccidemu.cards.piv import Algorithm, PinPolicy, PivCard
from ccidemu.certs import generate_cac_set, issue_certificate, make_ca, new_private_key
from ccidemu.client import MAX_ROUNDS, CardSession, Exchange
from ccidemu.errors import CardError, ConfigError, DecodeError
from vmc.lab import ServeThread, open_channel, open_qemu_card, qemu_card_args

ROOT = Path(__file__).resolve().parents[2]
H = bytes.fromhex


class Scripted:
    """A card side that answers from a script: (expected command, answer) pairs in order."""

    def __init__(self, script: list[tuple[str, str]]) -> None:
        self.script = [(H(c), H(a)) for c, a in script]
        self.seen: list[bytes] = []

    def __call__(self, apdu: bytes) -> bytes:
        self.seen.append(apdu)
        expected, answer = self.script[len(self.seen) - 1]
        assert apdu == expected, (apdu.hex(), expected.hex())
        return answer

    def done(self) -> bool:
        return len(self.seen) == len(self.script)


# --------------------------------------------------------------------------- CardSession


def test_response_chaining_joins_every_part() -> None:
    card = Scripted([("00CA010200", "AABB6103"), ("00C0000003", "CCDDEE6101"),
                     ("00C0000001", "FF9000")])
    session = CardSession(card)
    assert session.transmit(H("00CA010200")) == (H("AABBCCDDEEFF"), 0x9000)
    assert card.done()
    assert session.exchanges[-1] == Exchange(H("00C0000001"), H("FF9000"))


def test_wrong_le_is_resent_with_the_exact_length_and_keeps_logical_channel() -> None:
    # 6Cxx on the command and on a GET RESPONSE: each is resent with Le = xx; CLA 01 (logical
    # channel 1) stays on GET RESPONSE
    card = Scripted([("01B0000000", "6C04"), ("01B0000004", "010203046102"),
                     ("01C0000002", "6C01"), ("01C0000001", "059000")])
    assert CardSession(card).transmit(H("01B0000000")) == (H("0102030405"), 0x9000)
    assert card.done()


def test_command_chaining_splits_long_data_and_stops_at_an_error() -> None:
    data = bytes(range(256)) + bytes(10)  # 266 bytes: two links of at most 255
    first = "10DB3FFFFF" + data[:255].hex()
    last = "00DB3FFF0B" + data[255:].hex()
    card = Scripted([(first, "9000"), (last, "9000")])
    assert CardSession(card).transmit(CommandApdu(0, 0xDB, 0x3F, 0xFF, data)) == (b"", 0x9000)
    assert card.done()
    refused = Scripted([(first, "6A80")])
    assert CardSession(refused).transmit(CommandApdu(0, 0xDB, 0x3F, 0xFF, data)) == (b"", 0x6A80)
    assert refused.done()  # the second link was never sent


def test_extended_sends_one_command() -> None:
    data = bytes(300)
    card = Scripted([("00DB3FFF00012C" + data.hex(), "9000")])
    session = CardSession(card, extended=True)
    assert session.transmit(CommandApdu(0, 0xDB, 0x3F, 0xFF, data)) == (b"", 0x9000)


def test_send_raises_apdu_error_with_the_status_word() -> None:
    session = CardSession(Scripted([("00A4040002AABB00", "6A82")]))
    with pytest.raises(ccidemu.ApduError) as info:
        session.send(0x00, 0xA4, 0x04, 0x00, H("AABB"))
    assert info.value.sw == 0x6A82 and (info.value.sw1, info.value.sw2) == (0x6A, 0x82)
    assert "00 A4 04 00: status word 6A82 (" in str(info.value)


@pytest.mark.parametrize("answer", ["", "90"])
def test_an_answer_without_status_word_is_a_card_error(answer: str) -> None:
    with pytest.raises(CardError, match="not a response APDU"):
        CardSession(lambda apdu: H(answer)).transmit(H("00B0000000"))


def test_a_card_announcing_data_for_ever_is_stopped() -> None:
    rounds: list[bytes] = []

    def endless(apdu: bytes) -> bytes:
        rounds.append(apdu)
        return H("AA6101")

    with pytest.raises(CardError, match="still announces more data"):
        CardSession(endless).transmit(H("00B0000000"))
    assert len(rounds) == MAX_ROUNDS + 1


def test_session_on_card_objects_powers_on_and_resets() -> None:
    card = ccidemu.open_card("test:")
    session = CardSession(card)
    assert session.atr == bytes.fromhex("3B0A") + b"ccidemu-TC"
    assert session.send(0x80, 0xE4, 0, 0, ne=4) == (1).to_bytes(4, "big")
    assert session.reset() == session.atr
    with pytest.raises(CardError, match="cannot be reset"):
        CardSession(card.transmit).reset()


@pytest.mark.parametrize("spec", ["piv:", "cac:"])
def test_session_reads_long_objects_of_the_demo_cards(spec: str) -> None:
    """PIV (ISO rules: the first 256 bytes, then 61xx) and CAC (T=0 rules: only 61xx) both
    come out whole; the CAC case is libcacard's READ BUFFER of the first certificate."""
    session = CardSession(ccidemu.open_card(spec))
    if spec == "piv:":
        data, sw = session.transmit(H("00CB3FFF055C035FC10500"))
        expected = (ccidemu.demo_piv_directory() / "9a.crt").read_bytes()
        cert = x509.load_pem_x509_certificate(expected)
        assert sw == 0x9000 and cert.tbs_certificate_bytes in data
    else:
        session.send(0x00, 0xA4, 0x04, 0x00, H("A0000000790100"), ne=0)
        data, sw = session.transmit(CommandApdu(0x80, 0x52, 0x00, 0x00, H("0102")))
        assert sw == 0x9000 and len(data) == 2
    assert any(e.response[-2] == 0x61 for e in session.exchanges)


# --------------------------------------------------------------------------- PivClient


def _rsa_public(cert: x509.Certificate) -> rsa.RSAPublicKey:
    key = cert.public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    return key


def _ec_public(cert: x509.Certificate) -> ec.EllipticCurvePublicKey:
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def test_piv_client_on_the_demo_card() -> None:
    piv = ccidemu.PivClient(ccidemu.open_card("piv:"))
    template = piv.select()
    assert template[0] == 0x61 and H("A000000308") in template
    files = ccidemu.demo_piv_directory()
    for slot in ("9a", "9c", "9d", "9e", "f9"):
        expected = x509.load_pem_x509_certificate((files / f"{slot}.crt").read_bytes())
        assert piv.read_certificate(int(slot, 16)) == expected
    with pytest.raises(ccidemu.ApduError) as info:  # 9A needs the PIN
        piv.sign(0x9A, b"x")
    assert info.value.sw == 0x6982
    assert piv.pin_attempts() == 3
    piv.verify_pin("123456")
    assert piv.pin_attempts() is None  # verified
    for algorithm in (hashes.SHA256(), hashes.SHA384(), hashes.SHA512(), hashes.SHA1()):
        signature = piv.sign(0x9A, b"message", algorithm)
        _rsa_public(piv.read_certificate(0x9A)).verify(signature, b"message",
                                                       padding.PKCS1v15(), algorithm)
    piv.verify_pin("123456")  # 9C: PIN always
    signature = piv.sign(0x9C, b"message")
    _ec_public(piv.read_certificate(0x9C)).verify(signature, b"message",
                                                  ec.ECDSA(hashes.SHA256()))
    signature = piv.sign(0x9E, b"no PIN", hashes.SHA384())  # 9E: PIN never; P-384
    _ec_public(piv.read_certificate(0x9E)).verify(signature, b"no PIN",
                                                  ec.ECDSA(hashes.SHA384()))
    ciphertext = _rsa_public(piv.read_certificate(0x9D)).encrypt(b"secret",
                                                                 padding.PKCS1v15())
    assert piv.decrypt(0x9D, ciphertext) == b"secret"
    block = piv.decrypt(0x9D, ciphertext, raw=True)
    assert len(block) == 256 and block.endswith(b"\x00secret")
    with pytest.raises(DecodeError, match=r"PKCS#1 v1\.5 type 2"):
        piv.decrypt(0x9D, bytes(255) + b"\x02")  # the block of 2: not type 2
    assert piv.version() == (5, 7, 1) and piv.serial() == 51757879


def test_piv_client_wrong_pin_and_blocking() -> None:
    piv = ccidemu.PivClient(ccidemu.piv_card(pin="654321", pin_retries=2))
    with pytest.raises(ccidemu.InvalidPinError) as info:
        piv.verify_pin("123456")
    assert info.value.attempts_remaining == 1 and info.value.sw == 0x63C1
    piv.verify_pin("654321")  # resets the counter
    assert piv.pin_attempts() is None
    piv.change_pin("654321", "11223344")
    for left in (1, 0):
        with pytest.raises(ccidemu.InvalidPinError) as info:
            piv.verify_pin("654321")
        assert info.value.attempts_remaining == left
    with pytest.raises(ccidemu.ApduError) as blocked:
        piv.verify_pin("11223344")
    assert blocked.value.sw == 0x6983 and not isinstance(blocked.value, ccidemu.InvalidPinError)
    assert piv.pin_attempts() == 0


@pytest.mark.parametrize(("algorithm", "kind"), [
    (Algorithm.RSA2048, rsa.RSAPublicKey), (Algorithm.ECCP256, ec.EllipticCurvePublicKey),
    (Algorithm.ECCP384, ec.EllipticCurvePublicKey), (Algorithm.ED25519, ed25519.Ed25519PublicKey),
])
def test_generate_then_sign_and_store_a_certificate(algorithm: int, kind: type) -> None:
    piv = ccidemu.PivClient(ccidemu.piv_card())
    with pytest.raises(ccidemu.ApduError) as info:  # GENERATE needs the management key
        piv.generate_key(0x9A, algorithm)
    assert info.value.sw == 0x6982
    piv.authenticate()
    public_key = piv.generate_key(0x9A, algorithm, pin_policy=PinPolicy.NEVER)
    assert isinstance(public_key, kind)
    signature = piv.sign(0x9A, b"generated", public_key=public_key)  # PIN policy never
    if isinstance(public_key, rsa.RSAPublicKey):
        public_key.verify(signature, b"generated", padding.PKCS1v15(), hashes.SHA256())
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(signature, b"generated", ec.ECDSA(hashes.SHA256()))
    else:
        assert isinstance(public_key, ed25519.Ed25519PublicKey)
        public_key.verify(signature, b"generated")
    ca_key, ca_cert = make_ca()
    # a certificate for the generated key (the CA signs; the card only holds it)
    cert = (x509.CertificateBuilder().subject_name(ca_cert.subject).issuer_name(ca_cert.subject)
            .public_key(public_key).serial_number(7).not_valid_before(ca_cert.not_valid_before_utc)
            .not_valid_after(ca_cert.not_valid_after_utc).sign(ca_key, hashes.SHA256()))
    piv.write_certificate(0x9A, cert)
    assert piv.read_certificate(0x9A) == cert
    assert piv.sign(0x9A, b"again")  # the certificate now says which algorithm


def test_ecdh_and_x25519_agree_with_the_host() -> None:
    piv = ccidemu.PivClient(ccidemu.piv_card())
    piv.authenticate()
    card_ec = piv.generate_key(0x9D, Algorithm.ECCP256, pin_policy=PinPolicy.NEVER)
    card_x = piv.generate_key(0x9E, Algorithm.X25519, pin_policy=PinPolicy.NEVER)
    assert isinstance(card_ec, ec.EllipticCurvePublicKey)
    assert isinstance(card_x, x25519.X25519PublicKey)
    host_ec = ec.generate_private_key(ec.SECP256R1())
    host_x = x25519.X25519PrivateKey.generate()
    assert piv.derive(0x9D, host_ec.public_key(), card_ec) == host_ec.exchange(ec.ECDH(), card_ec)
    assert piv.derive(0x9E, host_x.public_key(), card_x) == host_x.exchange(card_x)
    with pytest.raises(ValueError, match="only agrees keys"):
        piv.sign(0x9E, b"x", public_key=card_x)


def test_authenticate_with_aes_and_a_wrong_key() -> None:
    key = bytes(range(32))
    piv = ccidemu.PivClient(ccidemu.piv_card(management_key=key,
                                             management_algorithm=Algorithm.AES256))
    with pytest.raises(ccidemu.ApduError) as info:
        piv.authenticate(bytes(32), Algorithm.AES256)
    assert info.value.sw == 0x6982
    with pytest.raises(ccidemu.ApduError) as mismatch:  # the card's key is AES, not 3DES
        piv.authenticate()
    assert mismatch.value.sw == 0x6A86
    piv.authenticate(key, Algorithm.AES256)
    piv.write_object(0x5FC109, H("0102"))  # PUT DATA needs it: it worked
    piv.verify_pin("123456")
    assert piv.read_object(0x5FC109) == H("0102")


def test_a_card_that_lies_in_mutual_authentication_is_caught() -> None:
    """The card's step 2 answer must be our challenge encrypted with the key: a card that
    answers something else (it does not hold the key) is refused."""
    card = ccidemu.piv_card()

    def liar(apdu: bytes) -> bytes:
        answer = card.transmit(apdu)
        if apdu[1] == 0x87 and answer.startswith(H("7C0A8208")):
            return answer[:4] + bytes(8) + answer[-2:]
        return answer

    with pytest.raises(CardError, match="does not hold this management key"):
        ccidemu.PivClient(liar).authenticate()


# --------------------------------------------------------------------------- cards from objects


def _p256_with_cert(name: str = "t") -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    ca_key, ca_cert = make_ca()
    key = new_private_key("p256")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key, issue_certificate(ca_key, ca_cert, key, name)


def test_piv_card_from_objects() -> None:
    key, cert = _p256_with_cert()
    bare = new_private_key("rsa2048")
    assert isinstance(bare, rsa.RSAPrivateKey)
    card = ccidemu.piv_card({0x9A: (key, cert), 0x9D: bare}, pin="24681357", puk="87654321",
                            serial=4242, label="mine")
    assert isinstance(card, PivCard) and card.name == "PIV (mine)"
    piv = ccidemu.PivClient(card)
    assert piv.serial() == 4242
    assert piv.read_certificate(0x9A) == cert
    with pytest.raises(ccidemu.ApduError) as info:  # 9D: a key, no certificate object
        piv.read_certificate(0x9D)
    assert info.value.sw == 0x6A82
    piv.verify_pin("24681357")
    block = piv.decrypt(0x9D, bare.public_key().encrypt(b"k", padding.PKCS1v15()),
                        public_key=bare.public_key())
    assert block == b"k"
    yubikey = ccidemu.piv_card(yubikey=True)
    assert yubikey.name.startswith("YubiKey 5 PIV")
    assert ccidemu.piv_card().power_on() == ccidemu.open_card("piv:").power_on()


@pytest.mark.parametrize(("call", "message"), [
    (lambda k, c: ccidemu.piv_card({0x9B: (k, c)}), "not a PIV key slot"),
    (lambda k, c: ccidemu.piv_card({0x9A: (k, _p256_with_cert()[1])}), "not the key's"),
    (lambda k, c: ccidemu.piv_card(pin="12"), "pin must be 6 to 8"),
    (lambda k, c: ccidemu.piv_card(management_key=bytes(16)), "does not fit"),
    (lambda k, c: ccidemu.piv_card({0x9A: new_private_key("rsa1024").public_key()}),  # type: ignore[dict-item]
     "slot 9A"),
    (lambda k, c: ccidemu.cac_card([(k, c)]), "CAC keys are RSA"),
    (lambda k, c: ccidemu.cac_card([]), "1 to 10 certificates"),
    (lambda k, c: ccidemu.cac_card([], pin="12"), "4 to 8 characters"),
])
def test_cards_from_bad_objects_are_config_errors(
        call: Callable[[ec.EllipticCurvePrivateKey, x509.Certificate], object], message: str
) -> None:
    key, cert = _p256_with_cert()
    with pytest.raises(ConfigError, match=message):
        call(key, cert)


def test_write_piv_card_round_trips_through_the_spec(tmp_path: Path) -> None:
    key, cert = _p256_with_cert("written")
    spec = ccidemu.write_piv_card(tmp_path / "card", {0x9C: (key, cert)}, pin="11112222",
                                  label='a "quoted" label', serial=99, yubikey=True)
    assert spec == f"piv:{tmp_path / 'card' / 'card.toml'}"
    profile = tomllib.loads((tmp_path / "card" / "card.toml").read_text())
    assert profile["label"] == 'a "quoted" label' and profile["identity"] == "yubikey5"
    assert (tmp_path / "card" / "9c.key").stat().st_mode & 0o777 == 0o600
    card = ccidemu.open_card(spec)
    assert card.name == 'YubiKey 5 PIV (a "quoted" label)'
    piv = ccidemu.PivClient(card)
    assert piv.read_certificate(0x9C) == cert and piv.serial() == 99
    piv.verify_pin("11112222")
    signature = piv.sign(0x9C, b"m")
    key.public_key().verify(signature, b"m", ec.ECDSA(hashes.SHA256()))
    with pytest.raises(ConfigError, match="needs a certificate"):
        ccidemu.write_piv_card(tmp_path / "bare", {0x9A: key})


def test_cac_cards_from_objects_and_files(tmp_path: Path) -> None:
    ca_key, ca_cert = make_ca()
    credentials = []
    for name in ("one", "two"):
        key = new_private_key("rsa2048")
        assert isinstance(key, rsa.RSAPrivateKey)
        credentials.append((key, issue_certificate(ca_key, ca_cert, key, name)))
    card = ccidemu.cac_card(credentials, pin="9999", label="pair")
    assert isinstance(card, CacCard) and card.name == "CAC (pair)"
    spec = ccidemu.write_cac_card(tmp_path / "cac", credentials, pin="9999")
    opened = ccidemu.open_card(spec)
    assert isinstance(opened, CacCard)
    assert opened.serial == card.serial  # SHA-256 of the first certificate: the same card
    assert opened.state.pin == b"9999"


def test_generate_cac_set_makes_the_demo_kind_of_card(tmp_path: Path) -> None:
    written = generate_cac_set(tmp_path)
    assert sorted(p.name for p in written) == sorted(
        ["ca.crt", "ca.key", "card.toml", "cert1.crt", "cert1.key", "cert2.crt", "cert2.key",
         "cert3.crt", "cert3.key"])
    card = ccidemu.open_card(f"cac:{tmp_path}")
    assert isinstance(card, CacCard) and len(card.applets) > 3
    third = x509.load_pem_x509_certificate((tmp_path / "cert3.crt").read_bytes())
    usage = third.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment
    with pytest.raises(ConfigError, match="already exist"):
        generate_cac_set(tmp_path)
    out = subprocess.run([sys.executable, "-m", "vmc", "certs", "generate", "--cac", "--force",
                          str(tmp_path)], capture_output=True, text=True, check=True).stdout
    assert len(out.splitlines()) == 9
    assert ccidemu.open_card(f"cac:{tmp_path / 'card.toml'}").name == "CAC (ccidemu demo CAC)"


# --------------------------------------------------------------------------- the surface


def test_the_public_names_load_and_are_documented() -> None:
    for name in ccidemu.__all__:
        assert getattr(ccidemu, name) is not None, name
    for name in vmc.lab.__all__:
        assert getattr(vmc.lab, name) is not None, name
    assert set(ccidemu.__all__) <= set(dir(ccidemu))
    with pytest.raises(AttributeError):
        ccidemu.no_such_name  # noqa: B018
    testing = (ROOT / "docs" / "TESTING.md").read_text()
    for name in ("open_card", "piv_card", "write_piv_card", "cac_card", "CardSession",
                 "PivClient", "InvalidPinError", "ServeThread", "open_channel", "FakeQemu"):
        assert name in testing, name


def test_import_ccidemu_stays_cheap() -> None:
    code = ("import sys, ccidemu; print(sorted(m for m in sys.modules "
            "if m.startswith(('cryptography', 'ccidemu.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_no_module_looks_for_the_source_tree() -> None:
    """Installed, the package has no checkout around it (issue 11): no module reaches above
    its own package for files."""
    offenders = []
    for package in ("ccidemu", "vmc"):
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            if re.search(r"parents\[[2-9]\]|\"fixtures\"|'fixtures'", text):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


# --------------------------------------------------------------------------- vmc.lab


def test_serve_thread_reports_start_errors_in_the_callers_thread(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown card scheme"):
        ServeThread(cards=["nope:"], listen=[f"unix:{tmp_path}/s.sock"]).start()
    serve = ServeThread(cards=["test:"], listen=[f"unix:{tmp_path}/s.sock"]).start()
    try:
        assert serve.running
        [vm] = serve.request({"cmd": "list"})
        assert vm["vm"] == "vm1" and vm["readers"][0]["card"] == "built-in test card"
        with pytest.raises(vmc.lab.LabError, match="started already"):
            serve.start()
    finally:
        serve.stop()
    assert not serve.running


@pytest.fixture
def short() -> Iterator[Path]:
    """A short directory for unix sockets."""
    path = Path(tempfile.mkdtemp(prefix="ccd-api-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("mode", list(vmc.lab.ServeMode))
def test_open_channel_drives_serve_over_vscard(mode: vmc.lab.ServeMode, short: Path) -> None:
    with open_channel(["piv:", "test:"], short, mode=mode) as channel:
        assert channel.atr == ccidemu.open_card("piv:").power_on()
        piv = channel.piv()
        piv.verify_pin("123456")
        signature = piv.sign(0x9A, b"over the channel")
        _rsa_public(piv.read_certificate(0x9A)).verify(
            signature, b"over the channel", padding.PKCS1v15(), hashes.SHA256())
        assert isinstance(channel.serve, ServeThread if mode is vmc.lab.ServeMode.IN_PROCESS
                          else vmc.lab.ServeProcess)
        # fresh state after reinsertion: the PIN is no longer verified
        channel.reinsert()
        with pytest.raises(ccidemu.ApduError):
            channel.piv().sign(0x9A, b"x")
        assert channel.reinsert("test:") == bytes.fromhex("3B0A") + b"ccidemu-TC"
        assert channel.transmit(H("80E0000001AA")) == H("AA9000")


def test_open_channel_refuses_long_paths_and_reports_a_dead_daemon(tmp_path: Path,
                                                                  short: Path) -> None:
    with pytest.raises(vmc.lab.LabError, match="too long"), open_channel(
            ["test:"], tmp_path / ("x" * 100)):
        pass
    with pytest.raises(vmc.lab.LabError, match="exited with 1"), open_channel(
            ["nope:"], short, mode=vmc.lab.ServeMode.SUBPROCESS):
        pass


def test_qemu_card_args_and_listening_serve(short: Path) -> None:
    workdir = short
    args = qemu_card_args(workdir / "card.sock", "r1")
    assert args == ["-device", "qemu-xhci,id=r1-xhci",
                    "-device", "usb-ccid,id=r1-ccid,bus=r1-xhci.0",
                    "-chardev", f"socket,id=r1,path={workdir / 'card.sock'},reconnect=1",
                    "-device", "ccid-card-passthru,chardev=r1"]
    with open_qemu_card(["cac:"], workdir) as card:
        assert card.atr == H("3B7A18000073667465206364313434")
        assert not card.connected()
        with vmc.lab.FakeQemu.connect(f"unix:{card.socket}") as qemu:  # as QEMU would
            assert qemu.wait_card(timeout=30) == card.atr
            _wait(card.connected)


def _wait(predicate: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
