"""The PIV card engine against NIST SP 800-73-4 (part 1 data model, part 2 commands).

The card is built from the committed fixtures (fixtures/certs: 9A RSA-2048, 9C P-256,
9D RSA-2048 decrypt, 9E P-384).  Expected cryptographic results are computed here with
``cryptography`` from the certificates' public keys.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import event, given, settings
from hypothesis import strategies as st

from ccidemu.apdu import CommandApdu, split_chain
from ccidemu.card import Card
from ccidemu.cards.piv import (
    ATR,
    Algorithm,
    PivCard,
    PivState,
    fascn,
)
from ccidemu.cards.piv_files import CardConfig, load_directory
from ccidemu.tlv import ber_decode, ber_decode_one, ber_encode, ber_find
from tests.support import private_parts

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "certs"
PIN = b"123456".ljust(8, b"\xff")
PUK = b"12345678"
MGMT_3DES = bytes.fromhex("010203040506070801020304050607080102030405060708")


@pytest.fixture(scope="module")
def config() -> CardConfig:
    return load_directory(FIXTURES)


def _fresh(config: CardConfig, **changes: object) -> PivState:
    return replace(config.state, keys=dict(config.state.keys),
                   objects=dict(config.state.objects), **changes)  # type: ignore[arg-type]


@pytest.fixture
def card(config: CardConfig) -> PivCard:
    c = PivCard(_fresh(config), label="test")
    c.power_on()
    return c


def cert(slot: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((FIXTURES / f"{slot}.crt").read_bytes())


def send(card: PivCard, cmd: CommandApdu | str) -> tuple[bytes, int]:
    """Transmit (chaining long commands with CLA 10 like OpenSC), follow 61xx; data, SW."""
    if isinstance(cmd, str):
        links = [bytes.fromhex(cmd.replace(" ", ""))]
    else:
        links = [link.encode() for link in split_chain(cmd)]
    for link in links[:-1]:
        assert card.transmit(link) == b"\x90\x00"
    rsp = card.transmit(links[-1])
    data = rsp[:-2]
    while rsp[-2] == 0x61:
        rsp = card.transmit(bytes((0, 0xC0, 0, 0, rsp[-1])))
        data += rsp[:-2]
    return data, int.from_bytes(rsp[-2:], "big")


def verify_pin(card: PivCard, pin: bytes = PIN) -> int:
    return send(card, CommandApdu(0, 0x20, 0, 0x80, pin))[1]


def general_authenticate(card: PivCard, alg: int, slot: int, tag: int, data: bytes
                         ) -> tuple[bytes, int]:
    """SP 800-73-4 part 2 section 3.2.4: 7C { 82 00, <tag> data } -> 7C { 82 result }."""
    template = ber_encode(0x7C, ber_encode(0x82, b"") + ber_encode(tag, data))
    out, sw = send(card, CommandApdu(0, 0x87, alg, slot, template, 256))
    if sw != 0x9000:
        return b"", sw
    response = ber_find(ber_find(out, 0x7C) or b"", 0x82)
    assert response is not None
    return response, sw


# --- ATR, SELECT (part 2 section 3.1.1) ------------------------------------------------

def test_is_a_card_with_a_plain_atr(card: PivCard) -> None:
    from ccidemu.atr import parse_atr, qemu_accepts

    assert isinstance(card, Card)
    assert card.power_on() == ATR == bytes.fromhex("3b8d80018073c021c05763636964656d75f9")
    assert qemu_accepts(ATR) is None
    historical = parse_atr(ATR).historical
    assert b"Yubi" not in historical
    # ISO/IEC 7816-4 section 8.1.1: category 80, then COMPACT-TLV objects (73 card
    # capabilities: chaining and extended Lc/Le; 57 issuer's data)
    assert historical[0] == 0x80 and historical[1:5] == bytes.fromhex("73c021c0")
    assert historical[5:] == b"\x57ccidemu"


APT = (  # 61 { 4F PIX, 79 { 4F RID }, 50 label, AC { 80 alg..., 06 00 } }
    "613f" "4f06000010000100" "79074f05a000000308" "500474657374"
    "ac26" "800103" "800106" "800107" "800105" "800116" "800108" "80010a" "80010c" "800111"
    "800114" "8001e0" "8001e1" "0600"
)


@pytest.mark.parametrize(
    "apdu",
    [
        pytest.param("00a404000ba00000030800001000010000", id="full-aid"),
        pytest.param("00a4040009a0000003080000100000", id="opensc-9-bytes"),
        pytest.param("00a4040005a000000308", id="yubico-5-bytes"),
    ],
)
def test_select_answers_the_application_property_template(card: PivCard, apdu: str) -> None:
    assert send(card, apdu) == (bytes.fromhex(APT), 0x9000)


@pytest.mark.parametrize(
    ("apdu", "sw"),
    [
        pytest.param("00a4040007a0000000031010", 0x6A82, id="other-aid"),
        pytest.param("00a4040004a0000003", 0x6A82, id="too-short"),
        pytest.param("00a4000c023f00", 0x6A86, id="select-by-fid"),
    ],
)
def test_select_refusals(card: PivCard, apdu: str, sw: int) -> None:
    assert send(card, apdu)[1] == sw


@pytest.mark.parametrize("select", ["00a4040005a000000308", "00a4040009a0000003080000100000"])
def test_select_clears_pin_and_management_key_status(card: PivCard, select: str) -> None:
    """Re-SELECTing PIV starts a fresh session (as a YubiKey; see PivCard._select)."""
    h32 = os.urandom(32)
    assert verify_pin(card) == 0x9000
    assert mutual_auth(card) == 0x9000
    assert send(card, "0020008000")[1] == 0x9000  # VERIFY status: verified
    assert send(card, select)[1] == 0x9000
    assert send(card, "0020008000")[1] == 0x63C3  # not verified, 3 tries left
    assert not card.admin and not card.pin_verified
    assert send(card, "00db3fff075c035fc10d5300")[1] == 0x6982  # PUT DATA needs 9B again
    assert general_authenticate(card, Algorithm.ECCP256, 0x9C, 0x81, h32)[1] == 0x6982
    # an unknown AID leaves the status unchanged (part 2 section 3.1.1)
    assert verify_pin(card) == 0x9000
    assert mutual_auth(card) == 0x9000
    assert send(card, "00a4040007a0000000031010")[1] == 0x6A82
    assert send(card, "0020008000")[1] == 0x9000
    assert card.admin
    # a 9B witness requested before the SELECT is forgotten
    assert send(card, CommandApdu(0, 0x87, 3, 0x9B, bytes.fromhex("7c028000"), 256))[1] == 0x9000
    assert send(card, select)[1] == 0x9000
    stale = ber_encode(0x7C, ber_encode(0x80, bytes(8)) + ber_encode(0x81, bytes(8))
                       + ber_encode(0x82, b""))
    assert send(card, CommandApdu(0, 0x87, 3, 0x9B, stale, 256))[1] == 0x6982


# --- GET DATA (part 2 section 3.1.2, part 1 appendix A) ----------------------------------

def test_discovery_object_vector(card: PivCard) -> None:
    # Part 1 table 18: 7E { 4F PIV AID, 5F2F PIN usage policy 40 00 }
    assert send(card, "00cb3fff035c017e00") == (
        bytes.fromhex("7e124f0ba0000003080000100001005f2f024000"), 0x9000)


def test_fascn_encoding_vector() -> None:
    # TIG SCEPACS 6.6: agency 9999, system 9999, credential 999999, CS 0, ICI 1, PI 0...0,
    # OC 3, OI 0000, POA 1 (the common test FASC-N)
    assert fascn().hex() == "d4e739da739ced39ce739d836858210842108421c84210c3eb"


def test_chuid_and_ccc(card: PivCard) -> None:
    data, sw = send(card, "00cb3fff055c035fc10200")
    assert sw == 0x9000
    chuid = ber_find(data, 0x53)
    assert chuid is not None
    tags = [t.tag for t in ber_decode(chuid)]
    assert tags == [0x30, 0x34, 0x35, 0x3E, 0xFE]  # part 1 table 9 order
    assert ber_find(chuid, 0x30) == fascn()
    guid = ber_find(chuid, 0x34)
    assert guid is not None and len(guid) == 16
    assert ber_find(chuid, 0x3E) == b""
    data, sw = send(card, "00cb3fff055c035fc10700")
    ccc = ber_find(data, 0x53)
    assert sw == 0x9000 and ccc is not None
    assert ber_find(ccc, 0xF0, recursive=False)[:7] == bytes.fromhex("a000000116ff02")  # type: ignore[index]
    assert ber_find(ccc, 0xF5) == b"\x10"  # PIV data model


def test_key_history(card: PivCard) -> None:
    assert send(card, "00cb3fff055c035fc10c00") == (bytes.fromhex("5308c10100c20100fe00"),
                                                     0x9000)


@pytest.mark.parametrize(("slot", "tag"), [("9a", "5fc105"), ("9c", "5fc10a"),
                                           ("9d", "5fc10b"), ("9e", "5fc101")])
def test_certificate_objects(card: PivCard, slot: str, tag: str) -> None:
    # Part 1 tables 10-15: 53 { 70 DER, 71 00, FE 00 }
    from cryptography.hazmat.primitives.serialization import Encoding

    data, sw = send(card, f"00cb3fff055c03{tag}00")
    assert sw == 0x9000
    der = cert(slot).public_bytes(Encoding.DER)
    assert data == ber_encode(0x53, ber_encode(0x70, der) + bytes.fromhex("710100fe00"))


def test_certificate_read_with_small_le_then_get_response(card: PivCard) -> None:
    # OpenSC reads 8 bytes first; the rest comes with 61xx / GET RESPONSE in 256-byte pieces
    first = card.transmit(bytes.fromhex("00cb3fff055c035fc10508"))
    assert len(first) == 10 and first[:2] == b"\x53\x82" and first[-2] == 0x61
    full, sw = send(card, "00cb3fff055c035fc10500")
    assert sw == 0x9000 and full.startswith(first[:8]) and len(full) > 256


@pytest.mark.parametrize(
    ("apdu", "sw"),
    [
        pytest.param("00cb3fff055c035fc10d00", 0x6A82, id="retired-cert-absent"),
        pytest.param("00cb3fff055c035fc10600", 0x6A82, id="security-object-absent"),
        pytest.param("00cb3fff055c035fc10900", 0x6982, id="printed-info-needs-pin"),
        pytest.param("00cb3ffe055c035fc10700", 0x6A86, id="bad-p1p2"),
        pytest.param("00cb3fff025300", 0x6A80, id="no-tag-list"),
        pytest.param("00cb3fff025c00", 0x6A80, id="empty-tag-list"),
    ],
)
def test_get_data_refusals(card: PivCard, apdu: str, sw: int) -> None:
    assert send(card, apdu)[1] == sw


# --- VERIFY / CHANGE REFERENCE DATA / RESET RETRY COUNTER (part 2 sections 3.2.1-3.2.3) ---

def test_pin_counting_blocking_and_puk_unblock(card: PivCard) -> None:
    assert send(card, "0020008000")[1] == 0x63C3  # not verified, 3 tries
    assert verify_pin(card, b"000000\xff\xff") == 0x63C2
    assert verify_pin(card, b"000000\xff\xff") == 0x63C1
    assert send(card, "0020008000")[1] == 0x63C1
    assert verify_pin(card, b"000000\xff\xff") == 0x63C0
    assert verify_pin(card) == 0x6983  # blocked, even with the right PIN
    assert send(card, "0020008000")[1] == 0x6983
    # RESET RETRY COUNTER: 00 2C 00 80 PUK || new PIN; a wrong PUK counts down
    new_pin = b"654321".ljust(8, b"\xff")
    assert send(card, CommandApdu(0, 0x2C, 0, 0x80, b"87654321" + new_pin))[1] == 0x63C2
    assert send(card, CommandApdu(0, 0x2C, 0, 0x80, PUK + new_pin))[1] == 0x9000
    assert verify_pin(card) == 0x63C2
    assert verify_pin(card, new_pin) == 0x9000
    assert send(card, "0020008000")[1] == 0x9000
    assert card.state.pin_left == 3 and card.state.puk_left == 3


def test_puk_blocks_too(card: PivCard) -> None:
    bad = b"00000000" + PIN
    for left in (2, 1, 0):
        assert send(card, CommandApdu(0, 0x2C, 0, 0x80, bad))[1] == 0x63C0 | left
    assert send(card, CommandApdu(0, 0x2C, 0, 0x80, PUK + PIN))[1] == 0x6983


def test_verify_reset_with_p1_ff(card: PivCard) -> None:
    assert verify_pin(card) == 0x9000
    assert send(card, "0020008000")[1] == 0x9000
    assert send(card, "00 20 ff 80")[1] == 0x9000
    assert send(card, "0020008000")[1] == 0x63C3


def test_change_pin_and_puk(card: PivCard) -> None:
    new_pin = b"11223344"
    assert send(card, CommandApdu(0, 0x24, 0, 0x80, b"999999\xff\xff" + new_pin))[1] == 0x63C2
    assert send(card, CommandApdu(0, 0x24, 0, 0x80, PIN + new_pin))[1] == 0x9000
    assert verify_pin(card) == 0x63C2
    assert verify_pin(card, new_pin) == 0x9000
    assert card.state.pin_left == 3
    assert send(card, CommandApdu(0, 0x24, 0, 0x81, PUK + b"87654321"))[1] == 0x9000
    assert send(card, CommandApdu(0, 0x2C, 0, 0x80, PUK + PIN))[1] == 0x63C2
    assert send(card, CommandApdu(0, 0x2C, 0, 0x80, b"87654321" + PIN))[1] == 0x9000


@pytest.mark.parametrize(
    ("apdu", "sw"),
    [
        pytest.param("002000800431323334", 0x6A80, id="verify-unpadded"),
        pytest.param("0020000000", 0x6A88, id="verify-global-pin"),
        pytest.param("0024008008" + "3132333435363738", 0x6A80, id="change-short"),
        pytest.param("0024008010313233343536ffff" + "3132ffffffffffff", 0x6A80,
                     id="change-new-too-short"),
        pytest.param("002c0081103132333435363738" + "3132333435363738", 0x6A88,
                     id="rrc-not-pin"),
    ],
)
def test_reference_data_refusals(card: PivCard, apdu: str, sw: int) -> None:
    assert send(card, apdu)[1] == sw
    assert card.state.pin_left == 3 and card.state.puk_left == 3


def test_the_old_value_is_checked_before_the_new_one(card: PivCard) -> None:
    """yubikit's PIV reset blocks PIN and PUK with all-FF values (no valid new PIN): the
    card must count them as wrong tries (63Cx) rather than refuse the new value (6A80)."""
    assert send(card, "0024008010" + "ff" * 16)[1] == 0x63C2
    assert send(card, "002c008010" + "ff" * 16)[1] == 0x63C2
    assert (card.state.pin_left, card.state.puk_left) == (2, 2)


# --- GENERAL AUTHENTICATE with the slot keys (part 2 section 3.2.4) -------------------

def _pkcs1_type1(k: int, payload: bytes) -> bytes:
    """RFC 8017 section 9.2 step 5: 00 01 FF..FF 00 T."""
    return b"\x00\x01" + b"\xff" * (k - 3 - len(payload)) + b"\x00" + payload


SHA256_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


@pytest.mark.parametrize("extended", [False, True], ids=["chained", "extended"])
def test_rsa_sign_9a(card: PivCard, extended: bool) -> None:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(b"hello PIV")
    hashed = digest.finalize()
    block = _pkcs1_type1(256, SHA256_INFO + hashed)
    template = ber_encode(0x7C, ber_encode(0x82, b"") + ber_encode(0x81, block))
    assert template[:4] == bytes.fromhex("7c820106")  # long BER lengths
    assert verify_pin(card) == 0x9000
    cmd = CommandApdu(0, 0x87, Algorithm.RSA2048, 0x9A, template, 65536 if extended else 256)
    if extended:
        rsp = card.transmit(cmd.encode())
        assert rsp[-2:] == b"\x90\x00"
        out = rsp[:-2]
    else:
        out, sw = send(card, cmd)
        assert sw == 0x9000
    signature = ber_find(ber_find(out, 0x7C) or b"", 0x82)
    assert signature is not None
    public = cert("9a").public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    public.verify(signature, hashed, padding.PKCS1v15(), Prehashed(hashes.SHA256()))


def test_rsa_raw_block_without_digest_info(card: PivCard) -> None:
    # TLS 1.0 style MD5+SHA-1 (36 bytes, no DigestInfo): the slow raw path
    block = _pkcs1_type1(256, os.urandom(36))
    verify_pin(card)
    signature, sw = general_authenticate(card, Algorithm.RSA2048, 0x9A, 0x81, block)
    public = cert("9a").public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    numbers = public.public_numbers()
    assert sw == 0x9000
    assert pow(int.from_bytes(signature, "big"), numbers.e, numbers.n) == int.from_bytes(
        block, "big")


def _raw_check(card: PivCard, block: bytes) -> bytes:
    signature, sw = general_authenticate(card, Algorithm.RSA2048, 0x9A, 0x81, block)
    assert sw == 0x9000
    public = cert("9a").public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    numbers = public.public_numbers()
    assert pow(int.from_bytes(signature, "big"), numbers.e, numbers.n) == int.from_bytes(
        block, "big")
    return signature


def test_rsa_type1_blocks_are_signed_by_openssl(card: PivCard,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Any PKCS#1 v1.5 type 1 block goes to cryptography (constant-time, blinded):
    known DigestInfo (Prehashed), unknown or none (NoDigestInfo), even an empty T."""
    import ccidemu.cards.piv as piv

    assert piv._NO_DIGEST_INFO is not None  # cryptography >= 47 (pyproject.toml)

    def no_integers(_: int) -> int:
        raise AssertionError("the Python integer path was used")

    def no_raw(_: object) -> object:
        raise AssertionError("the unpadded RSA operation was used for a type 1 block")

    monkeypatch.setattr("ccidemu.rsa_raw.secrets.randbelow", no_integers)
    monkeypatch.setattr("ccidemu.rsa_raw.raw_key", no_raw)
    verify_pin(card)
    sha3 = bytes.fromhex("3031300d060960864801650304020805000420")  # SHA3-256 DigestInfo
    for payload in (SHA256_INFO + os.urandom(32), sha3 + os.urandom(32), os.urandom(36),
                    b"", os.urandom(256 - 11)):
        _raw_check(card, _pkcs1_type1(256, payload))


