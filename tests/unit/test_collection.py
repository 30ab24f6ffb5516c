# SPDX-License-Identifier: Apache-2.0
"""The train tier (.venv/train, no Ray Serve or vLLM) collects every test module too: a module
that imports serve-only code at its top must skip there, or the whole train tier stops."""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAIN_PYTHON = ROOT / ".venv" / "train" / "bin" / "python"


def test_every_module_collects_in_the_train_environment():
    if not TRAIN_PYTHON.exists():
        pytest.skip("no .venv/train here (make env-train)")
    result = subprocess.run([str(TRAIN_PYTHON), "-m", "pytest", "-m", "train", "--collect-only", "-q",
                             "-p", "no:cacheprovider", "tests"],
                            cwd=ROOT, capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "error" not in result.stdout.splitlines()[-1], result.stdout[-3000:]
