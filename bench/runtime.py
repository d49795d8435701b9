"""Benchmark the daemon's runtime with many VMs (run by hand): ``python -m bench.runtime``.

Every figure is a ratio or a bound measured against a baseline in the same run:

1. ``hol`` (head of line): VM B sends trivial SELECTs to the PIV card while VM A loops the
   heaviest card work: RSA-2048 decryption on 9D (raw RSA, non-type-1 blocks), then GENERATE
   RSA-2048.  B's p50/p99 latency and rate with A busy vs. alone.  Targets: p99 with A
   <= 2x without; rate with A >= 0.8x without.  A third figure is the machine's own share:
   B's p99 while a process that is not the daemon's does the same RSA work (cryptography's
   RSA-2048 decryptions, or key generations) in a loop, against B alone; on a 2-core
   machine that work alone takes one core from B and the daemon, whoever does it.  A fourth
   is A's decrypt traffic without the decryptions: trivial SELECTs paced at the rate A
   decrypted, which is what any busy neighbour costs B.
2. ``scale``: N VMs (default 1000), one session each, M echo APDUs per session (default
   1000), every answer checked (a payload unique to session and index); the aggregate rate
   against a one-process echo server (a selector loop that answers every APDU with its
   payload, no framework) driven by the same client code.  Targets: 0 lost or misrouted,
   rate >= 0.8x the echo server's, daemon RSS <= 60 MiB.
3. ``setup``: N VMs with the PIV card connecting at once: the time until the last has its
   ATR (target <= 5 s); then 500 connections that never send their Init stay open while a
   new VM connects: its time to ATR (target <= 1 s).

Figures go into docs/PERFORMANCE.md, section "Runtime".
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import selectors
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import padding

from ccidemu.apdu import CommandApdu
from ccidemu.cards.piv_files import load_certificate
from ccidemu.tlv import ber_encode

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "certs"
_HDR = struct.Struct(">III")
_INIT_PAYLOAD = b"VSCD" + struct.pack(">II", 2, 0)
_OK = struct.pack(">I", 0)
SELECT = bytes.fromhex("00a4040009a00000030800001000")
VERIFY = bytes.fromhex("0020008008") + b"123456\xff\xff"


def _frame(type_: int, reader_id: int, payload: bytes = b"") -> bytes:
    return _HDR.pack(type_, reader_id, len(payload)) + payload


def _raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _wait_paths(paths: list[Path], proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        if proc.poll() is not None:
            raise RuntimeError("ccidemu serve exited")
        if time.monotonic() > deadline:
            raise TimeoutError("ccidemu serve did not create its sockets")
        time.sleep(0.05)


def _serve(tmp: Path, names: list[str], card: str) -> tuple[subprocess.Popen[bytes], list[Path]]:
    lines = []
    paths = []
    for name in names:
        path = tmp / f"{name}.sock"
        paths.append(path)
        lines.append(f'[vm.{name}]\nlisten = "unix:{path}"\ncards = ["{card}"]\n')
    config = tmp / "serve.toml"
    config.write_text("\n".join(lines))
    proc = subprocess.Popen([sys.executable, "-m", "vmc", "-q", "serve", "--config", str(config),
                             "--control", "none"], preexec_fn=_raise_fd_limit)
    _wait_paths(paths, proc)
    return proc, paths


# ------------------------------------------------------------------ a VSCard client (QEMU's side)


class Client:
    """A blocking QEMU-side VSCard client: handshake, then one APDU at a time."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.buf = bytearray()
        self.sock.sendall(_frame(1, 0xFFFFFFFF, _INIT_PAYLOAD))
        while True:
            type_, reader_id, _ = self._recv()
            if type_ == 1:
                self.sock.sendall(_frame(1, 0xFFFFFFFF, _INIT_PAYLOAD))
            elif type_ == 3:
                self.sock.sendall(_frame(2, 0, _OK))
            elif type_ == 5:
                self.sock.sendall(_frame(2, reader_id, _OK))
                return

    def _recv(self) -> tuple[int, int, bytes]:
        while True:
            if len(self.buf) >= 12:
                type_, reader_id, length = _HDR.unpack_from(self.buf)
                if len(self.buf) >= 12 + length:
                    data = bytes(self.buf[12:12 + length])
                    del self.buf[:12 + length]
                    return type_, reader_id, data
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk

    def transmit(self, apdu: bytes) -> bytes:
        self.sock.sendall(_frame(7, 0, apdu))
        while True:
            type_, _, data = self._recv()
            if type_ == 7:
                return data
            if type_ == 2:
                raise RuntimeError("the daemon refused the APDU")

    def close(self) -> None:
        self.sock.close()


