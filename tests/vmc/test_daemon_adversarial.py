"""Adversarial peers against ``ccidemu serve`` (vmc.daemon): the daemon must stay up.

Product requirement: bad input from any peer gets a clear error (or the right status word), is
logged and never crashes the daemon, leaks a key or loses card state; a malformed stream or an
over-long length closes *that* session and every other session keeps running; one process
serves hundreds of VMs; the daemon is never what slows a VM's card down.

Good sessions (:class:`vmc.fakeqemu.FakeQemu`) exchange APDUs throughout while raw sockets
misbehave.  Ordering is checked with events (a card that blocks until released), not timings.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from ccidemu.card import BuiltinTestCard
from ccidemu.cards import CardOptions, register
from ccidemu.errors import CardError
from ccidemu.vsc import VscApdu, VscAtr, VscCardRemove, VscInit, encode_vsc
from tests.vmc.daemon_harness import RunningDaemon, echo, serve
from vmc.addr import UnixAddress
from vmc.control import ControlError, control_request
from vmc.fakeqemu import FakeQemu

H = bytes.fromhex
HDR = struct.Struct(">III")  # vscard_common.h VSCMsgHeader: type, reader_id, length
COUNT = H("80e4000004")  # test card: the number of APDUs it has seen

# ----------------------------------------------------------------------------- test cards

#: ``gated:`` cards block in transmit (INS EE) until this is set.
TRANSMIT_GATE = threading.Event()
#: Set by a ``gated:`` card when an ``80 EF`` APDU reaches it (its answer is then owed).
IN_CARD = threading.Event()
#: While set, opening a ``slowopen:`` card blocks until OPEN_GATE is set.
OPEN_ARMED = threading.Event()
OPEN_GATE = threading.Event()
OPENS_BLOCKED = threading.Semaphore(0)


class GatedCard(BuiltinTestCard):
    """Blocking card: ``80 EE`` waits for TRANSMIT_GATE; ``80 EF`` sets IN_CARD and sleeps
    50 ms; else fast."""

    blocking: ClassVar[bool] = True

    def transmit(self, apdu: bytes) -> bytes:
        if apdu[:2] == H("80ee"):
            TRANSMIT_GATE.wait(20)
            return H("9000")
        if apdu[:2] == H("80ef"):
            IN_CARD.set()
            time.sleep(0.05)
            return H("9000")
        return super().transmit(apdu)


def open_gated(argument: str, options: CardOptions) -> GatedCard:
    return GatedCard(argument)


def open_slowopen(argument: str, options: CardOptions) -> BuiltinTestCard:
    if OPEN_ARMED.is_set():
        OPENS_BLOCKED.release()
        OPEN_GATE.wait(20)
    return BuiltinTestCard(argument)


register("gated", f"{__name__}:open_gated")
register("slowopen", f"{__name__}:open_slowopen")


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _gates() -> Iterator[None]:
    TRANSMIT_GATE.clear()
    IN_CARD.clear()
    OPEN_ARMED.clear()
    OPEN_GATE.clear()
    yield
    TRANSMIT_GATE.set()  # never leave a card thread stuck
    OPEN_GATE.set()
    OPEN_ARMED.clear()


def frame(type_: int, reader_id: int, payload: bytes = b"") -> bytes:
    return HDR.pack(type_, reader_id, len(payload)) + payload


INIT = encode_vsc(VscInit(0xFFFFFFFF))
ACK = frame(2, 0, H("00000000"))  # Error(SUCCESS) for reader 0


def raw(addr: UnixAddress, timeout: float = 5.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(addr.path))  # blocking: waits while the listen backlog is full
    s.settimeout(timeout)
    return s


def read_until_eof(s: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the daemon sends until it closes (TimeoutError if it does not)."""
    s.settimeout(timeout)
    got = bytearray()
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return bytes(got)
        got += chunk


