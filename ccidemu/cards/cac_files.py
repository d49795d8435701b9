"""Loading the emulated CAC card from certificate/key files and persisting its PIN state.

``--card cac:ARGUMENT``:

* ``cac:`` (empty): the demo card, shipped as package data (:mod:`ccidemu.demo`; a source
  checkout's ``fixtures/cac`` points there).
* ``cac:DIR``: a directory with one set of files per PKI applet, ``cert1`` to ``cert10``
  (numbered from 1 without gaps; ``certN`` is PKI applet N-1, AID A0 00 00 00 79 01 0(N-1)):
  ``certN.crt`` / ``.pem`` / ``.cer`` / ``.der`` (certificate, PEM or DER) with
  ``certN.key`` (private key: PEM or DER, PKCS#8 or traditional, encrypted or not), or
  ``certN.p12`` / ``.pfx`` (PKCS#12 bundle); ``certN.pass`` holds the passphrase of an
  encrypted key or bundle (first line).  Keys are RSA (GSC-IS 2.1 has no other PKI
  algorithm).  PIN 123456, 3 tries.
* ``cac:FILE.toml``: a card profile (paths relative to the file)::

      pin = "123456"            # optional, the defaults shown; 4 to 8 characters
      pin_retries = 3           # 1 to 15
      label = "my CAC"
      [pki.1]
      cert = "cert1.crt"
      key = "cert1.key"
      passphrase = "secret"     # or passphrase_file = "cert1.pass"
      [pki.2]
      p12 = "cert2.p12"

The PIN retry counter is saved in ``CardOptions.state_dir`` as ``cac-<hash of the
argument>.json`` after every change, atomically (:mod:`ccidemu.files`; one file per card
spec, so each VM given its own state directory has its own counter).  Changing
``pin_retries`` in the profile starts the counter afresh; delete the file to start over.
``read_only`` (or no state directory) keeps the counter in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ccidemu import demo
from ccidemu.card import Card
from ccidemu.cards import CardOptions
from ccidemu.cards.cac import (
    DEFAULT_PIN,
    DEFAULT_RETRIES,
    MAX_CERTIFICATES,
    CacCard,
    CacState,
    PkiCredential,
    valid_pin,
)
from ccidemu.cards.piv_files import (
    CERT_SUFFIXES,
    P12_SUFFIXES,
    check_pair,
    key_files,
    load_certificate,
    load_pkcs12,
    load_private_key,
    read_profile,
    text_setting,
)
from ccidemu.errors import ConfigError
from ccidemu.files import ensure_private_dir, remove_temporaries, write_atomically

log = logging.getLogger(__name__)

STATE_FORMAT = 1
_PROFILE_KEYS = {"pin", "pin_retries", "label", "pki"}
_ENTRY_KEYS = {"cert", "key", "p12", "passphrase", "passphrase_file"}
_STEM = re.compile(r"cert([0-9]+)", re.IGNORECASE)

T = TypeVar("T")


def demo_directory() -> Path:
    """The demo card's files (package data, :func:`ccidemu.demo.cac_directory`)."""
    return demo.cac_directory()


@dataclass
class CacConfig:
    """What the files say: the card's credentials and initial state."""

    source: str  # what the state file is keyed by (resolved path)
    label: str
    credentials: list[PkiCredential]
    state: CacState


def _applet_name(number: int) -> str:
    return f"cert{number}"


def _named(number: int, load: Callable[[], T]) -> T:
    """Run a piv_files loader, its errors naming the CAC PKI applet instead of a PIV slot."""
    token = _applet_name(number)
    try:
        return load()
    except ConfigError as exc:
        message = str(exc).removeprefix(f"slot {token}: ")
        raise ConfigError(f"{token} (CAC PKI applet {number - 1}): {message}") from None


def _passphrase(path: Path, number: int) -> bytes:
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise ConfigError(f"{_applet_name(number)} (CAC PKI applet {number - 1}): cannot read "
                          f"{path}: {exc.strerror or exc}") from None
    return lines[0] if lines else b""


