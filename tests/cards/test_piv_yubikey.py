"""The Yubico PIV extensions of the PIV card, byte for byte and through yubikit.

Vectors follow Yubico's public documentation (developers.yubico.com "PIV / Yubico
extensions"; docs.yubico.com "Get metadata", "PIV attestation OID arc") and what yubikit
5.x (``yubikit/piv.py``, Yubico's own client library, a real peer here) sends and parses:
``PivSession(CardConnection(card))`` drives the card object in this process.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, x25519
from yubikit.core.smartcard import ApduError
from yubikit.piv import (
    DEFAULT_MANAGEMENT_KEY,
    KEY_TYPE,
    MANAGEMENT_KEY_TYPE,
    PIN_POLICY,
    SLOT,
    TOUCH_POLICY,
    PivSession,
)
from yubikit.support import read_info

from ccidemu.apdu import CommandApdu
from ccidemu.cards.piv import (
    KeyRef,
    ObjectTag,
    PivCard,
    PivState,
    TouchPolicy,
    TouchRequest,
)
from ccidemu.cards.piv_attest import OID_FIRMWARE, OID_FORM_FACTOR, OID_POLICY, OID_SERIAL
from ccidemu.cards.piv_files import CardConfig, load_directory
from ccidemu.cards.yubikey import (
    YUBIKEY5_NFC_ATR,
    FormFactor,
    Identity,
    Kind,
)
from vmc.lab.yubikit import CardConnection

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "certs"
MGMT = DEFAULT_MANAGEMENT_KEY
IDENTITY = Identity(serial=12345678, form_factor=FormFactor.USB_C_KEYCHAIN)


@pytest.fixture(scope="module")
def config() -> CardConfig:
    return load_directory(FIXTURES)


def _state(config: CardConfig) -> PivState:
    return replace(config.state, keys=dict(config.state.keys),
                   objects=dict(config.state.objects), policies=dict(config.state.policies))


def make_card(config: CardConfig, identity: Identity = IDENTITY, **kwargs: object) -> PivCard:
    card = PivCard(_state(config), identity=identity, **kwargs)  # type: ignore[arg-type]
    card.power_on()
    return card


def session(card: PivCard) -> PivSession:
    return PivSession(CardConnection(card))


def tx(card: PivCard, apdu: str | CommandApdu) -> tuple[bytes, int]:
    raw = apdu.encode() if isinstance(apdu, CommandApdu) else bytes.fromhex(apdu)
    rsp = card.transmit(raw)
    data = rsp[:-2]
    while rsp[-2] == 0x61:
        rsp = card.transmit(bytes((0, 0xC0, 0, 0, rsp[-1])))
        data += rsp[:-2]
    return data, int.from_bytes(rsp[-2:], "big")


SELECT = "00a4040005a000000308"


# --- GET VERSION, GET SERIAL, GET METADATA ---------------------------------------------


def test_version_and_serial(config: CardConfig) -> None:
    card = make_card(config)
    assert tx(card, "00fd0000") == (bytes.fromhex("050701"), 0x9000)
    assert tx(card, "00f80000") == ((12345678).to_bytes(4, "big"), 0x9000)
    assert tx(card, "00fd0100")[1] == 0x6A86
    s = session(card)
    assert s.version == (5, 7, 1) and s.get_serial() == 12345678


@pytest.mark.parametrize(("version", "ins_missing"), [
    ((4, 2, 0), ["f8", "f7", "f9", "f6"]),   # no serial, metadata, attestation, move
    ((4, 3, 5), ["f8", "f7", "f6"]),
    ((5, 2, 7), ["f7", "f6"]),
    ((5, 4, 3), ["f6"]),
    ((5, 7, 1), []),
])
def test_firmware_version_gates_the_instructions(config: CardConfig, version: tuple[int, int, int],
                                                 ins_missing: list[str]) -> None:
    card = make_card(config, Identity(version=version, serial=1))
    for ins in ("f8", "f7", "f9", "f6"):
        sw = tx(card, f"00{ins}{'9a' if ins == 'f9' else '00'}{'9a' if ins != 'f9' else '00'}")[1]
        assert (sw == 0x6D00) == (ins in ins_missing), (ins, hex(sw))


def test_metadata_of_pin_puk_and_management_key(config: CardConfig) -> None:
    """docs.yubico.com "Get metadata": 80/81 answer 01 05 06, 9B 01 02 05."""
    card = make_card(config)
    assert tx(card, "00f70080") == (bytes.fromhex("0101ff" "050101" "06020303"), 0x9000)
    assert tx(card, "00f70081") == (bytes.fromhex("0101ff" "050101" "06020303"), 0x9000)
    assert tx(card, "00f7009b") == (bytes.fromhex("010103" "02020001" "050101"), 0x9000)
    assert tx(card, "0020008008" + b"000000\xff\xff".hex())[1] == 0x63C2
    assert tx(card, "00f70080")[0] == bytes.fromhex("0101ff" "050101" "06020302")
    assert tx(card, "00f70096")[1] == 0x6A88  # no fingerprint sensor (yubikit's bio probe)
    assert tx(card, "00f70082")[1] == 0x6A88  # empty slot
    assert tx(card, "00f7019a")[1] == 0x6A86


def test_metadata_of_a_key_slot(config: CardConfig) -> None:
    card = make_card(config)
    data, sw = tx(card, "00f7009a")
    public = config.state.keys[0x9A].public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    n = public.public_numbers().n.to_bytes(256, "big")
    assert sw == 0x9000
    assert data == (bytes.fromhex("010107" "02020201" "030102" "04820109" "81820100") + n
                    + bytes.fromhex("8203010001"))


# --- keys through yubikit: every algorithm, generated and imported -------------------


def _check_key_use(s: PivSession, slot: SLOT, key_type: KEY_TYPE, public: object) -> None:
    """Sign (and decrypt / agree) with the key in ``slot``; verify on the host."""
    message = b"ccidemu yubikit " + bytes(key_type.name, "ascii")
    if isinstance(public, rsa.RSAPublicKey):
        large = public.key_size > 2048  # PKCS#1 v1.5 only: the integer path is slow there
        pss = padding.PSS(padding.MGF1(hashes.SHA256()), 32)
        for pad in (padding.PKCS1v15(),) + (() if large else (pss,)):
            signature = s.sign(slot, key_type, message, hashes.SHA256(), pad)
            public.verify(signature, message, pad, hashes.SHA256())
        oaep = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)
        for enc in (padding.PKCS1v15(),) + (() if large else (oaep,)):
            secret = os.urandom(32)
            assert s.decrypt(slot, public.encrypt(secret, enc), enc) == secret
    elif isinstance(public, ec.EllipticCurvePublicKey):
        hash_ = hashes.SHA256() if public.curve.key_size == 256 else hashes.SHA384()
        signature = s.sign(slot, key_type, message, hash_)
        public.verify(signature, message, ec.ECDSA(hash_))
        peer = ec.generate_private_key(public.curve)
        assert s.calculate_secret(slot, peer.public_key()) == peer.exchange(ec.ECDH(), public)
    elif isinstance(public, ed25519.Ed25519PublicKey):
        public.verify(s.sign(slot, key_type, message, None), message)
    else:
        assert isinstance(public, x25519.X25519PublicKey)
        x_peer = x25519.X25519PrivateKey.generate()
        assert s.calculate_secret(slot, x_peer.public_key()) == x_peer.exchange(public)


_KEY_TYPES = [KEY_TYPE.RSA1024, KEY_TYPE.RSA2048, KEY_TYPE.RSA3072, KEY_TYPE.RSA4096,
              KEY_TYPE.ECCP256, KEY_TYPE.ECCP384, KEY_TYPE.ED25519, KEY_TYPE.X25519]
_HOST_KEYS: dict[KEY_TYPE, object] = {}


def _host_key(key_type: KEY_TYPE) -> object:
    if key_type not in _HOST_KEYS:
        if key_type.algorithm == "rsa":
            _HOST_KEYS[key_type] = rsa.generate_private_key(65537, key_type.bit_len)
        elif key_type == KEY_TYPE.ECCP256:
            _HOST_KEYS[key_type] = ec.generate_private_key(ec.SECP256R1())
        elif key_type == KEY_TYPE.ECCP384:
            _HOST_KEYS[key_type] = ec.generate_private_key(ec.SECP384R1())
        elif key_type == KEY_TYPE.ED25519:
            _HOST_KEYS[key_type] = ed25519.Ed25519PrivateKey.generate()
        else:
            _HOST_KEYS[key_type] = x25519.X25519PrivateKey.generate()
    return _HOST_KEYS[key_type]


@pytest.mark.parametrize("key_type", _KEY_TYPES, ids=str)
def test_imported_keys_sign_decrypt_and_agree(config: CardConfig, key_type: KEY_TYPE) -> None:
    card = make_card(config)
    s = session(card)
    s.authenticate(MGMT)
    key = _host_key(key_type)
    assert s.put_key(SLOT.RETIRED5, key, PIN_POLICY.ONCE) == key_type  # type: ignore[arg-type]
    meta = s.get_slot_metadata(SLOT.RETIRED5)
    assert (meta.key_type, meta.pin_policy, meta.touch_policy, meta.generated) == (
        key_type, PIN_POLICY.ONCE, TOUCH_POLICY.NEVER, False)
    public = key.public_key()  # type: ignore[attr-defined]
    with pytest.raises(ApduError) as refused:  # PIN policy once: no VERIFY yet
        s.sign(SLOT.RETIRED5, key_type, b"x", None if key_type.name.endswith("25519")
               else hashes.SHA256(), padding.PKCS1v15())
    assert refused.value.sw in (0x6982, 0x6A86)  # X25519 cannot sign at all
    s.verify_pin("123456")
    _check_key_use(s, SLOT.RETIRED5, key_type, public)


@pytest.mark.parametrize("key_type", [KEY_TYPE.RSA2048, KEY_TYPE.ECCP256, KEY_TYPE.ECCP384,
                                      KEY_TYPE.ED25519, KEY_TYPE.X25519], ids=str)
def test_generated_keys_with_pin_policy_never(config: CardConfig, key_type: KEY_TYPE) -> None:
    """The bug of issue 12: a GENERATE with PIN policy "never" was accepted and ignored."""
    card = make_card(config)
    s = session(card)
    s.authenticate(MGMT)
    public = s.generate_key(SLOT.AUTHENTICATION, key_type, PIN_POLICY.NEVER)
    assert s.get_slot_metadata(SLOT.AUTHENTICATION).pin_policy == PIN_POLICY.NEVER
    card.power_on()  # a new session: no PIN, no management key
    _check_key_use(session(card), SLOT.AUTHENTICATION, key_type, public)


def test_pin_policy_always_needs_a_verify_before_each_use(config: CardConfig) -> None:
    card = make_card(config)
    s = session(card)
    s.authenticate(MGMT)
    public = s.generate_key(SLOT.KEY_MANAGEMENT, KEY_TYPE.ECCP256, PIN_POLICY.ALWAYS)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    for _ in range(2):
        s.verify_pin("123456")
        signature = s.sign(SLOT.KEY_MANAGEMENT, KEY_TYPE.ECCP256, b"m", hashes.SHA256())
        public.verify(signature, b"m", ec.ECDSA(hashes.SHA256()))
        with pytest.raises(ApduError) as refused:
            s.sign(SLOT.KEY_MANAGEMENT, KEY_TYPE.ECCP256, b"m", hashes.SHA256())
        assert refused.value.sw == 0x6982


def test_policies_default_per_slot(config: CardConfig) -> None:
    """SP 800-73-4 part 1 table 4b as YubiKeys resolve DEFAULT: 9C always, 9E never."""
    s = session(make_card(config))
    s.authenticate(MGMT)
    expected = {SLOT.AUTHENTICATION: PIN_POLICY.ONCE, SLOT.SIGNATURE: PIN_POLICY.ALWAYS,
                SLOT.KEY_MANAGEMENT: PIN_POLICY.ONCE, SLOT.CARD_AUTH: PIN_POLICY.NEVER,
                SLOT.RETIRED20: PIN_POLICY.ONCE}
    for slot, pin_policy in expected.items():
        s.generate_key(slot, KEY_TYPE.ECCP256)
        meta = s.get_slot_metadata(slot)
        assert (meta.pin_policy, meta.touch_policy, meta.generated) == (
            pin_policy, TOUCH_POLICY.NEVER, True)


def test_generate_and_import_refusals(config: CardConfig) -> None:
    card = make_card(config, Identity(version=(5, 4, 3), serial=1))
    s = session(card)
    assert tx(card, "0047009a05ac03800111")[1] == 0x6982  # management key first
    s.authenticate(MGMT)
    assert tx(card, "0047009a05ac03800116")[1] == 0x6A80  # RSA-4096 needs 5.7
    assert tx(card, "0047009a05ac038001e0")[1] == 0x6A80  # Ed25519 needs 5.7
    assert tx(card, "0047009a08ac06800111aa0104")[1] == 0x6A80  # match policy: no sensor
    assert tx(card, "0047009a08ac06800111ab0104")[1] == 0x6A80  # unknown touch policy
    assert tx(card, "0047009a0bac09800111aa0101aa0102")[1] == 0x6A80  # repeated AA
    assert tx(card, "00fe1182" "2206" "20" + "00" * 32)[1] == 0x6A80  # scalar 0
    assert tx(card, "00fe1182" "2306" "21" + "01" * 33)[1] == 0x6A80  # too long
    assert tx(card, "00fe1182" "2206" "20" + "ff" * 32)[1] == 0x6A80  # >= the group order
    assert tx(card, "00fee082" "2207" "20" + "01" * 32)[1] == 0x6A80  # Ed25519 needs 5.7
    assert tx(card, "00fe119b" "2206" "20" + "01" * 32)[1] == 0x6A86  # not a key slot
    key = rsa.generate_private_key(65537, 1024).private_numbers()
    parts = [key.p, key.q, key.dmp1, key.dmq1, key.iqmp]
    good = b"".join(bytes((i + 1, 64)) + v.to_bytes(64, "big") for i, v in enumerate(parts))
    bad = good[:-1] + bytes(((good[-1] + 1) & 0xFF,))  # qInv off by one
    assert tx(card, CommandApdu(0, 0xFE, 0x06, 0x82, bad))[1] == 0x6A80
    assert tx(card, CommandApdu(0, 0xFE, 0x07, 0x82, good))[1] == 0x6A80  # not RSA-2048
    assert tx(card, CommandApdu(0, 0xFE, 0x06, 0x82, good))[1] == 0x9000
    assert tx(card, CommandApdu(0, 0xFE, 0x06, 0x82, good[: -66]))[1] == 0x6A80  # no qInv


# --- touch ---------------------------------------------------------------------------


def test_touch_policy_asks_the_sensor(config: CardConfig) -> None:
    requests: list[TouchRequest] = []
    answer = [True]

    def sensor(request: TouchRequest) -> bool:
        requests.append(request)
        return answer[0]

    card = make_card(config, touch=sensor)
    s = session(card)
    s.authenticate(MGMT)
    public = s.generate_key(SLOT.RETIRED1, KEY_TYPE.ECCP256, PIN_POLICY.NEVER,
                            TOUCH_POLICY.ALWAYS)
    s.generate_key(SLOT.RETIRED2, KEY_TYPE.ECCP256, PIN_POLICY.NEVER, TOUCH_POLICY.CACHED)
    assert requests == []  # generating needs no touch
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(s.sign(SLOT.RETIRED1, KEY_TYPE.ECCP256, b"t", hashes.SHA256()), b"t",
                  ec.ECDSA(hashes.SHA256()))
    s.sign(SLOT.RETIRED2, KEY_TYPE.ECCP256, b"t", hashes.SHA256())
    assert requests == [TouchRequest(0x82, TouchPolicy.ALWAYS),
                        TouchRequest(0x83, TouchPolicy.CACHED)]
    answer[0] = False  # not touched: 6985, nothing signed
    with pytest.raises(ApduError) as refused:
        s.sign(SLOT.RETIRED1, KEY_TYPE.ECCP256, b"t", hashes.SHA256())
    assert refused.value.sw == 0x6985
    s.sign(SLOT.CARD_AUTH, KEY_TYPE.ECCP384, b"t", hashes.SHA384())  # no touch policy
    assert card.touch_requests == 3
    meta = s.get_slot_metadata(SLOT.RETIRED1)
    assert meta.touch_policy == TOUCH_POLICY.ALWAYS


def test_management_key_with_touch(config: CardConfig) -> None:
    requests: list[TouchRequest] = []

    def sensor(request: TouchRequest) -> bool:  # touched once, then no more
        requests.append(request)
        return len(requests) < 2

    card = make_card(config, touch=sensor)
    s = session(card)
    s.authenticate(MGMT)
    s.set_management_key(MANAGEMENT_KEY_TYPE.AES192, bytes(range(24)), require_touch=True)
    assert requests == []
    meta = s.get_management_key_metadata()
    assert (meta.key_type, meta.default_value, meta.touch_policy) == (
        MANAGEMENT_KEY_TYPE.AES192, False, TOUCH_POLICY.ALWAYS)
    s.authenticate(bytes(range(24)))
    assert requests == [TouchRequest(0x9B, TouchPolicy.ALWAYS)] and card.admin
    with pytest.raises(ApduError):  # the sensor now says "not touched": no admin
        s.authenticate(bytes(range(24)))
    assert not card.admin


def test_aes_management_keys_need_firmware_5_4(config: CardConfig) -> None:
    card = make_card(config, Identity(version=(5, 3, 0), serial=1))
    s = session(card)
    s.authenticate(MGMT)
    aes = CommandApdu(0, 0xFF, 0xFF, 0xFF, bytes((0x08, 0x9B, 16)) + bytes(16))
    assert tx(card, aes)[1] == 0x6A80
    tdes = CommandApdu(0, 0xFF, 0xFF, 0xFE, bytes((0x03, 0x9B, 24)) + bytes(range(24)))
    assert tx(card, tdes)[1] == 0x9000 and card.state.management_touch


# --- SET PIN RETRIES, RESET ---------------------------------------------------------


def test_set_pin_retries(config: CardConfig) -> None:
    card = make_card(config)
    s = session(card)
    assert tx(card, "00fa0a05")[1] == 0x6982  # no management key
    s.authenticate(MGMT)
    assert tx(card, "00fa0a05")[1] == 0x6982  # no PIN
    s.change_pin("123456", "654321")
    s.verify_pin("654321")
    assert tx(card, "00fa0005")[1] == 0x6A86  # no PIN tries at all
    assert tx(card, "00fa1405")[1] == 0x9000
    assert (card.state.pin, card.state.puk) == (b"123456", b"12345678")  # defaults again
    pin = s.get_pin_metadata()
    assert (pin.default_value, pin.total_attempts, pin.attempts_remaining) == (True, 20, 20)
    assert s.get_puk_metadata().total_attempts == 5
    # more than 15 tries left: 63CF at most (ISO/IEC 7816-4 63Cx)
    assert tx(card, "0020008008" + b"000000\xff\xff".hex())[1] == 0x63CF


def _block_pin_and_puk(card: PivCard, pin: bool = True, puk: bool = True) -> None:
    for _ in range(card.state.pin_retries if pin else 0):
        tx(card, "0020008008" + "ff" * 8)
    for _ in range(card.state.puk_retries if puk else 0):
        tx(card, "002c008010" + "ff" * 16)


@pytest.mark.parametrize(("version", "algorithm"), [((5, 7, 1), MANAGEMENT_KEY_TYPE.AES192),
                                                    ((5, 4, 3), MANAGEMENT_KEY_TYPE.TDES)])
def test_reset_only_when_pin_and_puk_are_blocked(config: CardConfig, version: tuple[int, int, int],
                                                 algorithm: MANAGEMENT_KEY_TYPE) -> None:
    card = make_card(config, Identity(version=version, serial=7))
    s = session(card)
    s.authenticate(MGMT)
    s.generate_key(SLOT.RETIRED1, KEY_TYPE.ECCP256)
    s.set_management_key(MANAGEMENT_KEY_TYPE.TDES, bytes(range(24)))
    assert tx(card, "00fb0000")[1] == 0x6985
    _block_pin_and_puk(card, puk=False)
    assert tx(card, "00fb0000")[1] == 0x6985  # the PUK still works
    card.state.pin_left = 1
    _block_pin_and_puk(card, pin=False)
    assert tx(card, "00fb0000")[1] == 0x6985  # the PIN still works
    _block_pin_and_puk(card, puk=False)
    assert tx(card, "00fb0100")[1] == 0x6A86
    assert tx(card, "00fb0000") == (b"", 0x9000)
    state = card.state
    assert (state.pin, state.puk, state.pin_left, state.puk_left) == (
        b"123456", b"12345678", 3, 3)
    assert sorted(state.keys) == [0xF9]  # the attestation key stays
    assert sorted(state.objects) == [ObjectTag.DISCOVERY, ObjectTag.CERT_F9]
    meta = s.get_management_key_metadata()
    assert (meta.key_type, meta.default_value) == (algorithm, True)
    s = session(card)  # yubikit reads the new key type
    s.authenticate(MGMT)
    assert s.get_pin_metadata().default_value


def test_yubikit_reset(config: CardConfig) -> None:
    """yubikit's own sequence: block the PIN with wrong VERIFYs and the PUK with wrong
    RESET RETRY COUNTERs (all-FF values), then RESET."""
    card = make_card(config)
    s = session(card)
    s.reset()
    assert sorted(card.state.keys) == [0xF9] and card.state.pin_left == 3


# --- MOVE / DELETE KEY --------------------------------------------------------------


def test_move_and_delete_key(config: CardConfig) -> None:
    card = make_card(config)
    s = session(card)
    assert tx(card, "00f6829a")[1] == 0x6982  # management key first
    s.authenticate(MGMT)
    public = s.generate_key(SLOT.RETIRED1, KEY_TYPE.ECCP256, PIN_POLICY.NEVER)
    assert tx(card, "00f69a82")[1] == 0x6A86  # 9A is not empty
    assert tx(card, "00f68483")[1] == 0x6A88  # nothing in 83
    assert tx(card, "00f68282")[1] == 0x6A86  # to itself
    assert tx(card, "00f6f982")[1] == 0x6A86  # not into the attestation slot
    s.move_key(SLOT.RETIRED1, SLOT.RETIRED2)
    meta = s.get_slot_metadata(SLOT.RETIRED2)
    assert (meta.pin_policy, meta.generated) == (PIN_POLICY.NEVER, True)
    assert meta.public_key == public
    assert tx(card, "00f70082")[1] == 0x6A88
    s.delete_key(SLOT.RETIRED2)
    assert tx(card, "00f70083")[1] == 0x6A88
    assert tx(card, "00f6ff83")[1] == 0x6A88


# --- ATTEST ---------------------------------------------------------------------------


def test_attestation(config: CardConfig) -> None:
    card = make_card(config)
    s = session(card)
    s.authenticate(MGMT)
    public = s.generate_key(SLOT.SIGNATURE, KEY_TYPE.ECCP384, PIN_POLICY.ONCE,
                            TOUCH_POLICY.CACHED)
    cert = s.attest_key(SLOT.SIGNATURE)
    f9 = x509.load_pem_x509_certificate((FIXTURES / "f9.crt").read_bytes())
    cert.verify_directly_issued_by(f9)
    assert cert.subject.rfc4514_string() == "CN=YubiKey PIV Attestation 9c"
    assert cert.issuer == f9.subject
    assert (cert.not_valid_before_utc, cert.not_valid_after_utc) == (
        f9.not_valid_before_utc, f9.not_valid_after_utc)
    assert cert.public_key() == public
    values = {ext.oid: ext.value.value for ext in cert.extensions}
    assert values == {OID_FIRMWARE: bytes.fromhex("050701"),
                      OID_SERIAL: bytes.fromhex("0204 00bc614e"),
                      OID_POLICY: bytes.fromhex("0203"),
                      OID_FORM_FACTOR: bytes.fromhex("03")}
    assert s.attest_key(SLOT.SIGNATURE).serial_number != cert.serial_number
    # imported keys are not attested; nor slots without a key
    assert tx(card, "00f99a00")[1] == 0x6A80
    assert tx(card, "00f98200")[1] == 0x6A88
    assert tx(card, "00f9f900")[1] == 0x6A86


def test_attestation_without_an_attestation_key(config: CardConfig) -> None:
    card = make_card(config)
    card.state.keys.pop(KeyRef.ATTESTATION)
    s = session(card)
    s.authenticate(MGMT)
    s.generate_key(SLOT.AUTHENTICATION, KEY_TYPE.ECCP256)
    assert tx(card, "00f99a00")[1] == 0x6A88


# --- the YubiKey 5 identity -----------------------------------------------------------


def test_yubikey5_identity_and_management_application(config: CardConfig) -> None:
    identity = Identity(Kind.YUBIKEY5, (5, 7, 1), 31415926, FormFactor.USB_A_NANO)
    card = make_card(config, identity)
    assert card.power_on() == YUBIKEY5_NFC_ATR
    info = read_info(CardConnection(card))  # ykman's device detection
    assert (info.serial, info.version, int(info.form_factor)) == (31415926, (5, 7, 1), 2)
    # the management application stays selected: device info, and no PIV instructions
    assert tx(card, "001d0000") == (bytes.fromhex(
        "16" "01020010" "0204" + (31415926).to_bytes(4, "big").hex() + "03020010" "040102"
        "0503050701"), 0x9000)
    assert tx(card, "00fd0000")[1] == 0x6D00
    # back to PIV: the management application's commands are gone there, PIV works
    assert tx(card, SELECT)[1] == 0x9000
    assert tx(card, "001d0000")[1] == 0x6D00
    assert session(card).get_serial() == 31415926
    # the default identity has no management application
    plain = make_card(config)
    assert tx(plain, "00a4040008a000000527471117")[1] == 0x6A82
    assert tx(plain, "00fd0000")[1] == 0x9000  # and PIV stays selected
