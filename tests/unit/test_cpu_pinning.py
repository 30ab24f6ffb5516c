# SPDX-License-Identifier: Apache-2.0
"""e2e_llm.cpu_pinning on a process tree that looks like a local Ray Serve app (titles as Ray and
vLLM set them), and the titles it relies on, checked against the pinned Ray and vLLM."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import contextmanager

import psutil
import pytest

from e2e_llm.config import load_profile
from e2e_llm.cpu_pinning import (
    ENGINE_CPUS_ENV,
    RAY_WORKER_TITLE_PREFIX,
    VLLM_WORKER_TITLE,
    descendant_pids,
    engine_cpus_env,
    parse_cpus,
    pin_off_engine,
    settle_off_engine_workers,
)
from e2e_llm.local_ray import LocalRay

TWO_CPUS = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to split")
SLEEP = "import time; time.sleep(120)"


def test_the_local_profile_isolates_on_cpu_and_a_gpu_profile_never(project_root):
    config = load_profile("local", root=project_root)
    assert config.serve.isolate_engine_cpus and config.serve.num_gpus_per_replica == 0
    assert parse_cpus(engine_cpus_env(config)[ENGINE_CPUS_ENV]) == os.sched_getaffinity(0)
    config.serve.num_gpus_per_replica = 1  # GPU engines bind nothing to CPUs
    assert engine_cpus_env(config) == {}
    config.serve.num_gpus_per_replica, config.serve.isolate_engine_cpus = 0, False
    assert engine_cpus_env(config) == {}
    assert load_profile("cluster", root=project_root).serve.isolate_engine_cpus is False


@pytest.mark.parametrize("value", ["", " , ", "0-3", "a,b"])
def test_a_bad_cpu_list_names_the_variable(value):
    with pytest.raises(ValueError, match=ENGINE_CPUS_ENV):
        parse_cpus(value)


def _spawn(title: str, code: str) -> str:
    """Python source that starts ``code`` in a child whose process title is ``title`` (a Python
    started under another name cannot find its own executable: it is named here)."""
    return f"subprocess.Popen([{title!r}, '-c', {code!r}], executable={sys.executable!r})"


@pytest.fixture
def fake_serve_tree():
    with _fake_serve_tree() as tree:
        yield tree


@contextmanager
def _fake_serve_tree():
    """driver -> (replica "ray::ServeReplica:..." -> "VLLM::EngineCore" -> "VLLM::Worker"),
    "ray::ProxyActor", "raylet"-like daemon; yields (driver, {title: pid})."""
    worker = f"import subprocess, sys; {_spawn(VLLM_WORKER_TITLE, SLEEP)}; {SLEEP}"
    core = f"import subprocess, sys; {_spawn('VLLM::EngineCore', worker)}; {SLEEP}"
    driver = textwrap.dedent(f"""
        import subprocess, sys, time
        {_spawn('ray::ServeReplica:llm:E2ELLMServer:m', core)}
        {_spawn('ray::ProxyActor', SLEEP)}
        {_spawn('/x/ray/core/src/ray/gcs/gcs_server', SLEEP)}
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", driver])
    try:
        deadline = time.monotonic() + 30
        while True:
            titles = {" ".join(p.cmdline()).split(" -c")[0]: p.pid
                      for p in psutil.Process(proc.pid).children(recursive=True)}
            if len(titles) == 5 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert len(titles) == 5, titles
        yield proc, titles
    finally:
        for p in psutil.Process(proc.pid).children(recursive=True):
            p.kill()
        proc.kill()
        proc.wait(10)


