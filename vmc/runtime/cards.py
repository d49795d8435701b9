"""Readers and the card host: the one place that calls cards, and decides how.

A :class:`Reader` is one virtual reader of a VM: its card (opened once, when the VM is
attached, and kept across the VM's connections, so that retry counters and blocked state
hold), its presence (a card in it or not, changed by ``ctl insert/remove`` or by the card's
own :class:`~ccidemu.card.ReaderEvents`) and whether it is plugged in.

The :class:`CardHost` runs every card call (power on, transmit, power off) of every reader:

* *inline*, in the loop thread, for a pure emulated card and a cheap command (SELECT, GET
  DATA, GET RESPONSE...): a thread hand-off would cost more than the command;
* in the shared *heavy pool* (one thread per CPU, at a lower scheduling priority) for the
  commands an emulated card says are costly (:class:`~ccidemu.card.CostHint`: RSA, key
  generation, a state write with fsync), so one VM's private-key work never holds up another
  VM's trivial APDUs (docs/PERFORMANCE.md, "Head of line");
* in the reader's *own thread* for a blocking card (PC/SC, USB passthrough): it may wait on
  a device for seconds, and calls to one device stay in order.  A call that does not return
  within ``timeout`` fails (the guest sees a failed transmit), the card is asked to
  :class:`~ccidemu.card.Cancellable` cancel, and a late answer is dropped.

Calls to one reader never overlap and run in the order they were asked for: while one runs
off the loop, later ones (even cheap ones) wait in the reader's queue.  Answers come back
to the loop thread through :meth:`vmc.runtime.loop.Loop.call_soon`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

from ccidemu.card import (
    Cancellable,
    Card,
    CardInserted,
    CardRemoved,
    CostHint,
    ReaderEvent,
    ReaderEvents,
    ReaderUnplugged,
)
from ccidemu.errors import CardError, CcidemuError
from vmc.runtime.loop import Loop
from vmc.touch import TouchSensor

__all__ = ["DEFAULT_TIMEOUT", "CardHost", "Reader", "describe_error"]

log = logging.getLogger(__name__)

#: Seconds a blocking card may take for one call before the call fails.
DEFAULT_TIMEOUT = 30.0
#: The heavy pool's threads run this much nicer than the loop (Linux per-thread priority).
HEAVY_NICENESS = 10

#: A card call: runs with the card, returns the call's result.
Call = Callable[[Card], object]
Done = Callable[[object], None]
Failed = Callable[[str], None]


def describe_error(exc: BaseException) -> str:
    """A card exception as the reason a guest's transmit failed (logs and traces)."""
    if isinstance(exc, CardError):
        return f"card error: {exc}"
    return f"{type(exc).__name__}: {exc}"


@dataclass
class _Job:
    call: Call
    done: Done
    failed: Failed
    heavy: bool


class Reader:
    """One virtual reader of a VM (see the module docstring).  Loop thread only."""

    def __init__(self, index: int, spec: str, card: Card, *, present: bool = True,
                 touch: TouchSensor | None = None) -> None:
        self.index = index
        self.spec = spec
        self.card = card
        #: this reader's touch sensor (vmc.touch; None: touched at once), kept when
        #: ``ctl insert --card`` puts another card in
        self.touch = touch
        self.present = present  # a card is in the reader
        self.plugged = True  # the reader exists (a host reader can be unplugged)
        self.name = f"ccidemu reader {index}"
        #: Called (loop thread) with each presence change, by whoever shows this reader to
        #: a peer (the VM's active channel); None when nobody does.
        self.listener: Callable[[Reader, ReaderEvent], None] | None = None
        self._queue: deque[_Job] = deque()
        self._running = False  # a call of this reader runs off the loop
        self._generation = 0  # bumped by a timeout: a late answer is dropped
        self._worker: ThreadPoolExecutor | None = None
        self._watching = False
        self._inline = not card.blocking
        self._costly = card.costly if isinstance(card, CostHint) and self._inline else None

    def replace_card(self, spec: str, card: Card) -> None:
        """A new card for this reader (``ctl insert --card``; only while it has none)."""
        assert self.idle and not self.present
        self.spec = spec
        self.card = card
        self._inline = not card.blocking
        self._costly = card.costly if isinstance(card, CostHint) and self._inline else None

    @property
    def idle(self) -> bool:
        return not self._running and not self._queue

    def cheap(self, command: bytes) -> bool:
        """Whether ``command`` can be answered inline right now (the hot path)."""
        if not self._inline or self._running or self._queue:
            return False
        return self._costly is None or not self._costly(command)


