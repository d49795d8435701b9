"""Fixtures for the real-client tests: a private pcscd with vpcd (vmc.lab.pcscd)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.pcscd.pivsetup import piv  # noqa: F401 - the PIV card fixture of these tests
from tests.support import require_peers
from vmc.lab.pcscd import PEER_PACKAGES, PcscdHarness, missing_peers


@pytest.fixture(scope="session")
def pcscd_session(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PcscdHarness]:
    require_peers(request.config, "pcscd", missing_peers(), PEER_PACKAGES)
    harness = PcscdHarness(tmp_path_factory.mktemp("pcscd"))
    harness.start_pcscd()
    try:
        yield harness
    finally:
        harness.stop_bridge()
        harness.stop_pcscd()


def _ensure_pcscd(harness: PcscdHarness) -> None:
    """Restart pcscd if a test stopped it or it died."""
    if harness.proc is None or harness.proc.poll() is not None:
        harness.restart_pcscd()


@pytest.fixture
def pcscd(pcscd_session: PcscdHarness) -> Iterator[PcscdHarness]:
    """The session's pcscd, running, with no bridge; the bridge is stopped afterwards."""
    harness = pcscd_session
    _ensure_pcscd(harness)
    yield harness
    harness.stop_bridge()
    _ensure_pcscd(harness)
