"""The USB backend's card (vmc.backends.usb.UsbCard) on a fake bus (tests/backends/fake_usb.py):
the Card calls, presence from the interrupt pipe or from polling, and every device fault ending
in CardError (a failed transmit) with the reader usable again afterwards; then the same faults
through the daemon and the fake QEMU: the VM sees a failed transmit, the daemon keeps going."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vmc.backends.usb as usb_backend
from ccidemu.card import BuiltinTestCard, CardInserted, CardRemoved, ReaderEvent, ReaderUnplugged
from ccidemu.cards import register
from ccidemu.ccid import CcidAbort
from ccidemu.errors import CardError, ConfigError
from tests.backends.ccid_reader import EmulatedReader
from tests.backends.fake_usb import DEVICES, FakeUsb
from tests.vmc.daemon_harness import RunningDaemon, free_port, serve
from vmc.addr import parse_address
from vmc.backends.usb import UsbCard, UsbGone, UsbSelector, parse_usb_spec
from vmc.fakeqemu import FakeQemu

H = bytes.fromhex
ECHO = H("80E000000301020300")
SELECTOR = UsbSelector(0x08E6, 0x4433)


@pytest.fixture(autouse=True)
def quick_abort(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(usb_backend, "ABORT_TIMEOUT", 0.5)
    monkeypatch.setattr(usb_backend, "REPLUG_POLL", 0.05)
    monkeypatch.setattr(usb_backend, "STATUS_POLL", 0.05)
    monkeypatch.setattr(usb_backend, "POLL", 0.05)


def make(level: str = "tpdu", *, interrupt: bool = True, timeout: float = 1.0
         ) -> tuple[UsbCard, FakeUsb, EmulatedReader]:
    reader = EmulatedReader(BuiltinTestCard(), level, interrupt=interrupt)
    bus = FakeUsb(reader)
    return UsbCard(SELECTOR, opener=bus.open, response_timeout=timeout), bus, reader


class Events:
    def __init__(self, card: UsbCard) -> None:
        self.queue: queue.Queue[ReaderEvent] = queue.Queue()
        card.watch(self.queue.put)

    def next(self, timeout: float = 30.0) -> ReaderEvent:
        return self.queue.get(timeout=timeout)


def test_spec() -> None:
    assert parse_usb_spec("08e6:4433") == UsbSelector(0x08E6, 0x4433)
    assert parse_usb_spec("08E6:4433:ABC:1") == UsbSelector(0x08E6, 0x4433, "ABC:1")
    for bad in ("", "08e6", "xyz:1", "08e6:", "123456:1"):
        with pytest.raises(ConfigError, match="usb:"):
            parse_usb_spec(bad)


@pytest.mark.parametrize("level", ["tpdu", "short", "extended"])
def test_card_calls(level: str) -> None:
    card, bus, _ = make(level)
    assert card.blocking
    assert card.power_on() == BuiltinTestCard.ATR
    assert card.transmit(ECHO) == H("010203 9000")
    card.power_off()
    with pytest.raises(CardError, match="mute"):
        card.transmit(ECHO)
    assert card.power_on() == BuiltinTestCard.ATR
    card.close()
    assert bus.opened == 1


@pytest.mark.parametrize("interrupt", [True, False])
def test_presence_from_the_interrupt_pipe_or_polling(interrupt: bool) -> None:
    card, bus, reader = make(interrupt=interrupt)
    events = Events(card)
    try:
        assert events.next() == CardInserted()  # the state now
        reader.remove()
        bus.changed()
        assert events.next() == CardRemoved()
        with pytest.raises(CardError, match="no card"):
            card.power_on()
        reader.insert(BuiltinTestCard())
        bus.changed()
        assert events.next() == CardInserted()
        assert card.power_on() == BuiltinTestCard.ATR
        bus.unplug()
        assert isinstance(events.next(), ReaderUnplugged)
        with pytest.raises(CardError):
            card.transmit(ECHO)
        bus.plug(reader)
        assert events.next() == CardInserted()
        assert card.power_on() == BuiltinTestCard.ATR
        assert card.transmit(ECHO) == H("010203 9000")
    finally:
        card.unwatch()
    assert events.queue.empty()


def test_an_absent_reader_is_reported_and_awaited() -> None:
    bus = FakeUsb(None)
    card = UsbCard(SELECTOR, opener=bus.open, response_timeout=1.0)
    events = Events(card)
    try:
        assert isinstance(events.next(), ReaderUnplugged)
        reader = EmulatedReader(None, "short")
        bus.plug(reader)
        assert events.next() == CardRemoved()  # the reader came, empty
        reader.insert(BuiltinTestCard())
        bus.changed()
        assert events.next() == CardInserted()
    finally:
        card.unwatch()


def test_a_stalled_pipe_fails_the_call_and_the_next_works() -> None:
    card, bus, _ = make()
    card.power_on()
    bus.stall_reads = 1
    with pytest.raises(CardError, match="stalled"):
        card.transmit(ECHO)
    assert len(bus.abort_requests) == 1 and bus.resets == 0  # resynchronised by an Abort
    assert card.transmit(ECHO) == H("010203 9000")


def test_a_mute_reader_is_aborted() -> None:
    card, bus, reader = make(timeout=0.3)
    card.power_on()
    reader.mute = True
    started = time.monotonic()
    with pytest.raises(CardError, match="aborted"):
        card.transmit(ECHO)
    assert time.monotonic() - started >= 0.3
    aborts = [c for c in reader.commands if isinstance(c, CcidAbort)]
    assert len(aborts) == 1 and bus.abort_requests == [aborts[0].seq << 8]
    reader.mute = False
    assert card.transmit(ECHO) == H("010203 9000")


def test_a_reader_that_does_not_confirm_the_abort_is_reset() -> None:
    card, bus, reader = make(timeout=0.3)
    card.power_on()
    reader.corrupt = lambda frame: b""  # says nothing at all
    with pytest.raises(CardError, match="aborted"):
        card.transmit(ECHO)
    assert bus.resets == 1
    reader.corrupt = None
    assert card.power_on() == BuiltinTestCard.ATR  # reopened after the reset
    assert bus.opened == 2
    assert card.transmit(ECHO) == H("010203 9000")


def test_a_reader_that_vanishes_mid_apdu() -> None:
    card, bus, reader = make()
    events = Events(card)
    try:
        assert events.next() == CardInserted()
        card.power_on()
        bus.vanish_after_write = bus.writes + 1
        with pytest.raises(UsbGone):
            card.transmit(ECHO)
        assert isinstance(events.next(), ReaderUnplugged)
        bus.plug(reader)
        assert events.next() == CardInserted()
        assert card.power_on() == BuiltinTestCard.ATR
        assert card.transmit(ECHO) == H("010203 9000")
    finally:
        card.unwatch()


@pytest.mark.parametrize("garbage", [
    lambda f: f[:3],  # short
    lambda f: b"\x80\xff\xff\xff\x7f" + f[5:],  # a huge dwLength
    lambda f: f[:6] + bytes((f[6] ^ 0x55,)) + f[7:],  # the wrong bSeq
    lambda f: b"\x6f" + f[1:],  # a host command, inward
])
def test_bytes_that_break_ccid_fail_the_call_and_the_reader_recovers(
    garbage: Callable[[bytes], bytes]
) -> None:
    card, _bus, reader = make(timeout=0.3)
    card.power_on()
    reader.corrupt = garbage
    with pytest.raises(CardError):
        card.transmit(ECHO)
    reader.corrupt = None
    for _ in range(2):  # a reset may need the reopening call first
        try:
            assert card.transmit(ECHO) == H("010203 9000")
            break
        except CardError:
            card.power_on()
    else:
        raise AssertionError("the reader did not recover")


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_any_corruption_ends_in_card_error_and_recovery(data: st.DataObject) -> None:
    card, _bus, reader = make("tpdu", timeout=0.2)
    card.power_on()
    position = data.draw(st.integers(0, 30))
    value = data.draw(st.integers(0, 255))
    mode = data.draw(st.sampled_from(["replace", "cut", "drop", "double"]))
    count = data.draw(st.integers(1, 3))
    hits = [0]

    def corrupt(frame: bytes) -> bytes:
        if hits[0] >= count:
            return frame
        hits[0] += 1
        if mode == "drop":
            return b""
        if mode == "double":
            return frame + frame
        if position >= len(frame):
            return frame
        if mode == "cut":
            return frame[:position]
        return frame[:position] + bytes((value,)) + frame[position + 1:]

    reader.corrupt = corrupt
    with contextlib.suppress(CardError):
        card.transmit(ECHO)
    reader.corrupt = None
    for _ in range(3):
        try:
            card.power_on()
            assert card.transmit(ECHO) == H("010203 9000")
            return
        except CardError:
            continue
    raise AssertionError("the reader did not recover")


def test_cancel_ends_a_stuck_call_soon() -> None:
    card, _, reader = make(timeout=60)
    card.power_on()
    reader.mute = True
    result: queue.Queue[BaseException | bytes] = queue.Queue()

    def call() -> None:
        try:
            result.put(card.transmit(ECHO))
        except BaseException as exc:
            result.put(exc)

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(0.2)  # let the call start waiting (not a synchronisation: any moment works)
    card.cancel()
    outcome = result.get(timeout=30)
    assert isinstance(outcome, CardError) and "abandoned" in str(outcome)
    thread.join(10)


def test_a_reader_in_use_at_start_is_a_clear_config_error() -> None:
    bus = FakeUsb(EmulatedReader(BuiltinTestCard()))
    bus.in_use = True
    card = UsbCard(SELECTOR, opener=bus.open)
    with pytest.raises(ConfigError, match="in use"):
        card.open()


# --------------------------------------------------------------------------- through the daemon


@pytest.fixture
def fake_scheme() -> Iterator[None]:
    register("fakeusb", "tests.backends.fake_usb:open_fake_usb")
    yield
    DEVICES.clear()


def _works_again(fake: FakeQemu, timeout: float = 30.0) -> bytes:
    """The echo's answer once the reader recovered (a reset reader's card is removed from the
    guest and inserted again: the guest's next APDUs fail until then)."""
    deadline = time.monotonic() + timeout
    answer = b""
    while time.monotonic() < deadline:
        try:
            if fake.card_present():
                answer = fake.transmit(ECHO, timeout=30)
                if answer == H("010203 9000"):
                    return answer
        except CardError:
            pass
        time.sleep(0.05)
    return answer


