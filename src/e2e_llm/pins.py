# SPDX-License-Identifier: Apache-2.0
"""Lock files (``images/<image>/requirements*.lock``): how their pins are read and how package
names compare. Standard library only: ``images/lock.py`` uses it before any environment exists."""

from __future__ import annotations

import re
import sys
from pathlib import Path

# Set up by the venv or the base image: pinned in no lock.
BOOTSTRAP = frozenset({"pip", "setuptools", "wheel"})


def canonical_name(name: str) -> str:
    """A distribution's name as pip compares them (PEP 503): ``Pydantic_Core`` -> ``pydantic-core``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins(lock: Path) -> dict[str, str]:
    """The ``name==version`` lines of a lock file, by :func:`canonical_name` (a line's
    ``; marker``, the machines that need it, is not part of the version)."""
    pins = {}
    for line in lock.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].split(";", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonical_name(name.strip())] = version.strip()
    return pins


def main(argv: list[str]) -> int:
    """``python pins.py LOCK NAME``: NAME's version in LOCK (images/install-torch-cpu.sh, before
    any environment has e2e-llm installed)."""
    lock, name = Path(argv[0]), argv[1]
    version = lock_pins(lock).get(canonical_name(name))
    if not version:
        print(f"{lock} pins no {name} (a line {name}==X)", file=sys.stderr)
        return 1
    print(version)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
