"""Comparing recorded exchanges with new answers or with another trace, under masks.  Pure.

Rules (docs/TRACES.md, "Comparing"): SW1 SW2 always counts; response data counts outside
the masked ranges; a response redacted when recorded is compared by its status word only;
a response the capture truncated is compared on the captured bytes only (its status word
was cut off); an exchange recorded without a response cannot be compared.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import zip_longest
from typing import Any

from ccidemu.redact import redact_command
from ccidemu.traces.masks import Mask, command_masks, mask_command, response_masks, same_data
from ccidemu.traces.model import Exchange, Record, sw_of

__all__ = ["Difference", "DifferenceKind", "compare_response", "diff_exchanges", "exchanges_of"]


class DifferenceKind(enum.StrEnum):
    STATUS = "status"  # SW1 SW2 differ
    DATA = "data"  # same SW, response data differs outside the masks
    COMMAND = "command"  # (diff) the two traces sent different commands here
    ATR = "atr"  # the card's ATR differs
    ERROR = "error"  # the card could not answer
    MISSING = "missing"  # (diff) the second trace ends before the first
    EXTRA = "extra"  # (diff) the second trace goes on after the first


@dataclass(frozen=True, slots=True)
class Difference:
    """One difference at exchange ``index`` (0-based, in the first trace's order)."""

    index: int
    kind: DifferenceKind
    command: bytes
    expected: bytes | None
    actual: bytes | None
    detail: str = ""

    def describe(self) -> str:
        def show(data: bytes | None) -> str:
            if data is None:
                return "(none)"
            text = data.hex().upper()
            return text if len(text) <= 80 else f"{text[:72]}... ({len(data)} bytes)"

        head = f"#{self.index + 1} {self.kind.value}: {self.command[:4].hex().upper()}"
        detail = f" ({self.detail})" if self.detail else ""
        return (f"{head}{detail}\n    expected {show(self.expected)}"
                f"\n    got      {show(self.actual)}")

    def as_json(self) -> dict[str, Any]:
        return {
            "index": self.index, "kind": self.kind.value, "command": self.command.hex(),
            "expected": None if self.expected is None else self.expected.hex(),
            "actual": None if self.actual is None else self.actual.hex(),
            "detail": self.detail,
        }


def compare_response(
    index: int, expected: Exchange, actual: bytes, masks: Sequence[Mask]
) -> tuple[Difference | None, bool]:
    """(the difference or None, whether masks hid a difference) of one answer."""
    recorded = expected.response
    command = expected.command
    if expected.truncated:
        if actual.startswith(recorded):
            return None, False
        cut = actual[: len(recorded)]
        if len(cut) == len(recorded) and same_data(recorded, cut, response_masks(masks,
                                                                                  command)):
            return None, True
        return Difference(index, DifferenceKind.DATA, command, recorded, actual,
                          "recorded response truncated by the capture"), False
    sw_recorded, sw_actual = sw_of(recorded), sw_of(actual)
    if sw_recorded != sw_actual:
        detail = f"{_sw(sw_recorded)} recorded, {_sw(sw_actual)} now"
        return Difference(index, DifferenceKind.STATUS, command, recorded, actual, detail), False
    if expected.response_redacted:
        return None, False
    if recorded == actual:
        return None, False
    if same_data(recorded[:-2], actual[:-2], response_masks(masks, command)):
        return None, True
    return Difference(index, DifferenceKind.DATA, command, recorded, actual,
                      _first_difference(recorded[:-2], actual[:-2])), False


def _sw(sw: int | None) -> str:
    return "no SW" if sw is None else f"{sw:04X}"


def _first_difference(a: bytes, b: bytes) -> str:
    at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    if at is None:
        return f"{len(a)} data bytes recorded, {len(b)} now"
    return f"data differs from byte {at}"


def exchanges_of(records: Iterable[Record], reader: str | None = None) -> Iterator[Exchange]:
    """The exchanges of ``records`` (of one reader when ``reader`` is given)."""
    for record in records:
        if isinstance(record, Exchange) and (reader is None or record.reader == reader):
            yield record


def same_command(a: Exchange, b: Exchange, masks: Sequence[Mask]) -> bool:
    """The two commands are the same outside masks (a redacted one: on its redacted form)."""
    ca, cb = a.command, b.command
    if a.command_redacted != b.command_redacted:
        ca, cb = redact_command(ca)[0], redact_command(cb)[0]
    if ca == cb:
        return True
    chosen = command_masks(masks, ca)
    return bool(chosen) and mask_command(ca, chosen) == mask_command(cb, chosen)


@dataclass
class DiffStats:
    compared: int = 0
    masked: int = 0  # equal only because of masks
    uncomparable: int = 0  # one side has no response


def diff_exchanges(
    a: Iterable[Exchange], b: Iterable[Exchange], masks: Sequence[Mask] = (),
    stats: DiffStats | None = None,
) -> Iterator[Difference]:
    """Differences between two traces' exchanges, aligned by position (streaming)."""
    stats = stats if stats is not None else DiffStats()
    for index, (x, y) in enumerate(zip_longest(a, b)):
        if y is None:
            yield Difference(index, DifferenceKind.MISSING, x.command, x.response, None,
                             "the second trace ends here")
            continue
        if x is None:
            yield Difference(index, DifferenceKind.EXTRA, y.command, None, y.response,
                             "the first trace ends here")
            continue
        stats.compared += 1
        if not same_command(x, y, masks):
            yield Difference(index, DifferenceKind.COMMAND, x.command, x.command, y.command,
                             "different commands")
            continue
        x_none = len(x.response) < 2 and not x.truncated
        y_none = len(y.response) < 2 and not y.truncated
        if x_none or y_none:
            if x_none and y_none:
                stats.uncomparable += 1
            else:
                yield Difference(index, DifferenceKind.ERROR, x.command, x.response, y.response,
                                 x.error or y.error or "one trace has no response")
            continue
        if y.truncated and not x.truncated:
            x, y = y, x  # compare on what the capture kept
            diff, hidden = compare_response(index, x, y.response, masks)
            if diff is not None:
                diff = Difference(index, diff.kind, diff.command, diff.actual, diff.expected,
                                  diff.detail)
        else:
            redacted = x.response_redacted or y.response_redacted
            if redacted:
                x = Exchange(x.command, x.response, response_redacted=True)
            diff, hidden = compare_response(index, x, y.response, masks)
        stats.masked += hidden
        if diff is not None:
            yield diff
