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


# --- the Yubico extensions (issue 12): no new way in, no key material out -----------------

#: Every command that changes keys, secrets or objects, sent without the management key.
ADMIN_COMMANDS = [
    pytest.param("00fe1182" "2206" "20" + "01" * 32, id="import-key"),
    pytest.param("00ffffff1b039b18" + "02" * 24, id="set-management-key"),
    pytest.param("00fa0505", id="set-pin-retries"),
    pytest.param("00f6839a", id="move-key"),
    pytest.param("00f6ff9a", id="delete-key"),
    pytest.param("0047009a05ac03800111", id="generate"),
    pytest.param("00db3fff075c035fc1055300", id="put-data"),
]


@pytest.mark.parametrize("apdu", ADMIN_COMMANDS)
@pytest.mark.parametrize("pin", [False, True], ids=["no-pin", "pin"])
def test_key_and_secret_commands_need_the_management_key(
    config: CardConfig, apdu: str, pin: bool
) -> None:
    card = _card(config, Algorithm.TDES, os.urandom(24))
    if pin:  # the PIN alone is not enough either
        card.transmit(bytes.fromhex("0020008008" + b"123456\xff\xff".hex()))
        assert card.pin_verified
    before = (dict(card.state.keys), dict(card.state.objects), card.state.management_key,
              card.state.pin_retries)
    assert card.transmit(bytes.fromhex(apdu))[-2:] == b"\x69\x82"
    assert (dict(card.state.keys), dict(card.state.objects), card.state.management_key,
            card.state.pin_retries) == before


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(["pin", "puk", "good-pin", "good-puk", "reset", "select"]),
                max_size=14))
def test_reset_only_when_pin_and_puk_are_both_blocked(config: CardConfig, steps: list[str]
                                                      ) -> None:
    """Property: RESET answers 9000 exactly when both counters are at 0 (and then wipes
    the keys); in every other state 6985 and nothing changes."""
    card = _card(config, Algorithm.TDES, os.urandom(24))
    commands = {
        "pin": "0020008008" + "ff" * 8,
        "puk": "002c008010" + "ff" * 16,
        "good-pin": "0020008008" + b"123456\xff\xff".hex(),
        "good-puk": "002c008010" + b"12345678".hex() + b"123456\xff\xff".hex(),
        "select": "00a4040005a000000308",
    }
    for step in steps:
        if step != "reset":
            card.transmit(bytes.fromhex(commands[step]))
            continue
        blocked = card.state.pin_left == 0 and card.state.puk_left == 0
        keys = dict(card.state.keys)
        sw = card.transmit(bytes.fromhex("00fb0000"))
        if blocked:
            assert sw == b"\x90\x00"
            assert sorted(card.state.keys) == [0xF9]
        else:
            assert sw == b"\x69\x85"
            assert card.state.keys == keys


def _private_parts(state: PivState) -> list[bytes]:
    from tests.support import private_parts

    out = [state.management_key, state.pin, state.puk]
    for key in state.keys.values():
        out += private_parts(key)
    return out


YUBICO_APDUS = st.one_of(
    st.sampled_from([
        "00fd0000", "00f80000", "00f70080", "00f70081", "00f7009b", "00f7009a", "00f7009c",
        "00f7009d", "00f7009e", "00f700f9", "00f99a00", "00f99c00", "00f98200", "00f9f900",
        "00fb0000", "00cb3fff055c035fff01", "00cb3fff055c035fff00", "00c0000000",
        "0047009a05ac03800111", "0047008205ac038001e1", "00f6839a",
    ]).map(bytes.fromhex),
    st.builds(lambda ins, p1, p2, body: bytes((0, ins, p1, p2)) + body,
              st.sampled_from([0xF6, 0xF7, 0xF8, 0xF9, 0xFA, 0xFB, 0xFD, 0xFE, 0xFF]),
              st.integers(0, 255), st.integers(0, 255), st.binary(max_size=40)),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(YUBICO_APDUS, min_size=1, max_size=10), st.booleans())
def test_yubico_commands_never_leak_key_material(config: CardConfig, apdus: list[bytes],
                                                 unlocked: bool) -> None:
    """Property: metadata, attestation, serial, version and the rest answer only public
    values: no private key part, management key, PIN or PUK in any answer (with or
    without PIN and management key)."""
    card = _card(config, Algorithm.TDES, os.urandom(24))
    if unlocked:  # PIN verified and admin: the management key is known to the caller
        card.transmit(bytes.fromhex("0020008008" + b"123456\xff\xff".hex()))
        card.admin = True
    for apdu in apdus:
        secrets = _private_parts(card.state)
        rsp = card.transmit(apdu)
        assert len(rsp) >= 2
        assert not any(s in rsp for s in secrets if len(s) >= 6)
