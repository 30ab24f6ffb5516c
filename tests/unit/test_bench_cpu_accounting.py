# SPDX-License-Identifier: Apache-2.0
"""bench/cpu_accounting.py: process roles, the idle cost per server, steal time."""

import pytest


@pytest.fixture
def accounting(bench_script):
    return bench_script("cpu_accounting")


class _Proc:
    def __init__(self, cmd, ppid=1):
        self._cmd, self._ppid = cmd, ppid

    def cmdline(self):
        return self._cmd.split()

    def name(self):
        return self._cmd.split()[0]

    def ppid(self):
        return self._ppid


@pytest.mark.parametrize("cmd, role", [
    ("ray::DashboardAgent", "ray:dashboard_agent"),  # Ray renames its agents' processes: not "other_worker"
    ("ray::RuntimeEnvAgent", "ray:runtime_env_agent"),
    ("ray::ProxyActor", "ray:proxy"),
    ("ray::ServeReplica:llm:E2EIngress", "ray:ingress_replica"),
    ("ray::ServeReplica:llm:E2ELLMServer:smollm2-135m", "ray:engine_replica"),
    ("ray::IDLE", "ray:other_worker"),
    ("python -m vllm.entrypoints.openai.api_server --port 1", "vllm:api_server"),
    ("VLLM::Worker", "other:engine_worker"),  # named after the server that started it; none here
    ("VLLM::EngineCore", "other:engine_core"),
])
def test_processes_are_labelled_by_role(accounting, cmd, role):
    assert accounting._role(_Proc(cmd), {}) == role


def test_idle_cores_average_over_phases_and_total_only_the_servers_own_processes(accounting):
    idle = accounting.merged_idle({
        "vllm": [{"vllm:api_server": 0.004, "vllm:engine_core": 0.002, "other:python": 0.01},
                 {"vllm:api_server": 0.006, "bench:load_generator": 0.003}],
        "ray_serve_llm": [{"ray:gcs": 0.01, "ray:proxy": 0.02, "other:python": 0.01}],
    })
    assert idle["vllm"]["vllm:api_server"] == 0.005 and idle["vllm"]["vllm:engine_core"] == 0.001
    assert idle["vllm"]["total"] == 0.006  # the S3 store (other:) and the load generator (bench:) left out
    assert idle["ray_serve_llm"]["total"] == 0.03
    assert next(iter(idle["ray_serve_llm"])) == "ray:proxy"  # largest first


def test_steal_time_is_the_eighth_cpu_counter_of_proc_stat(accounting, tmp_path):
    import os

    stat = tmp_path / "stat"
    stat.write_text("cpu  100 5 30 900 2 0 1 250 0 0\ncpu0 50 2 15 450 1 0 0 125 0 0\n")
    assert accounting.steal_seconds(stat) == 250 / os.sysconf("SC_CLK_TCK")
    stat.write_text("cpu  100 5 30 900\n")  # an old kernel without the column
    assert accounting.steal_seconds(stat) == 0.0
    assert accounting.steal_seconds(tmp_path / "missing") == 0.0
    assert accounting.steal_seconds() >= 0.0  # this machine's
