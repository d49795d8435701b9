"""The ``ccidemu serve`` daemon (vmc.daemon) driven by the fake QEMU (vmc.fakeqemu).

The daemon runs in-process on its own event loop thread (:class:`RunningDaemon`), except for
the signal test, which runs the real console script.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest

from ccidemu.card import BuiltinTestCard
from ccidemu.cards import CardOptions, register
from ccidemu.errors import CardError, ConfigError
from ccidemu.trace import read_trace
from ccidemu.vsc import VscApdu, VscAtr, VscCardRemove, VscReaderRemove, encode_vsc
from tests.vmc.daemon_harness import RunningDaemon, echo, free_port, serve
from vmc.addr import Address, TcpAddress, UnixAddress
from vmc.control import ControlError, control_request
from vmc.fakeqemu import FakeQemu
from vmc.lab.guest import ChardevMode
from vmc.lab.serve import ServeProcess

H = bytes.fromhex
TEST_ATR = BuiltinTestCard.ATR


class FlakyCard(BuiltinTestCard):
    """``flaky:`` test card: INS EE raises CardError, INS EF raises RuntimeError."""

    def transmit(self, apdu: bytes) -> bytes:
        if apdu[1:2] == b"\xee":
            raise CardError("the card fell out")
        if apdu[1:2] == b"\xef":
            raise RuntimeError("bug in a card")
        return super().transmit(apdu)


class BlockingCard(BuiltinTestCard):
    """``slow:``: a card that says it blocks (runs in the thread pool) and sleeps a little."""

    blocking: ClassVar[bool] = True

    def transmit(self, apdu: bytes) -> bytes:
        time.sleep(0.01)
        return super().transmit(apdu)


def open_flaky(argument: str, options: CardOptions) -> FlakyCard:
    return FlakyCard(argument)


def open_slow(argument: str, options: CardOptions) -> BlockingCard:
    return BlockingCard(argument)


_FRAGILE_OPENS = [0]


def open_fragile(argument: str, options: CardOptions) -> BuiltinTestCard:
    """``fragile:``: opens once (the daemon's start-up probe), then fails to open."""
    _FRAGILE_OPENS[0] += 1
    if _FRAGILE_OPENS[0] > 1:
        raise ConfigError("the card file went away")
    return BuiltinTestCard(argument)


register("fragile", f"{__name__}:open_fragile")
register("flaky", f"{__name__}:open_flaky")
register("slow", f"{__name__}:open_slow")


# --------------------------------------------------------------------------- --listen


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_listen_mode_serves_a_card(
    kind: str, tmp: Path, daemons: list[RunningDaemon]
) -> None:
    addr: Address = (
        UnixAddress(tmp / "vm.sock") if kind == "unix" else TcpAddress("127.0.0.1", free_port())
    )
    d = serve(listen=[addr])
    daemons.append(d)
    if isinstance(addr, UnixAddress):
        assert stat.S_IMODE(addr.path.stat().st_mode) == 0o600
    with FakeQemu.connect(addr) as fake:
        assert fake.wait_card() == TEST_ATR
        echo(fake, b"hello")
        assert fake.transmit(H("00a4040008") + BuiltinTestCard.AID) == H("9000")
    d.stop()
    if isinstance(addr, UnixAddress):
        assert not addr.path.exists()  # removed at exit


def test_stale_socket_file_is_replaced_and_regular_file_refused(tmp: Path) -> None:
    path = tmp / "vm.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # a socket file nobody listens on
    d = serve(listen=[UnixAddress(path)])
    try:
        with FakeQemu.connect(UnixAddress(path)) as fake:
            fake.wait_card()
    finally:
        d.stop()
    path.write_text("not a socket")
    with pytest.raises(ConfigError, match="not a socket"):
        serve(listen=[UnixAddress(path)])


def test_a_vm_keeps_its_card_across_connections(
    tmp: Path, daemons: list[RunningDaemon]
) -> None:
    """Card state belongs to the VM, not to the connection: the test card's APDU counter
    goes on counting when the VM reconnects (a real card's retry counter would too)."""
    addr = UnixAddress(tmp / "vm.sock")
    daemons.append(serve(listen=[addr]))
    count = H("80e4000004")
    with FakeQemu.connect(addr) as fake:
        fake.wait_card()
        fake.transmit(count)
        assert fake.transmit(count) == H("00000002 9000")
    with FakeQemu.connect(addr, timeout=10) as fake:
        fake.wait_card()
        assert fake.transmit(count) == H("00000003 9000")


def test_a_connection_on_standby_takes_over_when_the_first_ends(
    tmp: Path, daemons: list[RunningDaemon]
) -> None:
    addr = UnixAddress(tmp / "vm.sock")
    d = serve(listen=[addr])
    daemons.append(d)
    first = FakeQemu.connect(addr)
    first.wait_card()
    with FakeQemu.connect(addr) as second:
        deadline = time.monotonic() + 30
        while d.request({"cmd": "list"})[0]["standby"] != 1:
            assert time.monotonic() < deadline, "the second connection never reached standby"
            time.sleep(0.01)
        first.close()
        assert second.wait_card(timeout=30)
        echo(second, b"mine now")


def test_several_vms_routed_correctly(tmp: Path, daemons: list[RunningDaemon]) -> None:
    addrs = [UnixAddress(tmp / f"vm{i}.sock") for i in range(5)]
    daemons.append(serve(listen=addrs))
    fakes = [FakeQemu.connect(x) for x in addrs]
    try:
        for f in fakes:
            f.wait_card()
        errors: list[BaseException] = []

        def worker(n: int, fake: FakeQemu) -> None:
            try:
                for i in range(30):
                    echo(fake, bytes([n, i]) * 5)
                # each VM its own card: its counter saw exactly its own 30 echoes
                assert fake.transmit(H("80e4000004")) == (31).to_bytes(4, "big") + H("9000")
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n, f)) for n, f in enumerate(fakes)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
    finally:
        for f in fakes:
            f.close()


