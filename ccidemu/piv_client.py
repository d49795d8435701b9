"""A typed PIV client (the host side of NIST SP 800-73-4 part 2, with a few Yubico commands).

:class:`PivClient` runs over a :class:`ccidemu.client.CardSession`, so it drives any PIV
card the session reaches: an emulated card in this process, the card behind ``ccidemu
serve`` through a fake QEMU, a real card.  It builds the commands and reads the answers of
the operations tests need most: SELECT, VERIFY, GET DATA (certificates and objects), PUT
DATA, card management key authentication (mutual, part 2 appendix A.1), GENERAL
AUTHENTICATE (RSA PKCS#1 v1.5 and ECDSA signatures, Ed25519, RSA decryption, ECDH) and
GENERATE ASYMMETRIC KEY PAIR; GET VERSION and GET SERIAL of Yubico's extensions
(docs/YUBIKEY.md).  Hashing and padding happen here, on the host, as PIV middleware does:
the card only ever sees the padded block (RSA) or the hash (ECDSA).

A refused command raises :class:`~ccidemu.client.ApduError` (``sw``); a wrong PIN raises
:class:`InvalidPinError` with the tries left.  Nothing here logs; secrets (PIN, management
key) only go to the card.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519

from ccidemu.apdu import CommandApdu
from ccidemu.card import Card
from ccidemu.cards.piv import (
    CERT_OBJECTS,
    DEFAULT_MANAGEMENT_KEY,
    PIN_MAX_LENGTH,
    PIV_AID,
    Algorithm,
    KeyRef,
    PinPolicy,
    TouchPolicy,
    management_cipher,
)
from ccidemu.client import ApduError, CardSession, Transmit
from ccidemu.errors import CardError, DecodeError
from ccidemu.sw import SW
from ccidemu.tlv import ber_decode, ber_decode_one, ber_encode, ber_find

__all__ = ["InvalidPinError", "PivClient", "PublicKey"]

PublicKey = (rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
             | x25519.X25519PublicKey)

#: DigestInfo prefixes of EMSA-PKCS1-v1_5 (RFC 8017 section 9.2, note 1), by hash name.
_DIGEST_INFO = {
    "sha1": bytes.fromhex("3021300906052b0e03021a05000414"),
    "sha224": bytes.fromhex("302d300d06096086480165030402040500041c"),
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}
_RSA_ALGORITHMS: dict[int, int] = {1024: Algorithm.RSA1024, 2048: Algorithm.RSA2048,
                   3072: Algorithm.RSA3072, 4096: Algorithm.RSA4096}
_BLOCK_SIZES: dict[int, int] = {Algorithm.TDES: 8, Algorithm.TDES_DEFAULT: 8, Algorithm.AES128: 16,
                Algorithm.AES192: 16, Algorithm.AES256: 16}


class InvalidPinError(ApduError):
    """VERIFY refused the PIN (63Cx); ``attempts_remaining`` is x."""

    def __init__(self, sw: int) -> None:
        self.attempts_remaining = sw & 0x0F
        super().__init__(sw, message=f"wrong PIN, {self.attempts_remaining} tries left")


def key_algorithm(public_key: PublicKey) -> int:
    """The SP 800-78-4 (or Yubico) algorithm identifier of a PIV key's public half."""
    if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size in _RSA_ALGORITHMS:
        return _RSA_ALGORITHMS[public_key.key_size]
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if isinstance(public_key.curve, ec.SECP256R1):
            return Algorithm.ECCP256
        if isinstance(public_key.curve, ec.SECP384R1):
            return Algorithm.ECCP384
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return Algorithm.ED25519
    if isinstance(public_key, x25519.X25519PublicKey):
        return Algorithm.X25519
    raise ValueError(f"not a PIV key: {type(public_key).__name__}")


