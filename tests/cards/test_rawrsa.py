"""Raw RSA through OpenSSL (ccidemu.rsa_raw) against Python integers, one key shared by
threads, and the parse cache of card files (ccidemu.cards.piv_files.load_config)."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given, settings
from hypothesis import strategies as st

from ccidemu import rsa_raw
from ccidemu.cards.piv_files import load_config

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "certs"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
N = KEY.private_numbers().public_numbers.n
D = KEY.private_numbers().d


def test_openssl_is_there() -> None:
    # Debian 12 ships OpenSSL 3: the fast path must be in use
    assert rsa_raw.openssl_available() and rsa_raw.raw_key(KEY).backend == "openssl"
    assert rsa_raw.raw_key(KEY) is rsa_raw.raw_key(KEY)


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0, max_value=N - 1))
def test_equals_the_textbook_operation(c: int) -> None:
    block = c.to_bytes(256, "big")
    assert rsa_raw.raw_key(KEY).private_op(block) == pow(c, D, N).to_bytes(256, "big")


@pytest.mark.parametrize("c", [N, N + 1, (1 << 2048) - 1])
def test_a_block_not_below_the_modulus_is_refused(c: int) -> None:
    with pytest.raises(rsa_raw.RawRsaError, match="not below the modulus"):
        rsa_raw.raw_key(KEY).private_op(c.to_bytes(256, "big"))


def test_threads_get_their_own_answers() -> None:
    inputs = [(i * 7919 + 3).to_bytes(256, "big") for i in range(16)]
    results: dict[int, bytes | None] = {}

    def work(i: int) -> None:
        results[i] = rsa_raw.raw_key(KEY).private_op(inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[i] == pow(int.from_bytes(inputs[i], "big"), D, N).to_bytes(256, "big")
               for i in range(16))


def test_card_files_are_parsed_once_and_again_when_they_change(tmp_path: Path) -> None:
    card = tmp_path / "card"
    shutil.copytree(FIXTURES, card)
    first = load_config(str(card))
    assert load_config(str(card)) is first  # unchanged files: the same parse
    other = tmp_path / "other"
    other.mkdir()
    # swap slot 9a for 9c's pair: the next open must see the new certificate
    (card / "9a.crt").write_bytes((FIXTURES / "9c.crt").read_bytes())
    (card / "9a.key").write_bytes((FIXTURES / "9c.key").read_bytes())
    second = load_config(str(card))
    assert second is not first
    want = x509.load_pem_x509_certificate((FIXTURES / "9c.crt").read_bytes())
    assert second.certs[0x9A] == want.public_bytes(Encoding.DER)
    (card / "9e.crt").unlink()
    (card / "9e.key").unlink()
    assert 0x9E not in load_config(str(card)).certs  # a file gone: parsed again
