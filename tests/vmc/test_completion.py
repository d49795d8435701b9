"""``ccidemu completion bash``: the generated script, run by a real bash."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from vmc.cli import build_parser
from vmc.commands import COMMANDS
from vmc.commands.completion import command_tree

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("completion") / "ccidemu.bash"
    result = subprocess.run([sys.executable, "-m", "vmc", "completion", "bash"], cwd=REPO,
                            capture_output=True, text=True, timeout=60, check=True)
    path.write_text(result.stdout)
    return path


def complete(script: Path, line: str, cwd: Path = REPO) -> list[str]:
    """What bash offers for ``line`` with the cursor at its end."""
    program = (f"source {script}\nCOMP_LINE=$1; COMP_POINT=${{#1}}\n_ccidemu_complete\n"
               'printf "%s\\n" "${COMPREPLY[@]}"\n')
    result = subprocess.run(["bash", "-c", program, "bash", line], cwd=cwd,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    return [w for w in result.stdout.splitlines() if w]


def test_subcommands_and_their_actions(script: Path) -> None:
    assert complete(script, "ccidemu ") == list(COMMANDS)
    assert complete(script, "ccidemu tr") == ["trace"]
    assert set(complete(script, "ccidemu -v ctl ")) >= {"list", "insert", "remove", "attach",
                                                         "detach", "reload", "stats"}
    assert complete(script, "ccidemu trace sh") == ["show"]
    assert complete(script, "ccidemu completion ") == ["bash"]


def test_options_and_their_values(script: Path) -> None:
    serve = complete(script, "ccidemu serve --")
    assert {"--listen", "--connect", "--card", "--state-dir", "--read-only", "--trace",
            "--spice", "--config", "--verbose"} <= set(serve)
    # a value is skipped when walking: --trace's FILE is not taken for a subcommand
    assert "--card" in complete(script, "ccidemu serve --trace ctl --ca")
    assert complete(script, "ccidemu decode --as r") == ["rapdu"]


def test_card_specs_complete_schemes_then_files(script: Path, tmp_path: Path) -> None:
    assert {"piv:", "cac:", "replay:", "test:"} <= set(complete(script, "ccidemu serve --card "))
    (tmp_path / "alice-card").mkdir()
    (tmp_path / "bob.toml").write_text("")
    # bash swaps in only what follows the last ':' of the word
    assert complete(script, "ccidemu vpcd --card piv:al", cwd=tmp_path) == ["alice-card"]
    assert complete(script, "ccidemu trace show b", cwd=tmp_path) == ["bob.toml"]


def test_the_script_follows_the_parser() -> None:
    """Every option of every (sub)command is in the tree the script is made from."""
    tree = command_tree(build_parser(None))
    assert set(tree) >= {"", *COMMANDS, "ctl insert", "trace show", "certs generate"}
    parser = build_parser("serve")
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    options = {o for a in sub.choices["serve"]._actions for o in a.option_strings}
    assert options == set(tree["serve"].options)
