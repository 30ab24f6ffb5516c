# SPDX-License-Identifier: Apache-2.0
"""How many CPUs this process can keep busy: fewer than the machine shows inside a container
with a CPU limit (``docker run --cpus``, a Kubernetes pod's ``limits.cpu``, a CI job's slice) or
under ``taskset``.

``os.cpu_count()`` counts the machine; ``os.sched_getaffinity`` counts the CPUs this process may
run on, but not a cgroup's CPU quota, which lets the whole group run for only ``quota`` CPUs'
worth of time. OpenMP and vLLM size their thread pools from the affinity, so under a quota of 2
on a 16-core host every engine step runs 15 threads that the kernel then stops for most of each
period; on 2 cores with a quota of 1, one thread beats two (bench/RESULTS.md, "host_cpus").

- :func:`cpu_budget`: the affinity and the tightest CPU quota of this process's cgroup and its
  ancestors (v1 ``cpu.cfs_quota_us``, v2 ``cpu.max``), and :attr:`CpuBudget.usable`, the CPUs'
  worth of work that can run at once. Ray sizes a local instance by it
  (``num_cpus``: Ray itself reads a quota but not the affinity).
- :func:`threads_per_process`: an even share of it among processes on this machine (the CPU
  training workers, ``train.cpu_threads_per_worker: auto``).
- :func:`engine_cpu_env`: where a quota caps the CPUs, the vLLM CPU engine's thread binding
  (``VLLM_CPU_OMP_THREADS_BIND``) to as many cores as the quota pays for, less one for
  everything else, as vLLM binds on a machine of that size. :func:`register_vllm_threads`, this
  package's second ``vllm.general_plugins`` entry point (pyproject.toml), sets it in every CPU
  engine's own processes (batch and serve, on whatever node they run), unless it is set already.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from e2e_llm.cgroups import ROOT, SELF, Cgroup, own_cgroup, read_int, up_to_mount

ENGINE_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
PLUGIN_NAME = "e2e_llm_cpu_threads"  # the entry point's name in pyproject.toml (what VLLM_PLUGINS lists)
SYS_CPUS = Path("/sys/devices/system/cpu")


@dataclass(frozen=True)
class CpuBudget:
    cpus: tuple[int, ...]  # the CPUs this process may run on, in order
    quota: float | None = None  # CPUs' worth of time its cgroup allows, where one sets a limit
    quota_scope: str | None = None  # which cgroup sets it

    @property
    def usable(self) -> int:
        """The affinity, or fewer where a quota allows less: rounded down (as Ray rounds it), at least 1."""
        if self.quota is None:
            return max(1, len(self.cpus))
        return max(1, min(len(self.cpus), math.floor(self.quota + 1e-9)))

    @property
    def quota_bound(self) -> bool:
        return self.usable < len(self.cpus)

    def describe(self) -> str:
        if not self.quota_bound:
            return f"{self.usable} CPUs"
        return f"{self.usable} of {len(self.cpus)} CPUs (a CPU quota of {self.quota:g} applies: {self.quota_scope})"


def cpu_budget(self_cgroup: Path = SELF, root: Path = ROOT, affinity: set[int] | None = None) -> CpuBudget:
    cpus = tuple(sorted(os.sched_getaffinity(0) if affinity is None else affinity))
    found = own_cgroup("cpu", self_cgroup, root)
    quota = None if found is None else _tightest_quota(found)
    if quota is None:
        return CpuBudget(cpus)
    return CpuBudget(cpus, quota, f"cpu cgroup {found.path}")


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


def threads_per_process(budget: CpuBudget, processes: int, reserved: float | None = None) -> int:
    """Threads for each of ``processes`` sharing this machine's usable CPUs evenly, and no more than
    the CPUs each reserved from Ray (``reserved``), where it says; at least 1."""
    share = budget.usable // max(1, processes)
    if reserved:
        share = min(share, int(reserved))
    return max(1, share)


def engine_cpu_env(budget: CpuBudget, sys_cpus: Path = SYS_CPUS) -> dict[str, str]:
    """``{VLLM_CPU_OMP_THREADS_BIND: "a,b,..."}`` where a quota caps ``budget`` below its CPUs:
    ``usable - 1`` CPUs (at least 1), one per physical core, in the order vLLM's own binding takes
    them; ``{}`` otherwise (vLLM binds by itself)."""
    if not budget.quota_bound:
        return {}
    wanted = max(1, budget.usable - 1)
    first_of_core: dict[tuple, int] = {}
    siblings = []
    for cpu in budget.cpus:
        topology = sys_cpus / f"cpu{cpu}" / "topology"
        core = read_int(topology / "core_id")
        # unreadable topology: each CPU is its own core
        key = ("cpu", cpu) if core is None else (read_int(topology / "physical_package_id"), core)
        if key in first_of_core:
            siblings.append(cpu)
        else:
            first_of_core[key] = cpu
    ordered = sorted(first_of_core.values()) + siblings  # another core's thread before a sibling's
    return {ENGINE_BIND_ENV: ",".join(str(cpu) for cpu in ordered[:wanted])}


def register_vllm_threads() -> None:
    """vLLM's general-plugin hook, called in each process vLLM starts before its engine binds
    threads: on the CPU platform, :func:`engine_cpu_env` into this process's environment (its
    children inherit it). A binding the user set wins."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or ENGINE_BIND_ENV in os.environ:
        return
    budget = cpu_budget()
    env = engine_cpu_env(budget)
    if env:
        import logging

        os.environ.update(env)
        logging.getLogger("vllm.e2e_llm").info("%s=%s: %s", ENGINE_BIND_ENV, env[ENGINE_BIND_ENV], budget.describe())
