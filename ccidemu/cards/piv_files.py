"""Loading the emulated PIV card from certificate/key files and persisting its state.

``--card piv:ARGUMENT``:

* ``piv:`` (empty): the demo card, the repository's ``fixtures/certs/`` directory.
* ``piv:DIR``: a directory with files named by slot (key reference in hex, any case):
  ``<slot>.crt`` / ``.pem`` / ``.cer`` / ``.der`` (certificate, PEM or DER) with
  ``<slot>.key`` (private key: PEM or DER, PKCS#8 or traditional, encrypted or not),
  or ``<slot>.p12`` / ``.pfx`` (PKCS#12 bundle).  ``<slot>.pass`` holds the passphrase
  of an encrypted key or bundle (first line).  Slots: 9a 9c 9d 9e, retired 82-95 and
  f9 (the attestation key and certificate).  PIN, PUK and management key are the PIV
  defaults (123456, 12345678, 3DES 0102..08); keys have their slot's default policies.
* ``piv:FILE.toml``: a card profile (paths relative to the file)::

      pin = "123456"                # optional, the defaults shown
      puk = "12345678"
      pin_retries = 3
      puk_retries = 3
      management_key = "010203040506070801020304050607080102030405060708"
      management_key_algorithm = "3des"     # or aes128, aes192, aes256
      guid = "00112233445566778899aabbccddeeff"   # CHUID GUID (OpenSC's token serial)
      serial = 1234                 # GET SERIAL; also makes the GUID when guid is absent
      label = "my test card"
      identity = "ccidemu"          # or "yubikey5": a YubiKey 5's ATR, name, management app
      firmware = "5.7.1"            # GET VERSION; gates the Yubico extensions
      form_factor = "unknown"       # or usb-a-keychain, usb-c-nano, ... (attestation)
      atr = "nfc"                   # yubikey5 only: "nfc" or "usb" ATR
      [slots.9a]
      cert = "9a.crt"
      key = "9a.key"
      passphrase = "secret"         # or passphrase_file = "9a.pass"
      pin_policy = "once"           # default per slot; or never, always
      touch_policy = "never"        # or always, cached
      [slots.9c]
      p12 = "9c.p12"
      [objects]                     # optional extra objects: tag (hex) = file with
      5fc109 = "printed.bin"        # the object's value (inside the 53 wrapper)

State that commands change (PIN, PUK, retry counters, management key, generated and
imported keys with their policies, objects written with PUT DATA) is saved in
``CardOptions.state_dir`` as ``piv-<hash of the argument>.json`` after every change,
atomically (temporary file, fsync, rename).  Keys, policies and objects are saved only
where they differ from the files, so later edits of the certificate files still show.
Delete the state file to start over.
``read_only`` keeps changes in memory; ``state_dir=None`` too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm as UnsupportedAlgorithmError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519
from cryptography.hazmat.primitives.serialization import pkcs12

from ccidemu.card import Card
from ccidemu.cards import CardOptions
from ccidemu.cards.piv import (
    DEFAULT_MANAGEMENT_KEY,
    DEFAULT_PIN,
    DEFAULT_PUK,
    DEFAULT_RETRIES,
    KEY_SLOTS,
    MANAGEMENT_KEY_LENGTHS,
    Algorithm,
    BlockingPivCard,
    KeyPolicy,
    Origin,
    PinPolicy,
    PivCard,
    PivState,
    PrivateKey,
    TouchPolicy,
    default_objects,
    is_valid_object_tag,
    key_algorithm,
    valid_reference,
)
from ccidemu.cards.yubikey import (
    FORM_FACTOR_NAMES,
    AtrKind,
    FormFactor,
    Identity,
    Kind,
    default_serial,
    parse_version,
)
from ccidemu.certs import key_pem
from ccidemu.errors import ConfigError
from ccidemu.files import ensure_private_dir, remove_temporaries, write_atomically
from ccidemu.tlv import ber_encode

log = logging.getLogger(__name__)

STATE_FORMAT = 2  # 1: before key policies (still read)
CERT_SUFFIXES = (".crt", ".pem", ".cer", ".der")
P12_SUFFIXES = (".p12", ".pfx")
MANAGEMENT_ALGORITHMS = {
    "3des": Algorithm.TDES, "tdes": Algorithm.TDES, "aes128": Algorithm.AES128,
    "aes192": Algorithm.AES192, "aes256": Algorithm.AES256,
}
_PROFILE_KEYS = {"pin", "puk", "pin_retries", "puk_retries", "management_key",
                 "management_key_algorithm", "guid", "serial", "label", "slots", "objects",
                 "identity", "firmware", "form_factor", "atr"}
_SLOT_KEYS = {"cert", "key", "p12", "passphrase", "passphrase_file", "pin_policy",
              "touch_policy"}
PIN_POLICIES = {"never": PinPolicy.NEVER, "once": PinPolicy.ONCE, "always": PinPolicy.ALWAYS}
TOUCH_POLICIES = {"never": TouchPolicy.NEVER, "always": TouchPolicy.ALWAYS,
                  "cached": TouchPolicy.CACHED}


def demo_directory() -> Path:
    """The demo card's files: ``fixtures/certs`` of the source tree this module lives in."""
    return Path(__file__).resolve().parents[2] / "fixtures" / "certs"