class GoodSession(threading.Thread):
    """A FakeQemu exchanging echo APDUs (and checking every answer) until stopped."""

    def __init__(self, addr: UnixAddress, tag: int) -> None:
        super().__init__(daemon=True)
        self.fake = FakeQemu.connect(addr)
        self.fake.wait_card()
        self.tag = tag
        self.count = 0
        self.error: BaseException | None = None
        self.stop_event = threading.Event()
        self.start()

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                echo(self.fake, bytes([self.tag]) + self.count.to_bytes(4, "big"))
                self.count += 1
        except BaseException as exc:
            self.error = exc

    def finish(self) -> int:
        self.stop_event.set()
        self.join(10)
        assert not self.is_alive()
        self.fake.close()
        assert self.error is None, repr(self.error)
        return self.count

    def wait_count(self, n: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.count < n:
            assert self.error is None, repr(self.error)
            assert time.monotonic() < deadline, f"only {self.count} APDUs"
            time.sleep(0.01)


def run_threads(targets: list[Callable[[], None]], timeout: float = 20.0) -> None:
    errors: list[BaseException] = []

    def wrap(f: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                f()
            except BaseException as exc:
                errors.append(exc)
        return run

    threads = [threading.Thread(target=wrap(f), daemon=True) for f in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "abuser thread hung"
    assert not errors, errors


def no_thread_died(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.exc_info or "unexpected error" in r.getMessage()]
    assert not bad, [r.getMessage() for r in bad]


# ----------------------------------------------------------------------------- bad streams


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll until ``predicate()`` (a generous deadline, never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_garbage_peers_close_only_their_session(
    tmp: Path, daemons: list[RunningDaemon], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vmc")
    goods = [UnixAddress(tmp / f"good{i}.sock") for i in range(3)]
    abuse, slow = UnixAddress(tmp / "abuse.sock"), UnixAddress(tmp / "slow.sock")
    ctl = UnixAddress(tmp / "ctl.sock")
    d = serve(listen=[*goods, abuse, slow], control=ctl)
    daemons.append(d)
    good = [GoodSession(addr, i) for i, addr in enumerate(goods)]
    rng = random.Random(1234)

    def random_garbage() -> None:
        for _ in range(10):
            with raw(abuse) as s:
                s.sendall(rng.randbytes(rng.randrange(1, 4096)))
                # random bytes are either a bad frame (closed by the daemon) or a frame
                # still incomplete: both end when we go away
                s.shutdown(socket.SHUT_WR)
                read_until_eof(s)

    def over_long() -> None:
        for length in (0x7FFFFFFF, 0xFFFFFFFF, 65545, 1 << 20):
            with raw(abuse) as s:
                s.sendall(INIT + HDR.pack(7, 0, length) + b"\x00" * 100)
                out = read_until_eof(s)  # the daemon closes on its own: no SHUT_WR
                assert out.startswith(encode_vsc(VscInit(0)))

    def truncated_and_half() -> None:
        for cut in (1, 5, 11, 12, 20):
            with raw(abuse) as s:
                s.sendall((INIT + frame(7, 0, H("80e4000004")))[: 24 + cut])
        for _ in range(10):
            with raw(abuse) as s:
                s.sendall(HDR.pack(7, 0, 5000) + b"x" * 100)  # half a frame, then gone

    def slowloris() -> None:
        with raw(slow) as s:
            msg = INIT + ACK + ACK + frame(7, 0, H("80e0000003414243"))
            for b in msg:
                s.send(bytes([b]))
                time.sleep(0.01)
            want = frame(7, 0, H("4142439000"))
            got = b""
            while not got.endswith(want):
                chunk = s.recv(4096)
                assert chunk, got.hex()
                got += chunk

    def storm() -> None:
        for _ in range(200):
            s = raw(abuse)
            s.close()

    run_threads([random_garbage, over_long, truncated_and_half, slowloris, storm])
    for g in good:
        g.wait_count(g.count + 20)  # still flowing after the abuse
    counts = [g.finish() for g in good]
    assert all(c > 20 for c in counts)
    messages = [r.getMessage() for r in caplog.records]
    assert any("closing: malformed VSCard stream" in m and "length" in m for m in messages)
    no_thread_died(caplog)
    # the daemon still serves new sessions and answers its control socket
    with FakeQemu.connect(abuse) as fake:
        fake.wait_card()
        echo(fake, b"after")
    wait_for(lambda: control_request(ctl, {"cmd": "stats"})["sessions"] == 0,
             "every session to end")
    listing = control_request(ctl, {"cmd": "list"})
    assert [vm["connected"] for vm in listing] == [False] * 5
    assert [vm["pending"] for vm in listing] == [0] * 5
    assert [vm["sessions_total"] for vm in listing[:3]] == [1, 1, 1]


def test_non_reading_peer_is_bounded_and_does_not_block_others(
    tmp: Path, daemons: list[RunningDaemon], caplog: pytest.LogCaptureFixture
) -> None:
    a, b = UnixAddress(tmp / "good.sock"), UnixAddress(tmp / "hog.sock")
    d = serve(listen=[a, b])
    daemons.append(d)
    good = GoodSession(a, 1)
    hog = raw(b)
    hog.sendall(INIT + ACK + ACK)  # handshake, reader 0 added, ATR acknowledged
    apdu = frame(7, 0, H("80e00000ff") + b"z" * 255)  # each answered with 257 bytes
    hog.setblocking(False)
    sent = 0
    stuck_since: float | None = None
    while sent < (64 << 20):
        try:
            sent += hog.send(apdu * 64)
            stuck_since = None
        except BlockingIOError:
            # our send buffer is full: the daemon stopped reading us (or is very slow)
            now = time.monotonic()
            stuck_since = stuck_since or now
            if now - stuck_since > 0.5:
                break
            time.sleep(0.01)
    assert sent < (64 << 20), "the daemon kept reading a peer that never reads"
    good.wait_count(good.count + 50)  # other sessions keep flowing
    buffered = [vm["buffered"] for vm in d.request({"cmd": "list"})]
    assert buffered[0] == 0 and 0 < buffered[1] < (1 << 20), buffered
    hog.close()
    good.finish()
    no_thread_died(caplog)


# ----------------------------------------------------------------------------- control socket


def control_lines(addr: UnixAddress, lines: list[bytes]) -> list[dict[str, Any]]:
    """Send raw request lines on one control connection; the JSON answers (one per line)."""
    with raw(addr, timeout=10) as s:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            # (the daemon hangs up on a line that is too long while we still send it)
            for line in lines:
                s.sendall(line)
            s.shutdown(socket.SHUT_WR)
        data = read_until_eof(s)
    return [json.loads(x) for x in data.splitlines()]


def test_control_abuse_during_traffic_keeps_card_state(
    tmp: Path, daemons: list[RunningDaemon], caplog: pytest.LogCaptureFixture
) -> None:
    addr = UnixAddress(tmp / "vm.sock")
    ctl = UnixAddress(tmp / "ctl.sock")
    d = serve(listen=[addr], control=ctl, cards=["gated:"])
    daemons.append(d)
    fake = FakeQemu.connect(addr)
    fake.wait_card()
    sid = control_request(ctl, {"cmd": "list"})[0]["session"]
    before = int.from_bytes(fake.transmit(COUNT)[:4], "big")

    answers = control_lines(ctl, [
        b"garbage\n", b"\xff\xfe\n", b"[1, 2]\n", b"{}\n", b'{"cmd": "explode"}\n',
        b'{"cmd": "remove", "session": "1"}\n', b'{"cmd": "remove", "session": true}\n',
        json.dumps({"cmd": "remove", "session": sid, "reader": 7}).encode() + b"\n",
        json.dumps({"cmd": "insert", "session": sid}).encode() + b"\n",  # already has one
        json.dumps({"cmd": "insert", "session": sid, "card": "nosuch:"}).encode() + b"\n",
        json.dumps({"cmd": "insert", "session": sid, "card": 5}).encode() + b"\n",
        b'{"cmd": "stats"}\n',
    ])
    assert [a["ok"] for a in answers] == [False] * 11 + [True]
    assert all(isinstance(a["error"], str) and a["error"] for a in answers[:11])
    # a line over the limit: a clear error (that reaches the client: the daemon skips the
    # rest of the line instead of hanging up with it unread) and the connection goes on
    huge = control_lines(ctl, [
        b'{"cmd": "' + b"x" * (2 << 20) + b'"}\n', b'{"cmd": "stats"}\n',
        b"y" * (3 << 20),  # and one without a newline before the end
    ])
    assert huge[0] == {"ok": False, "error": "request line too long"}
    assert huge[1]["ok"] is True and huge[1]["result"]["sessions"] == 1
    assert huge[2] == {"ok": False, "error": "request line too long"}
    assert len(huge) == 3
    # nothing above touched the card: its APDU counter went on from where it was
    assert fake.transmit(COUNT)[:4] == (before + 1).to_bytes(4, "big")

    # remove/insert spam while the guest's APDUs are with the (slow, blocking) card: every
    # other round waits (an event, no timing) until a guest APDU is in the card, so that
    # its removal waits for an answer owed; the rounds between come at any moment
    results: list[bytes | str] = []
    unexpected: list[BaseException] = []
    stop = threading.Event()

    def guest() -> None:
        while not stop.is_set():
            try:
                results.append(fake.transmit(H("80ef0000"), timeout=10))
            except CardError as exc:  # no card at that moment: the transmit fails
                results.append(str(exc))
                time.sleep(0.005)
            except BaseException as exc:  # (a lost answer: the guest's transmit times out)
                unexpected.append(exc)
                return

    def spam() -> None:
        IN_CARD.clear()
        for i in range(60):
            if i % 2 == 0:
                assert IN_CARD.wait(30), "no guest APDU reached the card"
            for cmd in ("remove", "insert"):
                with contextlib.suppress(ControlError):
                    control_request(ctl, {"cmd": cmd, "session": sid})
            IN_CARD.clear()
            if i % 10 == 0:
                control_lines(ctl, [b"junk\n", b'{"cmd": "list"}\n'])

    g = threading.Thread(target=guest, daemon=True)
    g.start()
    run_threads([spam], timeout=120)
    stop.set()
    g.join(15)
    assert not g.is_alive()
    assert unexpected == []
    assert results and H("9000") in results
    # every exchange ended in an answer, a refusal, or QEMU's empty answer when a guest
    # APDU crossed a CardRemove on the wire (the guest sent it after the daemon had removed
    # the card): never anything else
    assert all(r == H("9000") or isinstance(r, str) or r == b"" for r in results), results
    removes = [m for m in fake.received if isinstance(m, VscCardRemove)]
    assert len(removes) >= 30  # one at least for each round that met a guest APDU in the card
    assert results.count(b"") <= len(removes)
    # the daemon's own rule: no APDU response after a CardRemove until the card is back
    # (QEMU drops a response that follows a CardRemove), whatever the interleaving
    removed = False
    for message in fake.received:
        if isinstance(message, VscCardRemove):
            removed = True
        elif isinstance(message, VscAtr):
            removed = False
        elif isinstance(message, VscApdu):
            assert not removed, "an APDU response came after a CardRemove"
    if not fake.card_present():
        with contextlib.suppress(ControlError):  # the spam may have left it out
            control_request(ctl, {"cmd": "insert", "session": sid})
    fake.wait_card()
    count = int.from_bytes(fake.transmit(COUNT)[:4], "big")
    assert count > before + 1  # the same card (state kept) saw every APDU
    fake.close()
    no_thread_died(caplog)


# ----------------------------------------------------------------------------- no head-of-line


def test_slow_card_sessions_do_not_delay_another_session(
    tmp: Path, daemons: list[RunningDaemon]
) -> None:
    """20 VMs whose (blocking) card is stuck mid-APDU; another VM's card answers."""
    addrs = [UnixAddress(tmp / f"vm{i}.sock") for i in range(21)]
    d = serve(listen=addrs, cards=["gated:"])
    daemons.append(d)
    stuck = [FakeQemu.connect(addr) for addr in addrs[:20]]
    answers: list[bytes] = []
    lock = threading.Lock()

    def stuck_apdu(fake: FakeQemu) -> Callable[[], None]:
        def run() -> None:
            r = fake.transmit(H("80ee0000"), timeout=30)
            with lock:
                answers.append(r)
        return run

    threads = []
    for fake in stuck:
        fake.wait_card()
        t = threading.Thread(target=stuck_apdu(fake), daemon=True)
        t.start()
        threads.append(t)
    try:
        with FakeQemu.connect(addrs[20]) as fast:
            fast.wait_card(timeout=10)
            for i in range(100):
                echo(fast, i.to_bytes(2, "big"), timeout=10)
            assert not answers  # all 100 done while the slow cards are mid-APDU
    finally:
        TRANSMIT_GATE.set()
    for t in threads:
        t.join(30)
    assert answers == [H("9000")] * 20
    for fake in stuck:
        fake.close()


def test_attaching_a_vm_whose_card_opens_slowly_does_not_stall_the_others(
    tmp: Path, daemons: list[RunningDaemon]
) -> None:
    """Opening a card for ``ctl attach`` (PIV: tens of ms) happens off the loop thread."""
    addr, new = UnixAddress(tmp / "vm.sock"), UnixAddress(tmp / "new.sock")
    ctl = UnixAddress(tmp / "ctl.sock")
    daemons.append(serve(listen=[addr], control=ctl))
    good = GoodSession(addr, 7)
    OPEN_ARMED.set()
    attached: list[Any] = []
    t = threading.Thread(target=lambda: attached.append(control_request(
        ctl, {"cmd": "attach", "vm": "late", "listen": str(new), "cards": ["slowopen:"]},
        timeout=30)), daemon=True)
    t.start()
    try:
        assert OPENS_BLOCKED.acquire(timeout=10)  # a card open is under way (and stuck)
        good.wait_count(good.count + 50)
        assert attached == []
    finally:
        OPEN_GATE.set()
    t.join(30)
    assert attached and attached[0]["vm"] == "late" and attached[0]["listening"]
    with FakeQemu.connect(new) as fake:
        fake.wait_card()
        echo(fake, b"late")
    good.finish()


# ----------------------------------------------------------------------------- --connect


def test_connect_mode_backs_off_from_a_peer_that_hangs_up(
    tmp: Path, daemons: list[RunningDaemon]
) -> None:
    """A chardev server that accepts and hangs up at once: the retries slow down, doubling
    from 0.1 s (lower bounds only: a loaded machine can only make them later)."""
    addr = UnixAddress(tmp / "qemu.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(addr.path))
    listener.listen(16)
    listener.settimeout(30)
    d = serve(connect=[addr])
    daemons.append(d)
    times = []
    for _ in range(5):
        conn, _ = listener.accept()
        times.append(time.monotonic())
        conn.close()
    listener.close()
    addr.path.unlink()
    gaps = [b - a for a, b in itertools.pairwise(times)]
    for gap, least in zip(gaps, (0.1, 0.2, 0.4, 0.8), strict=True):
        assert gap >= least * 0.9, gaps  # fixed 0.1 s retries would fail from the second
    with FakeQemu.listen(addr) as qemu:
        fake = qemu.accept(timeout=30)
        with fake:
            fake.wait_card()
            echo(fake, b"recovered")


def test_connect_mode_backoff_resets_after_a_good_session(
    tmp: Path, daemons: list[RunningDaemon]
) -> None:
    """QEMU restarts eight times: each time the daemon is back within the first backoff step
    (eight steps would add up to over 9 s without the reset, 0.8 s with it)."""
    addr = UnixAddress(tmp / "qemu.sock")
    with FakeQemu.listen(addr) as qemu:
        d = serve(connect=[addr])
        daemons.append(d)
        fake = qemu.accept(timeout=30)
        waited = 0.0
        for i in range(8):
            fake.wait_card()
            echo(fake, bytes([i]))
            t0 = time.monotonic()
            fake.close()
            fake = qemu.accept(timeout=30)
            waited += time.monotonic() - t0
        fake.close()
        assert waited < 6.0, waited


# ----------------------------------------------------------------------------- the real CLI


def test_real_serve_survives_abuse_and_exits_0_on_sigterm(tmp: Path) -> None:
    addr, abuse = UnixAddress(tmp / "vm.sock"), UnixAddress(tmp / "abuse.sock")
    ctl = UnixAddress(tmp / "ctl.sock")
    log_path = tmp / "serve.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vmc", "serve", "--listen", str(addr), "--listen", str(abuse),
             "--card", "test:", "--control", str(ctl)],
            stderr=log_file,
        )
    try:
        deadline = time.monotonic() + 20
        while not (addr.path.exists() and ctl.path.exists()):
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "serve did not start"
            time.sleep(0.05)
        good = GoodSession(addr, 3)
        rng = random.Random(99)
        for _ in range(30):
            with raw(abuse) as s:
                s.sendall(rng.choice([
                    rng.randbytes(64), HDR.pack(7, 0, 0xFFFFFFF0), INIT + b"\x00\x00",
                ]))
                s.shutdown(socket.SHUT_WR)
                read_until_eof(s)
        for _ in range(100):
            raw(abuse).close()
        answers = control_lines(ctl, [b"nonsense\n", b'{"cmd": "stats"}\n'])
        assert answers[0]["ok"] is False and answers[1]["ok"] is True
        good.wait_count(good.count + 20)
        assert good.finish() > 20
        wait_for(lambda: not any(vm["connected"] for vm in control_request(
            ctl, {"cmd": "list"})), "every session to end")
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        text = log_path.read_text()
        assert "Traceback" not in text and "unexpected error" not in text, text
        assert "malformed VSCard stream" in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_control_insert_opens_the_new_card_without_stalling_sessions(
    tmp: Path, daemons: list[RunningDaemon]
) -> None:
    addr, second = UnixAddress(tmp / "vm.sock"), UnixAddress(tmp / "other.sock")
    ctl = UnixAddress(tmp / "ctl.sock")
    daemons.append(serve(listen=[addr, second], control=ctl))
    good = GoodSession(addr, 9)
    with FakeQemu.connect(second) as other:
        other.wait_card()
        sid = control_request(ctl, {"cmd": "list"})[1]["session"]
        control_request(ctl, {"cmd": "remove", "session": sid})
        other.wait_removed()
        OPEN_ARMED.set()
        inserted: list[Any] = []
        t = threading.Thread(target=lambda: inserted.append(control_request(
            ctl, {"cmd": "insert", "session": sid, "card": "slowopen:x"}, timeout=30)),
            daemon=True)
        t.start()
        try:
            assert OPENS_BLOCKED.acquire(timeout=10)  # the new card is being opened
            good.wait_count(good.count + 50)  # meanwhile other sessions' APDUs flow
        finally:
            OPEN_GATE.set()
        t.join(10)
        assert inserted and inserted[0]["readers"][0]["card"] == "built-in test card (x)"
        other.wait_card()
        echo(other, b"new card")
    good.finish()