def test_rsa_raw_blocks_use_the_blinded_integer_path(card: PivCard) -> None:
    """Blocks that are not type 1 (host PSS, raw): block^d mod n; at or above n: 6A80."""
    verify_pin(card)
    for block in (b"\x00" + os.urandom(255), b"\x00\x01\xff\x00" + os.urandom(252),
                  b"\x00\x02" + os.urandom(254), bytes(256), bytes(255) + b"\x01"):
        _raw_check(card, block)
    public = cert("9a").public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    n = public.public_numbers().n
    for too_big in (n, n + 1, (1 << 2048) - 1):
        assert general_authenticate(card, Algorithm.RSA2048, 0x9A, 0x81,
                                    too_big.to_bytes(256, "big"))[1] == 0x6A80


def test_rsa_decrypt_9d(card: PivCard) -> None:
    public = cert("9d").public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    secret = os.urandom(32)
    ciphertext = public.encrypt(secret, padding.PKCS1v15())
    assert general_authenticate(card, Algorithm.RSA2048, 0x9D, 0x81, ciphertext)[1] == 0x6982
    verify_pin(card)
    block, sw = general_authenticate(card, Algorithm.RSA2048, 0x9D, 0x81, ciphertext)
    assert sw == 0x9000
    # RFC 8017 section 7.2.2: EM = 00 02 PS 00 M
    assert block[:2] == b"\x00\x02" and block[-33:] == b"\x00" + secret


