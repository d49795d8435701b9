"""Shared helpers for the construct-based codecs: every failure becomes DecodeError/EncodeError.

construct, struct and friends raise a zoo of exceptions on bad input; codecs call
:func:`parse` and :func:`build` so that only our own errors leave a decoder.
"""

from __future__ import annotations

import logging
import struct
from collections import deque
from typing import Any, ClassVar, Generic, TypeVar

import construct

from ccidemu.errors import DecodeError, EncodeError

logger = logging.getLogger(__name__)

#: Default cap on any length field read from a peer: well above the largest legal
#: message (an extended APDU of 65,535 data bytes plus headers), far below harm.
DEFAULT_MAX_LENGTH = 1 << 20

_PARSE_ERRORS = (
    construct.ConstructError,
    struct.error,
    ValueError,
    IndexError,
    KeyError,
    TypeError,
    OverflowError,
    UnicodeError,
    AttributeError,
)


def parse(fmt: construct.Construct, data: bytes, what: str) -> Any:
    """Parse ``data`` with ``fmt``; any failure is a DecodeError naming ``what``."""
    try:
        return fmt.parse(data)
    except _PARSE_ERRORS as exc:
        raise DecodeError(f"malformed {what}: {exc}") from None


def build(fmt: construct.Construct, value: Any, what: str) -> bytes:
    """Build ``value`` with ``fmt``; any failure is an EncodeError naming ``what``."""
    try:
        out: bytes = fmt.build(value)
    except _PARSE_ERRORS as exc:
        raise EncodeError(f"cannot encode {what}: {exc}") from None
    return out


def check_length(length: int, cap: int, what: str) -> None:
    """Reject a peer's length field above ``cap`` before anything is allocated."""
    if length > cap:
        raise DecodeError(f"{what} length {length} exceeds the cap of {cap} bytes")


E = TypeVar("E")


class FrameStream(Generic[E]):
    """Sans-I/O framing shared by the stream decoders (VSCard, CCID, vdagent, vpcd).

    Feed bytes to :meth:`receive_data`; drain :meth:`next_event` until None.  Subclasses
    implement :meth:`_cut`: take every complete frame from the front of the buffer, append
    its events, return the bytes used, and raise DecodeError at the first bad frame (an
    over-long length as soon as its header is in, before any payload is buffered).

    Error contract, the same for every protocol: the events of the good frames before a
    bad one are still delivered; then :meth:`next_event` raises the DecodeError, and every
    later call to either method raises too: a byte stream cannot be resynchronised.
    """

    #: Names the stream in errors and logs, e.g. "VSCard connection".
    what: ClassVar[str] = "stream"

    def __init__(self, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        self.max_length = max_length
        self._buffer = bytearray()
        self._events: deque[E] = deque()
        self._pending_error: DecodeError | None = None
        self._dead: DecodeError | None = None

    @property
    def dead(self) -> bool:
        """True once next_event() has raised a DecodeError."""
        return self._dead is not None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buffer)

    def _cut(self, buf: bytearray, events: deque[E]) -> int:
        raise NotImplementedError

    def _broken(self) -> None:
        """Hook: drop any per-stream state besides the buffer after a bad frame."""

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes from the peer.  Raises DecodeError only if the stream is already dead."""
        if self._dead is not None:
            raise DecodeError(f"{self.what} is dead after an earlier error: {self._dead}")
        if self._pending_error is not None or not data:
            return  # an error waits to be reported; nothing after it is worth keeping
        buf = self._buffer
        buf += data
        try:
            used = self._cut(buf, self._events)
        except DecodeError as exc:
            logger.debug("%s broken: %s", self.what, exc)
            self._pending_error = exc
            buf.clear()
            self._broken()
            return
        if used:
            del buf[:used]

    def next_event(self) -> E | None:
        """The next complete event, or None if more bytes are needed.

        Raises DecodeError when the stream reaches a bad frame, and again on every later call.
        """
        if self._events:
            return self._events.popleft()
        if self._dead is not None:
            raise DecodeError(f"{self.what} is dead after an earlier error: {self._dead}")
        if self._pending_error is not None:
            self._dead = self._pending_error
            raise self._pending_error
        return None
