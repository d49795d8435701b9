"""Suite-wide options: opting out of real-peer tests, and saying loudly what was skipped."""

from __future__ import annotations

import pytest

from tests.support import OPT_OUTS, SKIPPED_PEERS


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ccidemu real peers")
    for kind, (option, variable) in OPT_OUTS.items():
        group.addoption(option, action="store_true", default=False,
                        help=f"skip the {kind} tests instead of failing when their peers are "
                        f"missing (also {variable}=1)")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not SKIPPED_PEERS:
        return
    terminalreporter.section("real peers skipped", sep="!", red=True, bold=True)
    for kind, reason in SKIPPED_PEERS:
        terminalreporter.write_line(f"SKIPPED {kind} tests: {reason}", red=True, bold=True)
