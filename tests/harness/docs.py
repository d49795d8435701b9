"""The examples of docs/TESTING.md: Python snippets (run in order, in one namespace) and
test files (fenced Python blocks whose first line is ``# file: NAME``)."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTING = ROOT / "docs" / "TESTING.md"
SAMPLE_PROJECT = Path(__file__).resolve().parent / "sample_project"

_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)
_FILE = re.compile(r"# file: (test_\w+\.py)\n")


@dataclass(frozen=True)
class DocExamples:
    snippets: list[str]
    files: dict[str, str]


def examples(path: Path = TESTING) -> DocExamples:
    snippets: list[str] = []
    files: dict[str, str] = {}
    for block in _BLOCK.findall(path.read_text(encoding="utf-8")):
        m = _FILE.match(block)
        if m is None:
            snippets.append(block)
        else:
            assert m.group(1) not in files, f"two examples named {m.group(1)}"
            files[m.group(1)] = block[m.end():]
    return DocExamples(snippets, files)


def make_project(directory: Path, *, sample: bool = True) -> list[str]:
    """Write the docs' test files (and the sample project, when ``sample``) into
    ``directory``; the file names."""
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    if sample:
        for path in sorted(SAMPLE_PROJECT.iterdir()):
            if path.is_file():
                shutil.copyfile(path, directory / path.name)
                names.append(path.name)
    for name, text in examples().files.items():
        (directory / name).write_text(text, encoding="utf-8")
        names.append(name)
    return names
