"""docs/TESTING.md's examples run: the Python snippets here (in order, one namespace, as a
reader would paste them), its test files as a project of their own with this venv's pytest
and plugin (the real pcscd; the QEMU ones are left to tests/harness/test_wheel.py, which runs
every example against the installed wheel)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.harness.docs import examples, make_project
from tests.harness.pytest_runs import run_pytest, summary
from tests.support import require_peers
from vmc.lab.pcscd import PEER_PACKAGES, missing_peers


def test_the_python_snippets_run() -> None:
    found = examples()
    assert len(found.snippets) >= 4
    namespace: dict[str, object] = {"__name__": "testing_md"}
    for number, snippet in enumerate(found.snippets, 1):
        exec(compile(snippet, f"docs/TESTING.md snippet {number}", "exec"), namespace)
    assert "piv" in namespace and "session" in namespace


def test_the_guide_has_an_example_per_kind() -> None:
    assert set(examples().files) == {"test_card.py", "test_pkcs11.py", "test_pcsc_app.py",
                                     "test_vm_image.py", "test_guest.py"}


def test_the_test_files_pass_with_this_venvs_plugin(tmp_path: Path,
                                                    request: pytest.FixtureRequest) -> None:
    require_peers(request.config, "pcscd", missing_peers(), PEER_PACKAGES)
    project = tmp_path / "docs-project"
    make_project(project, sample=False)
    run = run_pytest(sys.executable, project, "-m", "not ccidemu_qemu")
    expected = {
        "test_card::test_sign_with_the_demo_card",
        "test_card::test_each_test_gets_a_fresh_card",
        "test_card::test_the_cac_card_over_vscard",
        "test_pkcs11::test_the_module_signs_with_the_card",
        "test_pkcs11.TestYourOwnCertificates::test_the_module_lists_it",
        "test_pcsc_app::test_the_application_gets_the_answer",
        "test_pcsc_app::test_pyscard_in_the_test_process",  # pyscard is in this venv
    }
    passed = {name for name, (state, _) in run.outcomes.items() if state == "passed"}
    assert passed == expected, summary(run)
    assert run.returncode == 0, summary(run)
