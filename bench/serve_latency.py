# SPDX-License-Identifier: Apache-2.0
"""Ray Serve LLM (our app: e2e-llm ingress + LLMServer) vs the plain vLLM OpenAI server, same
model, same engine flags, same machine, one window.

One server runs at a time, in three phases: vLLM, Serve (with the Ray options of ``e2e-llm
serve``), vLLM again; each server gets ``--rounds`` rounds per model (base; base + one LoRA
adapter) and concurrency, vLLM's split around Serve's so drift in the machine's load (other
processes) falls on both alike. A round is a fixed number of streamed chat requests over
VIGGO val prompts, greedy, exactly ``--max-tokens`` generated tokens each (``ignore_eos``),
after a short warm-up. Measured per server: p50/p95 latency, p50/p95 time to first token,
requests/s and generated tokens/s over its rounds, and the CPU seconds every process used
during them (the engine's worker and scheduler, each Ray process, the load generator), so
the record says where the time went. Appends one record to bench/results.jsonl (bench
``serve_latency_vs_vllm``; ``machine`` names the CPU capability the engine's kernels run at,
the dtype and the load average before/after; ``ratios`` holds Serve / vLLM per model and
concurrency) and prints a table. Loopback only; every loop is bounded.

``--interleave``: both servers up at once (Serve's Ray driver in a child process), taking turns
round by round in ABBA order; the server not being measured is stopped (SIGSTOP, its whole
process tree) so it costs nothing. On a host whose speed drifts by minutes this compares the
servers under the same conditions far more closely than phases do.

Usage:
    flock /tmp/e2e-heavy.lock .venv/serve/bin/python bench/serve_latency.py --models base
    flock /tmp/e2e-heavy.lock .venv/serve/bin/python bench/serve_latency.py --models base --interleave --rounds 8
    # as on an AVX2-only CPU (`make e2e-avx2`; the engine then runs float32):
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        flock /tmp/e2e-heavy.lock .venv/serve/bin/python bench/serve_latency.py --models base
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager, suppress
from pathlib import Path

from cpu_accounting import (  # bench/cpu_accounting.py and bench/turns.py, beside this script
    cpu_by_role,
    cpu_snapshot,
    idle_cores,
    merged_idle,
    niceness_by_role,
    steal_seconds,
)
from turns import process_tree, resume, taking_turns

ROOT = Path(__file__).resolve().parents[1]
BENCH = "serve_latency_vs_vllm"
for _k, _v in (("OMP_WAIT_POLICY", "PASSIVE"), ("HF_HUB_OFFLINE", "1"), ("VLLM_CPU_KVCACHE_SPACE", "2")):
    os.environ.setdefault(_k, _v)
# What `make e2e-avx2` sets to make this CPU behave as an AVX2-only one; recorded with the machine.
CPU_CAP_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


# ---------------------------------------------------------------------------------------- load


async def one_request(client, url: str, body: dict) -> dict:
    start = time.perf_counter()
    ttft, usage = None, None
    async with client.stream("POST", url, json=body, timeout=600) as response:
        if response.status_code != 200:
            return {"ok": False, "status": response.status_code, "latency": time.perf_counter() - start}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("choices") and data["choices"][0].get("delta", {}).get("content"):
                ttft = ttft or time.perf_counter() - start
            usage = data.get("usage") or usage
    return {"ok": True, "latency": time.perf_counter() - start, "ttft": ttft,
            "tokens": (usage or {}).get("completion_tokens", 0)}


async def load(base_url: str, model: str, prompts: list[list[dict]], concurrency: int, n: int,
               max_tokens: int, warmup: int) -> tuple[list[dict], float]:
    """``n`` requests at ``concurrency`` after ``warmup`` sequential ones: (results, wall s)."""
    import httpx

    url = f"{base_url}/v1/chat/completions"

    def body(i: int) -> dict:
        return {"model": model, "messages": prompts[i % len(prompts)], "max_tokens": max_tokens,
                "temperature": 0.0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}

    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(limits=limits) as client:
        for i in range(warmup):
            await one_request(client, url, body(i))
        sem = asyncio.Semaphore(concurrency)

        async def bounded(i: int) -> dict:
            async with sem:
                return await one_request(client, url, body(i))

        start = time.perf_counter()
        results = await asyncio.gather(*(bounded(i) for i in range(n)))
        return list(results), time.perf_counter() - start


def summarize(results: list[dict], wall: float, concurrency: int) -> dict:
    ok = [r for r in results if r["ok"]]
    lat = [r["latency"] for r in ok]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    return {
        "requests": len(results), "errors": len(results) - len(ok), "concurrency": concurrency,
        "p50_s": round(percentile(lat, 0.5), 4), "p95_s": round(percentile(lat, 0.95), 4),
        "ttft_p50_s": round(percentile(ttft, 0.5), 4), "ttft_p95_s": round(percentile(ttft, 0.95), 4),
        "req_per_s": round(len(ok) / wall, 3), "gen_tok_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
    }


def phase_plan(rounds: int, only: str | None = None, cycles: int = 1) -> list[tuple[str, int]]:
    """(server, rounds) in start order: vLLM, Serve, vLLM -- each server gets ``rounds`` rounds
    per model and concurrency, vLLM's split around Serve's so drift in the machine's load
    falls on both alike. ``cycles`` > 1 repeats that (two vLLM phases that meet become one):
    on a shared host a server's speed drifts by up to 30% within minutes, and more alternations
    spread the drift over both servers. One server runs at a time: an idle Ray instance next to
    vLLM costs vLLM ~0.2 of a core on 2 cores (its controller, GCS, raylet, idle engine), which
    would flatter Serve."""
    if only:
        return [("ray_serve_llm" if only == "serve" else "vllm", rounds * cycles)]
    first = rounds // 2
    plan: list[tuple[str, int]] = []
    for _ in range(cycles):
        for server, n in (("vllm", first), ("ray_serve_llm", rounds), ("vllm", rounds - first)):
            if n <= 0:
                continue
            if plan and plan[-1][0] == server:
                plan[-1] = (server, plan[-1][1] + n)
            else:
                plan.append((server, n))
    return plan


def interleaved_plan(rounds: int) -> list[str]:
    """``--interleave``: the servers' order for the rounds of one model and concurrency, in pairs
    alternating vLLM, Serve / Serve, vLLM (ABBA): a drift of the machine's speed within the run
    (on a shared host, up to 30% within minutes) falls on both servers alike, round by round."""
    order: list[str] = []
    for k in range(rounds):
        pair = ["vllm", "ray_serve_llm"]
        order += pair if k % 2 == 0 else pair[::-1]
    return order


def run_round(server: str, base_url: str, kind: str, model: str, concurrency: int, prompts, args,
              merged: dict) -> None:
    """One round of one server at one concurrency, added to ``merged``."""
    n = args.requests_1 if concurrency == 1 else max(args.requests_n, concurrency)
    before, steal = cpu_snapshot(), steal_seconds()
    results, wall = asyncio.run(load(base_url, model, prompts, concurrency, n, args.max_tokens, args.warmup))
    used = cpu_by_role(before, cpu_snapshot())
    stolen = round(steal_seconds() - steal, 2)
    m = merged.setdefault((server, kind, concurrency), {"results": [], "wall": 0.0, "cpu": {}, "rounds": []})
    m["results"] += results
    m["wall"] += wall
    for role, seconds in used.items():
        m["cpu"][role] = round(m["cpu"].get(role, 0.0) + seconds, 2)
    stats = summarize(results, wall, concurrency)
    m["rounds"].append({**{k: stats[k] for k in ("p50_s", "req_per_s", "errors")}, "steal_s": stolen})
    print(json.dumps({"server": server, "model": kind, **stats, "cpu_s": used, "steal_s": stolen,
                      "loadavg": [round(x, 2) for x in os.getloadavg()]}), flush=True)


def run_rounds(server: str, base_url: str, models: dict[str, str], rounds: int, prompts, args,
               merged: dict) -> None:
    """``rounds`` rounds per (model, concurrency) against one server, added to ``merged``."""
    for kind in args.models:
        for concurrency in args.concurrency:
            for _ in range(rounds):
                run_round(server, base_url, kind, models[kind], concurrency, prompts, args, merged)


def merged_rows(merged: dict) -> list[dict]:
    rows = []
    for (server, kind, concurrency), m in sorted(merged.items()):
        rows.append({"server": server, "model": kind, **summarize(m["results"], m["wall"], concurrency),
                     "rounds": m["rounds"], "wall_s": round(m["wall"], 1),
                     "cpu_s": dict(sorted(m["cpu"].items(), key=lambda kv: -kv[1]))})
    return rows


# ------------------------------------------------------------------------------------- servers


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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_server(config, adapter_id: str | None, args, startup: dict):
    """Our app on a private Ray instance started as `e2e-llm serve` starts it; yields its URL."""
    import ray
    from ray import serve

    from e2e_llm.local_ray import LocalRay
    from e2e_llm.serve import app_args, build_app, ray_init_kwargs, serve_start_kwargs

    port = free_port()
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
            startup["ray_serve_llm_cpus"] = pinning and {"engine": sorted(pinning.engine_cpus),
                                                          "ray": sorted(pinning.ray_cpus)}
            print("cpus:", startup["ray_serve_llm_cpus"], flush=True)
            startup.setdefault("ray_serve_llm", []).append(round(time.monotonic() - t0, 1))
            startup["ray_serve_llm_niceness"] = niceness_by_role()
            print("niceness:", startup["ray_serve_llm_niceness"], flush=True)
            models = {"base": config.model.id, "lora": f"{config.model.id}:{adapter_id}"}
            yield f"http://127.0.0.1:{port}", models, {k: v for k, v in init.items() if k != "_temp_dir"}
        finally:
            serve.shutdown()
            ray.shutdown()
            os.environ.clear()
            os.environ.update(saved_env)


def _serve_child(conn, config, adapter_id: str | None, args) -> None:
    """The body of :func:`serve_in_child`'s process: the app up, its URL sent, then held until told."""
    startup: dict = {}
    with serve_server(config, adapter_id, args, startup) as (url, models, ray_init):
        conn.send((url, models, ray_init, startup))
        conn.recv()