@TWO_CPUS
def test_everything_but_the_engine_family_moves_off_the_workers_cpus(fake_serve_tree, monkeypatch):
    driver, pids = fake_serve_tree
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(pids[VLLM_WORKER_TITLE], {cpus[0]})  # as vLLM binds its worker
    monkeypatch.setenv(ENGINE_CPUS_ENV, ",".join(map(str, cpus)))

    pinning = pin_off_engine(driver.pid)

    assert pinning is not None and pinning.engine_cpus == {cpus[0]}
    assert pinning.ray_cpus == set(cpus[1:])
    family = {pids["ray::ServeReplica:llm:E2ELLMServer:m"], pids["VLLM::EngineCore"], pids[VLLM_WORKER_TITLE]}
    assert set(pinning.engine) == family
    assert set(pinning.pinned) == {pids["ray::ProxyActor"], pids["/x/ray/core/src/ray/gcs/gcs_server"]}
    for pid in pinning.pinned:
        assert os.sched_getaffinity(pid) == set(cpus[1:])
    assert os.sched_getaffinity(driver.pid) == set(cpus)  # the caller's process stays
    assert os.sched_getaffinity(pids["ray::ServeReplica:llm:E2ELLMServer:m"]) == set(cpus)  # left alone
    assert os.sched_getaffinity(pids[VLLM_WORKER_TITLE]) == {cpus[0]}


REPLICA = "ray::ServeReplica:llm:E2ELLMServer:m"


@TWO_CPUS
def test_the_replica_settles_itself_and_the_scheduler_off_its_workers_cpus(fake_serve_tree, monkeypatch):
    """What the engine replica does once its engine is up (E2ELLMServer.__init__): vLLM's frontend
    (the replica) and scheduler go where vLLM meant them, the model worker stays on its CPUs, and
    nothing outside the replica moves."""
    driver, pids = fake_serve_tree
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(pids[VLLM_WORKER_TITLE], {cpus[0]})  # as vLLM binds its worker
    monkeypatch.setenv(ENGINE_CPUS_ENV, ",".join(map(str, cpus)))

    assert settle_off_engine_workers(pids[REPLICA]) == set(cpus[1:])

    assert os.sched_getaffinity(pids[REPLICA]) == set(cpus[1:])
    assert os.sched_getaffinity(pids["VLLM::EngineCore"]) == set(cpus[1:])
    assert os.sched_getaffinity(pids[VLLM_WORKER_TITLE]) == {cpus[0]}
    assert os.sched_getaffinity(pids["ray::ProxyActor"]) == set(cpus)
    assert os.sched_getaffinity(driver.pid) == set(cpus)


@TWO_CPUS
def test_a_process_that_is_not_the_workers_replica_settles_nothing(fake_serve_tree, monkeypatch):
    """The server class constructed outside a replica: a unit test in the pytest that also started
    Ray for the integration tests' session app (which stays up) and set the variable. The workers
    under pytest are that app's replica's: neither pytest nor anything under it moves."""
    driver, pids = fake_serve_tree  # under this pytest, as the session app's Ray is
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(pids[VLLM_WORKER_TITLE], {cpus[0]})
    monkeypatch.setenv(ENGINE_CPUS_ENV, ",".join(map(str, cpus)))

    assert settle_off_engine_workers() is None  # as E2ELLMServer.__init__ calls it, here in pytest

    for pid in (os.getpid(), driver.pid, pids[REPLICA], pids["VLLM::EngineCore"], pids["ray::ProxyActor"]):
        assert os.sched_getaffinity(pid) == set(cpus)


@TWO_CPUS
def test_the_replica_settles_nothing_without_the_variable_or_a_reserved_cpu(fake_serve_tree, monkeypatch):
    driver, pids = fake_serve_tree
    cpus = os.sched_getaffinity(0)
    monkeypatch.delenv(ENGINE_CPUS_ENV, raising=False)
    assert settle_off_engine_workers(pids[REPLICA]) is None  # a GPU engine, or isolation off
    monkeypatch.setenv(ENGINE_CPUS_ENV, ",".join(map(str, cpus)))
    assert settle_off_engine_workers(pids[REPLICA]) is None  # the worker holds every CPU
    assert os.sched_getaffinity(pids[REPLICA]) == os.sched_getaffinity(pids["VLLM::EngineCore"]) == cpus


