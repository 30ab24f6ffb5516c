# SPDX-License-Identifier: Apache-2.0
"""A real CPU-limited cgroup for tests that run something as inside a container with ``--cpus``."""

from __future__ import annotations

import uuid
from pathlib import Path


def cpu_cgroup(quota_us: int) -> Path | None:
    """A fresh cgroup limited to ``quota_us`` of CPU time per 100 ms, v1 or v2, that this process
    may create (root and a cpu controller); None where it cannot. The caller removes it (rmdir)
    once its processes are gone."""
    name = f"e2e-llm-test-{uuid.uuid4().hex[:8]}"
    v1, v2 = Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup")
    try:
        if (v1 / "cpu.cfs_quota_us").exists():
            (v1 / name).mkdir()
            (v1 / name / "cpu.cfs_period_us").write_text("100000")
            (v1 / name / "cpu.cfs_quota_us").write_text(str(quota_us))
            return v1 / name
        if "cpu" in (v2 / "cgroup.subtree_control").read_text().split():
            (v2 / name).mkdir()
            (v2 / name / "cpu.max").write_text(f"{quota_us} 100000")
            return v2 / name
    except OSError:
        return None
    return None


def inside(cgroup: Path, cmd: list[str]) -> list[str]:
    """``cmd`` run from a shell that first moves itself into ``cgroup`` (its children follow)."""
    return ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh", *cmd]
