"""The whole repository is formatted by ruff and passes its lint rules (ruff.toml)."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "ruff_command", [["check"], ["format", "--check"]], ids=["lint", "format"]
)
def test_ruff_passes_on_the_whole_repository(ruff_command):
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *ruff_command, REPO],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
