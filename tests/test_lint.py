"""The code passes ruff's checks (the rule selection in pyproject.toml) and
is formatted as `ruff format` formats it."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = ["keras_fim", "keras_fim_cli", "tests", "benchmarks", "examples", "docs"]


@pytest.mark.parametrize(
    "command", [["check"], ["format", "--check"]], ids=["check", "format"]
)
def test_ruff(command):
    done = subprocess.run(
        [sys.executable, "-m", "ruff", *command, *PATHS],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
