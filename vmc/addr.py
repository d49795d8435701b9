"""Socket addresses as users write them: ``tcp:HOST:PORT`` or ``unix:PATH``.

IPv6 hosts go in brackets (``tcp:[::1]:2001``).  A bare ``HOST:PORT`` is not
accepted: the scheme is required so that a path is never mistaken for a host.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ccidemu.errors import ConfigError


@dataclass(frozen=True)
class TcpAddress:
    host: str
    port: int
    kind: Literal["tcp"] = "tcp"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


@dataclass(frozen=True)
class UnixAddress:
    path: Path
    kind: Literal["unix"] = "unix"

    def __str__(self) -> str:
        return f"unix:{self.path}"


Address = TcpAddress | UnixAddress


def split_host_port(text: str, what: str, form: str, *, min_port: int) -> tuple[str, int]:
    """``HOST:PORT`` (an IPv6 host as ``[HOST]:PORT``) into (host, port); a ConfigError that
    names ``what`` (the whole input) and the ``form`` expected otherwise."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ConfigError(f"{what}: write an IPv6 host as [HOST]:PORT")
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise ConfigError(f"{what} has no port: {form}")
    if not host:
        raise ConfigError(f"{what} has no host")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"{what}: port {port_text!r} is not a number") from None
    if not min_port <= port <= 65535:
        raise ConfigError(f"{what}: port {port} is out of range")
    return host, port


def parse_address(text: str) -> Address:
    """Parse ``tcp:HOST:PORT`` or ``unix:PATH``; ConfigError with the reason otherwise."""
    scheme, sep, rest = text.partition(":")
    if not sep:
        raise ConfigError(f"address {text!r} needs a scheme: tcp:HOST:PORT or unix:PATH")
    if scheme == "unix":
        if not rest:
            raise ConfigError(f"address {text!r} has no path")
        return UnixAddress(Path(rest))
    if scheme != "tcp":
        raise ConfigError(f"address {text!r}: unknown scheme {scheme!r} (use tcp: or unix:)")
    host, port = split_host_port(rest, f"address {text!r}", "tcp:HOST:PORT", min_port=0)
    return TcpAddress(host, port)


def connect(address: Address, timeout: float | None = None) -> socket.socket:
    """A blocking stream socket connected to ``address`` (OSError if nobody answers).

    ``timeout`` bounds the connect and stays set on the socket; names are resolved for TCP.
    """
    if isinstance(address, UnixAddress):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(str(address.path))
        except OSError:
            sock.close()
            raise
        return sock
    return socket.create_connection((address.host, address.port), timeout=timeout)