@dataclass
class CardConfig:
    """What the files say: the card's initial state, before any saved changes."""

    source: str  # what the state file is keyed by (resolved path)
    label: str
    state: PivState
    certs: dict[int, bytes] = field(default_factory=dict)
    identity: Identity = field(default_factory=Identity)


# --- reading keys and certificates ---------------------------------------------------


def _read(path: Path, slot: str) -> bytes:
    _note(path)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"slot {slot}: cannot read {path}: {exc.strerror or exc}") from None


def load_certificate(path: Path, slot: str) -> x509.Certificate:
    """A PEM or DER X.509 certificate; ConfigError naming the file and the slot."""
    data = _read(path, slot)
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise ConfigError(f"slot {slot}: {path} is not an X.509 certificate: {exc}") from None


def _check_key_type(key: object, path: Path | str, slot: str) -> PrivateKey:
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
                      | ed25519.Ed25519PrivateKey | x25519.X25519PrivateKey):
        raise ConfigError(f"slot {slot}: {path}: {type(key).__name__} is not RSA, ECC, "
                          "Ed25519 or X25519")
    try:
        key_algorithm(key)
    except ValueError as exc:
        raise ConfigError(f"slot {slot}: {path}: {exc} (RSA 1024-4096, P-256, P-384, "
                          "Ed25519, X25519)") from None
    return key


def load_private_key(path: Path, slot: str, passphrase: bytes | None = None) -> PrivateKey:
    """PEM or DER, PKCS#8 or traditional, encrypted or not; ConfigError naming file + slot."""
    data = _read(path, slot)
    loader = (serialization.load_pem_private_key if b"-----BEGIN" in data
              else serialization.load_der_private_key)
    try:
        key = loader(data, passphrase)
    except TypeError:
        if passphrase is None:
            raise ConfigError(
                f"slot {slot}: {path} is encrypted and no passphrase was given") from None
        try:  # a passphrase for an unencrypted key: harmless
            key = loader(data, None)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"slot {slot}: cannot load key {path}: {exc}") from None
    except ValueError as exc:
        why = "wrong passphrase or not a private key" if passphrase else "not a private key"
        raise ConfigError(f"slot {slot}: cannot load key {path} ({why}): {exc}") from None
    except UnsupportedAlgorithmError as exc:
        raise ConfigError(f"slot {slot}: {path}: unsupported key: {exc}") from None
    return _check_key_type(key, path, slot)


