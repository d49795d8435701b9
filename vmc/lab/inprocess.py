"""``ccidemu serve`` in this process: a :class:`vmc.daemon.Daemon` serving from a thread.

For tests that want the daemon's behaviour without a second process (start-up errors are
raised in the caller's thread as :class:`~ccidemu.errors.ConfigError` or ``OSError``, control
requests are plain method calls)::

    with ServeThread(cards=["piv:"], connect=["unix:/tmp/x/vsc.sock"]) as serve:
        serve.request({"cmd": "list"})

:class:`vmc.lab.serve.ServeProcess` is the same daemon as a subprocess.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ccidemu.cards import CardOptions
from vmc.addr import Address, parse_address
from vmc.config import DEFAULT_CARD, ServeConfig
from vmc.daemon import Daemon
from vmc.lab.errors import LabError

__all__ = ["ServeThread"]


class ServeThread:
    """A started :class:`~vmc.daemon.Daemon` serving from a daemon thread.

    Either a whole :class:`~vmc.config.ServeConfig`, or the common options: ``cards``
    (specs, one reader each), ``connect`` / ``listen`` addresses (``unix:PATH`` or
    ``tcp:HOST:PORT``, one VM each), ``state_dir`` (None: card state in memory only),
    ``trace``.  :meth:`start` (or entering the context) starts it; :meth:`stop` stops it in
    order, as SIGTERM stops ``ccidemu serve``.
    """

    def __init__(self, config: ServeConfig | None = None, *,
                 cards: Sequence[str] = (DEFAULT_CARD,),
                 connect: Sequence[str | Address] = (), listen: Sequence[str | Address] = (),
                 state_dir: Path | None = None, trace: Path | None = None) -> None:
        if config is None:
            config = ServeConfig(
                connect=[_address(a) for a in connect], listen=[_address(a) for a in listen],
                cards=list(cards), trace=trace, card_options=CardOptions(state_dir=state_dir))
        self.config = config
        self.daemon = Daemon(config)
        self._thread: threading.Thread | None = None

    def start(self) -> ServeThread:
        """Open the cards, bind the sockets, start serving; raises what ``ccidemu serve``
        would report (ConfigError, OSError) here."""
        if self._thread is not None:
            raise LabError("this ServeThread was started already")
        self.daemon.start()
        self._thread = threading.Thread(target=self.daemon.serve_forever,
                                        name="ccidemu-serve", daemon=True)
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def request(self, request: dict[str, Any], timeout: float = 30.0) -> Any:
        """One control request (as ``ccidemu ctl`` sends them, e.g. ``{"cmd": "list"}``);
        its result, or :class:`~vmc.control.ControlError`."""
        return self.daemon.request(request, timeout=timeout)

    def insert(self, card: str | None = None, vm: str = "vm1", reader: int = 0) -> Any:
        """Insert a card (``card``: a new spec; None: the reader's own card again)."""
        request: dict[str, Any] = {"cmd": "insert", "vm": vm, "reader": reader}
        if card is not None:
            request["card"] = card
        return self.request(request)

    def remove(self, vm: str = "vm1", reader: int = 0) -> Any:
        """Take the card out of a reader (the guest sees it leave)."""
        return self.request({"cmd": "remove", "vm": vm, "reader": reader})

    def stop(self, timeout: float = 30.0) -> None:
        """Stop serving (cards removed from the guests first) and wait for the thread."""
        thread = self._thread
        if thread is None:
            self.daemon.close()
            return
        self.daemon.request_stop()
        thread.join(timeout)
        if thread.is_alive():
            raise LabError(f"ccidemu serve did not stop within {timeout} s")

    def __enter__(self) -> ServeThread:
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _address(value: str | Address) -> Address:
    return parse_address(value) if isinstance(value, str) else value
