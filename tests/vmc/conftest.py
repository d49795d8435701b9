"""Fixtures shared by the daemon tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vmc.daemon_harness import RunningDaemon


@pytest.fixture
def tmp(tmp_path: Path) -> Iterator[Path]:
    """A short directory for unix sockets (their paths are limited to ~107 bytes)."""
    short = Path(f"/tmp/ccd-{os.getpid()}-{tmp_path.name[-12:]}")
    short.mkdir(exist_ok=True)
    yield short
    for p in short.iterdir():
        p.unlink()
    short.rmdir()


@pytest.fixture
def daemons() -> Iterator[list[RunningDaemon]]:
    """Daemons started by a test; stopped at its end."""
    running: list[RunningDaemon] = []
    yield running
    for d in running:
        d.stop()
