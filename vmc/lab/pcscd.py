"""A private pcscd with the vpcd driver, and the ccidemu vpcd bridge, for real-client tests.

pcscd is started by socket activation (docs/PROTOCOL.md, "vpcd"): we bind the client socket
in a temporary directory ourselves and pass it as fd 3 with LISTEN_FDS=1 / LISTEN_PID, and
the clients find it through ``PCSCLITE_CSOCK_NAME``.  pcscd reads our own reader.conf
(``pcscd -c FILE``) that points vsmartcard's driver at a free TCP port instead of the fixed
35963/35964, so these tests neither touch the host's pcscd nor collide with another test run
or a bridge someone started by hand.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

VPCD_DRIVER = Path("/usr/lib/pcsc/drivers/serial/libifdvpcd.so")
OPENSC_PKCS11 = Path("/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so")
READER = "Virtual PCD 00 00"

#: Binaries the real-client tests need (tools/bootstrap.sh installs them).
TOOLS = ("pcscd", "opensc-tool", "pkcs11-tool", "pkcs15-tool", "scriptor", "yubico-piv-tool",
         "openssl")


def missing_peers(
    tools: Sequence[str] = TOOLS, files: Sequence[Path] = (VPCD_DRIVER, OPENSC_PKCS11)
) -> list[str]:
    """The programs and files of the real-client peers this host lacks (empty: all there)."""
    missing = [t for t in tools if shutil.which(t) is None and not Path("/usr/sbin", t).exists()]
    missing += [str(f) for f in files if not f.exists()]
    override = os.environ.get("CCIDEMU_PCSCD")
    if override and shutil.which(override) is None:
        missing.append(override)
    return missing


#: What to install when :func:`missing_peers` finds something missing (Debian 12).
PEER_PACKAGES = "pcscd vsmartcard-vpcd opensc pcsc-tools yubico-piv-tool openssl"


def _pcscd() -> str:
    """pcscd's path (``$CCIDEMU_PCSCD`` overrides): it is in /usr/sbin, which a non-root
    user's PATH lacks on Debian."""
    return os.environ.get("CCIDEMU_PCSCD") or shutil.which("pcscd") or "/usr/sbin/pcscd"


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("0.0.0.0", port))  # vpcd binds INADDR_ANY
        except OSError:
            return False
    return True


