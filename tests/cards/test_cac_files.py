"""``--card cac:DIR`` / ``cac:PROFILE.toml``: loading, clear errors naming the file and the
applet, and the PIN counter saved per card spec in the state directory."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    PrivateFormat,
    pkcs12,
)

from ccidemu.cards import CardOptions, open_card
from ccidemu.cards.cac import CacCard
from ccidemu.cards.cac_files import demo_directory, load_config, state_path
from ccidemu.certs import key_pem
from ccidemu.errors import ConfigError
from tests.cards.test_cac_card import PIN_APDU

WRONG_PIN = bytes.fromhex("00200000083939393939ffffff")


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    directory = tmp_path / "cac"
    shutil.copytree(demo_directory(), directory)
    return directory


def _open(spec: str, state: Path | None = None, read_only: bool = False) -> CacCard:
    card = open_card(spec, CardOptions(state_dir=state, read_only=read_only))
    assert isinstance(card, CacCard)
    card.power_on()
    return card


def test_directory_profile_and_demo_agree(certs: Path) -> None:
    by_dir, by_profile, demo = (load_config(str(certs)), load_config(str(certs / "card.toml")),
                                load_config(""))
    assert [c.certificate for c in by_dir.credentials] == \
        [c.certificate for c in by_profile.credentials] == \
        [c.certificate for c in demo.credentials]
    assert len(by_dir.credentials) == 3
    assert by_profile.label == "ccidemu demo CAC" and demo.label == "demo"


def test_pkcs12_and_encrypted_key_with_pass_file(certs: Path) -> None:
    config = load_config(str(certs))
    cert2 = (certs / "cert2.crt").read_bytes()
    key2 = config.credentials[1].key
    bundle = pkcs12.serialize_key_and_certificates(
        b"cert2", key2, x509.load_pem_x509_certificate(cert2), None,
        BestAvailableEncryption(b"bundle secret"))
    (certs / "cert2.crt").unlink()
    (certs / "cert2.key").unlink()
    (certs / "cert2.p12").write_bytes(bundle)
    (certs / "cert2.pass").write_text("bundle secret\n")
    (certs / "cert3.key").write_bytes(config.credentials[2].key.private_bytes(
        Encoding.PEM, PrivateFormat.TraditionalOpenSSL, BestAvailableEncryption(b"k3")))
    (certs / "cert3.pass").write_text("k3\n")
    again = load_config(str(certs))
    assert [c.certificate for c in again.credentials] == [c.certificate
                                                          for c in config.credentials]


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: (d / "cert2.key").unlink(), r"cert2: .*cert2\.crt has no key file"),
    (lambda d: (d / "cert1.key").write_bytes((d / "cert2.key").read_bytes()),
     r"cert1 \(CAC PKI applet 0\): the certificate and key in .*cert1\.key do not match"),
    (lambda d: (d / "cert3.key").write_bytes(key_pem(ec.generate_private_key(ec.SECP256R1()))),
     r"cert3 \(CAC PKI applet 2\): .*cert3\.key holds an ECC key; CAC keys are RSA"),
    (lambda d: (d / "cert1.crt").write_text("not a certificate"),
     r"cert1 \(CAC PKI applet 0\): .*cert1\.crt is not an X\.509 certificate"),
    (lambda d: [(d / f"cert2.{s}").unlink() for s in ("crt", "key")],
     r"cert2 is missing \(PKI applets are numbered from cert1 without gaps\)"),
    (lambda d: [(d / f"cert{n}.{s}").unlink() for n in (1, 2, 3) for s in ("crt", "key")],
     r"no certificates"),
    (lambda d: (d / "cert3.key").write_bytes(b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nx\n"),
     r"cert3 \(CAC PKI applet 2\): cannot load key .*cert3\.key"),
    (lambda d: (d / "cert11.crt").write_bytes((d / "cert1.crt").read_bytes()),
     r"cert11: a CAC card has at most 10 PKI applets"),
])
def test_clear_errors_name_the_file_and_applet(certs: Path, change: object,
                                               message: str) -> None:
    change(certs)  # type: ignore[operator]
    with pytest.raises(ConfigError, match=message):
        load_config(str(certs))


@pytest.mark.parametrize(("profile", "message"), [
    ('pin = "12"\n', "pin must be a string of 4 to 8 characters"),
    ("pin_retries = 0\n", "pin_retries must be an integer from 1 to 15"),
    ('colour = "red"\n', "unknown settings colour"),
    ('[pki.x]\ncert = "cert1.crt"\n', r"\[pki\.x\] is not a PKI applet number"),
    ('[pki.1]\ncert = "cert1.crt"\n', r"\[pki\.1\] needs cert and key, or p12"),
    ('[pki.2]\ncert = "cert2.crt"\nkey = "cert2.key"\n', "cert1 is missing"),
    ("pin = \n", "is not valid TOML"),
])
def test_profile_errors(certs: Path, profile: str, message: str) -> None:
    (certs / "bad.toml").write_text(profile)
    with pytest.raises(ConfigError, match=message):
        load_config(str(certs / "bad.toml"))


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such directory or profile"):
        load_config(str(tmp_path / "nothing"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ConfigError, match="give a directory of certN files"):
        load_config(str(tmp_path / "file.txt"))


def test_profile_pin_and_retries(certs: Path) -> None:
    (certs / "p.toml").write_text('pin = "87654321"\npin_retries = 5\n[pki.1]\n'
                                  'cert = "cert1.crt"\nkey = "cert1.key"\n')
    card = _open(f"cac:{certs / 'p.toml'}")
    assert card.transmit(bytes.fromhex("0020000000")) == b"\x63\xc5"
    assert card.transmit(bytes.fromhex("002000000838373635343332 31")) == b"\x90\x00"
    assert card.transmit(bytes.fromhex("00a4040007a0000000790101")) == b"\x6a\x82"


def test_pin_counter_persists_per_card_spec(certs: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    card = _open(f"cac:{certs}", state)
    assert card.transmit(WRONG_PIN) == b"\x63\xc2"
    path = state_path(state, str(certs.resolve()))
    assert json.loads(path.read_text()) == {"format": 1, "card": str(certs.resolve()),
                                            "pin_retries": 3, "pin_left": 2}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert _open(f"cac:{certs}", state).transmit(bytes.fromhex("0020000000")) == b"\x63\xc2"
    # another card spec (the profile) has its own counter
    assert _open(f"cac:{certs / 'card.toml'}", state).transmit(
        bytes.fromhex("0020000000")) == b"\x63\xc3"
    assert _open(f"cac:{certs}", state).transmit(PIN_APDU) == b"\x90\x00"
    assert json.loads(path.read_text())["pin_left"] == 3


def test_read_only_and_corrupt_state(certs: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    card = _open(f"cac:{certs}", state, read_only=True)
    assert card.transmit(WRONG_PIN) == b"\x63\xc2"
    assert not state.exists()
    state.mkdir(mode=0o700)
    state_path(state, str(certs.resolve())).write_text('{"format": 1, "pin_left": 9}')
    with pytest.raises(ConfigError, match=r"is corrupt .*delete it"):
        _open(f"cac:{certs}", state)
    state_path(state, str(certs.resolve())).write_text(
        '{"format": 1, "pin_retries": 3, "pin_left": 4}')
    with pytest.raises(ConfigError, match="more tries left than the maximum"):
        _open(f"cac:{certs}", state)


def test_changed_retries_restart_the_counter(certs: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    profile = certs / "card.toml"
    assert _open(f"cac:{profile}", state).transmit(WRONG_PIN) == b"\x63\xc2"
    profile.write_text(profile.read_text().replace("pin_retries = 3", "pin_retries = 5"))
    assert _open(f"cac:{profile}", state).transmit(bytes.fromhex("0020000000")) == b"\x63\xc5"
