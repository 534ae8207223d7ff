"""Every script in scripts/ starts: `--help` exits 0 with a usage line, loads no model and writes
nothing (scripts are run by hand, so nothing else would notice an import that moved)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.mark.parametrize("script", sorted(SCRIPTS.glob("*.py")), ids=lambda path: path.name)
def test_every_script_answers_help(script, tmp_path):
    env = {**os.environ, "OUROBOROS_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"usage: {script.name}"), run.stdout
    assert list(tmp_path.iterdir()) == [], "--help wrote files (or fetched a model)"


@pytest.mark.parametrize("script", sorted(SCRIPTS.glob("*.sh")), ids=lambda path: path.name)
def test_every_shell_script_parses(script):
    run = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_the_scripts_are_found():
    assert list(SCRIPTS.glob("*.py")), f"no scripts found in {SCRIPTS}"
