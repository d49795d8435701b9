"""Replay: a trace as a card (``--card replay:TRACE``), and a trace against a card.

As a card (:class:`ReplayCard`, pure, ``blocking = False``): power-on answers the trace's
ATR, and each command gets the recorded answer.

- *strict* (the default): commands must come in the recorded order.  The next recorded
  command must equal the one received (outside command masks; a command recorded redacted
  matches on its redacted form); a mismatch is answered 6F00 (ISO/IEC 7816-4 section 5.6,
  "no precise diagnosis"), reported with both commands and the position, and the position
  does not move, so a retried command can still match.
- *match*: the answer of the first recorded exchange with the same command (under masks)
  at or after the position of the last match, else the first one from the start; so a
  client that skips or repeats commands still gets consistent answers, and a GET RESPONSE
  gets the continuation that follows its command.  An unknown command is answered 6F00
  and reported.

Both answer 6F00 where the trace cannot: past its end, an exchange recorded without a
response, or a response the capture truncated.  Power-on does not rewind: a recording is
one timeline, and cards keep their position across resets.

Against a card (:class:`CardReplay`): send the trace's commands to any :class:`Card`,
apply its power events (unless told not to), and report every difference in ATR, status
word or data (:mod:`ccidemu.traces.compare`); commands redacted when recorded cannot be
sent and are counted as skipped.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ccidemu.card import Card
from ccidemu.errors import CcidemuError, ConfigError
from ccidemu.redact import is_secret_command, redact_command
from ccidemu.sw import SW, sw_bytes
from ccidemu.traces.compare import Difference, DifferenceKind, compare_response
from ccidemu.traces.masks import Mask, command_masks, mask_command, parse_masks
from ccidemu.traces.model import Exchange, PowerEvent, PowerKind, Record, TraceHeader

__all__ = ["CardReplay", "Mismatch", "ReplayCard", "ReplayStats", "load_replay_card",
           "open_replay_card"]

log = logging.getLogger(__name__)

_NO_DIAGNOSIS = sw_bytes(SW.NO_PRECISE_DIAGNOSIS)
#: An ATR for traces that name none (TS 3B, T0 with 9 historical bytes "ccidemu-R").
DEFAULT_ATR = bytes.fromhex("3B09") + b"ccidemu-R"
_LOGGED = 10


@dataclass(frozen=True, slots=True)
class Mismatch:
    """A command the replay card could not answer from the trace."""

    number: int  # the command's number since the card was made, from 1
    position: int  # the trace exchange expected (strict) or the last matched (match), from 1
    command: bytes
    expected: bytes | None  # the recorded command expected there (strict), else None
    reason: str

    def describe(self) -> str:
        text = (f"replay: command #{self.number} {self.command.hex().upper()[:64]} "
                f"{self.reason} at trace exchange #{self.position}")
        if self.expected is not None:
            text += f" (expected {self.expected.hex().upper()[:64]})"
        return text + ": answered 6F00"


class ReplayCard:
    """A trace's answers as a card (see the module docstring)."""

    blocking: ClassVar[bool] = False

    def __init__(
        self,
        exchanges: Sequence[Exchange],
        atr: bytes | None = None,
        *,
        mode: str = "strict",
        masks: Sequence[Mask] = (),
        label: str = "trace",
    ) -> None:
        if mode not in ("strict", "match"):
            raise ConfigError(f"replay mode {mode!r}: strict or match")
        self.exchanges = list(exchanges)
        self.atr = atr or DEFAULT_ATR
        self.mode = mode
        self.masks = tuple(masks)
        self.label = label
        self.position = 0  # strict: the next exchange; match: after the last match
        self.commands = 0
        self.mismatches: list[Mismatch] = []
        self.mismatch_count = 0
        self._index: dict[bytes, list[int]] = {}
        if mode == "match":
            for i, ex in enumerate(self.exchanges):
                self._index.setdefault(self._key(ex.command, ex.command_redacted), []).append(i)

    @property
    def name(self) -> str:
        return f"replay of {self.label} ({self.mode}, {len(self.exchanges)} exchanges)"

    def power_on(self) -> bytes:
        return self.atr

    def power_off(self) -> None:
        pass

    def _key(self, command: bytes, redacted: bool) -> bytes:
        if redacted:
            return redact_command(command)[0]
        return mask_command(command, self.masks) if self.masks else command

    def _answer(self, exchange: Exchange, position: int, command: bytes) -> bytes:
        if exchange.truncated:
            return self._miss(command, position, None, "has a response truncated by the capture")
        if len(exchange.response) < 2:
            return self._miss(command, position, None, "has no recorded response")
        return exchange.response

    def _miss(self, command: bytes, position: int, expected: bytes | None, reason: str) -> bytes:
        mismatch = Mismatch(self.commands, position, command, expected, reason)
        self.mismatch_count += 1
        if len(self.mismatches) < 1000:
            self.mismatches.append(mismatch)
        if self.mismatch_count <= _LOGGED:
            log.warning("%s", mismatch.describe())
        elif self.mismatch_count == _LOGGED + 1:
            log.warning("replay: more mismatches; not logging them one by one")
        return _NO_DIAGNOSIS

    def transmit(self, apdu: bytes) -> bytes:
        self.commands += 1
        if self.mode == "strict":
            position = self.position
            if position >= len(self.exchanges):
                return self._miss(apdu, position + 1, None, "comes after the end of the trace")
            exchange = self.exchanges[position]
            recorded = exchange.command
            if apdu != recorded and not self._same(apdu, exchange):
                return self._miss(apdu, position + 1, recorded, "does not match")
            self.position = position + 1
            return self._answer(exchange, position + 1, apdu)
        key = self._key(apdu, False)
        positions = self._index.get(key)
        if positions is None and is_secret_command(apdu):
            positions = self._index.get(redact_command(apdu)[0])
        if not positions:
            return self._miss(apdu, self.position, None, "is not in the trace")
        at = bisect.bisect_left(positions, self.position)
        chosen = positions[at] if at < len(positions) else positions[0]
        self.position = chosen + 1
        return self._answer(self.exchanges[chosen], chosen + 1, apdu)

    def _same(self, apdu: bytes, exchange: Exchange) -> bool:
        if exchange.command_redacted:
            return redact_command(apdu)[0] == exchange.command
        chosen = command_masks(self.masks, apdu)
        return bool(chosen) and mask_command(apdu, chosen) == mask_command(exchange.command,
                                                                             chosen)

    def summary(self) -> str:
        return (f"replay of {self.label}: {self.commands} commands, "
                f"{self.mismatch_count} answered 6F00 (mismatches)")


