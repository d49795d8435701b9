"""Fixtures shared by the daemon tests."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vmc.daemon_harness import RunningDaemon


@pytest.fixture
def tmp() -> Iterator[Path]:
    """A short directory for unix sockets (their paths are limited to ~107 bytes)."""
    short = Path(tempfile.mkdtemp(prefix="ccd-"))
    yield short
    shutil.rmtree(short)


@pytest.fixture
def daemons() -> Iterator[list[RunningDaemon]]:
    """Daemons started by a test; stopped at its end."""
    running: list[RunningDaemon] = []
    yield running
    for d in running:
        d.stop()