def load_pkcs12(path: Path, slot: str, passphrase: bytes | None
                ) -> tuple[PrivateKey, x509.Certificate]:
    """The key and certificate of a PKCS#12 bundle; ConfigError naming file + slot."""
    data = _read(path, slot)
    try:
        key, cert, _ = pkcs12.load_key_and_certificates(data, passphrase)
    except ValueError as exc:
        raise ConfigError(
            f"slot {slot}: cannot open PKCS#12 {path} (wrong passphrase?): {exc}") from None
    except UnsupportedAlgorithmError as exc:
        raise ConfigError(f"slot {slot}: {path}: unsupported: {exc}") from None
    if key is None or cert is None:
        raise ConfigError(f"slot {slot}: {path} lacks a private key or a certificate")
    return _check_key_type(key, path, slot), cert


def _spki(public_key: Any) -> bytes:
    data: bytes = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return data


def check_pair(key: PrivateKey, cert: x509.Certificate, slot: str, where: Path) -> None:
    """ConfigError unless the certificate's public key is the key's."""
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise ConfigError(f"slot {slot}: the certificate and key in {where} do not match")


def _load_slot(name: str, files: Path | tuple[Path, Path], passphrase: bytes | None
               ) -> tuple[PrivateKey, bytes]:
    """One slot's key and DER certificate: ``files`` is a PKCS#12 bundle or (cert, key)."""
    if isinstance(files, Path):
        key, cert = load_pkcs12(files, name, passphrase)
        where = files
    else:
        cert = load_certificate(files[0], name)
        where = files[1]
        key = load_private_key(where, name, passphrase)
    check_pair(key, cert, name, where)
    return key, cert.public_bytes(serialization.Encoding.DER)


def _default_guid(source: str) -> bytes:
    """The CHUID GUID of a card without ``guid`` or ``serial``: from its source path."""
    return hashlib.sha256(b"ccidemu-piv-guid:" + source.encode()).digest()[:16]


def _slot_number(name: str) -> int | None:
    try:
        value = int(name, 16)
    except ValueError:
        return None
    return value if value in KEY_SLOTS and len(name) == 2 else None


# --- directory and profile ---------------------------------------------------------


def _passphrase_file(path: Path, slot: str) -> bytes:
    lines = _read(path, slot).splitlines()
    return lines[0] if lines else b""


def load_directory(directory: Path) -> CardConfig:
    """A card from ``<slot>.crt``/``.key``/``.p12`` files (see the module docstring)."""
    if not directory.is_dir():
        raise ConfigError(f"{directory}: not a directory")
    by_slot: dict[int, dict[str, Path]] = {}
    for path in sorted(directory.iterdir()):
        slot = _slot_number(path.stem.lower())
        if slot is None or not path.is_file():
            continue
        suffix = path.suffix.lower()
        kind = ("cert" if suffix in CERT_SUFFIXES else "key" if suffix == ".key"
                else "p12" if suffix in P12_SUFFIXES else "pass" if suffix == ".pass" else None)
        if kind is None:
            continue
        found = by_slot.setdefault(slot, {})
        if kind in found:
            raise ConfigError(
                f"slot {slot:02x}: both {found[kind].name} and {path.name} in {directory}")
        found[kind] = path
    state = PivState()
    certs: dict[int, bytes] = {}
    for slot, files in sorted(by_slot.items()):
        name = f"{slot:02x}"
        passphrase = _passphrase_file(files["pass"], name) if "pass" in files else None
        slot_files: Path | tuple[Path, Path]
        if "p12" in files:
            if "cert" in files or "key" in files:
                raise ConfigError(f"slot {name}: give either {files['p12'].name} or "
                                  f"certificate + key files in {directory}, not both")
            slot_files = files["p12"]
        elif "cert" in files and "key" in files:
            slot_files = (files["cert"], files["key"])
        elif "cert" in files:
            raise ConfigError(f"slot {name}: {files['cert']} has no key file "
                              f"({name}.key) in {directory}")
        elif "key" in files:
            raise ConfigError(f"slot {name}: {files['key']} has no certificate file "
                              f"({name}.crt) in {directory}")
        else:
            continue
        state.keys[slot], certs[slot] = _load_slot(name, slot_files, passphrase)
    source = str(directory.resolve())
    if not certs:
        log.warning("piv:%s has no slot files (9a.crt and 9a.key, 9c.p12, ...): the card "
                    "starts with no keys or certificates", directory)
    state.objects = default_objects(certs, _default_guid(source))
    return CardConfig(source, directory.resolve().name, state, certs,
                      Identity(serial=default_serial(source)))