def test_a_second_concurrent_connection_to_a_vm_is_refused(
    tmp: Path, daemons: list[RunningDaemon]
) -> None:
    """One connection per VM: a second one waits on standby (in case the first is on its
    way out), never gets a second copy of the card, and is closed when the first stays."""
    addr = UnixAddress(tmp / "vm.sock")
    d = serve(listen=[addr])
    daemons.append(d)
    with FakeQemu.connect(addr) as first:
        first.wait_card()
        with FakeQemu.connect(addr) as second:
            second.wait_closed(timeout=30)
            assert not any(isinstance(m, VscAtr) for m in second.received)
        echo(first, b"still mine")
        (vm,) = d.request({"cmd": "list"})
        assert vm["connected"] and vm["sessions_total"] == 1


def test_multi_reader_host_gets_one_reader_per_card(
    tmp: Path, daemons: list[RunningDaemon]
) -> None:
    addr = UnixAddress(tmp / "vm.sock")
    daemons.append(serve(listen=[addr], cards=["test:one", "test:two"]))
    with FakeQemu.connect(addr, multi_reader=True) as fake:
        assert fake.wait_readers(2) == [0, 1]
        fake.wait_card(0)
        fake.wait_card(1)
        fake.transmit(H("80e4000004"), 1)
        assert fake.transmit(H("80e4000004"), 1) == H("00000002 9000")
        assert fake.transmit(H("80e4000004"), 0) == H("00000001 9000")  # its own card


def test_qemu_single_reader_refuses_second_first_still_works(
    tmp: Path, daemons: list[RunningDaemon]
) -> None:
    addr = UnixAddress(tmp / "vm.sock")
    ctl = UnixAddress(tmp / "ctl.sock")
    daemons.append(serve(listen=[addr], cards=["test:one", "test:two"], control=ctl))
    with FakeQemu.connect(addr) as fake:
        fake.wait_card()
        echo(fake, b"x")
        (session,) = control_request(ctl, {"cmd": "list"})
        first, second = session["readers"]
        assert first["card"] == "built-in test card (one)", first
        assert first["state"] == "added" and first["present"] and first["apdus"] == 1, first
        assert second["state"] == "refused" and second["reader_id"] is None, second
        assert not second["inserted"] and second["apdus"] == 0, second


# --------------------------------------------------------------------------- --connect


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_connect_retries_until_qemu_appears_and_after_restart(
    kind: str, tmp: Path, daemons: list[RunningDaemon]
) -> None:
    addr: Address = (
        UnixAddress(tmp / "qemu.sock") if kind == "unix" else TcpAddress("127.0.0.1", free_port())
    )
    daemons.append(serve(connect=[addr]))
    time.sleep(0.5)  # the daemon is retrying by now
    count = H("80e4000004")
    with FakeQemu.listen(addr) as listener:
        fake = listener.accept(timeout=5)
        assert fake.wait_card() == TEST_ATR
        fake.transmit(count)
        fake.close()
    # QEMU restarts: a new server on the same address, the daemon reconnects by itself
    with FakeQemu.listen(addr) as listener:
        fake = listener.accept(timeout=5)
        with fake:
            assert fake.wait_card() == TEST_ATR
            # the same VM: the same card instance, its state kept (2nd APDU it ever saw)
            assert fake.transmit(count) == H("00000002 9000")


