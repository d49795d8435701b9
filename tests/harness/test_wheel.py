"""The installed package (issue 11): a wheel built from a copy of the sources, installed with
pip (dependencies from PyPI or pip's cache) into a fresh venv outside the checkout, run from
a directory outside it.

- the wheel holds the demo cards (package data) and the ``pytest11`` entry point;
- its ``ccidemu serve`` serves the default card (``piv:``) to the fake QEMU side: the
  certificate read over VSCard is the checkout's fixture, signatures verify;
- its errors are one line: a bad card spec, a busy port, a missing guest prerequisite;
- its ``ccidemu lab --run 'opensc-tool -n'`` boots the guest and OpenSC names the card;
- a third-party project (tests/harness/sample_project plus every test file of
  docs/TESTING.md) passes with only the wheel's plugin and fixtures: cards, VSCard with a
  ``ccidemu serve`` subprocess, the private pcscd, the QEMU guest, a QEMU VM of its own.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from ccidemu.client import CardSession
from ccidemu.piv_client import PivClient
from tests.harness.docs import ROOT, make_project
from tests.harness.pytest_runs import run_pytest, summary
from tests.support import require_peers
from vmc.addr import UnixAddress
from vmc.fakeqemu import FakeQemuListener
from vmc.lab.guest import GUEST_HOST_PACKAGES, missing_host_tools
from vmc.lab.pcscd import PEER_PACKAGES, missing_peers


@dataclass
class Installed:
    base: Path  # outside the checkout: the working directory of everything run here
    wheel: Path
    venv: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def ccidemu(self) -> Path:
        return self.venv / "bin" / "ccidemu"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("PYTEST_")}
        env["PATH"] = f"{self.venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
        env.update(extra)
        return env

    def run(self, *argv: str | Path, timeout: float = 600, **env: str
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(a) for a in argv], cwd=self.base, env=self.env(**env),
                              capture_output=True, text=True, timeout=timeout, check=False)


def _copy_sources(destination: Path) -> None:
    """What the wheel is built from, without the checkout's build/ and egg-info leftovers."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("ccidemu", "vmc"):
        shutil.copytree(ROOT / name, destination / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(ROOT / name, destination / name)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    base = Path(tmp_path_factory.mktemp("wheel"))
    assert not base.resolve().is_relative_to(ROOT)
    _copy_sources(base / "src")
    quiet = ["-q", "--disable-pip-version-check"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", *quiet, "--no-deps", "-w",
                    str(base / "dist"), str(base / "src")], cwd=base, check=True, timeout=600,
                   capture_output=True)
    [wheel] = (base / "dist").glob("ccidemu-*.whl")
    shutil.rmtree(base / "src")  # nothing of the sources is left around the install
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", *quiet,
                    f"{wheel}[pytest]"], cwd=base, check=True, timeout=600, capture_output=True)
    yield Installed(base, wheel, venv)


