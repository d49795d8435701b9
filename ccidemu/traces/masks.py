"""Masks: the parts of exchanges that change every run (challenges, signatures), and
comparison of a recorded exchange with a new answer under them.  Pure.

A mask is ``PATTERN[:PART[:RANGE]]`` (docs/TRACES.md, "Masks"):

- ``PATTERN``: the command header to match, 1 to 4 bytes of hex where ``..`` matches any
  byte: ``..87`` (any class, INS 87), ``00cb3fff``, ``..87..9a``.
- ``PART``: ``response`` (default; the response data, SW1 SW2 always compared), ``command``
  (the command's data field, after Lc), or ``both``.
- ``RANGE``: ``START-END`` byte offsets into that data (end exclusive), or ``START-`` to the
  end, which also allows the lengths to differ; default ``0-``, all of it.

The preset ``volatile`` is GET CHALLENGE answers (``..84``), GENERAL AUTHENTICATE
commands and answers (``..87:both``: ECDSA signatures, witnesses and challenges) and
Yubico's ATTEST (``..f9``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ccidemu.errors import ConfigError

__all__ = ["PRESETS", "Mask", "data_start", "mask_command", "parse_masks", "same_data"]

_PATTERN = re.compile(r"^((?:[0-9a-fA-F]{2}|\.\.){1,4})$")
_RANGE = re.compile(r"^(\d+)-(\d*)$")

PRESETS: dict[str, tuple[str, ...]] = {
    "volatile": ("..84:response", "..87:both", "..f9:response"),
}


@dataclass(frozen=True, slots=True)
class Mask:
    """One mask (see the module docstring); ``text`` is how it was written."""

    text: str
    pattern: tuple[int | None, ...]  # header bytes, None = any
    command: bool
    response: bool
    start: int = 0
    end: int | None = None  # None: to the end, lengths may differ

    def matches(self, command: bytes) -> bool:
        if len(command) < len(self.pattern):
            return False
        return all(p is None or command[i] == p for i, p in enumerate(self.pattern))


def _parse_one(text: str) -> Mask:
    parts = text.strip().split(":")
    if not 1 <= len(parts) <= 3 or not _PATTERN.match(parts[0]):
        raise ConfigError(f"mask {text!r}: expected PATTERN[:PART[:START-END]] with PATTERN "
                          "1-4 header bytes of hex or '..' (e.g. ..87:response)")
    raw = parts[0]
    pattern = tuple(None if raw[i:i + 2] == ".." else int(raw[i:i + 2], 16)
                    for i in range(0, len(raw), 2))
    part = parts[1].lower() if len(parts) > 1 and parts[1] else "response"
    if part not in ("response", "command", "both"):
        raise ConfigError(f"mask {text!r}: PART must be response, command or both")
    start, end = 0, None
    if len(parts) == 3:
        found = _RANGE.match(parts[2])
        if not found:
            raise ConfigError(f"mask {text!r}: RANGE must be START-END or START-")
        start = int(found.group(1))
        end = int(found.group(2)) if found.group(2) else None
        if end is not None and end <= start:
            raise ConfigError(f"mask {text!r}: END must be greater than START")
    return Mask(text, pattern, part in ("command", "both"), part in ("response", "both"),
                start, end)


def parse_masks(specs: Iterable[str]) -> tuple[Mask, ...]:
    """Masks from ``--mask`` values (a value may hold several, comma-separated, or a preset)."""
    out: list[Mask] = []
    for spec in specs:
        for item in spec.split(","):
            item = item.strip()
            if not item:
                continue
            if item in PRESETS:
                out.extend(_parse_one(p) for p in PRESETS[item])
            else:
                out.append(_parse_one(item))
    return tuple(out)


def data_start(command: bytes) -> int:
    """Where a command APDU's data field starts (ISO/IEC 7816-3:2006 section 12.1.3)."""
    if len(command) <= 5:
        return len(command)
    if command[4] == 0 and len(command) >= 7:
        return 7
    return 5


def _masked(masks: Sequence[Mask], command: bytes, *, response: bool) -> list[Mask]:
    return [m for m in masks if (m.response if response else m.command) and m.matches(command)]


def _cut(data: bytes, mask: Mask) -> bytes:
    if mask.end is None:
        return data[: mask.start]
    return data[: mask.start] + b"\0" * max(0, min(len(data), mask.end) - mask.start) + data[
        mask.end:]


def same_data(a: bytes, b: bytes, masks: Sequence[Mask]) -> bool:
    """``a == b`` outside the masked ranges."""
    for mask in masks:
        a, b = _cut(a, mask), _cut(b, mask)
    return a == b


def mask_command(command: bytes, masks: Sequence[Mask]) -> bytes:
    """``command`` with its masked data replaced (for matching commands under masks)."""
    if not masks:
        return command
    chosen = _masked(masks, command, response=False)
    if not chosen:
        return command
    at = data_start(command)
    data = command[at:]
    for mask in chosen:
        data = _cut(data, mask)
    return command[:at] + data


def response_masks(masks: Sequence[Mask], command: bytes) -> list[Mask]:
    return _masked(masks, command, response=True)


def command_masks(masks: Sequence[Mask], command: bytes) -> list[Mask]:
    return _masked(masks, command, response=False)