def _mutual_auth(client: Client) -> None:
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
    from cryptography.hazmat.primitives.ciphers import Cipher, modes

    key = bytes.fromhex("010203040506070801020304050607080102030405060708")
    out = client.transmit(bytes.fromhex("008703 9b04 7c028000".replace(" ", "")))
    encrypted = out[4:12]
    dec = Cipher(TripleDES(key), modes.ECB()).decryptor()
    witness = dec.update(encrypted) + dec.finalize()
    body = ber_encode(0x7C, ber_encode(0x80, witness) + ber_encode(0x81, os.urandom(8)))
    answer = client.transmit(CommandApdu(0, 0x87, 3, 0x9B, body, 256).encode())
    assert answer[-2:] == b"\x90\x00", answer.hex()


def _decrypt_apdu() -> bytes:
    public = load_certificate(FIXTURES / "9d.crt", "9d").public_key()
    ciphertext = public.encrypt(os.urandom(32), padding.PKCS1v15())  # type: ignore[union-attr]
    template = ber_encode(0x7C, ber_encode(0x82, b"") + ber_encode(0x81, ciphertext))
    return CommandApdu(0, 0x87, 0x07, 0x9D, template, 65536, extended=True).encode()


def _heavy_loop(path: Path, kind: str, ready: object, stop: object, done: object) -> None:
    """VM A: loop the heavy operation until ``stop`` (multiprocessing events); ``done``
    (a shared integer) counts the operations."""
    client = Client(path)
    client.transmit(SELECT)
    assert client.transmit(VERIFY) == b"\x90\x00"
    if kind == "decrypt":
        apdu = _decrypt_apdu()
    else:
        _mutual_auth(client)
        apdu = CommandApdu(0, 0x47, 0, 0x9A, bytes.fromhex("ac03800107"), 256).encode()
    answer = client.transmit(apdu)
    assert answer[-2:] in (b"\x90\x00", b"\x61\x00") or answer[-2] == 0x61, answer[-2:].hex()
    ready.set()  # type: ignore[attr-defined]
    count = 0
    while not stop.is_set():  # type: ignore[attr-defined]
        client.transmit(apdu)
        count += 1
    done.value = count  # type: ignore[attr-defined]
    client.close()