@pytest.mark.parametrize(("slot", "alg", "size", "algorithm"), [
    (0x9C, Algorithm.ECCP256, 32, hashes.SHA256()),
    (0x9E, Algorithm.ECCP384, 48, hashes.SHA384()),
])
def test_ecdsa_sign(card: PivCard, slot: int, alg: int, size: int,
                    algorithm: hashes.HashAlgorithm) -> None:
    verify_pin(card)
    digest = hashes.Hash(algorithm)
    digest.update(b"message")
    hashed = digest.finalize()
    assert len(hashed) == size
    signature, sw = general_authenticate(card, alg, slot, 0x81, hashed)
    assert sw == 0x9000
    public = cert(f"{slot:02x}").public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(signature, hashed, ec.ECDSA(Prehashed(algorithm)))


def test_ecdsa_shorter_hash_is_left_padded(card: PivCard) -> None:
    hashed = os.urandom(20)  # SHA-1 size on a P-384 key
    signature, sw = general_authenticate(card, Algorithm.ECCP384, 0x9E, 0x81, hashed)
    assert sw == 0x9000
    public = cert("9e").public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(signature, hashed.rjust(48, b"\x00"), ec.ECDSA(Prehashed(hashes.SHA384())))


@pytest.mark.parametrize(("slot", "alg", "curve"), [
    (0x9C, Algorithm.ECCP256, ec.SECP256R1()),
    (0x9E, Algorithm.ECCP384, ec.SECP384R1()),
])
def test_ecdh_matches_the_host(config: CardConfig, card: PivCard, slot: int, alg: int,
                               curve: ec.EllipticCurve) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    peer = ec.generate_private_key(curve)
    point = peer.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    verify_pin(card)
    shared, sw = general_authenticate(card, alg, slot, 0x85, point)
    assert sw == 0x9000
    card_public = cert(f"{slot:02x}").public_key()
    assert isinstance(card_public, ec.EllipticCurvePublicKey)
    assert shared == peer.exchange(ec.ECDH(), card_public)
    assert general_authenticate(card, alg, slot, 0x85, b"\x04" + b"\x01" * (len(point) - 1)
                                )[1] in (0x6A80, 0x6982)


