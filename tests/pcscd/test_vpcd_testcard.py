"""The vpcd bridge with the built-in test card against a real pcscd + vpcd and real clients."""

from __future__ import annotations

import re
import socket
import threading
import time

import pytest

from ccidemu.card import BuiltinTestCard
from tests.support import TEST_ATR_TEXT, opensc_responses
from vmc.addr import TcpAddress
from vmc.lab.pcscd import READER, PcscdHarness
from vmc.vpcd import VpcdBridge

pytestmark = pytest.mark.pcscd

H = bytes.fromhex

def _apdu_count(pcscd: PcscdHarness) -> int:
    out = pcscd.run("opensc-tool", "-r", READER, "-s", "80E4000004").stdout
    (response,) = opensc_responses(out)
    assert len(response) == 6 and response[-2:] == H("9000"), out
    return int.from_bytes(response[:-2], "big")


def test_atr_through_pcscd(pcscd: PcscdHarness) -> None:
    pcscd.start_bridge("test:")
    out = pcscd.run("opensc-tool", "-r", READER, "-a").stdout
    assert out.strip() == TEST_ATR_TEXT
    listing = pcscd.run("opensc-tool", "-l").stdout
    assert re.search(r"Yes\s+Virtual PCD 00 00", listing), listing
    assert re.search(r"No\s+Virtual PCD 00 01", listing), listing


def test_apdus_through_pcscd(pcscd: PcscdHarness) -> None:
    pcscd.start_bridge("test:")
    out = pcscd.run(
        "opensc-tool", "-r", READER,
        "-s", "80E0000003616263",          # echo "abc"
        "-s", "80E2000010",                 # 16 counting bytes
        "-s", "00A4040008F0636369646D7501",  # SELECT the test AID
        "-s", "00A4040003A00000",           # SELECT unknown AID
        "-s", "80FF0000",                   # unknown INS
    ).stdout
    assert opensc_responses(out) == [
        H("616263 9000"),
        bytes(range(16)) + H("9000"),
        H("9000"),
        H("6A82"),
        H("6D00"),
    ], out
    # pcscd --apdu logs what crossed the reader
    assert "APDU: 80 E0 00 00 03 61 62 63" in pcscd.pcscd_log()


def test_200_apdus_with_scriptor(pcscd: PcscdHarness) -> None:
    pcscd.start_bridge("test:")
    # opensc-tool probes card drivers on connect: learn how many APDUs one count costs
    first = _apdu_count(pcscd)
    before = _apdu_count(pcscd)
    per_count = before - first
    script = "".join(f"80 E0 00 00 02 {i >> 8:02X} {i & 0xFF:02X}\n" for i in range(200))
    started = time.monotonic()
    out = pcscd.run("scriptor", "-r", READER, input=script).stdout
    elapsed = time.monotonic() - started
    answers = re.findall(r"^< ((?:[0-9A-F]{2} )*[0-9A-F]{2})", out, re.M)
    assert answers == [f"{i >> 8:02X} {i & 0xFF:02X} 90 00" for i in range(200)], out[-2000:]
    # every APDU reached the card exactly once
    assert _apdu_count(pcscd) == before + 200 + per_count
    print(f"\n200 APDUs through scriptor + pcscd + vpcd: {elapsed * 1000:.0f} ms")


def test_bridge_socket_has_nodelay(pcscd: PcscdHarness) -> None:
    """The 40 ms trap: the bridge's socket to vpcd must have TCP_NODELAY set."""
    card = BuiltinTestCard("in-process")
    bridge = VpcdBridge(card, TcpAddress("127.0.0.1", pcscd.port))
    thread = threading.Thread(target=bridge.run, daemon=True)
    thread.start()
    try:
        assert bridge.wait_connected(10)
        sock = bridge.sock
        assert sock is not None
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        pcscd.wait_card(present=True)
        out = pcscd.run("opensc-tool", "-r", READER, "-s", "80E0000001AA").stdout
        assert opensc_responses(out) == [H("AA 9000")]
        assert card.apdu_count >= 1
    finally:
        bridge.stop()
        thread.join(10)
        bridge.close()
    assert not thread.is_alive()
    pcscd.wait_card(present=False)


def test_bridge_restart(pcscd: PcscdHarness) -> None:
    pcscd.start_bridge("test:")
    assert opensc_responses(
        pcscd.run("opensc-tool", "-r", READER, "-s", "80E0000001AB").stdout
    ) == [H("AB 9000")]
    assert pcscd.stop_bridge() == 0  # SIGTERM: clean exit
    pcscd.wait_card(present=False)
    pcscd.start_bridge("test:")
    assert opensc_responses(
        pcscd.run("opensc-tool", "-r", READER, "-s", "80E0000001AC").stdout
    ) == [H("AC 9000")]


def test_pcscd_restart_reconnects_and_keeps_card(pcscd: PcscdHarness) -> None:
    bridge = pcscd.start_bridge("test:")
    first = _apdu_count(pcscd)
    pcscd.stop_pcscd()
    deadline = time.monotonic() + 30
    while "not reachable" not in bridge.log():  # the bridge found vpcd gone ...
        assert time.monotonic() < deadline, bridge.log()
        time.sleep(0.05)
    time.sleep(1.0)  # ... and retried a few times meanwhile (more only strengthens the test)
    pcscd.start_pcscd()
    pcscd.wait_card(present=True)
    # same process, same card object: its APDU counter went on
    assert bridge.proc.poll() is None
    assert _apdu_count(pcscd) > first
    log = bridge.log()
    assert log.count("connection lost") == 1, log
    assert log.count("not reachable") == 1, log
    assert log.count("connected to vpcd") == 2, log


def test_power_off_on_and_reset(pcscd: PcscdHarness) -> None:
    bridge = pcscd.start_bridge("test:")
    pcscd.run("opensc-tool", "-r", READER, "--reset=cold")
    pcscd.run("opensc-tool", "-r", READER, "--reset=warm")
    assert opensc_responses(
        pcscd.run("opensc-tool", "-r", READER, "-s", "80E0000001AD").stdout
    ) == [H("AD 9000")]
    log = bridge.log()
    # -vv logs each vpcd event the card saw
    assert "vpcd PowerOff" in log, log
    assert "vpcd PowerOn" in log, log
    assert "vpcd Reset" in log, log
