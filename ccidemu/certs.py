"""Test PKI for emulated cards: a throw-away CA, one certificate + key per PIV slot, and a
PIV attestation key with its own attestation CA.

``ccidemu certs generate DIR`` writes, using the slot naming convention that
:mod:`ccidemu.cards.piv_files` reads (``<slot>.crt`` PEM certificate and
``<slot>.key`` PEM PKCS#8 private key, slot in lower-case hex):

=====  ==========  ===========================================================
slot   key         certificate purpose (SP 800-73-4 part 1 section 3.1)
=====  ==========  ===========================================================
9a     RSA-2048    PIV Authentication: digitalSignature, clientAuth
9c     ECC P-256   Digital Signature: digitalSignature, nonRepudiation
9d     RSA-2048    Key Management: keyEncipherment, dataEncipherment (decrypt)
9e     ECC P-384   Card Authentication: digitalSignature, keyAgreement (ECDH)
f9     ECC P-256   the attestation key; its certificate is a CA issued by the
                   attestation CA (Yubico's PIV attestation scheme)
=====  ==========  ===========================================================

Each slot's algorithm can be chosen (``--algorithm 9d=p384``; RSA 1024-4096, P-256,
P-384, Ed25519, X25519).  An EC certificate meant for key agreement (9D, 9E) carries
keyAgreement in its key usage: OpenSC's ``pkcs11-tool --derive`` needs it (RFC 5280
section 4.2.1.3).  Also written: ``ca.crt`` / ``ca.key`` (ECC P-256 root that signed
the slot certificates), ``attestation-ca.crt`` / ``attestation-ca.key`` (the root that
signed ``f9.crt``; attestation certificates verify against it) and ``card.toml`` (an
example card profile naming the same files).  The keys are for tests only: they are
written unencrypted and must never protect anything real.

``ccidemu certs generate --cac DIR`` (:func:`generate_cac_set`) writes a CAC card's files
instead (the naming :mod:`ccidemu.cards.cac_files` reads): a test CA and three RSA-2048
certificates with keys, ``cert1`` to ``cert3``, the PKI applets QEMU's ccid-card-emulated
and SPICE expect.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass, replace
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
    key_type: str  # one of KEY_TYPES
    common_name: str
    key_usage: str  # "sign", "decrypt" or "sign+agree" (signature and ECDH)


TEST_SLOTS: tuple[SlotSpec, ...] = (
    SlotSpec("9a", "rsa2048", "ccidemu Test User (PIV Authentication)", "sign"),
    SlotSpec("9c", "p256", "ccidemu Test User (Digital Signature)", "sign"),
    SlotSpec("9d", "rsa2048", "ccidemu Test User (Key Management)", "decrypt"),
    SlotSpec("9e", "p384", "ccidemu Test Card (Card Authentication)", "sign+agree"),
)
#: The attestation key (slot F9) and its CA.
ATTESTATION_KEY_TYPE = "p256"
ATTESTATION_SUBJECT = "ccidemu PIV Attestation"
ATTESTATION_CA_SUBJECT = "ccidemu PIV Attestation CA"

KEY_TYPES = ("rsa1024", "rsa2048", "rsa3072", "rsa4096", "p256", "p384", "ed25519", "x25519")

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
AnyPrivateKey = PrivateKey | ed25519.Ed25519PrivateKey | x25519.X25519PrivateKey


def new_private_key(key_type: str) -> AnyPrivateKey:
    """A fresh key of one of :data:`KEY_TYPES` (``rsa2048``, ``p256``, ``ed25519``, ...)."""
    if key_type.startswith("rsa") and key_type[3:] in ("1024", "2048", "3072", "4096"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[3:]))
    if key_type == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if key_type == "x25519":
        return x25519.X25519PrivateKey.generate()
    raise ConfigError(f"unknown key type {key_type!r} (one of {', '.join(KEY_TYPES)})")


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


def make_ca(common_name: str = "ccidemu Test CA", path_length: int = 0
            ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed P-256 root CA (RFC 5280 section 4.2.1.9 basicConstraints cA=TRUE;
    ``path_length`` CAs may follow it)."""
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
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_CA_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


_CA_USAGE = x509.KeyUsage(
    digital_signature=False, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=True,
    crl_sign=True, encipher_only=False, decipher_only=False,
)


