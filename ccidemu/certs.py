"""Test PKI for emulated cards: a throw-away CA and one certificate + key per PIV slot.

``ccidemu certs generate DIR`` writes, using the slot naming convention that
:mod:`ccidemu.cards.piv_files` reads (``<slot>.crt`` PEM certificate and
``<slot>.key`` PEM PKCS#8 private key, slot in lower-case hex):

=====  ==========  ===========================================================
slot   key         certificate purpose (SP 800-73-4 part 1 section 3.1)
=====  ==========  ===========================================================
9a     RSA-2048    PIV Authentication: digitalSignature, clientAuth
9c     ECC P-256   Digital Signature: digitalSignature, nonRepudiation
9d     RSA-2048    Key Management: keyEncipherment, dataEncipherment (decrypt)
9e     ECC P-384   Card Authentication: digitalSignature
=====  ==========  ===========================================================

plus ``ca.crt`` / ``ca.key`` (ECC P-256 root that signed them) and ``card.toml``
(an example card profile naming the same files).  The keys are for tests only:
they are written unencrypted and must never protect anything real.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ccidemu.cards.piv import DEFAULT_MANAGEMENT_KEY, DEFAULT_PIN, DEFAULT_PUK
from ccidemu.errors import ConfigError

log = logging.getLogger(__name__)

#: Fixed validity window so that committed fixtures never expire during the project's life.
NOT_BEFORE = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
NOT_AFTER = datetime.datetime(2049, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)


@dataclass(frozen=True)
class SlotSpec:
    """What ``generate_test_set`` puts in one slot."""

    slot: str  # lower-case hex key reference, e.g. "9a"
    key_type: str  # "rsa2048", "p256" or "p384"
    common_name: str
    key_usage: str  # "sign" or "decrypt"


TEST_SLOTS: tuple[SlotSpec, ...] = (
    SlotSpec("9a", "rsa2048", "ccidemu Test User (PIV Authentication)", "sign"),
    SlotSpec("9c", "p256", "ccidemu Test User (Digital Signature)", "sign"),
    SlotSpec("9d", "rsa2048", "ccidemu Test User (Key Management)", "decrypt"),
    SlotSpec("9e", "p384", "ccidemu Test Card (Card Authentication)", "sign"),
)

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def new_private_key(key_type: str) -> PrivateKey:
    """A fresh key: ``rsa1024``, ``rsa2048``, ``rsa3072``, ``rsa4096``, ``p256`` or ``p384``."""
    if key_type.startswith("rsa") and key_type[3:] in ("1024", "2048", "3072", "4096"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[3:]))
    if key_type == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    raise ConfigError(f"unknown key type {key_type!r}")


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ccidemu test PKI"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _hash_for(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def make_ca(common_name: str = "ccidemu Test CA") -> tuple[ec.EllipticCurvePrivateKey,
                                                        x509.Certificate]:
    """A self-signed P-256 root CA (RFC 5280 section 4.2.1.9 basicConstraints cA=TRUE)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue_certificate(
    ca_key: CertificateIssuerPrivateKeyTypes,
    ca_cert: x509.Certificate,
    key: PrivateKey,
    common_name: str,
    usage: str = "sign",
) -> x509.Certificate:
    """An end-entity certificate for ``key`` signed by the CA (``usage`` "sign" or "decrypt")."""
    is_rsa = isinstance(key, rsa.RSAPrivateKey)
    decrypt = usage == "decrypt"
    key_usage = x509.KeyUsage(
        digital_signature=not decrypt,
        content_commitment=not decrypt and not is_rsa,
        key_encipherment=decrypt and is_rsa,
        data_encipherment=decrypt and is_rsa,
        key_agreement=decrypt and not is_rsa,
        key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
    )
    eku = [ExtendedKeyUsageOID.CLIENT_AUTH] if not decrypt else [
        ExtendedKeyUsageOID.EMAIL_PROTECTION]
    return (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, _hash_for(ca_key))
    )


def key_pem(key: PrivateKey | ed25519.Ed25519PrivateKey | x25519.X25519PrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted (RFC 5208 / RFC 7468 "PRIVATE KEY")."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def profile_example() -> str:
    """The example ``card.toml`` written beside the generated files."""
    slots = "\n".join(
        f'[slots.{spec.slot}]\ncert = "{spec.slot}.crt"\nkey = "{spec.slot}.key"\n'
        for spec in TEST_SLOTS
    )
    return (
        "# ccidemu PIV card profile (use as --card piv:PATH/card.toml).\n"
        "# Paths are relative to this file.  See fixtures/certs/README.md.\n"
        f'pin = "{DEFAULT_PIN.decode()}"\n'
        f'puk = "{DEFAULT_PUK.decode()}"\n'
        f'management_key = "{DEFAULT_MANAGEMENT_KEY.hex()}"\n'
        'management_key_algorithm = "3des"\n'
        "pin_retries = 3\n"
        "puk_retries = 3\n"
        'guid = "63636964656d752d7069762d74657374"\n'
        'label = "ccidemu demo PIV"\n\n'
        f"{slots}"
    )


def generate_test_set(directory: Path, *, force: bool = False) -> list[Path]:
    """Write the CA, the four slot certificates/keys and ``card.toml`` into ``directory``.

    Refuses (ConfigError) to overwrite existing files unless ``force``.  Returns the
    paths written.
    """
    directory.mkdir(parents=True, exist_ok=True)
    names = ["ca.crt", "ca.key", "card.toml"]
    for spec in TEST_SLOTS:
        names += [f"{spec.slot}.crt", f"{spec.slot}.key"]
    existing = [n for n in names if (directory / n).exists()]
    if existing and not force:
        raise ConfigError(
            f"{directory}: {', '.join(existing)} already exist (use --force to overwrite)"
        )
    ca_key, ca_cert = make_ca()
    outputs: dict[str, bytes] = {"ca.crt": cert_pem(ca_cert), "ca.key": key_pem(ca_key)}
    for spec in TEST_SLOTS:
        key = new_private_key(spec.key_type)
        cert = issue_certificate(ca_key, ca_cert, key, spec.common_name, spec.key_usage)
        outputs[f"{spec.slot}.crt"] = cert_pem(cert)
        outputs[f"{spec.slot}.key"] = key_pem(key)
    outputs["card.toml"] = profile_example().encode()
    written = []
    for name, data in outputs.items():
        path = directory / name
        path.write_bytes(data)
        if name.endswith(".key"):
            path.chmod(0o600)
        written.append(path)
        log.debug("wrote %s", path)
    return written
