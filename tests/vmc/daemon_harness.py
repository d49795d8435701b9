"""Helpers for the daemon tests: an in-process ``Daemon`` and small exchange helpers."""

from __future__ import annotations

import socket
import threading
from typing import Any

from vmc.daemon import Daemon, ServeConfig
from vmc.fakeqemu import FakeQemu

H = bytes.fromhex


class RunningDaemon:
    """A started Daemon serving from a background thread."""

    def __init__(self, config: ServeConfig) -> None:
        self.daemon = Daemon(config)
        self.daemon.start()  # raises ConfigError here, in the test's thread
        self._thread = threading.Thread(target=self.daemon.serve_forever, daemon=True)
        self._thread.start()

    def request(self, request: dict[str, Any]) -> Any:
        """A control request in process (ControlError on refusal)."""
        return self.daemon.request(request)

    def stop(self) -> None:
        if self._thread.is_alive():
            self.daemon.request_stop()
            self._thread.join(30)
            assert not self._thread.is_alive(), "daemon did not stop"


def serve(**kw: Any) -> RunningDaemon:
    """Start an in-process daemon (default card: the built-in test card)."""
    kw.setdefault("cards", ["test:"])
    return RunningDaemon(ServeConfig(**kw))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def echo(fake: FakeQemu, payload: bytes, reader_id: int = 0, timeout: float = 5.0) -> None:
    """The test card's echo command (80 E0) through the fake QEMU; asserts the answer."""
    apdu = H("80e00000") + bytes([len(payload)]) + payload
    assert fake.transmit(apdu, reader_id, timeout=timeout) == payload + H("9000")
