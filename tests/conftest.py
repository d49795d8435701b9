"""Suite-wide options: opting out of real-peer tests, saying loudly what was skipped, and
reproducible hypothesis runs in CI.

Under ``CI`` (set by .ci/run's environment or by hand) hypothesis runs derandomized: the
examples follow from each test's name, so a failure in CI fails the same way on a laptop, and
the reproduction blob is printed.  Elsewhere it explores (``HYPOTHESIS_PROFILE=ci`` forces CI's).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

from tests.support import OPT_OUTS, SKIPPED_PEERS

settings.register_profile("ci", derandomize=True, print_blob=True, deadline=None)
settings.register_profile("dev", print_blob=True)
settings.load_profile(os.environ.get(
    "HYPOTHESIS_PROFILE",
    "ci" if os.environ.get("CI", "").lower() in ("1", "true", "yes") else "dev"))


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ccidemu real peers")
    for kind, (option, variable) in OPT_OUTS.items():
        group.addoption(option, action="store_true", default=False,
                        help=f"skip the {kind} tests instead of failing when their peers are "
                        f"missing (also {variable}=1)")
    group.addoption("--usb-reader", metavar="VID:PID[:SERIAL]", default=None,
                    help="a physical USB CCID reader (with a card in it, pcscd stopped) for "
                    "the tests marked 'hardware' (also CCIDEMU_USB_READER); without it they "
                    "skip")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not SKIPPED_PEERS:
        return
    terminalreporter.section("real peers skipped", sep="!", red=True, bold=True)
    for kind, reason in SKIPPED_PEERS:
        terminalreporter.write_line(f"SKIPPED {kind} tests: {reason}", red=True, bold=True)
