"""Emulated cards made from Python objects: keys and certificates a test created itself.

:func:`piv_card` and :func:`cac_card` build a card object in memory (no files: fresh state
each call); :func:`write_piv_card` and :func:`write_cac_card` write the same as a card
directory with a ``card.toml`` profile and return its ``--card`` spec, for the places that
take a spec (``ccidemu serve``, ``ccidemu vpcd``, the pytest plugin's reader and guest
fixtures).  Keys and certificates come from :mod:`cryptography` (or
:mod:`ccidemu.certs`: ``make_ca``, ``new_private_key``, ``issue_certificate``).

A slot's value is a private key, or ``(key, certificate)``; without a certificate the card
holds the key but no certificate object (as after GENERATE, before a certificate is
written).  A certificate whose public key is not the key's is refused (ConfigError).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ccidemu.cards.cac import MAX_CERTIFICATES, CacCard, CacState, PkiCredential
from ccidemu.cards.cac import valid_pin as valid_cac_pin
from ccidemu.cards.piv import (
    DEFAULT_MANAGEMENT_KEY,
    DEFAULT_RETRIES,
    KEY_SLOTS,
    MANAGEMENT_KEY_LENGTHS,
    Algorithm,
    PivCard,
    PivState,
    PrivateKey,
    default_objects,
    key_algorithm,
    valid_reference,
)
from ccidemu.cards.yubikey import Identity, Kind, default_serial
from ccidemu.certs import cert_pem, key_pem
from ccidemu.errors import ConfigError
from ccidemu.files import write_atomically

__all__ = ["SlotValue", "cac_card", "piv_card", "write_cac_card", "write_piv_card"]

#: What a PIV slot holds: a private key, or a private key and its certificate.
SlotValue = PrivateKey | tuple[PrivateKey, x509.Certificate | None]

_MANAGEMENT_NAMES: dict[int, str] = {Algorithm.TDES: "3des", Algorithm.AES128: "aes128",
                     Algorithm.AES192: "aes192", Algorithm.AES256: "aes256"}


def _spki(key: object) -> bytes:
    data: bytes = key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return data


def _split(slot: int, value: SlotValue) -> tuple[PrivateKey, x509.Certificate | None]:
    key, cert = value if isinstance(value, tuple) else (value, None)
    if slot not in KEY_SLOTS:
        raise ConfigError(f"slot {slot:02X} is not a PIV key slot (9A 9C 9D 9E 82-95 F9)")
    try:
        key_algorithm(key)
    except ValueError as exc:
        raise ConfigError(f"slot {slot:02X}: {exc}") from None
    if cert is not None and _spki(cert.public_key()) != _spki(key.public_key()):
        raise ConfigError(f"slot {slot:02X}: the certificate is not the key's")
    return key, cert


def _check_piv_settings(pin: str, puk: str, management_key: bytes,
                        management_algorithm: int) -> None:
    for name, value in (("pin", pin), ("puk", puk)):
        if not valid_reference(value.encode()):
            raise ConfigError(f"{name} must be 6 to 8 characters")
    if MANAGEMENT_KEY_LENGTHS.get(management_algorithm) != len(management_key):
        raise ConfigError(f"management key of {len(management_key)} bytes does not fit "
                          f"algorithm {management_algorithm:02X}")


def piv_card(slots: Mapping[int, SlotValue] | None = None, *, pin: str = "123456",
             puk: str = "12345678", management_key: bytes = DEFAULT_MANAGEMENT_KEY,
             management_algorithm: int = Algorithm.TDES, pin_retries: int = DEFAULT_RETRIES,
             puk_retries: int = DEFAULT_RETRIES, label: str = "", serial: int | None = None,
             yubikey: bool = False) -> PivCard:
    """A PIV card holding ``slots`` (key reference -> key or (key, certificate)).

    PIN, PUK, retry counters and the card management key as given (the PIV defaults
    otherwise).  ``serial`` (GET SERIAL; default: derived from the certificates) and the
    CHUID GUID follow from it; ``yubikey=True`` gives the card a YubiKey 5's identity (ATR,
    management application; docs/YUBIKEY.md).  State lives in the object: nothing is saved.
    """
    _check_piv_settings(pin, puk, management_key, management_algorithm)
    state = PivState(pin=pin.encode(), puk=puk.encode(), pin_retries=pin_retries,
                     puk_retries=puk_retries, pin_left=pin_retries, puk_left=puk_retries,
                     management_key=bytes(management_key),
                     management_algorithm=management_algorithm)
    certs: dict[int, bytes] = {}
    digest = hashlib.sha256(b"ccidemu-testcard:" + label.encode())
    for slot, value in sorted((slots or {}).items()):
        key, cert = _split(slot, value)
        state.keys[slot] = key
        digest.update(_spki(key.public_key()))
        if cert is not None:
            certs[slot] = cert.public_bytes(serialization.Encoding.DER)
    source = digest.hexdigest()
    identity = Identity(kind=Kind.YUBIKEY5 if yubikey else Kind.CCIDEMU,
                        serial=default_serial(source) if serial is None else serial)
    guid = hashlib.sha256(f"ccidemu-piv-serial:{identity.serial}".encode()).digest()[:16]
    state.objects = default_objects(certs, guid)
    return PivCard(state, label=label, identity=identity)


def write_piv_card(directory: Path, slots: Mapping[int, SlotValue], *, pin: str = "123456",
                   puk: str = "12345678", management_key: bytes = DEFAULT_MANAGEMENT_KEY,
                   management_algorithm: int = Algorithm.TDES,
                   pin_retries: int = DEFAULT_RETRIES, puk_retries: int = DEFAULT_RETRIES,
                   label: str = "test card", serial: int | None = None,
                   yubikey: bool = False) -> str:
    """Write ``slots`` as ``<slot>.crt``/``<slot>.key`` files and a ``card.toml`` profile
    into ``directory`` (made if missing); the spec ``piv:DIRECTORY/card.toml``.

    Every slot needs a certificate here (the file format has no key-only slot).  Keys are
    written unencrypted (mode 0600): test material only.
    """
    _check_piv_settings(pin, puk, management_key, management_algorithm)
    directory.mkdir(parents=True, exist_ok=True)
    lines = [
        "# written by ccidemu.testcards.write_piv_card",
        f'pin = "{pin}"', f'puk = "{puk}"',
        f"pin_retries = {pin_retries}", f"puk_retries = {puk_retries}",
        f'management_key = "{bytes(management_key).hex()}"',
        f'management_key_algorithm = "{_MANAGEMENT_NAMES[management_algorithm]}"',
        f"label = {_toml_string(label)}",
    ]
    if serial is not None:
        lines.append(f"serial = {serial}")
    if yubikey:
        lines.append('identity = "yubikey5"')
    for slot, value in sorted(slots.items()):
        key, cert = _split(slot, value)
        if cert is None:
            raise ConfigError(f"slot {slot:02X}: a card directory needs a certificate")
        name = f"{slot:02x}"
        write_atomically(directory / f"{name}.key", key_pem(key))
        (directory / f"{name}.crt").write_bytes(cert_pem(cert))
        lines += ["", f"[slots.{name}]", f'cert = "{name}.crt"', f'key = "{name}.key"']
    profile = directory / "card.toml"
    profile.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return f"piv:{profile}"


def _credentials(credentials: Sequence[tuple[rsa.RSAPrivateKey, x509.Certificate]]
                 ) -> list[PkiCredential]:
    if not 1 <= len(credentials) <= MAX_CERTIFICATES:
        raise ConfigError(f"a CAC card holds 1 to {MAX_CERTIFICATES} certificates, "
                          f"not {len(credentials)}")
    found = []
    for number, (key, cert) in enumerate(credentials, 1):
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ConfigError(f"cert{number}: CAC keys are RSA (GSC-IS 2.1)")
        if _spki(cert.public_key()) != _spki(key.public_key()):
            raise ConfigError(f"cert{number}: the certificate is not the key's")
        found.append(PkiCredential(cert.public_bytes(serialization.Encoding.DER), key))
    return found


def _check_cac_pin(pin: str, pin_retries: int) -> None:
    if not valid_cac_pin(pin.encode()):
        raise ConfigError("a CAC PIN has 4 to 8 characters")
    if not 1 <= pin_retries <= 15:
        raise ConfigError("pin_retries must be 1 to 15")


def cac_card(credentials: Sequence[tuple[rsa.RSAPrivateKey, x509.Certificate]], *,
             pin: str = "123456", pin_retries: int = DEFAULT_RETRIES, label: str = ""
             ) -> CacCard:
    """A CAC card with one PKI applet per (RSA key, certificate), in order (1 to 10)."""
    _check_cac_pin(pin, pin_retries)
    state = CacState(pin=pin.encode(), pin_retries=pin_retries, pin_left=pin_retries)
    return CacCard(_credentials(credentials), state, label=label)


def write_cac_card(directory: Path,
                   credentials: Sequence[tuple[rsa.RSAPrivateKey, x509.Certificate]], *,
                   pin: str = "123456", pin_retries: int = DEFAULT_RETRIES,
                   label: str = "test card") -> str:
    """Write ``cert1.crt``/``cert1.key``... and a ``card.toml`` profile into ``directory``;
    the spec ``cac:DIRECTORY/card.toml``."""
    _check_cac_pin(pin, pin_retries)
    checked = _credentials(credentials)
    directory.mkdir(parents=True, exist_ok=True)
    lines = ["# written by ccidemu.testcards.write_cac_card", f'pin = "{pin}"',
             f"pin_retries = {pin_retries}", f"label = {_toml_string(label)}"]
    for number, ((key, cert), _) in enumerate(zip(credentials, checked, strict=True), 1):
        write_atomically(directory / f"cert{number}.key", key_pem(key))
        (directory / f"cert{number}.crt").write_bytes(cert_pem(cert))
        lines += ["", f"[pki.{number}]", f'cert = "cert{number}.crt"',
                  f'key = "cert{number}.key"']
    profile = directory / "card.toml"
    profile.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return f"cac:{profile}"


def _toml_string(text: str) -> str:
    """A TOML basic string (quotes, backslashes and control characters escaped)."""
    out = ['"']
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)
