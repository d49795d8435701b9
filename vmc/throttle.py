"""A rate limit for log lines a peer can cause (docs/SECURITY.md, "Log volume").

A hostile guest can send malformed frames, unknown messages or connections as fast as it
likes; each would cost a log line, and a disk fills.  A :class:`LogThrottle` lets ``burst``
lines through, then refills at ``rate`` lines per second (a token bucket); lines over the limit
are counted, and the next line that gets through (or :meth:`LogThrottle.flush`) first says how
many were suppressed, and what the last of them said.  Pure: the time is passed in.
"""

from __future__ import annotations

import logging

__all__ = ["LogThrottle"]


class LogThrottle:
    """Token-bucket limit on one source's log lines (see the module docstring)."""

    __slots__ = ("_last", "_logger", "_tokens", "_updated", "burst", "label", "rate",
                 "suppressed")

    def __init__(
        self, logger: logging.Logger, label: str, *, burst: int = 50, rate: float = 2.0
    ) -> None:
        self._logger = logger
        self.label = label
        self.burst = burst
        self.rate = rate
        self._tokens = float(burst)
        self._updated: float | None = None
        self._last: tuple[str, tuple[object, ...]] = ("", ())
        self.suppressed = 0

    def log(self, now: float, level: int, msg: str, *args: object) -> bool:
        """Log ``msg % args`` at ``level`` unless over the limit; True when it was logged."""
        if not self._logger.isEnabledFor(level):
            return False
        if self._updated is not None:
            self._tokens = min(float(self.burst),
                               self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        if self._tokens < 1.0:
            self.suppressed += 1
            self._last = (msg, args)
            return False
        self._tokens -= 1.0
        if self.suppressed:
            self._summary(level)
        self._logger.log(level, msg, *args)
        return True

    def flush(self, level: int = logging.WARNING) -> None:
        """Say how many lines were suppressed, if any (e.g. when the source goes away)."""
        if self.suppressed:
            self._summary(level)

    def _summary(self, level: int) -> None:
        count, self.suppressed = self.suppressed, 0
        msg, args = self._last
        try:
            last = msg % args
        except (TypeError, ValueError):
            last = msg
        self._logger.log(level, "%s: %d log line%s suppressed (rate limit); the last: %s",
                         self.label, count, "" if count == 1 else "s", last[:300])
