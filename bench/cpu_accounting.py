# SPDX-License-Identifier: Apache-2.0
"""Where the CPU goes while a server runs (``bench/serve_latency.py``): CPU seconds and niceness
of every process under the bench by role (the engine's worker and scheduler, each Ray process, the
load generator), the idle cost per server, and the hypervisor's steal time. Linux (``/proc``)."""

from __future__ import annotations

import os
import time
from pathlib import Path

# Process roles for the CPU-time breakdown, matched against the command line (first match wins).
ROLES = (
    ("gcs_server", "ray:gcs"), ("raylet", "ray:raylet"), ("dashboard/agent.py", "ray:dashboard_agent"),
    ("runtime_env/agent", "ray:runtime_env_agent"), ("dashboard.py", "ray:dashboard"),
    ("log_monitor", "ray:log_monitor"), ("monitor.py", "ray:monitor"), ("ServeController", "ray:serve_controller"),
    ("DashboardAgent", "ray:dashboard_agent"), ("RuntimeEnvAgent", "ray:runtime_env_agent"),
    ("TelemetryAgent", "ray:telemetry_agent"),
    ("ProxyActor", "ray:proxy"), ("Ingress", "ray:ingress_replica"), ("LLMServer", "ray:engine_replica"),
    ("ServeReplica", "ray:engine_replica"), ("vllm.entrypoints", "vllm:api_server"), ("ray::", "ray:other_worker"),
    ("default_worker", "ray:idle_worker"),
)


def _role(proc, parents: dict[int, str]) -> str:
    """A process's role; vLLM's engine processes (``VLLM::EngineCore``, ``VLLM::Worker``: the
    scheduler and the process running the model) are named after the server that started them."""
    try:
        cmd = " ".join(proc.cmdline()) or proc.name()
    except Exception:  # noqa: BLE001  gone or unreadable
        return "gone"
    parent = parents.get(proc.ppid(), "")
    server = "ray" if parent.startswith("ray") else "vllm" if parent.startswith("vllm") else ""
    from e2e_llm.cpu_pinning import VLLM_WORKER_TITLE

    for title, role in (("VLLM::EngineCore", "engine_core"), (VLLM_WORKER_TITLE, "engine_worker")):
        if title in cmd:
            return f"{server or 'other'}:{role}"
    return next((role for needle, role in ROLES if needle in cmd), "other:" + proc.name()[:24])


def runqueue_wait_seconds(pid: int, proc: Path = Path("/proc")) -> tuple[float, float]:
    """Seconds the threads of ``pid`` have spent ready to run while another task held their CPU (the
    second field of ``/proc/<pid>/task/<tid>/schedstat``; 0 where the kernel does not keep it): all
    its threads, and those named as the process. vLLM's worker runs the model in threads named
    as itself (main and OpenMP threads); its helpers (gloo, ZMQ) wake often and wait behind the model,
    which takes nothing from it. For the worker the second figure is the time other tasks took from
    the model on its own CPU."""
    try:
        own = (proc / str(pid) / "comm").read_text()
        tids = os.listdir(proc / str(pid) / "task")
    except OSError:
        return 0.0, 0.0
    every = named = 0
    for tid in tids:
        try:
            task = proc / str(pid) / "task" / tid
            wait = int((task / "schedstat").read_text().split()[1])
            every += wait
            if (task / "comm").read_text() == own:
                named += wait
        except (OSError, IndexError, ValueError):
            continue
    return every / 1e9, named / 1e9


def cpu_snapshot() -> dict[int, tuple[str, float, float, float]]:
    """CPU seconds and runqueue wait seconds (all threads, threads named as the process:
    :func:`runqueue_wait_seconds`) so far of this process and all its descendants (Ray's processes
    and the vLLM server are children of the bench), by pid, with each process's role."""
    import psutil

    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    procs.sort(key=lambda p: p.pid)
    roles: dict[int, str] = {me.pid: "bench:load_generator"}
    out: dict[int, tuple[str, float, float, float]] = {}
    for proc in sorted(procs, key=lambda p: (p.create_time() if p.is_running() else 0)):
        role = roles.get(proc.pid) or _role(proc, roles)
        roles[proc.pid] = role
        try:
            t = proc.cpu_times()
            out[proc.pid] = (role, t.user + t.system, *runqueue_wait_seconds(proc.pid))
        except Exception:  # noqa: BLE001  exited meanwhile
            continue
    return out


def niceness_by_role() -> dict[str, int]:
    """The niceness of each process role now (Ray starts its workers at 15 unless told otherwise)."""
    import psutil

    out: dict[str, int] = {}
    for pid, (role, *_) in cpu_snapshot().items():
        try:
            out.setdefault(role, psutil.Process(pid).nice())
        except Exception:  # noqa: BLE001  exited meanwhile
            continue
    return dict(sorted(out.items()))


def cpu_by_role(before: dict[int, tuple], after: dict[int, tuple], field: int = 1) -> dict[str, float]:
    """Seconds per role between two :func:`cpu_snapshot` s: CPU time (``field`` 1), runqueue wait of
    all threads (2) or of the threads named as the process (3)."""
    used: dict[str, float] = {}
    for pid, values in after.items():
        role = values[0]
        used[role] = used.get(role, 0.0) + values[field] - before.get(pid, (role, 0.0, 0.0, 0.0))[field]
    return {k: round(v, 2) for k, v in sorted(used.items(), key=lambda kv: -kv[1]) if v >= 0.05}


def idle_cores(seconds: float, settle_s: float = 10.0) -> dict[str, float]:
    """Cores each process role uses while the server is up and has no requests: what it costs the
    engine on a small box before any request-path work (measured ``settle_s`` after start-up)."""
    time.sleep(settle_s)
    before, start = cpu_snapshot(), time.monotonic()
    time.sleep(seconds)
    used = cpu_by_role(before, cpu_snapshot())
    wall = time.monotonic() - start
    return {role: round(cpu / wall, 4) for role, cpu in used.items()}


def merged_idle(samples: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per server: mean idle cores per role over its phases, and their total without the load
    generator (idle here) and other processes both servers share (the local S3 store)."""
    out = {}
    for server, phases in samples.items():
        roles = sorted({role for phase in phases for role in phase})
        mean = {role: round(sum(p.get(role, 0.0) for p in phases) / len(phases), 4) for role in roles}
        mean = dict(sorted(mean.items(), key=lambda kv: -kv[1]))
        out[server] = {**mean, "total": round(sum(v for k, v in mean.items()
                                                  if not k.startswith(("bench:", "other:"))), 4)}
    return out


def steal_seconds(stat: Path = Path("/proc/stat")) -> float:
    """CPU time the hypervisor gave to other guests so far (``steal`` in /proc/stat; 0 where the
    kernel does not count it): a round with more steal ran on a slower machine."""
    try:
        fields = stat.read_text().split("\n", 1)[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0