def choose_reader(records: Iterable[Record], reader: str | None) -> tuple[
        list[Exchange], bytes | None, str | None]:
    """The exchanges and ATR of one reader (``reader``, or the first that has exchanges)."""
    exchanges: list[Exchange] = []
    atrs: dict[str | None, bytes] = {}
    chosen = reader
    for record in records:
        if isinstance(record, PowerEvent):
            if record.atr is not None and record.reader not in atrs:
                atrs[record.reader] = record.atr
            continue
        if chosen is None and not exchanges:
            chosen = record.reader
        if record.reader == chosen:
            exchanges.append(record)
    atr = atrs.get(chosen)
    if atr is None and len(atrs) == 1:
        atr = next(iter(atrs.values()))
    return exchanges, atr, chosen


def load_replay_card(
    path: Path, *, mode: str = "strict", masks: Sequence[Mask] = (), reader: str | None = None,
    format: str | None = None,
) -> ReplayCard:
    """A :class:`ReplayCard` from a trace file of any importable format."""
    from ccidemu.traces.formats import open_import

    imported = open_import(path, format)
    exchanges, atr, chosen = choose_reader(imported.records, reader)
    if imported.problems.count:
        log.warning("replay trace %s: %s", path, imported.problems.summary())
    if not exchanges:
        where = f" for reader {reader!r}" if reader is not None else ""
        raise ConfigError(f"replay trace {path} has no exchanges{where}")
    card = ReplayCard(exchanges, imported.header.atr or atr, mode=mode, masks=masks,
                      label=path.name)
    log.info("%s, reader %s", card.name, chosen)
    return card


