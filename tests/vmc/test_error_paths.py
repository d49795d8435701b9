"""Error paths of ``ccidemu serve``, ``vpcd``, ``fake-qemu`` and ``ctl`` (issue 17): each place
where a user meets a clear message or, before these tests, a traceback or a hang.

Every test drives the failure for real where the OS can be made to fail on demand: a full
file system (a small tmpfs, root only), another user (``setpriv`` to nobody, root only), busy
addresses, peers that reset (``SO_LINGER`` 0) or stop reading (``SHUT_RD``: the daemon's next
send fails with EPIPE), dead daemons (SIGKILL), cards that raise (registered test card types).
Only bugs, which no peer can cause, are made with monkeypatch.  Each asserts what the user
sees: the one-line error and exit status, the log line and its level, no traceback, the
daemon still serving the other VMs, the VM's card state kept.  Nothing waits on a clock:
polling with 30 s deadlines, events, and cards that block until released.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from ccidemu.card import BuiltinTestCard
from ccidemu.cards import CardOptions, register
from ccidemu.errors import CardError
from ccidemu.trace import read_trace
from ccidemu.vsc import (
    READER_ID_UNDEFINED,
    VscApdu,
    VscAtr,
    VscCardRemove,
    VscConnection,
    VscError,
    VscErrorCode,
    VscInit,
    VscMessage,
    VscReaderAdd,
    encode_vsc,
    make_version,
)
from tests.support import logged, no_traceback, wait_for
from tests.vmc.daemon_harness import RunningDaemon, echo, free_port, serve
from tests.vpcd_peer import ScriptedVpcd
from vmc.addr import TcpAddress, UnixAddress
from vmc.control import ControlError, control_request
from vmc.daemon import Daemon
from vmc.fakeqemu import FakeQemu
from vmc.runtime.endpoint import Vm
from vmc.runtime.loop import Loop
from vmc.session import VscSession

H = bytes.fromhex
REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534
COUNT = H("80e4000004")  # the test card: how many APDUs it has answered (this one included)
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (tmpfs mount / another user)")


def count(value: int) -> bytes:
    return value.to_bytes(4, "big") + H("9000")


def echo_apdu(payload: bytes) -> bytes:
    return H("80e00000") + bytes([len(payload)]) + payload


# ----------------------------------------------------------------------------- test cards

#: ``nopower:`` fails this many power-ons (then works), raising this exception type.
NOPOWER: dict[str, Any] = {"fails": 0, "error": RuntimeError}
#: ``hang:``: set by the daemon's cancel() of a call that timed out.
HANG_CANCELLED = threading.Event()
#: ``gatedopen:``: opening waits for OPEN_GATE; OPENING is set when an open started.
OPENING = threading.Event()
OPEN_GATE = threading.Event()


class NoPowerCard(BuiltinTestCard):
    def power_on(self) -> bytes:
        if NOPOWER["fails"] > 0:
            NOPOWER["fails"] -= 1
            raise NOPOWER["error"]("no power")
        return super().power_on()


class BadOffCard(BuiltinTestCard):
    def power_off(self) -> None:
        raise RuntimeError("power-off bug")


class BlockingBugCard(BuiltinTestCard):
    """A blocking card (its own thread): INS EF raises."""

    blocking: ClassVar[bool] = True

    def transmit(self, apdu: bytes) -> bytes:
        if apdu[1:2] == b"\xef":
            raise RuntimeError("blocking card bug")
        return super().transmit(apdu)


class HeavyBugCard(BuiltinTestCard):
    """An emulated card whose INS EF is costly (the heavy pool) and raises."""

    def costly(self, apdu: bytes) -> bool:
        return apdu[1:2] == b"\xef"

    def transmit(self, apdu: bytes) -> bytes:
        if apdu[1:2] == b"\xef":
            raise RuntimeError("heavy card bug")
        return super().transmit(apdu)


class CostBugCard(BuiltinTestCard):
    """A card whose cost hint itself raises for INS EE: a bug the daemon meets in its loop."""

    def costly(self, apdu: bytes) -> bool:
        if apdu[1:2] == b"\xee":
            raise RuntimeError("cost hint bug")
        return False


class HangCard(BuiltinTestCard):
    """A blocking card whose INS EE never answers until the daemon cancels it."""

    blocking: ClassVar[bool] = True

    def __init__(self, label: str = "") -> None:
        super().__init__(label)
        self.released = threading.Event()

    def transmit(self, apdu: bytes) -> bytes:
        if apdu[1:2] == b"\xee":
            assert self.released.wait(30), "the daemon never cancelled the stuck call"
            return H("9000")
        return super().transmit(apdu)

    def cancel(self) -> None:
        HANG_CANCELLED.set()
        self.released.set()


class LongAtrCard(BuiltinTestCard):
    """A 41-byte ATR: QEMU's ccid-card-passthru refuses it (at most 40 bytes)."""

    ATR = H("3b0f") + b"ccidemu-TC" + bytes(29)


def _opener(cls: type[BuiltinTestCard]) -> Callable[[str, CardOptions], BuiltinTestCard]:
    return lambda argument, options: cls(argument)


open_nopower = _opener(NoPowerCard)
open_badoff = _opener(BadOffCard)
open_blockbug = _opener(BlockingBugCard)
open_heavybug = _opener(HeavyBugCard)
open_costbug = _opener(CostBugCard)
open_hang = _opener(HangCard)
open_longatr = _opener(LongAtrCard)


def open_gatedopen(argument: str, options: CardOptions) -> BuiltinTestCard:
    OPENING.set()
    assert OPEN_GATE.wait(30), "the test never opened the gate"
    return BuiltinTestCard(argument)


for _scheme in ("nopower", "badoff", "blockbug", "heavybug", "costbug", "hang", "longatr",
                "gatedopen"):
    register(_scheme, f"{__name__}:open_{_scheme}")


@pytest.fixture(autouse=True)
def _reset_cards() -> Iterator[None]:
    NOPOWER.update(fails=0, error=RuntimeError)
    HANG_CANCELLED.clear()
    OPENING.clear()
    OPEN_GATE.clear()
    yield
    OPEN_GATE.set()  # never leave an opener thread stuck


# ----------------------------------------------------------------------------- helpers


