# SPDX-License-Identifier: Apache-2.0
"""How many CPUs this process can keep busy: fewer than the machine has inside a container with a
CPU limit (``docker run --cpus``, a Kubernetes pod's ``limits.cpu``, a CI job's slice) or under
``taskset`` / a cpuset.

``os.cpu_count()`` counts the machine. ``os.sched_getaffinity`` counts the CPUs this process may
run on, but not a cgroup's CPU quota, which lets the whole group run for only ``quota`` CPUs'
worth of time a period. Ray reads the quota but not the affinity. e2e-llm gave the Ray instances
it starts itself (``e2e-llm train``, ``batch``, ``serve``) ``os.cpu_count()``, so under
``--cpus 2`` on a 16-core host Ray planned for 16, and training workers reserving more CPUs than
the container allows all started, with more threads than it runs at once (on 2 cores under a
quota of 1, 2 threads a worker trained 1.30x slower than 1: bench/RESULTS.md,
"train_cpu_threads"); now they are refused before the first worker, with the numbers.

:func:`cpu_budget`: the affinity and the tightest CPU quota of this process's cgroup and its
ancestors (v1 ``cpu.cfs_quota_us``, v2 ``cpu.max``; :mod:`e2e_llm.cgroups`);
:attr:`CpuBudget.usable` is what a local Ray instance gets as ``num_cpus``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from e2e_llm.cgroups import ROOT, SELF, Cgroup, own_cgroup, read_int, up_to_mount


@dataclass(frozen=True)
class CpuBudget:
    cpus: tuple[int, ...]  # the CPUs this process may run on
    machine: int  # the CPUs the machine has
    quota: float | None = None  # CPUs' worth of time its cgroup allows, where one sets a limit
    quota_scope: str | None = None  # which cgroup sets it

    @property
    def usable(self) -> int:
        """The affinity, or fewer where a quota allows less: rounded down (as Ray rounds it), at least 1."""
        if self.quota is None:
            return max(1, len(self.cpus))
        return max(1, min(len(self.cpus), math.floor(self.quota + 1e-9)))

    @property
    def limited(self) -> bool:
        return self.usable < self.machine

    def describe(self) -> str:
        if not self.limited:
            return f"{self.usable} CPUs"
        why = []
        if len(self.cpus) < self.machine:
            why.append(f"this process may run on {len(self.cpus)} of them (taskset, a cpuset)")
        if self.quota is not None and self.usable < len(self.cpus):
            why.append(f"a CPU quota of {self.quota:g} applies ({self.quota_scope})")
        return f"{self.usable} of this machine's {self.machine} CPUs: {'; '.join(why)}"


def cpu_budget(self_cgroup: Path = SELF, root: Path = ROOT, affinity: set[int] | None = None,
               machine: int | None = None) -> CpuBudget:
    cpus = tuple(sorted(os.sched_getaffinity(0) if affinity is None else affinity))
    machine = machine or os.cpu_count() or len(cpus)
    found = own_cgroup("cpu", self_cgroup, root)
    quota = None if found is None else _tightest_quota(found)
    if quota is None:
        return CpuBudget(cpus, machine)
    return CpuBudget(cpus, machine, quota, f"cpu cgroup {found.path}")


def usable_cpus() -> int:
    return cpu_budget().usable


def _tightest_quota(group: Cgroup) -> float | None:
    """The smallest quota / period over the cgroup and its ancestors; None where none sets one."""
    quotas = []
    for node in up_to_mount(group):
        if group.version == 1:
            quota, period = read_int(node / "cpu.cfs_quota_us"), read_int(node / "cpu.cfs_period_us")
        else:
            quota, period = _v2_cpu_max(node / "cpu.max")
        if quota is not None and period and quota > 0:  # v1 writes -1, v2 "max", for no limit
            quotas.append(quota / period)
    return min(quotas) if quotas else None


def _v2_cpu_max(path: Path) -> tuple[int | None, int | None]:
    try:
        parts = path.read_text().split()
    except OSError:
        return None, None
    if len(parts) != 2 or not parts[1].isdigit():
        return None, None
    return (int(parts[0]) if parts[0].isdigit() else None), int(parts[1])