def load_credential(number: int, files: Path | tuple[Path, Path],
                    passphrase: bytes | None) -> PkiCredential:
    """One PKI applet's RSA key and certificate; ``files`` is a PKCS#12 bundle or
    (certificate, key).  ConfigError naming the file and the applet."""
    token = _applet_name(number)
    key: object
    cert: x509.Certificate
    if isinstance(files, Path):
        key, cert = _named(number, lambda: load_pkcs12(files, token, passphrase))
        where = files
    else:
        cert = _named(number, lambda: load_certificate(files[0], token))
        where = files[1]
        key = _named(number, lambda: load_private_key(where, token, passphrase))
    if not isinstance(key, rsa.RSAPrivateKey):
        kind = "ECC" if isinstance(key, ec.EllipticCurvePrivateKey) else type(key).__name__
        raise ConfigError(f"{token} (CAC PKI applet {number - 1}): {where} holds an {kind} "
                          "key; CAC keys are RSA (GSC-IS 2.1)")
    _named(number, lambda: check_pair(key, cert, token, where))
    return PkiCredential(cert.public_bytes(serialization.Encoding.DER), key)


def _check_numbers(numbers: list[int], where: str) -> None:
    if not numbers:
        raise ConfigError(f"{where}: no certificates (cert1.crt + cert1.key, or cert1.p12)")
    if numbers[-1] > MAX_CERTIFICATES:
        raise ConfigError(f"{where}: cert{numbers[-1]}: a CAC card has at most "
                          f"{MAX_CERTIFICATES} PKI applets (cert1 .. cert{MAX_CERTIFICATES})")
    expected = list(range(1, len(numbers) + 1))
    if numbers != expected:
        gap = next(n for n, m in zip(expected, numbers, strict=True) if n != m)
        raise ConfigError(f"{where}: cert{gap} is missing (PKI applets are numbered from "
                          "cert1 without gaps)")


def load_directory(directory: Path) -> CacConfig:
    """A card from ``certN.crt``/``.key``/``.p12`` files (see the module docstring)."""
    if not directory.is_dir():
        raise ConfigError(f"{directory}: not a directory")
    found: dict[int, dict[str, Path]] = {}
    for path in sorted(directory.iterdir()):
        match = _STEM.fullmatch(path.stem)
        if match is None or not path.is_file():
            continue
        suffix = path.suffix.lower()
        kind = ("cert" if suffix in CERT_SUFFIXES else "key" if suffix == ".key"
                else "p12" if suffix in P12_SUFFIXES else "pass" if suffix == ".pass" else None)
        if kind is None:
            continue
        number = int(match.group(1))
        files = found.setdefault(number, {})
        if kind in files:
            raise ConfigError(f"{_applet_name(number)}: both {files[kind].name} and "
                              f"{path.name} in {directory}")
        files[kind] = path
    numbers = sorted(n for n, f in found.items() if set(f) - {"pass"})
    _check_numbers(numbers, str(directory))
    credentials = []
    for number in numbers:
        files = found[number]
        name = _applet_name(number)
        passphrase = _passphrase(files["pass"], number) if "pass" in files else None
        entry: Path | tuple[Path, Path]
        if "p12" in files:
            if "cert" in files or "key" in files:
                raise ConfigError(f"{name}: give either {files['p12'].name} or certificate + "
                                  f"key files in {directory}, not both")
            entry = files["p12"]
        elif "cert" in files and "key" in files:
            entry = (files["cert"], files["key"])
        elif "cert" in files:
            raise ConfigError(f"{name}: {files['cert']} has no key file ({name}.key) "
                              f"in {directory}")
        else:
            raise ConfigError(f"{name}: {files['key']} has no certificate file ({name}.crt) "
                              f"in {directory}")
        credentials.append(load_credential(number, entry, passphrase))
    resolved = directory.resolve()
    return CacConfig(str(resolved), resolved.name, credentials, CacState())


