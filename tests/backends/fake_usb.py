"""A USB transport over the emulated reader (tests/backends/ccid_reader.py), with the faults a
real device can have: a pipe that stalls, a device that answers nothing, one that vanishes in
the middle of an APDU and comes back, bytes that break CCID.

:class:`FakeUsb` is the "bus": it holds the device (or nothing, while it is unplugged) and
opens transports on it as :func:`vmc.backends.usb.open_transport` would.  ``fakeusb:NAME``
cards for the in-process daemon come from :data:`DEVICES` (see :func:`open_fake_usb`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

from ccidemu.cards import CardOptions
from ccidemu.ccid import CcidDescriptor
from ccidemu.errors import CardError
from tests.backends.ccid_reader import EmulatedReader
from vmc.backends.usb import UsbCard, UsbGone, UsbSelector, UsbStall


class FakeUsb:
    """One USB port with (maybe) one CCID reader in it."""

    def __init__(self, reader: EmulatedReader | None, packet_size: int = 64) -> None:
        self.reader = reader
        self.packet_size = packet_size
        self.cond = threading.Condition()
        self.opened = 0
        self.resets = 0
        self.abort_requests: list[int] = []
        self.stall_reads = 0  # the next N bulk-IN reads stall
        self.vanish_after_write: int | None = None  # unplug after the Nth bulk-OUT write
        self.writes = 0
        self.in_use = False

    # the bus
    def unplug(self) -> None:
        with self.cond:
            self.reader = None
            self.cond.notify_all()

    def plug(self, reader: EmulatedReader) -> None:
        with self.cond:
            self.reader = reader
            self.cond.notify_all()

    def changed(self) -> None:
        """The reader's state changed (insert/remove): wake readers of the pipes."""
        with self.cond:
            self.cond.notify_all()

    def open(self, selector: UsbSelector) -> FakeTransport:
        with self.cond:
            if self.reader is None:
                raise UsbGone(f"no USB device {selector} is plugged in")
            if self.in_use:
                from ccidemu.errors import ConfigError

                raise ConfigError(f"USB reader {selector} is in use: another program has it")
            self.opened += 1
            return FakeTransport(self, self.reader)


class FakeTransport:
    """:class:`vmc.backends.usb.UsbTransport` on the emulated reader."""

    def __init__(self, bus: FakeUsb, reader: EmulatedReader) -> None:
        self.bus = bus
        self.reader = reader
        self.name = "fake 08e6:4433"
        self.descriptor: CcidDescriptor = reader.descriptor
        self.packet_size = bus.packet_size
        self.has_interrupt = reader.has_interrupt
        self.closed = False

    def _check(self) -> None:
        if self.bus.reader is not self.reader or self.closed:
            raise UsbGone("the fake device is gone")

    def write(self, data: bytes, timeout: float) -> None:
        with self.bus.cond:
            self._check()
            self.reader.bulk_out(data)
            self.bus.writes += 1
            if self.bus.vanish_after_write == self.bus.writes:
                self.bus.reader = None  # the device leaves with the answer unsent
            self.bus.cond.notify_all()

    def _wait(self, ready: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            self._check()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("nothing")
            self.bus.cond.wait(remaining)
        self._check()

    def read(self, size: int, timeout: float) -> bytes:
        with self.bus.cond:
            self._check()
            if self.bus.stall_reads:
                self.bus.stall_reads -= 1
                raise UsbStall("the fake device stalled bulk-IN")
            self._wait(lambda: bool(self.reader.pending_transfers), timeout)
            return self.reader.take_transfer(size)  # USB: a read ends with its transfer

    def read_interrupt(self, timeout: float) -> bytes:
        if not self.has_interrupt:
            raise CardError("no interrupt endpoint")
        with self.bus.cond:
            self._wait(lambda: bool(self.reader.interrupts), timeout)
            return self.reader.interrupts.popleft()

    def abort_request(self, value: int) -> None:
        with self.bus.cond:
            self._check()
            self.bus.abort_requests.append(value)

    def clear_halt(self) -> None:
        pass

    def reset(self) -> None:
        self.bus.resets += 1
        while self.reader.pending_transfers:
            self.reader.take_transfer(1 << 20)
        self.reader.mute = False

    def close(self) -> None:
        with self.bus.cond:
            self.closed = True
            self.bus.cond.notify_all()


#: ``fakeusb:NAME`` -> its bus, for cards the in-process daemon opens.
DEVICES: dict[str, FakeUsb] = {}


def open_fake_usb(argument: str, options: CardOptions) -> UsbCard:
    """Registered as the ``fakeusb`` scheme by the tests that need it."""
    bus = DEVICES[argument]
    card = UsbCard(UsbSelector(0x08E6, 0x4433), opener=bus.open, response_timeout=1.0)
    with contextlib.suppress(UsbGone):
        card.open()
    return card
