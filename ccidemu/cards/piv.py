"""The PIV card engine: NIST SP 800-73-4 parts 1 (data model) and 2 (card commands), with
the Yubico PIV extensions (``docs/YUBIKEY.md``).

Pure: no file I/O, no clocks.  Everything a command can change lives in one
:class:`PivState`; after each change the engine calls ``on_change(state)`` (which
:mod:`ccidemu.cards.piv_files` uses to persist it).  Commands go through the shared
:class:`~ccidemu.cards.iso.IsoDispatcher` (chaining, GET RESPONSE, status words).

Theory of operation: the PIV application is the card's default application (SP 800-73-4
part 2 section 3.1.1); SELECT by its full or right-truncated AID answers the application
property template.  A ``yubikey5`` identity also has the YubiKey management application
(:mod:`ccidemu.cards.yubikey`), selected by its AID; SELECT of PIV comes back.

Security status (SP 800-73-4 part 1 section 4.2): ``pin_verified`` after a good VERIFY,
cleared by VERIFY P1=FF, power-off and a SELECT of the PIV application; ``pin_always``
set by a good VERIFY and consumed by one use of a key whose PIN policy is "always";
``admin`` after management key (9B) authentication, needed by GENERATE ASYMMETRIC KEY
PAIR, PUT DATA and the Yubico key and management commands.

Every key slot has a PIN policy and a touch policy (Yubico extension, tags AA and AB of
GENERATE and IMPORT): "never" (no PIN), "once" (``pin_verified``), "always"
(``pin_always``); the defaults are SP 800-73-4's access rules (9C always, 9E never, the
others once).  A key whose touch policy is "always" or "cached" asks the card's touch
sensor before each use (:data:`TouchSensor`): by default the touch is pressed at once; an
adapter may give a sensor that waits (and run the card off its event loop,
:class:`BlockingPivCard`).  The card itself never waits and never reads a clock.

Supported instructions (SP 800-73-4 part 2 section 3; Yubico extensions marked Y):
A4 SELECT, CB GET DATA, DB PUT DATA, 20 VERIFY, 24 CHANGE REFERENCE DATA,
2C RESET RETRY COUNTER, 87 GENERAL AUTHENTICATE, 47 GENERATE ASYMMETRIC KEY PAIR,
FD GET VERSION (Y), F8 GET SERIAL (Y), F7 GET METADATA (Y), FE IMPORT ASYMMETRIC KEY (Y),
FF SET MANAGEMENT KEY (Y), FA SET PIN RETRIES (Y), FB RESET (Y), F6 MOVE/DELETE KEY (Y),
F9 ATTEST (Y).  The firmware version of the card's identity gates the Yubico ones as the
real firmware does (:class:`ccidemu.cards.yubikey.Features`).  No command returns private
key material.
"""

from __future__ import annotations

import hmac
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import ClassVar

from cryptography import x509
from cryptography.exceptions import InvalidKey, UnsupportedAlgorithm
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ccidemu import rsa_raw
from ccidemu.apdu import CommandApdu
from ccidemu.cards.iso import IsoDispatcher
from ccidemu.cards.piv_attest import attestation_certificate
from ccidemu.cards.yubikey import (
    DEFAULT_VERSION,
    MANAGEMENT_AID,
    Features,
    Identity,
    Kind,
    ManagementApplet,
)
from ccidemu.errors import DecodeError, StatusWordError
from ccidemu.sw import SW
from ccidemu.tlv import (
    Tlv,
    ber_decode,
    ber_decode_one,
    ber_encode,
    ber_encode_tlvs,
    ber_length,
)

log = logging.getLogger(__name__)

PrivateKey = (rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
              | x25519.X25519PrivateKey)

#: The PIV application identifier (SP 800-73-4 part 1 section 2.2): RID A000000308, PIX
#: 00001000 0100 (application 0x1000, version 0x0100).
PIV_AID = bytes.fromhex("A000000308000010000100")
PIV_RID = PIV_AID[:5]
PIV_PIX = PIV_AID[5:]
#: The shortest right-truncated AID accepted by SELECT (the RID, as yubico-piv-tool sends).
MIN_SELECT_AID = 5

#: The default identity's ATR (``ccidemu.cards.yubikey.CCIDEMU_ATR``): ISO/IEC 7816-4
#: historical bytes (category 80, card capabilities, issuer's data "ccidemu").  Not a
#: YubiKey's: YubiKey historical bytes switch OpenSC into YubiKey quirks.
ATR = Identity().atr

PIN_MAX_LENGTH = 8
PIN_MIN_LENGTH = 6
DEFAULT_PIN = b"123456"
DEFAULT_PUK = b"12345678"
DEFAULT_MANAGEMENT_KEY = bytes.fromhex("010203040506070801020304050607080102030405060708")
DEFAULT_RETRIES = 3
MAX_RETRIES = 255  # SET PIN RETRIES takes one byte; 63Cx shows at most 15


class Algorithm(IntEnum):
    """Cryptographic mechanism identifiers (SP 800-78-4 table 6-2; 05/16/E0/E1 Yubico)."""

    TDES_DEFAULT = 0x00  # "3 key TDES" for the card management key (SP 800-78-4)
    TDES = 0x03
    RSA3072 = 0x05
    RSA1024 = 0x06
    RSA2048 = 0x07
    AES128 = 0x08
    AES192 = 0x0A
    AES256 = 0x0C
    ECCP256 = 0x11
    ECCP384 = 0x14
    RSA4096 = 0x16
    ED25519 = 0xE0
    X25519 = 0xE1


class KeyRef(IntEnum):
    """Key references (SP 800-73-4 part 1 table 4; F9 Yubico's attestation key)."""

    PIN = 0x80
    PUK = 0x81
    AUTHENTICATION = 0x9A
    MANAGEMENT = 0x9B
    SIGNATURE = 0x9C
    KEY_MANAGEMENT = 0x9D
    CARD_AUTHENTICATION = 0x9E
    ATTESTATION = 0xF9


class PinPolicy(IntEnum):
    """PIN policy of a key (Yubico extension, tag AA; MATCH_* need a fingerprint sensor)."""

    DEFAULT = 0x00
    NEVER = 0x01
    ONCE = 0x02
    ALWAYS = 0x03
    MATCH_ONCE = 0x04
    MATCH_ALWAYS = 0x05


class TouchPolicy(IntEnum):
    """Touch policy of a key (Yubico extension, tag AB)."""

    DEFAULT = 0x00
    NEVER = 0x01
    ALWAYS = 0x02
    CACHED = 0x03  # a touch counts for 15 s (the sensor keeps that time, not the card)


class Origin(IntEnum):
    """Where a key came from (GET METADATA tag 03)."""

    GENERATED = 0x01
    IMPORTED = 0x02


RETIRED_SLOTS = tuple(range(0x82, 0x96))
#: Slots whose key GENERAL AUTHENTICATE uses.
ASYMMETRIC_SLOTS = (0x9A, 0x9C, 0x9D, 0x9E, *RETIRED_SLOTS)
_ASYMMETRIC_SLOT_SET = frozenset(ASYMMETRIC_SLOTS)
#: Slots that hold a private key: the above and the attestation key F9.
KEY_SLOTS = (*ASYMMETRIC_SLOTS, KeyRef.ATTESTATION)
_KEY_SLOT_SET = frozenset(KEY_SLOTS)


def default_pin_policy(slot: int) -> PinPolicy:
    """SP 800-73-4 part 1 table 4b as YubiKeys apply it: 9C always, 9E and F9 never,
    the others once."""
    if slot == KeyRef.SIGNATURE:
        return PinPolicy.ALWAYS
    if slot in (KeyRef.CARD_AUTHENTICATION, KeyRef.ATTESTATION):
        return PinPolicy.NEVER
    return PinPolicy.ONCE


class ObjectTag(IntEnum):
    """BER-TLV tags of the PIV data objects (SP 800-73-4 part 1 table 3; 5FFFxx Yubico)."""

    CARD_CAPABILITY_CONTAINER = 0x5FC107
    CHUID = 0x5FC102
    CERT_9A = 0x5FC105
    FINGERPRINTS = 0x5FC103
    SECURITY_OBJECT = 0x5FC106
    FACIAL_IMAGE = 0x5FC108
    PRINTED_INFORMATION = 0x5FC109
    CERT_9C = 0x5FC10A
    CERT_9D = 0x5FC10B
    CERT_9E = 0x5FC101
    KEY_HISTORY = 0x5FC10C
    IRIS_IMAGES = 0x5FC121
    DISCOVERY = 0x7E
    BIOMETRIC_GROUP = 0x7F61
    ADMIN_DATA = 0x5FFF00  # ykman's "pivman" data
    CERT_F9 = 0x5FFF01  # the attestation certificate


#: Certificate object per key reference (SP 800-73-4 part 1 tables 3 and 4; F9 Yubico).
CERT_OBJECTS: dict[int, int] = {
    0x9A: ObjectTag.CERT_9A,
    0x9C: ObjectTag.CERT_9C,
    0x9D: ObjectTag.CERT_9D,
    0x9E: ObjectTag.CERT_9E,
    **{slot: 0x5FC10D + i for i, slot in enumerate(RETIRED_SLOTS)},
    0xF9: ObjectTag.CERT_F9,
}

