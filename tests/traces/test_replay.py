"""Replay as a card (strict, match, masks), replay against a card, diff, and the CLI."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccidemu.card import BuiltinTestCard
from ccidemu.cards import open_card
from ccidemu.errors import ConfigError
from ccidemu.traces import Exchange, PowerEvent, PowerKind, TraceHeader, TraceWriter
from ccidemu.traces.compare import DifferenceKind, diff_exchanges
from ccidemu.traces.masks import parse_masks
from ccidemu.traces.replay import CardReplay, ReplayCard
from vmc.cli import main

H = bytes.fromhex
ECHO = H("80E0000003010203")
SELECT = H("00A4040008F0636369646D7501")
COUNT = H("80E4000004")


def recorded(card: BuiltinTestCard, commands: list[bytes]) -> list[Exchange]:
    card.power_on()
    return [Exchange(c, card.transmit(c)) for c in commands]


def test_strict_replay_answers_in_order_and_reports_mismatches() -> None:
    trace = recorded(BuiltinTestCard(), [SELECT, ECHO, COUNT])
    card = ReplayCard(trace, BuiltinTestCard.ATR)
    assert card.power_on() == BuiltinTestCard.ATR
    assert card.transmit(SELECT) == H("9000")
    assert card.transmit(COUNT) == H("6F00")  # ECHO expected here
    assert card.mismatches[0].position == 2 and card.mismatches[0].expected == ECHO
    assert card.transmit(ECHO) == H("010203 9000")  # the position did not move
    assert card.transmit(COUNT) == trace[2].response
    assert card.transmit(COUNT) == H("6F00")  # after the end
    assert "after the end" in card.mismatches[-1].reason and card.mismatch_count == 2


def test_match_mode_follows_the_trace_and_wraps() -> None:
    trace = [Exchange(SELECT, H("9000")), Exchange(H("00C0000002"), H("aaaa 9000")),
             Exchange(ECHO, H("010203 6102")), Exchange(H("00C0000002"), H("bbbb 9000"))]
    card = ReplayCard(trace, mode="match")
    assert card.transmit(ECHO) == H("010203 6102")
    assert card.transmit(H("00C0000002")) == H("bbbb 9000")  # the one after ECHO
    assert card.transmit(H("00C0000002")) == H("aaaa 9000")  # wraps to the first
    assert card.transmit(H("00B0000000")) == H("6F00") and card.mismatch_count == 1


def test_masks_let_changing_commands_match_and_hide_changing_answers() -> None:
    masks = parse_masks(["..87:both"])
    trace = [Exchange(H("0087119A06 7C0482008100 00"), H("7C0A8208" + "11" * 8 + "9000"))]
    for mode in ("strict", "match"):
        card = ReplayCard(trace, mode=mode, masks=masks)
        assert card.transmit(H("0087119A06 7C0482008199 00")) == trace[0].response
    strict = ReplayCard(trace)
    assert strict.transmit(H("0087119A06 7C0482008199 00")) == H("6F00")
    with pytest.raises(ConfigError, match="PATTERN"):
        parse_masks(["87zz"])
    assert len(parse_masks(["volatile"])) == 3


def test_redacted_commands_match_on_their_redacted_form() -> None:
    trace = [Exchange(H("0020008008"), H("9000"), command_redacted=True)]
    assert ReplayCard(trace).transmit(H("0020008008 3132333435363738")) == H("9000")
    assert ReplayCard(trace, mode="match").transmit(H("0020008008 3132333435363738")) == H(
        "9000")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(min_size=4, max_size=30), min_size=1, max_size=20))
def test_replaying_a_recording_reproduces_it(commands: list[bytes]) -> None:
    trace = recorded(BuiltinTestCard(), commands)
    for mode in ("strict", "match"):
        card = ReplayCard(trace, mode=mode)
        got = [card.transmit(c) for c in commands]
        if mode == "strict":
            assert got == [e.response for e in trace] and card.mismatch_count == 0
        else:  # the same command may have had several answers: each is one of them
            assert all(g in [e.response for e in trace if e.command == c]
                       for g, c in zip(got, commands, strict=True))


def test_replay_against_a_card_reports_differences_and_masks() -> None:
    trace = recorded(BuiltinTestCard(), [SELECT, ECHO, COUNT, H("80E2000004")])
    header = TraceHeader(atr=BuiltinTestCard.ATR)
    changed = [*trace[:2], Exchange(COUNT, H("00000009 9000")),
               Exchange(H("80E2000004"), H("6A82"))]
    replay = CardReplay(header, changed, BuiltinTestCard())
    diffs = list(replay.run())
    assert [(d.index, d.kind) for d in diffs] == [(2, DifferenceKind.DATA),
                                                  (3, DifferenceKind.STATUS)]
    masked = CardReplay(header, changed, BuiltinTestCard(), masks=parse_masks(["80e4"]))
    assert [d.index for d in masked.run()] == [3] and masked.stats.masked == 1
    bad_atr = CardReplay(TraceHeader(atr=H("3B00")), trace, BuiltinTestCard())
    assert [d.kind for d in bad_atr.run()] == [DifferenceKind.ATR]


def test_replay_against_skips_redacted_and_applies_power() -> None:
    card = BuiltinTestCard()
    items: list[Exchange | PowerEvent] = [PowerEvent(PowerKind.ON, atr=BuiltinTestCard.ATR),
             Exchange(H("0020008008"), H("9000"), command_redacted=True),
             PowerEvent(PowerKind.OFF), Exchange(ECHO, H("010203 9000"))]
    replay = CardReplay(TraceHeader(), items, card)
    assert list(replay.run()) == []
    assert replay.stats.skipped == 1 and replay.stats.sent == 1 and not card.powered


def test_diff_traces() -> None:
    a = [Exchange(SELECT, H("9000")), Exchange(ECHO, H("010203 9000"))]
    b = [Exchange(SELECT, H("9000")), Exchange(ECHO, H("010204 9000")),
         Exchange(COUNT, H("9000"))]
    kinds = [(d.index, d.kind) for d in diff_exchanges(a, b)]
    assert kinds == [(1, DifferenceKind.DATA), (2, DifferenceKind.EXTRA)]
    assert [d.kind for d in diff_exchanges(a, b, parse_masks(["80e0"]))] == [
        DifferenceKind.EXTRA]
    truncated = [Exchange(SELECT, H("9000")), Exchange(ECHO, H("0102"), truncated=True)]
    assert list(diff_exchanges(a, truncated)) == []


# --- the replay card through the registry and the CLI ----------------------------------------


def write_trace(path: Path, items: Sequence[Exchange | PowerEvent]) -> Path:
    with TraceWriter(path, source="test", secrets=True) as writer:
        for item in items:
            writer.write(item)
    return path


def test_registry_opens_replay_cards(tmp_path: Path) -> None:
    path = write_trace(tmp_path / "t.jsonl", [PowerEvent(PowerKind.ON, atr=H("3b0a0102")),
                                              *recorded(BuiltinTestCard(), [SELECT, ECHO])])
    card = open_card(f"replay:{path},match,mask=..87")
    assert card.power_on() == H("3b0a0102") and card.transmit(ECHO) == H("010203 9000")
    with pytest.raises(ConfigError, match="unknown setting"):
        open_card(f"replay:{path},fast")
    with pytest.raises(ConfigError, match="no trace file"):
        open_card(f"replay:{tmp_path}/none.jsonl")


def test_cli_replay_diff_show_export_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                            ) -> None:
    good = write_trace(tmp_path / "good.jsonl", recorded(BuiltinTestCard(), [SELECT, ECHO]))
    bad = write_trace(tmp_path / "bad.jsonl", [Exchange(SELECT, H("6A82"))])
    assert main(["trace", "replay", str(good), "--card", "test:"]) == 0
    assert "0 difference(s)" in capsys.readouterr().out
    assert main(["trace", "replay", str(bad), "--card", "test:", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["differences"][0]["kind"] == "status" and report["stats"]["sent"] == 1
    assert main(["trace", "diff", str(good), str(bad)]) == 1
    assert "status" in capsys.readouterr().out
    assert main(["trace", "show", str(good), "--ins", "e0", "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x.get("instruction") for x in lines[1:]] == ["proprietary INS E0"]
    out = tmp_path / "script.txt"
    assert main(["trace", "export", str(good), "--to", "scriptor", "-o", str(out)]) == 0
    again = tmp_path / "again.jsonl"
    assert main(["trace", "import", str(out), "-o", str(again)]) == 0
    assert "imported 2 exchanges" in capsys.readouterr().err
    assert main(["trace", "diff", str(good), str(again)]) == 0
    assert os.stat(again).st_mode & 0o077 == 0


def test_cli_import_redacts_unless_secrets(tmp_path: Path) -> None:
    src = tmp_path / "in.script"
    src.write_text("00 20 00 80 08 31 32 33 34 35 36 FF FF\n# < 90 00\n")
    assert main(["trace", "import", str(src), "-o", str(tmp_path / "r.jsonl")]) == 0
    assert "3132" not in (tmp_path / "r.jsonl").read_text()
    assert main(["trace", "import", str(src), "--secrets", "-o", str(tmp_path / "s.jsonl")]) == 0
    assert "313233343536ffff" in (tmp_path / "s.jsonl").read_text()


def test_cli_strict_import_fails_naming_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    src = tmp_path / "in.script"
    src.write_text("00A4040000\nZZ\n00A4040000\n")
    assert main(["trace", "import", str(src), "--format", "scriptor", "--strict"]) == 1
    assert "ccidemu trace: error: " in (err := capsys.readouterr().err)
    assert "in.script:2: not hex" in err
    assert main(["trace", "import", str(src), "--format", "scriptor"]) == 0
    assert "skipped 1 malformed" in capsys.readouterr().err


def _long_trace(path: Path, n: int) -> Path:
    return write_trace(path, [Exchange(ECHO, H("010203 9000"), t=i / 1000) for i in range(n)])


def test_progress_bar_only_on_a_terminal(tmp_path: Path) -> None:
    path = _long_trace(tmp_path / "long.jsonl", 4000)  # over PROGRESS_MIN_BYTES
    argv = [sys.executable, "-m", "vmc", "trace", "replay", str(path), "--card", "test:"]
    piped = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert piped.returncode == 0 and "replaying" not in piped.stderr
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=terminal, timeout=120,
                              check=False)
        os.close(terminal)
        terminal = -1
        seen = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if terminal >= 0:
            os.close(terminal)
        os.close(controller)
    assert proc.returncode == 0 and b"replaying" in seen