def pick_port_pair() -> int:
    """A port p with p and p+1 free (vpcd opens one per reader), below the ephemeral range."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000, 2)
        if _port_free(port) and _port_free(port + 1):
            return port
    raise RuntimeError("no free TCP port pair for vpcd")


#: Socket activation (sd_listen_fds(3)): the listening socket as fd 3, LISTEN_FDS=1 and
#: LISTEN_PID = the pid of the program that uses it; exec keeps the pid.
_ACTIVATE = """
import os, sys
os.dup2(int(sys.argv[1]), 3)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
os.execvp(sys.argv[2], sys.argv[2:])
"""


class CommandFailed(AssertionError):
    pass


@dataclass
class Bridge:
    """A running ``ccidemu vpcd`` subprocess."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    argv: list[str]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class PcscdHarness:
    """pcscd + vpcd on a private socket and port; helpers to run clients and the bridge."""

    workdir: Path
    port: int = field(default_factory=pick_port_pair)
    proc: subprocess.Popen[bytes] | None = None
    bridge: Bridge | None = None
    starts: int = 0

    @property
    def socket_path(self) -> Path:
        return self.workdir / "pcscd.comm"

    @property
    def log_path(self) -> Path:
        return self.workdir / "pcscd.log"

    @property
    def vpcd_address(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment for PC/SC clients: points libpcsclite at our pcscd."""
        env = dict(os.environ)
        env["PCSCLITE_CSOCK_NAME"] = str(self.socket_path)
        env.pop("OPENSC_CONF", None)
        return env

    # --- pcscd ---------------------------------------------------------------------------

    def start_pcscd(self) -> None:
        assert self.proc is None, "pcscd already running"
        conf = self.workdir / "reader.conf"
        conf.write_text(
            'FRIENDLYNAME "Virtual PCD"\n'
            f"DEVICENAME   /dev/null:0x{self.port:04X}\n"
            f"LIBPATH      {VPCD_DRIVER}\n"
            f"CHANNELID    0x{self.port:04X}\n"
        )
        Path("/run/pcscd").mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.socket_path))
        listener.listen(64)
        fd = listener.fileno()
        mark = f"--- pcscd start {self.starts + 1} ---\n"
        with self.log_path.open("a") as log:
            log.write(mark)
        offset = self.log_path.stat().st_size
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _ACTIVATE, str(fd),
                 _pcscd(), "--foreground", "--debug", "--apdu", "-c", str(conf)],
                pass_fds=[fd], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        listener.close()
        self.starts += 1
        deadline = time.monotonic() + 10
        log_text = ""
        while time.monotonic() < deadline:
            log_text = self._log_from(offset)
            if "daemon ready" in log_text:
                if "Started by systemd" in log_text:
                    return
                break  # not socket-activated: it took the host's global socket; stop it
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        _terminate(self.proc)
        self.proc = None
        raise RuntimeError(f"pcscd did not start socket-activated:\n{log_text[-3000:]}")

    def _log_from(self, offset: int) -> str:
        with self.log_path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def stop_pcscd(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        _terminate(proc)
        self.socket_path.unlink(missing_ok=True)

    def restart_pcscd(self) -> None:
        self.stop_pcscd()
        self.start_pcscd()

    def pcscd_log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # --- the bridge ----------------------------------------------------------------------

    def start_bridge(self, card: str, *extra: str, wait: bool = True,
                     verbose: int = 2) -> Bridge:
        """``python -m vmc -vv vpcd --card CARD --vpcd <our port> EXTRA...``; waits for the card.

        ``verbose``: the number of ``-v`` (3: TRAFFIC, every frame).
        """
        assert self.bridge is None, "a bridge is already running"
        log_path = self.workdir / f"bridge-{time.monotonic_ns()}.log"
        argv = [sys.executable, "-m", "vmc", "-" + "v" * verbose, "vpcd", "--card", card,
                "--vpcd", self.vpcd_address, *extra]
        with log_path.open("wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.bridge = Bridge(proc, log_path, argv)
        if wait:
            self.wait_card(present=True)
        return self.bridge

    def stop_bridge(self) -> int | None:
        """SIGTERM the bridge; its exit status (None if it had to be killed).

        Waits until pcscd has noticed the removal: vpcd finds out only at its next presence
        poll, and a bridge started before that would meet a stale reader state.
        """
        bridge, self.bridge = self.bridge, None
        if bridge is None:
            return None
        status = _terminate(bridge.proc)
        if self.proc is not None and self.proc.poll() is None:
            self.wait_card(present=False)
        return status

    def wait_card(self, present: bool = True, timeout: float = 15.0) -> None:
        """Until opensc-tool sees (or no longer sees) a card in the reader."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.run("opensc-tool", "-r", READER, "-a", check=False, timeout=10)
            if (result.returncode == 0) == present:
                return
            if time.monotonic() > deadline:
                what = "present" if present else "gone"
                raise AssertionError(
                    f"card not {what} after {timeout}s: {result.stdout}{result.stderr}\n"
                    f"{self.diagnostics()}"
                )
            time.sleep(0.1)

    # --- clients -------------------------------------------------------------------------

    def run(self, *argv: str, check: bool = True, timeout: float = 60,
            input: str | None = None, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        """Run a PC/SC client against our pcscd; on failure (check) show its output and logs."""
        result = subprocess.run(
            list(argv), env={**self.env, **(env or {})}, capture_output=True, text=True,
            timeout=timeout, input=input, cwd=self.workdir, check=False,
        )
        if check and result.returncode != 0:
            raise CommandFailed(
                f"{' '.join(argv)} exited {result.returncode}\n--- stdout\n{result.stdout}"
                f"\n--- stderr\n{result.stderr[-6000:]}\n{self.diagnostics()}"
            )
        return result

    def diagnostics(self) -> str:
        bridge = self.bridge.log()[-3000:] if self.bridge else "(no bridge)"
        return f"--- pcscd log (tail)\n{self.pcscd_log()[-4000:]}\n--- bridge log (tail)\n{bridge}"


def _terminate(proc: subprocess.Popen[bytes]) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
            return None
    return proc.returncode
