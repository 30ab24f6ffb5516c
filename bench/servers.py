# SPDX-License-Identifier: Apache-2.0
"""The servers bench/serve_latency.py measures, each a context manager that yields its URL: our
Serve app on a private Ray instance started as ``e2e-llm serve`` starts it (in this process, or in
a child process whose whole tree can be stopped while another server takes its turn), and the plain
vLLM OpenAI server with the same engine flags."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager, suppress
from pathlib import Path

from cpu_accounting import niceness_by_role  # bench/cpu_accounting.py and bench/turns.py, beside this script
from turns import process_tree, resume

from e2e_llm.ports import free_tcp_port

# The servers' names in the rounds, rows and ratios of bench/serve_latency.py.
VLLM, SERVE = "vllm", "ray_serve_llm"

def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:  # noqa: BLE001  not up yet
            time.sleep(1)
    raise TimeoutError(url)


@contextmanager
def serve_server(config, adapter_id: str | None, args, startup: dict, name: str = SERVE):
    """Our app on a private Ray instance started as `e2e-llm serve` starts it; yields its URL. Its
    start time, CPUs and processes' niceness go into ``startup`` under ``name``."""
    import ray
    from ray import serve

    from e2e_llm.local_ray import LocalRay
    from e2e_llm.serve import app_args, build_app, ray_init_kwargs, serve_start_kwargs

    port = free_tcp_port()
    t0 = time.monotonic()
    init = ray_init_kwargs(config, temp_dir=tempfile.mkdtemp(prefix="r-bench-", dir="/tmp"))
    init["_metrics_export_port"] = None  # a fixed port could clash with a running `e2e-llm serve`
    saved_env = dict(os.environ)  # ray.init and the pinning set variables; a later phase starts clean
    with LocalRay(config) as local_ray:
        ray.init(**init)
        try:
            serve.start(**serve_start_kwargs(config, "127.0.0.1", port))
            app = app_args(config)
            for llm in app["llm_configs"]:
                if args.batching_ms is not None:  # a fixed interval: the profile's pacing off
                    llm["experimental_configs"] = {"stream_batching_interval_ms": args.batching_ms}
                if args.no_engine_metrics:
                    llm["log_engine_metrics"] = False
            serve.run(build_app(app), name="llm", route_prefix="/")
            # As `e2e-llm serve` does; the load generator (this process) is not moved, as with vLLM.
            pinning = local_ray.pin()
            startup[f"{name}_cpus"] = pinning and {"engine": sorted(pinning.engine_cpus),
                                                    "ray": sorted(pinning.ray_cpus)}
            print(f"{name} cpus:", startup[f"{name}_cpus"], flush=True)
            startup.setdefault(name, []).append(round(time.monotonic() - t0, 1))
            startup[f"{name}_niceness"] = niceness_by_role()
            print(f"{name} niceness:", startup[f"{name}_niceness"], flush=True)
            models = {"base": config.model.id, "lora": f"{config.model.id}:{adapter_id}"}
            yield f"http://127.0.0.1:{port}", models, {k: v for k, v in init.items() if k != "_temp_dir"}
        finally:
            serve.shutdown()
            ray.shutdown()
            os.environ.clear()
            os.environ.update(saved_env)


def _serve_child(conn, config, adapter_id: str | None, args, name: str) -> None:
    """The body of :func:`serve_in_child`'s process: the app up, its URL sent, then held until told."""
    startup: dict = {}
    with serve_server(config, adapter_id, args, startup, name) as (url, models, ray_init):
        conn.send((url, models, ray_init, startup))
        conn.recv()


@contextmanager
def serve_in_child(config, adapter_id: str | None, args, startup: dict, name: str = SERVE):
    """:func:`serve_server` in a child process (its Ray driver), so the whole Ray instance,
    driver included, can be stopped (:func:`taking_turns`); yields the URL, models, Ray options and the child's pid."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_serve_child, args=(there, config, adapter_id, args, name), name=f"bench-{name}")
    proc.start()
    try:
        deadline = time.monotonic() + 600
        while not here.poll(1):  # the app is up when the child sends its URL
            if not proc.is_alive():
                raise RuntimeError(f"the Serve child process exited with {proc.exitcode} before the app was up")
            if time.monotonic() > deadline:
                raise TimeoutError("the Serve app did not come up within 600 s")
        url, models, ray_init, child_startup = here.recv()
        for key, value in child_startup.items():
            if isinstance(value, list):
                startup.setdefault(key, []).extend(value)
            else:
                startup[key] = value
        yield url, models, ray_init, proc.pid
    finally:
        resume(process_tree(proc.pid))  # never leave it stopped
        with suppress(OSError, EOFError):
            here.send("stop")
        proc.join(120)
        if proc.is_alive():
            proc.terminate()
            proc.join(30)


def vllm_flags(engine_kwargs: dict) -> list[str]:
    flags = []
    for key, value in engine_kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is not False and value is not None:
            flags += [flag, str(value)]
    return flags


@contextmanager
def vllm_server(config, model_path: str, adapter_dir: Path | None, engine_kwargs: dict, startup: dict):
    """``python -m vllm.entrypoints.openai.api_server`` with the same engine flags; yields its URL."""
    port = free_tcp_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
           "--model", model_path, "--served-model-name", config.model.id, *vllm_flags(engine_kwargs)]
    if adapter_dir is not None:
        cmd += ["--lora-modules", f"bench={adapter_dir}"]
    t0 = time.monotonic()
    log = open(Path(tempfile.gettempdir()) / f"bench-vllm-{port}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            wait_http(f"http://127.0.0.1:{port}/v1/models", 300, proc)
        except RuntimeError as exc:
            raise RuntimeError(f"plain vLLM: {exc}; its log: {log.name}") from None
        startup.setdefault("vllm", []).append(round(time.monotonic() - t0, 1))
        yield f"http://127.0.0.1:{port}", {"base": config.model.id, "lora": "bench"}, cmd, proc.pid
    finally:
        with suppress(ProcessLookupError):  # it may have exited already (a failed start)
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
