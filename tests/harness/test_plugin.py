"""The pytest plugin (vmc/pytest_plugin.py), run as a user's pytest runs it: small projects
in a directory outside the checkout, pytest in a subprocess with this venv (the plugin comes
from the ``pytest11`` entry point), outcomes read from its JUnit XML.

What is checked: which card spec each fixture gets (marker > option > ini > default), fresh
state per test, the VSCard fixture in process and as a subprocess, fixture overrides (a card
the test wrote), the heavy fixtures' markers (``-m`` selects), their one-line skip reasons
when pcscd or the guest's prerequisites are missing, a bad spec, the logs on failure.  The
real pcscd and QEMU fixtures run in tests/harness/test_docs.py (this venv) and
tests/harness/test_wheel.py (the installed wheel).
"""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import pytest

from tests.harness.pytest_runs import run_pytest, summary, write
from tests.support import require_peers
from vmc.lab.pcscd import PEER_PACKAGES, missing_peers

SPECS = '''
import pytest

def test_default(ccidemu_card_spec, ccidemu_card):
    print(f"<SPEC {ccidemu_card_spec} {ccidemu_card.name}>")

@pytest.mark.ccidemu_card("cac:")
def test_marked(ccidemu_card_spec, ccidemu_card):
    print(f"<SPEC {ccidemu_card_spec} {ccidemu_card.name}>")

@pytest.mark.ccidemu_card("test:")
class TestClassMarked:
    def test_in_class(self, ccidemu_card):
        assert ccidemu_card.name == "built-in test card"
'''

LIGHT = '''
import pytest
import ccidemu
from ccidemu.certs import issue_certificate, make_ca, new_private_key
from vmc.lab import ServeMode, ServeProcess, ServeThread

def test_block_the_pin(ccidemu_piv):
    for _ in range(3):
        with pytest.raises(ccidemu.InvalidPinError):
            ccidemu_piv.verify_pin("000000")
    assert ccidemu_piv.pin_attempts() == 0

def test_next_card_is_fresh(ccidemu_piv):
    assert ccidemu_piv.pin_attempts() == 3

def test_session(ccidemu_session):
    assert ccidemu_session.atr == ccidemu.open_card("piv:").power_on()

@pytest.fixture(params=["inprocess", "subprocess"])
def ccidemu_serve_mode(request):
    return ServeMode(request.param)

def test_vscard(ccidemu_vscard, ccidemu_serve_mode):
    kind = ServeThread if ccidemu_serve_mode is ServeMode.IN_PROCESS else ServeProcess
    assert isinstance(ccidemu_vscard.serve, kind)
    piv = ccidemu_vscard.piv()
    piv.verify_pin("123456")
    for _ in range(2):
        with pytest.raises(ccidemu.InvalidPinError):
            piv.verify_pin("000000")

def test_vscard_card_is_fresh_too(ccidemu_vscard):
    assert ccidemu_vscard.piv().pin_attempts() == 3

class TestOverride:
    @pytest.fixture
    def ccidemu_card_spec(self, tmp_path):
        ca_key, ca_cert = make_ca()
        key = new_private_key("p256")
        self.cert = issue_certificate(ca_key, ca_cert, key, "override")
        return ccidemu.write_piv_card(tmp_path / "c", {0x9E: (key, self.cert)})

    def test_card(self, ccidemu_piv):
        assert ccidemu_piv.read_certificate(0x9E) == self.cert

    def test_vscard(self, ccidemu_vscard):
        assert ccidemu_vscard.piv().read_certificate(0x9E) == self.cert

@pytest.mark.ccidemu_card("nope:")
def test_bad_spec(ccidemu_card):
    pass
'''

HEAVY = '''
def test_light(ccidemu_card):
    pass

def test_reader(ccidemu_pcsc):
    pass

def test_guest(ccidemu_guest):
    pass

def test_image(ccidemu_guest_image):
    pass
'''


@pytest.fixture
def project(tmp_path: Path) -> Path:
    path = tmp_path / "project"
    path.mkdir()
    return path


def _printed_specs(output: str) -> list[str]:
    return sorted(re.findall(r"<SPEC ([^>]*)>", output))


