"""PIV key attestation (the Yubico ATTEST extension, INS F9): an X.509 certificate for a
key generated on the card, signed by the attestation key in slot F9.

Pure: the serial number comes from the caller's random source and the validity dates are
copied from the attesting certificate, so nothing reads a clock.  The certificate follows
Yubico's public description (docs.yubico.com "PIV attestation OID arc";
``docs/YUBIKEY.md``):

* serial: a random positive integer of 16 bytes; issuer: the subject of the F9
  certificate; validity: copied from it; subject: ``CN=YubiKey PIV Attestation <slot>``;
* signed with SHA-256 (PKCS#1 v1.5 for RSA, ECDSA for EC; Ed25519 signs without a hash);
* extensions under 1.3.6.1.4.1.41482.3 (not critical): ``.3`` firmware version (3 octets
  major, minor, patch), ``.7`` serial number (a DER INTEGER), ``.8`` PIN policy and touch
  policy (2 octets), ``.9`` form factor (1 octet).  The values are the raw extension
  contents (``extnValue``), as Yubico encodes them.
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519
from cryptography.x509.oid import NameOID

from ccidemu.cards.yubikey import Identity

#: 1.3.6.1.4.1.41482.3: Yubico's PIV attestation arc.
OID_FIRMWARE = x509.ObjectIdentifier("1.3.6.1.4.1.41482.3.3")
OID_SERIAL = x509.ObjectIdentifier("1.3.6.1.4.1.41482.3.7")
OID_POLICY = x509.ObjectIdentifier("1.3.6.1.4.1.41482.3.8")
OID_FORM_FACTOR = x509.ObjectIdentifier("1.3.6.1.4.1.41482.3.9")

AttestedKey = (rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
               | x25519.X25519PublicKey)
SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def der_integer(value: int) -> bytes:
    """A DER INTEGER (ITU-T X.690 section 8.3) of a non-negative value."""
    body = value.to_bytes(value.bit_length() // 8 + 1, "big")
    return bytes((0x02, len(body))) + body


def attestation_certificate(
    *,
    slot: int,
    public_key: AttestedKey,
    pin_policy: int,
    touch_policy: int,
    identity: Identity,
    signer: SigningKey,
    signer_cert: x509.Certificate,
    rng: Callable[[int], bytes],
) -> x509.Certificate:
    """The attestation certificate for ``public_key`` (the key in ``slot``)."""
    serial = int.from_bytes(rng(16), "big") >> 1 or 1  # positive, at most 127 bits + 0
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(
            NameOID.COMMON_NAME, f"YubiKey PIV Attestation {slot:02x}")]))
        .issuer_name(signer_cert.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(signer_cert.not_valid_before_utc)
        .not_valid_after(signer_cert.not_valid_after_utc)
        .add_extension(x509.UnrecognizedExtension(OID_FIRMWARE, bytes(identity.version)),
                       critical=False)
        .add_extension(x509.UnrecognizedExtension(OID_SERIAL, der_integer(identity.serial)),
                       critical=False)
        .add_extension(x509.UnrecognizedExtension(OID_POLICY,
                                                  bytes((pin_policy, touch_policy))),
                       critical=False)
        .add_extension(x509.UnrecognizedExtension(OID_FORM_FACTOR,
                                                  bytes((identity.form_factor,))),
                       critical=False)
    )
    algorithm = None if isinstance(signer, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(signer, algorithm)