def _pad_reference(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else bytes(value)
    if not 1 <= len(raw) <= PIN_MAX_LENGTH:
        raise ValueError(f"a PIN or PUK has 1 to {PIN_MAX_LENGTH} bytes")
    return raw.ljust(PIN_MAX_LENGTH, b"\xff")


class PivClient:
    """PIV operations over a card session (see the module docstring).

    ``card``: a :class:`~ccidemu.client.CardSession`, a :class:`~ccidemu.card.Card` or a
    transmit function (a session is made for the last two).  Call :meth:`select` first, as
    middleware does (an emulated PIV card also answers without it: PIV is its default
    application).
    """

    def __init__(self, card: CardSession | Card | Transmit,
                 rng: Callable[[int], bytes] = os.urandom) -> None:
        self.session = card if isinstance(card, CardSession) else CardSession(card)
        self._rng = rng

    # -- application and PIN ------------------------------------------------------------

    def select(self) -> bytes:
        """SELECT the PIV application (part 2 section 3.1.1); its application property
        template (tag 61: AID, label, algorithms)."""
        return self.session.send(0x00, 0xA4, 0x04, 0x00, PIV_AID)

    def verify_pin(self, pin: str | bytes) -> None:
        """VERIFY the PIN (padded with FF to 8 bytes); :class:`InvalidPinError` when wrong,
        :class:`~ccidemu.client.ApduError` 6983 when blocked."""
        self._verify(KeyRef.PIN, pin)

    def _verify(self, reference: int, value: str | bytes) -> None:
        _, sw = self.session.transmit(self._command(0x20, 0x00, reference,
                                                    _pad_reference(value), 0))
        if sw & 0xFFF0 == 0x63C0:
            raise InvalidPinError(sw)
        if sw != SW.OK:
            raise ApduError(sw, message=f"VERIFY: status word {sw:04X}")

    def pin_attempts(self) -> int | None:
        """The PIN tries left (VERIFY without data, 63Cx); None when the PIN is verified."""
        _, sw = self.session.transmit(self._command(0x20, 0x00, KeyRef.PIN, b"", 0))
        if sw == SW.OK:
            return None
        if sw & 0xFFF0 == 0x63C0:
            return sw & 0x0F
        if sw == SW.AUTH_METHOD_BLOCKED:
            return 0
        raise ApduError(sw, message=f"VERIFY (status): status word {sw:04X}")

    def change_pin(self, old: str | bytes, new: str | bytes) -> None:
        """CHANGE REFERENCE DATA of the PIN (part 2 section 3.2.2)."""
        data = _pad_reference(old) + _pad_reference(new)
        _, sw = self.session.transmit(self._command(0x24, 0x00, KeyRef.PIN, data, 0))
        if sw & 0xFFF0 == 0x63C0:
            raise InvalidPinError(sw)
        if sw != SW.OK:
            raise ApduError(sw, message=f"CHANGE REFERENCE DATA: status word {sw:04X}")

    @staticmethod
    def _command(ins: int, p1: int, p2: int, data: bytes, ne: int) -> CommandApdu:
        return CommandApdu(0x00, ins, p1, p2, data, ne)

    # -- data objects -------------------------------------------------------------------

    def read_object(self, tag: int) -> bytes:
        """GET DATA of one object (part 2 section 3.1.2): its value inside the 53 wrapper."""
        answer = self.session.send(0x00, 0xCB, 0x3F, 0xFF, ber_encode(0x5C, _tag_list(tag)))
        try:
            tlv, end = ber_decode_one(answer)
        except DecodeError as exc:
            raise CardError(f"GET DATA {tag:X}: the answer is not BER-TLV: {exc}") from None
        if tlv.tag != 0x53 or end != len(answer):
            raise CardError(f"GET DATA {tag:X}: the answer is not one 53 object")
        return tlv.value

    def write_object(self, tag: int, value: bytes) -> None:
        """PUT DATA (part 2 section 3.3.2; needs :meth:`authenticate`)."""
        self.session.send(0x00, 0xDB, 0x3F, 0xFF,
                          ber_encode(0x5C, _tag_list(tag)) + ber_encode(0x53, value), ne=0)

    def read_certificate(self, slot: int) -> x509.Certificate:
        """The certificate of a key slot (9A, 9C, 9D, 9E, 82-95, F9)."""
        if slot not in CERT_OBJECTS:
            raise ValueError(f"slot {slot:02X} has no certificate object")
        value = self.read_object(CERT_OBJECTS[slot])
        der = ber_find(value, 0x70)
        if der is None:
            raise CardError(f"slot {slot:02X}: the certificate object has no 70 certificate")
        try:
            return x509.load_der_x509_certificate(der)
        except ValueError as exc:
            raise CardError(f"slot {slot:02X}: not an X.509 certificate: {exc}") from None

    def write_certificate(self, slot: int, certificate: x509.Certificate) -> None:
        """Store a certificate for a key slot (needs :meth:`authenticate`)."""
        if slot not in CERT_OBJECTS:
            raise ValueError(f"slot {slot:02X} has no certificate object")
        der = certificate.public_bytes(serialization.Encoding.DER)
        body = ber_encode(0x70, der) + ber_encode(0x71, b"\x00") + ber_encode(0xFE, b"")
        self.write_object(CERT_OBJECTS[slot], body)

    # -- card management key ------------------------------------------------------------

    def authenticate(self, management_key: bytes = DEFAULT_MANAGEMENT_KEY,
                     algorithm: int = Algorithm.TDES) -> None:
        """Mutual authentication with the card management key (9B; part 2 appendix A.1,
        table 7): the card proves it has the key too.  ApduError 6982 for a wrong key."""
        block = _BLOCK_SIZES.get(algorithm)
        if block is None:
            raise ValueError(f"algorithm {algorithm:02X} is not a management key algorithm")
        cipher = management_cipher(algorithm, management_key)
        step1 = self.session.send(0x00, 0x87, algorithm, KeyRef.MANAGEMENT,
                                  ber_encode(0x7C, ber_encode(0x80, b"")))
        encrypted_witness = _template_field(step1, 0x80, "authenticate step 1")
        decryptor = cipher.decryptor()
        witness = decryptor.update(encrypted_witness) + decryptor.finalize()
        challenge = self._rng(block)
        step2 = self.session.send(
            0x00, 0x87, algorithm, KeyRef.MANAGEMENT,
            ber_encode(0x7C, ber_encode(0x80, witness) + ber_encode(0x81, challenge)))
        response = _template_field(step2, 0x82, "authenticate step 2")
        encryptor = cipher.encryptor()
        if response != encryptor.update(challenge) + encryptor.finalize():
            raise CardError("the card's answer to our challenge is wrong: it does not hold "
                            "this management key")

    # -- keys ---------------------------------------------------------------------------

    def generate_key(self, slot: int, algorithm: int,
                     pin_policy: PinPolicy | None = None,
                     touch_policy: TouchPolicy | None = None) -> PublicKey:
        """GENERATE ASYMMETRIC KEY PAIR (part 2 section 3.3.2; needs :meth:`authenticate`);
        the new public key.  ``pin_policy``/``touch_policy``: Yubico's tags AA and AB."""
        spec = ber_encode(0x80, bytes([algorithm]))
        if pin_policy is not None:
            spec += ber_encode(0xAA, bytes([pin_policy]))
        if touch_policy is not None:
            spec += ber_encode(0xAB, bytes([touch_policy]))
        answer = self.session.send(0x00, 0x47, 0x00, slot, ber_encode(0xAC, spec))
        template = ber_find(answer, 0x7F49)
        if template is None:
            raise CardError("GENERATE: no 7F49 public key template in the answer")
        fields = {t.tag: t.value for t in ber_decode(template)}
        if algorithm in _RSA_ALGORITHMS.values():
            n, e = fields.get(0x81), fields.get(0x82)
            if n is None or e is None:
                raise CardError("GENERATE: RSA template without 81 and 82")
            return rsa.RSAPublicNumbers(int.from_bytes(e, "big"),
                                        int.from_bytes(n, "big")).public_key()
        point = fields.get(0x86)
        if point is None:
            raise CardError("GENERATE: template without 86 point")
        if algorithm == Algorithm.ECCP256:
            return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
        if algorithm == Algorithm.ECCP384:
            return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP384R1(), point)
        if algorithm == Algorithm.ED25519:
            return ed25519.Ed25519PublicKey.from_public_bytes(point)
        if algorithm == Algorithm.X25519:
            return x25519.X25519PublicKey.from_public_bytes(point)
        raise ValueError(f"algorithm {algorithm:02X} is not an asymmetric key algorithm")

    def _public_key(self, slot: int, public_key: PublicKey | None) -> PublicKey:
        if public_key is not None:
            return public_key
        key = self.read_certificate(slot).public_key()
        if not isinstance(key, PublicKey):
            raise CardError(f"slot {slot:02X}: the certificate's key is not a PIV key")
        return key

    def _general_authenticate(self, slot: int, algorithm: int, tag: int, data: bytes
                              ) -> bytes:
        template = ber_encode(0x7C, ber_encode(0x82, b"") + ber_encode(tag, data))
        answer = self.session.send(0x00, 0x87, algorithm, slot, template)
        return _template_field(answer, 0x82, f"GENERAL AUTHENTICATE {slot:02X}")

    def sign(self, slot: int, message: bytes,
             hash_algorithm: hashes.HashAlgorithm | None = None,
             public_key: PublicKey | None = None) -> bytes:
        """Sign ``message`` with a slot's key (after :meth:`verify_pin` where the slot's
        PIN policy asks): RSA PKCS#1 v1.5, ECDSA (DER signature) with ``hash_algorithm``
        (default SHA-256), Ed25519 over the message itself.

        ``public_key`` (default: from the slot's certificate) tells the key's algorithm;
        the result verifies with it in ``cryptography``.
        """
        key = self._public_key(slot, public_key)
        algorithm = key_algorithm(key)
        if isinstance(key, ed25519.Ed25519PublicKey):
            return self._general_authenticate(slot, algorithm, 0x81, message)
        if isinstance(key, x25519.X25519PublicKey):
            raise ValueError("an X25519 key only agrees keys: use derive()")
        chosen = hash_algorithm or hashes.SHA256()
        digest = hashes.Hash(chosen)
        digest.update(message)
        hashed = digest.finalize()
        if isinstance(key, ec.EllipticCurvePublicKey):
            return self._general_authenticate(slot, algorithm, 0x81, hashed)
        prefix = _DIGEST_INFO.get(chosen.name)
        if prefix is None:
            raise ValueError(f"no PKCS#1 v1.5 DigestInfo for {chosen.name}")
        size = (key.key_size + 7) // 8
        info = prefix + hashed
        block = b"\x00\x01" + b"\xff" * (size - len(info) - 3) + b"\x00" + info
        return self._general_authenticate(slot, algorithm, 0x81, block)

    def decrypt(self, slot: int, ciphertext: bytes, public_key: PublicKey | None = None,
                *, raw: bool = False) -> bytes:
        """RSA decryption with a slot's key (PKCS#1 v1.5 padding removed here, or the raw
        block with ``raw=True``).  :class:`~ccidemu.errors.DecodeError` when the block
        is not PKCS#1 v1.5 type 2 (wrong key or ciphertext)."""
        key = self._public_key(slot, public_key)
        if not isinstance(key, rsa.RSAPublicKey):
            raise ValueError(f"slot {slot:02X} holds no RSA key: use derive() for ECDH")
        size = (key.key_size + 7) // 8
        block = self._general_authenticate(slot, key_algorithm(key), 0x81,
                                           ciphertext.rjust(size, b"\x00"))
        if raw:
            return block
        block = block.rjust(size, b"\x00")
        separator = block.find(b"\x00", 2)
        if block[:2] != b"\x00\x02" or separator < 10:
            raise DecodeError("the decrypted block is not PKCS#1 v1.5 type 2")
        return block[separator + 1:]

    def derive(self, slot: int, peer: ec.EllipticCurvePublicKey | x25519.X25519PublicKey,
               public_key: PublicKey | None = None) -> bytes:
        """Key agreement with a slot's EC or X25519 key (ECDH, SP 800-56A; tag 85): the
        shared secret."""
        key = self._public_key(slot, public_key)
        if isinstance(peer, ec.EllipticCurvePublicKey):
            point = peer.public_bytes(serialization.Encoding.X962,
                                      serialization.PublicFormat.UncompressedPoint)
        else:
            point = peer.public_bytes(serialization.Encoding.Raw,
                                      serialization.PublicFormat.Raw)
        return self._general_authenticate(slot, key_algorithm(key), 0x85, point)

    # -- Yubico extensions ----------------------------------------------------------------

    def version(self) -> tuple[int, int, int]:
        """GET VERSION (FD): the firmware version."""
        answer = self.session.send(0x00, 0xFD, 0x00, 0x00)
        if len(answer) != 3:
            raise CardError(f"GET VERSION answered {answer.hex()}")
        return answer[0], answer[1], answer[2]

    def serial(self) -> int:
        """GET SERIAL (F8): the card's serial number."""
        answer = self.session.send(0x00, 0xF8, 0x00, 0x00)
        if len(answer) != 4:
            raise CardError(f"GET SERIAL answered {answer.hex()}")
        return int.from_bytes(answer, "big")


def _tag_list(tag: int) -> bytes:
    return tag.to_bytes(max(1, (tag.bit_length() + 7) // 8), "big")


def _template_field(answer: bytes, tag: int, what: str) -> bytes:
    """The ``tag`` field of a 7C dynamic authentication template."""
    try:
        outer, end = ber_decode_one(answer)
        if outer.tag != 0x7C or end != len(answer):
            raise CardError(f"{what}: the answer is not one 7C template")
        for item in ber_decode(outer.value):
            if item.tag == tag:
                return item.value
    except DecodeError as exc:
        raise CardError(f"{what}: the answer is not BER-TLV: {exc}") from None
    raise CardError(f"{what}: no {tag:02X} in the answer")