@TWO_CPUS
def test_nothing_moves_without_the_variable_or_a_bound_worker(fake_serve_tree, monkeypatch):
    driver, pids = fake_serve_tree
    cpus = os.sched_getaffinity(0)
    monkeypatch.delenv(ENGINE_CPUS_ENV, raising=False)
    assert pin_off_engine(driver.pid) is None
    monkeypatch.setenv(ENGINE_CPUS_ENV, ",".join(map(str, cpus)))
    # The worker holds every allowed CPU (vLLM reserved none): nowhere to move the rest to.
    assert pin_off_engine(driver.pid) is None
    assert os.sched_getaffinity(pids["ray::ProxyActor"]) == cpus


@TWO_CPUS
def test_the_callers_own_processes_from_before_ray_stay_where_they_are(project_root, monkeypatch):
    """LocalRay as `e2e-llm serve`, the bench and the tests' app use it: a process this
    one started before Ray (a local S3 store, with a child) is not Ray's and is not moved; nor is a
    thread it had before Ray, or the thread that calls pin. A thread started after entering (as
    ``ray.init`` starts the driver's) goes with Ray's processes."""
    monkeypatch.delenv(ENGINE_CPUS_ENV, raising=False)
    cpus = sorted(os.sched_getaffinity(0))
    done = threading.Event()
    callers_thread, rays_thread = (threading.Thread(target=done.wait, daemon=True) for _ in range(2))
    callers_thread.start()
    store = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys; {_spawn('store-child', SLEEP)}; {SLEEP}"])
    try:
        deadline = time.monotonic() + 30
        while not psutil.Process(store.pid).children():
            assert time.monotonic() < deadline, "the store's child never started"
            time.sleep(0.1)
        store_child = psutil.Process(store.pid).children()[0].pid
        with LocalRay(load_profile("local", root=project_root)) as local_ray:
            assert parse_cpus(os.environ[ENGINE_CPUS_ENV]) == set(cpus)  # set for Ray's processes to inherit
            assert {store.pid, store_child} <= local_ray.before
            rays_thread.start()
            with _fake_serve_tree() as (driver, pids):  # "Ray", started after entering
                os.sched_setaffinity(pids[VLLM_WORKER_TITLE], {cpus[0]})
                pinning = local_ray.pin()
                assert pinning is not None
                assert {driver.pid, pids["ray::ProxyActor"]} <= set(pinning.pinned)
                assert store.pid not in pinning.pinned and store_child not in pinning.pinned
                assert os.sched_getaffinity(store.pid) == os.sched_getaffinity(store_child) == set(cpus)
                assert os.sched_getaffinity(pids["ray::ProxyActor"]) == set(cpus[1:])
                assert rays_thread.native_id in pinning.driver_threads
                assert os.sched_getaffinity(rays_thread.native_id) == set(cpus[1:])
                assert callers_thread.native_id not in pinning.driver_threads
                assert os.sched_getaffinity(callers_thread.native_id) == set(cpus)
                assert os.sched_getaffinity(0) == set(cpus)  # the thread that called pin
        assert ENGINE_CPUS_ENV not in os.environ  # restored on exit
    finally:
        done.set()
        for p in psutil.Process(store.pid).children(recursive=True):
            p.kill()
        store.kill()
        store.wait(10)


def test_isolation_off_in_the_profile_sets_and_pins_nothing(project_root, monkeypatch):
    monkeypatch.delenv(ENGINE_CPUS_ENV, raising=False)
    config = load_profile("local", root=project_root)
    config.serve.isolate_engine_cpus = False
    with LocalRay(config) as local_ray:
        assert ENGINE_CPUS_ENV not in os.environ
        assert local_ray.pin() is None


