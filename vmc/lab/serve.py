"""``ccidemu serve`` as a subprocess (and ``ccidemu ctl`` against it), for tests and the lab.

Run as ``sys.executable -m vmc``: the same Python and the same ccidemu as the caller.  Its
stderr (``-vv``) goes to ``serve.log`` in the working directory, appended across restarts.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vmc.lab.guest import ChardevMode, tail


class DaemonError(Exception):
    """The daemon did not start, died, or its control interface failed."""


class ServeProcess:
    """``ccidemu serve`` with one chardev address (or more: ``more_sockets``), a control
    socket and optional trace; ``env`` replaces the environment (PCSCLITE_CSOCK_NAME...).

    ``mode`` is QEMU's side: :attr:`ChardevMode.QEMU_SERVER` makes the daemon ``--connect``,
    :attr:`ChardevMode.QEMU_CLIENT` makes it ``--listen``.  ``vsc_socket`` is a unix socket's
    path, or a whole address (``"tcp:127.0.0.1:2001"``), or None for none on the command line
    (VMs from a ``--config`` file in ``extra_args``).  :meth:`start` may be called again
    after :meth:`kill` or :meth:`stop` to restart it with the same arguments.
    """

    def __init__(
        self,
        workdir: Path,
        vsc_socket: Path | str | None,
        mode: ChardevMode,
        cards: Sequence[str] = ("test:",),
        *,
        trace: Path | None = None,
        extra_args: Sequence[str] = (),
        verbose: int = 2,
        env: dict[str, str] | None = None,
        more_sockets: Sequence[Path] = (),
    ) -> None:
        self.workdir = workdir
        self.vsc_socket = vsc_socket
        self.mode = mode
        self.cards = tuple(cards)
        self.trace = trace
        self.extra_args = tuple(extra_args)
        self.verbose = verbose  # the number of -v (3: TRAFFIC, every frame)
        self.env = env  # the daemon's environment (None: ours), e.g. PCSCLITE_CSOCK_NAME
        #: more chardev sockets, one VM each (vm2, vm3, ...), in the same mode
        self.more_sockets = tuple(more_sockets)
        self.control = workdir / "control.sock"
        self.log_path = workdir / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "vmc", "-" + "v" * self.verbose, "serve"]
        if self.mode is not ChardevMode.SPICE:  # (SPICE: --spice HOST:PORT in extra_args)
            flag = "--connect" if self.mode is ChardevMode.QEMU_SERVER else "--listen"
            if isinstance(self.vsc_socket, Path):
                cmd += [flag, f"unix:{self.vsc_socket}"]
            elif self.vsc_socket is not None:
                cmd += [flag, self.vsc_socket]
            for path in self.more_sockets:
                cmd += [flag, f"unix:{path}"]
        for card in self.cards:
            cmd += ["--card", card]
        cmd += ["--control", f"unix:{self.control}"]
        if self.trace is not None:
            cmd += ["--trace", str(self.trace)]
        return cmd + list(self.extra_args)

    def start(self, timeout: float = 15) -> None:
        """Start and wait until the control socket accepts connections."""
        if self.proc is not None and self.proc.poll() is None:
            raise DaemonError("daemon already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"\n===== start #{self.starts}: {' '.join(self.command())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, env=self.env,
            )
        deadline = time.monotonic() + timeout
        while not self._control_answers():
            if self.proc.poll() is not None:
                raise DaemonError(
                    f"ccidemu serve exited with {self.proc.returncode} at start:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise DaemonError(f"control socket not up after {timeout} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def _control_answers(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(self.control))
            except OSError:
                return False
        return True

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash would: no cleanup runs in the daemon."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 5) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status (None if killed)."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            return None

    def ctl(self, *args: str, timeout: float = 15) -> subprocess.CompletedProcess[str]:
        """Run ``ccidemu ctl --control ADDR ARGS...`` (no check; see :meth:`ctl_json`)."""
        cmd = [sys.executable, "-m", "vmc", "ctl", "--control", f"unix:{self.control}", *args]
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False, env=self.env
        )

    def ctl_ok(self, *args: str) -> str:
        proc = self.ctl(*args)
        if proc.returncode != 0:
            raise DaemonError(
                f"ccidemu ctl {' '.join(args)} failed ({proc.returncode}):\n"
                f"{proc.stdout}{proc.stderr}\n--- serve.log tail:\n{self.log_tail()}"
            )
        return proc.stdout

    def ctl_json(self, *args: str) -> Any:
        out = self.ctl_ok("--json", *args)
        try:
            return json.loads(out)
        except ValueError as exc:
            raise DaemonError(f"ccidemu ctl --json {' '.join(args)}: not JSON: {out!r}") from exc

    def log(self) -> str:
        try:
            return self.log_path.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return tail(self.log(), lines)