def _reference(value: Any, what: str, path: Path) -> bytes:
    if not isinstance(value, str):
        raise ConfigError(f"{path}: {what} must be a string")
    raw = value.encode()
    if not valid_reference(raw):
        raise ConfigError(f"{path}: {what} must be 6 to 8 characters")
    return raw


def _retries(value: Any, what: str, path: Path) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 255:
        raise ConfigError(f"{path}: {what} must be an integer from 1 to 255")
    return value


def _choice(value: Any, choices: dict[str, Any], what: str, where: str) -> Any:
    name = str(value).lower()
    if name not in choices:
        raise ConfigError(f"{where}: {what} {value!r} is not one of {', '.join(choices)}")
    return choices[name]


def _identity(profile: dict[str, Any], path: Path, source: str) -> Identity:
    """The ``identity``, ``firmware``, ``serial``, ``form_factor`` and ``atr`` settings."""
    kind = _choice(profile.get("identity", "ccidemu"), {k.value: k for k in Kind},
                   "identity", str(path))
    try:
        version = parse_version(text_setting(profile, "firmware", str(path),
                                             Identity().version_text))
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    serial = profile.get("serial")
    if serial is None:
        serial = default_serial(source)
    elif isinstance(serial, bool) or not isinstance(serial, int) or not 0 <= serial < 2**32:
        raise ConfigError(f"{path}: serial must be an integer from 0 to 4294967295")
    form_factor: FormFactor = _choice(profile.get("form_factor", "unknown"),
                                      FORM_FACTOR_NAMES, "form_factor", str(path))
    atr_kind: AtrKind = _choice(profile.get("atr", "nfc"), {a.value: a for a in AtrKind},
                                "atr", str(path))
    if "atr" in profile and kind is not Kind.YUBIKEY5:
        raise ConfigError(f"{path}: atr is a setting of identity = \"yubikey5\"")
    return Identity(kind, version, serial, form_factor, atr_kind)


def _slot_policy(entry: dict[str, Any], slot: int, where: str) -> KeyPolicy | None:
    """A slot's ``pin_policy`` / ``touch_policy`` (None: the slot's defaults)."""
    if "pin_policy" not in entry and "touch_policy" not in entry:
        return None
    default = PivState().policy(slot)
    pin = (_choice(entry["pin_policy"], PIN_POLICIES, "pin_policy", where)
           if "pin_policy" in entry else default.pin)
    touch = (_choice(entry["touch_policy"], TOUCH_POLICIES, "touch_policy", where)
             if "touch_policy" in entry else default.touch)
    return KeyPolicy(pin, touch, Origin.IMPORTED)


def _hex(value: Any, what: str, path: Path) -> bytes:
    if not isinstance(value, str):
        raise ConfigError(f"{path}: {what} must be a string of hex digits")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise ConfigError(f"{path}: {what} is not hex: {value!r}") from None