#: The certificate objects of the retired key slots 82-95 (5FC10D-5FC120).
_RETIRED_CERT_OBJECTS = frozenset(CERT_OBJECTS[slot] for slot in RETIRED_SLOTS)
_KEY_HISTORY = int(ObjectTag.KEY_HISTORY)

#: Objects whose read needs the PIN (SP 800-73-4 part 1 table 3, "access rule for read").
PIN_PROTECTED_OBJECTS = frozenset(
    {ObjectTag.FINGERPRINTS, ObjectTag.FACIAL_IMAGE, ObjectTag.PRINTED_INFORMATION,
     ObjectTag.IRIS_IMAGES}
)
#: What RESET keeps: the fixed Discovery object and the attestation certificate.
_KEPT_BY_RESET = frozenset({int(ObjectTag.DISCOVERY), int(ObjectTag.CERT_F9)})


def is_valid_object_tag(tag: int) -> bool:
    """A tag this card stores: the SP 800-73-4 objects and YubiKey's 5FFF00-5FFF15."""
    return (0x5FC101 <= tag <= 0x5FC123 or tag in (0x7E, 0x7F61)
            or 0x5FFF00 <= tag <= 0x5FFF15)


# --- data object builders (SP 800-73-4 part 1 appendix A) ------------------------------


def cert_object(der: bytes) -> bytes:
    """X.509 certificate object (part 1 table 10..15): 53 { 70 cert, 71 CertInfo 00, FE LRC }."""
    return ber_encode(0x53, ber_encode_tlvs([(0x70, der), (0x71, b"\x00"), (0xFE, b"")]))


def ccc_object(card_id: bytes) -> bytes:
    """Card Capability Container (part 1 table 8); ``card_id`` is 14 bytes.

    F0 card identifier = GSC-RID A0 00 00 01 16, manufacturer FF, card type 02, card id;
    F1/F2 container and grammar version 21; F5 data model 10 (PIV); the rest empty.
    """
    ident = bytes.fromhex("A000000116FF02") + card_id[:14].ljust(14, b"\x00")
    return ber_encode(0x53, ber_encode_tlvs([
        (0xF0, ident), (0xF1, b"\x21"), (0xF2, b"\x21"), (0xF3, b""), (0xF4, b"\x00"),
        (0xF5, b"\x10"), (0xF6, b""), (0xF7, b""), (0xFA, b""), (0xFB, b""), (0xFC, b""),
        (0xFD, b""), (0xFE, b""),
    ]))


def fascn(agency: str = "9999", system: str = "9999", credential: str = "999999",
          cs: str = "0", ici: str = "1", pi: str = "0000000000", oc: str = "3",
          oi: str = "0000", poa: str = "1") -> bytes:
    """A FASC-N (TIG SCEPACS section 6.6): 40 characters of 4-bit BCD + odd parity, 25 bytes.

    Each character is its four data bits least significant first, then a parity bit
    making the count of ones odd.  SS=B, FS=D, ES=F, then the LRC (XOR of the data bits).
    """
    chars = [0xB, *map(int, agency), 0xD, *map(int, system), 0xD, *map(int, credential),
             0xD, int(cs), 0xD, int(ici), 0xD, *map(int, pi), int(oc), *map(int, oi),
             int(poa), 0xF]
    lrc = 0
    for c in chars:
        lrc ^= c
    chars.append(lrc)
    bits = ""
    for c in chars:
        data = "".join("1" if c >> i & 1 else "0" for i in range(4))
        bits += data + ("0" if data.count("1") % 2 else "1")
    return int(bits, 2).to_bytes(25, "big")


def chuid_object(guid: bytes, expiry: str = "20491231", fasc_n: bytes | None = None) -> bytes:
    """CHUID (part 1 table 9): 30 FASC-N, 34 GUID, 35 expiry YYYYMMDD, 3E signature, FE.

    The issuer asymmetric signature (3E) is empty: a test card has no content signer.
    """
    return ber_encode(0x53, ber_encode_tlvs([
        (0x30, fasc_n or fascn()), (0x34, guid), (0x35, expiry.encode()),
        (0x3E, b""), (0xFE, b""),
    ]))


def discovery_object() -> bytes:
    """Discovery object (part 1 table 18): 7E { 4F PIV AID, 5F2F PIN usage policy 40 00 }.

    Policy byte 1 = 40: the PIV Card Application PIN only; byte 2 = 00.
    """
    return ber_encode(0x7E, ber_encode_tlvs([(0x4F, PIV_AID), (0x5F2F, b"\x40\x00")]))


def key_history_object(on_card: int, off_card: int = 0) -> bytes:
    """Key History (part 1 table 19): C1 keys with on-card certs, C2 off-card, FE."""
    return ber_encode(0x53, ber_encode_tlvs([
        (0xC1, bytes((on_card,))), (0xC2, bytes((off_card,))), (0xFE, b""),
    ]))


def application_property_template(label: str = "", features: Features | None = None
                                  ) -> bytes:
    """SELECT response (part 2 section 3.1.1, table 3): 61 { 4F PIX, 79 { 4F RID }, 50, AC }.

    AC lists the algorithms the card has (80 each, then 06 empty), as far as its firmware
    version allows them.
    """
    features = features or Features(DEFAULT_VERSION)
    supported = [Algorithm.TDES, Algorithm.RSA1024, Algorithm.RSA2048]
    if features.large_rsa:
        supported += [Algorithm.RSA3072, Algorithm.RSA4096]
    if features.aes_management_key:
        supported += [Algorithm.AES128, Algorithm.AES192, Algorithm.AES256]
    supported.append(Algorithm.ECCP256)
    if features.policies:
        supported.append(Algorithm.ECCP384)
    if features.curve25519:
        supported += [Algorithm.ED25519, Algorithm.X25519]
    algorithms_ = b"".join(ber_encode(0x80, bytes((a,))) for a in supported)
    items: list[tuple[int, bytes]] = [(0x4F, PIV_PIX), (0x79, ber_encode(0x4F, PIV_RID))]
    if label:
        items.append((0x50, label.encode()[:32]))
    items.append((0xAC, algorithms_ + ber_encode(0x06, b"")))
    return ber_encode(0x61, ber_encode_tlvs(items))


# --- state ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    """The policies and origin of the key in one slot (never DEFAULT: resolved on entry)."""

    pin: PinPolicy
    touch: TouchPolicy = TouchPolicy.NEVER
    origin: Origin = Origin.IMPORTED


@dataclass
class PivState:
    """Everything the card's commands can change (persisted by piv_files)."""

    pin: bytes = DEFAULT_PIN
    puk: bytes = DEFAULT_PUK
    pin_retries: int = DEFAULT_RETRIES  # the maximum (reset value)
    puk_retries: int = DEFAULT_RETRIES
    pin_left: int = DEFAULT_RETRIES
    puk_left: int = DEFAULT_RETRIES
    management_key: bytes = DEFAULT_MANAGEMENT_KEY
    management_algorithm: int = Algorithm.TDES
    management_touch: bool = False  # SET MANAGEMENT KEY P2=FE: authentication needs touch
    keys: dict[int, PrivateKey] = field(default_factory=dict)  # key reference -> key
    #: key reference -> policies and origin; a key without an entry has its slot's
    #: default PIN policy, no touch, and counts as imported (it came from a file)
    policies: dict[int, KeyPolicy] = field(default_factory=dict)
    objects: dict[int, bytes] = field(default_factory=dict)  # tag -> GET DATA answer

    def policy(self, slot: int) -> KeyPolicy:
        found = self.policies.get(slot)
        return found if found is not None else KeyPolicy(default_pin_policy(slot))


def default_objects(certs: dict[int, bytes], guid: bytes) -> dict[int, bytes]:
    """CCC, CHUID, Discovery, Key History and the certificate objects for ``certs``."""
    objects: dict[int, bytes] = {
        ObjectTag.CARD_CAPABILITY_CONTAINER: ccc_object(guid[:14]),
        ObjectTag.CHUID: chuid_object(guid),
        ObjectTag.DISCOVERY: discovery_object(),
        ObjectTag.KEY_HISTORY: key_history_object(
            sum(1 for slot in certs if slot in RETIRED_SLOTS)),
    }
    for slot, der in certs.items():
        objects[CERT_OBJECTS[slot]] = cert_object(der)
    return {int(k): v for k, v in objects.items()}


_RSA_SIZES: dict[int, int] = {Algorithm.RSA1024: 1024, Algorithm.RSA2048: 2048,
                              Algorithm.RSA3072: 3072, Algorithm.RSA4096: 4096}
_RSA_ALGORITHMS: dict[int, int] = {size: algorithm for algorithm, size in _RSA_SIZES.items()}
_EC_CURVES: dict[int, ec.EllipticCurve] = {Algorithm.ECCP256: ec.SECP256R1(),
                                           Algorithm.ECCP384: ec.SECP384R1()}
