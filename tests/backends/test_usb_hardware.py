"""The USB backend on a physical USB CCID reader with a card in it: ``pytest --usb-reader
VID:PID[:SERIAL]`` (or ``CCIDEMU_USB_READER``), pcscd stopped (it holds every CCID reader).
Without a reader these tests skip, saying so.  What they check holds for any reader and card:
the reader is listed and supported, the card powers up with an ATR that parses, an APDU gets
an answer with a status word, the watch reports the card first, and the daemon serves it to
the fake QEMU."""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ccidemu.atr import parse_atr
from ccidemu.card import CardInserted, ReaderEvent
from tests.vmc.daemon_harness import serve
from vmc.addr import parse_address
from vmc.backends.usb import UsbCard, list_usb_readers, parse_usb_spec
from vmc.fakeqemu import FakeQemu

pytestmark = pytest.mark.hardware

#: SELECT of an AID no card has: any card answers it with a status word (6A82, 6D00, ...)
PROBE = bytes.fromhex("00A4040005F0CCDE0001")


@pytest.fixture(scope="module")
def reader_spec(request: pytest.FixtureRequest) -> str:
    spec = request.config.getoption("usb_reader") or os.environ.get("CCIDEMU_USB_READER")
    if not spec:
        pytest.skip("no physical USB CCID reader given: run with --usb-reader VID:PID[:SERIAL] "
                    "(or CCIDEMU_USB_READER=VID:PID), a card in the reader and pcscd stopped; "
                    "'ccidemu readers --usb' lists the readers")
    return str(spec)


@pytest.fixture
def card(reader_spec: str) -> Iterator[UsbCard]:
    usb_card = UsbCard(parse_usb_spec(reader_spec))
    usb_card.open()
    yield usb_card
    usb_card.close()


def test_the_reader_is_listed_and_usable(reader_spec: str) -> None:
    selector = parse_usb_spec(reader_spec)
    prefix = f"usb:{selector.vid:04x}:{selector.pid:04x}"
    found = [r for r in list_usb_readers() if r.spec.startswith(prefix)]
    assert found, f"{prefix} not among {[r.spec for r in list_usb_readers()]}"
    assert found[0].problem is None, found[0].problem


def test_power_on_and_an_apdu(card: UsbCard) -> None:
    atr = card.power_on()
    parse_atr(atr)  # DecodeError if the ATR is malformed
    answer = card.transmit(PROBE)
    assert len(answer) >= 2
    assert card.transmit(PROBE)[-2:] == answer[-2:]  # the same question, the same status
    card.power_off()


def test_the_watch_reports_the_card_first(card: UsbCard) -> None:
    events: queue.Queue[ReaderEvent] = queue.Queue()
    card.watch(events.put)
    try:
        assert events.get(timeout=30) == CardInserted()
    finally:
        card.unwatch()


def test_the_daemon_serves_it(reader_spec: str) -> None:
    work = Path(tempfile.mkdtemp(prefix="ccidemu-hw-"))
    address = parse_address(f"unix:{work}/vm.sock")
    daemon = serve(listen=[address], cards=[f"usb:{reader_spec}"], control=None)
    try:
        with FakeQemu.connect(address) as fake:
            parse_atr(fake.wait_card(timeout=30))
            assert len(fake.transmit(PROBE, timeout=30)) >= 2
    finally:
        daemon.stop()
        shutil.rmtree(work, ignore_errors=True)

