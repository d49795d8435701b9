"""The control socket of ``ccidemu serve`` and its client (``ccidemu ctl``).

Protocol: JSON Lines over a unix stream socket (``unix:PATH``, mode 0600, in a directory
only its user can write).  TCP is refused: any local user could reach it and remove, insert
or swap the cards of every VM (docs/SECURITY.md).
The client writes one JSON object per line; the daemon answers each with one JSON object per
line, in order, and keeps the connection open for more requests.

Requests (``"cmd"`` names the command; SESSION is the integer id ``list`` shows; READER is the
reader index in the session, 0 = the first ``--card``, default 0)::

    {"cmd": "list"}
    {"cmd": "stats"}
    {"cmd": "remove", "session": 1, "reader": 0}
    {"cmd": "insert", "session": 1, "reader": 0, "card": "test:"}   # "card" optional

A ``card`` spec the daemon was not started with is accepted only from the daemon's own user
(the peer's credentials, ``SO_PEERCRED``): opening a spec reads files with the daemon's rights.

Answers: ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "reason"}``.

``list`` result: a list of sessions, each::

    {"session": 1, "mode": "connect"|"listen", "address": "unix:/run/vm1.sock",
     "peer": "..." | null, "connected": true, "handshake": true,
     "readers": [{"reader": 0, "reader_id": 0 | null, "name": "...", "card": "card name",
                  "state": "added", "present": true, "inserted": true, "apdus": 12}]}

``stats`` result: ``{"sessions": active, "sessions_total": n, "apdus": n, "bytes_in": n,
"bytes_out": n, "errors": n, "uptime": seconds}``.  ``remove`` / ``insert`` result: the
session's entry as in ``list``.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from ccidemu.errors import CcidemuError, ConfigError
from ccidemu.files import ensure_private_dir
from vmc.addr import Address, UnixAddress, connect, parse_address

__all__ = [
    "MAX_LINE",
    "ControlError",
    "check_control_path",
    "check_trusted_dir",
    "control_request",
    "decode_line",
    "default_control_address",
    "encode_line",
    "parse_control_option",
]

#: Longest request or answer line accepted (bytes).
MAX_LINE = 1 << 20


class ControlError(CcidemuError):
    """The daemon refused a control request, or cannot be reached."""


def default_control_address() -> UnixAddress:
    """``$XDG_RUNTIME_DIR/ccidemu/control.sock``, else ``/run/ccidemu/control.sock`` for root,
    else ``/tmp/ccidemu-$UID/control.sock``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return UnixAddress(Path(runtime) / "ccidemu" / "control.sock")
    uid = os.getuid()
    if uid == 0:
        return UnixAddress(Path("/run/ccidemu/control.sock"))
    return UnixAddress(Path(f"/tmp/ccidemu-{uid}/control.sock"))


def parse_control_option(text: str | None) -> UnixAddress | None:
    """``--control`` value: None (option absent) = the default, ``none`` = no control socket.

    ConfigError for a TCP address (see the module docstring).
    """
    if text is None:
        return default_control_address()
    if text == "none":
        return None
    address = parse_address(text)
    if not isinstance(address, UnixAddress):
        raise ConfigError(
            f"--control {text}: the control socket must be a unix socket (unix:PATH); over "
            "TCP any local user could control every VM's cards")
    return address


def encode_line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("utf-8") + b"\n"


def decode_line(line: bytes) -> dict[str, Any]:
    """One JSON object line; ValueError with the reason otherwise."""
    try:
        obj = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # (bad UTF-8, bad JSON, a huge number)
        raise ValueError(f"not a JSON line: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError("a control message must be a JSON object")
    return obj


def control_request(
    address: Address, request: dict[str, Any], timeout: float = 10.0
) -> Any:
    """Send one request to a running daemon; its ``result``, or ControlError with the reason."""
    if isinstance(address, UnixAddress):
        try:
            check_trusted_dir(address.path.parent)
        except ConfigError as exc:
            raise ControlError(f"not talking to {address}: {exc}") from None
    try:
        sock = connect(address, timeout)
    except OSError as exc:
        raise ControlError(
            f"cannot reach the daemon's control socket {address}: {exc.strerror or exc}"
            " (is 'ccidemu serve' running with the same --control?)"
        ) from None
    with sock:
        try:
            sock.sendall(encode_line(request))
            buf = bytearray()
            while b"\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ControlError("the daemon closed the control connection")
                buf += chunk
                if len(buf) > MAX_LINE:
                    raise ControlError("control answer too long")
        except OSError as exc:
            why = (f"no answer within {timeout:g} s" if isinstance(exc, TimeoutError)
                   else exc.strerror or exc)
            raise ControlError(f"control socket {address}: {why}") from None
    try:
        answer = decode_line(bytes(buf.split(b"\n", 1)[0]))
    except ValueError as exc:
        raise ControlError(f"bad answer from the daemon: {exc}") from None
    if answer.get("ok") is not True:
        raise ControlError(str(answer.get("error", "request failed")))
    return answer.get("result")


def check_control_path(address: UnixAddress) -> None:
    """Make the directory of the control socket (mode 0700) or check that it is ours and
    nobody else can write it (a squatted ``/tmp/ccidemu-UID`` is refused); ConfigError."""
    try:
        ensure_private_dir(address.path.parent, "control socket directory")
    except ConfigError as exc:
        raise ConfigError(f"{exc} (give --control unix:PATH in a private directory, or set "
                          "XDG_RUNTIME_DIR)") from None


def check_trusted_dir(path: Path) -> None:
    """The client's check of the directory a control socket is in: owned by us or root and
    writable by nobody else, so the socket in it is the daemon's and not another user's."""
    try:
        st = path.stat()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None
    if st.st_uid not in (0, os.geteuid()):
        raise ConfigError(f"{path} is owned by uid {st.st_uid}, not by you or root")
    if st.st_mode & 0o022:
        raise ConfigError(f"{path} can be written by other users (mode "
                          f"{stat.S_IMODE(st.st_mode):04o})")
