"""The --card registry and the built-in test card."""

from __future__ import annotations

import pytest

from ccidemu.card import BuiltinTestCard, Card
from ccidemu.cards import open_card
from ccidemu.errors import ConfigError


def test_test_card_is_a_card() -> None:
    card = open_card("test:vm1")
    assert isinstance(card, Card)
    assert card.name == "built-in test card (vm1)"
    assert card.power_on() == BuiltinTestCard.ATR


@pytest.mark.parametrize(
    ("apdu", "response"),
    [
        ("00a4040008f0636369646d7501", "9000"),
        ("00a4040004f0636369", "9000"),
        ("00a4040003a00000", "6a82"),
        ("80e0000003010203", "0102039000"),
        ("80e2000004", "000102039000"),
        ("10e0000000", "6e00"),
        ("8077000000", "6d00"),
        ("80", "6700"),
    ],
)
def test_test_card_answers(apdu: str, response: str) -> None:
    assert BuiltinTestCard().transmit(bytes.fromhex(apdu)).hex() == response


def test_test_card_counts_apdus() -> None:
    card = BuiltinTestCard()
    card.transmit(bytes.fromhex("80e0000000"))
    assert card.transmit(bytes.fromhex("80e4000004")) == bytes.fromhex("000000029000")


@pytest.mark.parametrize("spec", ["nonsense", "zz:thing"])
def test_bad_spec_is_a_config_error(spec: str) -> None:
    with pytest.raises(ConfigError, match="scheme"):
        open_card(spec)