def test_security_conditions(card: PivCard) -> None:
    """Part 1 table 4b: 9A/9D PIN, 9C PIN always, 9E always."""
    h32, h48 = os.urandom(32), os.urandom(48)
    block = _pkcs1_type1(256, SHA256_INFO + h32)
    assert general_authenticate(card, Algorithm.ECCP384, 0x9E, 0x81, h48)[1] == 0x9000
    assert general_authenticate(card, Algorithm.RSA2048, 0x9A, 0x81, block)[1] == 0x6982
    assert general_authenticate(card, Algorithm.ECCP256, 0x9C, 0x81, h32)[1] == 0x6982
    assert verify_pin(card) == 0x9000
    assert general_authenticate(card, Algorithm.ECCP256, 0x9C, 0x81, h32)[1] == 0x9000
    # PIN always: consumed by the one 9C operation
    assert general_authenticate(card, Algorithm.ECCP256, 0x9C, 0x81, h32)[1] == 0x6982
    assert general_authenticate(card, Algorithm.RSA2048, 0x9A, 0x81, block)[1] == 0x9000
    assert general_authenticate(card, Algorithm.RSA2048, 0x9A, 0x81, block)[1] == 0x9000
    assert verify_pin(card) == 0x9000
    assert general_authenticate(card, Algorithm.ECCP256, 0x9C, 0x81, h32)[1] == 0x9000
    card.power_off()
    card.power_on()
    assert general_authenticate(card, Algorithm.RSA2048, 0x9A, 0x81, block)[1] == 0x6982


