"""The systemd units (deploy/systemd) and the daemon's side of them (vmc.systemd): the units
verify, and the unit's ExecStart line, run as systemd would run it (sockets handed over with
LISTEN_FDS, a NOTIFY_SOCKET to report to; no systemd as PID 1 needed), serves a VM on the passed
socket and reports READY=1, RELOADING=1 and STOPPING=1."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.vmc.daemon_harness import echo
from vmc.addr import UnixAddress
from vmc.control import control_request
from vmc.fakeqemu import FakeQemu

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "deploy" / "systemd"
CCIDEMU = Path(sys.executable).parent / "ccidemu"

#: Socket activation as systemd does it (sd_listen_fds(3)): the sockets as fds 3, 4, ...,
#: LISTEN_FDS / LISTEN_FDNAMES, and LISTEN_PID = the pid that will use them (exec keeps it).
_ACTIVATE = """
import os, sys
fds = [int(x) for x in sys.argv[1].split(",")]
for n, fd in enumerate(fds):
    os.dup2(fd, 3 + n)
os.environ.update(LISTEN_FDS=str(len(fds)), LISTEN_PID=str(os.getpid()),
                  LISTEN_FDNAMES=sys.argv[2])
os.execvp(sys.argv[3], sys.argv[3:])
"""


def _instance_units(tmp: Path) -> list[Path]:
    """The template units as instance 'test', ExecStart pointed at this venv's ccidemu."""
    units = []
    for template in sorted(UNITS.glob("*@.*")):
        text = template.read_text().replace("/usr/local/bin/ccidemu", str(CCIDEMU))
        unit = tmp / template.name.replace("@.", "@test.")
        unit.write_text(text)
        units.append(unit)
    return units


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_the_units_verify(tmp_path: Path) -> None:
    units = _instance_units(tmp_path)
    assert {u.name for u in units} == {"ccidemu@test.service", "ccidemu@test.socket",
                                      "ccidemu-control@test.socket"}
    result = subprocess.run(["systemd-analyze", "verify", *map(str, units)],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    # the check can fail: a broken directive is reported
    broken = tmp_path / "ccidemu@test.service"
    broken.write_text(broken.read_text().replace("Type=notify", "Type=notifyy"))
    result = subprocess.run(["systemd-analyze", "verify", str(broken)],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert "Failed to parse service type" in result.stderr


def _exec_start(instance: str) -> list[str]:
    for line in (UNITS / "ccidemu@.service").read_text().splitlines():
        if line.startswith("ExecStart="):
            return shlex.split(line.removeprefix("ExecStart=").replace("%i", instance))
    raise AssertionError("no ExecStart")


def _recv_states(sock: socket.socket, want: str, timeout: float = 60) -> list[str]:
    deadline = time.monotonic() + timeout
    got: list[str] = []
    while not any(want in state for state in got):
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            raise AssertionError(f"no {want} from the daemon; got {got}") from None
    return got


def test_exec_start_with_handed_over_sockets_and_readiness(tmp: Path) -> None:
    run = tmp / "run"
    run.mkdir(mode=0o750)
    vm_path, control_path = run / "vm.sock", run / "control.sock"
    config = tmp / "test.toml"
    config.write_text(f'[vm.vm1]\nlisten = "unix:{vm_path}"\ncards = ["test:"]\n')
    # the unit's ExecStart, its paths moved into this test's directory
    argv = _exec_start("test")
    assert argv[:2] == ["/usr/local/bin/ccidemu", "serve"] and "--config" in argv
    argv = [str(CCIDEMU), *argv[1:]]
    argv[argv.index("--config") + 1] = str(config)
    argv[argv.index("--control") + 1] = f"unix:{control_path}"
    listeners = []
    for path in (vm_path, control_path):  # as the .socket units make them
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(16)
        listeners.append(listener)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp / "notify"))
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp / "notify")}
    fds = [listener.fileno() for listener in listeners]
    log = tmp / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", _ACTIVATE, ",".join(map(str, fds)), "vm:control", *argv],
            pass_fds=fds, env=env, stdout=out, stderr=out)
    for listener in listeners:
        listener.close()  # the daemon has them now
    try:
        states = _recv_states(notify, "READY=1")
        assert any("STATUS=serving 1 VMs" in state for state in states), states
        with FakeQemu.connect(UnixAddress(vm_path)) as fake:
            fake.wait_card()
            echo(fake, b"activated")
        (vm,) = control_request(UnixAddress(control_path), {"cmd": "list"})
        assert vm["vm"] == "vm1" and vm["listening"]
        proc.send_signal(signal.SIGHUP)
        states = _recv_states(notify, "RELOADING=1")
        _recv_states(notify, "READY=1")
        proc.send_signal(signal.SIGTERM)
        _recv_states(notify, "STOPPING=1")
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
    text = log.read_text()
    assert "systemd passed 2 socket(s)" in text, text
    assert "Traceback" not in text
    # the socket files are systemd's: the daemon left them in place
    assert vm_path.exists() and control_path.exists()