def open_replay_card(argument: str, options: object) -> Card:
    """``--card replay:TRACE[,match][,strict][,mask=SPEC]...[,reader=NAME][,format=F]``."""
    path_text, *settings = argument.split(",")
    if not path_text:
        raise ConfigError("replay: needs a trace file: --card replay:TRACE[,match][,mask=...]")
    mode = "strict"
    masks: list[str] = []
    reader: str | None = None
    format: str | None = None
    for setting in settings:
        key, eq, value = setting.partition("=")
        if not eq and key in ("strict", "match"):
            mode = key
        elif key == "mask" and value:
            masks.append(value)
        elif key == "reader" and value:
            reader = value
        elif key == "format" and value:
            format = value
        else:
            raise ConfigError(f"replay: unknown setting {setting!r} (strict, match, mask=SPEC, "
                              "reader=NAME, format=F)")
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise ConfigError(f"replay: no trace file {path}")
    return load_replay_card(path, mode=mode, masks=parse_masks(masks), reader=reader,
                            format=format)


# --- against a card -------------------------------------------------------------------------


@dataclass
class ReplayStats:
    sent: int = 0
    compared: int = 0
    masked: int = 0  # equal only because of masks
    skipped: int = 0  # redacted commands, which cannot be sent
    uncomparable: int = 0  # recorded without a response
    power_events: int = 0
    differences: int = 0
    skipped_first: list[int] = field(default_factory=list)


class CardReplay:
    """Sends a trace's commands to ``card`` and yields the differences (``run()``)."""

    def __init__(
        self,
        header: TraceHeader,
        records: Iterable[Record],
        card: Card,
        *,
        masks: Sequence[Mask] = (),
        reader: str | None = None,
        power: bool = True,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self.header = header
        self.records = records
        self.card = card
        self.masks = tuple(masks)
        self.reader = reader
        self.power = power
        self.progress = progress
        self.stats = ReplayStats()
        self.atr: bytes | None = None  # the card's ATR at its last power-on

    def _power_on(self, index: int, expected: bytes | None) -> Iterator[Difference]:
        try:
            self.atr = bytes(self.card.power_on())
        except CcidemuError as exc:
            yield Difference(index, DifferenceKind.ERROR, b"", expected, None,
                             f"power-on failed: {exc}")
            return
        if expected is not None and self.atr != expected:
            yield Difference(index, DifferenceKind.ATR, b"", expected, self.atr, "ATR")

    def run(self) -> Iterator[Difference]:
        """Power the card on (ATR compared with the header's), then replay in order."""
        stats = self.stats
        chosen = self.reader
        index = 0
        yield from self._count(self._power_on(-1, self.header.atr))
        for record in self.records:
            if isinstance(record, PowerEvent):
                if chosen is not None and record.reader is not None and record.reader != chosen:
                    continue
                stats.power_events += 1
                if record.kind in (PowerKind.ON, PowerKind.RESET, PowerKind.INSERT):
                    if self.power:
                        yield from self._count(self._power_on(index, record.atr))
                    elif record.atr is not None and record.atr != self.atr:
                        yield from self._count(iter([Difference(
                            index, DifferenceKind.ATR, b"", record.atr, self.atr, "ATR")]))
                elif self.power:
                    self.card.power_off()
                continue
            if chosen is None:
                chosen = record.reader
            elif record.reader != chosen:
                continue
            yield from self._count(self._one(index, record))
            index += 1
            if self.progress is not None:
                self.progress(index)

    def _count(self, differences: Iterator[Difference]) -> Iterator[Difference]:
        for diff in differences:
            self.stats.differences += 1
            yield diff

    def _one(self, index: int, exchange: Exchange) -> Iterator[Difference]:
        stats = self.stats
        if exchange.command_redacted:
            stats.skipped += 1
            if len(stats.skipped_first) < 20:
                stats.skipped_first.append(index)
            return
        stats.sent += 1
        try:
            actual = bytes(self.card.transmit(exchange.command))
        except CcidemuError as exc:
            yield Difference(index, DifferenceKind.ERROR, exchange.command, exchange.response,
                             None, f"the card could not answer: {exc}")
            return
        if len(exchange.response) < 2 and not exchange.truncated:
            stats.uncomparable += 1
            return
        stats.compared += 1
        diff, hidden = compare_response(index, exchange, actual, self.masks)
        stats.masked += hidden
        if diff is not None:
            yield diff