@pytest.mark.parametrize(
    ("apdu", "sw"),
    [
        pytest.param("0087119a047c028200", 0x6A86, id="alg-mismatch"),
        pytest.param("00871182047c028200", 0x6A88, id="empty-slot"),
        pytest.param("00871491047c028200", 0x6A88, id="not-a-key"),
        pytest.param("0087149e037c0182", 0x6A80, id="bad-tlv"),
        pytest.param("0087149e047c028100", 0x6A80, id="no-82"),
        pytest.param("0087149e067c0282008100", 0x6A80, id="trailing-garbage"),
    ],
)
def test_general_authenticate_refusals(card: PivCard, apdu: str, sw: int) -> None:
    assert send(card, apdu)[1] == sw


def _signature_value(out: bytes) -> bytes | None:
    return ber_find(ber_find(out, 0x7C) or b"", 0x82) if out else None


@settings(max_examples=150, deadline=None)
@given(
    target=st.sampled_from([  # (slot, algorithm): the fixture keys, then mismatches
        (0x9A, Algorithm.RSA2048), (0x9C, Algorithm.ECCP256), (0x9D, Algorithm.RSA2048),
        (0x9E, Algorithm.ECCP384), (0x9A, Algorithm.ECCP256), (0x82, Algorithm.RSA2048),
        (0x9B, Algorithm.TDES), (0x80, Algorithm.RSA2048)]),
    challenge=st.one_of(
        st.binary(min_size=1, max_size=300),  # EC: any length; 120-130 cross 7C 7F/81 80
        st.binary(min_size=32, max_size=32).map(
            lambda h: _pkcs1_type1(256, SHA256_INFO + h)),  # RSA fast (DigestInfo) path
        st.binary(min_size=255, max_size=255).map(lambda b: b"\x00" + b),  # raw RSA
        st.just(b"")),
    pin=st.booleans() | st.just(True),
)
def test_signing_fast_path_matches_the_general_template(
        config: CardConfig, target: tuple[int, int], challenge: bytes, pin: bool) -> None:
    """7C {82 00, 81 c} (the recognised fast form) and 7C {81 c, 82 00} (decoded in full)
    give the same status word, the same state and, RSA being deterministic, the same
    bytes; ECDSA signatures are checked against the certificate."""
    cards = [PivCard(_fresh(config)) for _ in range(2)]
    templates = [ber_encode(0x7C, ber_encode(0x82, b"") + ber_encode(0x81, challenge)),
                 ber_encode(0x7C, ber_encode(0x81, challenge) + ber_encode(0x82, b""))]
    slot, alg = target
    results = []
    for card, template in zip(cards, templates, strict=True):
        card.power_on()
        if pin:
            assert verify_pin(card) == 0x9000
        out, sw = send(card, CommandApdu(0, 0x87, alg, slot, template, 65536, extended=True))
        results.append((out, sw, card.pin_verified, card.pin_always))
    (fast, sw, *flags), (slow, sw2, *flags2) = results
    event(f"SW {sw:04X}")
    assert (sw, flags) == (sw2, flags2)
    if sw != 0x9000:
        return
    value = _signature_value(fast)
    assert value is not None and _signature_value(slow) is not None
    assert fast == ber_encode(0x7C, ber_encode(0x82, value))
    public = cert(f"{slot:02x}").public_key()
    if isinstance(public, rsa.RSAPublicKey):
        assert fast == slow
    else:
        assert isinstance(public, ec.EllipticCurvePublicKey)
        size = (public.curve.key_size + 7) // 8
        fitted = challenge[:size].rjust(size, b"\x00")
        hash_ = hashes.SHA256() if size == 32 else hashes.SHA384()
        for out in (fast, slow):
            public.verify(_signature_value(out) or b"", fitted, ec.ECDSA(Prehashed(hash_)))


