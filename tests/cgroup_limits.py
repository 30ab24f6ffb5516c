# SPDX-License-Identifier: Apache-2.0
"""Real limited cgroups for tests that run something as inside a container (``--cpus``,
``--memory``): made where this process may (root and the controller), v1 or v2."""

from __future__ import annotations

import uuid
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")  # v2's hierarchy, and where v1 mounts one per controller


def limited_cgroup(controller: str, v1_files: dict[str, str], v2_files: dict[str, str]) -> tuple[Path, str] | None:
    """A fresh cgroup with ``controller`` limited by writing ``v1_files`` (v1, where its hierarchy
    is mounted) or ``v2_files`` (v2, where the controller is enabled below the root), in order:
    (folder, "v1" or "v2"), or None where it cannot be made. The caller removes it (rmdir) once
    its processes are gone."""
    name = f"e2e-llm-test-{uuid.uuid4().hex[:8]}"
    v1 = ROOT / controller
    try:
        if (v1 / next(iter(v1_files))).exists():
            folder, files, version = v1 / name, v1_files, "v1"
        elif controller in (ROOT / "cgroup.subtree_control").read_text().split():
            folder, files, version = ROOT / name, v2_files, "v2"
        else:
            return None
        folder.mkdir()
        for file, value in files.items():
            (folder / file).write_text(value)
    except OSError:
        return None
    return folder, version


def cpu_cgroup(quota_us: int) -> Path | None:
    """A fresh cgroup limited to ``quota_us`` of CPU time per 100 ms (None where it cannot be made)."""
    made = limited_cgroup("cpu", {"cpu.cfs_quota_us": str(quota_us), "cpu.cfs_period_us": "100000"},
                          {"cpu.max": f"{quota_us} 100000"})
    return made[0] if made else None


def memory_cgroup(limit: int) -> tuple[Path, str] | None:
    """A fresh cgroup limited to ``limit`` bytes of memory, no swap on v2: (folder, "v1" or "v2")."""
    return limited_cgroup("memory", {"memory.limit_in_bytes": str(limit)},
                          {"memory.max": str(limit), "memory.swap.max": "0"})


def inside(cgroup: Path, cmd: list[str]) -> list[str]:
    """``cmd`` run from a shell that first moves itself into ``cgroup`` (its children follow)."""
    return ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh", *cmd]
