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