def _daemon(name: str) -> tuple[RunningDaemon, FakeQemu]:
    address = parse_address(f"tcp:127.0.0.1:{free_port()}")
    daemon = serve(listen=[address], cards=[f"fakeusb:{name}"], card_timeout=5)
    return daemon, FakeQemu.connect(address)


@pytest.mark.usefixtures("fake_scheme")
def test_device_faults_are_failed_transmits_and_the_daemon_keeps_going() -> None:
    reader = EmulatedReader(BuiltinTestCard(), "tpdu")
    bus = DEVICES["one"] = FakeUsb(reader)
    daemon, fake = _daemon("one")
    try:
        assert fake.wait_card(timeout=30) == BuiltinTestCard.ATR
        assert fake.transmit(ECHO, timeout=30) == H("010203 9000")
        faults: list[Callable[[], None]] = [
            lambda: setattr(bus, "stall_reads", 1),
            lambda: setattr(reader, "corrupt", lambda f: f[:4]),
            lambda: setattr(reader, "corrupt", lambda f: f[:6] + b"\x99" + f[7:]),
            lambda: setattr(reader, "mute", True),
        ]
        for fault in faults:
            fault()
            with pytest.raises(CardError, match="XfrBlock failed"):
                fake.transmit(ECHO, timeout=30)  # the VM sees a failed transmit
            reader.corrupt = None
            reader.mute = False
            assert _works_again(fake) == H("010203 9000")
        listing = daemon.request({"cmd": "list"})
        assert listing[0]["connected"] and listing[0]["readers"][0]["present"]
        # the device vanishes mid-APDU: a failed transmit, then the card leaves the guest
        bus.vanish_after_write = bus.writes + 1
        with pytest.raises(CardError, match="XfrBlock failed"):
            fake.transmit(ECHO, timeout=30)
        fake.wait_removed(timeout=30)
        bus.plug(reader)
        assert fake.wait_card(timeout=30) == BuiltinTestCard.ATR
        assert fake.transmit(ECHO, timeout=30) == H("010203 9000")
    finally:
        fake.close()
        daemon.stop()
