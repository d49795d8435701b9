"""Property tests reproduce in CI (tests/conftest.py, tools/run-tests): under ``CI`` (or
``HYPOTHESIS_PROFILE=ci``) hypothesis is derandomized, so two runs try the same examples, and a
failure prints its reproduction blob; elsewhere it explores.  Proven by running pytest on a
small property with our conftest loaded as a plugin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROPERTY = '''
import os
from hypothesis import given, strategies as st

@given(st.integers())
def test_examples(x):
    with open(os.environ["EXAMPLES"], "a") as out:
        out.write(f"{x}\\n")
    assert os.environ.get("FAIL_ON") != "any" or x < 1000
'''


def _run(tmp: Path, name: str, **env: str) -> tuple[list[str], subprocess.CompletedProcess[str]]:
    work = tmp / name
    work.mkdir()
    (work / "test_property.py").write_text(PROPERTY)
    examples = work / "examples.txt"
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("CI", "HYPOTHESIS_PROFILE")}
    environment.update(PYTHONPATH=str(REPO), EXAMPLES=str(examples), **env)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
         "test_property.py"],
        cwd=work, env=environment, capture_output=True, text=True, timeout=120)
    return examples.read_text().splitlines(), result


def test_ci_runs_the_same_examples_every_time(tmp_path: Path) -> None:
    first, r1 = _run(tmp_path, "ci1", CI="true")
    second, r2 = _run(tmp_path, "ci2", CI="true")
    forced, r3 = _run(tmp_path, "forced", HYPOTHESIS_PROFILE="ci")
    assert r1.returncode == r2.returncode == r3.returncode == 0, r1.stdout + r3.stdout
    assert len(first) >= 50
    assert first == second == forced


def test_elsewhere_hypothesis_explores(tmp_path: Path) -> None:
    first, r1 = _run(tmp_path, "dev1")
    second, r2 = _run(tmp_path, "dev2")
    assert r1.returncode == r2.returncode == 0, r1.stdout
    assert len(first) >= 50 and first != second  # (100 random integers twice alike: never)


def test_a_ci_failure_prints_how_to_reproduce_it(tmp_path: Path) -> None:
    _, result = _run(tmp_path, "fail", CI="true", FAIL_ON="any")
    assert result.returncode == 1, result.stdout
    assert "@reproduce_failure(" in result.stdout, result.stdout


def test_the_test_command_selects_the_ci_profile() -> None:
    script = (REPO / "tools" / "run-tests").read_text()
    assert 'export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}"' in script