@TWO_CPUS
def test_an_engine_replica_started_on_fewer_cpus_widens_to_the_engines(tmp_path):
    cpus = sorted(os.sched_getaffinity(0))
    code = textwrap.dedent(f"""
        import os, threading
        os.sched_setaffinity(0, {{{cpus[-1]}}})  # as a replica started by a pinned raylet
        ready = threading.Event()
        helper = threading.Thread(target=lambda: ready.wait(), daemon=True)
        helper.start()
        from e2e_llm.cpu_pinning import widen_to_engine_cpus
        print(sorted(widen_to_engine_cpus()), sorted(os.sched_getaffinity(0)),
              sorted(os.sched_getaffinity(helper.native_id)))
    """)
    import e2e_llm

    src = os.path.dirname(os.path.dirname(e2e_llm.__file__))
    env = {**os.environ, ENGINE_CPUS_ENV: ",".join(map(str, cpus)), "PYTHONPATH": src}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == " ".join([str(cpus)] * 3)  # returned, main thread, the other thread
    env.pop(ENGINE_CPUS_ENV)
    unset = code.replace("print(sorted(widen_to_engine_cpus()),", "print(widen_to_engine_cpus(),")
    out = subprocess.run([sys.executable, "-c", unset], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"None [{cpus[-1]}] [{cpus[-1]}]"  # nothing changes


def test_descendants_are_the_live_processes_below_a_root_at_any_depth_not_zombies():
    # A parent with a child that has a child of its own, and a child that exits at once, left
    # unreaped (a zombie).
    child = f"import subprocess, sys; {_spawn('grandchild', SLEEP)}; {SLEEP}"
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import subprocess, sys, time
        {_spawn('child', child)}
        subprocess.Popen([sys.executable, '-c', 'pass'])
        time.sleep(120)
    """)])
    try:
        deadline = time.monotonic() + 30
        while True:
            children = psutil.Process(parent.pid).children(recursive=True)
            statuses = {c.pid: c.status() for c in children}
            if len(statuses) == 3 and psutil.STATUS_ZOMBIE in statuses.values():
                break
            assert time.monotonic() < deadline, f"want a child, a grandchild and a zombie, have {statuses}"
            time.sleep(0.1)
        live = {pid for pid, status in statuses.items() if status != psutil.STATUS_ZOMBIE}
        assert descendant_pids(parent.pid) == live and len(live) == 2
        assert descendant_pids(os.getpid()) >= {parent.pid, *live}
    finally:
        for proc in psutil.Process(parent.pid).children(recursive=True):
            proc.kill()
        parent.kill()
        parent.wait()


def test_the_titles_are_the_ones_vllm_and_ray_set():
    import vllm.envs
    from ray._private import ray_constants
    from vllm.v1.executor import multiproc_executor

    assert f"{vllm.envs.VLLM_PROCESS_NAME_PREFIX}::Worker" == VLLM_WORKER_TITLE
    assert 'set_process_title(name="Worker")' in inspect.getsource(multiproc_executor)
    assert ray_constants.WORKER_PROCESS_TYPE_IDLE_WORKER.startswith(RAY_WORKER_TITLE_PREFIX)


def test_local_ray_sets_serves_mode_for_rays_processes_and_restores_the_environment(project_root, monkeypatch):
    from e2e_llm.serve import HIGH_THROUGHPUT_ENV, LOCAL_HIGH_THROUGHPUT_ENV, MODE_FIXED_PORTS_ENV

    name = next(iter(HIGH_THROUGHPUT_ENV))
    monkeypatch.setenv(name, "before")  # the caller's own value comes back on exit
    for port_name in MODE_FIXED_PORTS_ENV:
        monkeypatch.delenv(port_name, raising=False)
    config = load_profile("local", root=project_root)
    config.serve.high_throughput, config.serve.isolate_engine_cpus = True, False
    with LocalRay(config) as local_ray:
        mode = {**HIGH_THROUGHPUT_ENV, **LOCAL_HIGH_THROUGHPUT_ENV}
        assert {k: os.environ[k] for k in mode} == mode
        assert all(os.environ[port_name].isdigit() for port_name in MODE_FIXED_PORTS_ENV)
        assert local_ray.pin() is None  # the mode alone pins nothing
    assert os.environ[name] == "before"
    assert not any(port_name in os.environ for port_name in MODE_FIXED_PORTS_ENV)
    config.serve.high_throughput = False
    monkeypatch.delenv(name)
    with LocalRay(config):
        assert name not in os.environ
