# SPDX-License-Identifier: Apache-2.0
"""Ray Serve LLM (our app: e2e-llm ingress + LLMServer) vs the plain vLLM OpenAI server, same
model, same engine flags, same machine, one run.

For each server, model (base, base + one LoRA adapter) and concurrency (1, 16): a fixed
number of streamed chat requests over VIGGO val prompts, greedy, exactly ``--max-tokens``
generated tokens each (``ignore_eos``), after a short warm-up. Measures p50/p95 latency,
p50/p95 time to first token, requests/s and generated tokens/s. Appends one record to
bench/results.jsonl (bench ``serve_latency_vs_vllm``; ``ratio`` = Serve p50 / vLLM p50 at 16
concurrent, base model) and prints a table. Loopback only; every loop is bounded.

Usage:
    flock /tmp/e2e-heavy.lock .venv/serve/bin/python bench/serve_latency.py --adapter latest
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = "serve_latency_vs_vllm"
for _k, _v in (("OMP_WAIT_POLICY", "PASSIVE"), ("HF_HUB_OFFLINE", "1"), ("VLLM_CPU_KVCACHE_SPACE", "2")):
    os.environ.setdefault(_k, _v)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def one_request(client, url: str, body: dict) -> dict:
    start = time.perf_counter()
    ttft, chunks = None, 0
    async with client.stream("POST", url, json=body, timeout=300) as response:
        if response.status_code != 200:
            return {"ok": False, "status": response.status_code, "latency": time.perf_counter() - start}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("choices") and data["choices"][0].get("delta", {}).get("content"):
                ttft = ttft or time.perf_counter() - start
                chunks += 1
            usage = data.get("usage")
    return {"ok": True, "latency": time.perf_counter() - start, "ttft": ttft,
            "tokens": (usage or {}).get("completion_tokens", 0)}


async def load(base_url: str, model: str, prompts: list[list[dict]], concurrency: int, n: int,
               max_tokens: int, warmup: int) -> dict:
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
        wall = time.perf_counter() - start
    ok = [r for r in results if r["ok"]]
    lat = [r["latency"] for r in ok]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    return {
        "requests": n, "errors": n - len(ok), "concurrency": concurrency,
        "p50_s": round(percentile(lat, 0.5), 4), "p95_s": round(percentile(lat, 0.95), 4),
        "ttft_p50_s": round(percentile(ttft, 0.5), 4), "ttft_p95_s": round(percentile(ttft, 0.95), 4),
        "req_per_s": round(len(ok) / wall, 3), "gen_tok_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
    }


def run_matrix(server: str, base_url: str, models: dict[str, str], prompts, args) -> list[dict]:
    rows = []
    for kind, model in models.items():
        for concurrency in args.concurrency:
            n = args.requests_1 if concurrency == 1 else args.requests_n
            stats = asyncio.run(load(base_url, model, prompts, concurrency, n, args.max_tokens, args.warmup))
            row = {"server": server, "model": kind, **stats}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


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


def bench_serve(config, adapter_id: str, prompts, args) -> tuple[list[dict], float]:
    import ray
    from ray import serve

    from e2e_llm.serve import app_args, build_app

    port = free_port()
    t0 = time.monotonic()
    ray.init(_temp_dir=tempfile.mkdtemp(prefix="r-bench-", dir="/tmp"), include_dashboard=False,
             log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = app_args(config)
        for llm in app["llm_configs"]:
            if args.batching_ms is not None:
                llm.setdefault("experimental_configs", {})["stream_batching_interval_ms"] = args.batching_ms
            if args.no_engine_metrics:
                llm["log_engine_metrics"] = False
        serve.run(build_app(app), name="llm", route_prefix="/")
        startup = time.monotonic() - t0
        models = {"base": config.model.id, "lora": f"{config.model.id}:{adapter_id}"}
        models = {k: v for k, v in models.items() if k in args.models}
        return run_matrix("ray_serve_llm", f"http://127.0.0.1:{port}", models, prompts, args), startup
    finally:
        serve.shutdown()
        ray.shutdown()


def vllm_flags(engine_kwargs: dict) -> list[str]:
    flags = []
    for key, value in engine_kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is not False and value is not None:
            flags += [flag, str(value)]
    return flags


def bench_vllm(config, model_path: str, adapter_dir: Path, engine_kwargs: dict, prompts, args):
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
           "--model", model_path, "--served-model-name", config.model.id,
           "--lora-modules", f"bench={adapter_dir}", *vllm_flags(engine_kwargs)]
    t0 = time.monotonic()
    log = open(Path(tempfile.gettempdir()) / f"bench-vllm-{port}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", 300, proc)
        startup = time.monotonic() - t0
        models = {k: v for k, v in {"base": config.model.id, "lora": "bench"}.items() if k in args.models}
        return run_matrix("vllm", f"http://127.0.0.1:{port}", models, prompts, args), startup, cmd
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def pick(rows, server, model, concurrency):
    return next(r for r in rows if r["server"] == server and r["model"] == model and r["concurrency"] == concurrency)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="local")
    parser.add_argument("--adapter", default="latest", help="adapter folder, training run id or 'latest'")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--requests-1", type=int, default=8, help="requests at concurrency 1")
    parser.add_argument("--requests-n", type=int, default=48, help="requests at higher concurrency")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", choices=["serve", "vllm"], help="run one server (tuning runs)")
    parser.add_argument("--models", nargs="+", default=["base", "lora"], choices=["base", "lora"])
    parser.add_argument("--batching-ms", type=float,
                        help="Serve LLM stream batching interval (experimental_configs; Ray's default 50)")
    parser.add_argument("--no-engine-metrics", action="store_true", help="Serve: log_engine_metrics off")
    parser.add_argument("--note", default="", help="free text stored with the record (what changed)")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results.jsonl"))
    args = parser.parse_args(argv)

    from e2e_llm.config import load_profile
    from e2e_llm.local_s3 import start
    from e2e_llm.serve import app_args
    from e2e_llm.store import AdapterStore, find_training_adapter

    config = load_profile(args.profile, root=ROOT)
    config.serve.auth.enabled = False
    endpoint = f"http://127.0.0.1:{free_port()}"
    os.environ["AWS_ENDPOINT_URL"] = os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
    moto = start(endpoint, data_dir=Path(tempfile.mkdtemp(prefix="bench-s3-")))
    try:
        adapter_dir, _ = find_training_adapter(config, args.adapter)
        adapter_id = AdapterStore.from_config(config).publish(adapter_dir, name="bench")
        val = config.path(config.storage_uri("data", config.data.dataset, "val.jsonl"))
        rows = [json.loads(line) for line in Path(val).read_text().splitlines()[:64]]
        prompts = [[{"role": "system", "content": r["instruction"]}, {"role": "user", "content": r["input"]}]
                   for r in rows]
        llm = app_args(config)["llm_configs"][0]
        results, startup, vllm_cmd = [], {}, None
        if args.only in (None, "serve"):
            rows_s, startup["ray_serve_llm"] = bench_serve(config, adapter_id, prompts, args)
            results += rows_s
        if args.only in (None, "vllm"):
            rows_v, startup["vllm"], vllm_cmd = bench_vllm(
                config, llm["model_loading_config"]["model_source"], Path(adapter_dir), llm["engine_kwargs"],
                prompts, args)
            results += rows_v
    finally:
        if moto:
            moto.terminate()

    record = {
        "bench": BENCH,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_sha": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                  text=True, check=False).stdout.strip(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "settings": {"profile": args.profile, "model": config.model.id, "engine_kwargs": llm["engine_kwargs"],
                     "max_tokens": args.max_tokens, "ignore_eos": True, "stream": True,
                     "requests_1": args.requests_1, "requests_n": args.requests_n, "warmup": args.warmup,
                     "vllm_cmd": " ".join(vllm_cmd[2:]) if vllm_cmd else None, "note": args.note,
                     "serve_stream_batching_interval_ms": args.batching_ms,
                     "serve_log_engine_metrics": not args.no_engine_metrics, "only": args.only},
        "startup_s": {k: round(v, 1) for k, v in startup.items()},
        "results": results,
    }
    if args.only is None:
        hi = max(args.concurrency)
        for model in args.models:
            s, v = pick(results, "ray_serve_llm", model, hi), pick(results, "vllm", model, hi)
            suffix = "" if model == "base" else "_lora"
            record[f"ratio{suffix}"] = round(s["p50_s"] / v["p50_s"], 3)
            record[f"throughput_ratio{suffix}"] = round(s["req_per_s"] / v["req_per_s"], 3)
            record[f"ttft_p50_ratio{suffix}"] = round(s["ttft_p50_s"] / v["ttft_p50_s"], 3)
        base_s, base_v = pick(results, "ray_serve_llm", "base", hi), pick(results, "vllm", "base", hi)
        record.update(metric=f"p50_latency_s/{hi}_concurrent/base", value=base_s["p50_s"], baseline=base_v["p50_s"])
        record["ratio_definition"] = f"Serve p50 / vLLM p50 latency at {hi} concurrent, base model"
    with open(args.results, "a") as f:
        f.write(json.dumps(record) + "\n")

    print(f"\n{'server':<14} {'model':<5} {'conc':>4} {'p50 s':>7} {'p95 s':>7} {'ttft50':>7} {'ttft95':>7} "
          f"{'req/s':>6} {'tok/s':>6} {'err':>3}")
    for r in results:
        print(f"{r['server']:<14} {r['model']:<5} {r['concurrency']:>4} {r['p50_s']:>7.3f} {r['p95_s']:>7.3f} "
              f"{r['ttft_p50_s']:>7.3f} {r['ttft_p95_s']:>7.3f} {r['req_per_s']:>6.2f} {r['gen_tok_per_s']:>6.1f} "
              f"{r['errors']:>3}")
    print({k: v for k, v in record.items() if "ratio" in k})
    return 0


if __name__ == "__main__":
    sys.exit(main())
