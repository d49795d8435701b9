"""Serve one card over SPICE without the daemon: VscSession + a card on a SpiceTransport.

Test and bench harness only (the daemon's runtime will own this job): it plays what
``ccidemu serve --spice`` will do, so that the transport is proven against real QEMU before the
daemon integration.  Reconnect policy (the one proposed for the daemon): a session that ends
with a *fatal* :class:`~ccidemu.spice.SpiceError` (wrong password, refused channel, no
smartcard channel, not SPICE, TLS refused) stops the host and is kept in :attr:`fatal`; any
other end (QEMU gone, server closed, bad bytes, timeout) is retried after a backoff (0.1 s
doubling to 2 s, reset after a session that reached the smartcard channel).

Run by hand: ``python -m tests.e2e.spice_harness 127.0.0.1:5930 [--card piv:]``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ccidemu.card import Card
from ccidemu.cards import open_card
from ccidemu.spice import SpiceError
from vmc.lab.guest import QEMU, SpiceOptions
from vmc.session import ApduDone, Closed, PowerOff, PowerOn, Transmit, VscSession
from vmc.sockets import Backoff
from vmc.spice import SpiceTarget, SpiceTransport

log = logging.getLogger(__name__)


class _Handler:
    """One transport's VSCard session; the card is called inline (emulated cards are pure)."""

    def __init__(self, host: SpiceCardHost) -> None:
        self.host = host
        self.transport: SpiceTransport | None = None
        self.session: VscSession | None = None

    def connection_made(self, transport: SpiceTransport) -> None:
        self.transport = transport
        session = VscSession([self.host.reader_name], byteorder="little", peer_init=False,
                             label=f"spice session {self.host.connections + 1}")
        self.session = session
        session.start(time.monotonic())
        self._run()
        with self.host.lock:
            self.host.connections += 1
            self.host.current = transport
        self.host.changed.set()

    def data_received(self, data: bytes) -> None:
        if self.session is not None:
            self.session.receive_data(data, time.monotonic())
            self._run()

    def connection_lost(self, error: SpiceError | None) -> None:
        if self.session is not None:
            self.session.connection_lost(str(error) if error else "closed")
        with self.host.lock:
            self.host.errors.append(error)
            if self.host.current is self.transport:
                self.host.current = None
        self.host.changed.set()

    def _run(self) -> None:
        session, transport, card = self.session, self.transport, self.host.card
        assert session is not None and transport is not None
        now = time.monotonic()
        while (action := session.next_action()) is not None:
            if isinstance(action, PowerOn):
                session.power_on_done(action.token, card.power_on(), now)
            elif isinstance(action, Transmit):
                try:
                    response = card.transmit(action.apdu)
                except Exception as exc:
                    session.transmit_failed(action.token, repr(exc), now)
                else:
                    session.transmit_done(action.token, response, now)
            elif isinstance(action, PowerOff):
                card.power_off()
            elif isinstance(action, ApduDone):
                self.host.apdus += 1
                if self.host.on_apdu is not None:
                    self.host.on_apdu(action)
            elif isinstance(action, Closed):
                transport.abort()
        out = session.data_to_send()
        if out:
            transport.write(out)


