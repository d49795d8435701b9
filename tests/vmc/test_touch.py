"""Touch sensors on the adapter side (vmc/touch.py) with the PIV card's touch policies: the
card asks, the sensor waits (a button pressed from another thread), the card answers."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from yubikit.core.smartcard import ApduError
from yubikit.piv import DEFAULT_MANAGEMENT_KEY, KEY_TYPE, PIN_POLICY, SLOT, TOUCH_POLICY, PivSession

from ccidemu.cards import CardOptions, open_card
from ccidemu.cards.piv import BlockingPivCard, PivCard
from vmc.lab.yubikit import CardConnection
from vmc.touch import DelayedTouch, TouchButton

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "certs"


def _card(tmp_path: Path, touch: object) -> PivCard:
    shutil.copytree(FIXTURES, tmp_path / "certs")
    card = open_card(f"piv:{tmp_path / 'certs' / 'card.toml'}",
                     CardOptions(touch=touch))  # type: ignore[arg-type]
    assert isinstance(card, BlockingPivCard) and card.blocking
    return card


def test_a_touch_waits_for_the_button(tmp_path: Path) -> None:
    button = TouchButton(timeout=60)
    card = _card(tmp_path, button)
    session = PivSession(CardConnection(card))
    session.authenticate(DEFAULT_MANAGEMENT_KEY)
    public = session.generate_key(SLOT.RETIRED1, KEY_TYPE.ECCP256, PIN_POLICY.NEVER,
                                  TOUCH_POLICY.ALWAYS)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    result: list[bytes | BaseException] = []

    def sign() -> None:
        try:
            result.append(session.sign(SLOT.RETIRED1, KEY_TYPE.ECCP256, b"m", hashes.SHA256()))
        except BaseException as exc:  # reported to the test thread
            result.append(exc)

    worker = threading.Thread(target=sign)
    worker.start()
    assert button.wait_for_request(30)  # the card is waiting for the touch now
    assert result == [] and button.waiting
    button.press()
    worker.join(30)
    assert not worker.is_alive()
    signature = result[0]
    assert isinstance(signature, bytes)
    public.verify(signature, b"m", ec.ECDSA(hashes.SHA256()))
    assert button.requests == 1 and not button.waiting


def test_no_touch_is_6985(tmp_path: Path) -> None:
    card = _card(tmp_path, TouchButton(timeout=0))  # nobody presses
    session = PivSession(CardConnection(card))
    session.authenticate(DEFAULT_MANAGEMENT_KEY)
    session.generate_key(SLOT.RETIRED1, KEY_TYPE.ECCP256, PIN_POLICY.NEVER,
                         TOUCH_POLICY.ALWAYS)
    with pytest.raises(ApduError) as refused:
        session.sign(SLOT.RETIRED1, KEY_TYPE.ECCP256, b"m", hashes.SHA256())
    assert refused.value.sw == 0x6985
    # keys without a touch policy never ask
    session.sign(SLOT.CARD_AUTH, KEY_TYPE.ECCP384, b"m", hashes.SHA384())


def test_delayed_touch_counts_and_rejects_negative_delays() -> None:
    touch = DelayedTouch(0)
    assert touch(object()) and touch.requests == 1
    with pytest.raises(ValueError):
        DelayedTouch(-1)


def test_without_a_sensor_the_card_is_not_blocking() -> None:
    card = open_card("piv:")
    assert type(card) is PivCard and not card.blocking
