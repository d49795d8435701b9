"""Helpers shared by the importers: hex text, readers' ATRs, the importer signature."""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Iterator

from ccidemu.traces._text import Source
from ccidemu.traces.model import PowerEvent, PowerKind, Problems, Record, TraceHeader

__all__ = ["AtrTracker", "Importer", "Item", "parse_hex"]

#: What an importer yields: its header first, then records in order.
Item = TraceHeader | Record
#: ``importer(source, problems, name)``: a generator of :data:`Item` (header first).
Importer = Callable[[Source, Problems, str], Iterator[Item]]

_HEX = frozenset(string.hexdigits)
_SEPARATORS = re.compile(r"[\s:]+")


class BadHex(ValueError):
    pass


def parse_hex(text: str) -> bytes:
    """Bytes of hex text with optional spaces or colons between bytes; BadHex otherwise."""
    digits = _SEPARATORS.sub("", text)
    if len(digits) % 2 or not all(c in _HEX for c in digits):
        bad = next((c for c in digits if c not in _HEX), None)
        raise BadHex(f"not hex: {'character ' + repr(bad) if bad else 'odd number of digits'}")
    return bytes.fromhex(digits)


def hex_tokens(text: str) -> list[str]:
    """The two-digit hex tokens at the start of a hex-dump row (stops at anything else)."""
    out: list[str] = []
    for token in text.split():
        if len(token) != 2 or not all(c in _HEX for c in token):
            break
        out.append(token)
    return out


class AtrTracker:
    """Turns "this reader has ATR X" sightings into INSERT events when the ATR changes."""

    def __init__(self) -> None:
        self._atrs: dict[str | None, bytes | None] = {}

    def seen(self, reader: str | None, atr: bytes | None, t: float | None
             ) -> PowerEvent | None:
        if self._atrs.get(reader) == atr:
            return None
        self._atrs[reader] = atr
        if atr is None:
            return PowerEvent(PowerKind.REMOVE, t=t, reader=reader)
        return PowerEvent(PowerKind.INSERT, t=t, reader=reader, atr=atr)

    def forget(self, reader: str | None) -> None:
        self._atrs.pop(reader, None)
