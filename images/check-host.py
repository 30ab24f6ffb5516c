#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""`make env`'s first step: say why this host cannot install the locks (not Linux, another
machine, a glibc older than the pinned wheels need) before pip fails deep inside a build.
Standard library only, any Python 3: it may run before the environments' Python exists."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from e2e_llm.lock_platforms import host_problems  # noqa: E402  (standard library only here)

problems = host_problems(platform.system(), platform.machine(), platform.libc_ver())
for problem in problems:
    print(f"make env: {problem}", file=sys.stderr)
sys.exit(1 if problems else 0)
