# SPDX-License-Identifier: Apache-2.0
"""The CPUs a process can keep busy (e2e_llm.host_cpus): affinity and cgroup CPU quotas, the
training workers' thread share, and the vLLM CPU engine's thread binding under a quota."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from e2e_llm import host_cpus
from e2e_llm.host_cpus import ENGINE_BIND_ENV, PLUGIN_NAME, CpuBudget, cpu_budget, engine_cpu_env, threads_per_process

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
    budget = cpu_budget(proc, root, affinity=set(range(8)))
    assert (budget.quota, budget.usable, budget.quota_bound) == (2.5, 2, True)
    assert budget.describe() == "2 of 8 CPUs (a CPU quota of 2.5 applies: cpu cgroup /ci/job)"


def test_a_v1_quota_is_read_from_the_cpu_hierarchy_and_minus_one_is_none(tmp_path):
    proc, root = _tree(tmp_path, "5:memory:/x\n4:cpu,cpuacct:/docker/abc\n",
                       {"cpu/docker/abc/cpu.cfs_quota_us": "150000\n", "cpu/docker/abc/cpu.cfs_period_us": "100000\n",
                        "cpu/docker/cpu.cfs_quota_us": "-1\n", "cpu/docker/cpu.cfs_period_us": "100000\n"})
    assert cpu_budget(proc, root, affinity={0, 1, 2, 3}).usable == 1  # 1.5 rounds down, as Ray rounds
    (root / "cpu/docker/abc/cpu.cfs_quota_us").write_text("-1\n")
    budget = cpu_budget(proc, root, affinity={0, 1, 2, 3})
    assert (budget.quota, budget.usable, budget.describe()) == (None, 4, "4 CPUs")


def test_a_container_with_its_own_cgroup_namespace_reads_its_root(tmp_path):
    """Inside a container /proc/self/cgroup says "/" and /sys/fs/cgroup is the container's own cgroup."""
    proc, root = _tree(tmp_path, "0::/\n", {"cpu.max": "200000 100000\n"})
    assert cpu_budget(proc, root, affinity=set(range(16))).usable == 2


def test_affinity_alone_where_no_cgroup_can_be_read_and_a_quota_above_it_changes_nothing(tmp_path):
    assert cpu_budget(tmp_path / "missing", tmp_path, affinity={2, 3}) == CpuBudget((2, 3))
    proc, root = _tree(tmp_path, "0::/a\n", {"a/cpu.max": "800000 100000\n"})
    budget = cpu_budget(proc, root, affinity={0, 1})  # taskset to 2 CPUs inside an 8-CPU quota
    assert (budget.usable, budget.quota_bound, engine_cpu_env(budget)) == (2, False, {})
    assert cpu_budget(proc, root, affinity={0}).usable == 1


def test_threads_per_process_share_the_usable_cpus_within_what_each_reserved():
    sixteen = CpuBudget(tuple(range(16)))
    assert threads_per_process(sixteen, 2) == 8
    assert threads_per_process(sixteen, 2, reserved=4) == 4  # a worker that reserved 4 CPUs from Ray
    assert threads_per_process(sixteen, 3) == 5
    assert threads_per_process(CpuBudget((0, 1)), 2) == 1
    assert threads_per_process(CpuBudget((0,)), 2) == 1  # never 0
    assert threads_per_process(CpuBudget(tuple(range(16)), 2.0, "q"), 2) == 1


def test_the_engine_is_bound_to_one_cpu_per_core_as_many_as_the_quota_pays_for_less_one(tmp_path):
    sys_cpus = tmp_path / "cpu"
    for cpu in range(8):  # 4 cores with 2 threads each: siblings are cpu and cpu + 4
        topology = sys_cpus / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "core_id").write_text(f"{cpu % 4}\n")
        (topology / "physical_package_id").write_text("0\n")
    budget = CpuBudget(tuple(range(8)), 3.0, "cpu cgroup /ci")
    assert engine_cpu_env(budget, sys_cpus) == {ENGINE_BIND_ENV: "0,1"}
    assert engine_cpu_env(CpuBudget(tuple(range(8)), 6.0, "q"), sys_cpus) == {ENGINE_BIND_ENV: "0,1,2,3,4"}
    assert engine_cpu_env(CpuBudget(tuple(range(8)), 1.0, "q"), sys_cpus) == {ENGINE_BIND_ENV: "0"}
    # no topology to read: each CPU its own core
    assert engine_cpu_env(CpuBudget((4, 5, 6), 2.0, "q"), tmp_path / "none") == {ENGINE_BIND_ENV: "4"}
    assert engine_cpu_env(CpuBudget(tuple(range(8)))) == {}  # no quota: vLLM binds by itself


def test_the_thread_binding_is_a_vllm_plugin_that_a_users_own_binding_overrides(monkeypatch):
    (entry,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == PLUGIN_NAME]
    assert entry.load() is host_cpus.register_vllm_threads  # pyproject.toml, installed (make env)
    pytest.importorskip("vllm")
    monkeypatch.setattr(host_cpus, "cpu_budget", lambda: CpuBudget((0, 1, 2, 3), 2.0, "cpu cgroup /t"))
    monkeypatch.delenv(ENGINE_BIND_ENV, raising=False)
    host_cpus.register_vllm_threads()
    assert os.environ[ENGINE_BIND_ENV] == "0"
    monkeypatch.setenv(ENGINE_BIND_ENV, "2,3")
    host_cpus.register_vllm_threads()
    assert os.environ[ENGINE_BIND_ENV] == "2,3"


def _cpu_cgroup(quota_us: int) -> Path | None:
    """A fresh cgroup limited to ``quota_us`` per 100 ms that this process may create, v1 or v2."""
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


def test_a_process_in_a_real_cpu_limited_cgroup_reads_its_quota():
    """On the real kernel: a child moved into a cgroup limited to half a CPU reads that quota,
    and can use 1 CPU whatever its affinity."""
    folder = _cpu_cgroup(50000)
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
