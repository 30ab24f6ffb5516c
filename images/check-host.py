#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""`make env`'s first step: say why this host cannot install the locks (not Linux, another
machine, a glibc older than the pinned wheels need), or the environments cannot live in their
folder (argument: `VENV`), before pip fails deep inside a build.
Standard library only, any Python 3: it may run before the environments' Python exists."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from e2e_llm.lock_platforms import environment_folder_problem, host_problems  # noqa: E402  (standard library only)

problems = host_problems(platform.system(), platform.machine(), platform.libc_ver())
if len(sys.argv) > 1 and (problem := environment_folder_problem(str(Path(sys.argv[1]).absolute()))):
    problems.append(problem)
for problem in problems:
    print(f"make env: {problem}", file=sys.stderr)
sys.exit(1 if problems else 0)
