# SPDX-License-Identifier: Apache-2.0
"""Keep Ray's own processes off the CPUs the engine computes on, where e2e-llm starts Ray itself
to serve on a CPU-only machine (``e2e-llm serve``, bench/serve_latency.py; ``serve.isolate_engine_cpus``).

vLLM on CPU binds the process that runs the model (``VLLM::Worker``) to all allowed CPUs but the
ones it reserves for everything else (its scheduler and frontend; one CPU on x86). Ray knows
nothing of that: its daemons (GCS, raylet, agents, log monitor), Serve's controller and proxy and
our ingress run on any CPU, preempt the worker on its own, and every preemption stalls a whole
model step. Moving them onto the CPUs vLLM reserved leaves the worker's CPUs to the engine
(bench/RESULTS.md, "serve_latency_vs_vllm").

- :func:`engine_cpus_env`: before ``ray.init``, the environment that tells every process of the
  Ray instance which CPUs the engine may use (all the starting process may use). The caller puts
  it in ``os.environ``; Ray's processes inherit it.
- :func:`pin_off_engine`: once the app is up, every process under ``root_pid`` (the process that
  started Ray; not itself) except the engine replicas and their children, and except the
  processes it already had before Ray started (``leave``), goes onto the allowed CPUs no engine
  worker is bound to. Processes Ray starts later inherit the raylet's CPUs.
- :func:`move_own_threads`: the threads ``ray.init`` started in the process that started Ray (its
  driver) go there too; the caller's own threads stay.
- These steps for a caller that starts Ray itself: :class:`e2e_llm.local_ray.LocalRay`.
- :func:`widen_to_engine_cpus`: the engine replica's first step. A replica that Serve restarts
  is started by the (now pinned) raylet; back on the engine's CPUs, its vLLM binds as on the first
  start.
- :func:`settle_off_engine_workers`: the engine replica's step once its engine is up (first start
  and restarts alike): the replica itself (vLLM's frontend, under Ray) and vLLM's scheduler
  (``VLLM::EngineCore``) onto the CPUs its workers are not bound to, where vLLM meant them to run.
  Plain vLLM's API server stays there by itself; the replica's threads, woken by Ray as well, also
  ran on the worker's CPU and preempted it (bench/RESULTS.md, session 13).

Processes are told apart by the titles vLLM and Ray give them (checked against the pinned
versions by tests/unit/test_cpu_pinning.py).
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

ENGINE_CPUS_ENV = "E2E_LLM_ENGINE_CPUS"
# vLLM names the process that runs the model VLLM::Worker (envs.VLLM_PROCESS_NAME_PREFIX + "::" +
# the multiproc executor's "Worker"); Ray names every worker process "ray::<actor class>..."
VLLM_WORKER_TITLE = "VLLM::Worker"
RAY_WORKER_TITLE_PREFIX = "ray::"


def engine_cpus_env(config: Any) -> dict[str, str]:
    """``{ENGINE_CPUS_ENV: "0,1,..."}`` (the CPUs this process may use) when ``config`` serves on
    CPU with ``serve.isolate_engine_cpus``; else ``{}`` (nothing is pinned)."""
    from e2e_llm.precision import serve_device

    if not config.serve.isolate_engine_cpus or serve_device(config) != "cpu":
        return {}
    return {ENGINE_CPUS_ENV: ",".join(str(cpu) for cpu in sorted(os.sched_getaffinity(0)))}


def parse_cpus(value: str) -> set[int]:
    """``"0,1,3"`` -> {0, 1, 3}; a clear error naming the variable otherwise."""
    try:
        cpus = {int(part) for part in value.split(",") if part.strip()}
    except ValueError:
        raise ValueError(f"{ENGINE_CPUS_ENV}={value!r}: want CPU numbers separated by commas") from None
    if not cpus:
        raise ValueError(f"{ENGINE_CPUS_ENV}={value!r}: names no CPU")
    return cpus


def _engine_cpus() -> set[int] | None:
    """The CPUs ``ENGINE_CPUS_ENV`` names, or None when it is not set (nothing is pinned)."""
    value = os.environ.get(ENGINE_CPUS_ENV)
    return parse_cpus(value) if value else None


def _off_workers(allowed: set[int], worker_cpus: set[int]) -> set[int] | None:
    """Where everything but the model workers goes: the allowed CPUs no worker is bound to. None
    when no worker is bound or the workers hold every allowed CPU (vLLM reserved none)."""
    rest = allowed - worker_cpus
    return rest if worker_cpus and rest else None


def _threads(pid: int) -> set[int]:
    """The ids of ``pid``'s threads now (FileNotFoundError if the process is gone)."""
    return {int(tid) for tid in os.listdir(f"/proc/{pid}/task")}


