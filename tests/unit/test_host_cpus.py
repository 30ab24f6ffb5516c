# SPDX-License-Identifier: Apache-2.0
"""The CPUs a process can keep busy (e2e_llm.host_cpus): affinity and cgroup CPU quotas, v1 and
v2, from fake cgroup trees and a real CPU-limited cgroup. What the Ray instances e2e-llm starts
get from it: tests/unit/test_serve_args.py and the train tier's CPU-quota test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cgroup_limits import cpu_cgroup

from e2e_llm import host_cpus
from e2e_llm.host_cpus import CpuBudget, cpu_budget

SRC = str(Path(host_cpus.__file__).resolve().parents[1])


def _tree(tmp_path: Path, self_cgroup: str, files: dict[str, str]) -> tuple[Path, Path]:
    proc = tmp_path / "self_cgroup"
    proc.write_text(self_cgroup)
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return proc, root


def test_a_v2_quota_on_an_ancestor_caps_the_usable_cpus(tmp_path):
    proc, root = _tree(tmp_path, "0::/ci/job\n", {"ci/job/cpu.max": "max 100000\n", "ci/cpu.max": "250000 100000\n"})
    budget = cpu_budget(proc, root, affinity=set(range(8)), machine=8)
    assert (budget.quota, budget.usable, budget.limited) == (2.5, 2, True)
    assert budget.describe() == "2 of this machine's 8 CPUs: a CPU quota of 2.5 applies (cpu cgroup /ci/job)"


def test_a_v1_quota_is_read_from_the_cpu_hierarchy_and_minus_one_is_none(tmp_path):
    proc, root = _tree(tmp_path, "5:memory:/x\n4:cpu,cpuacct:/docker/abc\n",
                       {"cpu/docker/abc/cpu.cfs_quota_us": "150000\n", "cpu/docker/abc/cpu.cfs_period_us": "100000\n",
                        "cpu/docker/cpu.cfs_quota_us": "-1\n", "cpu/docker/cpu.cfs_period_us": "100000\n"})
    assert cpu_budget(proc, root, affinity={0, 1, 2, 3}).usable == 1  # 1.5 rounds down, as Ray rounds
    (root / "cpu/docker/abc/cpu.cfs_quota_us").write_text("-1\n")
    budget = cpu_budget(proc, root, affinity={0, 1, 2, 3}, machine=4)
    assert (budget.quota, budget.usable, budget.describe()) == (None, 4, "4 CPUs")


def test_a_container_with_its_own_cgroup_namespace_reads_its_root(tmp_path):
    """Inside a container /proc/self/cgroup says "/" and /sys/fs/cgroup is the container's own cgroup."""
    proc, root = _tree(tmp_path, "0::/\n", {"cpu.max": "200000 100000\n"})
    assert cpu_budget(proc, root, affinity=set(range(16))).usable == 2


def test_affinity_alone_where_no_cgroup_can_be_read_and_a_quota_above_it_changes_nothing(tmp_path):
    assert cpu_budget(tmp_path / "missing", tmp_path, affinity={2, 3}, machine=4) == CpuBudget((2, 3), 4)
    proc, root = _tree(tmp_path, "0::/a\n", {"a/cpu.max": "800000 100000\n"})
    budget = cpu_budget(proc, root, affinity={0, 1}, machine=16)  # taskset to 2 CPUs inside an 8-CPU quota
    assert (budget.usable, budget.describe()) == (
        2, "2 of this machine's 16 CPUs: this process may run on 2 of them (taskset, a cpuset)")
    assert cpu_budget(proc, root, affinity={0}).usable == 1
    both = cpu_budget(proc, root, affinity=set(range(12)), machine=16)
    assert both.describe() == ("8 of this machine's 16 CPUs: this process may run on 12 of them (taskset, a "
                               "cpuset); a CPU quota of 8 applies (cpu cgroup /a)")


def test_a_process_in_a_real_cpu_limited_cgroup_reads_its_quota():
    """On the real kernel: a child moved into a cgroup limited to half a CPU reads that quota,
    and can use 1 CPU whatever its affinity."""
    folder = cpu_cgroup(50000)
    if folder is None:
        pytest.skip("no cpu cgroup can be made here (needs root and a cpu controller)")
    child = ("import os\n"
             f"open('{folder}/cgroup.procs', 'w').write(str(os.getpid()))\n"
             "from e2e_llm.host_cpus import cpu_budget, usable_cpus\n"
             "b = cpu_budget()\n"
             "print(b.quota, usable_cpus(), len(b.cpus), b.quota_scope, sep='|')\n")
    try:
        done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": SRC})
        assert done.returncode == 0, done.stderr
        quota, usable, cpus, scope = done.stdout.strip().split("|")
        assert (float(quota), int(usable)) == (0.5, 1), done.stdout
        assert int(cpus) == len(os.sched_getaffinity(0)) and scope == f"cpu cgroup /{folder.name}"
    finally:
        folder.rmdir()
