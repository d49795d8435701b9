"""The runtime's one event loop: a selector thread with thread-safe posting and timers.

Everything the daemon owns (endpoints, channels, readers, the control server) is touched only
in this thread; other threads (card workers, backend event threads, the opener pool, signal
handlers) hand work to it with :meth:`Loop.call_soon`.  A plain selector loop, not asyncio: a
round trip through asyncio costs more than an APDU's whole budget (docs/PERFORMANCE.md,
"Daemon").  Time is read here (``time.monotonic``) and passed down to the sans-I/O engines.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable

from ccidemu.errors import describe_exception

__all__ = ["READ", "READ_BUFFER_SIZE", "WRITE", "Loop", "Timer"]

log = logging.getLogger(__name__)

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE

#: The size of the loop's one read buffer (every read of every socket lands there: no
#: allocation and no buffer per connection; longer frames are assembled by the engines).
READ_BUFFER_SIZE = 1 << 17

#: A selector callback: gets the ready events (READ and/or WRITE).
IoCallback = Callable[[int], None]


class Timer:
    """A pending :meth:`Loop.call_later`; :meth:`cancel` it (loop thread)."""

    __slots__ = ("cancelled", "func", "when")

    def __init__(self, when: float, func: Callable[[], None]) -> None:
        self.when = when
        self.func = func
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Loop:
    """A selector loop in its own thread (see the module docstring)."""

    def __init__(self, name: str = "ccidemu-loop") -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, READ, None)
        self._calls: deque[Callable[[], None]] = deque()
        self._timers: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._ident: int | None = None
        self.started = threading.Event()
        #: Shared by every transport of this loop; valid until the next read.
        self.read_buffer = bytearray(READ_BUFFER_SIZE)

    # ---------------------------------------------------------------- any thread

    def start(self) -> None:
        self._thread.start()
        self.started.wait(10)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after the calls posted so far, and wait for the thread."""
        if not self._thread.is_alive():
            self._close()
            return
        self.call_soon(self._set_stopped)
        if not self.in_thread():
            self._thread.join(timeout)

    def in_thread(self) -> bool:
        return threading.get_ident() == self._ident

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    def call_soon(self, func: Callable[[], None]) -> None:
        """Run ``func`` in the loop thread, in posting order (from the thread itself: later)."""
        self._calls.append(func)
        if not self.in_thread():
            with contextlib.suppress(OSError):  # full: a wake-up is pending anyway
                self._wake_w.send(b"\0")

    def call_in_loop(self, func: Callable[[], object], timeout: float = 30.0) -> object:
        """Run ``func`` in the loop thread and wait for its result (from another thread)."""
        if self.in_thread():
            return func()
        done = threading.Event()
        box: list[object] = []
        error: list[BaseException] = []

        def run() -> None:
            try:
                box.append(func())
            except BaseException as exc:
                error.append(exc)
            finally:
                done.set()

        self.call_soon(run)
        if not done.wait(timeout):
            raise TimeoutError("the daemon's loop did not answer")
        if error:
            raise error[0]
        return box[0]

    # ---------------------------------------------------------------- loop thread

    def call_later(self, delay: float, func: Callable[[], None]) -> Timer:
        timer = Timer(time.monotonic() + max(delay, 0.0), func)
        heapq.heappush(self._timers, (timer.when, next(self._order), timer))
        return timer

    def register(self, sock: socket.socket, events: int, callback: IoCallback) -> None:
        self._selector.register(sock, events, callback)

    def modify(self, sock: socket.socket, events: int, callback: IoCallback) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.modify(sock, events, callback)

    def unregister(self, sock: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(sock)

    def _set_stopped(self) -> None:
        self._stopped = True

    def _run(self) -> None:
        self._ident = threading.get_ident()
        self.started.set()
        select = self._selector.select
        calls = self._calls
        timers = self._timers
        try:
            while not self._stopped:
                timeout: float | None = None
                if calls:
                    timeout = 0
                elif timers:
                    timeout = max(0.0, timers[0][0] - time.monotonic())
                for key, events in select(timeout):
                    callback = key.data
                    if callback is None:
                        with contextlib.suppress(OSError):
                            while self._wake_r.recv(4096):
                                pass
                        continue
                    try:
                        callback(events)
                    except Exception as exc:
                        _unexpected(exc)
                if timers:
                    now = time.monotonic()
                    while timers and timers[0][0] <= now:
                        timer = heapq.heappop(timers)[2]
                        if not timer.cancelled:
                            calls.append(timer.func)
                while calls:
                    try:
                        calls.popleft()()
                    except Exception as exc:
                        _unexpected(exc)
        finally:
            self._close()

    def _close(self) -> None:
        if self._selector.get_map() is None:  # closed already
            return
        for key in list(self._selector.get_map().values()):
            if key.data is not None:
                with contextlib.suppress(OSError):
                    key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()


def _unexpected(exc: Exception) -> None:
    """The last resort for a bug that escaped every component: one line (the traceback at
    debug level, ``-vv``); the loop goes on serving."""
    log.error("unexpected error in the daemon loop: %s", describe_exception(exc))
    log.debug("the unexpected error's traceback", exc_info=exc)