def test_which_spec_the_fixtures_get(project: Path) -> None:
    write(project, {"test_specs.py": SPECS})
    run = run_pytest(sys.executable, project, "-s")
    assert run.returncode == 0, summary(run)
    assert _printed_specs(run.output) == ["cac: CAC (demo)", "piv: PIV (demo)"]
    # the ini option, then the command line option; the marker wins over both
    write(project, {"pytest.ini": "[pytest]\nccidemu_card = test:\n"})
    run = run_pytest(sys.executable, project, "-s")
    assert _printed_specs(run.output) == ["cac: CAC (demo)", "test: built-in test card"]
    run = run_pytest(sys.executable, project, "-s", "--ccidemu-card", "piv:")
    assert _printed_specs(run.output) == ["cac: CAC (demo)", "piv: PIV (demo)"]
    assert run.outcome("test_specs.TestClassMarked::test_in_class") == "passed"


def test_fresh_cards_vscard_overrides_and_a_bad_spec(project: Path) -> None:
    write(project, {"test_light.py": LIGHT})
    run = run_pytest(sys.executable, project)
    expected_passed = [
        "test_light::test_block_the_pin", "test_light::test_next_card_is_fresh",
        "test_light::test_session", "test_light::test_vscard[inprocess]",
        "test_light::test_vscard[subprocess]",
        "test_light::test_vscard_card_is_fresh_too[inprocess]",
        "test_light::test_vscard_card_is_fresh_too[subprocess]",
        "test_light.TestOverride::test_card", "test_light.TestOverride::test_vscard[inprocess]",
        "test_light.TestOverride::test_vscard[subprocess]",
    ]
    for name in expected_passed:
        assert run.outcome(name) == "passed", summary(run)
    assert run.outcome("test_light::test_bad_spec") == "error", summary(run)
    assert "unknown card scheme 'nope'" in run.message("test_light::test_bad_spec")
    assert len(run.outcomes) == len(expected_passed) + 1


def test_heavy_fixtures_are_marked_for_selection(project: Path) -> None:
    write(project, {"test_heavy.py": HEAVY})

    def collected(*args: str) -> list[str]:
        run = run_pytest(sys.executable, project, "--collect-only", "-q", *args)
        return sorted(line.split("::")[-1] for line in run.output.splitlines()
                      if line.startswith("test_heavy.py::"))

    assert collected() == ["test_guest", "test_image", "test_light", "test_reader"]
    assert collected("-m", "not ccidemu_qemu and not ccidemu_pcscd") == ["test_light"]
    assert collected("-m", "ccidemu_qemu") == ["test_guest", "test_image"]
    assert collected("-m", "ccidemu_pcscd") == ["test_reader"]
    run = run_pytest(sys.executable, project, "--markers")
    for marker in ("ccidemu_card(spec)", "ccidemu_pcscd", "ccidemu_qemu"):
        assert f"@pytest.mark.{marker}" in run.output


def test_missing_peers_skip_with_one_line_naming_them(project: Path) -> None:
    write(project, {"test_heavy.py": HEAVY})
    run = run_pytest(sys.executable, project, "-rs", env={
        "CCIDEMU_PCSCD": "/nonexistent/pcscd", "CCIDEMU_QEMU": "/nonexistent/qemu-system-x86_64"})
    assert run.outcome("test_heavy::test_light") == "passed", summary(run)
    reader = run.message("test_heavy::test_reader")
    assert run.outcome("test_heavy::test_reader") == "skipped"
    assert reader == ("ccidemu_pcsc needs what this host lacks: /nonexistent/pcscd (Debian: "
                      "apt-get install pcscd vsmartcard-vpcd opensc)"), reader
    for name in ("test_guest", "test_image"):
        message = run.message(f"test_heavy::{name}")
        assert run.outcome(f"test_heavy::{name}") == "skipped"
        assert "/nonexistent/qemu-system-x86_64" in message, message
        assert "apt-get install qemu-system-x86" in message and "\n" not in message, message
    assert "Traceback" not in run.output


def test_a_failing_reader_test_shows_the_logs(project: Path,
                                              request: pytest.FixtureRequest) -> None:
    require_peers(request.config, "pcscd", missing_peers(), PEER_PACKAGES)
    write(project, {"test_fail.py": textwrap.dedent('''
        import pytest

        @pytest.mark.ccidemu_card("test:")
        def test_fails(ccidemu_pcsc):
            out = ccidemu_pcsc.run("opensc-tool", "-r", ccidemu_pcsc.name, "-a").stdout
            assert out == "something else"
        ''')})
    run = run_pytest(sys.executable, project)
    assert run.outcome("test_fail::test_fails") == "failed", summary(run)
    # the assertion shows the real answer (the test card's ATR), the logs follow
    assert "3b:0a:63:63:69:64:65:6d:75:2d:54:43" in run.output, summary(run)
    assert "ccidemu pcscd and bridge" in run.output and "--- pcscd log (tail)" in run.output