def wait_logged(caplog: pytest.LogCaptureFixture, level: int, pattern: str) -> None:
    wait_for(lambda: logged(caplog, level, pattern),
             f"log {logging.getLevelName(level)} {pattern!r}; got "
             f"{[r.getMessage() for r in list(caplog.records)][-10:]}")


def here(function: str) -> str:
    """The place an exception of this file was raised, as the one-line errors show it."""
    return rf"\(at {re.escape(Path(__file__).name)}:\d+ in {function}\)"


def cli(*args: str, user: int | None = None, timeout: float = 60
        ) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "vmc", *args]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          check=False)


def one_line_error(result: subprocess.CompletedProcess[str], line: str) -> None:
    """Exit status 1 and exactly ``line`` on stderr (so no traceback, nothing else)."""
    assert (result.returncode, result.stderr) == (1, line + "\n"), result.stderr


def log_lines(stderr: str) -> list[str]:
    """The CLI's log lines without their time stamps: 'LEVEL   logger: message'."""
    return [line.split(" ", 2)[2] for line in stderr.splitlines()]


def control_lines(addr: UnixAddress, lines: list[bytes]) -> list[dict[str, Any]]:
    """Raw request lines on one control connection; the JSON answers."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(addr.path))
        for line in lines:
            s.sendall(line)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return [json.loads(x) for x in data.splitlines()]


def unread(sock: socket.socket) -> int:
    """Bytes waiting in ``sock``'s receive queue (FIONREAD)."""
    value: int = struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0" * 4))[0]
    return value


def reset_close(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN (SO_LINGER on, 0 s)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class RawPeer:
    """QEMU's side of VSCard driven by hand, one message at a time (the host)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.settimeout(30)
        self.conn = VscConnection()

    @classmethod
    def connect(cls, addr: UnixAddress | TcpAddress) -> RawPeer:
        if isinstance(addr, UnixAddress):
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(30)
            sock.connect(str(addr.path))
        else:
            sock = socket.create_connection((addr.host, addr.port), timeout=30)
        return cls(sock)

    def send(self, *messages: VscMessage) -> None:
        self.sock.sendall(b"".join(encode_vsc(m) for m in messages))

    def expect(self, kind: type[VscMessage]) -> Any:
        while (message := self.conn.next_event()) is None:
            data = self.sock.recv(65536)
            assert data, f"the daemon closed the connection; waiting for {kind.__name__}"
            self.conn.receive_data(data)
        assert isinstance(message, kind), message
        return message

    def handshake(self, version: int | None = None) -> bytes:
        """Init both ways, ReaderAdd and the ATR acknowledged; the ATR."""
        self.expect(VscInit)
        self.send(VscInit(READER_ID_UNDEFINED) if version is None
                  else VscInit(READER_ID_UNDEFINED, version))
        self.expect(VscReaderAdd)
        self.send(VscError(0, VscErrorCode.SUCCESS))
        atr: bytes = self.expect(VscAtr).atr
        self.send(VscError(0, VscErrorCode.SUCCESS))
        return atr

    def transmit(self, apdu: bytes) -> bytes:
        self.send(VscApdu(0, apdu))
        data: bytes = self.expect(VscApdu).data
        return data

    def close(self) -> None:
        self.sock.close()


# ----------------------------------------------------------------------------- a small disk


@pytest.fixture
def small_fs(tmp: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (16 pages): filled up, it makes every write fail with ENOSPC."""
    if not ROOT:
        pytest.skip("mounting a tmpfs needs root")
    path = tmp / "fs"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(path)],
                   check=True, timeout=30)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, timeout=30)


def fill(fs: Path, leave_pages: int = 0) -> None:
    """Fill ``fs`` up, leaving ``leave_pages`` 4 KiB pages free."""
    spare = fs / "spare"
    if leave_pages:
        spare.write_bytes(bytes(4096 * leave_pages))
    with (fs / "filler").open("wb", buffering=0) as f, pytest.raises(OSError) as full:
        while True:
            f.write(bytes(4096))
    assert full.value.errno == errno.ENOSPC
    if leave_pages:
        spare.unlink()


# ============================================================================= 1. trace files

def _trace_command(kind: str, tmp: Path, trace: str) -> list[str]:
    if kind == "serve":
        return ["-q", "serve", "--listen", f"unix:{tmp}/vm.sock", "--card", "test:",
                "--control", "none", "--trace", trace]
    if kind == "vpcd":
        return ["-q", "vpcd", "--card", "test:", "--vpcd", "tcp:127.0.0.1:9", "--trace", trace]
    return ["-q", "fake-qemu", "--connect", f"unix:{tmp}/none.sock", "--trace", trace]


COMMANDS = ["serve", "vpcd", "fake-qemu"]


@pytest.mark.parametrize("kind", COMMANDS)
def test_a_trace_in_a_missing_directory_is_one_line(kind: str, tmp: Path) -> None:
    trace = f"{tmp}/missing/trace.jsonl"
    one_line_error(cli(*_trace_command(kind, tmp, trace)),
                   f"ccidemu {kind}: error: cannot open trace file {trace}: "
                   "No such file or directory")
    assert not (tmp / "vm.sock").exists()  # serve: nothing bound before the error


@pytest.mark.parametrize("kind", COMMANDS)
def test_a_trace_that_is_not_a_file_is_one_line(kind: str, tmp: Path) -> None:
    one_line_error(cli(*_trace_command(kind, tmp, "/dev/full")),
                   f"ccidemu {kind}: error: trace file /dev/full is not a regular file")


@needs_root
@pytest.mark.parametrize("kind", COMMANDS)
def test_a_trace_in_a_directory_we_cannot_write_is_one_line(kind: str, tmp: Path) -> None:
    """As nobody (root ignores modes): a directory of root's, mode 0755."""
    tmp.chmod(0o755)
    (tmp / "ro").mkdir(mode=0o755)
    trace = f"{tmp}/ro/trace.jsonl"
    one_line_error(cli(*_trace_command(kind, tmp, trace), user=NOBODY),
                   f"ccidemu {kind}: error: cannot open trace file {trace}: Permission denied")


@pytest.mark.parametrize("kind", COMMANDS)
def test_a_trace_on_a_full_disk_at_start_is_one_line(kind: str, tmp: Path,
                                                     small_fs: Path) -> None:
    fill(small_fs)
    trace = f"{small_fs}/trace.jsonl"
    one_line_error(cli(*_trace_command(kind, tmp, trace)),
                   f"ccidemu {kind}: error: cannot write trace file {trace}: "
                   "No space left on device")


