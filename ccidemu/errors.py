"""The one exception root of ccidemu and its main branches.

``DecodeError`` means a peer sent bytes that break a protocol; everything a
decoder can raise is a ``DecodeError``.  ``EncodeError`` means *we* asked for
something that cannot be put on the wire.  ``ConfigError`` covers files and
options given by the user (certificates, keys, profiles, traces, addresses).
``StatusWordError`` is raised inside card applets and turned into SW1 SW2 by
the card's dispatcher; it never reaches a peer as an exception.
"""

from __future__ import annotations


class CcidemuError(Exception):
    """Root of every exception this project raises on purpose."""


class DecodeError(CcidemuError):
    """A peer's bytes do not follow the protocol (or exceed a configured cap)."""

    def __init__(self, message: str, *, offset: int | None = None) -> None:
        super().__init__(message if offset is None else f"{message} (at byte {offset})")
        self.offset = offset


class EncodeError(CcidemuError):
    """We asked to encode a value that the wire format cannot carry."""


class ConfigError(CcidemuError):
    """A file or option given by the user is missing, malformed or inconsistent."""


class StatusWordError(CcidemuError):
    """A card applet refuses a command; ``sw`` is the ISO 7816-4 status word to return."""

    def __init__(self, sw: int, message: str = "") -> None:
        if not 0 <= sw <= 0xFFFF:  # a bug in the applet, not a status word to send
            raise ValueError(f"status word {sw:#x} does not fit in SW1 SW2")
        super().__init__(message or f"status word {sw:04X}")
        self.sw = sw


class CardError(CcidemuError):
    """A card cannot answer at all (reader gone, passthrough card removed, trace exhausted)."""


def describe_exception(exc: BaseException) -> str:
    """One line for an exception nobody expected (a bug): its type, message and the place it
    was raised (``file:line in function``), so that a log line can be reported without a
    traceback.  The traceback itself belongs at debug level."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    tb = exc.__traceback__
    if tb is None:
        return text
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    return f"{text} (at {code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno} in {code.co_name})"
