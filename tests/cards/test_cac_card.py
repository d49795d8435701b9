"""The CAC card engine: vectors (GSC-IS 2.1, libcacard 2.8's answers), PIN counter, SIGN and
DECRYPT, and properties: arbitrary APDUs never raise and never leak key material.

The libcacard values cited here are what Debian's libcacard0 2.8 answers (also proven
side by side in test_cac_libcacard.py); the byte layouts are spelt out in cac.c's comments.
"""

from __future__ import annotations

import hashlib
from functools import cache

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from ccidemu.cards import open_card
from ccidemu.cards.cac import ATR, CacCard, CacState, PkiCredential
from ccidemu.cards.cac_files import demo_directory, load_directory
from ccidemu.rsa_raw import RawRsaKey
from ccidemu.tlv import simple_tlv_decode

PIN_APDU = bytes.fromhex("0020000008313233343536ffff")


@cache
def _credentials() -> tuple[PkiCredential, ...]:
    return tuple(load_directory(demo_directory()).credentials)


def _card(**state: int) -> CacCard:
    card = CacCard(_credentials(), CacState(**state))  # type: ignore[arg-type]
    card.power_on()
    return card


def _x(card: CacCard, apdu: str) -> str:
    return card.transmit(bytes.fromhex(apdu.replace(" ", ""))).hex()


def test_registry_opens_the_demo_card() -> None:
    card = open_card("cac:")
    assert card.name == "CAC (demo)"
    assert card.power_on() == ATR == bytes.fromhex("3b7a18000073667465206364313434")


@pytest.mark.parametrize(("apdu", "answer"), [
    # SELECT: the FCI template 6F { 84 AID, A5 }, announced with 61 0D (no Le: Ne = 0)
    pytest.param("00a4040007a0000000790100", "610d", id="select-pki-no-le"),
    pytest.param("00a4040007a000000079010000", "6f0b8407a0000000790100a5009000",
                 id="select-pki-le"),
    pytest.param("00a4040007a0000000790103", "6a82", id="select-pki-beyond-three"),
    pytest.param("00a4040006a00000007901", "6a82", id="select-needs-exact-aid"),
    pytest.param("00a4000002db00", "6a81", id="select-p1-00"),
    pytest.param("00a4040007a000000003000000",
                 "6f198408a000000003000000a50d9f6e061291518101009f6501ff9000",
                 id="select-gp-card-manager"),
    pytest.param("00a404000ba0000003974349445f010000",
                 "6f0f840ba0000003974349445f0100a5009000", id="select-msft"),
    # nothing selected: the card level answers 6900 (libcacard vcard7816_vm_process_apdu)
    pytest.param("8056010000", "6900", id="properties-without-applet"),
    pytest.param("00c0000000", "6a88", id="get-response-nothing-pending"),
    pytest.param("0020000000", "63c3", id="verify-state-three-tries"),
    pytest.param("0020010000", "6a00", id="verify-p1"),
    pytest.param("00a4", "6700", id="malformed"),
    pytest.param("9456010000", "6e00", id="class-94"),
    pytest.param("0c56010000", "6882", id="secure-messaging"),
])
def test_vectors_from_power_on(apdu: str, answer: str) -> None:
    assert _x(_card(), apdu) == answer