# --- card management key 9B (part 2 appendix A.1; SP 800-78-4 table 6-2) ------------

def _ecb(alg: int, key: bytes, data: bytes, decrypt: bool = False) -> bytes:
    cipher = Cipher(TripleDES(key) if alg in (0, 3) else algorithms.AES(key), modes.ECB())
    ctx = cipher.decryptor() if decrypt else cipher.encryptor()
    return ctx.update(data) + ctx.finalize()


def mutual_auth(card: PivCard, alg: int = 3, key: bytes = MGMT_3DES) -> int:
    """yubico-piv-tool's flow: {80 00} -> {80 E(W)}; {80 W, 81 C} -> {82 E(C)}."""
    out, sw = send(card, CommandApdu(0, 0x87, alg, 0x9B, bytes.fromhex("7c028000"), 256))
    if sw != 0x9000:
        return sw
    witness = _ecb(alg, key, ber_find(ber_find(out, 0x7C) or b"", 0x80) or b"", decrypt=True)
    challenge = os.urandom(len(witness))
    body = ber_encode(0x7C, ber_encode(0x80, witness) + ber_encode(0x81, challenge)
                      + ber_encode(0x82, b""))
    out, sw = send(card, CommandApdu(0, 0x87, alg, 0x9B, body, 256))
    if sw == 0x9000:
        assert ber_find(ber_find(out, 0x7C) or b"", 0x82) == _ecb(alg, key, challenge)
    return sw