@contextmanager
def serve_in_child(config, adapter_id: str | None, args, startup: dict):
    """:func:`serve_server` in a child process (its Ray driver), so the whole Ray instance,
    driver included, can be stopped (:func:`taking_turns`); yields the URL, models, Ray options and the child's pid."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_serve_child, args=(there, config, adapter_id, args), name="bench-serve")
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
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
           "--model", model_path, "--served-model-name", config.model.id, *vllm_flags(engine_kwargs)]
    if adapter_dir is not None:
        cmd += ["--lora-modules", f"bench={adapter_dir}"]
    t0 = time.monotonic()
    log = open(Path(tempfile.gettempdir()) / f"bench-vllm-{port}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", 300, proc)
        startup.setdefault("vllm", []).append(round(time.monotonic() - t0, 1))
        yield f"http://127.0.0.1:{port}", {"base": config.model.id, "lora": "bench"}, cmd, proc.pid
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def machine_info() -> dict:
    """The CPU the engines ran on, as they saw it: capability and dtype (e2e_llm.precision),
    the ISA caps in the environment (the AVX2 reproduction), and the load average."""
    from e2e_llm.precision import choose_dtype, cpu_signals

    signals = cpu_signals()
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "cpu_model": model,
            "cpu_capability": signals.capability, "cpu_bf16_features": list(signals.features),
            "isa_env": {k: os.environ[k] for k in CPU_CAP_ENV if k in os.environ},
            "dtype": choose_dtype("auto", "cpu", signals=signals).line(),
            "loadavg_before": [round(x, 2) for x in os.getloadavg()]}


def run_interleaved(config, llm: dict, adapter_dir, adapter_id, prompts, args, startup: dict, merged: dict,
                    idle: dict) -> tuple[list[str], dict]:
    """``--interleave``: vLLM and Serve up together; each server's idle cost and then its rounds
    in :func:`interleaved_plan` order, the other server stopped meanwhile (:func:`taking_turns`). Returns the
    vLLM command and the Ray options."""
    with vllm_server(config, llm["model_loading_config"]["model_source"], adapter_dir, llm["engine_kwargs"],
                     startup) as (vllm_url, vllm_models, vllm_cmd, vllm_pid), \
            serve_in_child(config, adapter_id, args, startup) as (serve_url, serve_models, ray_init, serve_pid):
        servers = {"vllm": (vllm_url, vllm_models), "ray_serve_llm": (serve_url, serve_models)}
        with taking_turns({"vllm": vllm_pid, "ray_serve_llm": serve_pid}) as turn:
            if args.idle_s:
                for server in servers:
                    turn(server)
                    idle.setdefault(server, []).append(idle_cores(args.idle_s))
            for kind in args.models:
                for concurrency in args.concurrency:
                    for server in interleaved_plan(args.rounds):
                        url, models = servers[server]
                        turn(server)
                        wait_http(f"{url}/v1/models", 120)
                        run_round(server, url, kind, models[kind], concurrency, prompts, args, merged)
    return vllm_cmd, ray_init


def pick(rows, server, model, concurrency):
    return next(r for r in rows if r["server"] == server and r["model"] == model and r["concurrency"] == concurrency)


def ratios(results: list[dict], models: list[str], concurrency: list[int]) -> dict[str, dict[str, float]]:
    out = {}
    for model in models:
        for c in concurrency:
            s, v = pick(results, "ray_serve_llm", model, c), pick(results, "vllm", model, c)
            out[f"{model}/{c}"] = {"p50": round(s["p50_s"] / v["p50_s"], 3),
                                   "throughput": round(s["req_per_s"] / v["req_per_s"], 3),
                                   "ttft_p50": round(s["ttft_p50_s"] / v["ttft_p50_s"], 3)}
    return out


# Two-sided 95% critical values of Student's t by degrees of freedom (1.96 beyond the table).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
       20: 2.086, 25: 2.060, 30: 2.042}


def paired_throughput(results: list[dict], models: list[str], concurrency: list[int]) -> dict[str, dict]:
    """``--interleave``: Serve / vLLM throughput per pair of neighbouring rounds (the k-th of each
    server are adjacent in :func:`interleaved_plan`), their mean and its 95% confidence interval:
    how sure the ratio is on a host whose speed drifts."""
    out = {}
    for model in models:
        for c in concurrency:
            s, v = pick(results, "ray_serve_llm", model, c), pick(results, "vllm", model, c)
            pairs = [a["req_per_s"] / b["req_per_s"] for a, b in zip(s["rounds"], v["rounds"]) if b["req_per_s"]]
            if len(pairs) < 2:
                continue
            mean = sum(pairs) / len(pairs)
            sd = (sum((x - mean) ** 2 for x in pairs) / (len(pairs) - 1)) ** 0.5
            df = len(pairs) - 1
            t = T95[max(k for k in T95 if k <= df)] if df <= max(T95) else 1.96  # between rows: the smaller df
            half = t * sd / len(pairs) ** 0.5
            out[f"{model}/{c}"] = {"mean": round(mean, 3), "ci95": [round(mean - half, 3), round(mean + half, 3)],
                                   "pairs": len(pairs)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="local")
    parser.add_argument("--adapter", default="latest", help="adapter folder, training run id or 'latest' (LoRA rows)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--requests-1", type=int, default=8, help="requests per round at concurrency 1")
    parser.add_argument("--requests-n", type=int, default=32,
                        help="requests per round at higher concurrency (at least the concurrency)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per server, model and concurrency")
    parser.add_argument("--cycles", type=int, default=1,
                        help="repeat vLLM, Serve, vLLM this many times (rounds per server: rounds x cycles)")
    parser.add_argument("--interleave", action="store_true",
                        help="both servers up at once, taking turns round by round (ABBA), the other one "
                             "stopped (SIGSTOP) meanwhile; --cycles does not apply")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", choices=["serve", "vllm"], help="run one server (tuning runs)")
    parser.add_argument("--models", nargs="+", default=["base", "lora"], choices=["base", "lora"])
    parser.add_argument("--batching-ms", type=float,
                        help="a fixed Serve LLM stream batching interval, without the profile's pacing "
                             "(default: the profile's serve.stream_batching_* settings)")
    parser.add_argument("--no-engine-metrics", action="store_true", help="Serve: log_engine_metrics off")
    parser.add_argument("--idle-s", type=float, default=30.0,
                        help="per server phase: seconds of CPU measured with no requests (0: skip)")
    parser.add_argument("--note", default="", help="free text stored with the record (what changed)")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results.jsonl"))
    args = parser.parse_args(argv)
    if args.interleave and args.only:
        parser.error("--interleave compares both servers; it cannot be combined with --only")

    from e2e_llm.config import load_profile
    from e2e_llm.local_s3 import start
    from e2e_llm.serve import app_args
    from e2e_llm.store import AdapterStore, find_training_adapter

    config = load_profile(args.profile, root=ROOT)
    config.serve.auth.enabled = False
    machine = machine_info()
    endpoint = f"http://127.0.0.1:{free_port()}"
    os.environ["AWS_ENDPOINT_URL"] = os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
    moto = start(endpoint, data_dir=Path(tempfile.mkdtemp(prefix="bench-s3-")))
    startup: dict[str, list[float]] = {}
    vllm_cmd, ray_init = None, None
    try:
        adapter_dir, adapter_id = None, None
        if "lora" in args.models:
            adapter_dir, _ = find_training_adapter(config, args.adapter)
            adapter_id = AdapterStore.from_config(config).publish(adapter_dir, name="bench")
        val = config.path(config.storage_uri("data", config.data.dataset, "val.jsonl"))
        rows = [json.loads(line) for line in Path(val).read_text().splitlines()[:64]]
        prompts = [[{"role": "system", "content": r["instruction"]}, {"role": "user", "content": r["input"]}]
                   for r in rows]
        llm = app_args(config)["llm_configs"][0]
        merged: dict = {}
        idle: dict[str, list[dict[str, float]]] = {}

        def phase(server: str, url: str, models: dict[str, str], rounds: int) -> None:
            """One server's phase: its idle cost, then its rounds."""
            if args.idle_s:
                idle.setdefault(server, []).append(idle_cores(args.idle_s))
            run_rounds(server, url, models, rounds, prompts, args, merged)

        if args.interleave:
            vllm_cmd, ray_init = run_interleaved(config, llm, adapter_dir, adapter_id, prompts, args, startup,
                                                 merged, idle)
        else:
            for server, rounds in phase_plan(args.rounds, args.only, args.cycles):
                if server == "ray_serve_llm":
                    with serve_server(config, adapter_id, args, startup) as (url, models, ray_init):
                        phase(server, url, models, rounds)
                else:
                    with vllm_server(config, llm["model_loading_config"]["model_source"], adapter_dir,
                                     llm["engine_kwargs"], startup) as (url, models, vllm_cmd, _):
                        phase(server, url, models, rounds)
        results = merged_rows(merged)
    finally:
        if moto:
            moto.terminate()
    machine["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]

    record = {
        "bench": BENCH,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_sha": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                  text=True, check=False).stdout.strip(),
        "machine": machine,
        "settings": {"profile": args.profile, "model": config.model.id, "engine_kwargs": llm["engine_kwargs"],
                     "max_tokens": args.max_tokens, "ignore_eos": True, "stream": True,
                     "requests_1": args.requests_1, "requests_n": args.requests_n, "warmup": args.warmup,
                     "rounds": args.rounds, "cycles": args.cycles,
                     "interleave": args.interleave,
                     "phases": (interleaved_plan(args.rounds) if args.interleave
                                else phase_plan(args.rounds, args.only, args.cycles)),
                     "vllm_cmd": " ".join(vllm_cmd[2:]) if vllm_cmd else None, "note": args.note,
                     "serve_stream_batching_interval_ms": args.batching_ms or config.serve.stream_batching_interval_ms,
                     "serve_stream_pacing": None if args.batching_ms else {
                         "messages_per_s": config.serve.stream_batching_messages_per_s,
                         "max_interval_ms": config.serve.stream_batching_max_interval_ms},
                     "serve_control_loop_interval_s": config.serve.control_loop_interval_s,
                     "serve_high_throughput": config.serve.high_throughput,
                     "ray_serve_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("RAY_SERVE_")},
                     "serve_log_engine_metrics": not args.no_engine_metrics, "ray_init": ray_init,
                     "only": args.only},
        "startup_s": {k: v for k, v in startup.items() if k not in ("ray_serve_llm_niceness", "ray_serve_llm_cpus")},
        "serve_process_niceness": startup.get("ray_serve_llm_niceness"),
        "serve_cpus": startup.get("ray_serve_llm_cpus"),
        "idle_cpu_cores": merged_idle(idle),
        "results": results,
    }
    if args.only is None:
        record["ratios"] = ratios(results, args.models, args.concurrency)
        if args.interleave:
            record["paired_throughput_ratio"] = paired_throughput(results, args.models, args.concurrency)
        hi = max(args.concurrency)
        base = record["ratios"].get(f"base/{hi}")
        if base:
            record.update(ratio=base["p50"], throughput_ratio=base["throughput"],
                          metric=f"p50_latency_s/{hi}_concurrent/base",
                          value=pick(results, "ray_serve_llm", "base", hi)["p50_s"],
                          baseline=pick(results, "vllm", "base", hi)["p50_s"],
                          ratio_definition=f"Serve p50 / vLLM p50 latency at {hi} concurrent, base model")
    with open(args.results, "a") as f:
        f.write(json.dumps(record) + "\n")

    print(f"\n{machine['cpu_capability']} {machine['dtype']}; load {machine['loadavg_before']} -> "
          f"{machine['loadavg_after']}")
    print(f"{'server':<14} {'model':<5} {'conc':>4} {'p50 s':>7} {'p95 s':>7} {'ttft50':>7} {'ttft95':>7} "
          f"{'req/s':>6} {'tok/s':>6} {'err':>3}")
    for r in results:
        print(f"{r['server']:<14} {r['model']:<5} {r['concurrency']:>4} {r['p50_s']:>7.3f} {r['p95_s']:>7.3f} "
              f"{r['ttft_p50_s']:>7.3f} {r['ttft_p95_s']:>7.3f} {r['req_per_s']:>6.2f} {r['gen_tok_per_s']:>6.1f} "
              f"{r['errors']:>3}  cpu {r['cpu_s']}")
    for server, cores in record["idle_cpu_cores"].items():
        print(f"idle {server}: {cores['total']:.3f} cores {cores}")
    print(json.dumps(record.get("ratios")))
    if "paired_throughput_ratio" in record:
        print("paired throughput ratios (mean, 95% CI):", json.dumps(record["paired_throughput_ratio"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
