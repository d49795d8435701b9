"""``--card pcsc:READER`` against a real pcscd with vpcd (vmc.lab.pcscd): the emulated cards
behind the vpcd bridge are the "physical" cards, ``ccidemu serve`` passes them through, and the
fake QEMU (vmc.fakeqemu) plays the guest.  Reader choice, the allow-list, shared and exclusive
access, T=0 answers (61xx, 6Cxx) passed through untouched, insert/remove, pcscd restarts, PC/SC
errors as failed transmits naming the error, ``pcsc:*`` over one multi-reader peer and over
several endpoints, ``ccidemu readers``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from ccidemu.card import BuiltinTestCard
from ccidemu.cards import CardOptions, open_card
from ccidemu.errors import CardError
from vmc.fakeqemu import FakeQemu
from vmc.lab.guest import ChardevMode
from vmc.lab.pcscd import READER, PcscdHarness
from vmc.lab.serve import DaemonError, ServeProcess

pytestmark = pytest.mark.pcscd

H = bytes.fromhex
SECOND = "Virtual PCD 00 01"
ECHO = H("80E0000003010203")


@pytest.fixture
def work() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ccidemu-pcsc-"))  # unix socket paths stay short
    yield path
    if not os.environ.get("CCIDEMU_KEEP_E2E"):
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def served(pcscd: PcscdHarness, work: Path, *cards: str, extra: Sequence[str] = (),
           endpoints: int = 1, multi_reader: bool = False, trace: Path | None = None,
           ) -> Iterator[tuple[ServeProcess, list[FakeQemu]]]:
    """``ccidemu serve --listen`` (one VM per endpoint) with pcscd's environment, and a fake
    QEMU connected to each endpoint."""
    sockets = [work / f"vm{i}.sock" for i in range(endpoints)]
    daemon = ServeProcess(work / "serve", sockets[0], ChardevMode.QEMU_CLIENT, cards,
                          extra_args=extra, env=pcscd.env, more_sockets=sockets[1:],
                          trace=trace)
    daemon.start()
    fakes: list[FakeQemu] = []
    try:
        for path in sockets:
            fakes.append(FakeQemu.connect(f"unix:{path}", multi_reader=multi_reader))
        yield daemon, fakes
    finally:
        for fake in fakes:
            fake.close()
        daemon.stop()


class _Bridge:
    """A second ``ccidemu vpcd`` bridge (the harness runs one) on vpcd port ``port``."""

    def __init__(self, pcscd: PcscdHarness, card: str, port: int, work: Path,
                 reader: str | None) -> None:
        self.pcscd, self.reader = pcscd, reader
        log = (work / f"bridge-{port}.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vmc", "-v", "vpcd", "--card", card, "--vpcd",
             f"tcp:127.0.0.1:{port}"], stdout=log, stderr=log, start_new_session=True)
        if reader is not None:
            _wait_reader(pcscd, reader, present=True)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        # pcscd notices at its next poll; a bridge started before meets a stale reader
        if self.reader is not None and self.pcscd.proc is not None:
            _wait_reader(self.pcscd, self.reader, present=False)


def _wait_reader(pcscd: PcscdHarness, reader: str, present: bool) -> None:
    _wait(lambda: (pcscd.run("opensc-tool", "-r", reader, "-a", check=False,
                             timeout=10).returncode == 0) == present,
          f"{reader} {'with' if present else 'without'} a card")


def _bridge(pcscd: PcscdHarness, card: str, port: int, work: Path,
            reader: str | None = SECOND) -> _Bridge:
    return _Bridge(pcscd, card, port, work, reader)


def _stop(bridge: _Bridge) -> None:
    bridge.stop()


def _wait(predicate: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _reference(spec: str, apdus: Sequence[bytes]) -> list[bytes]:
    """The answers of a fresh in-process card to ``apdus``."""
    card = open_card(spec, CardOptions(read_only=True))
    card.power_on()
    return [card.transmit(apdu) for apdu in apdus]


# --------------------------------------------------------------------------- readers


def _readers(pcscd: PcscdHarness, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmc", "readers", *args], env=pcscd.env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_ccidemu_readers_lists_state_and_atr(pcscd: PcscdHarness) -> None:
    pcscd.start_bridge("test:")
    result = _readers(pcscd, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [
        {"index": 0, "name": READER, "spec": f"pcsc:{READER}", "state": ["PRESENT"],
         "present": True, "atr": BuiltinTestCard.ATR.hex().upper()},
        {"index": 1, "name": SECOND, "spec": f"pcsc:{SECOND}", "state": ["EMPTY"],
         "present": False, "atr": None},
    ]
    text = _readers(pcscd).stdout
    assert f"0: {READER}\n    present, ATR {BuiltinTestCard.ATR.hex().upper()}\n" in text
    assert f"1: {SECOND}\n    empty\n" in text
    pcscd.stop_pcscd()
    result = _readers(pcscd)
    assert result.returncode == 1 and "is pcscd running?" in result.stderr
    assert "SCARD_E_NO_SERVICE" in result.stderr


# --------------------------------------------------------------------------- one reader


def test_the_test_card_passes_through(pcscd: PcscdHarness, work: Path) -> None:
    pcscd.start_bridge("test:")
    apdus = [ECHO, H("80E2000010"), H("00A4040008F0636369646D7501"), H("80FF0000"),
             H("80E2000034"), H("80E4000004")]
    with served(pcscd, work, f"pcsc:{READER}") as (daemon, (fake,)):
        assert fake.wait_card(timeout=30) == BuiltinTestCard.ATR
        answers = [fake.transmit(apdu, timeout=30) for apdu in apdus[:5]]
        # the 54-byte answer goes in parts (issue 16: QEMU's usb-ccid would lose it); the
        # card never sees the GET RESPONSE: its APDU counter says 6 below, as the reference's
        answers[4] += fake.transmit(H("00C0000001"), timeout=30)
        answers.append(fake.transmit(apdus[5], timeout=30))
        assert "connected (shared, T=0)" in daemon.log()  # the test card offers T=0 only
    reference = _reference("test:", apdus)
    assert reference[4] == bytes(range(52)) + H("9000")
    reference[4] = bytes(range(51)) + H("6101") + H("33") + H("9000")
    assert answers == reference


def test_piv_through_pcsc_uses_t1_and_answers_as_the_card(pcscd: PcscdHarness,
                                                         work: Path) -> None:
    pcscd.start_bridge("piv:")
    apdus = [H("00A4040009A0000003080000100000"), H("00CB3FFF055C035FC10200"),
             H("00CB3FFF055C035FC10500"), H("00C0000000"), H("00C0000000"), H("00C0000000")]
    with served(pcscd, work, f"pcsc:{READER}") as (daemon, (fake,)):
        assert fake.wait_card(timeout=30) == open_card("piv:").power_on()
        answers = [fake.transmit(apdu, timeout=30) for apdu in apdus]
        assert "connected (shared, T=1)" in daemon.log()  # vpcd offers the card's T=1
    assert answers == _reference("piv:", apdus)
    assert answers[2][-2:] == H("6100")  # the card's own 61xx chaining, passed on


def test_t0_61xx_and_6cxx_pass_through_untouched(pcscd: PcscdHarness, work: Path) -> None:
    """The CAC card speaks T=0 (its ATR offers nothing else): SELECT is answered 61xx and the
    guest's GET RESPONSE fetches it; GET PROPERTIES with the wrong Le gets 6Cxx and the guest
    sends it again with the right one.  The daemon changes none of it."""
    pcscd.start_bridge("cac:")
    apdus = [H("00A4040007A0000000790100"), H("00C000000D"), H("80560100FF"),
             H("8056010020"), H("80560100"), H("00C0000020")]
    with served(pcscd, work, f"pcsc:{READER}") as (daemon, (fake,)):
        fake.wait_card(timeout=30)
        answers = [fake.transmit(apdu, timeout=30) for apdu in apdus]
        assert "connected (shared, T=0)" in daemon.log()
    assert answers == _reference("cac:", apdus)
    assert [a[-2:] for a in answers] == [H("610D"), H("9000"), H("6C20"), H("9000"),
                                         H("6120"), H("9000")]


@pytest.mark.parametrize(("spec", "allow", "bound"), [
    ("pcsc:1", (), SECOND),
    ("pcsc:PCD 00 0[1]", (), SECOND),
    ("pcsc:0", ("01$",), SECOND),  # the index counts the allowed readers only
    (f"pcsc:{SECOND}", ("PCD",), SECOND),
])
def test_reader_by_index_regex_and_allow_list(pcscd: PcscdHarness, work: Path, spec: str,
                                             allow: tuple[str, ...], bound: str) -> None:
    bridge = _bridge(pcscd, "test:", pcscd.port + 1, work)
    try:
        extra = [a for pattern in allow for a in ("--pcsc-allow", pattern)]
        with served(pcscd, work, spec, extra=extra) as (daemon, (fake,)):
            assert fake.wait_card(timeout=30) == BuiltinTestCard.ATR
            assert fake.transmit(ECHO, timeout=30) == H("010203 9000")
            listing = daemon.ctl_json("list")
            assert listing[0]["readers"][0]["card"] == f"PC/SC reader {bound!r}"
    finally:
        _stop(bridge)


def test_a_reader_outside_the_allow_list_is_refused_at_start(pcscd: PcscdHarness,
                                                             work: Path) -> None:
    daemon = ServeProcess(work / "serve", work / "vm.sock", ChardevMode.QEMU_CLIENT,
                          [f"pcsc:{READER}"], extra_args=["--pcsc-allow", "01$"],
                          env=pcscd.env)
    with pytest.raises(DaemonError, match="not in this VM's allow-list"):
        daemon.start()


def test_an_empty_reader_at_start_is_empty_not_a_failed_card(pcscd: PcscdHarness,
                                                              work: Path) -> None:
    with served(pcscd, work, f"pcsc:{READER}") as (daemon, (fake,)):
        _wait(lambda: "handshake done" in daemon.log(), "the handshake")
        _wait(lambda: fake.core.reader_name(0) == "ccidemu reader 0", "the reader")
        assert not fake.card_present()
        pcscd.start_bridge("test:")
        assert fake.wait_card(timeout=30) == BuiltinTestCard.ATR
        assert fake.transmit(ECHO, timeout=30) == H("010203 9000")
        assert "power-on failed" not in daemon.log()


def test_remove_insert_and_a_pcscd_restart(pcscd: PcscdHarness, work: Path) -> None:
    pcscd.start_bridge("test:")
    with served(pcscd, work, f"pcsc:{READER}") as (daemon, (fake,)):
        fake.wait_card(timeout=30)
        assert fake.transmit(ECHO, timeout=30) == H("010203 9000")
        pcscd.stop_bridge()
        fake.wait_removed(timeout=30)
        pcscd.start_bridge("test:")
        assert fake.wait_card(timeout=30) == BuiltinTestCard.ATR
        assert fake.transmit(ECHO, timeout=30) == H("010203 9000")
        pcscd.restart_pcscd()  # the bridge reconnects to the new vpcd by itself
        fake.wait_removed(timeout=30)
        assert fake.wait_card(timeout=30) == BuiltinTestCard.ATR
        assert fake.transmit(ECHO, timeout=30) == H("010203 9000")
        log = daemon.log()
        assert "reader unplugged (pcscd stopped" in log and daemon.running()


class RogueCard:
    """A vpcd card side that hangs up when it receives ``quit`` (a card yanked mid-APDU)."""

    def __init__(self, port: int, quit: bytes) -> None:
        self.quit = quit
        self.port = port
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.is_set():
            try:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=1)
            except OSError:
                time.sleep(0.1)
                continue
            with sock:
                self._serve(sock)

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(0.5)
        buffer = b""
        while not self.stopped.is_set():
            try:
                data = sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            buffer += data
            while len(buffer) >= 2 and len(buffer) >= 2 + struct.unpack(">H", buffer[:2])[0]:
                size = struct.unpack(">H", buffer[:2])[0]
                payload, buffer = buffer[2:2 + size], buffer[2 + size:]
                if size == 1:  # vpcd's control bytes: 04 asks for the ATR
                    if payload == b"\x04":
                        sock.sendall(struct.pack(">H", len(BuiltinTestCard.ATR))
                                     + BuiltinTestCard.ATR)
                    continue
                if payload == self.quit:
                    self.stopped.set()
                    return  # hang up with the answer owed
                sock.sendall(struct.pack(">H", 2) + H("9000"))

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(10)


_RESET_BY_ANOTHER_PROGRAM = """
from smartcard import scard
rc, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
rc, handle, protocol = scard.SCardConnect(context, {reader!r}, scard.SCARD_SHARE_SHARED,
                                          scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1)