# --------------------------------------------------------------------------- cards failing


def test_card_errors_answer_general_error_and_keep_serving(
    tmp: Path, daemons: list[RunningDaemon]
) -> None:
    addr = UnixAddress(tmp / "vm.sock")
    d = serve(listen=[addr], cards=["flaky:"])
    daemons.append(d)
    with FakeQemu.connect(addr) as fake:
        fake.wait_card()
        with pytest.raises(CardError):
            fake.transmit(H("80ee0000"))
        with pytest.raises(CardError):
            fake.transmit(H("80ef0000"))
        echo(fake, b"still here")
        # each failure counted once, while the session lives ...
        assert d.request({"cmd": "stats"})["errors"] == 2
    deadline = time.monotonic() + 5
    while d.request({"cmd": "stats"})["sessions"] and (
        time.monotonic() < deadline
    ):
        time.sleep(0.02)
    # ... and still once after it ended
    stats = d.request({"cmd": "stats"})
    assert stats["sessions"] == 0
    assert stats["errors"] == 2


def test_a_card_that_fails_to_open_is_one_clear_error_at_start(tmp: Path) -> None:
    _FRAGILE_OPENS[0] = 1  # the next open fails
    with pytest.raises(ConfigError, match="vm vm1: the card file went away"):
        serve(listen=[UnixAddress(tmp / "vm.sock")], cards=["fragile:"])
    assert not (tmp / "vm.sock").exists()


GATE = threading.Event()


class GateCard(BuiltinTestCard):
    """``gate:``: a blocking card; INS EE waits until GATE is set."""

    blocking: ClassVar[bool] = True

    def transmit(self, apdu: bytes) -> bytes:
        if apdu[1:2] == b"\xee":
            assert GATE.wait(30), "the test never opened the gate"
            return H("9000")
        return super().transmit(apdu)


def open_gate(argument: str, options: CardOptions) -> GateCard:
    return GateCard(argument)


register("gate", f"{__name__}:open_gate")


def test_a_blocking_card_never_holds_up_another_vm(
    tmp: Path, daemons: list[RunningDaemon]
) -> None:
    """VM A's card blocks inside transmit; VM B's blocking card answers meanwhile (each
    blocking card has a thread of its own), then A's answer arrives once released."""
    GATE.clear()
    a, b = UnixAddress(tmp / "a.sock"), UnixAddress(tmp / "b.sock")
    daemons.append(serve(listen=[a, b], cards=["gate:"]))
    with FakeQemu.connect(a) as fa, FakeQemu.connect(b) as fb:
        fa.wait_card()
        fb.wait_card()
        answer: list[bytes] = []
        stuck = threading.Thread(target=lambda: answer.append(fa.transmit(H("80ee0000"),
                                                                            timeout=30)))
        stuck.start()
        try:
            for i in range(5):
                echo(fb, bytes([i]) * 8)
            assert answer == []  # A is still waiting for its card
        finally:
            GATE.set()
            stuck.join(30)
        assert answer == [H("9000")]


# --------------------------------------------------------------------------- isolation


def test_garbage_peer_does_not_disturb_another_session(
    tmp: Path, daemons: list[RunningDaemon]
) -> None:
    addr = UnixAddress(tmp / "vm.sock")
    daemons.append(serve(listen=[addr]))
    with FakeQemu.connect(addr) as good:
        good.wait_card()
        bad = socket.socket(socket.AF_UNIX)
        bad.connect(str(addr.path))
        bad.settimeout(5)
        # a header claiming a 2 GiB payload: the daemon must close this session only
        bad.sendall(struct.pack(">III", 7, 0, 0x7FFFFFFF))
        data = b""
        while chunk := bad.recv(4096):
            data += chunk
        bad.close()
        assert data.startswith(H("00000001 00000000 0000000c 56534344"))  # our Init, then EOF
        echo(good, b"unaffected")


# --------------------------------------------------------------------------- control socket