#: Card management key length in bytes per algorithm.
MANAGEMENT_KEY_LENGTHS: dict[int, int] = {Algorithm.TDES: 24, Algorithm.AES128: 16,
                                          Algorithm.AES192: 24, Algorithm.AES256: 32}
_RSA_EXPONENT = 65537


def valid_reference(value: bytes) -> bool:
    """Whether ``value`` (unpadded) can be a PIN or PUK: 6 to 8 bytes, none of them FF."""
    return PIN_MIN_LENGTH <= len(value) <= PIN_MAX_LENGTH and b"\xff" not in value


def key_algorithm(key: PrivateKey) -> int:
    """The SP 800-78-4 (or Yubico) algorithm identifier of a private key; ValueError if
    the card cannot hold it."""
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size in _RSA_ALGORITHMS:
            return _RSA_ALGORITHMS[key.key_size]
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        if isinstance(key.curve, ec.SECP256R1):
            return Algorithm.ECCP256
        if isinstance(key.curve, ec.SECP384R1):
            return Algorithm.ECCP384
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        return Algorithm.ED25519
    elif isinstance(key, x25519.X25519PrivateKey):
        return Algorithm.X25519
    raise ValueError(f"unsupported key type for PIV: {type(key).__name__}")


def generate_private_key(algorithm: int) -> PrivateKey:
    """A new key for a GENERATE ASYMMETRIC KEY PAIR algorithm; KeyError if unknown."""
    if algorithm in _RSA_SIZES:
        return rsa.generate_private_key(public_exponent=_RSA_EXPONENT,
                                        key_size=_RSA_SIZES[algorithm])
    if algorithm in _EC_CURVES:
        return ec.generate_private_key(_EC_CURVES[algorithm])
    if algorithm == Algorithm.ED25519:
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm == Algorithm.X25519:
        return x25519.X25519PrivateKey.generate()
    raise KeyError(algorithm)


def _big(value: bytes) -> int:
    return int.from_bytes(value, "big")


