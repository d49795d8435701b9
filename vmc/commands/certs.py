"""``ccidemu certs generate DIR``: a test CA, one certificate + key per PIV slot, and an
attestation key (slot F9) with its own attestation CA; ``--cac``: a CAC card's files."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ccidemu.certs import KEY_TYPES, generate_cac_set, generate_test_set
from ccidemu.errors import ConfigError

_EPILOG = f"""\
Files written (the slot naming convention that --card piv:DIR reads):
  9a.crt 9a.key   RSA-2048, PIV Authentication (sign)
  9c.crt 9c.key   ECC P-256, Digital Signature (PIN always)
  9d.crt 9d.key   RSA-2048, Key Management (decrypt; keyAgreement when EC)
  9e.crt 9e.key   ECC P-384, Card Authentication (no PIN; sign and keyAgreement/ECDH)
  f9.crt f9.key   ECC P-256 attestation key; its certificate is a CA issued by
                  attestation-ca.crt (attestation certificates verify against it)
  ca.crt ca.key   the test root CA (ECC P-256) of the slot certificates
  attestation-ca.crt attestation-ca.key   the attestation root CA
  card.toml       an example card profile (--card piv:DIR/card.toml)
Key types for --algorithm: {", ".join(KEY_TYPES)}.
With --cac (the naming --card cac:DIR reads):
  cert1.crt cert1.key   RSA-2048, PKI applet 0 (ID: sign, clientAuth)
  cert2.crt cert2.key   RSA-2048, PKI applet 1 (signature)
  cert3.crt cert3.key   RSA-2048, PKI applet 2 (encryption: sign and decrypt)
  ca.crt ca.key         the test root CA (ECC P-256)
  card.toml             a card profile (--card cac:DIR/card.toml)
Keys are unencrypted PKCS#8 PEM: for tests only.

examples:
  ccidemu certs generate /tmp/piv
  ccidemu certs generate --algorithm 9a=rsa4096 --algorithm 9d=p256 /tmp/piv
  ccidemu vpcd --card piv:/tmp/piv/card.toml
  ccidemu certs generate --cac /tmp/cac && ccidemu serve --card cac:/tmp/cac
"""


def _slot_algorithm(text: str) -> tuple[str, str]:
    slot, sep, key_type = text.partition("=")
    if not sep or not slot or not key_type:
        raise argparse.ArgumentTypeError(f"{text!r} is not SLOT=KEYTYPE (e.g. 9a=rsa3072)")
    return slot.strip().lower(), key_type.strip().lower()


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "certs",
        help="generate test CA, certificates and keys for emulated cards",
        description="Test PKI for the emulated PIV and CAC cards.",
    )
    sub = parser.add_subparsers(dest="certs_command", metavar="ACTION", required=True)
    gen = sub.add_parser(
        "generate",
        help="write a test CA and slot certificates/keys into DIR",
        description="Write a test CA and certificates + keys for PIV slots 9A, 9C, 9D, 9E, "
        "and an attestation key for slot F9 with its attestation CA (with --cac: a CAC "
        "card's three PKI applets and their CA).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("directory", metavar="DIR", type=Path, help="output directory")
    gen.add_argument("--force", action="store_true", help="overwrite existing files")
    gen.add_argument(
        "--algorithm", "-a", metavar="SLOT=KEYTYPE", type=_slot_algorithm, action="append",
        default=[], help="key type of one slot (repeatable), e.g. 9a=rsa3072 or 9d=p256")
    gen.add_argument("--no-attestation", action="store_true",
                     help="no attestation key (f9) and attestation CA")
    gen.add_argument("--cac", action="store_true",
                     help="write a CAC card's files (cert1 to cert3, ca, card.toml) instead")
    gen.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    if args.cac:
        if args.algorithm or args.no_attestation:
            raise ConfigError("--algorithm and --no-attestation are PIV options, not --cac's")
        for path in generate_cac_set(args.directory, force=args.force):
            print(path)
        return 0
    algorithms = dict(args.algorithm)
    if len(algorithms) != len(args.algorithm):
        raise ConfigError("--algorithm given twice for one slot")
    written = generate_test_set(args.directory, force=args.force, algorithms=algorithms,
                                attestation=not args.no_attestation)
    for path in written:
        print(path)
    return 0