def _exchanges_are_a_prefix(trace: Path, commands: list[bytes], session: int) -> int:
    """The trace reads without error (no half record left) and holds the first of
    ``commands`` in order; how many."""
    got = [r.command for r in read_trace(trace) if r.session == session]
    assert 0 < len(got) < len(commands), len(got)
    assert got == commands[:len(got)]
    return len(got)


def test_serve_survives_a_full_disk_under_its_trace(
    tmp: Path, small_fs: Path, daemons: list[RunningDaemon], caplog: pytest.LogCaptureFixture
) -> None:
    """The disk fills while VMs are served: one error line, ``ctl stats`` says why, every
    APDU of both VMs still answered, the trace readable up to the last whole record."""
    caplog.set_level(logging.INFO)
    trace = small_fs / "trace.jsonl"
    a, b = UnixAddress(tmp / "a.sock"), UnixAddress(tmp / "b.sock")
    d = serve(listen=[a, b], trace=trace)
    daemons.append(d)
    reason = f"cannot write trace file {trace}: No space left on device"
    sent: list[bytes] = []
    with FakeQemu.connect(a) as fa, FakeQemu.connect(b) as fb:
        fa.wait_card()
        fb.wait_card()
        fill(small_fs)
        while d.request({"cmd": "stats"})["trace"] != reason:
            assert len(sent) < 2000, d.request({"cmd": "stats"})
            sent.append(echo_apdu(len(sent).to_bytes(2, "big")))
            assert fa.transmit(sent[-1]) == sent[-1][5:] + H("9000")
        for i in range(20):  # both VMs go on; the error is not repeated
            echo(fa, bytes([i]) * 10)
            echo(fb, bytes([i]) * 10)
        assert d.request({"cmd": "stats"})["errors"] == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert errors == [f"{reason}; tracing stopped"]
    no_traceback(caplog)
    _exchanges_are_a_prefix(trace, sent, session=1)
    assert not [r for r in read_trace(trace) if r.session == 2]  # b echoed only after


def test_vpcd_survives_a_full_disk_under_its_trace_and_exits_1(small_fs: Path) -> None:
    fill(small_fs, leave_pages=1)  # the header fits, some records, then ENOSPC
    trace = small_fs / "trace.jsonl"
    vpcd = ScriptedVpcd()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmc", "-q", "vpcd", "--card", "test:", "--vpcd",
         f"tcp:127.0.0.1:{vpcd.port}", "--trace", str(trace)],
        cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        vpcd.accept()
        assert vpcd.ask(b"\x04") == BuiltinTestCard.ATR
        sent = [echo_apdu(i.to_bytes(2, "big")) for i in range(300)]  # ~40 KiB of records
        for apdu in sent:
            assert vpcd.ask(apdu) == apdu[5:] + H("9000")
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        vpcd.close()
    reason = f"cannot write trace file {trace}: No space left on device"
    assert proc.returncode == 1, stderr
    assert log_lines(stderr) == [f"ERROR   ccidemu.traces.writer: {reason}; tracing stopped",
                                 f"ERROR   vmc.commands.vpcd: {reason}"], stderr
    _exchanges_are_a_prefix(trace, sent, session=0)


def test_fake_qemu_survives_a_full_disk_under_its_trace_and_exits_1(
    tmp: Path, small_fs: Path, daemons: list[RunningDaemon]
) -> None:
    addr = UnixAddress(tmp / "vm.sock")
    daemons.append(serve(listen=[addr]))
    fill(small_fs, leave_pages=1)
    trace = small_fs / "trace.jsonl"
    sent = [echo_apdu(i.to_bytes(2, "big")) for i in range(300)]
    args = [a for apdu in sent for a in ("--apdu", apdu.hex())]
    result = cli("-q", "fake-qemu", "--connect", str(addr), "--trace", str(trace), *args)
    reason = f"cannot write trace file {trace}: No space left on device"
    assert result.returncode == 1, result.stderr
    answers = [line for line in result.stdout.splitlines() if line.startswith("<")]
    assert answers == [f"< {apdu[5:].hex().upper()} SW=9000" for apdu in sent]
    assert result.stderr.splitlines()[-1] == reason
    assert log_lines("\n".join(result.stderr.splitlines()[:-1])) == [
        f"ERROR   ccidemu.traces.writer: {reason}; tracing stopped"]
    _exchanges_are_a_prefix(trace, sent, session=0)


# ============================================================================= 2. control socket


