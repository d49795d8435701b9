"""The control socket protocol helpers (vmc.control) and the ctl table format."""

from __future__ import annotations

from pathlib import Path

import pytest

from ccidemu.errors import ConfigError
from vmc.addr import UnixAddress
from vmc.commands.ctl import format_sessions
from vmc.control import (
    ControlError,
    control_request,
    decode_line,
    default_control_address,
    encode_line,
    parse_control_option,
)


def test_default_address_prefers_xdg_runtime_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert default_control_address() == UnixAddress(Path("/run/user/1000/ccidemu/control.sock"))


@pytest.mark.parametrize(
    ("uid", "expected"),
    [(0, "/run/ccidemu/control.sock"), (1234, "/tmp/ccidemu-1234/control.sock")],
)
def test_default_address_without_xdg(
    monkeypatch: pytest.MonkeyPatch, uid: int, expected: str
) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr("os.getuid", lambda: uid)
    assert default_control_address() == UnixAddress(Path(expected))


def test_parse_control_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/r")
    assert parse_control_option(None) == UnixAddress(Path("/r/ccidemu/control.sock"))
    assert parse_control_option("none") is None
    assert parse_control_option("unix:/x/c.sock") == UnixAddress(Path("/x/c.sock"))
    with pytest.raises(ConfigError, match="must be a unix socket"):
        parse_control_option("tcp:127.0.0.1:7000")


def test_line_codec() -> None:
    assert encode_line({"cmd": "list"}) == b'{"cmd":"list"}\n'
    assert decode_line(b'{"ok":true,"result":[]}\n') == {"ok": True, "result": []}
    for bad in (b"[1]", b"nope", b"\xff\xfe"):
        with pytest.raises(ValueError):
            decode_line(bad)


def test_unreachable_daemon_is_a_clear_control_error(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="is 'ccidemu serve' running"):
        control_request(UnixAddress(tmp_path / "absent.sock"), {"cmd": "list"})


def test_format_sessions_table() -> None:
    text = format_sessions([
        {"session": 1, "vm": "vm1", "mode": "connect", "address": "tcp:127.0.0.1:2001",
         "peer": None, "connected": False,
         "readers": [{"reader": 0, "reader_id": None, "card": "PIV (demo)", "present": True,
                      "apdus": 0}]},
        {"session": 2, "vm": "alice", "mode": "listen", "address": "unix:/run/vm.sock",
         "peer": "local", "connected": True, "listening": True,
         "readers": [{"reader": 0, "reader_id": 0, "card": "built-in test card",
                      "present": False, "apdus": 7}]},
        {"session": 3, "vm": "bob", "mode": "listen", "address": "unix:/run/bob.sock",
         "peer": None, "connected": False, "listening": True, "readers": []},
    ])
    lines = text.splitlines()
    assert lines[0].split() == [
        "ID", "VM", "MODE", "ADDRESS", "PEER", "READER", "RID", "CARD", "PRESENT", "APDUS"
    ]
    assert lines[1].split()[:7] == ["1", "vm1", "connect", "tcp:127.0.0.1:2001", "(offline)",
                                    "0", "-"]
    assert lines[2].split()[-2:] == ["no", "7"] and lines[2].split()[4] == "local"
    assert lines[3].split()[:5] == ["3", "bob", "listen", "unix:/run/bob.sock", "(listening)"]
    assert format_sessions([]) == "no VMs"
