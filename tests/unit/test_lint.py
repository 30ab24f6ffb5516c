# SPDX-License-Identifier: Apache-2.0
"""The PR workflow runs `make lint`; keep the suite from landing code that would fail it."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_ruff_reports_nothing():
    ruff = Path(sys.executable).with_name("ruff")
    if not ruff.exists():
        ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is pinned in the serve environment only")
    paths = re.search(r"bin/ruff check (.+)", (ROOT / "Makefile").read_text()).group(1).split()  # what make lint checks
    assert "src" in paths and "tests" in paths
    result = subprocess.run([str(ruff), "check", "--output-format", "concise", *paths],
                            cwd=ROOT, capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