def test_pki_applet_properties_and_buffers() -> None:
    card = _card()
    cert = _credentials()[0].certificate
    assert _x(card, "00a4040007a0000000790100") == "610d"
    assert _x(card, "00c0000005") == "6f0b8407a06108"  # GET RESPONSE in parts
    assert _x(card, "00c0000000") == "0000007901" "00a500" "9000"
    # the tag buffer (GSC-IS 8.4): 2-byte length LSB first, then T and L of each item:
    # 71 CertInfo (1), 70 certificate (FF + 2-byte length LSB first), 72 MSCUID, FE EDC
    tags = bytes((0x0A, 0x00, 0x71, 0x01, 0x70, 0xFF)) + len(cert).to_bytes(2, "little") + \
        bytes.fromhex("7200fe00")
    values = (len(cert) + 1).to_bytes(2, "little") + b"\x00" + cert
    # properties: 01 applet information, 40 one object, 51 PKI object { 41 object id,
    # 42 buffer properties (SIMPLE-TLV, T and V lengths), 43 RSA-2048 (06, 2048/64), 26 }
    properties = bytes.fromhex("010510020602034001015114410201004205000c00") + \
        len(values).to_bytes(2, "little") + bytes.fromhex("43040620010126010190 00")
    assert _x(card, "8056010000") == f"6c{len(properties) - 2:02x}"  # Le too large: 6Cxx
    assert _x(card, f"80560100{len(properties) - 2:02x}") == properties.hex()
    assert _x(card, "8052000002010200") == tags[:2].hex() + "9000"
    assert _x(card, "8052000202010a0a") == tags[2:].hex() + "9000"
    data = b""
    offset = 2
    while offset < len(values):
        size = min(255, len(values) - offset)
        data += bytes.fromhex(_x(card, f"8052{offset:04x}0202{size:02x}{size:02x}"))[:-2]
        offset += size
    assert data == values[2:]
    assert _x(card, f"8052{offset:04x}020201") == "9000"  # at the end: nothing
    assert _x(card, f"8052{offset + 1:04x}020201") == "6a86"  # past the end
    assert _x(card, "0058000000") == "6985"  # UPDATE BUFFER on a PKI applet
    assert _x(card, "804c000000") == "6d00"  # GET ACR is the ACA's


def test_ccc_tag_buffer_lists_the_card_urls() -> None:
    card = _card()
    _x(card, "00a4040007a000000116db0000")
    answer = bytes.fromhex(_x(card, "8052000002010200"))
    length = int.from_bytes(answer[:2], "little")
    body = bytes.fromhex(_x(card, f"8052000202 01{length:02x}{length:02x}"))[:-2]
    tags = [body[i] for i in range(0, len(body), 2)]
    # GSC-IS 2.1 table 7-1: F0 card id, F1/F2 versions, F3 CardURLs (11 + one per PKI
    # applet, as libcacard's tests count), F4..FE
    assert tags == [0xF0, 0xF1, 0xF2] + [0xF3] * 14 + [0xF4, 0xF5, 0xF6, 0xF7, 0xFA, 0xFB,
                                                        0xFC, 0xFD, 0xFE]
    assert length == 52  # with its 2-byte length and 9000: the 54-byte answer of issue 16


def test_gp_cplc_carries_the_card_serial() -> None:
    card = _card()
    _x(card, "00a4040007a000000003000000")
    cplc = bytes.fromhex(_x(card, "80ca9f7f00"))
    serial = hashlib.sha256(_credentials()[0].certificate).digest()
    assert card.serial == serial
    assert cplc[:3] == bytes.fromhex("9f7f2a") and len(cplc) == 3 + 0x2A + 2
    assert cplc[15:21] == serial[:6]  # IC serial number and batch identifier
    assert cplc[-2:] == b"\x90\x00"
    assert _x(card, "80ca7f6800") == "6a88"  # the MSFT tag is not the card manager's
    _x(card, "00a404000ba0000003974349445f0100")
    assert _x(card, "80ca7f6800").startswith("301d02010016044d534654")  # "MSFT"


def test_aca_acr_tables() -> None:
    card = _card()
    _x(card, "00a4040007a0000000790300")
    acr = simple_tlv_decode(bytes.fromhex(_x(card, "804c000000"))[:-2])
    assert [t.tag for t in acr] == [0x01] + [0xA1] + [0xA0] * 11
    assert acr[1].value == b"\x0b"
    assert _x(card, "804c0100010f00") == "6a88"  # unknown ACRID
    assert _x(card, "804c100000") == "6100"  # 478 bytes: fetched with GET RESPONSE
    first = _x(card, "00c0000000")
    assert first.endswith("61de") and len(first) == 2 * 258
    assert _x(card, "00c0000000").endswith("9000")
    assert _x(card, "804c120002dbdb00") == "6a80"  # unknown card object id
    assert _x(card, "804c1100020000") == "6984"  # P1 11 takes a 7-byte AID
    assert _x(card, "804c300000") == "6900"


