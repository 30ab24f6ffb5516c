# SPDX-License-Identifier: Apache-2.0
"""Lock files (``images/<image>/requirements*.lock``): how their pins are read and how package
names compare. Standard library only: ``images/lock.py`` uses it before any environment exists."""

from __future__ import annotations

import re
from pathlib import Path


def canonical_name(name: str) -> str:
    """A distribution's name as pip compares them (PEP 503): ``Pydantic_Core`` -> ``pydantic-core``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins(lock: Path) -> dict[str, str]:
    """The ``name==version`` lines of a lock file, by :func:`canonical_name`."""
    pins = {}
    for line in lock.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonical_name(name.strip())] = version.strip()
    return pins