def issue_attestation_key(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                          key_type: str = ATTESTATION_KEY_TYPE
                          ) -> tuple[AnyPrivateKey, x509.Certificate]:
    """The slot F9 attestation key and its certificate: a CA (cA=TRUE, pathLen 0) issued
    by the attestation CA, as Yubico's factory "PIV Attestation" certificates are; the
    attestation certificates the card makes are issued by it and copy its validity."""
    key = new_private_key(key_type)
    if isinstance(key, x25519.X25519PrivateKey):
        raise ConfigError("an attestation key must be able to sign (not X25519)")
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(ATTESTATION_SUBJECT))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def issue_certificate(
    ca_key: CertificateIssuerPrivateKeyTypes,
    ca_cert: x509.Certificate,
    key: AnyPrivateKey,
    common_name: str,
    usage: str = "sign",
) -> x509.Certificate:
    """An end-entity certificate for ``key`` signed by the CA.

    ``usage``: "sign" (digitalSignature; nonRepudiation for EC), "decrypt" (RSA:
    keyEncipherment + dataEncipherment; EC and X25519: keyAgreement) or "sign+agree"
    (digitalSignature, plus keyAgreement for EC).  RFC 5280 section 4.2.1.3.  An X25519
    key can only agree keys, whatever is asked.
    """
    is_rsa = isinstance(key, rsa.RSAPrivateKey)
    is_x25519 = isinstance(key, x25519.X25519PrivateKey)
    decrypt = usage == "decrypt" or is_x25519
    agree = not is_rsa and (decrypt or usage == "sign+agree")
    key_usage = x509.KeyUsage(
        digital_signature=not decrypt,
        content_commitment=usage == "sign" and not is_rsa and not is_x25519,
        key_encipherment=decrypt and is_rsa,
        data_encipherment=decrypt and is_rsa,
        key_agreement=agree,
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


def key_pem(key: AnyPrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted (RFC 5208 / RFC 7468 "PRIVATE KEY")."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def slot_specs(algorithms: dict[str, str] | None = None) -> tuple[SlotSpec, ...]:
    """:data:`TEST_SLOTS` with the key types ``algorithms`` (slot -> key type) asks for."""
    algorithms = dict(algorithms or {})
    known = {spec.slot for spec in TEST_SLOTS}
    for slot, key_type in algorithms.items():
        if slot not in known:
            raise ConfigError(f"--algorithm {slot}={key_type}: slot {slot!r} is not one of "
                              f"{', '.join(sorted(known))}")
        if key_type not in KEY_TYPES:
            raise ConfigError(f"--algorithm {slot}={key_type}: unknown key type (one of "
                              f"{', '.join(KEY_TYPES)})")
    return tuple(replace(spec, key_type=algorithms.get(spec.slot, spec.key_type))
                 for spec in TEST_SLOTS)


def profile_example(specs: tuple[SlotSpec, ...] = TEST_SLOTS, attestation: bool = True) -> str:
    """The example ``card.toml`` written beside the generated files."""
    names = [spec.slot for spec in specs] + (["f9"] if attestation else [])
    slots = "\n".join(f'[slots.{slot}]\ncert = "{slot}.crt"\nkey = "{slot}.key"\n'
                      for slot in names)
    return (
        "# ccidemu PIV card profile (use as --card piv:PATH/card.toml).\n"
        "# Paths are relative to this file.  See ccidemu/demo/certs/README.md.\n"
        f'pin = "{DEFAULT_PIN.decode()}"\n'
        f'puk = "{DEFAULT_PUK.decode()}"\n'
        f'management_key = "{DEFAULT_MANAGEMENT_KEY.hex()}"\n'
        'management_key_algorithm = "3des"\n'
        "pin_retries = 3\n"
        "puk_retries = 3\n"
        'guid = "63636964656d752d7069762d74657374"\n'
        'label = "ccidemu demo PIV"\n'
        "serial = 10203040\n"
        '# identity = "yubikey5"    # a YubiKey 5 (ATR, name, management application)\n'
        '# firmware = "5.7.1"       # gates the Yubico PIV extensions\n'
        '# form_factor = "usb-a-keychain"\n\n'
        f"{slots}"
    )


def generate_test_set(directory: Path, *, force: bool = False,
                      algorithms: dict[str, str] | None = None,
                      attestation: bool = True) -> list[Path]:
    """Write the CA, the four slot certificates/keys, the attestation CA and F9 key and
    ``card.toml`` into ``directory``.

    ``algorithms``: slot -> key type for slots that should not have the default.
    Refuses (ConfigError) to overwrite existing files unless ``force``.  Returns the
    paths written.
    """
    specs = slot_specs(algorithms)
    names = ["ca.crt", "ca.key", "card.toml"]
    for spec in specs:
        names += [f"{spec.slot}.crt", f"{spec.slot}.key"]
    if attestation:
        names += ["attestation-ca.crt", "attestation-ca.key", "f9.crt", "f9.key"]
    directory.mkdir(parents=True, exist_ok=True)
    existing = [n for n in names if (directory / n).exists()]
    if existing and not force:
        raise ConfigError(
            f"{directory}: {', '.join(existing)} already exist (use --force to overwrite)"
        )
    ca_key, ca_cert = make_ca()
    outputs: dict[str, bytes] = {"ca.crt": cert_pem(ca_cert), "ca.key": key_pem(ca_key)}
    for spec in specs:
        key = new_private_key(spec.key_type)
        cert = issue_certificate(ca_key, ca_cert, key, spec.common_name, spec.key_usage)
        outputs[f"{spec.slot}.crt"] = cert_pem(cert)
        outputs[f"{spec.slot}.key"] = key_pem(key)
    if attestation:
        att_ca_key, att_ca_cert = make_ca(ATTESTATION_CA_SUBJECT, path_length=1)
        f9_key, f9_cert = issue_attestation_key(att_ca_key, att_ca_cert)
        outputs["attestation-ca.crt"] = cert_pem(att_ca_cert)
        outputs["attestation-ca.key"] = key_pem(att_ca_key)
        outputs["f9.crt"] = cert_pem(f9_cert)
        outputs["f9.key"] = key_pem(f9_key)
    outputs["card.toml"] = profile_example(specs, attestation).encode()
    written = []
    for name, data in outputs.items():
        path = directory / name
        path.write_bytes(data)
        if name.endswith(".key"):
            path.chmod(0o600)
        written.append(path)
        log.debug("wrote %s", path)
    return written


#: The CAC card's PKI applets: file stem, common name, usage ("sign": digitalSignature +
#: clientAuth; "both": also keyEncipherment and emailProtection, so that the encryption key
#: can sign as well).
CAC_CERTIFICATES = (
    ("cert1", "ccidemu CAC Test User (ID)", "sign"),
    ("cert2", "ccidemu CAC Test User (Signature)", "sign"),
    ("cert3", "ccidemu CAC Test User (Encryption)", "both"),
)

CAC_PROFILE = """\
# ccidemu CAC card profile (use as --card cac:PATH/card.toml); paths relative to this file.
pin = "123456"
pin_retries = 3
label = "ccidemu demo CAC"

[pki.1]
cert = "cert1.crt"
key = "cert1.key"

[pki.2]
cert = "cert2.crt"
key = "cert2.key"

[pki.3]
cert = "cert3.crt"
key = "cert3.key"
"""


def _sign_and_encrypt(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                      key: rsa.RSAPrivateKey, common_name: str) -> x509.Certificate:
    """A certificate for signing and key transport (RFC 5280 section 4.2.1.3)."""
    signing = issue_certificate(ca_key, ca_cert, key, common_name, "sign")
    usage = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=True,
        data_encipherment=True, key_agreement=False, key_cert_sign=False, crl_sign=False,
        encipher_only=False, decipher_only=False)
    eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH,
                                 ExtendedKeyUsageOID.EMAIL_PROTECTION])
    builder = (x509.CertificateBuilder().subject_name(signing.subject)
               .issuer_name(signing.issuer).public_key(key.public_key())
               .serial_number(signing.serial_number)
               .not_valid_before(signing.not_valid_before_utc)
               .not_valid_after(signing.not_valid_after_utc))
    for extension in signing.extensions:
        value: x509.ExtensionType = extension.value
        if isinstance(value, x509.KeyUsage):
            value = usage
        elif isinstance(value, x509.ExtendedKeyUsage):
            value = eku
        builder = builder.add_extension(value, critical=extension.critical)
    return builder.sign(ca_key, hashes.SHA256())