def test_pin_counter_login_and_reset() -> None:
    saved: list[int] = []
    card = CacCard(_credentials(), CacState(), on_change=lambda s: saved.append(s.pin_left))
    card.power_on()
    assert _x(card, "00200000083131313131ffffff") == "63c2"
    assert _x(card, "0020000000") == "63c2"
    assert _x(card, PIN_APDU.hex()) == "9000"
    assert _x(card, "0020000000") == "9000"
    assert saved == [2, 3]
    assert card.state.pin_left == 3
    card.power_on()  # logs out
    assert _x(card, "0020000000") == "63c3"
    assert _x(card, "00200000063132333435 36") == "9000"  # unpadded PIN works too
    assert _x(card, "0020000004 31323334") == "63c2"  # a wrong one logs out
    assert _x(card, "0020000000") == "63c2"


def test_blocked_pin() -> None:
    card = _card(pin_left=1)
    assert _x(card, "0020000008 3939393939ffffff") == "63c0"
    assert _x(card, "0020000000") == "6983"
    assert _x(card, PIN_APDU.hex()) == "6983"  # the right PIN no longer helps
    assert card.logged_in is False


def test_get_challenge() -> None:
    card = CacCard(_credentials(), rng=lambda n: bytes(range(n)))
    card.power_on()
    assert _x(card, "0084000008") == "00010203040506079000"
    assert _x(card, "0084000000") == bytes(range(256)).hex() + "9000"
    assert _x(card, "00840000") == "6700"  # no Le
    assert _x(card, "0084010008") == "6a86"
    _x(card, "00a4040007a0000000790100")  # inside a CAC applet too
    assert _x(card, "0084000004") == "000102039000"


def _block(key: rsa.RSAPublicKey, message: bytes) -> bytes:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(message)
    info = bytes.fromhex("3031300d060960864801650304020105000420") + digest.finalize()
    return b"\x00\x01" + b"\xff" * (256 - 3 - len(info)) + b"\x00" + info


@pytest.mark.parametrize("index", [0, 1, 2])
def test_sign_and_decrypt(index: int) -> None:
    credential = _credentials()[index]
    public = x509.load_der_x509_certificate(credential.certificate).public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    card = _card()
    _x(card, f"00a4040007a00000007901{index:02x}")
    block = _block(public, b"message").hex()
    assert _x(card, "8042000000 0100" + block + "0000") == "6985"  # PIN first (libcacard)
    _x(card, PIN_APDU.hex())
    # GSC-IS 5.3.3.7: P1 80 keeps the input, P1 00 completes it; 61 00 then GET RESPONSE
    assert _x(card, "8042800080" + block[:256]) == "9000"
    assert _x(card, "8042000080" + block[256:]) == "6100"
    signature = bytes.fromhex(_x(card, "00c0000000"))
    assert signature[-2:] == b"\x90\x00"
    public.verify(signature[:-2], b"message", padding.PKCS1v15(), hashes.SHA256())
    # decryption is the same raw operation: the whole PKCS#1 v1.5 type 2 block comes back
    ciphertext = public.encrypt(b"session key", padding.PKCS1v15())
    plain = bytes.fromhex(_x(card, "8042000000 0100" + ciphertext.hex() + "0000"))
    numbers = credential.key.private_numbers()
    expected = pow(int.from_bytes(ciphertext, "big"), numbers.d, public.public_numbers().n)
    assert plain[:-2] == expected.to_bytes(256, "big")
    assert plain[:2] == b"\x00\x02" and plain[-13:-2] == b"session key"
    assert _x(card, "8042000010" + block[:32]) == "6984"  # not a modulus-sized block
    assert _x(card, "8042000000 0100" + "ff" * 256) == "6984"  # not below the modulus
    assert _x(card, "8042000100") == "6a86"
    assert _x(card, "8042810000") == "6a86"


def test_ecc_keys_are_refused() -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(TypeError):
        RawRsaKey(ec_key)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1 to 10"):
        CacCard([])


def test_python_fallback_matches_openssl() -> None:
    key = _credentials()[0].key
    raw = RawRsaKey(key)
    assert raw.backend == "openssl"
    ciphertext = key.public_key().encrypt(b"x", padding.PKCS1v15())
    assert raw.private_op(ciphertext) == raw._python_op(ciphertext)


# --- properties -------------------------------------------------------------------------------