def test_the_wheel_holds_the_demo_cards_and_the_plugin(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
        entry_points = next(wheel.read(n).decode() for n in names
                            if n.endswith(".dist-info/entry_points.txt"))
    for slot in ("9a", "9c", "9d", "9e", "f9"):
        assert {f"ccidemu/demo/certs/{slot}.crt", f"ccidemu/demo/certs/{slot}.key"} <= names
    for n in (1, 2, 3):
        assert f"ccidemu/demo/cac/cert{n}.crt" in names
    assert {"ccidemu/demo/certs/card.toml", "ccidemu/demo/cac/card.toml",
            "vmc/pytest_plugin.py", "vmc/commands/lab.py", "ccidemu/py.typed"} <= names
    assert not [n for n in names if n.startswith(("tests/", "fixtures/", "bench/"))]
    assert "[pytest11]\nccidemu = vmc.pytest_plugin" in entry_points
    assert "ccidemu = vmc.cli:main" in entry_points


def test_the_installed_package_runs_outside_the_checkout(installed: Installed) -> None:
    code = ("import ccidemu, vmc; print(ccidemu.__file__); print(vmc.__file__); "
            "print(ccidemu.demo_piv_directory()); print(ccidemu.open_card('piv:').name)")
    proc = installed.run(installed.python, "-c", code)
    assert proc.returncode == 0, proc.stderr
    ccidemu_file, vmc_file, demo, name = proc.stdout.splitlines()
    site = installed.venv.resolve()
    for path in (ccidemu_file, vmc_file, demo):
        assert Path(path).resolve().is_relative_to(site), path
    assert name == "PIV (demo)"
    # the same demo files as the checkout's fixtures
    assert (Path(demo) / "9a.crt").read_bytes() == (ROOT / "fixtures/certs/9a.crt").read_bytes()
    version = installed.run(installed.ccidemu, "--version")
    assert version.stdout.strip() == "ccidemu 0.1.0.dev0"


def test_serve_gives_the_default_card_to_the_fake_qemu(installed: Installed) -> None:
    workdir = Path(installed.base / "serve")
    workdir.mkdir()
    path = workdir / "vsc.sock"
    with FakeQemuListener(UnixAddress(path)) as listener:
        serve = subprocess.Popen(
            [str(installed.ccidemu), "serve", "--connect", f"unix:{path}", "--control", "none"],
            cwd=installed.base, env=installed.env(), stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True)
        try:
            with listener.accept(timeout=60) as qemu:
                qemu.wait_card(timeout=30)
                atr = qemu.power_on(timeout=30)
                piv = PivClient(CardSession(lambda apdu: qemu.transmit(apdu, timeout=30),
                                            atr=atr))
                piv.select()
                cert = piv.read_certificate(0x9A)
                fixture = x509.load_pem_x509_certificate(
                    (ROOT / "fixtures" / "certs" / "9a.crt").read_bytes())
                assert cert == fixture
                assert piv.serial() == 51757879  # the demo card's, wherever installed
                piv.verify_pin("123456")
                signature = piv.sign(0x9A, b"from the wheel")
                key = cert.public_key()
                assert isinstance(key, rsa.RSAPublicKey)
                key.verify(signature, b"from the wheel", padding.PKCS1v15(), hashes.SHA256())
                serve.send_signal(signal.SIGTERM)
                qemu.wait_removed(timeout=30)  # the daemon takes the card out as it stops
            assert serve.wait(timeout=60) == 0
        finally:
            if serve.poll() is None:
                serve.kill()
            assert serve.stderr is not None
            stderr = serve.stderr.read()
            serve.stderr.close()
    assert "Traceback" not in stderr


def _one_line(proc: subprocess.CompletedProcess[str], command: str) -> str:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ccidemu {command}: error: "), proc.stderr
    return lines[0]


def test_errors_are_one_line(installed: Installed) -> None:
    bad = _one_line(installed.run(installed.ccidemu, "serve", "--card", "nope:",
                                  "--control", "none"), "serve")
    assert "unknown card scheme 'nope'" in bad
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        line = _one_line(installed.run(installed.ccidemu, "serve", "--listen",
                                       f"tcp:127.0.0.1:{port}", "--control", "none",
                                       timeout=60), "serve")
    assert f"127.0.0.1:{port}" in line and "in use" in line, line
    missing = _one_line(installed.run(installed.ccidemu, "lab", "--run", "true",
                                      CCIDEMU_QEMU="/nonexistent/qemu-system-x86_64"), "lab")
    assert "/nonexistent/qemu-system-x86_64" in missing and "qemu-system-x86)" in missing


@pytest.mark.qemu
def test_lab_runs_opensc_in_the_guest(installed: Installed,
                                      request: pytest.FixtureRequest) -> None:
    require_peers(request.config, "qemu", missing_host_tools(), GUEST_HOST_PACKAGES)
    proc = installed.run(installed.ccidemu, "lab", "--run", "opensc-tool -n")
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert proc.stdout.splitlines()[-1] == "Personal Identity Verification Card", proc.stdout
    assert proc.stderr.splitlines()[-1] == "ccidemu lab: 'opensc-tool -n' exited with status 0"


@pytest.mark.qemu
@pytest.mark.pcscd
def test_a_third_party_project_passes_with_the_wheels_plugin(
        installed: Installed, request: pytest.FixtureRequest) -> None:
    require_peers(request.config, "qemu", missing_host_tools(), GUEST_HOST_PACKAGES)
    require_peers(request.config, "pcscd", missing_peers(), PEER_PACKAGES)
    project = installed.base / "third-party"
    files = make_project(project)
    assert "pytest.ini" in files and "test_vm_image.py" in files
    run = run_pytest(installed.python, project, "-v", env=installed.env())
    assert "plugins: ccidemu-0.1.0.dev0" in run.output, run.output[:2000]
    skipped = {name for name, (state, _) in run.outcomes.items() if state == "skipped"}
    failed = {name for name, (state, _) in run.outcomes.items()
              if state not in ("passed", "skipped")}
    assert failed == set(), summary(run)
    # pyscard is no dependency of the wheel: the one example that needs it skips
    assert skipped == {"test_pcsc_app::test_pyscard_in_the_test_process"}, summary(run)
    assert len(run.outcomes) == 17, summary(run)
    assert run.returncode == 0, summary(run)
