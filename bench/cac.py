"""CAC SIGN/DECRYPT per second through the card object vs bare ``cryptography``.

Run: ``.venv/bin/python -m bench.cac [--seconds S]``.  The demo card (fixtures/cac, RSA-2048
keys), logged in once.  The card path includes APDU parsing, the applet routing, the
SIGN/DECRYPT input handling and the raw RSA private operation (OpenSSL's, through
``ccidemu.rsa_raw``).  Two ways to send the 256-byte block: one extended APDU with Le
0000 (one exchange), and what OpenSC does with short APDUs (P1 = 80 with 128 bytes, P1 =
00 with the rest, 61 00, GET RESPONSE: three exchanges).  The bare side is the cheapest
way to ask ``cryptography`` for the same result: ``sign`` of the same digest
(PKCS#1 v1.5, ``Prehashed``) and ``decrypt`` of the same ciphertext (PKCS#1 v1.5), padding
objects built once.  Card and bare calls alternate one by one, each timed, and each side's
rate comes from its fastest fifth of calls (on a shared machine the slow calls are other
people's load, and alternating makes it hit both sides alike).  Target: card / bare >= 0.9.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from ccidemu.apdu import CommandApdu
from ccidemu.cards.cac import CacCard
from ccidemu.cards.cac_files import demo_directory, load_directory

SHA256_INFO = bytes.fromhex("3031300d060960864801650304020105000420")
SELECT_PKI0 = bytes.fromhex("00a4040007a0000000790100")
VERIFY = bytes.fromhex("0020000008313233343536ffff")
GET_RESPONSE = bytes.fromhex("00c0000000")


def _pair_rates(card_op: Callable[[], object], bare_op: Callable[[], object],
                seconds: float) -> tuple[float, float]:
    """Calls per second of each, timed one call at a time, alternating (see the docstring)."""
    card_op(), bare_op()  # warm up
    card_times: list[float] = []
    bare_times: list[float] = []
    clock = time.perf_counter
    deadline = clock() + seconds
    while clock() < deadline:
        for _ in range(20):
            t0 = clock()
            card_op()
            t1 = clock()
            bare_op()
            t2 = clock()
            card_times.append(t1 - t0)
            bare_times.append(t2 - t1)

    def best_fifth(times: list[float]) -> float:
        fastest = sorted(times)[: max(1, len(times) // 5)]
        return len(fastest) / sum(fastest)

    return best_fifth(card_times), best_fifth(bare_times)


def _extended(card: CacCard, block: bytes) -> Callable[[], bytes]:
    apdu = CommandApdu(0x80, 0x42, 0x00, 0x00, block, 65536, extended=True).encode()
    assert card.transmit(apdu)[-2:] == b"\x90\x00"
    return lambda: card.transmit(apdu)


def _chained(card: CacCard, block: bytes) -> Callable[[], bytes]:
    first = CommandApdu(0x80, 0x42, 0x80, 0x00, block[:128]).encode()
    last = CommandApdu(0x80, 0x42, 0x00, 0x00, block[128:]).encode()

    def run() -> bytes:
        card.transmit(first)
        card.transmit(last)
        return card.transmit(GET_RESPONSE)

    assert run()[-2:] == b"\x90\x00"
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="per operation and side")
    args = parser.parse_args()
    config = load_directory(demo_directory())
    key = config.credentials[0].key
    card = CacCard(config.credentials, config.state)
    card.power_on()
    assert card.transmit(SELECT_PKI0)[-2:] == b"\x61\x0d"
    assert card.transmit(VERIFY) == b"\x90\x00"

    digest = os.urandom(32)
    sign_block = b"\x00\x01" + b"\xff" * (256 - 3 - 51) + b"\x00" + SHA256_INFO + digest
    pkcs1, prehashed = padding.PKCS1v15(), Prehashed(hashes.SHA256())
    ciphertext = key.public_key().encrypt(os.urandom(32), pkcs1)
    rows = [
        ("SIGN extended", _extended(card, sign_block), lambda: key.sign(digest, pkcs1, prehashed)),
        ("SIGN short, chained", _chained(card, sign_block),
         lambda: key.sign(digest, pkcs1, prehashed)),
        ("DECRYPT extended", _extended(card, ciphertext), lambda: key.decrypt(ciphertext, pkcs1)),
        ("DECRYPT short, chained", _chained(card, ciphertext),
         lambda: key.decrypt(ciphertext, pkcs1)),
    ]
    print(f"{'RSA-2048 operation':<24} {'card/s':>10} {'bare/s':>10} {'ratio':>7} "
          f"{'overhead':>10}")
    for name, card_op, bare_op in rows:
        card_rate, bare_rate = _pair_rates(card_op, bare_op, args.seconds)
        overhead = (1 / card_rate - 1 / bare_rate) * 1e6
        print(f"{name:<24} {card_rate:10.0f} {bare_rate:10.0f} {card_rate / bare_rate:7.2f}"
              f" {overhead:8.2f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
