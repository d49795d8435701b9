"""What ``ccidemu lab`` shows while it builds and boots the guest (on stderr).

A :class:`vmc.lab.guest.BuildProgress`: one line per phase; the kernel package's download as
a progress bar on a terminal (tqdm), as one line with its size elsewhere (a log, CI).
"""

from __future__ import annotations

import time
from typing import Any, TextIO

__all__ = ["TerminalProgress"]


class TerminalProgress:
    """Phase lines (with the seconds since the start) and a download bar, on ``stream``."""

    def __init__(self, stream: TextIO, prefix: str = "ccidemu lab: ") -> None:
        self.stream = stream
        self.prefix = prefix
        self.started = time.monotonic()
        self._bar: Any = None
        self._total: int | None = None
        self._done = 0
        self.steps: list[str] = []

    @property
    def is_terminal(self) -> bool:
        try:
            return self.stream.isatty()
        except (AttributeError, ValueError):
            return False

    def step(self, text: str) -> None:
        self._close_bar()
        self.steps.append(text)
        elapsed = time.monotonic() - self.started
        self.stream.write(f"{self.prefix}[{elapsed:5.1f} s] {text}\n")
        self.stream.flush()

    def transfer(self, done: int, total: int | None) -> None:
        self._done, self._total = done, total
        if not self.is_terminal:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="B", unit_scale=True, file=self.stream,
                             leave=False, desc="  download")
        if total is not None and self._bar.total != total:
            self._bar.total = total
        self._bar.update(done - self._bar.n)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._done:
            size = self._total or self._done
            self.stream.write(f"{self.prefix}         downloaded {size / 1e6:.1f} MB\n")
            self._done = 0

    def close(self) -> None:
        self._close_bar()
        self.stream.flush()