def load_profile(path: Path) -> CacConfig:
    """A card from a TOML profile (see the module docstring)."""
    profile = read_profile(path)
    unknown = set(profile) - _PROFILE_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown settings {', '.join(sorted(unknown))}")
    pin = profile.get("pin", DEFAULT_PIN.decode())
    if not isinstance(pin, str) or not valid_pin(pin.encode()):
        raise ConfigError(f"{path}: pin must be a string of 4 to 8 characters")
    retries = profile.get("pin_retries", DEFAULT_RETRIES)
    if not isinstance(retries, int) or isinstance(retries, bool) or not 1 <= retries <= 15:
        raise ConfigError(f"{path}: pin_retries must be an integer from 1 to 15")
    entries = profile.get("pki", {})
    if not isinstance(entries, dict):
        raise ConfigError(f"{path}: [pki] must be a table of [pki.1], [pki.2], ...")
    by_number: dict[int, dict[str, Any]] = {}
    for name, entry in entries.items():
        if not str(name).isdigit():
            raise ConfigError(f"{path}: [pki.{name}] is not a PKI applet number (1 to "
                              f"{MAX_CERTIFICATES})")
        if not isinstance(entry, dict) or set(entry) - _ENTRY_KEYS:
            raise ConfigError(f"{path}: [pki.{name}] takes only "
                              f"{', '.join(sorted(_ENTRY_KEYS))}")
        by_number[int(name)] = entry
    numbers = sorted(by_number)
    _check_numbers(numbers, str(path))
    base = path.parent
    credentials = []
    for number in numbers:
        entry = by_number[number]
        found = key_files(entry, base, f"{path}: [pki.{number}]")
        passphrase = (_passphrase(found.passphrase_file, number)
                      if found.passphrase_file is not None else found.passphrase)
        credentials.append(load_credential(number, found.files, passphrase))
    state = CacState(pin=pin.encode(), pin_retries=retries, pin_left=retries)
    label = text_setting(profile, "label", str(path), path.stem)
    return CacConfig(str(path.resolve()), label, credentials, state)


def load_config(argument: str) -> CacConfig:
    """The card an argument of ``cac:`` names (empty = the demo card)."""
    if not argument:
        directory = demo_directory()
        if not directory.is_dir():
            raise ConfigError(f"the demo CAC card's files are missing from this installation "
                              f"({directory}); give cac:DIR or cac:PROFILE.toml")
        config = load_directory(directory)
        config.label = "demo"
        return config
    path = Path(argument).expanduser()
    if path.is_dir():
        return load_directory(path)
    if path.suffix.lower() == ".toml":
        return load_profile(path)
    if not path.exists():
        raise ConfigError(f"cac:{argument}: no such directory or profile")
    raise ConfigError(f"cac:{argument}: give a directory of certN files or a .toml profile")


# --- state persistence -------------------------------------------------------------


def state_path(state_dir: Path, source: str) -> Path:
    """``cac-<16 hex of sha256(source)>.json`` in ``state_dir``."""
    return state_dir / f"cac-{hashlib.sha256(source.encode()).hexdigest()[:16]}.json"


class StateStore:
    """Loads and saves one card's PIN counter (``None`` path = memory only)."""

    def __init__(self, path: Path | None, initial: CacState, source: str, *,
                 writable: bool = True) -> None:
        self.path = path
        self._initial = initial
        self._source = source
        if path is not None and writable:
            ensure_private_dir(path.parent, "state directory")
            remove_temporaries(path)

    def load(self) -> CacState:
        """The saved counter applied to the initial state; ConfigError naming a corrupt file."""
        state = replace(self._initial)
        if self.path is None or not self.path.exists():
            return state
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
                raise ValueError("not a ccidemu CAC state (format 1)")
            retries, left = data["pin_retries"], data["pin_left"]
            for value in (retries, left):
                if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 15:
                    raise ValueError(f"counter {value!r} out of range")
            if left > retries:
                raise ValueError("more tries left than the maximum")
        except OSError as exc:
            raise ConfigError(f"cannot read CAC card state {self.path}: {exc}") from None
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise ConfigError(f"CAC card state {self.path} is corrupt ({exc}); delete it to "
                              "start from the card files") from None
        if retries != state.pin_retries:
            log.info("pin_retries changed from %d to %d: the PIN counter starts afresh",
                     retries, state.pin_retries)
            return state
        state.pin_left = left
        log.info("CAC card state loaded from %s", self.path)
        return state

    def save(self, state: CacState) -> None:
        if self.path is None:
            return
        payload = {"format": STATE_FORMAT, "card": self._source,
                   "pin_retries": state.pin_retries, "pin_left": state.pin_left}
        write_atomically(self.path, json.dumps(payload, indent=1).encode() + b"\n")
        log.debug("CAC card state saved to %s", self.path)


def open_cac_card(argument: str, options: CardOptions) -> Card:
    """The ``cac:`` card factory (see the module docstring for the argument)."""
    config = load_config(argument)
    path = (None if options.state_dir is None
            else state_path(Path(options.state_dir), config.source))
    store = StateStore(path, config.state, config.source, writable=not options.read_only)
    state = store.load()
    on_change = None if options.read_only or path is None else store.save
    return CacCard(config.credentials, state, on_change=on_change, label=config.label)
