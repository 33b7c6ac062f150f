"""The code base stays ruff-clean (rules in ruff.toml)."""

import subprocess
from pathlib import Path

from conftest import BIN

REPO = Path(__file__).resolve().parent.parent


def test_ruff_is_clean():
    result = subprocess.run(
        [str(BIN / "ruff"), "check", "."], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