def import_private_key(algorithm: int, fields: dict[int, bytes]) -> PrivateKey:
    """The key of an IMPORT ASYMMETRIC KEY data field (Yubico extension).

    RSA: 01 p, 02 q, 03 dP, 04 dQ, 05 qInv (RFC 8017 section 3.2, second representation;
    each at most half the modulus long, e = 65537); EC: 06 the private scalar (SEC 1
    section 2.3.6, the field size long); 07 Ed25519 and 08 X25519 private keys (RFC 8032
    section 5.1.5, RFC 7748 section 5: 32 bytes).  StatusWordError 6A80 for anything that
    is not such a key (wrong lengths, inconsistent CRT values, a scalar out of range).
    """
    def need(tag: int) -> bytes:
        value = fields.get(tag)
        if value is None:
            raise StatusWordError(SW.WRONG_DATA, f"missing tag {tag:02X}")
        return value

    if algorithm in _RSA_SIZES:
        size = _RSA_SIZES[algorithm]
        parts = [need(tag) for tag in (0x01, 0x02, 0x03, 0x04, 0x05)]
        if any(len(part) > size // 16 for part in parts):
            raise StatusWordError(SW.WRONG_DATA, "RSA component longer than half the key")
        p, q, dp, dq, qinv = (_big(part) for part in parts)
        n = p * q
        if n.bit_length() != size or p < 3 or q < 3:
            raise StatusWordError(SW.WRONG_DATA, f"p * q is not a {size}-bit modulus")
        try:
            d = pow(_RSA_EXPONENT, -1, math.lcm(p - 1, q - 1))
        except ValueError:
            raise StatusWordError(SW.WRONG_DATA, "e is not invertible") from None
        try:
            consistent = (dp, dq, qinv) == (d % (p - 1), d % (q - 1), pow(q, -1, p))
        except ValueError:  # q not invertible modulo p (p = q, or a common factor)
            consistent = False
        if not consistent:
            raise StatusWordError(SW.WRONG_DATA, "inconsistent RSA CRT components")
        numbers = rsa.RSAPrivateNumbers(p, q, d, dp, dq, qinv,
                                        rsa.RSAPublicNumbers(_RSA_EXPONENT, n))
        try:
            return numbers.private_key()
        except ValueError as exc:
            raise StatusWordError(SW.WRONG_DATA, f"not an RSA key: {exc}") from None
    if algorithm in _EC_CURVES:
        curve = _EC_CURVES[algorithm]
        scalar = need(0x06)
        if len(scalar) != (curve.key_size + 7) // 8:
            raise StatusWordError(SW.WRONG_DATA, "EC private key of the wrong length")
        try:
            return ec.derive_private_key(_big(scalar), curve)
        except ValueError:
            raise StatusWordError(SW.WRONG_DATA, "EC private key out of range") from None
    if algorithm in (Algorithm.ED25519, Algorithm.X25519):
        tag = 0x07 if algorithm == Algorithm.ED25519 else 0x08
        raw = need(tag)
        if len(raw) != 32:
            raise StatusWordError(SW.WRONG_DATA, "Curve25519 private key must be 32 bytes")
        if algorithm == Algorithm.ED25519:
            return ed25519.Ed25519PrivateKey.from_private_bytes(raw)
        return x25519.X25519PrivateKey.from_private_bytes(raw)
    raise StatusWordError(SW.INCORRECT_P1P2, f"algorithm {algorithm:02X}")


# PKCS#1 v1.5 DigestInfo prefixes (RFC 8017 section 9.2, note 1).
_DIGEST_INFO: dict[bytes, Prehashed] = {
    bytes.fromhex("3021300906052b0e03021a05000414"): Prehashed(hashes.SHA1()),
    bytes.fromhex("302d300d06096086480165030402040500041c"): Prehashed(hashes.SHA224()),
    bytes.fromhex("3031300d060960864801650304020105000420"): Prehashed(hashes.SHA256()),
    bytes.fromhex("3041300d060960864801650304020205000430"): Prehashed(hashes.SHA384()),
    bytes.fromhex("3051300d060960864801650304020305000440"): Prehashed(hashes.SHA512()),
}
_PKCS1V15 = padding.PKCS1v15()
try:  # PKCS#1 v1.5 signatures over arbitrary T: cryptography 47 and later
    from cryptography.hazmat.primitives.asymmetric.utils import NoDigestInfo

    _NO_DIGEST_INFO: NoDigestInfo | None = NoDigestInfo()
except ImportError:  # pragma: no cover - older cryptography: the integer path instead
    _NO_DIGEST_INFO = None
_PREFIX_LENGTH = 19  # SHA-1's is 15; all others 19


def _raw_rsa(key: rsa.RSAPrivateKey, block: bytes) -> bytes:
    """The raw RSA private operation block^d mod n (RFC 8017 section 5.1.2, RSADP/RSASP1).

    The card must return the exact result for whatever block the host padded (PIV
    GENERAL AUTHENTICATE is raw RSA), but ``cryptography`` offers no unpadded private
    operation (pyca/cryptography issue 2735: deliberately unsupported).  So:

    1. a PKCS#1 v1.5 type 1 block (00 01, at least 8 FF, 00, T) is exactly what
       OpenSSL's deterministic PKCS#1 v1.5 signature computes: T is signed there, with
       ``Prehashed`` when T is a known DigestInfo, else (TLS 1.0 MD5+SHA-1, unknown
       hashes) with ``NoDigestInfo`` (cryptography 47 and later);
    2. anything else (decryption of type 2 / OAEP blocks, host-side PSS, raw blocks)
       goes to OpenSSL's unpadded private operation (:mod:`ccidemu.rsa_raw`; the result
       cannot be had from ``key.decrypt``: it returns the message without the random
       padding the card must give back);
    3. without OpenSSL 3, Python integers (CRT, about 5 ms for RSA-2048, blinded: c * r^e,
       result times r^-1, so the timing does not follow the host's input, though the
       exponent's own timing is not hidden).
    """
    k = (key.key_size + 7) // 8
    if len(block) != k:
        raise StatusWordError(SW.WRONG_DATA, f"RSA input of {len(block)} bytes, need {k}")
    if block[:2] == b"\x00\x01":
        sep = block.find(b"\x00", 2)
        if sep >= 10 and block[2:sep] == b"\xff" * (sep - 2):
            info = block[sep + 1:]
            for prefix_len in (15, _PREFIX_LENGTH):
                algorithm = _DIGEST_INFO.get(info[:prefix_len])
                if algorithm is not None and len(info) == prefix_len + algorithm.digest_size:
                    return key.sign(info[prefix_len:], _PKCS1V15, algorithm)
            if _NO_DIGEST_INFO is not None:
                return key.sign(info, _PKCS1V15, _NO_DIGEST_INFO)
    try:
        return rsa_raw.raw_key(key).private_op(block)  # OpenSSL: ~1 ms, GIL released
    except rsa_raw.RawRsaError as exc:
        raise StatusWordError(SW.WRONG_DATA, str(exc)) from None


_ECDSA_BY_SIZE: dict[int, ec.ECDSA] = {
    32: ec.ECDSA(Prehashed(hashes.SHA256())), 48: ec.ECDSA(Prehashed(hashes.SHA384())),
}


def _ecdsa_sign(key: ec.EllipticCurvePrivateKey, digest: bytes) -> bytes:
    """ECDSA over a host-computed hash (FIPS 186-4 section 6.4), DER Ecdsa-Sig-Value out.

    The hash is fitted to the field size: left-padded with zeros when shorter (same
    integer), cut to its leftmost bytes when longer (FIPS 186-4 section 6.4 truncation).
    """
    size = (key.curve.key_size + 7) // 8
    if not digest:
        raise StatusWordError(SW.WRONG_DATA, "empty ECDSA input")
    fitted = digest if len(digest) == size else digest[:size].rjust(size, b"\x00")
    return key.sign(fitted, _ECDSA_BY_SIZE[size])


@dataclass(frozen=True, slots=True)
class _SlotKey:
    """What GENERAL AUTHENTICATE needs of one slot's key, worked out once per key.

    Exactly one of ``rsa_key`` / ``ec_key`` / ``ed_key`` / ``x_key`` is set (each is
    ``key``, typed); for EC keys ``size`` is the field size in bytes and ``ecdsa`` the
    signature algorithm object for a hash of exactly that size.  ``pin`` and ``touch`` are
    the slot's policies.
    """

    key: PrivateKey
    algorithm: int
    rsa_key: rsa.RSAPrivateKey | None
    ec_key: ec.EllipticCurvePrivateKey | None
    size: int
    ecdsa: ec.ECDSA | None
    pin: PinPolicy
    touch: TouchPolicy
    ed_key: ed25519.Ed25519PrivateKey | None = None
    x_key: x25519.X25519PrivateKey | None = None


def _slot_key(key: PrivateKey, policy: KeyPolicy) -> _SlotKey:
    algorithm = key_algorithm(key)
    pin, touch = policy.pin, policy.touch
    if isinstance(key, rsa.RSAPrivateKey):
        return _SlotKey(key, algorithm, key, None, 0, None, pin, touch)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        size = (key.curve.key_size + 7) // 8
        return _SlotKey(key, algorithm, None, key, size, _ECDSA_BY_SIZE[size], pin, touch)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return _SlotKey(key, algorithm, None, None, 0, None, pin, touch, ed_key=key)
    return _SlotKey(key, algorithm, None, None, 0, None, pin, touch, x_key=key)


def _challenge_forms(largest: int) -> dict[int, tuple[bytes, int]]:
    """Total length -> (header, header length) of ``7C { 82 00, 81 challenge }``.

    The form every client sends to sign or decrypt (part 2 section 3.2.4), with the
    shortest BER lengths.  The total length decides the
    challenge length (it grows with it), so one dict lookup and one ``startswith``
    recognise the template without decoding it.  Other encodings (82 after 81, long
    length forms) go through the general decoder and end the same way.
    """
    forms: dict[int, tuple[bytes, int]] = {}
    for size in range(1, largest + 1):
        inner = b"\x82\x00\x81" + ber_length(size)
        header = b"\x7c" + ber_length(len(inner) + size) + inner
        forms[len(header) + size] = (header, len(header))
    return forms


#: Challenges up to 512 bytes: RSA-4096 blocks and every hash.
_CHALLENGE_FORMS = _challenge_forms(512)


def _auth_response(result: bytes) -> bytes:
    """The response template 7C { 82 result } (part 2 section 3.2.4)."""
    n = len(result)
    if n < 0x7E:  # both lengths in short form
        return bytes((0x7C, n + 2, 0x82, n)) + result
    inner = b"\x82" + ber_length(n) + result
    return b"\x7c" + ber_length(len(inner)) + inner


# --- the card ----------------------------------------------------------------------------

INS_SELECT = 0xA4
INS_GET_DATA = 0xCB
INS_PUT_DATA = 0xDB
INS_VERIFY = 0x20
INS_CHANGE_REFERENCE_DATA = 0x24
INS_RESET_RETRY_COUNTER = 0x2C
INS_GENERAL_AUTHENTICATE = 0x87
INS_GENERATE_KEY_PAIR = 0x47
# Yubico extensions (developers.yubico.com "PIV / Yubico extensions")
INS_MOVE_KEY = 0xF6
INS_GET_METADATA = 0xF7
INS_GET_SERIAL = 0xF8
INS_ATTEST = 0xF9
INS_SET_PIN_RETRIES = 0xFA
INS_RESET = 0xFB
INS_GET_VERSION = 0xFD
INS_IMPORT_KEY = 0xFE
INS_SET_MANAGEMENT_KEY = 0xFF

_TAG_PIN_POLICY = 0xAA
_TAG_TOUCH_POLICY = 0xAB
#: GET METADATA tags (Yubico): algorithm, policy, origin, public key, default, retries.
_META_ALGORITHM, _META_POLICY, _META_ORIGIN, _META_PUBLIC, _META_DEFAULT, _META_RETRIES = (
    0x01, 0x02, 0x03, 0x04, 0x05, 0x06)
_META_PIN_ALGORITHM = b"\xff"
#: Plain ints for the signing hot path (an enum member lookup costs more).
_PIN_ONCE, _PIN_ALWAYS, _TOUCH_NEVER = int(PinPolicy.ONCE), int(PinPolicy.ALWAYS), int(
    TouchPolicy.NEVER)
_DELETE = 0xFF  # MOVE KEY P1: delete the key in P2


@dataclass(frozen=True, slots=True)
class TouchRequest:
    """A key use that needs a touch: the slot (9B for the management key) and its policy
    (ALWAYS or CACHED)."""

    slot: int
    policy: TouchPolicy


#: The touch sensor: called when a key needs a touch; True when the user touched.  A sensor
#: that waits must live on the adapter side (it may read clocks, sleep, wait for a
#: ``ctl`` command) and its card must be a :class:`BlockingPivCard`.
TouchSensor = Callable[[TouchRequest], bool]


def touch_pressed(request: TouchRequest) -> bool:
    """The default sensor: the touch is pressed at once."""
    return True


#: Instructions that compute with a private key or make one (CostHint).
_HEAVY_INS = frozenset({0x87, 0x47, 0xFE, 0xF9})  # F9 ATTEST signs a certificate
#: Instructions that may change the saved state (VERIFY counts failed tries).
_WRITING_INS = frozenset({0x20, 0x24, 0x2C, 0xDB, 0xFF, 0xFA, 0xFB, 0xF6})


def management_cipher(algorithm: int, key: bytes) -> Cipher[modes.ECB]:
    """The block cipher of a management key (3DES or AES, SP 800-78-4 table 4), ECB."""
    if algorithm in (Algorithm.TDES, Algorithm.TDES_DEFAULT):
        return Cipher(TripleDES(key), modes.ECB())
    return Cipher(algorithms.AES(key), modes.ECB())


def _template(data: bytes, tag: int) -> list[Tlv]:
    """The children of the single TLV ``tag`` that must fill ``data`` exactly."""
    try:
        outer, end = ber_decode_one(data)
        if outer.tag != tag or end != len(data):
            raise StatusWordError(SW.WRONG_DATA, f"expected one {tag:X} template")
        return ber_decode(outer.value)
    except DecodeError as exc:
        raise StatusWordError(SW.WRONG_DATA, str(exc)) from None


def _fields(items: list[Tlv]) -> dict[int, bytes]:
    """Tag -> value of a list of TLVs; a repeated tag is 6A80."""
    out: dict[int, bytes] = {}
    for item in items:
        if item.tag in out:
            raise StatusWordError(SW.WRONG_DATA, f"tag {item.tag:X} repeated")
        out[item.tag] = item.value
    return out


def _strip_pin(padded: bytes) -> bytes:
    return padded.rstrip(b"\xff")


def _pad_pin(pin: bytes) -> bytes:
    return pin.ljust(PIN_MAX_LENGTH, b"\xff")


def _check_new_reference(value: bytes) -> bytes:
    stripped = _strip_pin(value)
    if not valid_reference(stripped):
        raise StatusWordError(SW.WRONG_DATA, "new PIN/PUK must be 6 to 8 bytes")
    return stripped


def _certificate_of(obj: bytes | None) -> x509.Certificate | None:
    """The X.509 certificate inside a certificate object (53 { 70 cert ... }), if any."""
    if obj is None:
        return None
    try:
        outer, _ = ber_decode_one(obj)
        for item in ber_decode(outer.value):
            if item.tag == 0x70:
                return x509.load_der_x509_certificate(item.value)
    except (DecodeError, ValueError):
        return None
    return None


class PivCard:
    """An emulated PIV card (implements :class:`ccidemu.card.Card`)."""

    blocking: ClassVar[bool] = False
    ATR: ClassVar[bytes] = ATR

    def __init__(
        self,
        state: PivState,
        *,
        on_change: Callable[[PivState], None] | None = None,
        label: str = "",
        rng: Callable[[int], bytes] = os.urandom,
        identity: Identity | None = None,
        touch: TouchSensor = touch_pressed,
    ) -> None:
        self.state = state
        self.identity = identity or Identity()
        self.features = self.identity.features
        self._on_change = on_change
        self._label = label
        self._rng = rng
        self._touch = touch
        #: touch requests so far (tests and the runtime can see that a touch was asked)
        self.touch_requests = 0
        self._select_response = application_property_template(label, self.features)
        # slot -> what signing with that slot's key needs (dropped when the key changes)
        self._slot_keys: dict[int, _SlotKey] = {}
        handlers = {
            INS_SELECT: self._select,
            INS_GET_DATA: self._get_data,
            INS_PUT_DATA: self._put_data,
            INS_VERIFY: self._verify,
            INS_CHANGE_REFERENCE_DATA: self._change_reference_data,
            INS_RESET_RETRY_COUNTER: self._reset_retry_counter,
            INS_GENERAL_AUTHENTICATE: self._general_authenticate,
            INS_GENERATE_KEY_PAIR: self._generate,
            INS_GET_VERSION: self._get_version,
            INS_IMPORT_KEY: self._import_key,
            INS_SET_MANAGEMENT_KEY: self._set_management_key,
            INS_SET_PIN_RETRIES: self._set_pin_retries,
            INS_RESET: self._reset,
        }
        features = self.features
        if features.serial:
            handlers[INS_GET_SERIAL] = self._get_serial
        if features.metadata:
            handlers[INS_GET_METADATA] = self._get_metadata
        if features.attestation:
            handlers[INS_ATTEST] = self._attest
        if features.move_key:
            handlers[INS_MOVE_KEY] = self._move_key
        self._piv = IsoDispatcher(
            handlers,
            chaining=(INS_PUT_DATA, INS_GENERAL_AUTHENTICATE, INS_GET_DATA, INS_IMPORT_KEY),
        )
        self._management: ManagementApplet | None = None
        self._management_dispatcher: IsoDispatcher | None = None
        if self.identity.kind is Kind.YUBIKEY5:
            applet = ManagementApplet(self.identity)
            self._management = applet
            self._management_dispatcher = IsoDispatcher(
                {INS_SELECT: self._select, 0x1D: applet.handle})
        self._dispatcher = self._piv
        self._reset_security()

    # -- Card protocol --

    @property
    def name(self) -> str:
        kind = "YubiKey 5 PIV" if self.identity.kind is Kind.YUBIKEY5 else "PIV"
        return kind + (f" ({self._label})" if self._label else "")

    def power_on(self) -> bytes:
        self._dispatcher = self._piv
        self._reset_security()
        return self.identity.atr

    def power_off(self) -> None:
        self._reset_security()

    def transmit(self, apdu: bytes) -> bytes:
        return self._dispatcher.process(apdu)

    def costly(self, apdu: bytes) -> bool:
        """:class:`ccidemu.card.CostHint`: private-key operations, key generation and, when
        the state is saved to disk, every command that can change it."""
        if len(apdu) < 2:
            return False
        ins = apdu[1]
        return ins in _HEAVY_INS or (self._on_change is not None and ins in _WRITING_INS)

    # -- helpers --

    def _reset_security(self) -> None:
        self.pin_verified = False
        self.pin_always = False
        self.admin = False
        self._witness: bytes | None = None
        self._challenge: bytes | None = None
        self._piv.reset()
        if self._management_dispatcher is not None:
            self._management_dispatcher.reset()

    def _changed(self) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change(self.state)
        except Exception as exc:
            log.error("could not save the PIV card state: %s", exc)
            raise StatusWordError(SW.MEMORY_FAILURE, "state not saved") from None

    def _require_admin(self) -> None:
        if not self.admin:
            raise StatusWordError(SW.SECURITY_STATUS_NOT_SATISFIED, "management key needed")

    def _ask_touch(self, slot: int, policy: TouchPolicy) -> None:
        """Ask the sensor for a touch; 6985 when it was not given."""
        self.touch_requests += 1
        if not self._touch(TouchRequest(slot, policy)):
            raise StatusWordError(SW.CONDITIONS_NOT_SATISFIED, "no touch")

    def _store_key(self, slot: int, key: PrivateKey, policy: KeyPolicy) -> None:
        self.state.keys[slot] = key
        self.state.policies[slot] = policy
        self._slot_keys.pop(slot, None)

    def _drop_key(self, slot: int) -> None:
        self.state.keys.pop(slot, None)
        self.state.policies.pop(slot, None)
        self._slot_keys.pop(slot, None)

    # -- SELECT (part 2 section 3.1.1) --

    def _select(self, cmd: CommandApdu) -> bytes:
        if cmd.p1 != 0x04:
            raise StatusWordError(SW.INCORRECT_P1P2)
        if self._management is not None and cmd.data == MANAGEMENT_AID:
            assert self._management_dispatcher is not None
            self._reset_security()
            self._dispatcher = self._management_dispatcher
            return self._management.select_response()
        if len(cmd.data) < MIN_SELECT_AID or not PIV_AID.startswith(cmd.data):
            # SP 800-73-4 part 2 section 3.1.1: an AID the card does not know leaves the
            # selected application selected and its security status unchanged.
            raise StatusWordError(SW.FILE_NOT_FOUND)
        # A SELECT of the PIV application itself starts a fresh session: PIN, "PIN
        # always" and management key status are cleared.  Section 3.1.1 does not
        # mandate this for re-selecting the already selected application (it only
        # fixes the unknown-AID case above), so either choice conforms; we reset as a
        # YubiKey does because (a) yubico-piv-tool relies on it (its "status" expects
        # VERIFY without data to answer 63Cx after its own SELECT) and (b) QEMU never
        # passes guest resets to the card (docs/PROTOCOL.md, "VSCard"), so SELECT is the
        # only sign a rebooted guest gives.  The Discovery object keeps OpenSC from
        # re-SELECTing on every lock (docs/PROTOCOL.md, "Real clients").  (Resetting the
        # dispatcher here is harmless: it dropped any pending response before this call,
        # and SELECT never arrives inside a command chain.)
        self._reset_security()
        self._dispatcher = self._piv
        return self._select_response

    # -- GET DATA / PUT DATA (part 2 sections 3.1.2 and 3.3.2) --

    @staticmethod
    def _tag_list(value: bytes) -> int:
        if not 1 <= len(value) <= 3:
            raise StatusWordError(SW.WRONG_DATA, "bad tag list")
        return int.from_bytes(value, "big")

    def _get_data(self, cmd: CommandApdu) -> bytes:
        if (cmd.p1, cmd.p2) != (0x3F, 0xFF):
            raise StatusWordError(SW.INCORRECT_P1P2)
        try:
            tlv, end = ber_decode_one(cmd.data)
        except DecodeError:
            raise StatusWordError(SW.WRONG_DATA) from None
        if tlv.tag != 0x5C or end != len(cmd.data):
            raise StatusWordError(SW.WRONG_DATA, "GET DATA needs one 5C tag list")
        tag = self._tag_list(tlv.value)
        if tag in PIN_PROTECTED_OBJECTS and not self.pin_verified:
            raise StatusWordError(SW.SECURITY_STATUS_NOT_SATISFIED)
        found = self.state.objects.get(tag)
        if found is None:
            raise StatusWordError(SW.FILE_NOT_FOUND)
        return found

    def _put_data(self, cmd: CommandApdu) -> bytes:
        if (cmd.p1, cmd.p2) != (0x3F, 0xFF):
            raise StatusWordError(SW.INCORRECT_P1P2)
        self._require_admin()
        try:
            tags, end = ber_decode_one(cmd.data)
            obj, end2 = ber_decode_one(cmd.data, end)
        except DecodeError:
            raise StatusWordError(SW.WRONG_DATA) from None
        if tags.tag != 0x5C or end2 != len(cmd.data):
            raise StatusWordError(SW.WRONG_DATA, "PUT DATA needs 5C tag then one object")
        tag = self._tag_list(tags.value)
        if not is_valid_object_tag(tag):
            raise StatusWordError(SW.WRONG_DATA, f"unknown object {tag:X}")
        expected = tag if tag in (ObjectTag.DISCOVERY, ObjectTag.BIOMETRIC_GROUP) else 0x53
        if obj.tag != expected:
            raise StatusWordError(SW.WRONG_DATA, f"object {tag:X} must be sent as {expected:X}")
        if obj.value:
            self.state.objects[tag] = obj.encode()
        else:
            self.state.objects.pop(tag, None)
        if tag in _RETIRED_CERT_OBJECTS:
            self._update_key_history()
        self._changed()
        return b""

    def _update_key_history(self) -> None:
        """Recount C1 of the Key History object after a retired certificate changed.

        SP 800-73-4 part 1 appendix A table 19: keysWithOnCardCerts (C1) is the
        number of retired keys whose certificate is on the card.  C2 (off-card
        certificates) and the F3 URL are the issuer's to set and are kept as stored.
        """
        objects = self.state.objects
        on_card = sum(1 for t in _RETIRED_CERT_OBJECTS if t in objects)
        old = objects.get(_KEY_HISTORY)
        items: list[tuple[int, bytes]] = []
        if old is not None:
            try:
                items = [(t.tag, t.value) for t in _template(old, 0x53)]
            except StatusWordError:  # unreadable: rebuilt from scratch
                items = []
        if not items:
            objects[_KEY_HISTORY] = key_history_object(on_card)
            return
        items = [(t, bytes((on_card,)) if t == 0xC1 else v) for t, v in items]
        if all(t != 0xC1 for t, _ in items):
            items.insert(0, (0xC1, bytes((on_card,))))
        objects[_KEY_HISTORY] = ber_encode(0x53, ber_encode_tlvs(items))

    # -- VERIFY, CHANGE REFERENCE DATA, RESET RETRY COUNTER (part 2 sections 3.2.1-3.2.3) --

    def _verify(self, cmd: CommandApdu) -> bytes:
        if cmd.p2 != KeyRef.PIN:
            raise StatusWordError(SW.REFERENCE_NOT_FOUND)
        if cmd.p1 == 0xFF:
            if cmd.data:
                raise StatusWordError(SW.WRONG_DATA)
            self.pin_verified = self.pin_always = False
            return b""
        if cmd.p1 != 0x00:
            raise StatusWordError(SW.INCORRECT_P1P2)
        state = self.state
        if state.pin_left <= 0:
            raise StatusWordError(SW.AUTH_METHOD_BLOCKED)
        if not cmd.data:
            if self.pin_verified:
                return b""
            raise StatusWordError(0x63C0 | min(state.pin_left, 15))
        if len(cmd.data) != PIN_MAX_LENGTH:
            raise StatusWordError(SW.WRONG_DATA, "PIN must be padded to 8 bytes")
        self._check_reference(KeyRef.PIN, cmd.data)
        self.pin_verified = self.pin_always = True
        if state.pin_left != state.pin_retries:
            state.pin_left = state.pin_retries
            self._changed()
        return b""

    def _check_reference(self, ref: int, given: bytes) -> None:
        """Compare ``given`` (8 bytes padded) with PIN or PUK, counting failures."""
        state = self.state
        left = state.pin_left if ref == KeyRef.PIN else state.puk_left
        if left <= 0:
            raise StatusWordError(SW.AUTH_METHOD_BLOCKED)
        current = state.pin if ref == KeyRef.PIN else state.puk
        if hmac.compare_digest(given, _pad_pin(current)):
            return
        left -= 1
        if ref == KeyRef.PIN:
            state.pin_left = left
            self.pin_verified = self.pin_always = False
        else:
            state.puk_left = left
        self._changed()
        raise StatusWordError(0x63C0 | min(left, 15))

    def _change_reference_data(self, cmd: CommandApdu) -> bytes:
        if cmd.p1 != 0x00:
            raise StatusWordError(SW.INCORRECT_P1P2)
        if cmd.p2 not in (KeyRef.PIN, KeyRef.PUK):
            raise StatusWordError(SW.REFERENCE_NOT_FOUND)
        if len(cmd.data) != 2 * PIN_MAX_LENGTH:
            raise StatusWordError(SW.WRONG_DATA, "old and new value, 8 bytes each")
        # the old value is checked (and counted) first, as a YubiKey does: clients block
        # the PIN and PUK before a RESET with all-FF values that are no valid new PIN
        self._check_reference(cmd.p2, cmd.data[:8])
        new = _check_new_reference(cmd.data[8:])
        if cmd.p2 == KeyRef.PIN:
            self.state.pin = new
            self.state.pin_left = self.state.pin_retries
        else:
            self.state.puk = new
            self.state.puk_left = self.state.puk_retries
        self._changed()
        return b""

    def _reset_retry_counter(self, cmd: CommandApdu) -> bytes:
        if cmd.p1 != 0x00:
            raise StatusWordError(SW.INCORRECT_P1P2)
        if cmd.p2 != KeyRef.PIN:
            raise StatusWordError(SW.REFERENCE_NOT_FOUND)
        if len(cmd.data) != 2 * PIN_MAX_LENGTH:
            raise StatusWordError(SW.WRONG_DATA, "PUK and new PIN, 8 bytes each")
        self._check_reference(KeyRef.PUK, cmd.data[:8])  # first, as in CHANGE REFERENCE
        new = _check_new_reference(cmd.data[8:])
        self.state.pin = new
        self.state.pin_left = self.state.pin_retries
        self.state.puk_left = self.state.puk_retries
        self._changed()
        return b""

    # -- GENERAL AUTHENTICATE (part 2 section 3.2.4) --

    def _general_authenticate(self, cmd: CommandApdu) -> bytes:
        data = cmd.data
        slot = cmd.p2
        form = _CHALLENGE_FORMS.get(len(data))
        if form is None or slot == 0x9B or not data.startswith(form[0]):
            return self._general_authenticate_template(cmd)
        # The signing hot path: 7C { 82 00, 81 challenge } to a key slot.  Same checks,
        # same order as _general_authenticate_template (the template is known valid).
        entry = self._slot_keys.get(slot)
        if (entry is None or entry.key is not self.state.keys.get(slot)
                or entry.algorithm != cmd.p1):
            entry = self._slot_key(slot, cmd.p1)  # (re)built, or the error raised
        pin = entry.pin  # access rules as in _check_key_access, inlined (plain ints)
        if pin == _PIN_ONCE:
            if not self.pin_verified:
                raise StatusWordError(SW.SECURITY_STATUS_NOT_SATISFIED, "PIN needed")
        elif pin == _PIN_ALWAYS:
            if not self.pin_always:
                raise StatusWordError(SW.SECURITY_STATUS_NOT_SATISFIED, "PIN always")
            self.pin_always = False
        if entry.touch != _TOUCH_NEVER:
            self._ask_touch(slot, entry.touch)
        challenge = data[form[1]:]
        if entry.ecdsa is not None and entry.ec_key is not None and len(challenge) == entry.size:
            return _auth_response(entry.ec_key.sign(challenge, entry.ecdsa))
        return _auth_response(self._challenge_operation(entry, challenge))

    def _general_authenticate_template(self, cmd: CommandApdu) -> bytes:
        """GENERAL AUTHENTICATE, any template (part 2 section 3.2.4)."""
        fields = _fields(_template(cmd.data, 0x7C))
        slot = cmd.p2
        if slot == KeyRef.MANAGEMENT:
            return self._management_auth(cmd.p1, fields)
        entry = self._slot_key(slot, cmd.p1)
        if fields.get(0x82) != b"" or len(fields) != 2:
            raise StatusWordError(SW.WRONG_DATA, "expected 82 00 with 81 or 85")
        data = fields.get(0x81)
        point = fields.get(0x85)
        if data is None and (point is None or (entry.ec_key is None and entry.x_key is None)):
            raise StatusWordError(SW.WRONG_DATA, "expected one of 81 or 85")
        self._check_key_access(slot, entry)
        if data is not None:
            result = self._challenge_operation(entry, data)
        elif entry.ec_key is not None and point is not None:
            result = self._ecdh(entry.ec_key, point)
        else:
            assert entry.x_key is not None and point is not None
            result = self._x25519(entry.x_key, point)
        return _auth_response(result)

    def _slot_key(self, slot: int, algorithm: int) -> _SlotKey:
        """The key of an asymmetric slot, checked against the command's algorithm."""
        if slot not in _ASYMMETRIC_SLOT_SET:
            raise StatusWordError(SW.REFERENCE_NOT_FOUND)
        key = self.state.keys.get(slot)
        if key is None:
            raise StatusWordError(SW.REFERENCE_NOT_FOUND, f"no key in slot {slot:02X}")
        entry = self._slot_keys.get(slot)
        if entry is None or entry.key is not key:
            entry = self._slot_keys[slot] = _slot_key(key, self.state.policy(slot))
        if algorithm != entry.algorithm:
            raise StatusWordError(SW.INCORRECT_P1P2, "algorithm does not match the key")
        return entry

    @staticmethod
    def _challenge_operation(entry: _SlotKey, data: bytes) -> bytes:
        """The 81 operation: raw RSA (signature or decryption), ECDSA of a hash, Ed25519
        of a message."""
        if entry.rsa_key is not None:
            return _raw_rsa(entry.rsa_key, data)
        if entry.ec_key is not None:
            return _ecdsa_sign(entry.ec_key, data)
        if entry.ed_key is not None:
            return entry.ed_key.sign(data)
        raise StatusWordError(SW.INCORRECT_P1P2, "X25519 keys only agree keys (85)")

    def _check_key_access(self, slot: int, entry: _SlotKey) -> None:
        """The slot's PIN policy (never, once: PIN verified, always: VERIFY just before),
        then its touch policy."""
        if entry.pin == PinPolicy.ALWAYS:
            if not self.pin_always:
                raise StatusWordError(SW.SECURITY_STATUS_NOT_SATISFIED, "PIN always")
            self.pin_always = False
        elif entry.pin == PinPolicy.ONCE and not self.pin_verified:
            raise StatusWordError(SW.SECURITY_STATUS_NOT_SATISFIED, "PIN needed")
        if entry.touch != TouchPolicy.NEVER:
            self._ask_touch(slot, entry.touch)

    @staticmethod
    def _ecdh(key: ec.EllipticCurvePrivateKey, point: bytes) -> bytes:
        """ECC CDH (SP 800-56A section 5.7.1.2): the x coordinate of d * Q."""
        try:
            peer = ec.EllipticCurvePublicKey.from_encoded_point(key.curve, point)
            return key.exchange(ec.ECDH(), peer)
        except (ValueError, InvalidKey, UnsupportedAlgorithm):
            raise StatusWordError(SW.WRONG_DATA, "bad peer point") from None

    @staticmethod
    def _x25519(key: x25519.X25519PrivateKey, point: bytes) -> bytes:
        """X25519 (RFC 7748 section 6.1): the shared secret with the peer's u-coordinate."""
        try:
            return key.exchange(x25519.X25519PublicKey.from_public_bytes(point))
        except (ValueError, UnsupportedAlgorithm):
            raise StatusWordError(SW.WRONG_DATA, "bad peer key") from None

    def _management_auth(self, algorithm: int, fields: dict[int, bytes]) -> bytes:
        """Card management key authentication (part 2 appendix A.1, flows of table 7).

        mutual:   {80 00} -> {80 E(W)};  {80 W, 81 C [, 82 00]} -> {82 E(C)}, admin
        external: {81 00} -> {81 C};     {82 E(C)} -> (empty), admin

        No other step exists for 9B: SP 800-73-4 part 2 appendix A defines internal
        authentication ({81 C, 82 00} -> {82 E(C)}) only for the symmetric card
        authentication key, and answering it here would encrypt any block the caller chose
        with the management key, so that anybody could answer the external challenge and
        become admin (docs/SECURITY.md).  The card encrypts a caller's block only in mutual
        step 2, after the caller decrypted the card's random witness, and every challenge
        and witness is good for one try.  Any failed or unknown step clears admin status.
        A management key set with the touch flag asks for a touch before admin is granted.
        """
        state = self.state
        if algorithm != state.management_algorithm and not (
            algorithm == Algorithm.TDES_DEFAULT and state.management_algorithm == Algorithm.TDES
        ):
            raise StatusWordError(SW.INCORRECT_P1P2, "management key algorithm mismatch")
        cipher = management_cipher(state.management_algorithm, state.management_key)
        block = 8 if state.management_algorithm == Algorithm.TDES else 16

        def encrypt(data: bytes) -> bytes:
            enc = cipher.encryptor()
            return enc.update(data) + enc.finalize()

        def grant() -> None:
            if state.management_touch:
                self._ask_touch(KeyRef.MANAGEMENT, TouchPolicy.ALWAYS)
            self.admin = True

        witness, challenge, response = fields.get(0x80), fields.get(0x81), fields.get(0x82)
        if set(fields) - {0x80, 0x81, 0x82}:
            raise StatusWordError(SW.WRONG_DATA)
        if witness == b"" and challenge is None and response is None:
            self.admin = False
            self._witness = self._rng(block)
            self._challenge = None
            return ber_encode(0x7C, ber_encode(0x80, encrypt(self._witness)))
        if witness and challenge and response in (None, b""):
            expected, self._witness = self._witness, None
            self.admin = False
            if expected is None or not hmac.compare_digest(witness, expected):
                raise StatusWordError(SW.SECURITY_STATUS_NOT_SATISFIED, "bad witness")
            if len(challenge) != block:
                raise StatusWordError(SW.WRONG_DATA)
            grant()
            return ber_encode(0x7C, ber_encode(0x82, encrypt(challenge)))
        if challenge == b"" and witness is None and response is None:
            self.admin = False
            self._challenge = self._rng(block)
            self._witness = None
            return ber_encode(0x7C, ber_encode(0x81, self._challenge))
        if response and witness is None and challenge is None:
            sent, self._challenge = self._challenge, None
            self.admin = False
            if sent is None or not hmac.compare_digest(response, encrypt(sent)):
                raise StatusWordError(SW.SECURITY_STATUS_NOT_SATISFIED, "bad response")
            grant()
            return b""
        self.admin = False
        self._witness = self._challenge = None
        raise StatusWordError(SW.WRONG_DATA, "unknown authentication step")

    # -- key policies (Yubico extension: tags AA and AB of GENERATE and IMPORT) --

    def _check_algorithm(self, algorithm: int) -> None:
        """6A80 for an algorithm this firmware version does not have."""
        features = self.features
        if algorithm == Algorithm.ECCP384 and not features.policies:
            raise StatusWordError(SW.WRONG_DATA, "P-384 needs firmware 4.0")
        if algorithm in (Algorithm.RSA3072, Algorithm.RSA4096) and not features.large_rsa:
            raise StatusWordError(SW.WRONG_DATA, "RSA 3072/4096 need firmware 5.7")
        if algorithm in (Algorithm.ED25519, Algorithm.X25519) and not features.curve25519:
            raise StatusWordError(SW.WRONG_DATA, "Ed25519/X25519 need firmware 5.7")

    def _policy(self, slot: int, fields: dict[int, bytes], origin: Origin) -> KeyPolicy:
        """The policies a GENERATE or IMPORT asks for (AA, AB), resolved and checked."""
        pin = PinPolicy.DEFAULT
        touch = TouchPolicy.DEFAULT
        for tag in (_TAG_PIN_POLICY, _TAG_TOUCH_POLICY):
            value = fields.get(tag)
            if value is None:
                continue
            if len(value) != 1:
                raise StatusWordError(SW.WRONG_DATA, f"policy {tag:02X} must be one byte")
            if not self.features.policies:
                raise StatusWordError(SW.WRONG_DATA, "policies need firmware 4.0")
            try:
                if tag == _TAG_PIN_POLICY:
                    pin = PinPolicy(value[0])
                else:
                    touch = TouchPolicy(value[0])
            except ValueError:
                raise StatusWordError(SW.WRONG_DATA, f"policy {value[0]:02X}") from None
        if pin in (PinPolicy.MATCH_ONCE, PinPolicy.MATCH_ALWAYS):
            raise StatusWordError(SW.WRONG_DATA, "no fingerprint sensor on this card")
        if touch == TouchPolicy.CACHED and not self.features.cached_touch:
            raise StatusWordError(SW.WRONG_DATA, "cached touch needs firmware 4.3")
        if pin == PinPolicy.DEFAULT:
            pin = default_pin_policy(slot)
        if touch == TouchPolicy.DEFAULT:
            touch = TouchPolicy.NEVER
        return KeyPolicy(pin, touch, origin)

    # -- GENERATE ASYMMETRIC KEY PAIR (part 2 section 3.3.2) --

    def _generate(self, cmd: CommandApdu) -> bytes:
        if cmd.p1 != 0x00:
            raise StatusWordError(SW.INCORRECT_P1P2)
        if cmd.p2 not in _KEY_SLOT_SET:
            raise StatusWordError(SW.INCORRECT_P1P2)
        self._require_admin()
        fields = _fields(_template(cmd.data, 0xAC))
        algorithm = fields.get(0x80)
        if algorithm is None or len(algorithm) != 1:
            raise StatusWordError(SW.WRONG_DATA, "missing 80 algorithm")
        self._check_algorithm(algorithm[0])
        policy = self._policy(cmd.p2, fields, Origin.GENERATED)
        try:
            key = generate_private_key(algorithm[0])
        except KeyError:
            raise StatusWordError(SW.WRONG_DATA, f"algorithm {algorithm[0]:02X}") from None
        self._store_key(cmd.p2, key, policy)
        self._changed()
        return public_key_template(key)

    # -- the Yubico extensions --

    def _get_version(self, cmd: CommandApdu) -> bytes:
        """GET VERSION (FD): major, minor, patch."""
        if cmd.p1 or cmd.p2:
            raise StatusWordError(SW.INCORRECT_P1P2)
        return bytes(self.identity.version)

    def _get_serial(self, cmd: CommandApdu) -> bytes:
        """GET SERIAL (F8, firmware 5): the serial number, 4 bytes big-endian."""
        if cmd.p1 or cmd.p2:
            raise StatusWordError(SW.INCORRECT_P1P2)
        return self.identity.serial.to_bytes(4, "big")

    def _get_metadata(self, cmd: CommandApdu) -> bytes:
        """GET METADATA (F7, firmware 5.3), P2 = the key reference.

        PIN, PUK: 01 FF, 05 default value, 06 (total tries, tries left).  Management key:
        01 algorithm, 02 (PIN policy 00, touch policy), 05 default value.  A key slot:
        01 algorithm, 02 (PIN policy, touch policy), 03 origin, 04 the public key (the
        contents of its 7F49 template); an empty slot is 6A88.  Nothing secret.
        """
        if cmd.p1 != 0x00:
            raise StatusWordError(SW.INCORRECT_P1P2)
        state = self.state
        slot = cmd.p2
        if slot in (KeyRef.PIN, KeyRef.PUK):
            is_pin = slot == KeyRef.PIN
            default = state.pin == DEFAULT_PIN if is_pin else state.puk == DEFAULT_PUK
            total = state.pin_retries if is_pin else state.puk_retries
            left = state.pin_left if is_pin else state.puk_left
            return ber_encode_tlvs([
                (_META_ALGORITHM, _META_PIN_ALGORITHM),
                (_META_DEFAULT, b"\x01" if default else b"\x00"),
                (_META_RETRIES, bytes((min(total, 255), min(left, 255)))),
            ])
        if slot == KeyRef.MANAGEMENT:
            touch = TouchPolicy.ALWAYS if state.management_touch else TouchPolicy.NEVER
            default = state.management_key == DEFAULT_MANAGEMENT_KEY
            return ber_encode_tlvs([
                (_META_ALGORITHM, bytes((state.management_algorithm,))),
                (_META_POLICY, bytes((PinPolicy.DEFAULT, touch))),
                (_META_DEFAULT, b"\x01" if default else b"\x00"),
            ])
        if slot not in _KEY_SLOT_SET:
            raise StatusWordError(SW.REFERENCE_NOT_FOUND)
        key = state.keys.get(slot)
        if key is None:
            raise StatusWordError(SW.REFERENCE_NOT_FOUND, f"no key in slot {slot:02X}")
        policy = state.policy(slot)
        public = _template(public_key_template(key), 0x7F49)
        return ber_encode_tlvs([
            (_META_ALGORITHM, bytes((key_algorithm(key),))),
            (_META_POLICY, bytes((policy.pin, policy.touch))),
            (_META_ORIGIN, bytes((policy.origin,))),
            (_META_PUBLIC, b"".join(item.encode() for item in public)),
        ])

    def _import_key(self, cmd: CommandApdu) -> bytes:
        """IMPORT ASYMMETRIC KEY (FE): P1 algorithm, P2 slot, data the key's TLVs and the
        optional AA/AB policies.  Needs the management key."""
        if cmd.p2 not in _KEY_SLOT_SET:
            raise StatusWordError(SW.INCORRECT_P1P2)
        self._require_admin()
        self._check_algorithm(cmd.p1)
        try:
            fields = _fields(ber_decode(cmd.data))
        except DecodeError as exc:
            raise StatusWordError(SW.WRONG_DATA, str(exc)) from None
        policy = self._policy(cmd.p2, fields, Origin.IMPORTED)
        key = import_private_key(cmd.p1, fields)
        self._store_key(cmd.p2, key, policy)
        self._changed()
        return b""

    def _set_management_key(self, cmd: CommandApdu) -> bytes:
        """SET MANAGEMENT KEY (FF): P1 FF, P2 FF (no touch) or FE (touch); data algorithm,
        9B, length, key.  Needs the management key; AES from firmware 5.4."""
        if cmd.p1 != 0xFF or cmd.p2 not in (0xFF, 0xFE):
            raise StatusWordError(SW.INCORRECT_P1P2)
        self._require_admin()
        data = cmd.data
        if len(data) < 3 or data[1] != KeyRef.MANAGEMENT or data[2] != len(data) - 3:
            raise StatusWordError(SW.WRONG_DATA)
        algorithm = Algorithm.TDES if data[0] == Algorithm.TDES_DEFAULT else data[0]
        if MANAGEMENT_KEY_LENGTHS.get(algorithm) != data[2]:
            raise StatusWordError(SW.WRONG_DATA, "key length does not fit the algorithm")
        if algorithm != Algorithm.TDES and not self.features.aes_management_key:
            raise StatusWordError(SW.WRONG_DATA, "AES management keys need firmware 5.4")
        if cmd.p2 == 0xFE and not self.features.policies:
            raise StatusWordError(SW.INCORRECT_P1P2, "touch needs firmware 4.0")
        self.state.management_key = bytes(data[3:])
        self.state.management_algorithm = algorithm
        self.state.management_touch = cmd.p2 == 0xFE
        self._changed()
        return b""

    def _set_pin_retries(self, cmd: CommandApdu) -> bytes:
        """SET PIN RETRIES (FA): P1 PIN tries, P2 PUK tries; needs the management key and
        the PIN; PIN and PUK go back to their defaults."""
        if not 1 <= cmd.p1 <= MAX_RETRIES or cmd.data:
            raise StatusWordError(SW.INCORRECT_P1P2 if not cmd.data else SW.WRONG_LENGTH)
        self._require_admin()
        if not self.pin_verified:
            raise StatusWordError(SW.SECURITY_STATUS_NOT_SATISFIED, "PIN needed")
        state = self.state
        state.pin, state.puk = DEFAULT_PIN, DEFAULT_PUK
        state.pin_retries = state.pin_left = cmd.p1
        state.puk_retries = state.puk_left = cmd.p2
        self.pin_verified = self.pin_always = False
        self._changed()
        return b""

    def _reset(self, cmd: CommandApdu) -> bytes:
        """RESET (FB): only when PIN and PUK are both blocked (6985 otherwise).

        Back to factory state: PIN 123456, PUK 12345678, 3 tries each, the default
        management key (AES-192 from firmware 5.7, 3DES before), no keys, no data objects;
        the attestation key (F9) and its certificate and the Discovery object stay.
        """
        if cmd.p1 or cmd.p2:
            raise StatusWordError(SW.INCORRECT_P1P2)
        state = self.state
        if state.pin_left > 0 or state.puk_left > 0:
            raise StatusWordError(SW.CONDITIONS_NOT_SATISFIED, "PIN and PUK must be blocked")
        state.pin, state.puk = DEFAULT_PIN, DEFAULT_PUK
        state.pin_retries = state.pin_left = DEFAULT_RETRIES
        state.puk_retries = state.puk_left = DEFAULT_RETRIES
        state.management_key = DEFAULT_MANAGEMENT_KEY
        state.management_algorithm = (Algorithm.AES192
                                      if self.features.aes_default_management_key
                                      else Algorithm.TDES)
        state.management_touch = False
        for slot in [s for s in state.keys if s != KeyRef.ATTESTATION]:
            self._drop_key(slot)
        for slot in [s for s in state.policies if s != KeyRef.ATTESTATION]:
            state.policies.pop(slot)
        for tag in [t for t in state.objects if t not in _KEPT_BY_RESET]:
            state.objects.pop(tag)
        self._slot_keys.clear()
        self._reset_security()
        self._changed()
        return b""

    def _move_key(self, cmd: CommandApdu) -> bytes:
        """MOVE KEY (F6, firmware 5.7): P1 destination (FF: delete), P2 source.  Needs the
        management key; the key keeps its policies and origin."""
        source, dest = cmd.p2, cmd.p1
        if source not in _ASYMMETRIC_SLOT_SET or (
                dest != _DELETE and (dest not in _ASYMMETRIC_SLOT_SET or dest == source)):
            raise StatusWordError(SW.INCORRECT_P1P2)
        if cmd.data:
            raise StatusWordError(SW.WRONG_LENGTH)
        self._require_admin()
        state = self.state
        key = state.keys.get(source)
        if key is None:
            raise StatusWordError(SW.REFERENCE_NOT_FOUND, f"no key in slot {source:02X}")
        if dest == _DELETE:
            self._drop_key(source)
        else:
            if dest in state.keys:
                raise StatusWordError(SW.INCORRECT_P1P2, f"slot {dest:02X} is not empty")
            policy = state.policy(source)
            self._drop_key(source)
            self._store_key(dest, key, policy)
        self._changed()
        return b""

    def _attest(self, cmd: CommandApdu) -> bytes:
        """ATTEST (F9, firmware 4.3): P1 a slot with a key generated on the card; the answer
        is a DER certificate signed by the attestation key in F9 (:mod:`piv_attest`)."""
        slot = cmd.p1
        if slot not in _ASYMMETRIC_SLOT_SET or cmd.p2 != 0x00:
            raise StatusWordError(SW.INCORRECT_P1P2)
        state = self.state
        key = state.keys.get(slot)
        if key is None:
            raise StatusWordError(SW.REFERENCE_NOT_FOUND, f"no key in slot {slot:02X}")
        policy = state.policy(slot)
        if policy.origin != Origin.GENERATED:
            raise StatusWordError(SW.WRONG_DATA, "only keys generated on the card")
        signer = state.keys.get(KeyRef.ATTESTATION)
        signer_cert = _certificate_of(state.objects.get(ObjectTag.CERT_F9))
        if signer is None or signer_cert is None or isinstance(signer, x25519.X25519PrivateKey):
            raise StatusWordError(SW.REFERENCE_NOT_FOUND, "no attestation key and certificate")
        cert = attestation_certificate(
            slot=slot, public_key=key.public_key(), pin_policy=policy.pin,
            touch_policy=policy.touch, identity=self.identity, signer=signer,
            signer_cert=signer_cert, rng=self._rng)
        return cert.public_bytes(Encoding.DER)


class BlockingPivCard(PivCard):
    """A PIV card whose touch sensor may wait: the runtime runs it off its event loop."""

    blocking: ClassVar[bool] = True


def public_key_template(key: PrivateKey) -> bytes:
    """7F49 public key template (part 2 table 11): RSA 81 n, 82 e; ECC 86 point;
    Ed25519/X25519 86 the 32-byte public key (Yubico)."""
    if isinstance(key, rsa.RSAPrivateKey):
        numbers = key.public_key().public_numbers()
        n = numbers.n.to_bytes((key.key_size + 7) // 8, "big")
        e = numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")
        return ber_encode(0x7F49, ber_encode(0x81, n) + ber_encode(0x82, e))
    if isinstance(key, ec.EllipticCurvePrivateKey):
        point = key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    else:
        point = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return ber_encode(0x7F49, ber_encode(0x86, point))