assert rc == 0, hex(rc)
assert scard.SCardDisconnect(handle, scard.SCARD_RESET_CARD) == 0
"""


def test_pcsc_errors_become_failed_transmits_naming_the_error(pcscd: PcscdHarness,
                                                              work: Path) -> None:
    """Another program resets the shared card: our next SCardTransmit gets
    SCARD_W_RESET_CARD from pcscd; the guest sees that one APDU fail, the log names the error,
    and the next APDU works (the handle is reconnected)."""
    pcscd.start_bridge("test:")
    with served(pcscd, work, f"pcsc:{READER}") as (daemon, (fake,)):
        fake.wait_card(timeout=30)
        assert fake.transmit(ECHO, timeout=30) == H("010203 9000")
        subprocess.run([sys.executable, "-c", _RESET_BY_ANOTHER_PROGRAM.format(reader=READER)],
                       env=pcscd.env, check=True, timeout=60)
        with pytest.raises(CardError, match="XfrBlock failed"):
            fake.transmit(ECHO, timeout=30)
        _wait(lambda: "card failed to answer: card error: PC/SC SCARD_W_RESET_CARD "
                      "(0x80100068) in SCardTransmit (reader 'Virtual PCD 00 00'): Card was "
                      "reset." in daemon.log(), "the log line naming the PC/SC error")
        assert fake.transmit(ECHO, timeout=30) == H("010203 9000")


def test_a_card_that_hangs_up_mid_apdu_is_a_failed_transmit(pcscd: PcscdHarness,
                                                            work: Path) -> None:
    """A card side that goes away with an answer owed: vpcd gives pcscd an empty answer; the
    guest sees a failed transmit, then the card leave; the daemon goes on."""
    rogue = RogueCard(pcscd.port, H("80AA0000"))
    try:
        with served(pcscd, work, f"pcsc:{READER}") as (daemon, (fake,)):
            fake.wait_card(timeout=30)
            assert fake.transmit(H("00A4040000"), timeout=30) == H("9000")
            with pytest.raises(CardError, match="XfrBlock failed"):
                fake.transmit(H("80AA0000"), timeout=30)
            _wait(lambda: "the card answered 0 bytes (no SW1 SW2)" in daemon.log(),
                  "the log line")
            fake.wait_removed(timeout=30)
            assert daemon.running() and daemon.ctl_json("list")[0]["connected"]
    finally:
        rogue.close()


def test_exclusive_access_keeps_other_programs_out(pcscd: PcscdHarness, work: Path) -> None:
    pcscd.start_bridge("test:")
    for extra, others_get_in in (((), True), (("--pcsc-exclusive",), False)):
        with served(pcscd, work, f"pcsc:{READER}", extra=extra) as (daemon, (fake,)):
            fake.wait_card(timeout=30)
            assert fake.transmit(ECHO, timeout=30) == H("010203 9000")
            other = pcscd.run("opensc-tool", "-r", READER, "-s", "80E4000004", check=False)
            assert (other.returncode == 0) == others_get_in, other.stdout + other.stderr
            if not others_get_in:
                assert "exclusive" in daemon.log()
            assert fake.transmit(ECHO, timeout=30) == H("010203 9000")


# --------------------------------------------------------------------------- pcsc:*


def test_every_reader_on_one_multi_reader_peer(pcscd: PcscdHarness, work: Path) -> None:
    """``pcsc:*`` on one VM: each host reader is one virtual reader (a SPICE-like peer, the
    fake QEMU's multi_reader mode, takes them all).  The daemon starts before pcscd: the
    readers appear later, and are added; pcscd stopping unplugs them, and they come back."""
    pcscd.stop_pcscd()
    with served(pcscd, work, "pcsc:*", multi_reader=True) as (daemon, (fake,)):
        assert fake.core.readers == [] and daemon.running()
        pcscd.start_pcscd()
        pcscd.start_bridge("test:")
        second = _bridge(pcscd, "piv:", pcscd.port + 1, work)
        try:
            assert fake.wait_readers(2, timeout=30) == [0, 1]
            assert fake.wait_card(0, timeout=30) == BuiltinTestCard.ATR
            assert fake.wait_card(1, timeout=30) == open_card("piv:").power_on()
            assert fake.core.reader_name(0) == "ccidemu reader 0"
            assert fake.transmit(ECHO, 0, timeout=30) == H("010203 9000")
            assert fake.transmit(H("00A4040009A0000003080000100000"), 1, timeout=30)[-2:] == \
                H("9000")
            specs = [r["spec"] for r in daemon.ctl_json("list")[0]["readers"]]
            assert specs == [f"pcsc:{READER}", f"pcsc:{SECOND}"]
            pcscd.stop_pcscd()  # both readers go: the multi-reader peer sees ReaderRemove
            _wait(lambda: fake.core.readers == [], "the readers to go")
            pcscd.start_pcscd()  # and come back, as the same virtual readers
            _wait(lambda: len(fake.core.readers) == 2, "the readers to come back")
            # back in the order their cards say so: find the test card's by its ATR
            _wait(lambda: BuiltinTestCard.ATR in [fake.core.atr(i) for i in fake.core.readers],
                  "the test card again")
            test = next(i for i in fake.core.readers if fake.core.atr(i) == BuiltinTestCard.ATR)
            assert fake.transmit(ECHO, test, timeout=30) == H("010203 9000")
            assert len(daemon.ctl_json("list")[0]["readers"]) == 2
        finally:
            _stop(second)


def test_every_reader_one_per_endpoint(pcscd: PcscdHarness, work: Path) -> None:
    """``pcsc:*`` on two QEMU endpoints (one reader each): the first reader goes to vm1, the
    second to vm2; an allow-list keeps a VM from a reader."""
    pcscd.start_bridge("test:")
    second = _bridge(pcscd, "cac:", pcscd.port + 1, work)
    try:
        with served(pcscd, work, "pcsc:*", endpoints=2) as (daemon, (vm1, vm2)):
            assert vm1.wait_card(timeout=30) == BuiltinTestCard.ATR
            assert vm2.wait_card(timeout=30) == open_card("cac:").power_on()
            assert vm1.transmit(ECHO, timeout=30) == H("010203 9000")
            assert vm2.transmit(H("00A4040007A0000000790100"), timeout=30) == H("610D")
            listing = {vm["vm"]: [r["spec"] for r in vm["readers"]]
                       for vm in daemon.ctl_json("list")}
            assert listing == {"vm1": [f"pcsc:{READER}"], "vm2": [f"pcsc:{SECOND}"]}
        with served(pcscd, work, "pcsc:*", endpoints=2,
                    extra=("--pcsc-allow", "00 01$")) as (daemon, (vm1, vm2)):
            assert vm1.wait_card(timeout=30) == open_card("cac:").power_on()
            listing = {vm["vm"]: [r["spec"] for r in vm["readers"]]
                       for vm in daemon.ctl_json("list")}
            assert listing == {"vm1": [f"pcsc:{SECOND}"], "vm2": []}
    finally:
        _stop(second)