class SpiceCardHost:
    """Keeps one card attached to a VM's SPICE smartcard channel, reconnecting as needed."""

    def __init__(
        self,
        target: SpiceTarget,
        card: Card,
        *,
        reader_name: str = "ccidemu",
        idle_timeout: float | None = 120.0,
        on_apdu: Callable[[ApduDone], None] | None = None,
    ) -> None:
        self.target = target
        self.card = card
        self.reader_name = reader_name
        self.idle_timeout = idle_timeout
        self.on_apdu = on_apdu
        self.lock = threading.Lock()
        self.changed = threading.Event()
        self.connections = 0  # sessions that reached the smartcard channel
        self.attempts = 0
        self.apdus = 0
        self.errors: list[SpiceError | None] = []
        self.fatal: SpiceError | None = None
        self.current: SpiceTransport | None = None
        self._transport: SpiceTransport | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> SpiceCardHost:
        self._thread = threading.Thread(target=self._supervise, name="spice-host", daemon=True)
        self._thread.start()
        return self

    def stop(self, *, abort: bool = False, timeout: float = 15) -> None:
        """Stop reconnecting and end the current session (politely unless ``abort``)."""
        self._stopping.set()
        transport = self._transport
        if transport is not None:
            transport.abort() if abort else transport.close()
        if self._thread is not None:
            self._thread.join(timeout)

    def wait(self, predicate: Callable[[SpiceCardHost], bool], timeout: float = 30,
             what: str = "condition") -> None:
        """Block until ``predicate(self)`` holds; AssertionError with the state after timeout."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"SPICE host: {what} not reached in {timeout} s (connections "
                    f"{self.connections}, attempts {self.attempts}, errors {self.errors[-3:]}, "
                    f"fatal {self.fatal})")
            self.changed.wait(0.2)
            self.changed.clear()

    def _supervise(self) -> None:
        backoff = Backoff()
        while not self._stopping.is_set():
            handler = _Handler(self)
            transport = SpiceTransport(self.target, handler, idle_timeout=self.idle_timeout,
                                       name=f"spice[{self.target}]")
            self._transport = transport
            self.attempts += 1
            transport.start()
            transport.wait_closed()
            reached = handler.session is not None
            error = transport.error
            if error is not None and error.fatal:
                self.fatal = error
                self.changed.set()
                return
            if reached:
                backoff.reset()
            self._stopping.wait(backoff.next())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listened on a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes] | None = None,
                   timeout: float = 30) -> None:
    """Poll until 127.0.0.1:``port`` accepts TCP connections (or ``proc`` exits)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"QEMU exited ({proc.returncode}) before listening on {port}")
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")
        time.sleep(0.1)


def bare_qemu_command(workdir: Path, spice: SpiceOptions, smartcards: int = 1) -> list[str]:
    """QEMU with -spice and ``smartcards`` spicevmc smartcard chardevs, booting nothing."""
    cmd = [QEMU, "-machine", "q35", "-accel", "tcg", "-display", "none", "-nodefaults",
           "-monitor", "none", "-serial", "none", "-device", "qemu-xhci,id=xhci"]
    for i in range(smartcards):
        cmd += ["-device", f"usb-ccid,bus=xhci.0,id=ccid{i}",
                "-chardev", f"spicevmc,id=sc{i},name=smartcard",
                "-device", f"ccid-card-passthru,chardev=sc{i},bus=ccid{i}.0"]
    return cmd + spice.qemu_args(workdir)


@contextlib.contextmanager
def bare_qemu(workdir: Path, spice: SpiceOptions, smartcards: int = 1,
              extra: Sequence[str] = ()) -> Iterator[subprocess.Popen[bytes]]:
    """Run :func:`bare_qemu_command` until the block ends; wait for its SPICE port first."""
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "qemu.log"
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen([*bare_qemu_command(workdir, spice, smartcards), *extra],
                                stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                                start_new_session=True)
    try:
        port = spice.port if spice.port is not None else spice.tls_port
        assert port is not None
        wait_listening(port, proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def main(argv: list[str] | None = None) -> int:
    from vmc.spice import parse_spice_address

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("address", help="HOST:PORT of the SPICE server")
    parser.add_argument("--card", default="piv:")
    parser.add_argument("--password", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    host, port = parse_spice_address(args.address)
    card_host = SpiceCardHost(SpiceTarget(host, port, password=args.password),
                              open_card(args.card)).start()
    try:
        while card_host.fatal is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    card_host.stop()
    return 1 if card_host.fatal else 0


if __name__ == "__main__":
    raise SystemExit(main())