def test_control_list_stats_remove_insert(tmp: Path, daemons: list[RunningDaemon]) -> None:
    addr = UnixAddress(tmp / "vm.sock")
    ctl = UnixAddress(tmp / "ctl.sock")
    started = time.monotonic()
    daemons.append(serve(listen=[addr], control=ctl))
    assert stat.S_IMODE(ctl.path.stat().st_mode) == 0o600
    with FakeQemu.connect(addr) as fake:
        fake.wait_card()
        echo(fake, b"1")
        (session,) = control_request(ctl, {"cmd": "list"})
        assert session["mode"] == "listen" and session["address"] == str(addr)
        assert session["connected"] and session["handshake"]
        (reader,) = session["readers"]
        assert reader["reader"] == 0 and reader["reader_id"] == 0
        assert reader["present"] and reader["apdus"] == 1
        assert reader["card"] == "built-in test card"
        sid = session["session"]

        stats = control_request(ctl, {"cmd": "stats"})
        assert stats["sessions"] == 1 and stats["apdus"] == 1
        # every byte each side sent, counted exactly
        assert stats["bytes_in"] == sum(len(encode_vsc(m)) for m in fake.core.sent)
        assert stats["bytes_out"] == sum(len(encode_vsc(m)) for m in fake.core.received)
        assert 0 < stats["uptime"] <= time.monotonic() - started + 0.001  # (rounded to ms)

        after = control_request(ctl, {"cmd": "remove", "session": sid, "reader": 0})
        assert after["readers"][0]["present"] is False
        fake.wait_removed()
        with pytest.raises(CardError):
            fake.transmit(H("80e4000004"))  # no card: the guest's transmit fails
        with pytest.raises(ControlError, match="no card"):
            control_request(ctl, {"cmd": "remove", "session": sid})

        after = control_request(ctl, {"cmd": "insert", "session": sid, "card": "test:other"})
        assert after["readers"][0]["card"] == "built-in test card (other)"
        fake.wait_card()
        fake.power_on()
        echo(fake, b"2")
        with pytest.raises(ControlError, match="already has a card"):
            control_request(ctl, {"cmd": "insert", "session": sid})
        with pytest.raises(ControlError, match="no session"):
            control_request(ctl, {"cmd": "insert", "session": 999})
        with pytest.raises(ControlError, match="unknown command"):
            control_request(ctl, {"cmd": "explode"})


def test_ctl_command_line(tmp: Path, daemons: list[RunningDaemon]) -> None:
    addr = UnixAddress(tmp / "vm.sock")
    ctl = UnixAddress(tmp / "ctl.sock")
    daemons.append(serve(listen=[addr], control=ctl))
    with FakeQemu.connect(addr) as fake:
        fake.wait_card()

        def ctl_run(*args: str) -> str:
            out = subprocess.run(
                [sys.executable, "-m", "vmc", "ctl", "--control", str(ctl), *args],
                capture_output=True, text=True, timeout=30,
            )
            assert out.returncode == 0, out.stderr
            return out.stdout

        echo(fake, b"1")
        listed = json.loads(ctl_run("--json", "list"))
        sid = listed[0]["session"]
        header = ["ID", "VM", "MODE", "ADDRESS", "PEER", "READER", "RID", "CARD", "PRESENT",
                  "APDUS"]
        row = [str(sid), "vm1", "listen", str(addr), "local", "0", "0", "built-in", "test",
               "card"]  # (the card's name is three words)
        table = [line.split() for line in ctl_run("list").splitlines()]
        assert table == [header, [*row, "yes", "1"]], table
        assert json.loads(ctl_run("--json", "remove", str(sid), "0"))["readers"][0][
            "present"
        ] is False
        fake.wait_removed()
        inserted = [line.split() for line in ctl_run("insert", str(sid)).splitlines()]
        assert inserted == [header, [*row, "yes", "1"]], inserted  # the card back in
        fake.wait_card()
        stats = dict(line.split(None, 1) for line in ctl_run("stats").splitlines())
        assert stats["sessions"].strip() == "1" and stats["vms"].strip() == "1", stats


# --------------------------------------------------------------------------- trace


