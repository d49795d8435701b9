"""systemd's service protocols, without a dependency: socket activation and readiness.

* Socket activation (sd_listen_fds(3)): systemd passes the sockets of ``ccidemu@.socket`` as
  file descriptors 3, 4, ... with ``LISTEN_FDS`` (their count), ``LISTEN_PID`` (ours) and
  ``LISTEN_FDNAMES``.  :func:`passed_sockets` takes them once; the daemon uses a passed socket
  for a VM's ``listen`` address (or the control socket) whose address matches, instead of
  binding one itself.
* Readiness (sd_notify(3)): ``Type=notify`` services write ``READY=1`` (then ``STOPPING=1``,
  ``RELOADING=1``, ``STATUS=...``) as a datagram to the unix socket ``NOTIFY_SOCKET`` names
  (``@`` at its start: the abstract namespace).  :func:`notify` does nothing when it is unset.

docs/DEPLOY.md has the units that use this.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
from dataclasses import dataclass

__all__ = ["PassedSocket", "close_unused", "is_passed", "notify", "passed_sockets",
           "take_passed"]

log = logging.getLogger(__name__)

_FIRST_FD = 3  # SD_LISTEN_FDS_START


@dataclass
class PassedSocket:
    """A listening socket systemd passed, its name (``FileDescriptorName=``) and address."""

    sock: socket.socket
    name: str
    address: object  # getsockname(): a path for AF_UNIX, (host, port, ...) for TCP
    used: bool = False


_taken: list[PassedSocket] | None = None


def passed_sockets() -> list[PassedSocket]:
    """The sockets systemd passed to this process (once: the environment is cleared, as
    sd_listen_fds(unset_environment=1) does, so children do not see them)."""
    global _taken
    if _taken is not None:
        return _taken
    _taken = []
    count, pid = os.environ.get("LISTEN_FDS"), os.environ.get("LISTEN_PID")
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for variable in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        os.environ.pop(variable, None)
    if count is None or pid is None:
        return _taken
    try:
        if int(pid) != os.getpid():
            return _taken
        n = int(count)
    except ValueError:
        log.warning("ignoring malformed LISTEN_FDS/LISTEN_PID")
        return _taken
    for index in range(n):
        fd = _FIRST_FD + index
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            continue
        if not stat.S_ISSOCK(mode):
            log.warning("systemd passed descriptor %d, which is not a socket; ignored", fd)
            continue
        sock = socket.socket(fileno=fd)
        os.set_inheritable(fd, False)
        name = names[index] if index < len(names) and names[index] else f"fd{fd}"
        try:
            address = sock.getsockname()
        except OSError:
            address = None
        _taken.append(PassedSocket(sock, name, address))
    if _taken:
        log.info("systemd passed %d socket(s): %s", len(_taken),
                 ", ".join(f"{p.name}={p.address}" for p in _taken))
    return _taken


def is_passed(sock: socket.socket) -> bool:
    """Whether ``sock`` came from systemd (then systemd, not we, removes its file)."""
    return any(p.sock is sock for p in passed_sockets())


def take_passed(address: object) -> socket.socket | None:
    """A passed socket bound to ``address`` (a unix path, or (host, port)), marked used."""
    for passed in passed_sockets():
        if passed.used:
            continue
        bound = passed.address
        if isinstance(bound, str) and isinstance(address, str):
            if os.path.realpath(bound) == os.path.realpath(address):
                passed.used = True
                return passed.sock
        elif (isinstance(bound, tuple) and isinstance(address, tuple)
              and bound[1] == address[1] and _same_host(str(bound[0]), str(address[0]))):
            passed.used = True
            return passed.sock
    return None


def _same_host(bound: str, wanted: str) -> bool:
    if bound == wanted:
        return True
    try:
        infos = socket.getaddrinfo(wanted or None, None, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except OSError:
        return False
    return any(info[4][0] == bound for info in infos)


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd; False when not under systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    target = "\0" + path[1:] if path.startswith("@") else path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(target)
            sock.sendall(state.encode())
        except OSError as exc:
            log.warning("cannot notify systemd at %s: %s", path, exc)
            return False
    return True


def close_unused() -> None:
    """Close the passed sockets nothing claimed (logged: a unit that does not match)."""
    for passed in passed_sockets():
        if not passed.used:
            log.warning("systemd passed %s (%s), which no VM or control socket uses; closing "
                        "it", passed.name, passed.address)
            with contextlib.suppress(OSError):
                passed.sock.close()
            passed.used = True
