"""The PIV card behind the private pcscd, for the real-client tests: each test gets a fresh
copy of fixtures/certs, its own state directory and a running ``ccidemu vpcd`` bridge."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509

from vmc.lab.pcscd import OPENSC_PKCS11, READER, PcscdHarness

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "certs"
PIN, PUK = "123456", "12345678"
#: Every PIN, PUK and management key the tests send (padded as VERIFY sends them): none may
#: reach the bridge's -vvv log.
SECRETS = [b"123456\xff\xff", b"12345678", b"654321\xff\xff", b"111111\xff\xff",
           bytes.fromhex("010203040506070801020304050607080102030405060708")]
YKPIV = ("yubico-piv-tool", "-r", READER)


@dataclass
class PivSetup:
    pcscd: PcscdHarness
    certs: Path  # this test's copy of fixtures/certs
    state: Path
    work: Path
    logs: list[Path] = field(default_factory=list)  # every bridge's -vvv log

    @property
    def spec(self) -> str:
        return f"piv:{self.certs / 'card.toml'}"

    def start(self) -> None:
        bridge = self.pcscd.start_bridge(self.spec, "--state-dir", str(self.state), verbose=3)
        self.logs.append(bridge.log_path)

    def restart_bridge(self) -> None:
        assert self.pcscd.stop_bridge() == 0
        self.start()

    def run(self, *argv: str, check: bool = True) -> str:
        # HOME: OpenSC's file cache (~/.cache/opensc) stays per test
        result = self.pcscd.run(*argv, check=check, env={"HOME": str(self.work)})
        return result.stdout + result.stderr

    def p11(self, *args: str, check: bool = True) -> str:
        return self.run("pkcs11-tool", "--module", str(OPENSC_PKCS11), *args, check=check)

    def ykpiv(self, *args: str, check: bool = True) -> str:
        return self.run(*YKPIV, *args, check=check)

    def cert(self, slot: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate((self.certs / f"{slot}.crt").read_bytes())


def piv_setup(pcscd: PcscdHarness, tmp_path: Path, profile: str | None = None
              ) -> Iterator[PivSetup]:
    """A fresh card; ``profile``: extra TOML settings put before the fixture profile's."""
    certs = tmp_path / "certs"
    shutil.copytree(FIXTURES, certs)
    if profile is not None:
        text = (certs / "card.toml").read_text()
        (certs / "card.toml").write_text(profile + "\n" + text)
    setup = PivSetup(pcscd, certs, tmp_path / "state", tmp_path)
    setup.state.mkdir()
    setup.start()
    yield setup
    # whatever the test did, no PIN, PUK or management key reached the bridge's TRAFFIC log
    assert setup.logs and all(path.stat().st_size for path in setup.logs)
    for path in setup.logs:
        text = path.read_text(errors="replace").lower()
        for secret in SECRETS:
            assert secret.hex() not in text and secret.hex(" ") not in text, (path, secret)


@pytest.fixture
def piv(pcscd: PcscdHarness, tmp_path: Path) -> Iterator[PivSetup]:
    yield from piv_setup(pcscd, tmp_path)
