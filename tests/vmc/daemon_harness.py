"""Helpers for the daemon tests: an in-process ``Daemon`` and small exchange helpers."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

from vmc.daemon import Daemon, ServeConfig
from vmc.fakeqemu import FakeQemu

H = bytes.fromhex


class RunningDaemon:
    """A Daemon on an event loop in a background thread."""

    def __init__(self, config: ServeConfig) -> None:
        self.daemon = Daemon(config)
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise TimeoutError("daemon did not start")
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        async def main() -> None:
            try:
                await self.daemon.start()
            except BaseException as exc:
                self._error = exc
                self._started.set()
                return
            self._started.set()
            await self.daemon.run()

        self.loop.run_until_complete(main())
        self.loop.close()

    def call(self, func: Any, *args: Any) -> Any:
        """Run ``func(*args)`` on the daemon's loop; its result."""
        async def run() -> Any:
            return func(*args)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(5)

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.daemon.request_stop)
            self._thread.join(10)
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
