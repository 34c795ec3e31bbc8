"""The house rules a linter can check (pyflakes, pycodestyle, bugbear, import order), via ruff."""

from __future__ import annotations

import subprocess
import sys

from tests.support.processes import REPO


def test_ruff_finds_nothing() -> None:
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "ota_bridge", "agent", "tests", "bench"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