def _set_process_cpus(pid: int, cpus: set[int], keep: Collection[int] = ()) -> list[int] | None:
    """Every thread of ``pid`` but those in ``keep`` onto ``cpus`` (a thread's own affinity is what
    the kernel uses; new threads inherit their creator's). The threads moved, or None if the
    process is gone."""
    try:
        threads = _threads(pid)
    except FileNotFoundError:
        return None
    moved = []
    for tid in threads:
        if tid in keep:
            continue
        try:
            os.sched_setaffinity(tid, cpus)
        except (ProcessLookupError, FileNotFoundError):
            continue  # the thread ended meanwhile
        moved.append(tid)
    return moved


def own_threads() -> set[int]:
    """The ids of this process's threads now."""
    return _threads(os.getpid())


def move_own_threads(cpus: set[int], leave: Collection[int] = ()) -> list[int]:
    """This process's threads but the calling one and those in ``leave`` onto ``cpus``; returns
    the threads moved. For the process that started Ray: ``ray.init`` started threads in it (its
    core worker's event loops, log and error listeners) that Ray wakes as it does its other
    processes; the calling thread goes on with the caller's own work (``--then``, the bench's
    requests, tests) on the CPUs it had, as do the threads and processes it starts later."""
    import threading

    return _set_process_cpus(os.getpid(), cpus, keep={threading.get_native_id(), *leave}) or []


def widen_to_engine_cpus() -> set[int] | None:
    """In an engine replica: this process (all its threads) onto the CPUs ``ENGINE_CPUS_ENV`` names,
    before vLLM starts. Returns them, or None when the variable is not set (nothing changes)."""
    cpus = _engine_cpus()
    if cpus is not None:
        _set_process_cpus(os.getpid(), cpus)
    return cpus


def settle_off_engine_workers(replica_pid: int | None = None) -> set[int] | None:
    """In an engine replica whose engine is up: the replica (all its threads) and every process under
    it but its own vLLM model workers and their children onto the CPUs of ``ENGINE_CPUS_ENV`` that
    those workers are not bound to. Returns those CPUs, or None, and nothing moved, when the
    variable is not set, no worker of its own is bound, or the workers hold every allowed CPU (vLLM
    reserved none)."""
    allowed = _engine_cpus()
    if allowed is None:
        return None
    replica = replica_pid or os.getpid()
    below = _descendants(replica)
    # Only this replica's own workers: called elsewhere (a test constructing the server in the
    # process that started Ray and serves an app), the workers below are another replica's.
    workers, worker_cpus = _bound_workers(below, replica=replica)
    rest = _off_workers(allowed, worker_cpus)
    if rest is None:
        return None
    staying = _with_children(workers)
    for pid in [replica, *(proc.pid for proc in below if proc.pid not in staying)]:
        _set_process_cpus(pid, rest)
    return rest


@dataclass(frozen=True)
class Pinning:
    engine_cpus: set[int]  # CPUs the engine workers are bound to
    ray_cpus: set[int]  # where the other processes now run
    pinned: list[int]  # their pids
    engine: list[int]  # pids of the engine replicas and their children: each settles its own
    driver_threads: list[int] = field(default_factory=list)  # Ray's threads in the caller (LocalRay.pin)