def generate_cac_set(directory: Path, *, force: bool = False) -> list[Path]:
    """Write a CAC card's test CA (``ca.crt``/``ca.key``, ECC P-256), three RSA-2048
    certificates with keys (:data:`CAC_CERTIFICATES`) and ``card.toml`` into ``directory``.

    Refuses (ConfigError) to overwrite existing files unless ``force``; returns the paths
    written.  New keys are random: the files change completely.
    """
    names = ["ca.crt", "ca.key", "card.toml"]
    for stem, _, _ in CAC_CERTIFICATES:
        names += [f"{stem}.crt", f"{stem}.key"]
    directory.mkdir(parents=True, exist_ok=True)
    existing = [n for n in names if (directory / n).exists()]
    if existing and not force:
        raise ConfigError(
            f"{directory}: {', '.join(existing)} already exist (use --force to overwrite)"
        )
    ca_key, ca_cert = make_ca("ccidemu CAC Test CA")
    outputs: dict[str, bytes] = {"ca.crt": cert_pem(ca_cert), "ca.key": key_pem(ca_key)}
    for stem, common_name, usage in CAC_CERTIFICATES:
        key = new_private_key("rsa2048")
        assert isinstance(key, rsa.RSAPrivateKey)
        cert = (_sign_and_encrypt(ca_key, ca_cert, key, common_name) if usage == "both"
                else issue_certificate(ca_key, ca_cert, key, common_name, usage))
        outputs[f"{stem}.crt"] = cert_pem(cert)
        outputs[f"{stem}.key"] = key_pem(key)
    outputs["card.toml"] = CAC_PROFILE.encode()
    written = []
    for name, data in outputs.items():
        path = directory / name
        path.write_bytes(data)
        if name.endswith(".key"):
            path.chmod(0o600)
        written.append(path)
    return written
