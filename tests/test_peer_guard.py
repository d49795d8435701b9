"""The real-peer guard (tests/support.py): a missing peer fails the run, naming it; only an
explicit opt-out skips, and the summary says so.  Proven by running pytest on our own e2e and
pcscd suites with a peer made to look missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CASES = [
    pytest.param("tests/e2e/test_qemu_listen.py", "CCIDEMU_QEMU", "qemu", id="qemu"),
    pytest.param("tests/pcscd/test_vpcd_testcard.py", "CCIDEMU_PCSCD", "pcscd", id="pcscd"),
    pytest.param("tests/cards/test_cac_libcacard.py", "CCIDEMU_GCC", "libcacard",
                 id="libcacard"),
    pytest.param("tests/e2e/test_libvirt.py", "CCIDEMU_LIBVIRTD", "libvirt", id="libvirt"),
]


def _pytest(target: str, variable: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CCIDEMU_NO_")}
    environment.update({variable: "/nonexistent/ccidemu-peer"}, **env)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", target, *args],
        cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(("target", "variable", "kind"), CASES)
def test_a_missing_peer_fails_and_names_itself(target: str, variable: str, kind: str) -> None:
    result = _pytest(target, variable)
    assert result.returncode == 1, result.stdout
    assert f"{kind} peers missing: " in result.stdout
    assert "/nonexistent/ccidemu-peer" in result.stdout
    assert f"--no-{kind}" in result.stdout  # says how to opt out


@pytest.mark.parametrize(("target", "variable", "kind"), CASES)
def test_opting_out_skips_loudly(target: str, variable: str, kind: str) -> None:
    by_option = _pytest(target, variable, f"--no-{kind}")
    by_env = _pytest(target, variable, **{f"CCIDEMU_NO_{kind.upper()}": "1"})
    for result in (by_option, by_env):
        assert result.returncode == 0, result.stdout
        assert "skipped" in result.stdout and "passed" not in result.stdout
        assert "real peers skipped" in result.stdout
        assert f"SKIPPED {kind} tests: {kind} peers missing" in result.stdout


def test_opensc_dump_rows_are_read_whatever_the_ascii_column_shows() -> None:
    from tests.support import opensc_responses

    out = ("Received (SW1=0x90, SW2=0x00):\n01 .\n"
           "Received (SW1=0x90, SW2=0x00):\n30 31 01\n"  # ASCII '01' looks like hex
           "Received (SW1=0x61, SW2=0x01):\n"
           "00 01 02 03 04 05 06 07 08 09 0A 0B 0C 0D 0E 0F ................\n"
           "41 20                                           A \n"
           "Received (SW1=0x6A, SW2=0x82)\n")
    assert opensc_responses(out) == [bytes.fromhex("01 9000"), bytes.fromhex("3031 9000"),
                                     bytes(range(16)) + bytes.fromhex("4120 6101"),
                                     bytes.fromhex("6a82")]
