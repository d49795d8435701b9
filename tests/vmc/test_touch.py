"""Touch sensors on the adapter side (vmc/touch.py) with the PIV card's touch policies: the
card asks, the sensor waits (a button pressed from another thread), the card answers."""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from yubikit.core.smartcard import ApduError
from yubikit.piv import DEFAULT_MANAGEMENT_KEY, KEY_TYPE, PIN_POLICY, SLOT, TOUCH_POLICY, PivSession

from ccidemu.cards import CardOptions, open_card
from ccidemu.cards.piv import BlockingPivCard, PivCard
from ccidemu.errors import CcidemuError, ConfigError
from ccidemu.tlv import ber_find
from tests.vmc.daemon_harness import RunningDaemon, serve
from vmc.addr import UnixAddress
from vmc.control import ControlError
from vmc.fakeqemu import FakeQemu
from vmc.lab.yubikit import CardConnection
from vmc.touch import DelayedTouch, TouchButton, TouchMode, TouchSetting, parse_touch

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


# --------------------------------------------------------------------------- ccidemu serve


def _touch_card(tmp: Path) -> str:
    """The demo card with slot 9E's key needing a touch every time."""
    certs = tmp / "certs"
    shutil.copytree(FIXTURES, certs)
    profile = certs / "card.toml"
    text = profile.read_text()
    assert '[slots.9e]\ncert = "9e.crt"\nkey = "9e.key"\n' in text
    profile.write_text(text.replace('[slots.9e]\ncert = "9e.crt"\nkey = "9e.key"\n',
                                    '[slots.9e]\ncert = "9e.crt"\nkey = "9e.key"\n'
                                    'touch_policy = "always"\n'))
    return f"piv:{profile}"


SELECT_PIV = bytes.fromhex("00a4040005a000000308")
DIGEST = hashlib.sha384(b"touch me").digest()
SIGN_9E = bytes.fromhex("0087149e367c3482008130") + DIGEST


def _reader(d: RunningDaemon) -> dict[str, Any]:
    (vm,) = d.request({"cmd": "list"})
    reader: dict[str, Any] = vm["readers"][0]
    return reader


def test_serve_touch_button_waits_for_ctl_touch(tmp: Path, daemons: list[RunningDaemon]
                                                ) -> None:
    addr = UnixAddress(tmp / "vm.sock")
    d = serve(listen=[addr], cards=[_touch_card(tmp)], touch=parse_touch("button:60"))
    daemons.append(d)
    assert _reader(d)["touch"] == "button:60" and _reader(d)["touch_waiting"] is False
    with FakeQemu.connect(addr) as fake:
        fake.wait_card()
        assert fake.transmit(SELECT_PIV)[-2:] == b"\x90\x00"
        answers: list[bytes] = []
        signer = threading.Thread(target=lambda: answers.append(
            fake.transmit(SIGN_9E, timeout=90)))
        signer.start()
        deadline = time.monotonic() + 30
        while not _reader(d)["touch_waiting"]:
            assert time.monotonic() < deadline, "the card never asked for a touch"
            time.sleep(0.02)
        assert answers == []  # no answer before the touch
        assert d.request({"cmd": "touch", "vm": "vm1"}) == {"vm": "vm1", "reader": 0,
                                                            "waiting": True}
        signer.join(60)
        (answer,) = answers
        assert answer[-2:] == b"\x90\x00"
        template = ber_find(answer[:-2], 0x7C)
        assert template is not None
        signature = ber_find(template, 0x82)
        assert signature is not None
        cert = x509.load_pem_x509_certificate((FIXTURES / "9e.crt").read_bytes())
        public = cert.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(signature, DIGEST, ec.ECDSA(Prehashed(hashes.SHA384())))
        assert _reader(d)["touch_waiting"] is False


def test_serve_touch_button_unpressed_is_6985_and_auto_has_no_button(
    tmp: Path, daemons: list[RunningDaemon]
) -> None:
    addr, auto = UnixAddress(tmp / "vm.sock"), UnixAddress(tmp / "auto.sock")
    d = serve(listen=[addr], cards=[_touch_card(tmp)], touch=parse_touch("button:0.2"))
    daemons.append(d)
    with FakeQemu.connect(addr) as fake:
        fake.wait_card()
        assert fake.transmit(SELECT_PIV)[-2:] == b"\x90\x00"
        assert fake.transmit(SIGN_9E, timeout=60) == b"\x69\x85"  # nobody touched it
    d2 = serve(listen=[auto], cards=[_touch_card(tmp / "b")])
    daemons.append(d2)
    with pytest.raises(ControlError, match="touched auto, not by a button"):
        d2.request({"cmd": "touch", "vm": "vm1"})
    with FakeQemu.connect(auto) as fake:  # auto: touched at once
        fake.wait_card()
        assert fake.transmit(SELECT_PIV)[-2:] == b"\x90\x00"
        assert fake.transmit(SIGN_9E, timeout=60)[-2:] == b"\x90\x00"


def test_a_touch_wait_ends_when_the_daemon_stops(tmp: Path) -> None:
    addr = UnixAddress(tmp / "vm.sock")
    d = serve(listen=[addr], cards=[_touch_card(tmp)], touch=parse_touch("button:3600"))
    with FakeQemu.connect(addr) as fake:
        fake.wait_card()
        assert fake.transmit(SELECT_PIV)[-2:] == b"\x90\x00"
        outcome: list[object] = []

        def sign() -> None:
            try:
                outcome.append(fake.transmit(SIGN_9E, timeout=90))
            except Exception as exc:  # the reader went away: reported to the test thread
                outcome.append(exc)

        signer = threading.Thread(target=sign)
        signer.start()
        deadline = time.monotonic() + 30
        while not _reader(d)["touch_waiting"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        d.stop()  # asserts it stopped within its own generous limit, not after 3600 s
        signer.join(60)
        # the wait ended untouched: 6985 if the answer made it out before the reader left,
        # else the reader's removal; never a signature
        (result,) = outcome
        assert result == b"\x69\x85" or isinstance(result, CcidemuError | OSError), result


@pytest.mark.parametrize(("text", "setting"), [
    ("auto", TouchSetting()), ("delay:2", TouchSetting(TouchMode.DELAY, 2.0)),
    ("button", TouchSetting(TouchMode.BUTTON, 15.0)),
    ("Button:30", TouchSetting(TouchMode.BUTTON, 30.0))])
def test_touch_settings(text: str, setting: TouchSetting) -> None:
    assert parse_touch(text) == setting
    assert parse_touch(str(setting)) == setting


@pytest.mark.parametrize("text", ["press", "delay", "delay:-1", "button:0", "auto:3",
                                  "delay:x", "button:99999"])
def test_bad_touch_settings(text: str) -> None:
    with pytest.raises(ConfigError, match="touch mode"):
        parse_touch(text)