@cache
def _secret_windows() -> frozenset[bytes]:
    """Every 12-byte window of every private value of every key (d, p, q and the CRT
    values; the key files hold nothing else secret): no answer may contain one."""
    windows: set[bytes] = set()
    for credential in _credentials():
        n = credential.key.private_numbers()
        values = [n.d, n.p, n.q, n.dmp1, n.dmq1, n.iqmp]
        blobs = [v.to_bytes((v.bit_length() + 7) // 8, "big") for v in values]
        for blob in blobs:
            windows.update(blob[i:i + 12] for i in range(len(blob) - 11))
    return frozenset(windows)


def _leaks(answer: bytes) -> bool:
    secret = _secret_windows()
    return any(answer[i:i + 12] in secret for i in range(len(answer) - 11))


_AIDS = [bytes.fromhex(a) for a in (
    "a0000000790100", "a0000000790101", "a0000000790102", "a0000000790300", "a000000116db00",
    "a0000001163000", "a0000000030000", "a0000003974349445f0100", "a0000000790200")]

_READ_BUFFER = st.builds(
    lambda offset, which, size: bytes((0x80, 0x52, offset >> 8, offset & 0xFF, 2, which, size, 0)),
    st.integers(0, 800), st.sampled_from([1, 2]), st.integers(0, 255))

_COMMAND = st.one_of(
    st.binary(max_size=300),
    _READ_BUFFER,
    st.sampled_from([bytes.fromhex(a) for a in ("00c0000000", "8056010000", "8056400000",
                                                  "804c000000", "804c100000", "80ca9f7f00")]),
    st.builds(lambda aid: bytes((0, 0xA4, 4, 0, len(aid))) + aid, st.sampled_from(_AIDS)),
    st.just(PIN_APDU),
    st.builds(lambda cla, ins, p1, p2, body: bytes((cla, ins, p1, p2)) + body,
              st.sampled_from([0x00, 0x80, 0x10, 0x90]), st.integers(0, 255),
              st.integers(0, 255), st.integers(0, 255), st.binary(max_size=270)),
)


def test_no_buffer_or_table_holds_key_material() -> None:
    """Every applet's every answer a client can read (the deterministic half of the
    property below)."""
    card = _card()
    _x(card, PIN_APDU.hex())
    for applet in card.applets:
        card.transmit(bytes((0, 0xA4, 4, 0, len(applet.aid))) + applet.aid)
        for apdu in ("8056010000", "8056400000", "804c000000", "804c100000", "804c500000",
                     "80ca9f7f00", "80ca006600", "80ca7f6800"):
            assert not _leaks(card.transmit(bytes.fromhex(apdu)))
            assert not _leaks(card.transmit(bytes.fromhex("00c0000000")))
        for which in (1, 2):
            for offset in range(0, 1200, 200):
                answer = card.transmit(bytes((0x80, 0x52, offset >> 8, offset & 0xFF, 2, which,
                                              255, 0)))
                assert not _leaks(answer), (applet.aid.hex(), which, offset)


@given(st.lists(_COMMAND, max_size=30))
@settings(max_examples=300, deadline=None)
def test_arbitrary_apdus_never_raise_nor_leak_keys(commands: list[bytes]) -> None:
    card = _card()
    for command in commands:
        answer = card.transmit(command)
        assert len(answer) >= 2
        assert not _leaks(answer), command.hex()


@given(st.lists(st.sampled_from(["0020000000", "00200000083131313131ffffff",
                                  PIN_APDU.hex()]), max_size=12))
def test_pin_counter_model(steps: list[str]) -> None:
    """The counter against a model: a wrong PIN costs a try, the right one restores them,
    none is accepted once they are gone (ISO/IEC 7816-4:2013 section 11.5.6)."""
    card = _card()
    left, logged_in = 3, False
    for step in steps:
        answer = _x(card, step)
        if step == "0020000000":
            expected = "9000" if logged_in else ("6983" if left == 0 else f"63c{left}")
        elif left == 0:
            expected, logged_in = "6983", False
        elif step == PIN_APDU.hex():
            expected, left, logged_in = "9000", 3, True
        else:
            left, logged_in = left - 1, False
            expected = f"63c{left}"
        assert answer == expected, (step, steps)
        assert card.state.pin_left == left