def read_profile(path: Path) -> dict[str, Any]:
    """A card profile's TOML table; ConfigError naming the file for anything unreadable."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read card profile {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"card profile {path} is not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"card profile {path} is nested too deeply") from None


def text_setting(table: dict[str, Any], key: str, where: str, default: str = "") -> str:
    """``table[key]`` when it is a string (``default`` when absent); ConfigError otherwise."""
    value = table.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {key} must be a string, not {type(value).__name__}")
    return value


@dataclass
class KeyFiles:
    """Where a profile entry's key and certificate are: a PKCS#12 bundle or a cert/key pair,
    with the passphrase given inline, in a file, or not at all."""

    files: Path | tuple[Path, Path]
    passphrase: bytes | None = None
    passphrase_file: Path | None = None


def key_files(entry: dict[str, Any], base: Path, where: str) -> KeyFiles:
    """The ``cert``/``key``/``p12``/``passphrase``/``passphrase_file`` keys of a profile's
    slot or PKI entry (``where`` names it in errors); file names are relative to ``base``."""
    found = KeyFiles(base)
    if "passphrase" in entry:
        found.passphrase = text_setting(entry, "passphrase", where).encode()
    elif "passphrase_file" in entry:
        found.passphrase_file = base / text_setting(entry, "passphrase_file", where)
    if "p12" in entry:
        if "cert" in entry or "key" in entry:
            raise ConfigError(f"{where} has p12 and cert/key")
        found.files = base / text_setting(entry, "p12", where)
    elif "cert" in entry and "key" in entry:
        found.files = (base / text_setting(entry, "cert", where),
                       base / text_setting(entry, "key", where))
    else:
        raise ConfigError(f"{where} needs cert and key, or p12")
    return found


def load_profile(path: Path) -> CardConfig:
    """A card from a TOML profile (see the module docstring)."""
    _note(path)
    profile = read_profile(path)
    unknown = set(profile) - _PROFILE_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown settings {', '.join(sorted(unknown))}")
    base = path.parent
    state = PivState(
        pin=_reference(profile.get("pin", DEFAULT_PIN.decode()), "pin", path),
        puk=_reference(profile.get("puk", DEFAULT_PUK.decode()), "puk", path),
        pin_retries=_retries(profile.get("pin_retries", DEFAULT_RETRIES), "pin_retries", path),
        puk_retries=_retries(profile.get("puk_retries", DEFAULT_RETRIES), "puk_retries", path),
    )
    state.pin_left, state.puk_left = state.pin_retries, state.puk_retries
    algorithm_name = text_setting(profile, "management_key_algorithm", str(path), "3des").lower()
    if algorithm_name not in MANAGEMENT_ALGORITHMS:
        raise ConfigError(f"{path}: management_key_algorithm {algorithm_name!r} is not one of "
                          f"{', '.join(MANAGEMENT_ALGORITHMS)}")
    algorithm = MANAGEMENT_ALGORITHMS[algorithm_name]
    key_length = MANAGEMENT_KEY_LENGTHS[algorithm]
    management_key = (_hex(profile["management_key"], "management_key", path)
                      if "management_key" in profile else DEFAULT_MANAGEMENT_KEY)
    if len(management_key) != key_length:
        raise ConfigError(f"{path}: management_key must be {key_length} bytes for "
                          f"{algorithm_name}")
    state.management_key, state.management_algorithm = management_key, algorithm
    slots = profile.get("slots", {})
    if not isinstance(slots, dict):
        raise ConfigError(f"{path}: [slots] must be a table")
    certs: dict[int, bytes] = {}
    for name, entry in slots.items():
        slot = _slot_number(str(name).lower())
        if slot is None:
            raise ConfigError(
                f"{path}: [slots.{name}] is not a PIV key slot (9a 9c 9d 9e 82-95 f9)")
        name = f"{slot:02x}"
        if not isinstance(entry, dict) or set(entry) - _SLOT_KEYS:
            raise ConfigError(f"{path}: [slots.{name}] takes only {', '.join(sorted(_SLOT_KEYS))}")
        found = key_files(entry, base, f"{path}: [slots.{name}]")
        passphrase = (_passphrase_file(found.passphrase_file, name)
                      if found.passphrase_file is not None else found.passphrase)
        state.keys[slot], certs[slot] = _load_slot(name, found.files, passphrase)
        policy = _slot_policy(entry, slot, f"{path}: [slots.{name}]")
        if policy is not None:
            state.policies[slot] = policy
    source = str(path.resolve())
    identity = _identity(profile, path, source)
    if "guid" in profile:
        guid = _hex(profile["guid"], "guid", path)
        if len(guid) != 16:
            raise ConfigError(f"{path}: guid must be 16 bytes (32 hex digits)")
    elif "serial" in profile:
        guid = hashlib.sha256(f"ccidemu-piv-serial:{profile['serial']}".encode()).digest()[:16]
    else:
        guid = _default_guid(source)
    state.objects = default_objects(certs, guid)
    objects = profile.get("objects", {})
    if not isinstance(objects, dict):
        raise ConfigError(f"{path}: [objects] must be a table")
    for tag_text, file_name in objects.items():
        tag = int.from_bytes(_hex(tag_text, f"object tag {tag_text}", path), "big")
        if not is_valid_object_tag(tag) or tag in (0x7E, 0x7F61):
            raise ConfigError(f"{path}: [objects] {tag_text} is not a PIV data object tag")
        if not isinstance(file_name, str):
            raise ConfigError(f"{path}: [objects] {tag_text} must name a file (a string)")
        value = _read(base / file_name, f"object {tag_text}")
        state.objects[tag] = ber_encode(0x53, value)
    label = text_setting(profile, "label", str(path), path.stem)
    return CardConfig(source, label, state, certs, identity)


# --- parsed once per spec ---------------------------------------------------------------
#
# Parsing a card's files (loading and checking its keys) takes tens of milliseconds; a daemon
# serving a thousand VMs with the same card spec parses it once.  A cached parse is reused
# while every file it read (and the directory listing, for a directory card) is unchanged;
# each VM still gets its own copy of the state (StateStore.load copies).

_reading: list[Path] | None = None
_CACHE: dict[str, tuple[list[Path], tuple[object, ...], CardConfig]] = {}
_CACHE_SIZE = 64


def _note(path: Path) -> None:
    if _reading is not None:
        _reading.append(path)


def _signature(paths: list[Path], directory: Path | None) -> tuple[object, ...]:
    items: list[object] = []
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            items.append((str(path), None))
            continue
        items.append((str(path), st.st_mtime_ns, st.st_size, st.st_ino))
    if directory is not None:
        try:
            items.append(tuple(sorted(p.name for p in directory.iterdir())))
        except OSError:
            items.append(None)
    return tuple(items)


def load_config(argument: str) -> CardConfig:
    """The card an argument of ``piv:`` names (empty = the demo card); parsed once while its
    files stay the same (see above)."""
    global _reading
    directory = _directory_of(argument)
    hit = _CACHE.get(argument)
    if hit is not None:
        paths, signature, cached = hit
        if _signature(paths, directory) == signature:
            return cached
    _reading = []
    try:
        config = _load_config(argument)
        read = list(_reading)
    finally:
        _reading = None
    if len(_CACHE) >= _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[argument] = (read, _signature(read, directory), config)
    return config


def _directory_of(argument: str) -> Path | None:
    path = demo_directory() if not argument else Path(argument).expanduser()
    return path if path.is_dir() else None


def _load_config(argument: str) -> CardConfig:
    """The card an argument of ``piv:`` names (empty = the demo card)."""
    if not argument:
        directory = demo_directory()
        if not directory.is_dir():
            raise ConfigError(f"the demo PIV card needs {directory} (a source checkout); "
                              "give piv:DIR or piv:PROFILE.toml")
        config = load_directory(directory)
        config.label = "demo"
        return config
    path = Path(argument).expanduser()
    if path.is_dir():
        return load_directory(path)
    if path.suffix.lower() == ".toml":
        return load_profile(path)
    if not path.exists():
        raise ConfigError(f"piv:{argument}: no such directory or profile")
    raise ConfigError(f"piv:{argument}: give a directory of slot files or a .toml profile")


# --- state persistence -------------------------------------------------------------


def state_path(state_dir: Path, source: str) -> Path:
    """``piv-<16 hex of sha256(source)>.json`` in ``state_dir``."""
    return state_dir / f"piv-{hashlib.sha256(source.encode()).hexdigest()[:16]}.json"


def state_to_json(state: PivState, initial: PivState, source: str) -> dict[str, Any]:
    """The saved form: counters and secrets always, keys/objects where they differ."""
    initial_keys = {slot: key_pem(k).decode() for slot, k in initial.keys.items()}
    keys: dict[str, str | None] = {}
    for slot, key in state.keys.items():
        pem = key_pem(key).decode()
        if initial_keys.get(slot) != pem:
            keys[f"{slot:02x}"] = pem
    for slot in initial.keys.keys() - state.keys.keys():
        keys[f"{slot:02x}"] = None
    objects: dict[str, str | None] = {}
    for tag, value in state.objects.items():
        if initial.objects.get(tag) != value:
            objects[f"{tag:x}"] = value.hex()
    for tag in initial.objects.keys() - state.objects.keys():
        objects[f"{tag:x}"] = None
    policies: dict[str, list[int] | None] = {}
    for slot, policy in state.policies.items():
        if initial.policies.get(slot) != policy:
            policies[f"{slot:02x}"] = [int(policy.pin), int(policy.touch), int(policy.origin)]
    for slot in initial.policies.keys() - state.policies.keys():
        policies[f"{slot:02x}"] = None
    return {
        "format": STATE_FORMAT,
        "card": source,
        "pin": state.pin.hex(),
        "puk": state.puk.hex(),
        "pin_retries": state.pin_retries,
        "puk_retries": state.puk_retries,
        "pin_left": state.pin_left,
        "puk_left": state.puk_left,
        "management_key": state.management_key.hex(),
        "management_algorithm": int(state.management_algorithm),
        "management_touch": state.management_touch,
        "keys": keys,
        "policies": policies,
        "objects": objects,
    }


def state_from_json(data: Any, initial: PivState) -> PivState:
    """Apply a saved form to the initial state.

    KeyError/ValueError/TypeError (or ConfigError for an unsupported key) if bad.
    """
    if not isinstance(data, dict) or data.get("format") not in (1, STATE_FORMAT):
        raise ValueError(f"not a ccidemu PIV state (format 1 or {STATE_FORMAT})")
    state = replace(initial, keys=dict(initial.keys), objects=dict(initial.objects),
                    policies=dict(initial.policies))
    state.pin = bytes.fromhex(data["pin"])
    state.puk = bytes.fromhex(data["puk"])
    for name in ("pin_retries", "puk_retries", "pin_left", "puk_left"):
        value = data[name]
        lowest = 0 if name.endswith("_left") else 1  # a maximum of 0 tries is no PIN
        if not isinstance(value, int) or isinstance(value, bool) or not lowest <= value <= 255:
            raise ValueError(f"{name} {value!r} out of range")
        setattr(state, name, value)
    if not valid_reference(state.pin) or not valid_reference(state.puk):
        raise ValueError("PIN/PUK must be 6 to 8 bytes")
    if state.pin_left > state.pin_retries or state.puk_left > state.puk_retries:
        raise ValueError("more tries left than the maximum")
    state.management_key = bytes.fromhex(data["management_key"])
    algorithm = data["management_algorithm"]
    if isinstance(algorithm, bool) or not isinstance(algorithm, int):
        raise ValueError(f"management_algorithm {algorithm!r} is not a number")
    state.management_algorithm = Algorithm(algorithm)
    if MANAGEMENT_KEY_LENGTHS.get(state.management_algorithm) != len(state.management_key):
        raise ValueError("management key length does not fit its algorithm")
    touch = data.get("management_touch", False)
    if not isinstance(touch, bool):
        raise ValueError(f"management_touch {touch!r} is not true or false")
    state.management_touch = touch
    for slot_text, pem in dict(data["keys"]).items():
        slot = int(slot_text, 16)
        if slot not in KEY_SLOTS:
            raise ValueError(f"bad slot {slot_text}")
        if pem is None:
            state.keys.pop(slot, None)
            continue
        key = serialization.load_pem_private_key(pem.encode(), None)
        state.keys[slot] = _check_key_type(key, "saved key", slot_text)
    for slot_text, saved in dict(data.get("policies", {})).items():
        slot = int(slot_text, 16)
        if slot not in KEY_SLOTS:
            raise ValueError(f"bad slot {slot_text}")
        if saved is None:
            state.policies.pop(slot, None)
            continue
        pin, touch_policy, origin = saved  # ValueError/TypeError unless three values
        policy = KeyPolicy(PinPolicy(pin), TouchPolicy(touch_policy), Origin(origin))
        if PinPolicy.DEFAULT in (policy.pin,) or policy.touch == TouchPolicy.DEFAULT:
            raise ValueError(f"slot {slot_text}: unresolved policy")
        state.policies[slot] = policy
    for tag_text, value in dict(data["objects"]).items():
        tag = int(tag_text, 16)
        if value is None:
            state.objects.pop(tag, None)
        else:
            state.objects[tag] = bytes.fromhex(value)
    return state


class StateStore:
    """Loads and saves one card's state file (``None`` path = memory only)."""

    def __init__(
        self, path: Path | None, initial: PivState, source: str, *, writable: bool = True
    ) -> None:
        """``writable``: changes will be saved, so the state directory is made (0700) or
        checked now, and temporaries an interrupted save left behind are removed."""
        self.path = path
        self._initial = initial
        self._source = source
        if path is not None and writable:
            ensure_private_dir(path.parent, "state directory")
            remove_temporaries(path)

    def load(self) -> PivState:
        """The saved state applied to the initial one; ConfigError naming a corrupt file."""
        fresh = replace(self._initial, keys=dict(self._initial.keys),
                        objects=dict(self._initial.objects),
                        policies=dict(self._initial.policies))
        if self.path is None or not self.path.exists():
            return fresh
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            state = state_from_json(data, self._initial)
        except OSError as exc:
            raise ConfigError(f"cannot read PIV card state {self.path}: {exc}") from None
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError,
                UnsupportedAlgorithmError, ConfigError) as exc:
            raise ConfigError(f"PIV card state {self.path} is corrupt ({exc}); "
                              "delete it to start from the card files") from None
        log.info("PIV card state loaded from %s", self.path)
        return state

    def save(self, state: PivState) -> None:
        if self.path is None:
            return
        payload = json.dumps(state_to_json(state, self._initial, self._source), indent=1)
        write_atomically(self.path, payload.encode() + b"\n")  # mkstemp: mode 0600
        log.debug("PIV card state saved to %s", self.path)


def open_piv_card(argument: str, options: CardOptions) -> Card:
    """The ``piv:`` card factory (see the module docstring for the argument)."""
    config = load_config(argument)
    path = (None if options.state_dir is None
            else state_path(Path(options.state_dir), config.source))
    store = StateStore(path, config.state, config.source, writable=not options.read_only)
    state = store.load()
    on_change = None if options.read_only or path is None else store.save
    if options.touch is None:
        return PivCard(state, on_change=on_change, label=config.label,
                       identity=config.identity)
    # a runtime-supplied touch sensor may wait: the card runs off the event loop
    return BlockingPivCard(state, on_change=on_change, label=config.label,
                           identity=config.identity, touch=options.touch)
