"""The control socket of ``ccidemu serve`` and its client (``ccidemu ctl``).

Protocol: JSON Lines over a stream socket (``unix:PATH``, mode 0600, or ``tcp:HOST:PORT``).
The client writes one JSON object per line; the daemon answers each with one JSON object per
line, in order, and keeps the connection open for more requests.

Requests (``"cmd"`` names the command; SESSION is the integer id ``list`` shows; READER is the
reader index in the session, 0 = the first ``--card``, default 0)::

    {"cmd": "list"}
    {"cmd": "stats"}
    {"cmd": "remove", "session": 1, "reader": 0}
    {"cmd": "insert", "session": 1, "reader": 0, "card": "test:"}   # "card" optional

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
from pathlib import Path
from typing import Any

from ccidemu.errors import CcidemuError, ConfigError
from vmc.addr import Address, UnixAddress, connect, parse_address

__all__ = [
    "MAX_LINE",
    "ControlError",
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


def parse_control_option(text: str | None) -> Address | None:
    """``--control`` value: None (option absent) = the default, ``none`` = no control socket."""
    if text is None:
        return default_control_address()
    if text == "none":
        return None
    return parse_address(text)


def encode_line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("utf-8") + b"\n"


def decode_line(line: bytes) -> dict[str, Any]:
    """One JSON object line; ValueError with the reason otherwise."""
    try:
        obj = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"not a JSON line: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError("a control message must be a JSON object")
    return obj


def control_request(
    address: Address, request: dict[str, Any], timeout: float = 10.0
) -> Any:
    """Send one request to a running daemon; its ``result``, or ControlError with the reason."""
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
            raise ControlError(f"control socket {address}: {exc}") from None
    try:
        answer = decode_line(bytes(buf.split(b"\n", 1)[0]))
    except ValueError as exc:
        raise ControlError(f"bad answer from the daemon: {exc}") from None
    if answer.get("ok") is not True:
        raise ControlError(str(answer.get("error", "request failed")))
    return answer.get("result")


def check_control_path(address: Address) -> None:
    """Make the directory of a unix control socket (mode 0700); ConfigError if impossible."""
    if isinstance(address, UnixAddress):
        try:
            address.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create {address.path.parent}: {exc}") from None
