"""vmc.vpcd: the socket adapter against a scripted fake vpcd (no pcscd needed)."""

from __future__ import annotations

import itertools
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ccidemu.card import BuiltinTestCard
from ccidemu.errors import ConfigError
from tests.vpcd_peer import ScriptedVpcd
from vmc.addr import TcpAddress, UnixAddress
from vmc.vpcd import VpcdBridge


class FakeVpcd(ScriptedVpcd):
    """vpcd's side as Debian 12's vpcd writes it (length and payload apart), 10 s timeouts."""

    def __init__(self) -> None:
        super().__init__(10, split_writes=True)


class _ExplodingCard(BuiltinTestCard):
    def transmit(self, apdu: bytes) -> bytes:
        if apdu[:2] == b"\x80\xee":
            raise RuntimeError("card bug")
        return super().transmit(apdu)


@pytest.fixture
def fake() -> Iterator[FakeVpcd]:
    vpcd = FakeVpcd()
    yield vpcd
    vpcd.close()


def _start(bridge: VpcdBridge) -> threading.Thread:
    thread = threading.Thread(target=bridge.run, daemon=True)
    thread.start()
    return thread


def _stop(bridge: VpcdBridge, thread: threading.Thread) -> None:
    bridge.stop()
    thread.join(10)
    bridge.close()
    assert not thread.is_alive()


def test_protocol_reconnect_and_card_errors(fake: FakeVpcd) -> None:
    card = _ExplodingCard()
    bridge = VpcdBridge(card, TcpAddress("127.0.0.1", fake.port), backoff_initial=0.02)
    thread = _start(bridge)
    try:
        fake.accept()
        assert bridge.wait_connected(5)
        assert bridge.sock is not None
        assert bridge.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        fake.send(b"\x04")
        assert fake.recv_frame() == BuiltinTestCard.ATR
        fake.send(b"\x01")  # power on: no answer
        fake.send(b"\x80\xe0\x00\x00\x01\x5a")
        assert fake.recv_frame() == b"\x5a\x90\x00"
        fake.send(b"\x80\xee\x00\x00")  # the card raises: 6F00, the bridge lives on
        assert fake.recv_frame() == b"\x6f\x00"
        fake.send(b"\x80\xe4\x00\x00\x04")
        assert fake.recv_frame() == b"\x00\x00\x00\x02\x90\x00"  # E0, E4 (EE raised)
        # vpcd goes away (pcscd restart): the bridge reconnects with the same card
        assert fake.conn is not None
        fake.conn.close()
        fake.accept()
        fake.send(b"\x80\xe4\x00\x00\x04")
        assert fake.recv_frame() == b"\x00\x00\x00\x03\x90\x00"
        assert bridge.connections == 2
        # a broken frame (length 0) drops the connection; the bridge comes back again
        assert fake.conn is not None
        fake.conn.sendall(b"\x00\x00")
        fake.accept()
        fake.send(b"\x04")
        assert fake.recv_frame() == BuiltinTestCard.ATR
        assert bridge.connections == 3
    finally:
        _stop(bridge, thread)


def test_stop_while_vpcd_unreachable() -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]  # closed again: nobody listens there
    bridge = VpcdBridge(BuiltinTestCard(), TcpAddress("127.0.0.1", port), backoff_initial=0.05)
    thread = _start(bridge)
    assert not bridge.wait_connected(0.3)
    _stop(bridge, thread)


def test_vpcd_that_hangs_up_at_once_is_retried_with_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A vpcd that accepts and closes before asking anything is retried with the capped
    backoff (0.1, 0.2, 0.4, 0.8 s ... by default), not every 0.1 s, and warned about once."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    port = listener.getsockname()[1]
    closing = threading.Event()
    accepted: list[float] = []

    def hang_up() -> None:
        while not closing.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            accepted.append(time.monotonic())
            conn.close()

    acceptor = threading.Thread(target=hang_up, daemon=True)
    acceptor.start()
    caplog.set_level(logging.WARNING, logger="vmc.vpcd")
    bridge = VpcdBridge(BuiltinTestCard(), TcpAddress("127.0.0.1", port))
    thread = _start(bridge)
    try:
        deadline = time.monotonic() + 30
        while len(accepted) < 5:
            assert time.monotonic() < deadline, accepted
            time.sleep(0.01)
        assert bridge.requests == 0
    finally:
        _stop(bridge, thread)
        closing.set()
        acceptor.join(5)
        listener.close()
    # the gaps double from 0.1 s (lower bounds: a loaded machine only makes them longer;
    # retrying every 0.1 s would fail from the second gap on)
    gaps = [b - a for a, b in itertools.pairwise(accepted[:5])]
    for gap, least in zip(gaps, (0.1, 0.2, 0.4, 0.8), strict=True):
        assert gap >= least * 0.9, gaps
    warnings = [r for r in caplog.records if r.name == "vmc.vpcd"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]


def test_unix_address_refused() -> None:
    with pytest.raises(ConfigError):
        VpcdBridge(BuiltinTestCard(), UnixAddress("/tmp/x"))  # type: ignore[arg-type]


def test_cli_sigterm_exits_cleanly(fake: FakeVpcd) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmc", "vpcd", "--card", "test:",
         "--vpcd", f"tcp:127.0.0.1:{fake.port}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        fake.accept()
        fake.send(b"\x04")
        assert fake.recv_frame() == BuiltinTestCard.ATR
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, out
    assert "SIGTERM" in out


def test_cli_help() -> None:
    out = subprocess.run([sys.executable, "-m", "vmc", "vpcd", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for option in ("--card", "--vpcd", "--state-dir", "--read-only", "Virtual PCD 00 00"):
        assert option in out


def test_quickack_rearmed_before_every_receive(fake: FakeVpcd,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The 40 ms trap is fixed by TCP_QUICKACK (Linux clears it again), not by TCP_NODELAY
    alone (docs/PERFORMANCE.md, vpcd bridge): it must be re-armed before each recv."""
    events: list[str] = []
    quickack = (socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)

    class Recording:
        """The bridge's socket, with its recv calls recorded in order with the options set
        on it (the setsockopt that really reaches the kernel, not a helper's name)."""

        def __init__(self, sock: socket.socket) -> None:
            self._sock = sock

        def recv(self, size: int) -> bytes:
            events.append("recv")
            return self._sock.recv(size)

        def setsockopt(self, level: int, option: int, value: int) -> None:
            events.append("quickack" if (level, option, value) == quickack else "other option")
            self._sock.setsockopt(level, option, value)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._sock, name)

    real_connect = VpcdBridge._connect
    monkeypatch.setattr(VpcdBridge, "_connect", lambda self: Recording(real_connect(self)))
    bridge = VpcdBridge(BuiltinTestCard(), TcpAddress("127.0.0.1", fake.port))
    thread = _start(bridge)
    try:
        fake.accept()
        assert bridge.wait_connected(5)
        for i in range(20):
            fake.send(bytes([0x80, 0xE0, 0, 0, 1, i]))
            assert fake.recv_frame() == bytes([i, 0x90, 0x00])
        receives = [n for n, e in enumerate(events) if e == "recv"]
        assert len(receives) >= 20
        assert all(n > 0 and events[n - 1] == "quickack" for n in receives), events
    finally:
        _stop(bridge, thread)
