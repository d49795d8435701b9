"""Loading the PIV card from files (directory convention, TOML profile) and its saved state."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from hypothesis import example, given, settings
from hypothesis import strategies as st

import ccidemu
from ccidemu.apdu import CommandApdu
from ccidemu.cards import CardOptions, open_card
from ccidemu.cards.piv import Origin, PinPolicy, PivCard, TouchPolicy
from ccidemu.cards.piv_files import (
    DEMO_SOURCE,
    demo_directory,
    load_directory,
    load_profile,
    state_path,
)
from ccidemu.cards.yubikey import (
    YUBIKEY5_USB_ATR,
    AtrKind,
    FormFactor,
    Identity,
    Kind,
    default_serial,
)
from ccidemu.errors import ConfigError
from ccidemu.tlv import ber_encode, ber_find

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "certs"
PIN = b"123456".ljust(8, b"\xff")
MGMT = bytes.fromhex("010203040506070801020304050607080102030405060708")


def _key(slot: str) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key((FIXTURES / f"{slot}.key").read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
    return key


def _cert(slot: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((FIXTURES / f"{slot}.crt").read_bytes())


def _public(key: object) -> bytes:
    data: bytes = key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return data


def _piv(card: object) -> PivCard:
    assert isinstance(card, PivCard)
    return card


def _tx(card: PivCard, apdu: CommandApdu | str) -> bytes:
    raw = apdu.encode() if isinstance(apdu, CommandApdu) else bytes.fromhex(apdu)
    return card.transmit(raw)


# --- key and certificate formats -------------------------------------------------------

_E = serialization.Encoding
_F = serialization.PrivateFormat

KEY_FORMATS = [
    pytest.param(_E.PEM, _F.PKCS8, None, id="pem-pkcs8"),
    pytest.param(_E.DER, _F.PKCS8, None, id="der-pkcs8"),
    pytest.param(_E.PEM, _F.TraditionalOpenSSL, None, id="pem-traditional"),
    pytest.param(_E.DER, _F.TraditionalOpenSSL, None, id="der-traditional"),
    pytest.param(_E.PEM, _F.PKCS8, b"s3cret", id="pem-pkcs8-encrypted"),
    pytest.param(_E.PEM, _F.TraditionalOpenSSL, b"s3cret", id="pem-traditional-encrypted"),
    pytest.param(_E.DER, _F.PKCS8, b"s3cret", id="der-pkcs8-encrypted"),
]


@pytest.mark.parametrize("slot", ["9a", "9c"])
@pytest.mark.parametrize(("encoding", "fmt", "passphrase"), KEY_FORMATS)
def test_key_formats(tmp_path: Path, slot: str, encoding: serialization.Encoding,
                     fmt: serialization.PrivateFormat, passphrase: bytes | None) -> None:
    key = _key(slot)
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase
        else serialization.NoEncryption())
    (tmp_path / f"{slot}.key").write_bytes(key.private_bytes(encoding, fmt, encryption))
    cert_der = _cert(slot).public_bytes(_E.DER)
    (tmp_path / f"{slot}.der").write_bytes(cert_der)  # a DER certificate
    if passphrase:
        (tmp_path / f"{slot}.pass").write_bytes(passphrase + b"\n")
    config = load_directory(tmp_path)
    slot_number = int(slot, 16)
    assert _public(config.state.keys[slot_number].public_key()) == _public(key.public_key())
    assert cert_der in config.state.objects[{0x9A: 0x5FC105, 0x9C: 0x5FC10A}[slot_number]]


@pytest.mark.parametrize("passphrase", [None, b"p12pass"])
def test_pkcs12_bundle(tmp_path: Path, passphrase: bytes | None) -> None:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase
        else serialization.NoEncryption())
    bundle = pkcs12.serialize_key_and_certificates(
        b"9d", _key("9d"), _cert("9d"), None, encryption)
    (tmp_path / "9D.p12").write_bytes(bundle)  # upper-case slot names work too
    if passphrase:
        (tmp_path / "9d.pass").write_bytes(passphrase)
    config = load_directory(tmp_path)
    assert list(config.state.keys) == [0x9D]


def test_pem_certificate_named_pem(tmp_path: Path) -> None:
    shutil.copy(FIXTURES / "9e.crt", tmp_path / "9e.pem")
    shutil.copy(FIXTURES / "9e.key", tmp_path / "9e.key")
    assert list(load_directory(tmp_path).state.keys) == [0x9E]


@pytest.mark.parametrize(
    ("files", "message"),
    [
        pytest.param({"9a.crt": "9a.crt", "9a.key": "9d.key"}, r"slot 9a: .*9a\.key.*match",
                     id="mismatched-key"),
        pytest.param({"9a.crt": "9a.crt"}, r"slot 9a: .*9a\.crt has no key", id="missing-key"),
        pytest.param({"9c.key": "9c.key"}, r"slot 9c: .*9c\.key has no certificate",
                     id="missing-cert"),
        pytest.param({"9a.crt": "9a.crt", "9a.key": "9a.key", "9a.pem": "9a.crt"},
                     r"slot 9a: both", id="two-certs"),
        pytest.param({"9a.crt": "9c.key", "9a.key": "9a.key"},
                     r"slot 9a: .*9a\.crt is not an X\.509", id="not-a-cert"),
    ],
)
def test_directory_errors_name_file_and_slot(tmp_path: Path, files: dict[str, str],
                                             message: str) -> None:
    for name, source in files.items():
        shutil.copy(FIXTURES / source, tmp_path / name)
    with pytest.raises(ConfigError, match=message):
        load_directory(tmp_path)


def test_wrong_or_missing_passphrase(tmp_path: Path) -> None:
    key = _key("9a").private_bytes(_E.PEM, _F.PKCS8,
                                   serialization.BestAvailableEncryption(b"right"))
    (tmp_path / "9a.key").write_bytes(key)
    shutil.copy(FIXTURES / "9a.crt", tmp_path / "9a.crt")
    with pytest.raises(ConfigError, match=r"slot 9a: .*9a\.key is encrypted"):
        load_directory(tmp_path)
    (tmp_path / "9a.pass").write_text("wrong\n")
    with pytest.raises(ConfigError, match=r"slot 9a: cannot load key .*9a\.key.*passphrase"):
        load_directory(tmp_path)
    bundle = pkcs12.serialize_key_and_certificates(
        b"x", _key("9c"), _cert("9c"), None, serialization.BestAvailableEncryption(b"right"))
    (tmp_path / "p12").mkdir()
    (tmp_path / "p12" / "9c.p12").write_bytes(bundle)
    with pytest.raises(ConfigError, match=r"slot 9c: cannot open PKCS#12 .*9c\.p12"):
        load_directory(tmp_path / "p12")


# --- profiles ---------------------------------------------------------------------------

def test_profile(tmp_path: Path) -> None:
    shutil.copy(FIXTURES / "9a.crt", tmp_path / "auth.crt")
    (tmp_path / "auth.key").write_bytes(_key("9a").private_bytes(
        _E.PEM, _F.TraditionalOpenSSL, serialization.BestAvailableEncryption(b"pw")))
    (tmp_path / "printed.bin").write_bytes(bytes.fromhex("0104414c4943"))
    (tmp_path / "card.toml").write_text(
        'pin = "87654321"\npuk = "11112222"\npin_retries = 5\n'
        'management_key = "000102030405060708090a0b0c0d0e0f"\n'
        'management_key_algorithm = "aes128"\n'
        'guid = "00112233445566778899aabbccddeeff"\nlabel = "mine"\n'
        '[slots.9A]\ncert = "auth.crt"\nkey = "auth.key"\npassphrase = "pw"\n'
        '[objects]\n5fc109 = "printed.bin"\n'
    )
    card = _piv(open_card(f"piv:{tmp_path / 'card.toml'}"))
    assert card.name == "PIV (mine)"
    assert card.state.pin == b"87654321" and card.state.pin_left == 5
    assert card.state.management_key == bytes(range(16))
    assert _tx(card, "0020008000") == b"\x63\xc5"
    chuid = _tx(card, "00cb3fff055c035fc10200")
    assert ber_find(ber_find(chuid[:-2], 0x53) or b"", 0x34) == bytes.fromhex(
        "00112233445566778899aabbccddeeff")
    assert _tx(card, "00cb3fff055c035fc10900") == b"\x69\x82"  # printed info needs the PIN
    assert _tx(card, CommandApdu(0, 0x20, 0, 0x80, b"87654321")) == b"\x90\x00"
    assert _tx(card, "00cb3fff055c035fc10900") == bytes.fromhex("53060104414c49439000")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param('pim = "123456"', "unknown settings pim", id="typo"),
        pytest.param('pin = "12"', "pin must be 6 to 8", id="short-pin"),
        pytest.param('management_key = "0102"', "management_key must be 24 bytes", id="mgmt"),
        pytest.param('[slots.9a]\ncert = "nope.crt"\nkey = "nope.key"',
                     r"slot 9a: cannot read .*nope\.crt", id="missing-file"),
        pytest.param('[slots.9b]\ncert = "a"\nkey = "b"', "not a PIV key slot", id="slot-9b"),
        pytest.param("pin = ", "not valid TOML", id="bad-toml"),
    ],
)
def test_profile_errors(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "card.toml").write_text(text + "\n")
    with pytest.raises(ConfigError, match=message):
        load_profile(tmp_path / "card.toml")


def test_demo_card_and_fixture_profile() -> None:
    # the checkout's fixtures/certs points at the package data the demo card is read from
    assert demo_directory() == FIXTURES.resolve()
    assert demo_directory().is_relative_to(Path(ccidemu.__file__).resolve().parent)
    demo = _piv(open_card("piv:"))
    assert demo.name == "PIV (demo)"
    assert sorted(demo.state.keys) == [0x9A, 0x9C, 0x9D, 0x9E, 0xF9]
    # the same identity wherever the package is installed (not derived from its path)
    assert demo.identity == Identity(serial=default_serial(DEMO_SOURCE))
    assert demo.identity.serial == 51757879
    profile = _piv(open_card(f"piv:{FIXTURES / 'card.toml'}"))
    assert sorted(profile.state.keys) == [0x9A, 0x9C, 0x9D, 0x9E, 0xF9]
    assert profile.identity.serial == 10203040
    with pytest.raises(ConfigError, match="no such directory"):
        open_card("piv:/nonexistent/card")


# --- saved state -------------------------------------------------------------------------

def _card_dir(tmp_path: Path) -> Path:
    cards = tmp_path / "cards"
    cards.mkdir()
    for name in ("9a.crt", "9a.key", "9e.crt", "9e.key"):
        shutil.copy(FIXTURES / name, cards / name)
    return cards


def _admin(card: PivCard) -> None:
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
    from cryptography.hazmat.primitives.ciphers import Cipher, modes

    rsp = _tx(card, "0087039b047c02810000")
    challenge = ber_find(ber_find(rsp[:-2], 0x7C) or b"", 0x81) or b""
    enc = Cipher(TripleDES(MGMT), modes.ECB()).encryptor()
    response = enc.update(challenge) + enc.finalize()
    body = ber_encode(0x7C, ber_encode(0x82, response))
    assert _tx(card, CommandApdu(0, 0x87, 3, 0x9B, body)) == b"\x90\x00"


def _snapshot(directory: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_state_survives_a_reopen(tmp_path: Path) -> None:
    cards, state_dir = _card_dir(tmp_path), tmp_path / "state"
    options = CardOptions(state_dir=state_dir)
    card = _piv(open_card(f"piv:{cards}", options))
    new_pin = b"24682468"
    assert _tx(card, CommandApdu(0, 0x24, 0, 0x80, PIN + new_pin)) == b"\x90\x00"
    assert _tx(card, CommandApdu(0, 0x20, 0, 0x80, PIN)) == b"\x63\xc2"
    _admin(card)
    generated = _tx(card, CommandApdu(0, 0x47, 0, 0x9D, bytes.fromhex("ac03800111"), 256))
    assert generated[-2:] == b"\x90\x00"
    put = CommandApdu(0, 0xDB, 0x3F, 0xFF, bytes.fromhex("5c035fc109" + "5303010141"))
    assert _tx(card, put) == b"\x90\x00"

    files = list(state_dir.iterdir())
    assert [f.name for f in files] == [state_path(state_dir, str(cards.resolve())).name]
    saved = json.loads(files[0].read_text())
    # only what changed: the generated key (PKCS#8 PEM) and the new object
    assert list(saved["keys"]) == ["9d"]
    assert saved["keys"]["9d"].startswith("-----BEGIN PRIVATE KEY-----")
    assert list(saved["objects"]) == ["5fc109"]
    assert files[0].stat().st_mode & 0o777 == 0o600

    again = _piv(open_card(f"piv:{cards}", options))
    assert again.state.pin == new_pin and again.state.pin_left == 2
    assert _tx(again, CommandApdu(0, 0x20, 0, 0x80, new_pin)) == b"\x90\x00"
    assert _public(again.state.keys[0x9D].public_key()) == _public(
        card.state.keys[0x9D].public_key())
    assert _tx(again, "00cb3fff055c035fc10900") == bytes.fromhex("53030101419000")
    # the certificate objects still come from the files: not in the saved state
    assert _tx(again, "00cb3fff055c035fc10508")[:2] == b"\x53\x82"


def test_read_only_leaves_the_state_directory_unchanged(tmp_path: Path) -> None:
    cards, state_dir = _card_dir(tmp_path), tmp_path / "state"
    writable = _piv(open_card(f"piv:{cards}", CardOptions(state_dir=state_dir)))
    assert _tx(writable, CommandApdu(0, 0x20, 0, 0x80, b"999999\xff\xff")) == b"\x63\xc2"
    before = _snapshot(tmp_path)
    card = _piv(open_card(f"piv:{cards}", CardOptions(state_dir=state_dir, read_only=True)))
    assert card.state.pin_left == 2  # the saved state is read
    assert _tx(card, CommandApdu(0, 0x24, 0, 0x80, PIN + b"11111111")) == b"\x90\x00"
    assert _tx(card, CommandApdu(0, 0x20, 0, 0x80, b"11111111")) == b"\x90\x00"
    assert _snapshot(tmp_path) == before


def test_in_memory_without_state_dir(tmp_path: Path) -> None:
    cards = _card_dir(tmp_path)
    before = _snapshot(tmp_path)
    card = _piv(open_card(f"piv:{cards}", CardOptions()))
    assert _tx(card, CommandApdu(0, 0x20, 0, 0x80, b"999999\xff\xff")) == b"\x63\xc2"
    assert _snapshot(tmp_path) == before


def test_corrupt_state_file_is_named(tmp_path: Path) -> None:
    cards, state_dir = _card_dir(tmp_path), tmp_path / "state"
    state_dir.mkdir()
    path = state_path(state_dir, str(cards.resolve()))
    for text in ("{not json", '{"format": 1, "pin": "zz"}', "[]"):
        path.write_text(text)
        with pytest.raises(ConfigError, match=f"{path.name}.*corrupt"):
            open_card(f"piv:{cards}", CardOptions(state_dir=state_dir))


@pytest.mark.parametrize("kind", ["p521", "ed448"])
def test_saved_key_of_an_unsupported_type_is_a_corrupt_state(tmp_path: Path,
                                                             kind: str) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed448

    from ccidemu.cards.piv import PivState
    from ccidemu.cards.piv_files import StateStore

    key = (ec.generate_private_key(ec.SECP521R1()) if kind == "p521"
           else ed448.Ed448PrivateKey.generate())
    pem = key.private_bytes(_E.PEM, _F.PKCS8, serialization.NoEncryption()).decode()
    path = tmp_path / "piv-x.json"
    path.write_text(json.dumps(dict(GOOD_STATE, keys={"9a": pem})))
    with pytest.raises(ConfigError, match=r"piv-x\.json is corrupt \(slot 9a: .*delete it"):
        StateStore(path, PivState(), "x").load()


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 300) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=10,
)
GOOD_STATE = {"format": 2, "pin": "313233343536", "puk": "3132333435363738",
              "pin_retries": 3, "puk_retries": 3, "pin_left": 3, "puk_left": 3,
              "management_key": MGMT.hex(), "management_algorithm": 3, "keys": {},
              "objects": {}}


_COUNTERS = ("pin_retries", "puk_retries", "pin_left", "puk_left")


def _plausible(field: str) -> st.SearchStrategy[object]:
    """Values a state file could really hold for ``field``, valid or just beyond the limits
    (and unlike the defaults, so that a field left unread shows)."""
    if field in _COUNTERS:
        return st.integers(-1, 16) | st.sampled_from([254, 255, 256])
    if field in ("pin", "puk"):
        return st.binary(min_size=5, max_size=9).map(bytes.hex)
    if field == "management_key":
        return st.sampled_from([16, 23, 24, 32]).flatmap(
            lambda n: st.binary(min_size=n, max_size=n)).map(bytes.hex)
    if field == "management_algorithm":
        return st.sampled_from([0, 1, 3, 8, 10, 12])
    return st.nothing()


#: One damaged field: any JSON value, or a plausible one for that field.
_DAMAGE = st.sampled_from(sorted(GOOD_STATE)).flatmap(
    lambda field: st.tuples(st.just(field), JSON_VALUES | _plausible(field)))


@settings(max_examples=300, deadline=None)
@given(st.lists(_DAMAGE, min_size=1, max_size=2))
@example([("pin_retries", 0), ("pin_left", 0)])  # a maximum of 0 tries is no PIN
@example([("puk_retries", 0), ("puk_left", 0)])
@example([("pin_retries", 256)])
@example([("puk_left", True)])
@example([("management_key", "00" * 32), ("management_algorithm", 12)])
def test_damaged_state_loads_or_is_a_config_error(changes: list[tuple[str, object]]) -> None:
    from ccidemu.cards.piv import MANAGEMENT_KEY_LENGTHS, PivState, valid_reference
    from ccidemu.cards.piv_files import StateStore, state_to_json

    damaged = dict(GOOD_STATE, **dict(changes))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "piv-x.json"
        path.write_text(json.dumps(damaged))
        try:
            state = StateStore(path, PivState(), "x").load()
        except ConfigError as exc:
            assert "piv-x.json" in str(exc)
            return
    # it loaded: then exactly what the file says, and a usable card state
    saved = state_to_json(state, PivState(), "x")
    for key in ("pin", "puk", "pin_retries", "puk_retries", "pin_left", "puk_left",
                "management_key", "management_algorithm"):
        assert saved[key] == damaged[key] and type(saved[key]) is type(GOOD_STATE[key]), key
    assert valid_reference(state.pin) and valid_reference(state.puk)
    assert MANAGEMENT_KEY_LENGTHS[state.management_algorithm] == len(state.management_key)
    # SET PIN RETRIES and profiles allow 1 to 255 tries
    assert 0 <= state.pin_left <= state.pin_retries <= 255 and state.pin_retries >= 1
    assert 0 <= state.puk_left <= state.puk_retries <= 255 and state.puk_retries >= 1


def test_crash_before_rename_keeps_the_old_state(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cards, state_dir = _card_dir(tmp_path), tmp_path / "state"
    options = CardOptions(state_dir=state_dir)
    card = _piv(open_card(f"piv:{cards}", options))
    assert _tx(card, CommandApdu(0, 0x20, 0, 0x80, b"999999\xff\xff")) == b"\x63\xc2"
    old = _snapshot(state_dir)

    def crash(src: object, dst: object) -> None:
        raise OSError(28, "simulated crash between write and rename")

    monkeypatch.setattr(os, "replace", crash)
    # the card answers "memory failure" (ISO 7816-4 6581) when its state cannot be saved
    assert _tx(card, CommandApdu(0, 0x20, 0, 0x80, b"999999\xff\xff")) == b"\x65\x81"
    monkeypatch.undo()
    assert _snapshot(state_dir) == old  # the temporary file is gone, the old state intact
    # a temporary file left by a real crash is ignored
    (state_dir / ".leftover.json.tmp").write_text('{"half": ')
    again = _piv(open_card(f"piv:{cards}", options))
    assert again.state.pin_left == 2


def test_certs_generate_command(tmp_path: Path) -> None:
    from vmc.cli import main

    out = tmp_path / "set"
    assert main(["certs", "generate", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["9a.crt", "9a.key", "9c.crt", "9c.key", "9d.crt", "9d.key", "9e.crt",
                     "9e.key", "attestation-ca.crt", "attestation-ca.key", "ca.crt", "ca.key",
                     "card.toml", "f9.crt", "f9.key"]
    assert main(["certs", "generate", str(out)]) == 1  # refuses to overwrite
    assert main(["certs", "generate", "--force", str(out)]) == 0
    config = load_profile(out / "card.toml")
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    ca_key = ca.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    kinds: dict[str, object] = {}
    for slot in ("9a", "9c", "9d", "9e"):
        cert = x509.load_pem_x509_certificate((out / f"{slot}.crt").read_bytes())
        assert cert.signature_hash_algorithm is not None
        ca_key.verify(cert.signature, cert.tbs_certificate_bytes,
                      ec.ECDSA(cert.signature_hash_algorithm))
        kinds[slot] = config.state.keys[int(slot, 16)]
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if slot == "9d":
            assert usage.key_encipherment and not usage.digital_signature
        # RFC 5280 4.2.1.3: ECDH needs keyAgreement (pkcs11-tool --derive checks it)
        assert usage.key_agreement == (slot == "9e")
    assert isinstance(kinds["9a"], rsa.RSAPrivateKey) and kinds["9a"].key_size == 2048
    assert isinstance(kinds["9d"], rsa.RSAPrivateKey)
    assert isinstance(kinds["9c"], ec.EllipticCurvePrivateKey)
    assert isinstance(kinds["9c"].curve, ec.SECP256R1)
    assert isinstance(kinds["9e"], ec.EllipticCurvePrivateKey)
    assert isinstance(kinds["9e"].curve, ec.SECP384R1)
    # the attestation key: a CA certificate issued by the attestation root
    att_ca = x509.load_pem_x509_certificate((out / "attestation-ca.crt").read_bytes())
    f9 = x509.load_pem_x509_certificate((out / "f9.crt").read_bytes())
    f9.verify_directly_issued_by(att_ca)
    assert f9.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert 0xF9 in config.state.keys and _public(config.state.keys[0xF9].public_key()) == _public(
        f9.public_key())


@pytest.mark.parametrize(("algorithm", "kind", "usage"), [
    ("rsa3072", rsa.RSAPrivateKey, "key_encipherment"),
    ("rsa4096", rsa.RSAPrivateKey, "key_encipherment"),
    ("p256", ec.EllipticCurvePrivateKey, "key_agreement"),
    ("p384", ec.EllipticCurvePrivateKey, "key_agreement"),
])
def test_certs_generate_algorithm_per_slot(tmp_path: Path, algorithm: str, kind: type,
                                           usage: str) -> None:
    from vmc.cli import main

    out = tmp_path / "set"
    assert main(["certs", "generate", "--no-attestation", "--algorithm", f"9d={algorithm}",
                 "-a", "9a=p384", str(out)]) == 0
    assert not (out / "f9.key").exists()
    config = load_profile(out / "card.toml")
    key = config.state.keys[0x9D]
    assert isinstance(key, kind)
    if isinstance(key, rsa.RSAPrivateKey):
        assert key.key_size == int(algorithm[3:])
    cert = x509.load_pem_x509_certificate((out / "9d.crt").read_bytes())
    assert getattr(cert.extensions.get_extension_for_class(x509.KeyUsage).value, usage)
    assert isinstance(config.state.keys[0x9A], ec.EllipticCurvePrivateKey)


@pytest.mark.parametrize("bad", [["9b=p256"], ["9a=p521"], ["9a=p256", "9a=p384"]])
def test_certs_generate_refuses_bad_algorithms(tmp_path: Path, bad: list[str]) -> None:
    from vmc.cli import main

    argv = ["certs", "generate", str(tmp_path / "x")]
    for item in bad:
        argv += ["--algorithm", item]
    assert main(argv) == 1
    assert not (tmp_path / "x" / "9a.key").exists()
    with pytest.raises(SystemExit):  # not SLOT=KEYTYPE: argparse's usage error
        main(["certs", "generate", "--algorithm", "9a", str(tmp_path / "x")])


def test_profile_identity_and_policies(tmp_path: Path) -> None:
    cards = tmp_path / "cards"
    shutil.copytree(FIXTURES, cards)
    (cards / "yk.toml").write_text(
        'identity = "yubikey5"\nfirmware = "5.4.3"\nserial = 4242\n'
        'form_factor = "usb-c-nano"\natr = "usb"\n'
        '[slots.9a]\ncert = "9a.crt"\nkey = "9a.key"\npin_policy = "never"\n'
        'touch_policy = "cached"\n'
        '[slots.f9]\ncert = "f9.crt"\nkey = "f9.key"\n')
    card = _piv(open_card(f"piv:{cards / 'yk.toml'}"))
    assert card.identity == Identity(Kind.YUBIKEY5, (5, 4, 3), 4242, FormFactor.USB_C_NANO,
                                     AtrKind.USB)
    assert card.power_on() == YUBIKEY5_USB_ATR
    assert card.name == "YubiKey 5 PIV (yk)"
    policy = card.state.policy(0x9A)
    assert (policy.pin, policy.touch, policy.origin) == (PinPolicy.NEVER, TouchPolicy.CACHED,
                                                         Origin.IMPORTED)
    assert card.state.policy(0xF9).pin == PinPolicy.NEVER


@pytest.mark.parametrize(("text", "message"), [
    ('identity = "smartcard"', "identity 'smartcard' is not one of ccidemu, yubikey5"),
    ('firmware = "5.7"', "is not MAJOR.MINOR.PATCH"),
    ('firmware = "5.300.1"', "above 255"),
    ("serial = -1", "serial must be an integer"),
    ('form_factor = "usb-z"', "form_factor 'usb-z' is not one of"),
    ('atr = "usb"', "atr is a setting of identity"),
    ('[slots.9a]\ncert = "9a.crt"\nkey = "9a.key"\npin_policy = "sometimes"',
     "pin_policy 'sometimes' is not one of never, once, always"),
    ('[slots.9a]\ncert = "9a.crt"\nkey = "9a.key"\ntouch_policy = "default"',
     "touch_policy 'default' is not one of"),
    ("pin_retries = 256", "pin_retries must be an integer from 1 to 255"),
])
def test_profile_identity_errors(tmp_path: Path, text: str, message: str) -> None:
    cards = tmp_path / "cards"
    shutil.copytree(FIXTURES, cards)
    (cards / "bad.toml").write_text(text + "\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_profile(cards / "bad.toml")


def test_policies_and_management_touch_survive_a_reopen(tmp_path: Path) -> None:
    """What the Yubico commands change is saved: generated/imported keys with their
    policies and origin, the management key's touch flag, retry counts above 15."""
    from yubikit.piv import (
        DEFAULT_MANAGEMENT_KEY,
        KEY_TYPE,
        MANAGEMENT_KEY_TYPE,
        PIN_POLICY,
        SLOT,
        TOUCH_POLICY,
        PivSession,
    )

    from vmc.lab.yubikit import CardConnection

    cards = tmp_path / "cards"
    shutil.copytree(FIXTURES, cards)
    state_dir = tmp_path / "state"
    options = CardOptions(state_dir=state_dir)
    spec = f"piv:{cards / 'card.toml'}"
    session = PivSession(CardConnection(open_card(spec, options)))
    session.authenticate(DEFAULT_MANAGEMENT_KEY)
    public = session.generate_key(SLOT.RETIRED1, KEY_TYPE.ECCP256, PIN_POLICY.NEVER,
                                  TOUCH_POLICY.ALWAYS)
    session.put_key(SLOT.AUTHENTICATION, ec.generate_private_key(ec.SECP384R1()),
                    PIN_POLICY.ALWAYS, TOUCH_POLICY.CACHED)
    session.verify_pin("123456")
    session.set_pin_attempts(20, 16)
    session.set_management_key(MANAGEMENT_KEY_TYPE.AES128, bytes(range(16)), True)

    again = PivSession(CardConnection(open_card(spec, options)))
    meta = again.get_slot_metadata(SLOT.RETIRED1)
    assert (meta.key_type, meta.pin_policy, meta.touch_policy, meta.generated) == (
        KEY_TYPE.ECCP256, PIN_POLICY.NEVER, TOUCH_POLICY.ALWAYS, True)
    assert _public(meta.public_key) == _public(public)
    meta = again.get_slot_metadata(SLOT.AUTHENTICATION)
    assert (meta.key_type, meta.pin_policy, meta.touch_policy, meta.generated) == (
        KEY_TYPE.ECCP384, PIN_POLICY.ALWAYS, TOUCH_POLICY.CACHED, False)
    pin = again.get_pin_metadata()
    assert (pin.total_attempts, pin.attempts_remaining) == (20, 20)
    assert again.get_puk_metadata().total_attempts == 16
    mgmt = again.get_management_key_metadata()
    assert (mgmt.key_type, mgmt.touch_policy) == (MANAGEMENT_KEY_TYPE.AES128,
                                                  TOUCH_POLICY.ALWAYS)
    again.authenticate(bytes(range(16)))
    # the fixtures themselves were never touched
    assert load_profile(cards / "card.toml").state.policies == {}


def test_format_1_state_still_loads(tmp_path: Path) -> None:
    from ccidemu.cards.piv import PivState
    from ccidemu.cards.piv_files import StateStore

    path = tmp_path / "piv-x.json"
    path.write_text(json.dumps(dict(GOOD_STATE, format=1, pin_left=1)))
    state = StateStore(path, PivState(), "x").load()
    assert state.pin_left == 1 and state.policies == {} and not state.management_touch


def test_a_directory_without_slot_files_is_a_keyless_card_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "notes.txt").write_text("nothing for a card here\n")
    with caplog.at_level("WARNING"):
        config = load_directory(tmp_path)
    assert config.state.keys == {} and config.certs == {}
    assert any("has no slot files" in r.getMessage() and str(tmp_path) in r.getMessage()
               for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING"):
        (tmp_path / "full").mkdir()
        load_directory(_card_dir(tmp_path / "full"))
    assert not any("no slot files" in r.getMessage() for r in caplog.records)