@pytest.mark.parametrize("secrets", [False, True])
def test_trace_file_records_and_redaction(
    secrets: bool, tmp: Path, daemons: list[RunningDaemon]
) -> None:
    addr = UnixAddress(tmp / "vm.sock")
    trace = tmp / "trace.jsonl"
    d = serve(listen=[addr], trace=trace, trace_secrets=secrets)
    daemons.append(d)
    verify = H("0020008008 3132333435363738")
    with FakeQemu.connect(addr) as fake:
        fake.wait_card()
        echo(fake, b"abc")
        fake.transmit(verify)
    d.stop()
    records = list(read_trace(trace))
    assert [r.command for r in records] == [
        H("80e0000003616263"), verify if secrets else verify[:5]
    ]
    assert records[0].response == b"abc" + H("9000")
    assert records[1].response == H("6e00")
    assert records[1].redacted is (not secrets)
    assert all(r.session == records[0].session and r.reader == 0 for r in records)
    assert all(0 <= r.duration < 1 and abs(r.time - time.time()) < 60 for r in records)
    assert ("3132333435363738" in trace.read_text()) is secrets


# --------------------------------------------------------------------------- the real CLI


def test_sigterm_removes_cards_and_readers_then_exits_0(tmp: Path) -> None:
    addr = UnixAddress(tmp / "vm.sock")
    daemon = ServeProcess(tmp / "serve", addr.path, ChardevMode.QEMU_CLIENT)  # --listen
    daemon.start()
    try:
        assert daemon.proc is not None
        with FakeQemu.connect(addr) as fake:
            fake.wait_card()
            echo(fake, b"before")
            daemon.proc.send_signal(signal.SIGTERM)
            fake.wait_closed(timeout=10)
            tail = [m for m in fake.received if not isinstance(m, VscApdu)][-2:]
            assert [type(m) for m in tail] == [VscCardRemove, VscReaderRemove]
        assert daemon.proc.wait(10) == 0
        log = daemon.log_path.read_text()
        assert f"listening on {addr}" in log
        assert "handshake done" in log and "added with id 0" in log
        assert not addr.path.exists()
    finally:
        daemon.stop()


def test_atr_sent_after_reader_added(tmp: Path, daemons: list[RunningDaemon]) -> None:
    addr = UnixAddress(tmp / "vm.sock")
    daemons.append(serve(listen=[addr]))
    with FakeQemu.connect(addr) as fake:
        fake.wait_card()
        names = [type(m).__name__ for m in fake.received]
        assert names[:3] == ["VscInit", "VscReaderAdd", "VscAtr"]
        assert isinstance(fake.received[2], VscAtr)


# --------------------------------------------------------------------------- session thread I/O


def test_output_the_peer_does_not_take_is_kept_in_order_and_reading_stops() -> None:
    """StreamTransport on a socketpair with a tiny send buffer: a peer that does not read
    makes the transport buffer, stop reading (WRITE only), and deliver everything in order."""
    from vmc.runtime.loop import READ, WRITE
    from vmc.runtime.transport import StreamTransport

    events: list[int] = []
    callbacks: list[Any] = []

    class Loop:
        read_buffer = bytearray(1 << 17)

        def register(self, sock: socket.socket, ev: int, cb: Any) -> None:
            events.append(ev)
            callbacks.append(cb)

        def modify(self, sock: socket.socket, ev: int, cb: Any) -> None:
            events.append(ev)

        def unregister(self, sock: socket.socket) -> None:
            pass

    class Sink:
        def __init__(self) -> None:
            self.data = b""
            self.lost = False

        def data_received(self, buffer: bytearray, nbytes: int) -> None:
            self.data += bytes(buffer[:nbytes])

        def connection_lost(self, exc: Exception | None) -> None:
            self.lost = True

    ours, peer = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # clamped to the minimum
    sink = Sink()
    transport = StreamTransport(Loop(), ours, sink)  # type: ignore[arg-type]
    assert events == [READ]
    expected = b""
    for n in range(200):
        chunk = bytes([n]) * 1000
        expected += chunk
        transport.write(chunk)
        if events[-1] == WRITE:
            break
    assert events[-1] == WRITE and transport.buffered > 0  # backed up: not reading
    for n in range(10):  # more writes keep their order behind the backlog
        chunk = bytes([200 + n]) * 500
        expected += chunk
        transport.write(chunk)
    got = b""
    peer.setblocking(False)
    on_events = callbacks[0]
    for _ in range(100000):
        with contextlib.suppress(BlockingIOError):
            got += peer.recv(65536)
        if transport.buffered:
            on_events(WRITE)
        elif len(got) >= len(expected):
            break
    assert got == expected
    assert events[-1] == READ  # reading again once the backlog is written
    peer.sendall(b"more")
    on_events(READ)
    assert sink.data == b"more" and not sink.lost
    transport.abort()
    peer.close()
