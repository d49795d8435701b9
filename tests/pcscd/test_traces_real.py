"""Traces made by the real tools, through pcscd + vpcd and the emulated PIV card.

One ``pkcs15-tool -D`` run is recorded four ways at once: the bridge's own trace
(``ccidemu vpcd --trace``), pcscd's ``--apdu`` log, OpenSC's ``OPENSC_DEBUG=9`` log and a
pcsc-spy capture (libpcscspy in place of libpcsclite, as pcsc-spy(1) describes for programs
that dlopen it), also decoded by ``pcsc-spy -n``.  Each imports to the exchanges the bridge
recorded; each replays against the emulated card without a difference; and replayed as the
card (``--card replay:``, strict) it makes pkcs15-tool print the same listing.  The pcscd log is
cut to this run, so it lacks the ATR (logged at insertion); the other sources have it.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from ccidemu.cards import open_card
from ccidemu.traces import Exchange
from ccidemu.traces.compare import exchanges_of
from ccidemu.traces.formats import open_import
from ccidemu.traces.replay import CardReplay
from vmc.lab.pcscd import PcscdHarness

pytestmark = pytest.mark.pcscd

SPY_LIBRARY = Path("/usr/lib/x86_64-linux-gnu/libpcscspy.so.0")
PCSCLITE = Path("/usr/lib/x86_64-linux-gnu/libpcsclite.so.1")


def _exchanges(path: Path, format: str | None = None) -> list[Exchange]:
    imported = open_import(path, format, strict=True)
    got = list(exchanges_of(imported.records))
    assert imported.problems.count == 0
    return got


def _wait_for(path: Path, needle: str, count: int, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text(errors="replace")
        if text.count(needle) >= count or time.monotonic() > deadline:
            return text
        time.sleep(0.1)


@pytest.fixture
def recorded(pcscd: PcscdHarness, tmp_path: Path) -> dict[str, Path]:
    if not SPY_LIBRARY.exists() or shutil.which("pcsc-spy") is None:
        pytest.fail("pcsc-spy and libpcscspy.so.0 missing: install libpcsclite-dev")
    bridge_trace = tmp_path / "bridge.jsonl"
    pcscd.start_bridge("piv:", "--trace", str(bridge_trace))
    before = len(_exchanges(bridge_trace))
    log_offset = pcscd.log_path.stat().st_size
    # libpcscspy as libpcsclite.so.1 for OpenSC's dlopen; it forwards to libpcsclite_nospy
    lib = tmp_path / "spylib"
    lib.mkdir()
    (lib / "libpcsclite.so.1").symlink_to(SPY_LIBRARY)
    (lib / "libpcsclite_nospy.so.1").symlink_to(PCSCLITE)
    home = tmp_path / "home"
    home.mkdir()
    (home / "pcsc-spy").write_bytes(b"")  # the spy appends its lines to $HOME/pcsc-spy
    result = pcscd.run("pkcs15-tool", "-D", env={
        "HOME": str(home), "LD_LIBRARY_PATH": str(lib), "OPENSC_DEBUG": "9"})
    files = {"listing": tmp_path / "listing.txt", "opensc": tmp_path / "opensc.log",
             "spy": home / "pcsc-spy", "spy-n": tmp_path / "spy-n.txt",
             "pcscd": tmp_path / "pcscd.log", "bridge": bridge_trace}
    files["listing"].write_text(result.stdout)
    files["opensc"].write_text(result.stderr)
    spy_n = subprocess.run(["pcsc-spy", "-n", str(files["spy"])], capture_output=True,
                           text=True, timeout=60, check=True)
    files["spy-n"].write_text(spy_n.stdout)
    exchanges = _exchanges(bridge_trace)[before:]
    assert len(exchanges) > 20, "pkcs15-tool -D sent fewer APDUs than expected"
    # pcscd's log is written as it goes; wait until it holds this run's last answer
    text = _wait_for(pcscd.log_path, "SW: ", 0)
    deadline = time.monotonic() + 30
    while text[log_offset:].count("SW: ") < len(exchanges) and time.monotonic() < deadline:
        time.sleep(0.1)
        text = pcscd.log_path.read_text(errors="replace")
    files["pcscd"].write_text(text[log_offset:])
    (tmp_path / "reference.count").write_text(str(before))
    return files


def test_every_tool_imports_to_the_bridges_exchanges(recorded: dict[str, Path]) -> None:
    before = int((recorded["bridge"].parent / "reference.count").read_text())
    reference = [(e.command, e.response) for e in _exchanges(recorded["bridge"])[before:]]
    for name, format in (("pcscd", "pcscd"), ("opensc", "opensc"), ("spy", "pcsc-spy"),
                         ("spy-n", "pcsc-spy")):
        got = [(e.command, e.response) for e in _exchanges(recorded[name])]
        assert got == reference, f"{name} import differs from the bridge trace"
        assert open_import(recorded[name]).format == format  # sniffed


def test_each_import_replays_against_the_emulated_card(recorded: dict[str, Path]) -> None:
    for name in ("pcscd", "opensc", "spy", "spy-n", "bridge"):
        imported = open_import(recorded[name])
        replay = CardReplay(imported.header, imported.records, open_card("piv:"))
        differences = list(replay.run())
        assert differences == [], f"{name}: {[d.describe() for d in differences]}"
        assert replay.stats.sent > 20 and replay.stats.compared == replay.stats.sent


def test_an_import_replayed_as_the_card_reproduces_opensc(
    recorded: dict[str, Path], pcscd: PcscdHarness, tmp_path: Path
) -> None:
    # the pcsc-spy capture: it has the card's ATR too (SCardGetStatusChange)
    trace = tmp_path / "from-spy.jsonl"
    assert pcscd.bridge is not None
    result = subprocess.run(
        [*pcscd.bridge.argv[:3], "trace", "import", str(recorded["spy"]), "-o", str(trace)],
        capture_output=True, text=True, timeout=60, check=True)
    assert "imported" in result.stderr
    assert pcscd.stop_bridge() == 0
    bridge = pcscd.start_bridge(f"replay:{trace}")
    home = tmp_path / "home2"
    home.mkdir()
    again = pcscd.run("pkcs15-tool", "-D", env={"HOME": str(home)})
    assert again.stdout == recorded["listing"].read_text()
    assert pcscd.stop_bridge() == 0
    log = bridge.log()
    assert ", 0 answered 6F00" in log, log[-3000:]
    assert "does not match" not in log