def test_a_request_that_meets_a_bug_is_answered_and_the_daemon_goes_on(
    tmp: Path, daemons: list[RunningDaemon], caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in a handler (no real request makes one: monkeypatched) gets an answer that says
    so, one log line without traceback; the same connection and the VMs go on."""
    caplog.set_level(logging.INFO)
    addr, ctl = UnixAddress(tmp / "vm.sock"), UnixAddress(tmp / "ctl.sock")
    daemons.append(serve(listen=[addr], control=ctl))

    def broken(self: Daemon) -> dict[str, Any]:
        raise RuntimeError("stats broke")

    monkeypatch.setattr(Daemon, "_stats", broken)
    with FakeQemu.connect(addr) as fake:
        fake.wait_card()
        first, second = control_lines(ctl, [b'{"cmd": "stats"}\n', b'{"cmd": "list"}\n'])
        assert first["ok"] is False
        assert re.fullmatch(r"internal error in the daemon: RuntimeError: stats broke "
                            + here("broken") + r" \(see its log\)", first["error"]), first
        assert second["ok"] is True and second["result"][0]["connected"] is True
        echo(fake, b"still served")
    assert len(logged(caplog, logging.ERROR, r"control request failed: internal error: "
                      r"RuntimeError: stats broke " + here("broken"))) == 1
    no_traceback(caplog)


def test_a_bug_after_a_slow_request_is_answered_not_left_hanging(
    tmp: Path, daemons: list[RunningDaemon], caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ctl attach`` finishes in the loop after the cards opened in a helper thread; a bug
    there used to leave the request unanswered (the client waited for its timeout) and the
    VM half attached.  Now: an answer at once, nothing of the VM left."""
    caplog.set_level(logging.INFO)
    ctl = UnixAddress(tmp / "ctl.sock")
    daemons.append(serve(listen=[UnixAddress(tmp / "vm.sock")], control=ctl))
    real_start = Vm.start

    def start(self: Vm, socks: Any = None) -> None:
        if self.name == "broken":
            raise RuntimeError("cannot start")
        real_start(self, socks)

    monkeypatch.setattr(Vm, "start", start)
    late = tmp / "broken.sock"
    request = {"cmd": "attach", "vm": "broken", "listen": f"unix:{late}", "cards": ["test:"]}
    with pytest.raises(ControlError, match=r"internal error in the daemon: RuntimeError: "
                       r"cannot start " + here("start")):
        control_request(ctl, request, timeout=30)
    assert [vm["vm"] for vm in control_request(ctl, {"cmd": "list"})] == ["vm1"]
    assert not late.exists()
    monkeypatch.undo()
    assert control_request(ctl, request, timeout=30)["listening"] is True  # name, address free
    with FakeQemu.connect(UnixAddress(late)) as fake:
        fake.wait_card()
    no_traceback(caplog)


def test_control_clients_that_drop_or_send_garbage_change_nothing(
    tmp: Path, daemons: list[RunningDaemon], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    addr, ctl = UnixAddress(tmp / "vm.sock"), UnixAddress(tmp / "ctl.sock")
    d = serve(listen=[addr], control=ctl)
    daemons.append(d)
    with FakeQemu.connect(addr) as fake:
        fake.wait_card()
        assert fake.transmit(COUNT) == count(1)
        # half a request, then gone
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(ctl.path))
            s.sendall(b'{"cmd": "sta')
        # a request, then gone at once with a reset: its answer has nowhere to go
        for _ in range(20):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(ctl.path))
            s.sendall(b'{"cmd": "stats"}\n')
            reset_close(s)
        # a number too long for Python's int: an error naming the line, the connection goes on
        huge, stats = control_lines(ctl, [b'{"cmd": "remove", "session": 1'
                                          + b"0" * 5000 + b"}\n", b'{"cmd": "stats"}\n'])
        assert huge["ok"] is False and huge["error"].startswith("not a JSON line: "), huge
        assert stats["ok"] is True
        # an answer that comes late (the new card opens in a helper thread) to a client gone
        d.request({"cmd": "remove", "vm": "vm1"})
        fake.wait_removed()
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(ctl.path))
            s.sendall(b'{"cmd": "insert", "vm": "vm1", "card": "gatedopen:late"}\n')
            assert OPENING.wait(30)
        OPEN_GATE.set()
        fake.wait_card(timeout=30)  # the insert went through all the same
        assert control_request(ctl, {"cmd": "list"})[0]["readers"][0]["card"] == (
            "built-in test card (late)")
        assert fake.transmit(COUNT) == count(1)  # the new card
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    no_traceback(caplog)


IN_USE = ("{} is in use by another process (ccidemu serve already running? give each daemon "
          "its own --control and addresses)")


@pytest.mark.parametrize("what", ["control", "listen"])
def test_a_socket_of_a_running_daemon_is_refused_and_left_alone(
    what: str, tmp: Path, daemons: list[RunningDaemon]
) -> None:
    addr, ctl = UnixAddress(tmp / "vm.sock"), UnixAddress(tmp / "ctl.sock")
    daemons.append(serve(listen=[addr], control=ctl))
    other = tmp / "other.sock"
    if what == "control":
        args = ["--listen", f"unix:{other}", "--control", f"unix:{ctl.path}"]
        busy = ctl.path
    else:
        args = ["--listen", f"unix:{other}", "--listen", str(addr), "--control", "none"]
        busy = addr.path
    one_line_error(cli("-q", "serve", "--card", "test:", *args),
                   f"ccidemu serve: error: {IN_USE.format(busy)}")
    assert not other.exists()  # what the refused daemon had bound is gone again
    assert control_request(ctl, {"cmd": "list"})[0]["vm"] == "vm1"  # the first one serves on
    with FakeQemu.connect(addr) as fake:
        fake.wait_card()


def test_sockets_left_by_a_killed_daemon(tmp: Path) -> None:
    vm, ctl = tmp / "vm.sock", tmp / "ctl.sock"
    argv = [sys.executable, "-m", "vmc", "-q", "serve", "--listen", f"unix:{vm}", "--card",
            "test:", "--control", f"unix:{ctl}"]

    def start() -> subprocess.Popen[str]:
        proc = subprocess.Popen(argv, cwd=REPO, stderr=subprocess.PIPE, text=True)

        def ready() -> bool:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                control_request(UnixAddress(ctl), {"cmd": "stats"})
            except ControlError:
                return False
            return True

        wait_for(ready, "the daemon's control socket")
        return proc

    first = start()
    first.kill()
    first.communicate(timeout=30)
    assert vm.exists() and ctl.exists()  # SIGKILL: nobody removed them
    one_line_error(cli("ctl", "--control", f"unix:{ctl}", "list"),
                   f"ccidemu ctl: error: cannot reach the daemon's control socket unix:{ctl}: "
                   "Connection refused (is 'ccidemu serve' running with the same --control?)")
    second = start()  # both stale sockets replaced
    try:
        with FakeQemu.connect(UnixAddress(vm), timeout=30) as fake:
            fake.wait_card(timeout=30)
            echo(fake, b"new daemon")
        listing = cli("ctl", "--control", f"unix:{ctl}", "list")
        assert listing.returncode == 0 and str(vm) in listing.stdout, listing.stderr
    finally:
        second.send_signal(signal.SIGTERM)
        _, stderr = second.communicate(timeout=30)
    assert second.returncode == 0 and stderr == "", stderr
    assert not vm.exists() and not ctl.exists()


# ============================================================================= 3. bind failures


