"""``--card usb:VID:PID[:SERIAL]``: the card in a USB CCID reader, driven without pcscd.

The adapter of :class:`ccidemu.ccid_host.CcidHostDriver` (the CCID protocol, pure) on pyusb
and libusb (extra ``usb``).  Two layers:

* a :class:`UsbTransport` moves bytes: bulk-OUT, bulk-IN, interrupt-IN and the ABORT control
  request of one CCID interface.  :func:`open_transport` makes one with pyusb: it finds the
  device by vendor and product id (and serial number), the interface of class 0x0B (CCID
  section 4.2.1; or a vendor-class interface carrying a CCID class descriptor, as some
  readers do), reads the class descriptor (section 5.1: after the interface descriptor, or
  after the last endpoint on readers that put it there), detaches a kernel driver, claims the
  interface.  Permission problems and a reader in use come out as one :class:`ConfigError`
  that says what to do.
* :class:`UsbCard` is the card: ``power_on`` / ``transmit`` / ``power_off`` run a driver
  operation on the card host's thread for this reader.  Bulk-IN is read one packet
  (wMaxPacketSize) at a time: a short packet ends a transfer, and a message that ends exactly
  on a packet boundary without a zero-length packet (QEMU 7.2's usb-ccid,
  docs/PROTOCOL.md) is complete anyway, since the driver knows its length from its header.
  Each read waits at most :data:`POLL` seconds so that :meth:`UsbCard.cancel` (the card
  host's timeout) and the driver's own deadline are seen soon; an overdue answer is aborted
  (CCID section 5.3.1).
  :meth:`UsbCard.watch` starts a thread that reads the interrupt endpoint (NotifySlotChange:
  card inserted or removed; section 6.3.1), or polls GetSlotStatus when the reader has none,
  and notices the reader leaving (then looks for it to come back, and reopens it).

Anything the device does wrong (bytes that break CCID, a stalled pipe, the device gone in
the middle of an APDU) ends the call with :class:`~ccidemu.errors.CardError`: the guest sees
a failed transmit, the daemon goes on, and the next call starts from a resynchronised reader.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Protocol

from ccidemu.card import CardInserted, CardRemoved, ReaderEvent, ReaderUnplugged
from ccidemu.cards import CardOptions
from ccidemu.ccid import DESCRIPTOR_LENGTH, CcidDescriptor, parse_ccid_descriptor
from ccidemu.ccid_host import (
    ABORT_REQUEST,
    DEFAULT_RESPONSE_TIMEOUT,
    Aborted,
    Answer,
    CcidHostDriver,
    DeviceError,
    DriverEvent,
    Failed,
    HardwareError,
    PoweredOn,
    SlotChanged,
    Status,
    TimedOut,
    TimeExtension,
    UnsupportedReader,
    check_reader,
    interrupt_event,
)
from ccidemu.errors import CardError, ConfigError, DecodeError

__all__ = [
    "POLL",
    "UsbCard",
    "UsbGone",
    "UsbReaderInfo",
    "UsbSelector",
    "UsbStall",
    "UsbTransport",
    "list_usb_readers",
    "open_transport",
    "open_usb_card",
    "parse_usb_spec",
]

log = logging.getLogger(__name__)

#: Seconds one blocking read may take before the driver's deadline and a cancel are checked.
POLL = 0.5
#: Seconds between looks for a reader that left (or was never there).
REPLUG_POLL = 1.0
#: Failed looks at a reader that is there before it counts as unusable (unplugged).
LOOK_RETRIES = 3
#: Seconds between GetSlotStatus polls on a reader without an interrupt endpoint.
STATUS_POLL = 0.5
#: Seconds the reader has to confirm an Abort before it is reset.
ABORT_TIMEOUT = 3.0
CCID_CLASS = 0x0B
_CLASS_DESCRIPTOR_TYPE = 0x21


class UsbGone(CardError):
    """The USB device is gone (unplugged, or reset under us)."""


class UsbStall(CardError):
    """The device stalled a pipe."""


# --------------------------------------------------------------------------- the spec


@dataclass(frozen=True, slots=True)
class UsbSelector:
    """Which device: ``usb:VID:PID[:SERIAL]`` (hex ids)."""

    vid: int
    pid: int
    serial: str | None = None

    def __str__(self) -> str:
        return f"{self.vid:04x}:{self.pid:04x}" + (f":{self.serial}" if self.serial else "")


def parse_usb_spec(argument: str) -> UsbSelector:
    """``VID:PID[:SERIAL]`` with hexadecimal ids, e.g. ``08e6:4433``; ConfigError if not."""
    parts = argument.split(":", 2)
    if len(parts) < 2 or not all(parts[:2]):
        raise ConfigError(f"usb:{argument}: give the reader as usb:VID:PID[:SERIAL] (hex ids, "
                          "e.g. usb:08e6:4433; 'ccidemu readers --usb' lists them)")
    try:
        vid, pid = int(parts[0], 16), int(parts[1], 16)
    except ValueError:
        raise ConfigError(f"usb:{argument}: VID and PID are hexadecimal, e.g. usb:08e6:4433"
                          ) from None
    if not (0 <= vid <= 0xFFFF and 0 <= pid <= 0xFFFF):
        raise ConfigError(f"usb:{argument}: VID and PID are 4 hex digits each")
    serial = parts[2] if len(parts) == 3 and parts[2] else None
    return UsbSelector(vid, pid, serial)


# --------------------------------------------------------------------------- transport


class UsbTransport(Protocol):
    """The pipes of one claimed CCID interface.  Reads raise TimeoutError when nothing came,
    :class:`UsbGone`, :class:`UsbStall`, or CardError; writes the same but TimeoutError."""

    name: str
    descriptor: CcidDescriptor
    packet_size: int  # wMaxPacketSize of bulk-IN
    has_interrupt: bool

    def write(self, data: bytes, timeout: float) -> None: ...

    def read(self, size: int, timeout: float) -> bytes: ...

    def read_interrupt(self, timeout: float) -> bytes: ...

    def abort_request(self, value: int) -> None:
        """The class request ABORT (CCID section 5.3.1) with ``wValue``."""
        ...

    def clear_halt(self) -> None: ...

    def reset(self) -> None:
        """A USB port reset (after an Abort that was not confirmed)."""
        ...

    def close(self) -> None: ...


def _usb() -> Any:
    try:
        import usb.core
        import usb.util
    except ImportError as exc:
        raise ConfigError(f"the usb: cards need pyusb (pip install 'ccidemu[usb]'): {exc}"
                          ) from None
    return usb


def _errno(exc: BaseException) -> int | None:
    value = getattr(exc, "errno", None)
    return value if isinstance(value, int) else None


def _is_timeout(exc: BaseException) -> bool:
    usb = _usb()
    return isinstance(exc, usb.core.USBTimeoutError) or _errno(exc) == errno.ETIMEDOUT


def _is_gone(exc: BaseException) -> bool:
    return _errno(exc) in (errno.ENODEV, errno.ENOENT, errno.ESHUTDOWN, errno.EIO)


def _class_descriptor(interface: Any) -> CcidDescriptor | None:
    """The CCID class descriptor after ``interface``'s descriptor or its last endpoint's."""
    blobs = [bytes(interface.extra_descriptors or b"")]
    endpoints = list(interface)
    if endpoints:
        blobs.append(bytes(endpoints[-1].extra_descriptors or b""))
    for blob in blobs:
        pos = 0
        while pos + 2 <= len(blob):
            length = blob[pos]
            if length < 2:
                break
            if blob[pos + 1] == _CLASS_DESCRIPTOR_TYPE and length == DESCRIPTOR_LENGTH:
                try:
                    return parse_ccid_descriptor(blob[pos:pos + length])
                except DecodeError:
                    return None
            pos += length
    return None


def _ccid_interfaces(device: Any) -> Iterator[tuple[Any, CcidDescriptor]]:
    for config in device:
        for interface in config:
            if interface.bInterfaceClass not in (CCID_CLASS, 0xFF):
                continue
            descriptor = _class_descriptor(interface)
            if descriptor is not None:
                yield interface, descriptor


def _permission_hint(selector: UsbSelector) -> str:
    return (
        "give your user access to it with a udev rule, e.g. in "
        "/etc/udev/rules.d/60-ccidemu.rules: SUBSYSTEM==\"usb\", "
        f"ATTR{{idVendor}}==\"{selector.vid:04x}\", ATTR{{idProduct}}==\"{selector.pid:04x}\", "
        "MODE=\"0660\", GROUP=\"plugdev\"; then 'udevadm control --reload; udevadm trigger', "
        "add yourself to the group (usermod -aG plugdev USER, and log in again), or run as root")


def _in_use_hint() -> str:
    return ("another program has it: pcscd with libccid takes every CCID reader (stop it: "
            "'systemctl stop pcscd.socket pcscd'), or use the reader through pcscd with "
            "--card pcsc:READER")


def _device_name(device: Any) -> str:
    return (f"{device.idVendor:04x}:{device.idProduct:04x} (bus {device.bus} device "
            f"{device.address})")


def _serial(device: Any) -> str | None:
    usb = _usb()
    try:
        value = device.serial_number
    except (usb.core.USBError, ValueError, NotImplementedError):
        return None
    return value if isinstance(value, str) else None


class _PyusbTransport:
    """A claimed CCID interface on pyusb (see :func:`open_transport`)."""

    def __init__(self, device: Any, interface: Any, descriptor: CcidDescriptor,
                 name: str) -> None:
        usb = _usb()
        self.device = device
        self.interface = interface.bInterfaceNumber
        self.descriptor = descriptor
        self.name = name
        self._released = False
        bulk_in = bulk_out = interrupt = None
        for endpoint in interface:
            kind = usb.util.endpoint_type(endpoint.bmAttributes)
            inward = usb.util.endpoint_direction(endpoint.bEndpointAddress) == \
                usb.util.ENDPOINT_IN
            if kind == usb.util.ENDPOINT_TYPE_BULK and inward:
                bulk_in = endpoint
            elif kind == usb.util.ENDPOINT_TYPE_BULK:
                bulk_out = endpoint
            elif kind == usb.util.ENDPOINT_TYPE_INTR and inward:
                interrupt = endpoint
        if bulk_in is None or bulk_out is None:
            raise UnsupportedReader(f"USB reader {name}: its CCID interface has no bulk-IN "
                                    "and bulk-OUT endpoints (CCID section 3.2)")
        self._in = bulk_in.bEndpointAddress
        self._out = bulk_out.bEndpointAddress
        self._interrupt = interrupt.bEndpointAddress if interrupt is not None else None
        self._interrupt_size = interrupt.wMaxPacketSize if interrupt is not None else 0
        self.packet_size = max(int(bulk_in.wMaxPacketSize), 8)
        self.has_interrupt = interrupt is not None

    def _call(self, what: str, call: Callable[[], Any]) -> Any:
        usb = _usb()
        try:
            return call()
        except usb.core.USBError as exc:
            if _is_timeout(exc):
                raise TimeoutError(what) from None
            if _errno(exc) == errno.EPIPE:
                raise UsbStall(f"USB reader {self.name}: {what}: the device stalled the pipe"
                               ) from None
            if _is_gone(exc):
                raise UsbGone(f"USB reader {self.name} is gone ({what}: {exc})") from None
            raise CardError(f"USB reader {self.name}: {what}: {exc}") from None

    def write(self, data: bytes, timeout: float) -> None:
        written = self._call("bulk-OUT", lambda: self.device.write(
            self._out, data, max(1, int(timeout * 1000))))
        if written != len(data):
            raise CardError(f"USB reader {self.name}: {written} of {len(data)} bytes written")

    def read(self, size: int, timeout: float) -> bytes:
        return bytes(self._call("bulk-IN", lambda: self.device.read(
            self._in, size, max(1, int(timeout * 1000)))))

    def read_interrupt(self, timeout: float) -> bytes:
        if self._interrupt is None:
            raise CardError("no interrupt endpoint")
        return bytes(self._call("interrupt-IN", lambda: self.device.read(
            self._interrupt, max(self._interrupt_size, 8), max(1, int(timeout * 1000)))))

    def abort_request(self, value: int) -> None:
        # bmRequestType 21: host to device, class, interface (CCID section 5.3.1)
        self._call("ABORT request", lambda: self.device.ctrl_transfer(
            0x21, ABORT_REQUEST, value, self.interface, None, 1000))

    def clear_halt(self) -> None:
        for endpoint in (self._in, self._out):
            with contextlib.suppress(CardError, TimeoutError):
                self._call("clear halt", partial(self.device.clear_halt, endpoint))

    def reset(self) -> None:
        with contextlib.suppress(CardError, TimeoutError):
            self._call("reset", self.device.reset)

    def close(self) -> None:
        if self._released:
            return
        self._released = True
        usb = _usb()
        with contextlib.suppress(usb.core.USBError, ValueError, NotImplementedError):
            usb.util.release_interface(self.device, self.interface)
        with contextlib.suppress(usb.core.USBError, ValueError, NotImplementedError):
            usb.util.dispose_resources(self.device)


def _find(selector: UsbSelector) -> list[Any]:
    usb = _usb()
    try:
        devices = list(usb.core.find(find_all=True, idVendor=selector.vid,
                                     idProduct=selector.pid))
    except usb.core.NoBackendError:
        raise ConfigError("pyusb finds no libusb (install libusb-1.0-0)") from None
    if selector.serial is not None:
        devices = [d for d in devices if _serial(d) == selector.serial]
    return devices


def open_transport(selector: UsbSelector) -> _PyusbTransport:
    """Open and claim the CCID interface of the reader ``selector`` names.

    Raises :class:`UsbGone` when no such device is plugged in, ConfigError with what to do
    for permission problems and a reader in use, UnsupportedReader for what the driver
    cannot use."""
    usb = _usb()
    devices = _find(selector)
    if not devices:
        raise UsbGone(f"no USB device {selector} is plugged in")
    device = devices[0]
    name = _device_name(device)
    found = list(_ccid_interfaces(device))
    if not found:
        raise UnsupportedReader(f"USB device {name} has no CCID interface (class 0x0B with a "
                                "CCID class descriptor, CCID section 4.2)")
    interface, descriptor = found[0]
    check_reader(descriptor)
    number = interface.bInterfaceNumber
    try:
        try:
            if device.is_kernel_driver_active(number):
                device.detach_kernel_driver(number)
                log.info("USB reader %s: kernel driver detached from interface %d", name, number)
        except NotImplementedError:
            pass
        try:
            device.get_active_configuration()
        except usb.core.USBError as exc:
            if _errno(exc) in (errno.EACCES, errno.EPERM, errno.EBUSY):
                raise
            device.set_configuration()
        usb.util.claim_interface(device, number)
    except usb.core.USBError as exc:
        with contextlib.suppress(usb.core.USBError, ValueError):
            usb.util.dispose_resources(device)
        code = _errno(exc)
        if code in (errno.EACCES, errno.EPERM):
            raise ConfigError(f"USB reader {name}: permission denied; "
                              f"{_permission_hint(selector)}") from None
        if code == errno.EBUSY:
            raise ConfigError(f"USB reader {name} is in use: {_in_use_hint()}") from None
        if _is_gone(exc):
            raise UsbGone(f"USB reader {name} is gone ({exc})") from None
        raise ConfigError(f"USB reader {name}: cannot claim interface {number}: {exc}"
                          ) from None
    return _PyusbTransport(device, interface, descriptor, name)


@dataclass(frozen=True, slots=True)
class UsbReaderInfo:
    """One CCID reader on the USB bus, for ``ccidemu readers --usb``."""

    spec: str
    name: str
    product: str | None
    level: str
    features: int
    protocols: str
    max_message_length: int
    problem: str | None  # why the driver cannot use it (None: it can)


def list_usb_readers() -> list[UsbReaderInfo]:
    """Every USB device with a CCID interface (no device is opened for I/O)."""
    usb = _usb()
    try:
        devices = list(usb.core.find(find_all=True))
    except usb.core.NoBackendError:
        raise ConfigError("pyusb finds no libusb (install libusb-1.0-0)") from None
    found = []
    for device in devices:
        try:
            interfaces = list(_ccid_interfaces(device))
        except (usb.core.USBError, ValueError):
            continue
        for _, descriptor in interfaces[:1]:
            problem = None
            level = ""
            try:
                level = check_reader(descriptor)
            except UnsupportedReader as exc:
                problem = str(exc)
            product = None
            with contextlib.suppress(usb.core.USBError, ValueError, NotImplementedError):
                product = device.product
            serial = _serial(device)
            spec = f"usb:{device.idVendor:04x}:{device.idProduct:04x}" + (
                f":{serial}" if serial else "")
            protocols = " ".join(f"T={p}" for p in (0, 1) if descriptor.protocols >> p & 1)
            found.append(UsbReaderInfo(spec, _device_name(device), product, level,
                                       int(descriptor.features), protocols,
                                       descriptor.max_message_length, problem))
    return found


# --------------------------------------------------------------------------- the card


Opener = Callable[[UsbSelector], UsbTransport]


class UsbCard:
    """A card in a USB CCID reader (see the module docstring)."""

    blocking: ClassVar[bool] = True

    def __init__(self, selector: UsbSelector, *, opener: Opener = open_transport,
                 response_timeout: float = DEFAULT_RESPONSE_TIMEOUT) -> None:
        self.selector = selector
        self._opener = opener
        self._response_timeout = response_timeout
        self._io = threading.Lock()  # one exchange on the pipes at a time
        self._state = threading.Lock()  # _transport, _driver, _gone
        self._transport: UsbTransport | None = None
        self._driver: CcidHostDriver | None = None
        self._epoch = 0  # counts the openings: a new one means the card was reset
        self._cancelled = 0.0  # monotonic time of the last cancel()
        self._notify: Callable[[ReaderEvent], None] | None = None
        self._watcher: threading.Thread | None = None
        self._stop = threading.Event()
        self.reader_name = str(selector)

    @property
    def name(self) -> str:
        return f"USB reader {self.reader_name}"

    # ---------------------------------------------------------------- opening

    def open(self) -> None:
        """Open the reader now (the daemon's start: errors show at once).  UsbGone when it is
        not plugged in; ConfigError / UnsupportedReader when it cannot be used."""
        with self._io:
            self._ensure_open()

    def _ensure_open(self) -> tuple[UsbTransport, CcidHostDriver]:
        with self._state:
            if self._transport is not None and self._driver is not None:
                return self._transport, self._driver
        transport = self._opener(self.selector)
        try:
            driver = CcidHostDriver(transport.descriptor,
                                    response_timeout=self._response_timeout)
        except UnsupportedReader:
            transport.close()
            raise
        with self._state:
            self._transport, self._driver = transport, driver
            self._epoch += 1
            self.reader_name = transport.name
        log.info("USB reader %s: %s level, dwFeatures %08X, max message %d", transport.name,
                 driver.level, int(transport.descriptor.features), driver.max_message)
        return transport, driver

    def _drop(self, reset: bool = False) -> None:
        """Close the transport (the next call opens it again)."""
        with self._state:
            transport, self._transport, self._driver = self._transport, None, None
        if transport is not None:
            if reset:
                transport.reset()
            transport.close()

    # ---------------------------------------------------------------- Card

    def power_on(self) -> bytes:
        event = self._run(lambda d, now: d.power_on(now), "power on", reopen=True)
        if isinstance(event, PoweredOn):
            driver = self._driver
            log.info("USB reader %s: card powered, ATR %s, T=%d (%s)", self.reader_name,
                     event.atr.hex().upper(), event.protocol,
                     driver.exchange if driver is not None else "?")
            return event.atr
        raise self._failure(event, "power on")

    def power_off(self) -> None:
        with contextlib.suppress(UsbGone):  # gone: off anyway
            self._run(lambda d, now: d.power_off(now), "power off")

    def transmit(self, apdu: bytes) -> bytes:
        event = self._run(lambda d, now: d.transmit(apdu, now), "transmit")
        if isinstance(event, Answer):
            return event.response
        raise self._failure(event, "transmit")

    def cancel(self) -> None:
        """The card host gave up on the call in progress: it ends soon with CardError (and so
        does a call that waits for it)."""
        self._cancelled = time.monotonic()

    def close(self) -> None:
        self.unwatch()
        with self._io:
            self._drop()

    def _failure(self, event: DriverEvent, what: str) -> CardError:
        if isinstance(event, Failed):
            if event.unsupported:
                return UnsupportedReader(f"USB reader {self.reader_name}: {event.reason}")
            return CardError(f"USB reader {self.reader_name}: {event.reason}")
        return CardError(f"USB reader {self.reader_name}: {what} answered {event}")

    # ---------------------------------------------------------------- one operation

    def _run(self, start: Callable[[CcidHostDriver, float], None], what: str, *,
             reopen: bool = False) -> DriverEvent:
        """One operation.  Only power-on opens a reader that was closed (unplugged, or reset
        after a fault): the card was reset with it, and the watch thread reports it removed
        and inserted again, so that the guest sees it too."""
        asked = time.monotonic()
        with self._io:
            if not reopen and not self._opened():
                raise CardError(f"USB reader {self.reader_name}: the reader was reset or "
                                "unplugged; the card comes back when it is there again")
            try:
                transport, driver = self._ensure_open()
            except ConfigError as exc:
                raise CardError(str(exc)) from None
            try:
                return self._exchange(transport, driver, start, what, asked)
            except UsbGone:
                self._drop()
                raise
            except UsbStall as exc:
                log.warning("USB reader %s: %s; resynchronising", self.reader_name, exc)
                transport.clear_halt()
                self._resync(transport, driver)
                raise
            except DeviceError as exc:
                log.warning("USB reader %s: the reader broke the CCID protocol during %s: %s; "
                            "resynchronising", self.reader_name, what, exc)
                self._resync(transport, driver)
                raise CardError(f"USB reader {self.reader_name}: the reader broke the CCID "
                                f"protocol: {exc}") from None

    def _exchange(self, transport: UsbTransport, driver: CcidHostDriver,
                  start: Callable[[CcidHostDriver, float], None], what: str,
                  asked: float | None = None) -> DriverEvent:
        """Run one driver operation to its end (under _io).  ``asked``: when the caller
        asked for it; a cancel() since then abandons it."""
        start(driver, time.monotonic())
        self._flush(transport, driver)
        while True:
            while (event := driver.next_event()) is not None:
                if isinstance(event, TimeExtension):
                    log.debug("USB reader %s: the card asks for more time (x%d)",
                              self.reader_name, event.multiplier)
                    continue
                if isinstance(event, SlotChanged | HardwareError | TimedOut | Aborted):
                    continue
                return event
            now = time.monotonic()
            if asked is not None and self._cancelled >= asked:
                self._resync(transport, driver)
                raise CardError(f"USB reader {self.reader_name}: {what} abandoned (the card "
                                "did not answer in time)")
            if driver.check_timeout(now):
                log.warning("USB reader %s: no answer to %s within %.0f s; aborting",
                            self.reader_name, what, self._response_timeout)
                self._resync(transport, driver)
                raise CardError(f"USB reader {self.reader_name}: no answer to {what} (aborted)")
            deadline = driver.deadline if driver.deadline is not None else now + POLL
            size = transport.packet_size
            try:
                data = transport.read(size, max(0.01, min(POLL, deadline - now)))
            except TimeoutError:
                continue
            driver.receive_bulk(data, time.monotonic(), transfer_end=len(data) < size)
            self._flush(transport, driver)

    @staticmethod
    def _flush(transport: UsbTransport, driver: CcidHostDriver) -> None:
        while (frame := driver.data_to_send()) is not None:
            try:
                transport.write(frame, 5.0)
            except TimeoutError:
                raise CardError(f"USB reader {transport.name}: bulk-OUT timed out") from None

    def _resync(self, transport: UsbTransport, driver: CcidHostDriver) -> None:
        """Abort what the reader is doing (CCID section 5.3.1); reset it if it does not
        confirm.  Never raises."""
        try:
            value = driver.abort(time.monotonic())
            with contextlib.suppress(TimeoutError, UsbStall):
                transport.abort_request(value)
            self._flush(transport, driver)
            deadline = time.monotonic() + ABORT_TIMEOUT
            while time.monotonic() < deadline:
                event = driver.next_event()
                if isinstance(event, Aborted):
                    log.info("USB reader %s: abort confirmed", self.reader_name)
                    return
                if event is not None:
                    continue
                try:
                    data = transport.read(transport.packet_size, POLL)
                except TimeoutError:
                    continue
                driver.receive_bulk(data, time.monotonic(),
                                    transfer_end=len(data) < transport.packet_size)
        except UsbGone:
            self._drop()
            return
        except (CardError, DeviceError) as exc:
            log.warning("USB reader %s: abort failed: %s", self.reader_name, exc)
        log.warning("USB reader %s: the reader did not confirm the abort; resetting it",
                    self.reader_name)
        driver.give_up()
        self._drop(reset=True)

    # ---------------------------------------------------------------- ReaderEvents

    def watch(self, notify: Callable[[ReaderEvent], None]) -> None:
        if self._watcher is not None and self._watcher.is_alive() and not self._stop.is_set():
            self._notify = notify
            return
        self._notify = notify
        self._stop = stop = threading.Event()  # this watch's own: an old thread sees its own
        self._watcher = threading.Thread(target=self._watch, args=(stop,), daemon=True,
                                         name=f"ccidemu-usb-{self.selector}")
        self._watcher.start()

    def unwatch(self) -> None:
        """Stop reporting at once (the card host calls it in its loop: it never waits for the
        thread, which ends within :data:`POLL`, or when a call it waits for ends)."""
        self._stop.set()
        self._watcher = None
        self._notify = None

    def _say(self, event: ReaderEvent, stop: threading.Event) -> None:
        notify = self._notify
        if notify is not None and not stop.is_set():
            notify(event)

    def _watch(self, stop: threading.Event) -> None:
        """The watch thread: the presence now, then its changes (module docstring).  When the
        reader was closed and opened again (unplugged, or reset after a fault) while a card was
        in it, the card was reset: it is reported removed, then inserted."""
        present: bool | None = None  # as last reported
        plugged: bool | None = None
        problem: str | None = None  # the last reason the reader could not be opened
        epoch = -1  # the opening the last report was about
        failures = 0  # looks in a row that failed on a reader that is there
        while not stop.is_set():
            if present is None or not self._opened() or self._epoch != epoch:
                try:
                    state = self._look()
                except (CardError, ConfigError) as exc:
                    state = None
                    if str(exc) != problem and not isinstance(exc, UsbGone):
                        problem = str(exc)
                        log.warning("USB reader %s: %s", self.selector, exc)
                    failures += 1
                    if isinstance(exc, CardError) and failures < LOOK_RETRIES:
                        stop.wait(REPLUG_POLL)  # a hiccup: look again first
                        continue
                failures = 0
                if state is None:  # not there, or not usable
                    if plugged is not False:
                        plugged, present = False, None
                        self._say(ReaderUnplugged(f"USB reader {self.selector} is not "
                                                  "plugged in or not usable"), stop)
                    stop.wait(REPLUG_POLL)
                    continue
                if present and epoch != self._epoch:
                    log.info("USB reader %s: opened again; the card was reset",
                             self.reader_name)
                    self._say(CardRemoved(), stop)
                plugged, present, problem, epoch = True, state, None, self._epoch
                self._say(CardInserted() if state else CardRemoved(), stop)
                continue
            try:
                change = self._next_change(stop)
            except UsbGone:
                with self._io:
                    self._drop()
                continue
            except CardError as exc:
                log.warning("USB reader %s: %s", self.reader_name, exc)
                stop.wait(STATUS_POLL)
                continue
            if change is None:
                continue
            now_present, changed = change
            if now_present == present and not (changed and now_present):
                continue
            log.info("USB reader %s: card %s", self.reader_name,
                     "inserted" if now_present else "removed")
            if now_present and present:  # taken out and put back between two looks
                self._say(CardRemoved(), stop)
            present = now_present
            self._say(CardInserted() if now_present else CardRemoved(), stop)

    def _opened(self) -> bool:
        with self._state:
            return self._transport is not None

    def _look(self) -> bool | None:
        """Open the reader if needed: whether a card is in it; None when it is not there.
        Raises ConfigError / CardError when it is there but cannot be used."""
        with self._io:
            try:
                self._ensure_open()
                return self._status()
            except UsbGone:
                self._drop()
                return None
            except CardError:
                self._drop()
                raise

    def _status(self) -> bool:
        """GetSlotStatus (under _io): a card is in the slot."""
        assert self._transport is not None and self._driver is not None
        transport, driver = self._transport, self._driver
        try:
            event = self._exchange(transport, driver, lambda d, now: d.slot_status(now),
                                   "slot status")
        except DeviceError as exc:
            self._resync(transport, driver)
            raise CardError(f"the reader broke the CCID protocol: {exc}") from None
        if isinstance(event, Status):
            return event.present
        if isinstance(event, Failed) and event.absent:
            return False
        raise self._failure(event, "slot status")

    def _next_change(self, stop: threading.Event) -> tuple[bool, bool] | None:
        """Wait a little for a presence change: (present, changed), None for nothing new."""
        with self._state:
            transport = self._transport
        if transport is None:
            return None
        if transport.has_interrupt:
            try:
                data = transport.read_interrupt(POLL)
            except TimeoutError:
                return None
            try:
                event = interrupt_event(data)
            except DeviceError as exc:
                log.warning("USB reader %s: %s", self.reader_name, exc)
                return None
            if isinstance(event, HardwareError):
                log.error("USB reader %s: hardware error %02X", self.reader_name, event.code)
                return None
            return (event.present, event.changed) if isinstance(event, SlotChanged) else None
        stop.wait(STATUS_POLL)
        if not self._io.acquire(blocking=False):  # an APDU is on its way: look later
            return None
        try:
            if self._transport is None:
                return None
            return self._status(), False
        finally:
            self._io.release()


def open_usb_card(argument: str, options: CardOptions) -> UsbCard:
    """The ``usb:`` factory: the reader is opened now when it is plugged in (errors show at
    start: permissions, in use, unsupported), else the card waits for it."""
    selector = parse_usb_spec(argument)
    _usb()
    card = UsbCard(selector)
    try:
        card.open()
    except UsbGone as exc:
        log.warning("%s; waiting for it", exc)
    except UnsupportedReader as exc:
        raise ConfigError(f"usb:{argument}: {exc}") from None
    return card
