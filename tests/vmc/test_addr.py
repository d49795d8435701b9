"""Address parsing for --connect/--listen/--control/--vpcd."""

from __future__ import annotations

from pathlib import Path

import pytest

from ccidemu.errors import ConfigError
from vmc.addr import TcpAddress, UnixAddress, parse_address


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tcp:127.0.0.1:2001", TcpAddress("127.0.0.1", 2001)),
        ("tcp:localhost:0", TcpAddress("localhost", 0)),
        ("tcp:[::1]:2001", TcpAddress("::1", 2001)),
        ("unix:/run/x.sock", UnixAddress(Path("/run/x.sock"))),
        ("unix:rel/x.sock", UnixAddress(Path("rel/x.sock"))),
    ],
)
def test_parse(text: str, expected: object) -> None:
    parsed = parse_address(text)
    assert parsed == expected
    assert str(parsed) == text


@pytest.mark.parametrize(
    "text",
    ["127.0.0.1:2001", "tcp:2001", "tcp::2001", "tcp:h:x", "tcp:h:70000", "unix:", "udp:h:1",
     "tcp:[::1]2001"],
)
def test_reject(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_address(text)


def test_connect_unix_and_tcp(tmp_path: Path) -> None:
    import socket

    from vmc.addr import connect

    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as srv:
        srv.bind(str(path))
        srv.listen(1)
        with connect(UnixAddress(path), timeout=2) as c:
            conn, _ = srv.accept()
            c.sendall(b"x")
            assert conn.recv(1) == b"x"
            conn.close()
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        with connect(TcpAddress("localhost", srv.getsockname()[1]), timeout=2) as c:
            conn, _ = srv.accept()
            assert c.gettimeout() == 2
            conn.close()
    with pytest.raises(OSError):
        connect(UnixAddress(tmp_path / "missing.sock"), timeout=1)
