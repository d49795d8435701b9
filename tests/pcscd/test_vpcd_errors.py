"""Error paths of the vpcd bridge (vmc.vpcd, issue 17): cards that fail, vpcd that resets.

Against the real pcscd + vpcd (vmc.lab.pcscd) where vpcd's own behaviour matters: a card that
does not power on (answering GET ATR with an empty frame stalled vpcd's reader; the bridge
now closes the connection, which vpcd reads as "no card"), cards that raise on transmit and
power-off.  Against a scripted vpcd on a real TCP socket for what vpcd never does on its own:
a connection reset while idle and while an answer is being sent.  The bridge runs in process
with cards that raise or block until released; nothing waits on a clock.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ccidemu.card import BuiltinTestCard
from ccidemu.vpcd import GetAtr, NoCard, Reset, Transmit, VpcdCardSlot, encode_frame
from tests.support import logged, no_traceback, opensc_responses, wait_for
from tests.vpcd_peer import ScriptedVpcd
from vmc.addr import TcpAddress
from vmc.lab.pcscd import READER, PcscdHarness
from vmc.vpcd import VpcdBridge

H = bytes.fromhex
COUNT = H("80e4000004")
TCP_CLOSE = 7  # linux/tcp_states.h, tcpi_state of struct tcp_info


def here(function: str) -> str:
    return rf"\(at {re.escape(Path(__file__).name)}:\d+ in {function}\)"


class Running:
    """A VpcdBridge in a thread; stopped at the end."""

    def __init__(self, card: BuiltinTestCard, port: int) -> None:
        self.bridge = VpcdBridge(card, TcpAddress("127.0.0.1", port), backoff_initial=0.02)
        self.thread = threading.Thread(target=self.bridge.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.bridge.stop()
        self.thread.join(30)
        self.bridge.close()
        assert not self.thread.is_alive()


@pytest.fixture
def bridges() -> Iterator[list[Running]]:
    running: list[Running] = []
    yield running
    for r in running:
        r.stop()


@pytest.fixture
def pcscd_bridges(pcscd: PcscdHarness) -> Iterator[tuple[PcscdHarness, list[Running]]]:
    """Bridges to the real vpcd; at the end pcscd has seen them go (vpcd notices only at its
    next presence poll, and the next test's bridge must not meet the stale reader)."""
    running: list[Running] = []
    yield pcscd, running
    for r in running:
        r.stop()
    pcscd.wait_card(present=False, timeout=30)


# ----------------------------------------------------------------------------- real pcscd


class NoPowerCard(BuiltinTestCard):
    """Does not power on until ``working`` is set."""

    def __init__(self) -> None:
        super().__init__("no power")
        self.working = threading.Event()
        self.attempts = 0

    def power_on(self) -> bytes:
        self.attempts += 1
        if not self.working.is_set():
            raise RuntimeError("no power")
        return super().power_on()


@pytest.mark.pcscd
def test_a_card_that_does_not_power_on_is_an_empty_reader_until_it_does(
    pcscd_bridges: tuple[PcscdHarness, list[Running]], caplog: pytest.LogCaptureFixture
) -> None:
    pcscd, bridges = pcscd_bridges
    caplog.set_level(logging.INFO)
    card = NoPowerCard()
    bridges.append(Running(card, pcscd.port))
    wait_for(lambda: card.attempts >= 3, "the bridge to try again at reconnections")
    # pcscd answers at once that there is no card (it used to hang on an empty ATR)
    empty = pcscd.run("opensc-tool", "-r", READER, "-a", check=False, timeout=30)
    assert empty.returncode != 0, empty.stdout
    assert "Card not present" in empty.stderr + empty.stdout, empty.stderr
    card.working.set()
    pcscd.wait_card(present=True, timeout=30)
    out = pcscd.run("opensc-tool", "-r", READER, "-s", "80E0000001AB").stdout
    assert opensc_responses(out) == [H("AB 9000")]
    assert logged(caplog, logging.ERROR, r"card built-in test card \(no power\) did not power "
                  r"on: RuntimeError: no power " + here("power_on") + r"; pcscd sees no card "
                  r"in the reader; trying again at each reconnection \(every 2\.0 s at most\)"
                  ) and len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
    no_traceback(caplog)


class RaisingCard(BuiltinTestCard):
    """INS EE raises; power-off raises."""

    def transmit(self, apdu: bytes) -> bytes:
        if apdu[1:2] == b"\xee":
            raise RuntimeError("transmit bug")
        return super().transmit(apdu)

    def power_off(self) -> None:
        raise RuntimeError("power-off bug")


@pytest.mark.pcscd
def test_card_errors_reach_clients_as_6f00_and_the_bridge_goes_on(
    pcscd_bridges: tuple[PcscdHarness, list[Running]], caplog: pytest.LogCaptureFixture
) -> None:
    pcscd, bridges = pcscd_bridges
    caplog.set_level(logging.INFO)
    card = RaisingCard("raising")
    running = Running(card, pcscd.port)
    bridges.append(running)
    pcscd.wait_card(present=True, timeout=30)
    out = pcscd.run("opensc-tool", "-r", READER, "-s", "80EE0000", "-s", "80E0000001AB").stdout
    assert opensc_responses(out) == [H("6F00"), H("AB 9000")]
    pcscd.run("opensc-tool", "-r", READER, "--reset=cold")  # vpcd powers the card off
    power_off = (r"card built-in test card \(raising\) failed on PowerOff: RuntimeError: "
                 r"power-off bug " + here("power_off") + r" \(vpcd expects no answer; the "
                 r"bridge goes on\)")
    wait_for(lambda: logged(caplog, logging.ERROR, power_off), "the power-off error")
    out = pcscd.run("opensc-tool", "-r", READER, "-s", "80E0000001AC").stdout
    assert opensc_responses(out) == [H("AC 9000")]
    assert logged(caplog, logging.ERROR, r"card built-in test card \(raising\) failed on APDU "
                  r"80EE0000: RuntimeError: transmit bug " + here("transmit")
                  + r" \(answered 6F00; the bridge goes on\)")
    assert running.bridge.connections == 1  # never dropped
    no_traceback(caplog)


# ----------------------------------------------------------------------------- scripted vpcd


@pytest.fixture
def vpcd() -> Iterator[ScriptedVpcd]:
    fake = ScriptedVpcd()
    yield fake
    fake.close()


def test_a_reset_from_vpcd_is_a_reconnect_with_the_card_kept(
    vpcd: ScriptedVpcd, bridges: list[Running], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    running = Running(BuiltinTestCard(), vpcd.port)
    bridges.append(running)
    vpcd.accept()
    assert vpcd.ask(b"\x04") == BuiltinTestCard.ATR
    assert vpcd.ask(COUNT) == H("00000001 9000")
    vpcd.reset()
    vpcd.accept()
    assert vpcd.ask(COUNT) == H("00000002 9000")  # the same card
    assert running.bridge.connections == 2
    assert logged(caplog, logging.WARNING, r"vpcd connection lost \(receive failed: Connection "
                  r"reset by peer\); reconnecting")
    no_traceback(caplog)


class GateCard(BuiltinTestCard):
    """INS EE blocks (``entered`` set) until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def transmit(self, apdu: bytes) -> bytes:
        if apdu[1:2] == b"\xee":
            self.entered.set()
            assert self.release.wait(30), "the test never released the card"
        return super().transmit(apdu)


def test_an_answer_that_cannot_be_sent_is_a_reconnect(
    vpcd: ScriptedVpcd, bridges: list[Running], caplog: pytest.LogCaptureFixture
) -> None:
    """vpcd resets while the card works on an APDU: the bridge's send of the answer fails
    (the reset is seen by the bridge's socket before the card is released)."""
    caplog.set_level(logging.INFO)
    card = GateCard()
    running = Running(card, vpcd.port)
    bridges.append(running)
    vpcd.accept()
    assert vpcd.ask(b"\x04") == BuiltinTestCard.ATR
    vpcd.send(H("80ee0000"))
    assert card.entered.wait(30)
    vpcd.reset()

    def reset_seen() -> bool:
        sock = running.bridge.sock
        return sock is not None and sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO,
                                                    1)[0] == TCP_CLOSE

    wait_for(reset_seen, "the bridge's socket to see the reset")
    card.release.set()
    vpcd.accept()
    assert vpcd.ask(COUNT) == H("00000002 9000")  # EE reached the card, then this one
    assert logged(caplog, logging.WARNING, r"vpcd connection lost \(send failed: (Broken pipe|"
                  r"Connection reset by peer)\); reconnecting")
    no_traceback(caplog)


def test_the_slot_raises_no_card_only_when_it_has_no_atr_to_give() -> None:
    """The sans-I/O side: a card that never powered on has no ATR, so GET ATR raises NoCard
    (the adapter closes the connection); once it has given an ATR, a failed reset is logged
    and GET ATR goes on answering the ATR it has."""
    card = NoPowerCard()
    slot = VpcdCardSlot(card)
    with pytest.raises(NoCard, match=r"card built-in test card \(no power\) did not power on: "
                       r"RuntimeError: no power " + here("power_on")):
        slot.handle(GetAtr())
    assert slot.atr is None
    card.working.set()
    assert slot.handle(GetAtr()) == encode_frame(BuiltinTestCard.ATR)
    card.working.clear()
    assert slot.handle(Reset()) == b""  # no answer due; logged
    assert slot.handle(GetAtr()) == encode_frame(BuiltinTestCard.ATR)
    assert slot.handle(Transmit(COUNT)) == encode_frame(H("6f00"))  # cannot power on for it
