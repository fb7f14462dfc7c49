"""The whole repository passes ruff with the rules of ruff.toml."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_check_passes_on_the_whole_repository():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", REPO],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
