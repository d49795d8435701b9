"""``TraceWriter``: how every command that moves APDUs records them (``--trace FILE``).

One writer per trace file.  It opens the file private to the user
(:func:`ccidemu.files.open_private`: created 0600, appended to, refused if another user's),
writes a header line, then one line per exchange or power event, flushed at once so that a
crash loses nothing already answered.  Secrets are redacted with one
:class:`~ccidemu.redact.Redactor` per (session, reader) unless ``secrets=True``
(``--trace-secrets``), so that a GET RESPONSE continuing a secret answer is redacted too.

A disk error (full disk, I/O error, file removed under a quota) never raises into the
caller: the writer logs it once, stops writing, and keeps the reason in :attr:`failed`
(and calls ``on_error`` if given) so that the caller can report it (``ctl stats``).  Only
opening the file raises (ConfigError), at start-up where the user can fix it.

Times: ``clock`` (default :func:`time.time`) gives epoch seconds; a record's time is
``at`` when given (the epoch time the command arrived) else ``clock() - duration``, and is
written relative to the header's start.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO

from ccidemu.files import open_private
from ccidemu.redact import Redactor
from ccidemu.traces.jsonl import format_header, format_record
from ccidemu.traces.model import Exchange, PowerEvent, PowerKind, Record, TraceHeader

__all__ = ["TraceWriter"]

log = logging.getLogger(__name__)


class TraceWriter:
    """Records exchanges and power events into a trace file (see the module docstring).

    ``source`` names the recording tool in the header (``"ccidemu serve"``).  ``atr``,
    ``protocol``, ``reader``: what the header says when there is one card; power events
    carry each reader's ATR anyway.  Thread-safety: the caller serialises calls (the
    daemon holds its lock; the bridges are single-threaded).
    """

    def __init__(
        self,
        path: Path,
        *,
        source: str,
        secrets: bool = False,
        atr: bytes | None = None,
        protocol: str | None = None,
        reader: str | None = None,
        clock: Callable[[], float] = time.time,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.secrets = secrets
        self._clock = clock
        self._on_error = on_error
        self.start = clock()
        self.header = TraceHeader(source=source, start=self.start, atr=atr, protocol=protocol,
                                  reader=reader, secrets=secrets)
        #: Why writing stopped (a disk error), None while all is well.
        self.failed: str | None = None
        #: Records written (header excluded).
        self.records = 0
        self._redactors: dict[tuple[int | None, str | None], Redactor] = {}
        #: the --compare card's answers, a stream of their own (made at the first compare)
        self._compare_redactors: dict[tuple[int | None, str | None], Redactor] = {}
        self._file: IO[str] | None = open_private(self.path, "trace file")  # ConfigError
        self._write(format_header(self.header))

    # --- recording -----------------------------------------------------------------------

    def exchange(
        self,
        command: bytes,
        response: bytes,
        *,
        reader: str | int | None = None,
        session: int | None = None,
        duration: float = 0.0,
        at: float | None = None,
        error: str | None = None,
        compare: bytes | None = None,
        compare_error: str | None = None,
    ) -> None:
        """Record one exchange (``response`` b"" with ``error`` when the card could not
        answer); redacted unless the writer was made with ``secrets=True``.

        ``compare`` / ``compare_error`` (``serve --compare``): the reference card's differing
        answer, or why it had none; redacted as a response of its own stream.
        """
        if self._file is None:
            return
        name = None if reader is None else str(reader)
        redactor = self._redactors.get((session, name))
        if redactor is None:
            redactor = self._redactors[(session, name)] = Redactor(self.secrets)
        shown = redactor.exchange(bytes(command), bytes(response))
        shown_compare = None
        other = self._compare_redactors.get((session, name))
        if other is None and compare is not None:
            other = self._compare_redactors[(session, name)] = Redactor(self.secrets)
        if other is not None:  # an answer equal to the card's is not given: it is response
            seen = other.exchange(bytes(command), bytes(response if compare is None
                                                        else compare)).response
            shown_compare = seen if compare is not None else None
        when = (self._clock() - duration) if at is None else at
        self.write(Exchange(
            command=shown.command, response=shown.response, t=when - self.start,
            duration=duration, reader=name, session=session,
            command_redacted=len(shown.command) != len(command),
            response_redacted=len(shown.response) != len(response), error=error,
            compare=shown_compare,
            compare_redacted=compare is not None and shown_compare != bytes(compare),
            compare_error=compare_error))

    def power(
        self,
        kind: PowerKind | str,
        *,
        reader: str | int | None = None,
        session: int | None = None,
        atr: bytes | None = None,
        at: float | None = None,
        error: str | None = None,
    ) -> None:
        """Record a power or presence event (``atr``: the answer to a power-on or reset).

        A power event ends a secret answer's GET RESPONSE chain for its reader.
        """
        if self._file is None:
            return
        name = None if reader is None else str(reader)
        for redactors in (self._redactors, self._compare_redactors):
            redactor = redactors.get((session, name))
            if redactor is not None:
                redactor.reset()
        when = self._clock() if at is None else at
        self.write(PowerEvent(kind=PowerKind(kind), t=when - self.start, reader=name,
                              session=session, atr=None if atr is None else bytes(atr),
                              error=error))

    def write(self, record: Record) -> None:
        """Write a record as it is (already redacted by the caller, or imported)."""
        if self._file is None:
            return
        if self._write(format_record(record)):
            self.records += 1

    def _write(self, line: str) -> bool:
        f = self._file
        if f is None:
            return False
        try:
            f.write(line + "\n")
            f.flush()
        except (OSError, ValueError) as exc:  # ValueError: the file was closed under us
            self._fail(f"{exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}")
            return False
        return True

    def _fail(self, reason: str) -> None:
        self.failed = f"cannot write trace file {self.path}: {reason}"
        log.error("%s; tracing stopped", self.failed)
        f, self._file = self._file, None
        if f is not None:
            with contextlib.suppress(OSError, ValueError):
                f.close()
        if self._on_error is not None:
            try:
                self._on_error(self.failed)
            except Exception:  # the caller's report must not break the caller
                log.exception("trace on_error callback failed")

    # --- life cycle ----------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """True while records are being written (not closed, no disk error)."""
        return self._file is not None

    def close(self) -> None:
        """Flush and close; idempotent; a disk error here is reported like any other."""
        f, self._file = self._file, None
        if f is None:
            return
        try:
            f.close()
        except OSError as exc:
            self._file = None
            self.failed = f"cannot write trace file {self.path}: {exc.strerror or exc}"
            log.error("%s", self.failed)

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