def external_auth(card: PivCard, alg: int = 3, key: bytes = MGMT_3DES) -> int:
    """OpenSC piv-tool's flow: {81 00} -> {81 C}; {82 E(C)} -> 9000."""
    out, sw = send(card, CommandApdu(0, 0x87, alg, 0x9B, bytes.fromhex("7c028100"), 256))
    if sw != 0x9000:
        return sw
    challenge = ber_find(ber_find(out, 0x7C) or b"", 0x81) or b""
    body = ber_encode(0x7C, ber_encode(0x82, _ecb(alg, key, challenge)))
    return send(card, CommandApdu(0, 0x87, alg, 0x9B, body))[1]


MGMT_KEYS = [
    pytest.param(Algorithm.TDES, MGMT_3DES, id="3des"),
    pytest.param(Algorithm.AES128, bytes(range(16)), id="aes128"),
    pytest.param(Algorithm.AES192, bytes(range(24)), id="aes192"),
    pytest.param(Algorithm.AES256, bytes(range(32)), id="aes256"),
]


@pytest.mark.parametrize(("alg", "key"), MGMT_KEYS)
@pytest.mark.parametrize("flow", [mutual_auth, external_auth], ids=["mutual", "external"])
def test_management_key_authentication(config: CardConfig, alg: int, key: bytes,
                                       flow: Callable[..., int]) -> None:
    card = PivCard(_fresh(config, management_key=key, management_algorithm=alg))
    assert not card.admin
    assert flow(card, alg, bytes(len(key))) == 0x6982  # wrong key
    assert not card.admin
    assert flow(card, alg, key) == 0x9000
    assert card.admin


def test_management_key_3des_alg_00(card: PivCard) -> None:
    assert mutual_auth(card, 0x00) == 0x9000
    assert card.admin


def test_management_response_without_challenge_is_refused(card: PivCard) -> None:
    body = ber_encode(0x7C, ber_encode(0x82, bytes(8)))
    assert send(card, CommandApdu(0, 0x87, 3, 0x9B, body))[1] == 0x6982
    assert send(card, "0087089b047c028000")[1] == 0x6A86  # AES on a 3DES key


# --- GENERATE ASYMMETRIC KEY PAIR, PUT DATA (part 2 sections 3.3.2, 3.3.3) ------------

@pytest.mark.parametrize(("alg", "slot"), [(Algorithm.ECCP256, 0x9A), (Algorithm.ECCP384, 0x9D),
                                           (Algorithm.RSA2048, 0x9E), (Algorithm.RSA1024, 0x82)])
