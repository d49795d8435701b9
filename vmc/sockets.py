"""Socket helpers shared by the daemon (:mod:`vmc.daemon`) and the vpcd bridge (:mod:`vmc.vpcd`)."""

from __future__ import annotations

import socket

__all__ = ["BACKOFF_MAX", "BACKOFF_START", "Backoff", "set_nodelay"]

#: Seconds before the first retry of a connection, and the most between two retries.
BACKOFF_START = 0.1
BACKOFF_MAX = 2.0


class Backoff:
    """Capped exponential delays between connection attempts: ``start``, doubling to ``cap``."""

    def __init__(self, start: float = BACKOFF_START, cap: float = BACKOFF_MAX) -> None:
        self.start = start
        self.cap = cap
        self._delay = start

    def next(self) -> float:
        """The delay before this retry (the one after it is twice as long, up to ``cap``)."""
        delay = self._delay
        self._delay = min(delay * 2, self.cap)
        return delay

    def reset(self) -> None:
        """A connection did real work: start again from ``start``."""
        self._delay = self.start


def set_nodelay(sock: socket.socket) -> None:
    """``TCP_NODELAY`` on a TCP socket (a unix socket is left as it is)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
