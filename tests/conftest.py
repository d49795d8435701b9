"""Suite-wide options: opting out of real-peer tests, saying loudly what was skipped,
reproducible hypothesis runs in CI, and the order tests run in.

``--order reversed`` / ``--order random`` (with ``--order-seed N``; the seed is printed) run
the modules, and the tests within each module, in reverse or shuffled order: a test that
passes only after another one has run shows up.  Tests stay grouped by module so a
module's fixtures (a booted guest) are still set up once.  tools/stress-tests uses them.

Under ``CI`` (set by .ci/run's environment or by hand) hypothesis runs derandomized: the
examples follow from each test's name, so a failure in CI fails the same way on a laptop, and
the reproduction blob is printed.  Elsewhere it explores (``HYPOTHESIS_PROFILE=ci`` forces CI's).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable

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


    group = parser.getgroup("ccidemu test order")
    group.addoption("--order", choices=["normal", "reversed", "random"], default="normal",
                    help="run modules, and tests within each module, in this order")
    group.addoption("--order-seed", type=int, default=None,
                    help="seed of --order random (default: a new one, printed)")


def _seed(config: pytest.Config) -> int:
    seed = config.getoption("--order-seed")
    if seed is None:
        seed = getattr(config, "_ccidemu_seed", None) or random.SystemRandom().randrange(10**6)
    config._ccidemu_seed = seed  # type: ignore[attr-defined]
    return int(seed)


def pytest_report_header(config: pytest.Config) -> str | None:
    order = config.getoption("--order")
    if order == "random":
        return f"test order: random, --order-seed {_seed(config)}"
    return None if order == "normal" else f"test order: {order}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    order = config.getoption("--order")
    if order == "normal":
        return
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    groups = list(modules.values())
    arrange: Callable[[list[pytest.Item]], None]
    if order == "reversed":
        arrange = list.reverse
    else:
        rng = random.Random(_seed(config))
        arrange = rng.shuffle
    arrange(groups)
    for group in groups:
        arrange(group)
    items[:] = [item for group in groups for item in group]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not SKIPPED_PEERS:
        return
    terminalreporter.section("real peers skipped", sep="!", red=True, bold=True)
    for kind, reason in SKIPPED_PEERS:
        terminalreporter.write_line(f"SKIPPED {kind} tests: {reason}", red=True, bold=True)