class CardHost:
    """Runs every card call of every reader (see the module docstring)."""

    def __init__(self, loop: Loop, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._loop = loop
        self.timeout = timeout
        self._heavy = ThreadPoolExecutor(
            max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="ccidemu-heavy",
            initializer=_lower_priority,
        )
        self._closed = False

    # ---------------------------------------------------------------- calls (loop thread)

    def transmit_inline(self, reader: Reader, command: bytes) -> bytes:
        """Answer ``command`` now (only after :meth:`Reader.cheap` said yes).  Raises what the
        card raises."""
        return reader.card.transmit(command)

    def transmit(self, reader: Reader, command: bytes, done: Done, failed: Failed) -> None:
        """Give ``command`` to the card, inline or off the loop; ``done(response)`` or
        ``failed(reason)`` is called in the loop thread."""
        heavy = not reader.cheap(command)
        self._run(reader, _Job(lambda card: card.transmit(command), done, failed, heavy))

    def power_on(self, reader: Reader, done: Done, failed: Failed) -> None:
        self._run(reader, _Job(lambda card: card.power_on(), done, failed,
                               reader.card.blocking))

    def power_off(self, reader: Reader) -> None:
        """Power the card off (in order after what is queued); failures are only logged."""
        def quiet(reason: str) -> None:
            log.warning("reader %s: card power-off failed: %s", reader.spec, reason)

        self._run(reader, _Job(lambda card: card.power_off(), _ignore, quiet,
                               reader.card.blocking))

    def _run(self, reader: Reader, job: _Job) -> None:
        if self._closed:
            job.failed("the daemon is stopping")
            return
        if reader._running or reader._queue:
            reader._queue.append(job)
            return
        self._start(reader, job)

    def _start(self, reader: Reader, job: _Job) -> None:
        if not job.heavy and reader._inline:
            try:
                result = job.call(reader.card)
            except Exception as exc:
                _log_unexpected(reader, exc)
                job.failed(describe_error(exc))
            else:
                job.done(result)
            return
        reader._running = True
        generation = reader._generation
        timer = None
        if reader.card.blocking:
            timer = self._loop.call_later(self.timeout, lambda: self._timed_out(reader, job,
                                                                                generation))

        def work() -> None:  # a worker thread
            result: object = None
            error: BaseException | None = None
            try:
                result = job.call(reader.card)
            except BaseException as exc:
                error = exc
            self._loop.call_soon(
                partial(self._finished, reader, job, generation, timer, result, error))

        try:
            executor = self._heavy if reader._inline else self._worker_of(reader)
            executor.submit(work)
        except RuntimeError:  # shut down
            reader._running = False
            job.failed("the daemon is stopping")

    def _worker_of(self, reader: Reader) -> ThreadPoolExecutor:
        if reader._worker is None:
            reader._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ccidemu-card")
        return reader._worker

    def _finished(
        self, reader: Reader, job: _Job, generation: int, timer: object,
        result: object, exc: BaseException | None,
    ) -> None:
        if generation != reader._generation:  # timed out already: answered, moved on
            return
        if timer is not None:
            timer.cancel()  # type: ignore[attr-defined]
        reader._running = False
        if exc is not None:
            _log_unexpected(reader, exc)
            job.failed(describe_error(exc))
        else:
            job.done(result)
        self._next(reader)

    def _timed_out(self, reader: Reader, job: _Job, generation: int) -> None:
        if generation != reader._generation or not reader._running:
            return
        reader._generation += 1
        reader._running = False
        log.error("reader %s: the card did not answer within %.0f s; giving up on that call",
                  reader.spec, self.timeout)
        if isinstance(reader.card, Cancellable):
            try:
                reader.card.cancel()
            except Exception as exc:
                log.warning("reader %s: cancel failed: %s", reader.spec, describe_error(exc))
        # The stuck thread is abandoned; the next call gets a fresh one.
        if reader._worker is not None:
            reader._worker.shutdown(wait=False)
            reader._worker = None
        job.failed(f"the card did not answer within {self.timeout:.0f} s")
        self._next(reader)

    def _next(self, reader: Reader) -> None:
        while reader._queue and not reader._running:
            self._start(reader, reader._queue.popleft())

    # ---------------------------------------------------------------- events

    def watch(self, reader: Reader) -> None:
        """Start the card's own presence reports, if it makes any (loop thread)."""
        card = reader.card
        if reader._watching or not isinstance(card, ReaderEvents):
            return

        def notify(event: ReaderEvent) -> None:  # any thread
            self._loop.call_soon(lambda: self._event(reader, event))

        try:
            card.watch(notify)
        except Exception as exc:
            log.error("reader %s: cannot watch the card's presence: %s", reader.spec,
                      describe_error(exc))
            return
        reader._watching = True

    def _event(self, reader: Reader, event: ReaderEvent) -> None:
        if isinstance(event, CardInserted):
            if reader.present and reader.plugged:
                return
            reader.present = reader.plugged = True
        elif isinstance(event, CardRemoved):
            if not reader.present:
                return
            reader.present = False
        elif isinstance(event, ReaderUnplugged):
            if not reader.plugged:
                return
            reader.plugged = reader.present = False
        log.info("reader %s: %s", reader.spec, _event_text(event))
        if reader.listener is not None:
            reader.listener(reader, event)

    def set_presence(self, reader: Reader, event: ReaderEvent) -> None:
        """A presence change asked for by the control socket (loop thread)."""
        self._event(reader, event)

    # ---------------------------------------------------------------- life cycle

    def retire(self, reader: Reader) -> None:
        """The reader is going away (its VM detached): stop watching, stop its thread."""
        card = reader.card
        if reader._watching and isinstance(card, ReaderEvents):
            with contextlib.suppress(Exception):
                card.unwatch()
        reader._watching = False
        if isinstance(card, Cancellable) and reader._running:
            with contextlib.suppress(Exception):
                card.cancel()
        if reader._worker is not None:
            reader._worker.shutdown(wait=False)
            reader._worker = None

    def close(self) -> None:
        self._closed = True
        self._heavy.shutdown(wait=False, cancel_futures=True)


def _ignore(_: object) -> None:
    pass


def _event_text(event: ReaderEvent) -> str:
    if isinstance(event, CardInserted):
        return "card inserted"
    if isinstance(event, CardRemoved):
        return "card removed"
    return "reader unplugged" + (f" ({event.reason})" if event.reason else "")


def _log_unexpected(reader: Reader, exc: BaseException) -> None:
    if not isinstance(exc, CcidemuError):
        log.error("reader %s: the card raised %r", reader.spec, exc, exc_info=exc)


def _lower_priority() -> None:
    """Heavy-pool threads yield to the loop and to other VMs' cheap work (Linux: per thread)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HEAVY_NICENESS)
