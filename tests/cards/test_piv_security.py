"""The PIV card's management key (9B) is never an oracle (docs/SECURITY.md, "The card").

SP 800-73-4 part 2 appendix A defines two ways to prove the management key: external
authentication (the card's challenge C, the host's E(C)) and mutual authentication (the card's
encrypted witness, then the host's challenge).  Nothing else may make the card encrypt or
decrypt with the key: if the card answered "internal authenticate" ({81 C, 82 00} ->
{82 E(C)}), anybody could ask it for E(C) of its own external challenge and become admin.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ccidemu.apdu import CommandApdu
from ccidemu.cards.piv import Algorithm, PivCard, PivState
from ccidemu.cards.piv_files import CardConfig, load_directory
from ccidemu.tlv import ber_encode, ber_find

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "certs"

#: (algorithm, key length, block length) of every management key type (SP 800-78-4 6-2).
KINDS = [
    pytest.param(Algorithm.TDES, 24, 8, id="3des"),
    pytest.param(Algorithm.AES128, 16, 16, id="aes128"),
    pytest.param(Algorithm.AES192, 24, 16, id="aes192"),
    pytest.param(Algorithm.AES256, 32, 16, id="aes256"),
]
PUT_DATA = bytes.fromhex("00db3fff075c035fc10d5300")  # needs admin


@pytest.fixture(scope="module")
def config() -> CardConfig:
    return load_directory(FIXTURES)


def _card(config: CardConfig, algorithm: int, key: bytes) -> PivCard:
    state: PivState = replace(config.state, keys=dict(config.state.keys),
                              objects=dict(config.state.objects), management_key=key,
                              management_algorithm=algorithm)
    card = PivCard(state)
    card.power_on()
    return card


def _encrypt(algorithm: int, key: bytes, block: bytes) -> bytes:
    cipher = algorithms.AES(key) if algorithm != Algorithm.TDES else TripleDES(key)
    enc = Cipher(cipher, modes.ECB()).encryptor()
    return enc.update(block) + enc.finalize()


def _auth(card: PivCard, algorithm: int, template: bytes) -> tuple[bytes, int]:
    rsp = card.transmit(CommandApdu(0, 0x87, algorithm, 0x9B, template, 256).encode())
    return rsp[:-2], int.from_bytes(rsp[-2:], "big")


def _tlv(*items: tuple[int, bytes]) -> bytes:
    return ber_encode(0x7C, b"".join(ber_encode(tag, value) for tag, value in items))


@pytest.mark.parametrize(("algorithm", "key_length", "block"), KINDS)
def test_the_card_cannot_answer_its_own_challenge(
    config: CardConfig, algorithm: int, key_length: int, block: int
) -> None:
    """The reproduction of the issue: external step 1, then 'internal authenticate' of the
    challenge, then step 2 with the card's own answer.  Refused; no admin."""
    key = os.urandom(key_length)
    card = _card(config, algorithm, key)
    out, sw = _auth(card, algorithm, _tlv((0x81, b"")))
    assert sw == 0x9000
    challenge = ber_find(ber_find(out, 0x7C) or b"", 0x81)
    assert challenge is not None and len(challenge) == block
    out, sw = _auth(card, algorithm, _tlv((0x81, challenge), (0x82, b"")))
    assert sw in (0x6A80, 0x6982)
    assert _encrypt(algorithm, key, challenge) not in out
    # whatever it answered, the challenge is spent: step 2 cannot succeed any more
    _, sw = _auth(card, algorithm, _tlv((0x82, _encrypt(algorithm, key, challenge))))
    assert sw == 0x6982
    assert not card.admin
    assert card.transmit(PUT_DATA)[-2:] == b"\x69\x82"


@pytest.mark.parametrize(("algorithm", "key_length", "block"), KINDS)
def test_a_failed_step_clears_admin(
    config: CardConfig, algorithm: int, key_length: int, block: int
) -> None:
    key = os.urandom(key_length)
    card = _card(config, algorithm, key)
    out, _sw = _auth(card, algorithm, _tlv((0x81, b"")))
    challenge = ber_find(ber_find(out, 0x7C) or b"", 0x81) or b""
    assert _auth(card, algorithm, _tlv((0x82, _encrypt(algorithm, key, challenge))))[1] == 0x9000
    assert card.admin
    assert _auth(card, algorithm, _tlv((0x81, os.urandom(block)), (0x82, b"")))[1] == 0x6A80
    assert not card.admin


def _step(block: int, seen: list[bytes]) -> st.SearchStrategy[bytes]:
    """One GENERAL AUTHENTICATE template an attacker might send: tags 80/81/82 (any order,
    any subset), each empty, random, or replaying a block the card sent earlier."""
    values = st.one_of(
        st.just(b""),
        st.binary(min_size=block, max_size=block),
        st.binary(max_size=2 * block + 1),
        st.sampled_from(seen) if seen else st.just(b""),
    )
    items = st.lists(st.tuples(st.sampled_from([0x80, 0x81, 0x82]), values),
                     min_size=1, max_size=3)
    return items.map(lambda pairs: _tlv(*pairs))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from([(Algorithm.TDES, 24, 8), (Algorithm.AES128, 16, 16),
                             (Algorithm.AES192, 24, 16), (Algorithm.AES256, 32, 16)]),
       data=st.data())
def test_no_sequence_without_the_key_grants_admin_or_encrypts_a_chosen_block(
    config: CardConfig, kind: tuple[int, int, int], data: st.DataObject
) -> None:
    """Property: a caller who does not know the key, sending any sequence of GENERAL
    AUTHENTICATE templates to 9B (replaying what the card said, SELECTs in between), never
    becomes admin and never gets E_k(x) or D_k(x) of a block x it sent."""
    algorithm, key_length, block = kind
    key = os.urandom(key_length)
    card = _card(config, algorithm, key)
    decrypt = Cipher(algorithms.AES(key) if algorithm != Algorithm.TDES else TripleDES(key),
                     modes.ECB())
    seen: list[bytes] = []  # blocks the card sent (the attacker may replay them)
    sent: set[bytes] = set()  # every block-sized piece of what the attacker sent
    answers: list[bytes] = []
    for _ in range(data.draw(st.integers(1, 8))):
        if data.draw(st.integers(0, 9)) == 0:
            card.transmit(bytes.fromhex("00a4040009a00000030800001000"))  # SELECT
            continue
        template = data.draw(_step(block, seen))
        out, sw = _auth(card, algorithm, template)
        assert not card.admin, f"admin granted after {template.hex()} -> {sw:04X}"
        for i in range(0, max(len(template) - block + 1, 0)):
            sent.add(template[i:i + block])
        answers.append(out)
        for tag in (0x80, 0x81, 0x82):
            value = ber_find(ber_find(out, 0x7C) or b"", tag)
            if value:
                seen.append(value)
    for x in sent:
        enc = Cipher(decrypt.algorithm, modes.ECB()).encryptor()
        dec = Cipher(decrypt.algorithm, modes.ECB()).decryptor()
        e = enc.update(x) + enc.finalize()
        d = dec.update(x) + dec.finalize()
        assert not any(e in a or d in a for a in answers)
    assert card.transmit(PUT_DATA)[-2:] == b"\x69\x82"