def _title(proc) -> str:
    try:
        return " ".join(proc.cmdline()) or proc.name()
    except Exception:  # noqa: BLE001  gone or unreadable
        return ""


def _replica_of(worker):
    """A worker's engine replica: its nearest ancestor with a Ray worker title (None if gone or
    not under Ray)."""
    import psutil

    try:
        return next((p for p in worker.parents() if _title(p).startswith(RAY_WORKER_TITLE_PREFIX)), None)
    except psutil.Error:
        return None


def _bound_workers(procs: list, replica: int | None = None) -> tuple[list, set[int]]:
    """(vLLM's model workers among ``procs``, the CPUs they are bound to); with ``replica``, only
    the workers whose replica (:func:`_replica_of`) that pid is."""
    workers, cpus = [], set()
    for proc in procs:
        if not _title(proc).startswith(VLLM_WORKER_TITLE):  # also "VLLM::Worker_TP0" etc.
            continue
        if replica is not None and getattr(_replica_of(proc), "pid", None) != replica:
            continue
        try:
            cpus |= set(os.sched_getaffinity(proc.pid))  # the main thread: vLLM's OMP binding
        except OSError:
            continue  # gone
        workers.append(proc)
    return workers, cpus


def _with_children(procs: list) -> set[int]:
    import psutil

    pids = set()
    for proc in procs:
        try:
            pids |= {proc.pid, *(child.pid for child in proc.children(recursive=True))}
        except psutil.Error:
            continue
    return pids


def _engine_families(procs: list) -> tuple[set[int], set[int]]:
    """(pids of every engine replica (:func:`_replica_of`) with its children, CPUs their workers
    are bound to)."""
    workers, worker_cpus = _bound_workers(procs)
    replicas = [replica for worker in workers if (replica := _replica_of(worker)) is not None]
    return _with_children(replicas), worker_cpus


def _descendants(root_pid: int) -> list:
    import psutil

    try:
        return psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def descendant_pids(root_pid: int) -> set[int]:
    """The pids of every live process under ``root_pid`` now (zombies, exited and not yet reaped,
    are not counted)."""
    import psutil

    live = set()
    for proc in _descendants(root_pid):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                live.add(proc.pid)
        except psutil.NoSuchProcess:
            continue
    return live


def pin_off_engine(root_pid: int, leave: Collection[int] = ()) -> Pinning | None:
    """Move every process under ``root_pid`` that is not an engine replica or one of its children
    onto the allowed CPUs (``ENGINE_CPUS_ENV``) that no engine worker is bound to. ``root_pid``
    itself stays where it is: it is the caller (``e2e-llm serve``, whose ``--then`` command it
    starts; the bench's Serve process; pytest; :meth:`e2e_llm.local_ray.LocalRay.pin` moves the
    threads Ray started in it). So do the processes in ``leave`` and their
    children: the caller's own, started before Ray (a local S3 store). None, and nothing moved,
    when the variable is not set, no engine worker runs, or the workers hold every allowed CPU
    (vLLM reserved none: one CPU)."""
    allowed = _engine_cpus()
    if allowed is None:
        return None
    procs = _descendants(root_pid)
    family, worker_cpus = _engine_families(procs)
    ray_cpus = _off_workers(allowed, worker_cpus)
    if ray_cpus is None:
        return None
    kept = set(leave) | {child.pid for pid in leave for child in _descendants(pid)}
    others = [p.pid for p in procs if p.pid not in family and p.pid not in kept]
    pinned = [pid for pid in others if _set_process_cpus(pid, ray_cpus) is not None]
    return Pinning(engine_cpus=worker_cpus, ray_cpus=ray_cpus, pinned=pinned, engine=sorted(family))
