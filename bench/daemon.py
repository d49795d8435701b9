"""Benchmark ``ccidemu serve`` (run by hand): ``.venv/bin/python -m bench.daemon``.

1. Single session over a unix socket: APDU round trips per second and p50/p99 latency through
   ``ccidemu serve --listen`` (test card), against a minimal raw-socket VSCard responder that
   answers every APDU with 9000 (no framework), measured in the same run with the same driver.
   Two drivers play QEMU (chardev client): one with raw VSCard frames (the leanest client,
   so the daemon's own cost shows most), one with the harness's QEMU side (vmc.fakeqemu's
   sans-I/O core: each APDU a CCID XfrBlock, as from a guest).  The driver and both peers
   are pinned to one CPU for these rounds (``--no-pin`` to not): on a VM a cross-CPU wake-up
   costs tens of microseconds and the scheduler places the processes differently from run to
   run, so unpinned figures are bimodal (5 or 60 us per round trip) and say nothing about our
   code.
2. Load: N concurrent sessions x M APDUs each (asyncio VSCard clients), every APDU an echo
   (``80 E0``, test card) carrying a payload unique to (session, index): any lost or misrouted
   response is detected.  Aggregate rate, p99 latency, the daemon's RSS.

Figures go into docs/PERFORMANCE.md, section "Daemon".
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ccidemu.ccid import CcidDataBlock, CcidIccPowerOn, CcidMessage, CcidXfrBlock
from vmc.fakeqemu import FakeQemuCore

_HDR = struct.Struct(">III")
_INIT = 1
_ERROR = 2
_READER_ADD = 3
_ATR = 5
_APDU = 7
_INIT_PAYLOAD = b"VSCD" + struct.pack(">II", 2, 0)
_OK = struct.pack(">I", 0)
_BARE_APDU = bytes.fromhex("80e00000")  # test card: 9000, no data (same size as the echo peer)


def _frame(type_: int, reader_id: int, payload: bytes = b"") -> bytes:
    return _HDR.pack(type_, reader_id, len(payload)) + payload


def _recv_exact(sock: socket.socket, n: int, buf: bytearray) -> bytes:
    while len(buf) < n:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("peer closed")
        buf += chunk
    out = bytes(buf[:n])
    del buf[:n]
    return out


def _recv_frame(sock: socket.socket, buf: bytearray) -> tuple[int, int, bytes]:
    type_, reader_id, length = _HDR.unpack(_recv_exact(sock, 12, buf))
    return type_, reader_id, _recv_exact(sock, length, buf)


# ------------------------------------------------------------------ the raw echo peer (card side)


def echo_peer(path: str) -> None:
    """A card-side VSCard responder with no framework: Init, ReaderAdd, ATR, APDU -> 9000.

    Serves one connection after the other (one per measuring round).
    """
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    print("ready", flush=True)
    answer = _frame(_APDU, 0, b"\x90\x00")
    while True:
        conn, _ = srv.accept()
        buf = bytearray()
        conn.sendall(_frame(_INIT, 0, _INIT_PAYLOAD))
        added = False
        atr_sent = False
        try:
            while True:
                type_, _, _ = _recv_frame(conn, buf)
                if type_ == _APDU:
                    conn.sendall(answer)
                elif type_ == _INIT and not added:
                    added = True
                    conn.sendall(_frame(_READER_ADD, 0, b"echo"))
                elif type_ == _ERROR and not atr_sent:
                    atr_sent = True
                    conn.sendall(_frame(_ATR, 0, bytes.fromhex("3b00")))
        except ConnectionError:
            conn.close()


# ------------------------------------------------------------------ the QEMU-side driver


def _handshake(sock: socket.socket, buf: bytearray) -> None:
    """Play QEMU as chardev client: unsolicited Init, answer Init, ack ReaderAdd and ATR."""
    sock.sendall(_frame(_INIT, 0xFFFFFFFF, _INIT_PAYLOAD))
    while True:
        type_, reader_id, _ = _recv_frame(sock, buf)
        if type_ == _INIT:
            sock.sendall(_frame(_INIT, 0xFFFFFFFF, _INIT_PAYLOAD))
        elif type_ == _READER_ADD:
            sock.sendall(_frame(_ERROR, 0, _OK))
        elif type_ == _ATR:
            sock.sendall(_frame(_ERROR, reader_id, _OK))
            return


def _connect(path: str, timeout: float = 10.0) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.connect(path)
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def single_session(path: str, count: int) -> tuple[float, float, float]:
    """(round trips per second, p50 us, p99 us) for ``count`` APDUs on one session."""
    sock = _connect(path)
    buf = bytearray()
    _handshake(sock, buf)
    frame = _frame(_APDU, 0, _BARE_APDU)
    lat: list[int] = []
    for _ in range(200):  # warm-up
        sock.sendall(frame)
        _recv_frame(sock, buf)
    start = time.perf_counter()
    for _ in range(count):
        t0 = time.perf_counter_ns()
        sock.sendall(frame)
        type_, _, data = _recv_frame(sock, buf)
        lat.append(time.perf_counter_ns() - t0)
        if type_ != _APDU or data != b"\x90\x00":
            raise AssertionError(f"bad answer {type_} {data.hex()}")
    elapsed = time.perf_counter() - start
    sock.close()
    lat.sort()
    return count / elapsed, lat[len(lat) // 2] / 1000, lat[int(len(lat) * 0.99)] / 1000


def single_session_harness(path: str, count: int) -> tuple[float, float, float]:
    """As :func:`single_session`, driven by the harness's QEMU side (vmc.fakeqemu).

    ``FakeQemuCore`` plays ccid-card-passthru and the usb-ccid slot in this thread: every APDU
    goes in as a CCID XfrBlock, over VSCard to the card side, and back as a DataBlock, as a
    guest's would.  No reader thread: the core is sans-I/O and this loop does the socket.
    """
    core = FakeQemuCore("client")
    sock = _connect(path)

    def exchange(until: Callable[[], CcidMessage | bool | None]) -> CcidMessage | bool:
        while True:
            out = core.data_to_send()
            if out:
                sock.sendall(out)
            got = until()
            if got:
                return got
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("card side closed")
            core.receive_data(data)

    def data_block() -> CcidMessage | None:
        while (msg := core.next_ccid()) is not None:
            if isinstance(msg, CcidDataBlock):
                return msg
        return None

    core.connected()
    exchange(core.card_present)
    core.send_ccid(CcidIccPowerOn(0, 0))
    exchange(data_block)
    lat: list[int] = []
    seq = 1
    for i in range(200 + count):  # 200 warm-up exchanges first
        if i == 200:
            start = time.perf_counter()
        t0 = time.perf_counter_ns()
        core.send_ccid(CcidXfrBlock(0, seq, _BARE_APDU))
        answer = exchange(data_block)
        if i >= 200:
            lat.append(time.perf_counter_ns() - t0)
        if not isinstance(answer, CcidDataBlock) or answer.data != b"\x90\x00":
            raise AssertionError(f"bad answer {answer}")
        seq = (seq + 1) & 0xFF
        if i % 1000 == 0:  # the core records every message for tests; keep the bench flat
            core.received.clear()
            core.sent.clear()
    elapsed = time.perf_counter() - start
    sock.close()
    lat.sort()
    return count / elapsed, lat[len(lat) // 2] / 1000, lat[int(len(lat) * 0.99)] / 1000


# ------------------------------------------------------------------ load: many sessions


async def _load_session(path: str, n: int, count: int, lat: list[int]) -> int:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(_frame(_INIT, 0xFFFFFFFF, _INIT_PAYLOAD))

    async def frame() -> tuple[int, int, bytes]:
        type_, reader_id, length = _HDR.unpack(await reader.readexactly(12))
        return type_, reader_id, await reader.readexactly(length)

    while True:
        type_, reader_id, _ = await frame()
        if type_ == _INIT:
            writer.write(_frame(_INIT, 0xFFFFFFFF, _INIT_PAYLOAD))
        elif type_ == _READER_ADD:
            writer.write(_frame(_ERROR, 0, _OK))
        elif type_ == _ATR:
            writer.write(_frame(_ERROR, reader_id, _OK))
            break
    bad = 0
    for i in range(count):
        payload = struct.pack(">HI", n, i) * 4  # unique to (session, index)
        t0 = time.perf_counter_ns()
        writer.write(_frame(_APDU, 0, b"\x80\xe0\x00\x00" + bytes([len(payload)]) + payload))
        type_, _, data = await frame()
        lat.append(time.perf_counter_ns() - t0)
        if type_ != _APDU or data != payload + b"\x90\x00":
            bad += 1
    writer.close()
    return bad


async def load(path: str, sessions: int, count: int) -> tuple[float, float, float, int]:
    """(aggregate rate, p50 us, p99 us, wrong or lost answers)."""
    lat: list[int] = []
    start = time.perf_counter()
    results = await asyncio.gather(
        *(_load_session(path, n, count, lat) for n in range(sessions)), return_exceptions=True
    )
    elapsed = time.perf_counter() - start
    bad = sum(r if isinstance(r, int) else count for r in results)
    lat.sort()
    done = len(lat)
    return done / elapsed, lat[done // 2] / 1000, lat[int(done * 0.99)] / 1000, bad


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _pin(pid: int, cpus: set[int]) -> None:
    """Set the CPU affinity of every thread of process ``pid``."""
    for task in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(task), cpus)


def _start_serve(path: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "vmc", "-q", "serve", "--listen", f"unix:{path}",
         "--card", "test:", "--control", "none"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--echo-peer", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=10000, help="APDUs, single session")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--per-session", type=int, default=1000)
    parser.add_argument("--cpu", type=int, help="CPU for the single-session rounds "
                        "(default: the last one the bench may use)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the single-session "
                        "rounds to one CPU")
    args = parser.parse_args()
    if args.echo_peer:
        echo_peer(args.echo_peer)
        return
    with tempfile.TemporaryDirectory(prefix="ccidemu-bench-") as tmp:
        echo_path = os.path.join(tmp, "echo.sock")
        peer = subprocess.Popen(
            [sys.executable, __file__, "--echo-peer", echo_path], stdout=subprocess.PIPE
        )
        assert peer.stdout is not None
        peer.stdout.readline()
        path = os.path.join(tmp, "vm.sock")
        serve = _start_serve(path)
        all_cpus = os.sched_getaffinity(0)
        pinned = {args.cpu if args.cpu is not None else max(all_cpus)}
        try:
            _connect(path).close()  # the daemon is up (and its threads exist)
            if not args.no_pin:
                for pid in (os.getpid(), peer.pid, serve.pid):
                    _pin(pid, pinned)
            # Alternate rounds (the CPUs are shared): the best round of each is reported.
            echo_runs, serve_runs, h_echo_runs, h_serve_runs = [], [], [], []
            for _ in range(args.rounds):
                echo_runs.append(single_session(echo_path, args.count))
                serve_runs.append(single_session(path, args.count))
                h_echo_runs.append(single_session_harness(echo_path, args.count))
                h_serve_runs.append(single_session_harness(path, args.count))
            e_rate, e_p50, e_p99 = max(echo_runs)
            d_rate, d_p50, d_p99 = max(serve_runs)
            he_rate, he_p50, he_p99 = max(h_echo_runs)
            hd_rate, hd_p50, hd_p99 = max(h_serve_runs)
            for pid in (os.getpid(), peer.pid, serve.pid):
                _pin(pid, all_cpus)
            where = "unpinned" if args.no_pin else f"all on CPU {min(pinned)}"
            print(f"single session, {args.count} APDUs over a unix socket, best of "
                  f"{args.rounds} alternating rounds ({where}):")
            print(f"  raw echo peer : {e_rate:8.0f} APDU/s  p50 {e_p50:6.1f} us  "
                  f"p99 {e_p99:6.1f} us")
            print(f"  ccidemu serve : {d_rate:8.0f} APDU/s  p50 {d_p50:6.1f} us  "
                  f"p99 {d_p99:6.1f} us")
            print(f"  ratio         : {d_rate / e_rate:.2f} (target >= 0.70); ratio of p50 "
                  f"latencies {e_p50 / d_p50:.2f}")
            print("  driven by the harness's QEMU side (vmc.fakeqemu: CCID XfrBlock -> VSCard):")
            print(f"  raw echo peer : {he_rate:8.0f} APDU/s  p50 {he_p50:6.1f} us  "
                  f"p99 {he_p99:6.1f} us")
            print(f"  ccidemu serve : {hd_rate:8.0f} APDU/s  p50 {hd_p50:6.1f} us  "
                  f"p99 {hd_p99:6.1f} us")
            print(f"  ratio         : {hd_rate / he_rate:.2f} (target >= 0.70); ratio of p50 "
                  f"latencies {he_p50 / hd_p50:.2f}")
            rss_idle = _rss_kib(serve.pid)
            rate, p50, p99, bad = asyncio.run(load(path, args.sessions, args.per_session))
            rss = _rss_kib(serve.pid)
            print(f"load, {args.sessions} sessions x {args.per_session} echo APDUs:")
            print(f"  aggregate     : {rate:8.0f} APDU/s  p50 {p50:6.1f} us  p99 {p99:6.1f} us")
            print(f"  lost/misrouted: {bad}")
            print(f"  daemon RSS    : {rss_idle / 1024:.1f} MiB idle, {rss / 1024:.1f} MiB "
                  "after the load")
        finally:
            serve.terminate()
            serve.wait(10)
            peer.kill()
            peer.wait(10)

if __name__ == "__main__":
    main()