def _outside_loop(kind: str, ready: object, stop: object, done: object) -> None:
    """The same RSA work as VM A's, in a process of its own, with no daemon involved."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(65537, 2048)
    ciphertext = key.public_key().encrypt(os.urandom(32), padding.PKCS1v15())
    ready.set()  # type: ignore[attr-defined]
    while not stop.is_set():  # type: ignore[attr-defined]
        if kind == "decrypt":
            key.decrypt(ciphertext, padding.PKCS1v15())
        else:
            rsa.generate_private_key(65537, 2048)
        done.value += 1  # type: ignore[attr-defined]


def _paced_loop(path: Path, rate: float, ready: object, stop: object, done: object) -> None:
    """VM A sending trivial SELECTs at ``rate`` a second: the traffic of its heavy loop
    without the heavy work."""
    client = Client(path)
    client.transmit(SELECT)
    ready.set()  # type: ignore[attr-defined]
    interval = 1 / rate
    due = time.perf_counter()
    count = 0
    while not stop.is_set():  # type: ignore[attr-defined]
        client.transmit(SELECT)
        count += 1
        due += interval
        pause = due - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
    done.value = count  # type: ignore[attr-defined]
    client.close()


def _light(path: Path, seconds: float) -> tuple[float, float, float]:
    client = Client(path)
    for _ in range(200):
        client.transmit(SELECT)
    lat = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter_ns()
        if client.transmit(SELECT)[-2:] != b"\x90\x00":
            raise AssertionError("SELECT failed")
        lat.append(time.perf_counter_ns() - t0)
    client.close()
    lat.sort()
    return len(lat) / seconds, lat[len(lat) // 2] / 1000, lat[int(len(lat) * 0.99)] / 1000


def _best(runs: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    """Best of several rounds: highest rate, lowest p50 and p99 (the machine is shared)."""
    return max(r[0] for r in runs), min(r[1] for r in runs), min(r[2] for r in runs)


def head_of_line(seconds: float, rounds: int) -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="ccidemu-bench-") as name:
        tmp = Path(name)
        proc, (a, b) = _serve(tmp, ["a", "b"], "piv:")
        try:
            print(f"head of line: VM B SELECTs ({seconds:.0f} s rounds, best of {rounds} "
                  "alternating rounds), VM A heavy or idle")
            decrypt_rate = 0.0
            for kind in ("decrypt", "generate"):
                Runs = list[tuple[float, float, float]]
                alone_runs: Runs = []
                busy_runs: Runs = []
                outside_runs: Runs = []
                heavy_rate = {"daemon": 0.0, "outside": 0.0}
                for _ in range(rounds):
                    alone_runs.append(_light(b, seconds))
                    for where, runs, target, args in (
                            ("daemon", busy_runs, _heavy_loop, (a, kind)),
                            ("outside", outside_runs, _outside_loop, (kind,))):
                        ready, stop, done = ctx.Event(), ctx.Event(), ctx.Value("q", 0)
                        heavy = ctx.Process(target=target, args=(*args, ready, stop, done))
                        heavy.start()
                        if not ready.wait(60) or not heavy.is_alive():
                            heavy.terminate()
                            raise SystemExit(f"VM A ({kind}, {where}) did not start its loop")
                        t0 = time.perf_counter()
                        runs.append(_light(b, seconds))
                        if not heavy.is_alive():  # a busy round with an idle A means nothing
                            raise SystemExit(f"VM A ({kind}, {where}) died: {heavy.exitcode}")
                        elapsed = time.perf_counter() - t0
                        stop.set()
                        heavy.join(60)
                        if heavy.exitcode != 0:
                            heavy.terminate()
                            raise SystemExit(f"VM A ({kind}, {where}) ended with "
                                             f"{heavy.exitcode}")
                        heavy_rate[where] = max(heavy_rate[where], done.value / elapsed)
                alone, busy = _best(alone_runs), _best(busy_runs)
                outside = _best(outside_runs)
                print(f"  A {kind:8}: B {busy[0]:7.0f}/s p50 {busy[1]:6.1f} us p99 "
                      f"{busy[2]:7.1f} us; alone {alone[0]:7.0f}/s p50 {alone[1]:6.1f} us p99 "
                      f"{alone[2]:7.1f} us; p99 ratio {busy[2] / alone[2]:.2f} (target <= 2), "
                      f"rate ratio {busy[0] / alone[0]:.2f} (target >= 0.8)")
                print(f"    A's {kind}s: {heavy_rate['daemon']:.0f}/s through the daemon, "
                      f"{heavy_rate['outside']:.0f}/s outside it")
                print(f"    the same RSA work outside the daemon: B p99 {outside[2]:7.1f} us, "
                      f"ratio {outside[2] / alone[2]:.2f}, rate ratio {outside[0] / alone[0]:.2f}"
                      f"; A in the daemon vs. outside: p99 {busy[2] / outside[2]:.2f}")
                if kind == "decrypt":
                    decrypt_rate = heavy_rate["daemon"]
            if decrypt_rate:
                # A's decrypt traffic without the decryptions: what a busy neighbour costs.
                alone_runs, paced_runs = [], []
                sent = 0.0
                for _ in range(rounds):
                    alone_runs.append(_light(b, seconds))
                    ready, stop, done = ctx.Event(), ctx.Event(), ctx.Value("q", 0)
                    paced = ctx.Process(target=_paced_loop,
                                        args=(a, decrypt_rate, ready, stop, done))
                    paced.start()
                    if not ready.wait(60):
                        paced.terminate()
                        raise SystemExit("VM A (paced SELECTs) did not start")
                    t0 = time.perf_counter()
                    paced_runs.append(_light(b, seconds))
                    elapsed = time.perf_counter() - t0
                    stop.set()
                    paced.join(60)
                    sent = max(sent, done.value / elapsed)
                alone, paced_best = _best(alone_runs), _best(paced_runs)
                print(f"  A SELECTs paced at {decrypt_rate:.0f}/s (sent {sent:.0f}/s): B p99 "
                      f"{paced_best[2]:7.1f} us; alone {alone[2]:7.1f} us; p99 ratio "
                      f"{paced_best[2] / alone[2]:.2f}, rate ratio {paced_best[0] / alone[0]:.2f}")
        finally:
            proc.terminate()
            proc.wait(30)


# ------------------------------------------------------------------ scale


def echo_server(path: str) -> None:
    """The baseline: one process, a selector loop, VSCard framing, every APDU echoed."""
    _raise_fd_limit()
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(4096)
    srv.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(srv, selectors.EVENT_READ, None)
    bufs: dict[socket.socket, bytearray] = {}
    stage: dict[socket.socket, int] = {}  # 0: wait Init, 1: wait ReaderAdd ack, 2: ATR sent
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            if key.data is None:
                conn, _ = srv.accept()
                conn.setblocking(False)
                bufs[conn] = bytearray()
                stage[conn] = 0
                sel.register(conn, selectors.EVENT_READ, True)
                conn.sendall(_frame(1, 0, _INIT_PAYLOAD))
                continue
            conn = key.fileobj  # type: ignore[assignment]
            data = conn.recv(65536)
            if not data:
                sel.unregister(conn)
                conn.close()
                del bufs[conn], stage[conn]
                continue
            buf = bufs[conn]
            buf += data
            out = bytearray()
            while len(buf) >= 12:
                type_, _reader_id, length = _HDR.unpack_from(buf)
                if len(buf) < 12 + length:
                    break
                payload = bytes(buf[12:12 + length])
                del buf[:12 + length]
                if type_ == 7:  # echo: the data field of 80 E0 00 00 Lc data, + 9000
                    out += _frame(7, 0, payload[5:] + b"\x90\x00")
                elif type_ == 1 and stage[conn] == 0:
                    stage[conn] = 1
                    out += _frame(3, 0, b"echo")
                elif type_ == 2 and stage[conn] == 1:
                    stage[conn] = 2
                    out += _frame(5, 0, bytes.fromhex("3b00"))
            if out:
                conn.sendall(out)


async def _session(path: Path, n: int, count: int, lat: list[int]) -> int:
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(_frame(1, 0xFFFFFFFF, _INIT_PAYLOAD))

    async def frame() -> tuple[int, int, bytes]:
        type_, reader_id, length = _HDR.unpack(await reader.readexactly(12))
        return type_, reader_id, await reader.readexactly(length)

    inits = 0
    while True:
        type_, reader_id, _ = await frame()
        if type_ == 1 and inits == 0:
            inits += 1
            writer.write(_frame(1, 0xFFFFFFFF, _INIT_PAYLOAD))
        elif type_ == 3:
            writer.write(_frame(2, 0, _OK))
        elif type_ == 5:
            writer.write(_frame(2, reader_id, _OK))
            break
    bad = 0
    for i in range(count):
        payload = struct.pack(">HI", n, i) * 4  # unique to (session, index)
        t0 = time.perf_counter_ns()
        writer.write(_frame(7, 0, b"\x80\xe0\x00\x00" + bytes([len(payload)]) + payload))
        while True:
            type_, _, data = await frame()
            if type_ == 7:
                break
        lat.append(time.perf_counter_ns() - t0)
        if data != payload + b"\x90\x00":
            bad += 1
    writer.close()
    return bad


async def _load(paths: list[Path], count: int) -> tuple[float, float, int]:
    lat: list[int] = []
    start = time.perf_counter()
    results = await asyncio.gather(*(_session(p, n, count, lat) for n, p in enumerate(paths)),
                                   return_exceptions=True)
    elapsed = time.perf_counter() - start
    bad = sum(r if isinstance(r, int) else count for r in results)
    lat.sort()
    return len(lat) / elapsed, lat[int(len(lat) * 0.99)] / 1000 if lat else 0.0, bad


def scale(vms: int, count: int) -> None:
    _raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="ccidemu-bench-") as name:
        tmp = Path(name)
        echo_path = tmp / "echo.sock"
        peer = subprocess.Popen([sys.executable, __file__, "--echo-server", str(echo_path)],
                                stdout=subprocess.PIPE)
        assert peer.stdout is not None
        peer.stdout.readline()
        proc, paths = _serve(tmp, [f"v{i}" for i in range(vms)], "test:")
        try:
            idle = _rss_mib(proc.pid)
            base_rate, base_p99, base_bad = asyncio.run(_load([echo_path] * vms, count))
            rate, p99, bad = asyncio.run(_load(paths, count))
            rss = _rss_mib(proc.pid)
            print(f"scale: {vms} VMs x {count} echo APDUs, one session each")
            print(f"  one-process echo server: {base_rate:8.0f} APDU/s  p99 {base_p99:8.1f} us"
                  f"  lost/misrouted {base_bad}")
            print(f"  ccidemu serve          : {rate:8.0f} APDU/s  p99 {p99:8.1f} us  "
                  f"lost/misrouted {bad}")
            print(f"  ratio {rate / base_rate:.2f} (target >= 0.8); daemon RSS {idle:.1f} MiB "
                  f"idle, {rss:.1f} MiB under load (target <= 60)")
        finally:
            proc.terminate()
            proc.wait(60)
            peer.kill()
            peer.wait(10)


# ------------------------------------------------------------------ setup


async def _to_atr(path: Path) -> float:
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(_frame(1, 0xFFFFFFFF, _INIT_PAYLOAD))
    while True:
        type_, reader_id, length = _HDR.unpack(await reader.readexactly(12))
        await reader.readexactly(length)
        if type_ == 3:
            writer.write(_frame(2, 0, _OK))
        elif type_ == 5:
            elapsed = time.perf_counter() - t0
            writer.write(_frame(2, reader_id, _OK))
            writer.close()
            return elapsed


def setup(vms: int, pending: int) -> None:
    _raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="ccidemu-bench-") as name:
        tmp = Path(name)
        t0 = time.perf_counter()
        proc, paths = _serve(tmp, [f"v{i}" for i in range(vms + 1)], "piv:")
        started = time.perf_counter() - t0
        try:
            rss = _rss_mib(proc.pid)

            async def all_at_once() -> tuple[float, float]:
                t = time.perf_counter()
                times = await asyncio.gather(*(_to_atr(p) for p in paths[:vms]))
                return time.perf_counter() - t, max(times)

            wall, worst = asyncio.run(all_at_once())
            print(f"setup: {vms} VMs with the PIV card (daemon start {started:.1f} s, "
                  f"RSS {rss:.1f} MiB)")
            print(f"  all connecting at once: the last ATR after {wall:.2f} s "
                  f"(slowest VM {worst:.2f} s; target <= 5)")
            time.sleep(1)
            idle: list[socket.socket] = []
            per_vm = max(1, pending // vms + 1)
            for p in paths[:vms]:
                for _ in range(min(per_vm, 8)):
                    if len(idle) >= pending:
                        break
                    s = socket.socket(socket.AF_UNIX)
                    s.connect(str(p))
                    idle.append(s)
            time.sleep(0.5)
            late = asyncio.run(_to_atr(paths[vms]))
            print(f"  with {len(idle)} connections that never send Init: a new VM's ATR after "
                  f"{late * 1000:.1f} ms (target <= 1000)")
            for s in idle:
                s.close()
        finally:
            proc.terminate()
            proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--echo-server", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("what", nargs="*", metavar="PART",
                        help="hol, scale, setup (default: all three)")
    parser.add_argument("--seconds", type=float, default=3.0, help="per head-of-line round")
    parser.add_argument("--rounds", type=int, default=3, help="head-of-line rounds")
    parser.add_argument("--vms", type=int, default=1000)
    parser.add_argument("--apdus", type=int, default=1000, help="per session, scale")
    parser.add_argument("--pending", type=int, default=500)
    args = parser.parse_args()
    if args.echo_server:
        echo_server(args.echo_server)
        return
    parts = args.what or ["hol", "scale", "setup"]
    unknown = set(parts) - {"hol", "scale", "setup"}
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    args.what = parts
    if "hol" in args.what:
        head_of_line(args.seconds, args.rounds)
    if "scale" in args.what:
        scale(args.vms, args.apdus)
    if "setup" in args.what:
        setup(args.vms, args.pending)


if __name__ == "__main__":
    main()
