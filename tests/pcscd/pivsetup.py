"""The PIV card behind the private pcscd, for the real-client tests: each test gets a fresh
copy of fixtures/certs, its own state directory and a running ``ccidemu vpcd`` bridge."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509

from ccidemu.redact import Redactor
from ccidemu.trace import TraceRecord, read_trace
from vmc.lab.pcscd import OPENSC_PKCS11, READER, PcscdHarness

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "certs"
PIN, PUK = "123456", "12345678"
#: Every PIN, PUK and management key the tests send (padded as VERIFY sends them): none may
#: reach the bridge's -vvv log or its trace.
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
    traces: list[Path] = field(default_factory=list)  # and its --trace

    @property
    def spec(self) -> str:
        return f"piv:{self.certs / 'card.toml'}"

    def start(self) -> None:
        trace = self.work / f"bridge-{len(self.traces)}.jsonl"
        bridge = self.pcscd.start_bridge(self.spec, "--state-dir", str(self.state),
                                         "--trace", str(trace), verbose=3)
        self.logs.append(bridge.log_path)
        self.traces.append(trace)

    def trace_records(self) -> list[TraceRecord]:
        """The exchanges every bridge of this test traced so far."""
        return [r for path in self.traces if path.exists() for r in read_trace(path)]

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
    # or its trace, and no traced exchange holds anything the redaction rules would cut (a
    # secret these tests did not list: a new PIN or key, a witness, a challenge)
    assert setup.logs and all(path.stat().st_size for path in setup.logs)
    assert all(path.stat().st_size for path in setup.traces)
    for path in [*setup.logs, *setup.traces]:
        text = path.read_text(errors="replace").lower()
        for secret in SECRETS:
            assert secret.hex() not in text and secret.hex(" ") not in text, (path, secret)
    for path in setup.traces:
        redactor = Redactor()
        for record in read_trace(path):
            shown = redactor.exchange(record.command, record.response)
            assert not shown.redacted, (path, record)


@pytest.fixture
def piv(pcscd: PcscdHarness, tmp_path: Path) -> Iterator[PivSetup]:
    yield from piv_setup(pcscd, tmp_path)