def test_a_busy_tcp_port_is_one_line(tmp: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        one_line_error(
            cli("-q", "serve", "--listen", f"tcp:127.0.0.1:{port}", "--card", "test:",
                "--control", "none"),
            f"ccidemu serve: error: cannot listen on tcp:127.0.0.1:{port}: Address already in "
            "use (another process listens there: ccidemu serve already running?)")


def test_a_unix_listen_socket_in_a_missing_directory_is_one_line(tmp: Path) -> None:
    path = tmp / "missing" / "vm.sock"
    one_line_error(cli("-q", "serve", "--listen", f"unix:{path}", "--card", "test:",
                       "--control", "none"),
                   f"ccidemu serve: error: cannot listen on unix:{path}: cannot bind it: "
                   "No such file or directory")


@needs_root
def test_a_unix_listen_socket_in_a_directory_we_cannot_write_is_one_line(tmp: Path) -> None:
    tmp.chmod(0o755)
    (tmp / "ro").mkdir(mode=0o755)
    path = tmp / "ro" / "vm.sock"
    one_line_error(cli("-q", "serve", "--listen", f"unix:{path}", "--card", "test:",
                       "--control", "none", user=NOBODY),
                   f"ccidemu serve: error: cannot listen on unix:{path}: cannot bind it: "
                   "Permission denied")


def test_attaching_a_vm_on_a_busy_port_is_refused_and_changes_nothing(
    tmp: Path, daemons: list[RunningDaemon]
) -> None:
    addr, ctl = UnixAddress(tmp / "vm.sock"), UnixAddress(tmp / "ctl.sock")
    daemons.append(serve(listen=[addr], control=ctl))
    with FakeQemu.connect(addr) as fake, socket.create_server(("127.0.0.1", 0)) as busy:
        fake.wait_card()
        port = busy.getsockname()[1]
        with pytest.raises(ControlError) as refused:
            control_request(ctl, {"cmd": "attach", "vm": "late",
                                  "listen": f"tcp:127.0.0.1:{port}"}, timeout=30)
        assert str(refused.value) == (
            f"cannot listen on tcp:127.0.0.1:{port}: Address already in use (another process "
            "listens there: ccidemu serve already running?)")
        assert [vm["vm"] for vm in control_request(ctl, {"cmd": "list"})] == ["vm1"]
        echo(fake, b"unaffected")


# ============================================================================= 4. recv/send errors


def test_a_send_that_fails_closes_only_that_vm_and_keeps_its_card(
    tmp: Path, daemons: list[RunningDaemon], caplog: pytest.LogCaptureFixture
) -> None:
    """The peer stops reading (SHUT_RD on a unix socket: the daemon's next send fails with
    EPIPE) and sends an APDU: that VM's connection ends with the reason logged; the card
    answered (its counter moved); the other VM is not disturbed; the VM reconnects."""
    caplog.set_level(logging.INFO)
    a, b = UnixAddress(tmp / "a.sock"), UnixAddress(tmp / "b.sock")
    daemons.append(serve(listen=[a, b]))
    with FakeQemu.connect(b) as good:
        good.wait_card()
        peer = RawPeer.connect(a)
        peer.handshake()
        assert peer.transmit(COUNT) == count(1)
        peer.sock.shutdown(socket.SHUT_RD)
        peer.send(VscApdu(0, COUNT))
        wait_logged(caplog, logging.INFO, "vm vm1: disconnected: Broken pipe")
        echo(good, b"unaffected")
        peer.close()
        with FakeQemu.connect(a, timeout=30) as again:
            again.wait_card(timeout=30)
            assert again.transmit(COUNT) == count(3)
    no_traceback(caplog)


def test_a_peer_that_resets_in_listen_mode(
    tmp: Path, daemons: list[RunningDaemon], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    t, b = TcpAddress("127.0.0.1", free_port()), UnixAddress(tmp / "b.sock")
    daemons.append(serve(listen=[t, b]))
    with FakeQemu.connect(b) as good:
        good.wait_card()
        peer = RawPeer.connect(t)
        peer.handshake()
        assert peer.transmit(COUNT) == count(1)
        reset_close(peer.sock)
        wait_logged(caplog, logging.INFO, "vm vm1: disconnected: Connection reset by peer")
        echo(good, b"unaffected")
        with FakeQemu.connect(t, timeout=30) as again:
            again.wait_card(timeout=30)
            assert again.transmit(COUNT) == count(2)
    no_traceback(caplog)


def test_a_peer_that_resets_in_connect_mode_is_reconnected(
    tmp: Path, daemons: list[RunningDaemon], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    b = UnixAddress(tmp / "b.sock")
    with socket.create_server(("127.0.0.1", 0)) as qemu:  # QEMU as chardev server
        qemu.settimeout(30)
        port = qemu.getsockname()[1]
        daemons.append(serve(connect=[TcpAddress("127.0.0.1", port)], listen=[b]))
        with FakeQemu.connect(b) as good:
            good.wait_card()
            peer = RawPeer(qemu.accept()[0])
            peer.handshake()
            assert peer.transmit(COUNT) == count(1)
            reset_close(peer.sock)
            wait_logged(caplog, logging.INFO, "vm vm1: disconnected: Connection reset by peer")
            echo(good, b"unaffected")
            again = RawPeer(qemu.accept()[0])  # the daemon came back by itself
            again.handshake()
            assert again.transmit(COUNT) == count(2)
            again.close()
    no_traceback(caplog)


def test_a_backed_up_peer_that_goes_away_ends_only_its_connection(
    tmp: Path, daemons: list[RunningDaemon], caplog: pytest.LogCaptureFixture
) -> None:
    """Answers pile up for a peer that does not read; it then closes: the daemon's write of
    what it kept fails, that connection ends, nothing is kept for it, the VM takes the next."""
    caplog.set_level(logging.INFO)
    a, b = UnixAddress(tmp / "a.sock"), UnixAddress(tmp / "b.sock")
    d = serve(listen=[a, b])
    daemons.append(d)
    with FakeQemu.connect(b) as good:
        good.wait_card()
        hog = RawPeer.connect(a)
        hog.handshake()
        frame = encode_vsc(VscApdu(0, echo_apdu(b"z" * 255)))
        answer = len(encode_vsc(VscApdu(0, b"z" * 255 + H("9000"))))

        def buffered() -> int:
            return int(d.request({"cmd": "list"})[0]["buffered"])

        # One APDU at a time, the next once the answer is waiting unread on our side (so the
        # daemon never has more than one to queue), until an answer stays with the daemon.
        for _ in range(100_000):
            waiting = unread(hog.sock)
            hog.sock.sendall(frame)
            deadline = time.monotonic() + 30
            while unread(hog.sock) < waiting + answer and not buffered():
                assert time.monotonic() < deadline, "the daemon did not answer"
            if buffered():
                break
        hog.close()
        wait_logged(caplog, logging.INFO,
                    "vm vm1: disconnected: (Broken pipe|Connection reset by peer)")
        echo(good, b"unaffected")
        vm1 = d.request({"cmd": "list"})[0]
        assert (vm1["connected"], vm1["buffered"]) == (False, 0)
        with FakeQemu.connect(a, timeout=30) as again:
            again.wait_card(timeout=30)
            echo(again, b"next")
    no_traceback(caplog)


# ============================================================================= 5. cards failing


def _other_vm(d: RunningDaemon, tmp: Path) -> UnixAddress:
    """A second VM with the built-in test card (attached: its own card type)."""
    other = UnixAddress(tmp / "other.sock")
    d.request({"cmd": "attach", "vm": "other", "listen": str(other), "cards": ["test:"]})
    return other


@pytest.mark.parametrize(("error", "shown"), [
    (RuntimeError, "RuntimeError: no power " + here("power_on")),
    (CardError, r"card error: no power"),
], ids=["bug", "card-error"])
def test_a_card_that_does_not_power_on(
    error: type[Exception], shown: str, tmp: Path, daemons: list[RunningDaemon],
    caplog: pytest.LogCaptureFixture
) -> None:
    """The guest gets the reader without a card, the log says why; remove + insert (a card
    re-seated) powers it on again; another VM is not disturbed."""
    caplog.set_level(logging.INFO)
    NOPOWER.update(fails=1, error=error)
    a = UnixAddress(tmp / "a.sock")
    d = serve(listen=[a], cards=["nopower:"])
    daemons.append(d)
    with FakeQemu.connect(_other_vm(d, tmp)) as good, FakeQemu.connect(a) as fake:
        good.wait_card()
        wait_logged(caplog, logging.ERROR, r"vm vm1: reader 0: card power-on failed: " + shown)

        def offered() -> bool:
            return bool(d.request({"cmd": "list"})[0]["readers"][0]["state"] == "added")

        wait_for(offered, "the reader to be added")
        reader = d.request({"cmd": "list"})[0]["readers"][0]
        assert (reader["present"], reader["inserted"]) == (True, False)
        assert not any(isinstance(m, VscAtr) for m in fake.received)
        echo(good, b"unaffected")
        d.request({"cmd": "remove", "vm": "vm1"})
        d.request({"cmd": "insert", "vm": "vm1"})
        assert fake.wait_card(timeout=30) == BuiltinTestCard.ATR
        assert fake.transmit(COUNT) == count(1)
        assert d.request({"cmd": "stats"})["errors"] == 1
    no_traceback(caplog)


def test_a_card_whose_power_off_raises(
    tmp: Path, daemons: list[RunningDaemon], caplog: pytest.LogCaptureFixture
) -> None:
    """Power-off comes at each disconnect and at ctl remove: a warning each, the card and
    its state stay."""
    caplog.set_level(logging.INFO)
    a = UnixAddress(tmp / "a.sock")
    d = serve(listen=[a], cards=["badoff:"])
    daemons.append(d)
    warning = (r"vm vm1: reader 0 \(badoff:\): card power-off failed: RuntimeError: "
               r"power-off bug " + here("power_off"))
    with FakeQemu.connect(a) as fake:
        fake.wait_card()
        assert fake.transmit(COUNT) == count(1)
    wait_logged(caplog, logging.WARNING, warning)
    with FakeQemu.connect(a, timeout=30) as fake:
        fake.wait_card(timeout=30)
        assert fake.transmit(COUNT) == count(2)
        d.request({"cmd": "remove", "vm": "vm1"})
        fake.wait_removed()
        wait_for(lambda: len(logged(caplog, logging.WARNING, warning)) == 2,
                 "the second power-off warning")
        d.request({"cmd": "insert", "vm": "vm1"})
        fake.wait_card()
        assert fake.transmit(COUNT) == count(3)
    no_traceback(caplog)


@pytest.mark.parametrize(("card", "bug"), [("blockbug:", "blocking card bug"),
                                           ("heavybug:", "heavy card bug")],
                         ids=["own-thread", "heavy-pool"])
def test_a_card_that_raises_off_the_loop(
    card: str, bug: str, tmp: Path, daemons: list[RunningDaemon],
    caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    a = UnixAddress(tmp / "a.sock")
    d = serve(listen=[a], cards=[card])
    daemons.append(d)
    with FakeQemu.connect(a) as fake:
        fake.wait_card()
        with pytest.raises(CardError, match="XfrBlock failed"):
            fake.transmit(H("80ef0000"))
        assert fake.transmit(COUNT) == count(1)  # the next APDU is answered
        assert d.request({"cmd": "stats"})["errors"] == 1
    assert logged(caplog, logging.ERROR, rf"vm vm1: reader 0: card failed to answer: "
                  rf"RuntimeError: {bug} " + here("transmit"))
    no_traceback(caplog)


def test_a_card_that_never_answers_times_out_and_is_cancelled(
    tmp: Path, daemons: list[RunningDaemon], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    a = UnixAddress(tmp / "a.sock")
    # generous: the normal calls of this blocking card must never come near it
    daemons.append(serve(listen=[a], cards=["hang:"], card_timeout=6.0))
    with FakeQemu.connect(a) as fake:
        fake.wait_card()
        with pytest.raises(CardError, match="XfrBlock failed"):
            fake.transmit(H("80ee0000"), timeout=30)
        assert HANG_CANCELLED.is_set()
        assert fake.transmit(COUNT, timeout=30) == count(1)  # a fresh thread answers
    assert logged(caplog, logging.ERROR, re.escape(
        "vm vm1: reader 0 (hang:): the card did not answer within 6 s; giving up on that call"))
    assert logged(caplog, logging.ERROR, "vm vm1: reader 0: card failed to answer: the card "
                  "did not answer within 6 s")
    no_traceback(caplog)


# ============================================================================= 6. the catch-all


def test_a_bug_met_in_one_vms_connection_closes_only_that_connection(
    tmp: Path, daemons: list[RunningDaemon], caplog: pytest.LogCaptureFixture
) -> None:
    """A card's cost hint raising is a bug the daemon meets in its own loop (no card call to
    catch it): that VM's connection is closed with one error line; before, the APDU was
    never answered and the connection stayed open.  Other VMs go on; the VM reconnects and
    keeps its card."""
    caplog.set_level(logging.INFO)
    a = UnixAddress(tmp / "a.sock")
    d = serve(listen=[a], cards=["costbug:"])
    daemons.append(d)
    with FakeQemu.connect(_other_vm(d, tmp)) as good, FakeQemu.connect(a) as fake:
        good.wait_card()
        fake.wait_card()
        assert fake.transmit(COUNT) == count(1)
        with pytest.raises(CardError, match="connection closed"):
            fake.transmit(H("80ee0000"), timeout=30)
        echo(good, b"unaffected")
    assert logged(caplog, logging.ERROR, r"vm vm1: internal error: RuntimeError: cost hint bug "
                  + here("costly") + r"; closing this connection \(other VMs are not "
                  r"affected\)")
    assert logged(caplog, logging.INFO, "vm vm1: disconnected: cost hint bug")
    with FakeQemu.connect(a, timeout=30) as again:
        again.wait_card(timeout=30)
        assert again.transmit(COUNT) == count(2)
    no_traceback(caplog)


def test_a_bug_in_the_card_answer_path_closes_only_that_connection(
    tmp: Path, daemons: list[RunningDaemon], caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same for a bug met when a card's answer comes back from its thread (made with
    monkeypatch: no input reaches one)."""
    caplog.set_level(logging.INFO)
    a = UnixAddress(tmp / "a.sock")
    d = serve(listen=[a], cards=["blockbug:"])
    daemons.append(d)
    real = VscSession.transmit_done

    def transmit_done(self: VscSession, token: int, response: bytes, now: float) -> None:
        if response == count(2):
            raise KeyError("lost track")
        real(self, token, response, now)

    monkeypatch.setattr(VscSession, "transmit_done", transmit_done)
    with FakeQemu.connect(_other_vm(d, tmp)) as good, FakeQemu.connect(a) as fake:
        good.wait_card()
        fake.wait_card()
        assert fake.transmit(COUNT) == count(1)
        with pytest.raises(CardError, match="connection closed"):
            fake.transmit(COUNT, timeout=30)
        echo(good, b"unaffected")
    assert logged(caplog, logging.ERROR, r"vm vm1: internal error: KeyError: 'lost track' "
                  + here("transmit_done") + r"; closing this connection \(other VMs are not "
                  r"affected\)")
    with FakeQemu.connect(a, timeout=30) as again:
        again.wait_card(timeout=30)
        assert again.transmit(COUNT) == count(3)
    no_traceback(caplog)


def test_the_loop_survives_what_escapes_everything_else(
    caplog: pytest.LogCaptureFixture
) -> None:
    """The loop's last resort: a posted call or a socket callback that raises is one error
    line (with where), and the loop serves the next."""
    caplog.set_level(logging.INFO)
    loop = Loop()
    loop.start()
    r, w = socket.socketpair()
    try:
        def boom() -> None:
            raise ZeroDivisionError("posted")

        def readable(events: int) -> None:
            r.recv(16)
            raise ValueError("callback")

        loop.call_soon(boom)
        loop.call_in_loop(lambda: loop.register(r, 1, readable))
        w.send(b"x")
        wait_for(lambda: len(logged(caplog, logging.ERROR, r"unexpected error in the daemon "
                                    r"loop: .*")) == 2, "both errors")
        assert loop.call_in_loop(lambda: 42) == 42
    finally:
        loop.stop()
        r.close()
        w.close()
    assert logged(caplog, logging.ERROR, r"unexpected error in the daemon loop: "
                  r"ZeroDivisionError: posted " + here("boom"))
    assert logged(caplog, logging.ERROR, r"unexpected error in the daemon loop: "
                  r"ValueError: callback " + here("readable"))
    assert not any(rec.exc_info for rec in caplog.records)


# ============================================================================= 7. peer errors


def test_a_peer_of_another_vscard_version_is_served_with_a_warning(
    tmp: Path, daemons: list[RunningDaemon], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    a = UnixAddress(tmp / "a.sock")
    daemons.append(serve(listen=[a]))
    peer = RawPeer.connect(a)
    try:
        assert peer.handshake(version=make_version(1, 2, 3)) == BuiltinTestCard.ATR
        assert peer.transmit(echo_apdu(b"v")) == b"v" + H("9000")
    finally:
        peer.close()
    assert logged(caplog, logging.WARNING, "vm vm1: peer speaks VSCard 1.2.3; continuing")
    assert logged(caplog, logging.INFO, r"vm vm1: handshake done \(peer VSCard 1\.2\.3\)")


def test_an_atr_the_peer_rejects_leaves_the_reader_empty_and_says_why(
    tmp: Path, daemons: list[RunningDaemon], caplog: pytest.LogCaptureFixture
) -> None:
    """The fake QEMU checks the ATR as QEMU 7.2 does and answers a 41-byte one with an
    Error: the warning names the ATR and QEMU's reason; the reader counts as empty (no
    CardRemove later for a card the guest never had); the session goes on."""
    caplog.set_level(logging.INFO)
    a = UnixAddress(tmp / "a.sock")
    d = serve(listen=[a], cards=["longatr:"])
    daemons.append(d)
    with FakeQemu.connect(a) as fake:
        wait_logged(caplog, logging.WARNING,
                    rf"vm vm1: reader 0: peer rejected the ATR {LongAtrCard.ATR.hex().upper()}"
                    r": GENERAL_ERROR; the guest sees no card \(QEMU refuses it: ATR size 41 "
                    r"exceeds QEMU's maximum of 40 bytes\)")
        assert not fake.card_present()
        vm1 = d.request({"cmd": "list"})[0]
        assert vm1["connected"] and vm1["readers"][0]["inserted"] is False
        assert d.request({"cmd": "stats"})["errors"] == 1
        d.request({"cmd": "remove", "vm": "vm1"})
        d.request({"cmd": "insert", "vm": "vm1"})  # the ATR goes out (and is refused) again
        wait_for(lambda: len(logged(caplog, logging.WARNING, r".*peer rejected the ATR.*")) == 2,
                 "the second refusal")
        assert not any(isinstance(m, VscCardRemove) for m in fake.received)
        assert d.request({"cmd": "stats"})["sessions"] == 1


def test_other_peer_error_codes_are_logged_and_the_session_goes_on(
    tmp: Path, daemons: list[RunningDaemon], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    a = UnixAddress(tmp / "a.sock")
    d = serve(listen=[a])
    daemons.append(d)
    # the reader refused with an unusual code: left out, named in the log
    peer = RawPeer.connect(a)
    peer.expect(VscInit)
    peer.send(VscInit(READER_ID_UNDEFINED))
    peer.expect(VscReaderAdd)
    peer.send(VscError(0, VscErrorCode.CARD_ALREADY_INSERTED))
    wait_for(lambda: d.request({"cmd": "list"})[0]["readers"][0]["state"] == "refused",
             "the refusal")
    peer.close()
    assert logged(caplog, logging.WARNING, re.escape(
        "vm vm1: peer refused reader 0 'ccidemu reader 0': CARD_ALREADY_INSERTED (reader id 0)"))
    # an Error nobody asked for, and a CardRemove answered with an error
    wait_for(lambda: not d.request({"cmd": "list"})[0]["connected"], "the first to end")
    peer = RawPeer.connect(a)
    try:
        peer.handshake()
        peer.send(VscError(5, 77))
        assert peer.transmit(echo_apdu(b"1")) == b"1" + H("9000")
        d.request({"cmd": "remove", "vm": "vm1"})
        peer.expect(VscCardRemove)
        peer.send(VscError(0, VscErrorCode.GENERAL_ERROR))
        d.request({"cmd": "insert", "vm": "vm1"})
        peer.expect(VscAtr)
        peer.send(VscError(0, VscErrorCode.SUCCESS))
        assert peer.transmit(echo_apdu(b"2")) == b"2" + H("9000")
        assert d.request({"cmd": "stats"})["errors"] == 2  # the refusal, the CardRemove
    finally:
        peer.close()
    assert logged(caplog, logging.WARNING, r"vm vm1: peer reports error code 77 \(reader id 5\)")
    assert logged(caplog, logging.WARNING,
                  "vm vm1: reader 0: peer answered CardRemove with GENERAL_ERROR")
    no_traceback(caplog)


# ============================================================================= 8. ctl client


class FakeDaemon(threading.Thread):
    """Something else on a control socket path: ``behave(conn)`` decides what it does."""

    def __init__(self, path: Path, behave: Callable[[socket.socket], None]) -> None:
        super().__init__(daemon=True)
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen(4)
        self.server.settimeout(30)
        self.behave = behave
        self.start()

    def run(self) -> None:
        conn, _ = self.server.accept()
        with conn, contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.behave(conn)  # (a client that gave up: the end of what it tests)

    def close(self) -> None:
        self.join(30)
        self.server.close()


def _read_line(conn: socket.socket) -> None:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(4096)
        assert chunk
        data += chunk


def _answer(text: bytes) -> Callable[[socket.socket], None]:
    def behave(conn: socket.socket) -> None:
        _read_line(conn)
        conn.sendall(text)
    return behave


def _hang_up(conn: socket.socket) -> None:
    _read_line(conn)


def _reset(conn: socket.socket) -> None:
    """Close with the request unread: a unix socket then resets the client's next read."""
    select.select([conn], [], [], 30)
    reset_close(conn)


CTL_ERRORS = [
    pytest.param(_answer(b"hello\n"), "bad answer from the daemon: not a JSON line: Expecting "
                 "value: line 1 column 1 (char 0)", id="not-json"),
    pytest.param(_answer(b"[1, 2]\n"), "bad answer from the daemon: a control message must be "
                 "a JSON object", id="not-an-object"),
    pytest.param(_answer(b"x" * (2 << 20)), "control answer too long", id="too-long"),
    pytest.param(_hang_up, "the daemon closed the control connection", id="hangs-up"),
    pytest.param(_reset, "control socket unix:{path}: Connection reset by peer", id="reset"),
]


@pytest.mark.parametrize(("behave", "message"), CTL_ERRORS)
def test_ctl_against_something_that_is_not_a_daemon(
    behave: Callable[[socket.socket], None], message: str, tmp: Path
) -> None:
    path = tmp / "ctl.sock"
    fake = FakeDaemon(path, behave)
    try:
        result = cli("ctl", "--control", f"unix:{path}", "stats")
    finally:
        fake.close()
    one_line_error(result, f"ccidemu ctl: error: {message.format(path=path)}")


def test_ctl_when_nothing_listens_or_the_directory_is_not_trusted(tmp: Path) -> None:
    path = tmp / "ctl.sock"
    one_line_error(cli("ctl", "--control", f"unix:{path}", "list"),
                   f"ccidemu ctl: error: cannot reach the daemon's control socket unix:{path}: "
                   "No such file or directory (is 'ccidemu serve' running with the same "
                   "--control?)")
    shared = tmp / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    one_line_error(cli("ctl", "--control", f"unix:{shared}/ctl.sock", "list"),
                   f"ccidemu ctl: error: not talking to unix:{shared}/ctl.sock: {shared} can be "
                   "written by other users (mode 0777)")
    if ROOT:
        theirs = tmp / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, NOBODY, NOBODY)
        one_line_error(cli("ctl", "--control", f"unix:{theirs}/ctl.sock", "list"),
                       f"ccidemu ctl: error: not talking to unix:{theirs}/ctl.sock: {theirs} is "
                       f"owned by uid {NOBODY}, not by you or root")


def test_a_daemon_that_never_answers_is_a_timeout_not_a_hang(tmp: Path) -> None:
    path = tmp / "ctl.sock"
    gone = threading.Event()

    def silent(conn: socket.socket) -> None:
        gone.wait(30)

    fake = FakeDaemon(path, silent)
    try:
        with pytest.raises(ControlError) as caught:
            control_request(UnixAddress(path), {"cmd": "list"}, timeout=1)
    finally:
        gone.set()
        fake.close()
    assert str(caught.value) == f"control socket unix:{path}: no answer within 1 s"


def test_ctl_requests_the_daemon_refuses(tmp: Path, daemons: list[RunningDaemon]) -> None:
    ctl = UnixAddress(tmp / "ctl.sock")
    daemons.append(serve(listen=[UnixAddress(tmp / "vm.sock")], control=ctl))
    one_line_error(cli("ctl", "--control", str(ctl), "remove", "nosuch"),
                   "ccidemu ctl: error: no vm 'nosuch'")
    one_line_error(cli("ctl", "--control", str(ctl), "remove", "vm1", "3"),
                   "ccidemu ctl: error: vm vm1 has no reader 3")
    refused = cli("ctl", "--control", str(ctl), "--json", "insert", "vm1")
    assert refused.returncode == 1 and refused.stderr == ""
    assert json.loads(refused.stdout) == {"ok": False, "error": "reader 0 already has a card"}
