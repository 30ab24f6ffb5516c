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
during them (the engine's worker and scheduler, each Ray process, the load generator) and the
time each waited for a CPU another process held (the engine worker's per round), so the record
says where the time went. Appends one record to bench/results.jsonl (bench
``serve_latency_vs_vllm``; ``machine`` names the CPU capability the engine's kernels run at,
the dtype and the load average before/after; ``ratios`` holds Serve / vLLM per model and
concurrency) and prints a table. Loopback only; every loop is bounded.

``--interleave``: both servers up at once (Serve's Ray driver in a child process), taking turns
round by round in ABBA order; the server not being measured is stopped (SIGSTOP, its whole
process tree) so it costs nothing. On a host whose speed drifts by minutes this compares the
servers under the same conditions far more closely than phases do.

``--compare SETTING=VALUE ...``: the serving app against itself instead of vLLM: two Serve apps, the
profile as it is and with those ``serve.*`` settings changed, taking turns as with ``--interleave``.
Records bench ``serve_setting_ab`` (ratios: changed / as is), so that a setting is kept or dropped on
figures measured in the same minutes on the user's own machine.

Usage:
    flock /tmp/e2e-heavy.lock .venv/serve/bin/python bench/serve_latency.py --models base
    flock /tmp/e2e-heavy.lock .venv/serve/bin/python bench/serve_latency.py --models base --interleave --rounds 8
    # as on an AVX2-only CPU (`make e2e-avx2`; the engine then runs float32):
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        flock /tmp/e2e-heavy.lock .venv/serve/bin/python bench/serve_latency.py --models base
    # is a setting worth it here? (the profile's value against another one)
    flock /tmp/e2e-heavy.lock .venv/serve/bin/python bench/serve_latency.py --models base --rounds 8 \\
        --compare high_throughput=false
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from _device import cpu_model
from cpu_accounting import (  # bench/cpu_accounting.py, paired.py, servers.py and turns.py, beside this script
    cpu_by_role,
    cpu_snapshot,
    idle_cores,
    merged_idle,
    steal_seconds,
)
from paired import mean_ci95, round_ratios
from servers import SERVE, VLLM, serve_in_child, serve_server, vllm_server, wait_http
from turns import taking_turns

ROOT = Path(__file__).resolve().parents[1]
BENCH = "serve_latency_vs_vllm"
# --compare: the serving app against itself, the profile as it is and with some serve.* settings changed.
COMPARE_BENCH = "serve_setting_ab"
# --compare's app with the settings changed (the profile's as it is: SERVE).
SERVE_CHANGED = "ray_serve_llm_changed"
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
    # From the first token to the end: the engine's decode steps, apart from when the request got in.
    decode = [r["latency"] - r["ttft"] for r in ok if r["ttft"] is not None]
    return {
        "requests": len(results), "errors": len(results) - len(ok), "concurrency": concurrency,
        "p50_s": round(percentile(lat, 0.5), 4), "p95_s": round(percentile(lat, 0.95), 4),
        "ttft_p50_s": round(percentile(ttft, 0.5), 4), "ttft_p95_s": round(percentile(ttft, 0.95), 4),
        "decode_p50_s": round(percentile(decode, 0.5), 4),
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
        return [(SERVE if only == "serve" else VLLM, rounds * cycles)]
    first = rounds // 2
    plan: list[tuple[str, int]] = []
    for _ in range(cycles):
        for server, n in ((VLLM, first), (SERVE, rounds), (VLLM, rounds - first)):
            if n <= 0:
                continue
            if plan and plan[-1][0] == server:
                plan[-1] = (server, plan[-1][1] + n)
            else:
                plan.append((server, n))
    return plan


def interleaved_plan(rounds: int, servers: tuple[str, str] = (VLLM, SERVE)) -> list[str]:
    """``--interleave``: the servers' order for the rounds of one model and concurrency, in pairs
    alternating A, B / B, A (ABBA; vLLM first unless ``servers`` says otherwise): a drift of the
    machine's speed within the run (on a shared host, up to 30% within minutes) falls on both
    servers alike, round by round."""
    order: list[str] = []
    for k in range(rounds):
        order += list(servers) if k % 2 == 0 else list(servers[::-1])
    return order


def run_round(server: str, base_url: str, kind: str, model: str, concurrency: int, prompts, args,
              merged: dict) -> None:
    """One round of one server at one concurrency, added to ``merged``."""
    n = args.requests_1 if concurrency == 1 else max(args.requests_n, concurrency)
    before, steal = cpu_snapshot(), steal_seconds()
    results, wall = asyncio.run(load(base_url, model, prompts, concurrency, n, args.max_tokens, args.warmup))
    after = cpu_snapshot()
    used, waited, waited_named = (cpu_by_role(before, after, field) for field in (1, 2, 3))
    stolen = round(steal_seconds() - steal, 2)
    m = merged.setdefault((server, kind, concurrency), {"results": [], "wall": 0.0, "cpu": {}, "wait": {},
                                                        "rounds": []})
    m["results"] += results
    m["wall"] += wall
    for key, by_role in (("cpu", used), ("wait", waited)):
        for role, seconds in by_role.items():
            m[key][role] = round(m[key].get(role, 0.0) + seconds, 2)
    stats = summarize(results, wall, concurrency)
    # The engine worker's model threads' runqueue wait: time other tasks took from the model.
    worker_wait = round(sum(s for role, s in waited_named.items() if role.endswith(":engine_worker")), 2)
    m["rounds"].append({**{k: stats[k] for k in ("p50_s", "req_per_s", "errors")}, "steal_s": stolen,
                        "worker_wait_s": worker_wait})
    print(json.dumps({"server": server, "model": kind, **stats, "cpu_s": used, "wait_s": waited,
                      "steal_s": stolen, "loadavg": [round(x, 2) for x in os.getloadavg()]}), flush=True)


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
                     "cpu_s": dict(sorted(m["cpu"].items(), key=lambda kv: -kv[1])),
                     "runqueue_wait_s": dict(sorted(m["wait"].items(), key=lambda kv: -kv[1]))})
    return rows


def machine_info() -> dict:
    """The CPU the engines ran on, as they saw it: capability and dtype (e2e_llm.precision),
    the ISA caps in the environment (the AVX2 reproduction), and the load average."""
    from e2e_llm.precision import choose_dtype, cpu_signals

    signals = cpu_signals()
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "cpu_model": cpu_model(),
            "cpu_capability": signals.capability, "cpu_bf16_features": list(signals.features),
            "isa_env": {k: os.environ[k] for k in CPU_CAP_ENV if k in os.environ},
            "dtype": choose_dtype("auto", "cpu", signals=signals).line(),
            "loadavg_before": [round(x, 2) for x in os.getloadavg()]}


def run_interleaved(servers: dict, prompts, args, merged: dict, idle: dict) -> dict:
    """``--interleave`` (and ``--compare``): two servers up together (``servers``: name -> a context
    manager that starts it and yields its URL, models, what it ran and its root pid, in
    :func:`interleaved_plan` order); each server's idle cost and then its rounds, the other server
    stopped meanwhile (:func:`taking_turns`). Returns what each server ran (name -> the vLLM command
    or the Ray options)."""
    with ExitStack() as stack:
        up = {name: stack.enter_context(start) for name, start in servers.items()}
        with taking_turns({name: pid for name, (_, _, _, pid) in up.items()}) as turn:
            if args.idle_s:
                for server in up:
                    turn(server)
                    idle.setdefault(server, []).append(idle_cores(args.idle_s))
            for kind in args.models:
                for concurrency in args.concurrency:
                    for server in interleaved_plan(args.rounds, tuple(up)):
                        url, models, _, _ = up[server]
                        turn(server)
                        wait_http(f"{url}/v1/models", 120)
                        run_round(server, url, kind, models[kind], concurrency, prompts, args, merged)
        return {name: ran for name, (_, _, ran, _) in up.items()}


def pick(rows, server, model, concurrency):
    return next(r for r in rows if r["server"] == server and r["model"] == model and r["concurrency"] == concurrency)


def ratios(results: list[dict], models: list[str], concurrency: list[int],
           servers: tuple[str, str] = (SERVE, VLLM)) -> dict[str, dict[str, float]]:
    """``servers[0]`` / ``servers[1]`` (Serve / vLLM unless told) per model and concurrency."""
    out = {}
    for model in models:
        for c in concurrency:
            s, v = pick(results, servers[0], model, c), pick(results, servers[1], model, c)
            out[f"{model}/{c}"] = {"p50": round(s["p50_s"] / v["p50_s"], 3),
                                   "throughput": round(s["req_per_s"] / v["req_per_s"], 3),
                                   "ttft_p50": round(s["ttft_p50_s"] / v["ttft_p50_s"], 3),
                                   "decode_p50": round(s["decode_p50_s"] / v["decode_p50_s"], 3)}
    return out


def paired_ratios(results: list[dict], models: list[str], concurrency: list[int],
                  servers: tuple[str, str] = (SERVE, VLLM), key: str = "req_per_s") -> dict[str, dict]:
    """``--interleave``: ``servers[0]`` / ``servers[1]`` (Serve / vLLM unless told) of a round's ``key``
    (``req_per_s`` or ``p50_s``) per pair of neighbouring rounds (the k-th of each server are adjacent in
    :func:`interleaved_plan`), their mean and its 95% confidence interval: how sure the ratio is on a
    host whose speed drifts (bench/paired.py pools them over records)."""
    out = {}
    for model in models:
        for c in concurrency:
            per_pair = round_ratios(pick(results, servers[0], model, c), pick(results, servers[1], model, c), key)
            if stat := mean_ci95(per_pair):
                out[f"{model}/{c}"] = stat
    return out


def serve_changes(pairs: list[str]) -> dict[str, Any]:
    """``--compare``'s ``["high_throughput=false", ...]`` -> ``{"high_throughput": False, ...}`` (the
    values read as YAML, as the profile's are; a ``serve.`` prefix may be given)."""
    import yaml

    changes: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().removeprefix("serve.")
        if not sep or not key:
            raise ValueError(f"--compare {pair!r}: want SETTING=VALUE, e.g. high_throughput=false")
        changes[key] = yaml.safe_load(value)
    return changes


def with_serve_changes(config, changes: dict[str, Any]):
    """A copy of ``config`` whose ``serve`` has ``changes``, validated as a profile's is."""
    from pydantic import ValidationError

    from e2e_llm.config import ServeConfig

    unknown = sorted(set(changes) - set(ServeConfig.model_fields))
    if unknown:
        raise ValueError(f"--compare: serve has no setting {', '.join(unknown)} "
                         f"(it has: {', '.join(ServeConfig.model_fields)})")
    try:
        serve = ServeConfig.model_validate({**config.serve.model_dump(), **changes})
    except ValidationError as exc:
        raise ValueError(f"--compare {changes}: {exc}") from None
    return config.model_copy(update={"serve": serve})


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
    parser.add_argument("--compare", nargs="+", metavar="SETTING=VALUE",
                        help="the serving app against itself instead of vLLM: the profile as it is and with "
                             "these serve.* settings changed (e.g. high_throughput=false), taking turns as with "
                             f"--interleave; records bench {COMPARE_BENCH}, ratios changed / as is")
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
    from e2e_llm.proxy_env import bypass_proxy_for_this_machine

    bypass_proxy_for_this_machine()  # its clients and servers are on this machine, as the CLI's
    if (args.interleave or args.compare) and args.only:
        parser.error("--interleave and --compare run two servers; they cannot be combined with --only")
    try:
        changes = serve_changes(args.compare) if args.compare else None
    except ValueError as exc:
        parser.error(str(exc))
    args.interleave = args.interleave or bool(args.compare)
    # The ratios are measured / reference; each pair of rounds starts with the reference.
    measured, reference = (SERVE_CHANGED, SERVE) if changes is not None else (SERVE, VLLM)

    from e2e_llm.config import load_profile
    from e2e_llm.local_s3 import start
    from e2e_llm.ports import free_tcp_port
    from e2e_llm.serve import app_args
    from e2e_llm.store import AdapterStore, find_training_adapter

    config = load_profile(args.profile, root=ROOT)
    config.serve.auth.enabled = False
    try:
        changed = with_serve_changes(config, changes) if changes is not None else None
    except ValueError as exc:
        parser.error(str(exc))
    machine = machine_info()
    endpoint = f"http://127.0.0.1:{free_tcp_port()}"
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

        if changed is not None:
            ray_init = run_interleaved({SERVE: serve_in_child(config, adapter_id, args, startup, name=SERVE),
                                        SERVE_CHANGED: serve_in_child(changed, adapter_id, args, startup,
                                                                      name=SERVE_CHANGED)},
                                       prompts, args, merged, idle)[SERVE]
        elif args.interleave:
            ran = run_interleaved({VLLM: vllm_server(config, llm["model_loading_config"]["model_source"], adapter_dir,
                                                     llm["engine_kwargs"], startup),
                                   SERVE: serve_in_child(config, adapter_id, args, startup)},
                                  prompts, args, merged, idle)
            vllm_cmd, ray_init = ran[VLLM], ran[SERVE]
        else:
            for server, rounds in phase_plan(args.rounds, args.only, args.cycles):
                if server == SERVE:
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
        "bench": COMPARE_BENCH if changes is not None else BENCH,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_sha": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                  text=True, check=False).stdout.strip(),
        "machine": machine,
        "settings": {"profile": args.profile, "model": config.model.id, "engine_kwargs": llm["engine_kwargs"],
                     "max_tokens": args.max_tokens, "ignore_eos": True, "stream": True,
                     "requests_1": args.requests_1, "requests_n": args.requests_n, "warmup": args.warmup,
                     "rounds": args.rounds, "cycles": args.cycles,
                     "interleave": args.interleave,
                     "compare": changes,
                     "phases": (interleaved_plan(args.rounds, (reference, measured)) if args.interleave
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
        "startup_s": {k: v for k, v in startup.items() if isinstance(v, list)},
        "serve_process_niceness": startup.get(f"{SERVE}_niceness"),
        "serve_cpus": startup.get(f"{SERVE}_cpus"),
        "idle_cpu_cores": merged_idle(idle),
        "results": results,
    }
    if args.only is None:
        record["ratios"] = ratios(results, args.models, args.concurrency, (measured, reference))
        if args.interleave:
            for name, key in (("paired_throughput_ratio", "req_per_s"), ("paired_p50_ratio", "p50_s")):
                record[name] = paired_ratios(results, args.models, args.concurrency, (measured, reference), key)
        hi = max(args.concurrency)
        base = record["ratios"].get(f"base/{hi}")
        if base and changes is not None:
            record.update(ratio=base["throughput"], p50_ratio=base["p50"],
                          metric=f"req_per_s/{hi}_concurrent/base",
                          value=pick(results, measured, "base", hi)["req_per_s"],
                          baseline=pick(results, reference, "base", hi)["req_per_s"],
                          ratio_definition=f"Serve with {changes} / Serve as the profile has it: requests/s at "
                                           f"{hi} concurrent, base model")
        elif base:
            record.update(ratio=base["p50"], throughput_ratio=base["throughput"],
                          metric=f"p50_latency_s/{hi}_concurrent/base",
                          value=pick(results, SERVE, "base", hi)["p50_s"],
                          baseline=pick(results, VLLM, "base", hi)["p50_s"],
                          ratio_definition=f"Serve p50 / vLLM p50 latency at {hi} concurrent, base model")
    with open(args.results, "a") as f:
        f.write(json.dumps(record) + "\n")

    print(f"\n{machine['cpu_capability']} {machine['dtype']}; load {machine['loadavg_before']} -> "
          f"{machine['loadavg_after']}")
    width = max(len(r["server"]) for r in results) if results else 14
    print(f"{'server':<{width}} {'model':<5} {'conc':>4} {'p50 s':>7} {'p95 s':>7} {'ttft50':>7} {'ttft95':>7} "
          f"{'req/s':>6} {'tok/s':>6} {'err':>3}")
    for r in results:
        print(f"{r['server']:<{width}} {r['model']:<5} {r['concurrency']:>4} {r['p50_s']:>7.3f} {r['p95_s']:>7.3f} "
              f"{r['ttft_p50_s']:>7.3f} {r['ttft_p95_s']:>7.3f} {r['req_per_s']:>6.2f} {r['gen_tok_per_s']:>6.1f} "
              f"{r['errors']:>3}  cpu {r['cpu_s']}  runqueue wait {r['runqueue_wait_s']}")
    for server, cores in record["idle_cpu_cores"].items():
        print(f"idle {server}: {cores['total']:.3f} cores {cores}")
    print(f"ratios {measured} / {reference}:", json.dumps(record.get("ratios")))
    if "paired_throughput_ratio" in record:
        print("paired throughput ratios (mean, 95% CI):", json.dumps(record["paired_throughput_ratio"]))
        print("paired p50 ratios (mean, 95% CI):", json.dumps(record["paired_p50_ratio"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