def test_generate_then_sign(card: PivCard, alg: int, slot: int) -> None:
    generate = CommandApdu(0, 0x47, 0, slot, bytes.fromhex(f"ac038001{alg:02x}"), 256)
    assert send(card, generate)[1] == 0x6982  # management key first
    assert mutual_auth(card) == 0x9000
    changes: list[PivState] = []
    card._on_change = changes.append  # the persistence hook sees the new key
    out, sw = send(card, generate)
    assert sw == 0x9000 and changes
    tlv, end = ber_decode_one(out)
    assert tlv.tag == 0x7F49 and end == len(out)
    verify_pin(card)
    digest = os.urandom(32)
    if alg in (Algorithm.ECCP256, Algorithm.ECCP384):
        point = ber_find(tlv.value, 0x86)
        assert point is not None
        curve = ec.SECP256R1() if alg == Algorithm.ECCP256 else ec.SECP384R1()
        public = ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
        signature, sw = general_authenticate(card, alg, slot, 0x81, digest.rjust(
            curve.key_size // 8, b"\x00"))
        assert sw == 0x9000
        public.verify(signature, digest.rjust(curve.key_size // 8, b"\x00"),
                      ec.ECDSA(Prehashed(hashes.SHA256() if curve.key_size == 256
                                         else hashes.SHA384())))
    else:
        n = int.from_bytes(ber_find(tlv.value, 0x81) or b"", "big")
        e = int.from_bytes(ber_find(tlv.value, 0x82) or b"", "big")
        k = (n.bit_length() + 7) // 8
        block = _pkcs1_type1(k, SHA256_INFO + digest)
        signature, sw = general_authenticate(card, alg, slot, 0x81, block)
        assert sw == 0x9000
        assert pow(int.from_bytes(signature, "big"), e, n) == int.from_bytes(block, "big")


def test_generate_refusals(card: PivCard) -> None:
    assert mutual_auth(card) == 0x9000
    assert send(card, "0047009a05ac03800199")[1] == 0x6A80  # unknown algorithm
    assert send(card, "0047009b05ac03800111")[1] == 0x6A86  # not an asymmetric slot
    assert send(card, "0047009a03aa0100")[1] == 0x6A80  # no AC template


def test_put_data_certificate_with_chaining(card: PivCard) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding

    der = cert("9a").public_bytes(Encoding.DER)
    obj = ber_encode(0x53, ber_encode(0x70, der) + bytes.fromhex("710100fe00"))
    put = CommandApdu(0, 0xDB, 0x3F, 0xFF, bytes.fromhex("5c035fc10d") + obj)
    assert len(put.data) > 255  # sent as a CLA 10 chain by send()
    assert send(card, put)[1] == 0x6982
    assert send(card, "00cb3fff055c035fc10d00")[1] == 0x6A82
    assert external_auth(card) == 0x9000
    assert send(card, put)[1] == 0x9000
    assert send(card, "00cb3fff055c035fc10d00") == (obj, 0x9000)
    # an empty 53 deletes the object
    assert send(card, "00db3fff075c035fc10d5300")[1] == 0x9000
    assert send(card, "00cb3fff055c035fc10d00")[1] == 0x6A82
    assert send(card, "00db3fff075c035fc0015300")[1] == 0x6A80  # not a PIV object
    assert send(card, "00db3fff075c035fc1025400")[1] == 0x6A80  # not a 53 object


def test_put_data_of_retired_certificates_updates_key_history(card: PivCard) -> None:
    """Part 1 table 19: C1 = retired keys with their certificate on the card."""
    def key_history() -> bytes:
        data, sw = send(card, "00cb3fff055c035fc10c00")
        assert sw == 0x9000
        return data

    def put(tag: str, obj: bytes) -> None:
        assert send(card, CommandApdu(0, 0xDB, 0x3F, 0xFF, bytes.fromhex("5c03" + tag) + obj)
                    )[1] == 0x9000

    cert_obj = bytes.fromhex("530a" "7003300100" "710100" "fe00")
    assert key_history() == bytes.fromhex("5308c10100c20100fe00")
    assert external_auth(card) == 0x9000
    put("5fc10d", cert_obj)  # slot 82
    put("5fc120", cert_obj)  # slot 95
    assert key_history() == bytes.fromhex("5308c10102c20100fe00")
    put("5fc105", cert_obj)  # 9A is not a retired slot
    assert key_history() == bytes.fromhex("5308c10102c20100fe00")
    put("5fc10d", bytes.fromhex("5300"))  # deleted
    assert key_history() == bytes.fromhex("5308c10101c20100fe00")
    # the issuer's own C2 and off-card URL (F3) are kept
    put("5fc10c", bytes.fromhex("5310" "c10100" "c20105" "f306" + b"http:/".hex() + "fe00"))
    put("5fc10e", cert_obj)
    assert key_history() == bytes.fromhex("5310" "c10102" "c20105" "f306" + b"http:/".hex()
                                          + "fe00")


def test_set_management_key_yubikey_extension(card: PivCard) -> None:
    new = bytes(range(1, 33))
    apdu = CommandApdu(0, 0xFF, 0xFF, 0xFF, bytes((0x0C, 0x9B, 32)) + new)
    assert send(card, apdu)[1] == 0x6982
    assert mutual_auth(card) == 0x9000
    assert send(card, apdu)[1] == 0x9000
    card.power_on()
    assert mutual_auth(card, 0x0C, new) == 0x9000


# --- robustness: arbitrary APDUs ----------------------------------------------------

def _secrets(state: PivState) -> list[bytes]:
    out = [state.management_key]
    for key in state.keys.values():
        out += private_parts(key)
    return out


APDU_HEADERS = st.tuples(
    st.sampled_from([0x00, 0x10, 0x80, 0x0C, 0xFF]),
    st.sampled_from([0xA4, 0xCB, 0xDB, 0x20, 0x24, 0x2C, 0x87, 0x47, 0xFF, 0xC0, 0xFD, 0x00]),
    st.sampled_from([0x00, 0x03, 0x07, 0x11, 0x14, 0x3F, 0xFF, 0x04]),
    st.sampled_from([0x00, 0x80, 0x81, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0xFF, 0x82]),
)


def _apdus() -> st.SearchStrategy[bytes]:
    structured = st.builds(
        lambda h, body: bytes(h) + body,
        APDU_HEADERS,
        st.one_of(
            st.binary(max_size=40),
            st.binary(min_size=1, max_size=200).map(lambda d: bytes((len(d),)) + d),
            st.binary(max_size=60).map(
                lambda d: bytes((len(d) + 2,)) + ber_encode(0x7C, d)[:len(d) + 2]),
        ),
    )
    return st.one_of(structured, st.binary(max_size=64))


@settings(max_examples=200, deadline=None)
@given(st.lists(_apdus(), min_size=1, max_size=8), st.booleans())
def test_arbitrary_apdus_never_raise_nor_leak(config: CardConfig, apdus: list[bytes],
                                              unlocked: bool) -> None:
    card = PivCard(_fresh(config))
    card.power_on()
    if unlocked:  # reach the PIN and admin code paths too (no 47: key generation is slow)
        assert verify_pin(card) == 0x9000
        assert mutual_auth(card) == 0x9000
        apdus = [a for a in apdus if len(a) < 2 or a[1] != 0x47]
    secrets = _secrets(card.state)
    for apdu in apdus:
        rsp = card.transmit(apdu)
        assert isinstance(rsp, bytes) and len(rsp) >= 2
        assert not any(s in rsp for s in secrets)
