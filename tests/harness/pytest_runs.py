"""Running pytest on a project directory in a subprocess, and reading its outcomes.

Outcomes come from pytest's JUnit XML: test id -> ("passed" | "failed" | "error" |
"skipped", message).  A subprocess, not pytester: the plugin under test is loaded the way a
user's pytest loads it (the ``pytest11`` entry point), and libpcsclite's socket name is read
fresh.
"""

from __future__ import annotations

import os
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Run:
    returncode: int
    output: str
    outcomes: dict[str, tuple[str, str]]

    def outcome(self, test: str) -> str:
        return self.outcomes[test][0]

    def message(self, test: str) -> str:
        return self.outcomes[test][1]


def run_pytest(python: str | Path, project: Path, *args: str,
               env: dict[str, str] | None = None, timeout: float = 900) -> Run:
    """``python -m pytest -p no:cacheprovider --junitxml=... ARGS`` in ``project``."""
    junit = project / ".junit.xml"
    junit.unlink(missing_ok=True)
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith(("PYTEST_", "COV_")) and k != "PYTHONPATH"}
    environment.update(env or {})
    proc = subprocess.run(
        [str(python), "-m", "pytest", "-p", "no:cacheprovider", f"--junitxml={junit}",
         "-o", "junit_family=xunit2", *args],
        cwd=project, env=environment, capture_output=True, text=True, timeout=timeout,
        check=False)
    outcomes: dict[str, tuple[str, str]] = {}
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            state, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                found = case.find(tag)
                if found is not None:
                    state = {"failure": "failed"}.get(tag, tag)
                    message = found.get("message", "") or (found.text or "")
                    break
            outcomes[name] = (state, message)
    return Run(proc.returncode, proc.stdout + proc.stderr, outcomes)


def write(project: Path, files: dict[str, str]) -> None:
    project.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (project / name).write_text(text, encoding="utf-8")


def summary(run: Run, names: Sequence[str] = ()) -> str:
    """For assertion messages: the outcomes and the output's tail."""
    lines = [f"{k}: {v[0]} {v[1][:200]}" for k, v in sorted(run.outcomes.items())
             if not names or k in names]
    return "\n".join(lines) + "\n--- output tail\n" + run.output[-6000:]
