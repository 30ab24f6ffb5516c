# SPDX-License-Identifier: Apache-2.0
"""bench/cpu_accounting.py: process roles, the idle cost per server, steal time, runqueue wait."""

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


def test_runqueue_wait_sums_every_thread_and_apart_those_named_as_the_process(accounting, tmp_path):
    import os

    def thread(tid, comm, wait_ns):
        task = tmp_path / "7" / "task" / str(tid)
        task.mkdir(parents=True)
        (task / "comm").write_text(comm + "\n")
        (task / "schedstat").write_text(f"123456 {wait_ns} 42\n")

    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "comm").write_text("VLLM::Worker\n")
    thread(7, "VLLM::Worker", 2_000_000_000)  # the model's main thread
    thread(8, "VLLM::Worker", 500_000_000)  # an OpenMP thread: same name
    thread(9, "gloo_tcp_loop", 4_000_000_000)  # a helper: waits behind the model, takes nothing
    assert accounting.runqueue_wait_seconds(7, tmp_path) == (6.5, 2.5)
    (tmp_path / "7" / "task" / "9" / "schedstat").write_text("garbage\n")  # unreadable: skipped
    assert accounting.runqueue_wait_seconds(7, tmp_path) == (2.5, 2.5)
    assert accounting.runqueue_wait_seconds(8, tmp_path) == (0.0, 0.0)  # no such process
    every, named = accounting.runqueue_wait_seconds(os.getpid())  # this machine's
    assert every >= named >= 0.0


def test_seconds_by_role_between_snapshots_per_field(accounting):
    before = {1: ("vllm:engine_worker", 10.0, 3.0, 1.0), 2: ("vllm:api_server", 1.0, 0.5, 0.5)}
    after = {1: ("vllm:engine_worker", 40.0, 9.0, 2.5), 2: ("vllm:api_server", 3.0, 0.5, 0.5),
             3: ("vllm:engine_core", 0.5, 0.2, 0.1)}  # started between the two: counted from 0
    assert accounting.cpu_by_role(before, after) == {"vllm:engine_worker": 30.0, "vllm:api_server": 2.0,
                                                     "vllm:engine_core": 0.5}
    assert accounting.cpu_by_role(before, after, field=2) == {"vllm:engine_worker": 6.0, "vllm:engine_core": 0.2}
    assert accounting.cpu_by_role(before, after, field=3) == {"vllm:engine_worker": 1.5, "vllm:engine_core": 0.1}
