"""PIV signatures per second: GENERAL AUTHENTICATE on the card object vs bare ``cryptography``.

Run: ``.venv/bin/python -m bench.piv [--seconds S]``.  Keys come from fixtures/certs
(9A RSA-2048, 9C P-256 loaded into slot 9A of a second card so that no "PIN always"
VERIFY sits in the loop).  The card path includes APDU parsing, the BER-TLV template,
the security check and the response template; commands are single extended APDUs.
The bare side is the cheapest way to ask ``cryptography`` for the same signature: the
same digest, with its padding / algorithm objects built once (as the card does), so the
ratio charges the card with nothing but its own work.  Each row alternates short rounds
of card and bare and keeps the best of each.  Target: card / bare >= 0.9.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from ccidemu.apdu import CommandApdu
from ccidemu.cards.piv import Algorithm, PivCard, PivState
from ccidemu.cards.piv_files import load_private_key
from ccidemu.tlv import ber_encode

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "certs"
ROUNDS = 10
SHA256_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


def _rate(func: Callable[[], object], seconds: float) -> float:
    func()  # warm up
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(10):
            func()
        count += 10
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start)


def _card(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> PivCard:
    card = PivCard(PivState(keys={0x9A: key}))
    card.power_on()
    pin = CommandApdu(0, 0x20, 0, 0x80, b"123456\xff\xff").encode()
    assert card.transmit(pin) == b"\x90\x00"
    return card


def _apdu(alg: int, data: bytes) -> bytes:
    template = ber_encode(0x7C, ber_encode(0x82, b"") + ber_encode(0x81, data))
    return CommandApdu(0, 0x87, alg, 0x9A, template, 65536, extended=True).encode()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="per operation and side")
    args = parser.parse_args()
    digest = os.urandom(32)

    rsa_key = load_private_key(FIXTURES / "9a.key", "9a")
    ec_key = load_private_key(FIXTURES / "9c.key", "9c")
    assert isinstance(rsa_key, rsa.RSAPrivateKey)
    assert isinstance(ec_key, ec.EllipticCurvePrivateKey)

    rsa_card = _card(rsa_key)
    rsa_apdu = _apdu(Algorithm.RSA2048, b"\x00\x01" + b"\xff" * (256 - 3 - 51) + b"\x00"
                     + SHA256_INFO + digest)
    assert rsa_card.transmit(rsa_apdu)[-2:] == b"\x90\x00"
    ec_card = _card(ec_key)
    ec_apdu = _apdu(Algorithm.ECCP256, digest)
    assert ec_card.transmit(ec_apdu)[-2:] == b"\x90\x00"

    pkcs1, prehashed = padding.PKCS1v15(), Prehashed(hashes.SHA256())
    ecdsa = ec.ECDSA(Prehashed(hashes.SHA256()))
    rows = [
        ("RSA-2048 PKCS#1 v1.5",
         lambda: rsa_card.transmit(rsa_apdu),
         lambda: rsa_key.sign(digest, pkcs1, prehashed)),
        ("ECDSA P-256",
         lambda: ec_card.transmit(ec_apdu),
         lambda: ec_key.sign(digest, ecdsa)),
    ]
    print(f"{'operation':<22} {'card/s':>10} {'bare/s':>10} {'ratio':>7} {'overhead':>10}")
    for name, card_op, bare_op in rows:
        # alternate short rounds and keep the best of each: other load on a shared
        # machine then hurts both sides alike instead of whichever ran second
        card_rate = bare_rate = 0.0
        for _ in range(ROUNDS):
            card_rate = max(card_rate, _rate(card_op, args.seconds / ROUNDS))
            bare_rate = max(bare_rate, _rate(bare_op, args.seconds / ROUNDS))
        overhead = (1 / card_rate - 1 / bare_rate) * 1e6
        print(f"{name:<22} {card_rate:10.0f} {bare_rate:10.0f} {card_rate / bare_rate:7.2f}"
              f" {overhead:8.2f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
