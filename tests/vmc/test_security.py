"""Security defects of issue 7, one regression test each (docs/SECURITY.md).

Secrets in logs and traces, file and directory modes, squatted directories, the control socket,
listening beyond loopback, security status across reconnects, temporaries left by a kill.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ccidemu.apdu import CommandApdu
from ccidemu.cards import CardOptions, open_card
from ccidemu.errors import ConfigError
from ccidemu.files import ensure_private_dir, open_private
from ccidemu.tlv import ber_encode, ber_find
from ccidemu.trace import TRAFFIC
from tests.vmc.daemon_harness import RunningDaemon, free_port, serve
from vmc.addr import TcpAddress, UnixAddress
from vmc.control import (
    ControlError,
    check_control_path,
    control_request,
    parse_control_option,
)
from vmc.fakeqemu import FakeQemu, FakeQemuListener

H = bytes.fromhex
REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "fixtures" / "certs"
NOBODY = 65534

PIN, WRONG_PIN, NEW_PIN, UNBLOCK_PIN = b"48151623", b"87654329", b"61803398", b"27182818"
PUK, NEW_PUK = b"90210777", b"31415926"
KEY = bytes.fromhex("5e" * 8 + "a1b2c3d4" * 6)  # AES-256
NEW_KEY = bytes.fromhex("7c" * 16 + "0badf00d" * 4)
IMPORTED = bytes.fromhex("0102" * 3) + b"\x99" * 20 + os.urandom(16)
SELECT = H("00a4040009a00000030800001000")


def _pad(pin: bytes) -> bytes:
    return pin.ljust(8, b"\xff")


def _aes(key: bytes, block: bytes, *, decrypt: bool = False) -> bytes:
    cipher = Cipher(algorithms.AES(key), modes.ECB())
    ctx = cipher.decryptor() if decrypt else cipher.encryptor()
    return ctx.update(block) + ctx.finalize()


def _profile(tmp: Path) -> Path:
    path = tmp / "card.toml"
    path.write_text(textwrap.dedent(f"""\
        pin = "{PIN.decode()}"
        puk = "{PUK.decode()}"
        pin_retries = 5
        management_key = "{KEY.hex()}"
        management_key_algorithm = "aes256"
        [slots.9a]
        cert = "{FIXTURES / '9a.crt'}"
        key = "{FIXTURES / '9a.key'}"
        """))
    return path


def _general_authenticate(fake: FakeQemu, *items: tuple[int, bytes]) -> tuple[bytes, bytes]:
    body = ber_encode(0x7C, b"".join(ber_encode(t, v) for t, v in items))
    rsp = fake.transmit(CommandApdu(0, 0x87, 0x0C, 0x9B, body, 256).encode())
    return rsp[:-2], rsp[-2:]


def _secret_session(fake: FakeQemu) -> list[bytes]:
    """Every secret-bearing command once; returns the secret values that went by."""
    seen = [PIN, WRONG_PIN, NEW_PIN, UNBLOCK_PIN, PUK, NEW_PUK, KEY, NEW_KEY, IMPORTED]
    assert fake.transmit(SELECT)[-2:] == H("9000")
    assert fake.transmit(H("0020008008") + _pad(WRONG_PIN))[-2:] == H("63c4")
    assert fake.transmit(H("0020008008") + _pad(PIN))[-2:] == H("9000")
    # a malformed VERIFY (trailing bytes): the dispatcher's debug line must not show it
    assert fake.transmit(H("0020008008") + _pad(PIN) + H("0000"))[-2:] == H("6700")
    assert fake.transmit(H("0024008010") + _pad(PIN) + _pad(NEW_PIN))[-2:] == H("9000")
    assert fake.transmit(H("002c008010") + _pad(PUK) + _pad(UNBLOCK_PIN))[-2:] == H("9000")
    assert fake.transmit(H("0024008110") + _pad(PUK) + _pad(NEW_PUK))[-2:] == H("9000")
    # mutual authentication: the card's encrypted witness, the witness, our challenge, E(C)
    out, sw = _general_authenticate(fake, (0x80, b""))
    assert sw == H("9000")
    encrypted_witness = ber_find(ber_find(out, 0x7C) or b"", 0x80) or b""
    witness = _aes(KEY, encrypted_witness, decrypt=True)
    challenge = os.urandom(16)
    out, sw = _general_authenticate(fake, (0x80, witness), (0x81, challenge), (0x82, b""))
    assert sw == H("9000")
    assert ber_find(ber_find(out, 0x7C) or b"", 0x82) == _aes(KEY, challenge)
    seen += [encrypted_witness, witness, challenge, _aes(KEY, challenge)]
    # SET MANAGEMENT KEY, then external authentication with the new key
    assert fake.transmit(H("00ffffff23 0c9b20") + NEW_KEY)[-2:] == H("9000")
    out, sw = _general_authenticate(fake, (0x81, b""))
    card_challenge = ber_find(ber_find(out, 0x7C) or b"", 0x81) or b""
    answer = _aes(NEW_KEY, card_challenge)
    assert _general_authenticate(fake, (0x82, answer))[1] == H("9000")
    seen += [card_challenge, answer]
    # IMPORT ASYMMETRIC KEY (Yubico): its data is a private key whatever the card answers
    fake.transmit(bytes((0x00, 0xFE, 0x07, 0x9A, len(IMPORTED))) + IMPORTED)
    return seen


def _leaks(text: str, secrets: list[bytes]) -> list[str]:
    found = []
    folded = text.lower()
    for value in secrets:
        for form in (value.hex(), value.hex(" ")):
            if form in folded:
                found.append(form)
        if value.isascii() and value.decode() in text:
            found.append(value.decode())
    return found


@pytest.fixture
def serve_process(tmp: Path) -> Iterator[tuple[UnixAddress, Path, Path]]:
    """``ccidemu -vvv serve --listen --trace`` with the profile card, as a subprocess."""
    addr = UnixAddress(tmp / "vm.sock")
    trace, log = tmp / "trace.jsonl", tmp / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vmc", "-vvv", "serve", "--listen", f"unix:{addr.path}",
             "--card", f"piv:{_profile(tmp)}", "--trace", str(trace), "--control", "none"],
            cwd=REPO, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 30
        while not addr.path.exists():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.05)
        yield addr, trace, log
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)


def test_secrets_never_reach_the_traffic_log_or_the_trace(
    serve_process: tuple[UnixAddress, Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    addr, trace, log = serve_process
    caplog.set_level(TRAFFIC)  # the fake QEMU's own log lines too
    with FakeQemu.connect(addr) as fake:
        fake.wait_card()
        secrets = _secret_session(fake)
    deadline = time.monotonic() + 10
    while trace.read_text().count("\n") < 12 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    logged, traced = log.read_text(), trace.read_text()
    assert "TRAFFIC" in logged and "VERIFY" in logged, "the -vvv log was not written"
    assert traced.count("\n") >= 12 and '"redacted":["command"]' in traced
    assert '"redacted":["command","response"]' in traced  # the witness, challenges
    assert _leaks(logged, secrets) == []
    assert _leaks(traced, secrets) == []
    assert _leaks(caplog.text, secrets) == []
    assert stat.S_IMODE(trace.stat().st_mode) == 0o600


def test_trace_secrets_option_keeps_them(tmp: Path, daemons: list[RunningDaemon]) -> None:
    """The opt-in works (so the test above would see a leak if redaction were off)."""
    addr, trace = UnixAddress(tmp / "vm.sock"), tmp / "trace.jsonl"
    daemons.append(serve(listen=[addr], cards=[f"piv:{_profile(tmp)}"], trace=trace,
                         trace_secrets=True))
    with FakeQemu.connect(addr) as fake:
        fake.wait_card()
        secrets = _secret_session(fake)
    daemons[0].stop()
    assert set(_leaks(trace.read_text(), secrets)) >= {NEW_KEY.hex(), PIN.hex(), PUK.hex()}


def test_decode_hides_secrets_unless_asked(tmp: Path) -> None:
    line = (H("0020008008") + _pad(PIN)).hex()
    ga = CommandApdu(0, 0x87, 0x0C, 0x9B, ber_encode(0x7C, ber_encode(0x82, KEY[:16]))).encode()
    source = tmp / "apdus.hex"
    source.write_text(f"{line}\n{ga.hex()}\n{H('00ffffff23 0c9b20').hex()}{NEW_KEY.hex()}\n")
    cmd = [sys.executable, "-m", "vmc", "decode", "--as", "apdu", str(source)]
    hidden = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "VERIFY" in hidden and "redacted" in hidden
    assert _leaks(hidden, [PIN, KEY[:16], NEW_KEY]) == []
    shown = subprocess.run([*cmd, "--show-secrets"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout
    assert PIN.hex().upper() in shown and NEW_KEY.hex().upper() in shown


# --------------------------------------------------------------------------- files


def test_trace_file_is_created_private_and_an_open_one_is_tightened(tmp: Path) -> None:
    fresh = tmp / "new.jsonl"
    with open_private(fresh, "trace file") as f:
        f.write("x\n")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600
    loose = tmp / "old.jsonl"
    loose.write_text("")
    loose.chmod(0o644)
    open_private(loose, "trace file").close()
    assert stat.S_IMODE(loose.stat().st_mode) == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_trace_file_of_another_user_is_refused(tmp: Path) -> None:
    planted = tmp / "planted.jsonl"
    planted.write_text("")
    planted.chmod(0o666)
    os.chown(planted, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match="belongs to uid 65534"):
        open_private(planted, "trace file")


def test_state_directory_is_created_0700(tmp: Path) -> None:
    state_dir = tmp / "a" / "state"
    card = open_card("piv:", CardOptions(state_dir=state_dir))
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    card.power_on()
    card.transmit(H("00a4040009a00000030800001000"))
    card.transmit(H("0020008008") + _pad(b"999999"))  # a wrong PIN is saved
    (saved,) = state_dir.iterdir()
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
@pytest.mark.parametrize("mode", [0o777, 0o755])
def test_squatted_directories_are_refused(tmp: Path, mode: int) -> None:
    """Another user made the directory first (as /tmp/ccidemu-UID could be)."""
    squatted = tmp / "ccidemu-1000"
    squatted.mkdir()
    squatted.chmod(mode)
    os.chown(squatted, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match="owned by uid 65534"):
        check_control_path(UnixAddress(squatted / "control.sock"))
    with pytest.raises(ConfigError, match="owned by uid 65534"):
        ensure_private_dir(squatted, "state directory")
    with pytest.raises(ConfigError, match="owned by uid 65534"):
        open_card("piv:", CardOptions(state_dir=squatted))
    with pytest.raises(ControlError, match="not talking to"):  # the victim's ctl
        control_request(UnixAddress(squatted / "control.sock"), {"cmd": "list"})


def test_a_directory_others_can_write_is_refused(tmp: Path) -> None:
    shared = tmp / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ConfigError, match="can be written by other users"):
        ensure_private_dir(shared, "state directory")


def test_a_state_directory_we_cannot_write_is_refused_at_start(tmp: Path) -> None:
    """Ours but mode 0500: the daemon says so when it starts, not when a save fails (root
    ignores modes, so the check runs as nobody when we are root)."""
    own = tmp / "nobody"
    own.mkdir()
    (own / "state").mkdir(mode=0o500)
    (own / "state").chmod(0o500)
    command = [sys.executable, "-m", "vmc", "serve", "--card", "piv:", "--state-dir",
               f"{own}/state", "--listen", f"unix:{own}/vm.sock", "--control",
               f"unix:{own}/ctl/control.sock"]
    if os.geteuid() == 0:
        for path in (own, own / "state"):
            os.chown(path, NOBODY, NOBODY)
        tmp.chmod(0o755)
        command = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                   *command]
    env = {**os.environ, "HOME": str(own)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1, result.stderr
    assert f"{own}/state is not writable (mode 0500)" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="running as another user needs root")
def test_default_control_directory_squatted_in_tmp(tmp: Path) -> None:
    """A user without XDG_RUNTIME_DIR: /tmp/ccidemu-UID made first by someone else."""
    squatted = Path(f"/tmp/ccidemu-{NOBODY}")
    if squatted.exists():
        pytest.skip(f"{squatted} exists on this machine")
    squatted.mkdir(mode=0o777)
    squatted.chmod(0o777)
    try:
        env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
        env["HOME"] = str(tmp)
        own = tmp / "nobody"
        own.mkdir()
        os.chown(own, NOBODY, NOBODY)
        tmp.chmod(0o755)
        result = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             sys.executable, "-m", "vmc", "serve", "--card", "test:", "--listen",
             f"unix:{own}/vm.sock"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 1, result.stderr
        assert "control socket directory /tmp/ccidemu-65534" in result.stderr
        assert "refusing to use it" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        squatted.rmdir()


# --------------------------------------------------------------------------- sockets


def test_control_over_tcp_is_refused(tmp: Path) -> None:
    with pytest.raises(ConfigError, match="must be a unix socket"):
        parse_control_option(f"tcp:127.0.0.1:{free_port()}")
    result = subprocess.run(
        [sys.executable, "-m", "vmc", "serve", "--listen", f"unix:{tmp}/vm.sock",
         "--control", f"tcp:127.0.0.1:{free_port()}"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "must be a unix socket" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="running as another user needs root")
def test_another_user_may_insert_only_the_configured_cards(
    tmp: Path, daemons: list[RunningDaemon]
) -> None:
    """Even if the control socket is opened to others, a caller that is not the daemon's
    user cannot make it read a file of its choice (SO_PEERCRED)."""
    ctl_dir = tmp / "ctl"
    ctl_dir.mkdir(mode=0o755)
    ctl = UnixAddress(ctl_dir / "control.sock")
    addr = UnixAddress(tmp / "vm.sock")
    daemons.append(serve(listen=[addr], cards=["test:"], control=ctl))
    tmp.chmod(0o755)
    ctl.path.chmod(0o666)
    with FakeQemu.connect(addr) as fake:
        fake.wait_card()
        (session,) = control_request(ctl, {"cmd": "list"})
        sid = session["session"]
        control_request(ctl, {"cmd": "remove", "session": sid})
        script = textwrap.dedent(f"""\
            import json, socket, sys
            s = socket.socket(socket.AF_UNIX)
            s.connect({str(ctl.path)!r})
            for card in sys.argv[1:]:
                s.sendall(json.dumps({{"cmd": "insert", "session": {sid},
                                       "card": card}}).encode() + b"\\n")
                print(s.makefile().readline().strip(), flush=True)
            """)
        result = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             sys.executable, "-c", script, "piv:/root", "test:"],
            capture_output=True, text=True, timeout=60)
        refused, accepted = result.stdout.splitlines()
        assert '"ok":false' in refused and "only its own user" in refused, result
        assert '"ok":true' in accepted, result
        fake.wait_card()


def test_listening_beyond_loopback_needs_allow_remote(
    daemons: list[RunningDaemon], caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    with pytest.raises(ConfigError, match="--allow-remote"):
        serve(listen=[TcpAddress("0.0.0.0", port)])
    with pytest.raises(ConfigError, match="other hosts"):
        serve(listen=[TcpAddress("", port)])
    caplog.set_level(logging.WARNING)
    daemons.append(serve(listen=[TcpAddress("0.0.0.0", port)], allow_remote=True))
    assert "beyond loopback" in caplog.text
    with FakeQemu.connect(TcpAddress("127.0.0.1", port)) as fake:
        assert fake.wait_card()


def test_a_loopback_listener_needs_no_option(daemons: list[RunningDaemon]) -> None:
    port = free_port()
    daemons.append(serve(listen=[TcpAddress("127.0.0.1", port)]))
    with FakeQemu.connect(TcpAddress("127.0.0.1", port)) as fake:
        assert fake.wait_card()


# --------------------------------------------------------------------------- card state


SIGN_9A = CommandApdu(0, 0x87, 0x07, 0x9A, ber_encode(
    0x7C, ber_encode(0x82, b"") + ber_encode(0x81, b"\x00\x01" + b"\xff" * 221 + b"\x00"
                                             + bytes(32))), 256).encode()


def test_a_new_connection_must_verify_the_pin_again(
    tmp: Path, daemons: list[RunningDaemon]
) -> None:
    """--connect: QEMU restarts (the chardev reconnects); the new peer must VERIFY."""
    addr = UnixAddress(tmp / "qemu.sock")
    with FakeQemuListener(addr) as qemu:
        daemons.append(serve(connect=[addr], cards=["piv:"]))
        with qemu.accept(timeout=10) as first:
            first.wait_card()
            assert first.transmit(SELECT)[-2:] == H("9000")
            assert first.transmit(H("0020008008") + _pad(b"123456")) == H("9000")
            assert first.transmit(SIGN_9A)[-2] == 0x61  # signed: 264 bytes to fetch
        with qemu.accept(timeout=10) as second:
            second.wait_card()
            assert second.transmit(SIGN_9A) == H("6982")  # no SELECT either: still refused
            assert second.transmit(H("0020008008") + _pad(b"123456")) == H("9000")
            assert second.transmit(SIGN_9A)[-2] == 0x61


_WRITER = textwrap.dedent("""\
    import sys
    from pathlib import Path
    from ccidemu.cards import CardOptions, open_card
    card = open_card("piv:", CardOptions(state_dir=Path(sys.argv[1])))
    card.power_on()
    card.transmit(bytes.fromhex("00a4040009a00000030800001000"))
    print("ready", flush=True)
    pins = [b"123456\\xff\\xff", b"654321\\xff\\xff"]
    i = 0
    while True:  # change the PIN back and forth: a state write each time
        old, new = pins[i % 2], pins[(i + 1) % 2]
        card.transmit(bytes.fromhex("0024008010") + old + new)
        i += 1
    """)


def test_temporaries_left_by_a_kill_are_removed_at_the_next_start(tmp: Path) -> None:
    state_dir = tmp / "state"
    for _ in range(30):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(state_dir)], cwd=REPO,
                                stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        time.sleep(0.02 + (os.urandom(1)[0] / 255) * 0.05)
        proc.kill()
        proc.wait()
        proc.stdout.close()
        if any(p.name.endswith(".tmp") for p in state_dir.iterdir()):
            break
    left = [p for p in state_dir.iterdir() if p.name.endswith(".tmp")]
    if not left:  # no kill landed inside a write: plant what one leaves
        (state_dir / f".{next(state_dir.glob('piv-*.json')).name}.abc123.tmp").write_text("{}")
    open_card("piv:", CardOptions(state_dir=state_dir))
    assert [p.name for p in state_dir.iterdir() if p.name.endswith(".tmp")] == []
    assert len(list(state_dir.glob("piv-*.json"))) == 1


def test_unix_listener_is_private(tmp: Path, daemons: list[RunningDaemon]) -> None:
    addr = UnixAddress(tmp / "vm.sock")
    daemons.append(serve(listen=[addr]))
    assert stat.S_IMODE(addr.path.stat().st_mode) == 0o600
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(addr.path))
