"""``ccidemu certs generate DIR``: a test CA and one certificate + key per PIV slot."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ccidemu.certs import generate_test_set

_EPILOG = """\
Files written (the slot naming convention that --card piv:DIR reads):
  9a.crt 9a.key   RSA-2048, PIV Authentication (sign)
  9c.crt 9c.key   ECC P-256, Digital Signature (PIN always)
  9d.crt 9d.key   RSA-2048, Key Management (decrypt)
  9e.crt 9e.key   ECC P-384, Card Authentication (no PIN)
  ca.crt ca.key   the test root CA (ECC P-256)
  card.toml       an example card profile (--card piv:DIR/card.toml)
Keys are unencrypted PKCS#8 PEM: for tests only.
"""


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "certs",
        help="generate test CA, certificates and keys for emulated cards",
        description="Test PKI for the emulated PIV card.",
    )
    sub = parser.add_subparsers(dest="certs_command", metavar="ACTION", required=True)
    gen = sub.add_parser(
        "generate",
        help="write a test CA and slot certificates/keys into DIR",
        description="Write a test CA and certificates + keys for PIV slots 9A, 9C, 9D, 9E.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("directory", metavar="DIR", type=Path, help="output directory")
    gen.add_argument("--force", action="store_true", help="overwrite existing files")
    gen.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    written = generate_test_set(args.directory, force=args.force)
    for path in written:
        print(path)
    return 0
