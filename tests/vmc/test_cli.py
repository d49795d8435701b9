"""The console script's front (vmc.cli): global options anywhere, one clear line for every
error a user can meet (never a traceback), quiet on a closed pipe."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vmc.cli import build_parser

REPO = Path(__file__).resolve().parents[2]


def ccidemu(*args: str, stdin: str | None = None, timeout: float = 60
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmc", *args], cwd=REPO, input=stdin,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(("argv", "verbose", "quiet"), [
    (["serve", "-vv"], 2, False),
    (["-v", "serve"], 1, False),
    (["-v", "serve", "-vvv"], 3, False),
    (["serve", "-q"], 0, True),
    (["ctl", "list", "-vv"], 2, False),
])
def test_global_options_before_or_after_the_subcommand(
    argv: list[str], verbose: int, quiet: bool
) -> None:
    args = build_parser(argv[0] if argv[0] != "-v" else argv[1]).parse_args(argv)
    assert (args.verbose, args.quiet) == (verbose, quiet)


@pytest.mark.parametrize("argv", [["ctl", "--json", "list"], ["ctl", "list", "--json"]])
def test_ctl_json_before_or_after_the_action(argv: list[str]) -> None:
    assert build_parser("ctl").parse_args(argv).json is True
    assert build_parser("ctl").parse_args(["ctl", "list"]).json is False


@pytest.mark.parametrize("argv", [["ctl", "--control", "unix:/x.sock", "list"],
                                  ["ctl", "list", "--control", "unix:/x.sock"]])
def test_ctl_control_before_or_after_the_action(argv: list[str]) -> None:
    assert build_parser("ctl").parse_args(argv).control == "unix:/x.sock"
    assert build_parser("ctl").parse_args(["ctl", "list"]).control is None


def _one_clear_line(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], result.stderr


def test_errors_users_meet_are_one_line(tmp_path: Path) -> None:
    _one_clear_line(ccidemu("fake-qemu", "--connect", "unix:/nonexistent/vsc.sock"),
                    "cannot connect to unix:/nonexistent/vsc.sock", "No such file")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() != 0:  # root can write anywhere: use a path that cannot exist instead
        _one_clear_line(ccidemu("certs", "generate", str(locked / "x")), "Permission denied")
    _one_clear_line(ccidemu("certs", "generate", "/proc/ccidemu-test"), "/proc/ccidemu-test")
    _one_clear_line(ccidemu("decode", "--as", "apdu", str(tmp_path / "missing.hex")),
                    "cannot read")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        _one_clear_line(ccidemu("serve", "--listen", f"tcp:127.0.0.1:{port}", "--card",
                                "test:", "--control", "none"),
                        f"cannot listen on tcp:127.0.0.1:{port}", "in use")
    _one_clear_line(ccidemu("serve", "--card", "nosuch:", "--listen",
                            f"unix:{tmp_path}/vm.sock", "--control", "none"),
                    "unknown card scheme 'nosuch'")


def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    source = tmp_path / "many.hex"
    source.write_text("00a4040000\n" * 50000)
    proc = subprocess.run(
        f"{sys.executable} -m vmc decode --as apdu {source} | head -1", shell=True, cwd=REPO,
        capture_output=True, text=True, timeout=120)
    assert proc.stdout == "00A4040000\n"
    assert proc.stderr == "", proc.stderr  # no BrokenPipeError traceback


def test_decode_says_what_it_tried() -> None:
    result = ccidemu("decode", stdin="zz\n")
    assert result.returncode == 1
    assert "the input: 3 bytes of binary data, starting 7a 7a 0a" in result.stderr
    assert "tried, in order" in result.stderr and "--as" in result.stderr
