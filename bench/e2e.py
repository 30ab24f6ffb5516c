# SPDX-License-Identifier: Apache-2.0
"""e2e_wall_time: wall time of each `make e2e` stage and in total, plus the adapter's val metrics.

Runs the same `e2e-llm e2e` as `make e2e` (environments and model already built), then appends
to bench/results.jsonl one ``e2e_wall_time`` row (value: total seconds; baseline: the previous
figure recorded for the same machine string) with the per-stage seconds, the metrics of the
adapter and the base model, the dtype chosen and why. ``machine`` names the CPU capability
torch reports and says when AVX2 was reproduced (``make e2e-avx2``'s AVX2_ENV).

Also ``cpu_matmul``: GFLOP/s of a 512x512 matmul on one thread, float32 vs bfloat16, the
measurement behind e2e_llm.precision's rule.

Usage (the CPU is shared: always under the heavy-job lock):
    flock /tmp/e2e-heavy.lock .venv/serve/bin/python bench/e2e.py run [--rows 200]
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        flock /tmp/e2e-heavy.lock .venv/serve/bin/python bench/e2e.py run
    .venv/serve/bin/python bench/e2e.py matmul          # both ways: run it once with AVX2_ENV too
    flock /tmp/e2e-heavy.lock .venv/serve/bin/python bench/e2e.py fresh   # make e2e in a fresh clone
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results.jsonl"
AVX2_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def machine() -> str:
    from e2e_llm.precision import cpu_signals

    signals = cpu_signals()
    caps = "+".join(signals.features) or "no bf16 instructions"
    capped = {k: os.environ[k] for k in AVX2_ENV if k in os.environ}
    text = f"{os.cpu_count()}-core CPU, torch capability {signals.capability} ({caps})"
    if capped:
        text += ", reproduced with " + " ".join(f"{k}={v}" for k, v in capped.items())
    return text


def previous(bench: str, metric: str, where: str) -> float | None:
    value = None
    if RESULTS.is_file():
        for line in RESULTS.read_text().splitlines():
            row = json.loads(line)
            if row.get("bench") == bench and row.get("metric") == metric and row.get("machine") == where:
                value = row["value"]
    return value


def record(bench: str, metric: str, value: float, baseline: float | None, **details) -> dict:
    where = machine()
    line = {"bench": bench, "metric": metric, "value": round(value, 4),
            "baseline": round(baseline, 4) if baseline is not None else None,
            "ratio": round(value / baseline, 4) if baseline else None, "machine": where,
            "date": datetime.now(UTC).strftime("%Y-%m-%d"), **details}
    with open(RESULTS, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
    return line


def run(args) -> int:
    from e2e_llm.config import load_profile
    from e2e_llm.e2e import run_e2e, summary, write_summary

    config = load_profile("local", root=ROOT)
    venv = ROOT / ".venv"
    from e2e_llm.e2e import DEFAULT_ROWS

    rows = (DEFAULT_ROWS if args.rows is None else args.rows) or None
    # The goal's condition, "model already built", for this machine's dtype: a cache converted on
    # the other kind of CPU (bf16 vs float32) would put a ~45 s re-conversion inside the clock.
    subprocess.run([str(venv / "train/bin/e2e-llm"), "model", "--profile", "local"], check=True, cwd=ROOT)
    result = run_e2e(config, train_cli=str(venv / "train/bin/e2e-llm"), serve_cli=str(venv / "serve/bin/e2e-llm"),
                     rows=rows, profile="local")
    text = summary(result, config, rows, "local")
    print(text, flush=True)
    write_summary(result, text, config.storage_kw())
    if not result.ok:
        return 1
    metric = f"seconds, whole make e2e ({rows or 'all'} val rows)"
    line = record("e2e_wall_time", metric, result.seconds, previous("e2e_wall_time", metric, machine()),
                  stages={s.name: s.seconds for s in result.stages}, dtype=result.dtype["dtype"],
                  dtype_reason=result.dtype["reason"], rows=rows,
                  metrics=(result.adapter_batch or {}).get("metrics"),
                  base_metrics=(result.base_batch or {}).get("metrics"), base_cached=result.base_cached,
                  recipe="configs/recipes/smollm2_lora_sft_local.yaml", run_id=result.run_id,
                  note="environments and model already built; shared 2-core machine under the heavy-job lock")
    print(json.dumps(line))
    return 0


def fresh(args) -> int:
    """`make e2e` in a fresh clone of this checkout (HEAD), with ../shared beside it: environments
    built, model converted, the whole pipeline; recorded as e2e_wall_time (fresh clone)."""
    import shutil
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="e2e-fresh-"))
    try:
        subprocess.run(["git", "clone", "-q", str(ROOT), str(work / "main")], check=True)
        shutil.copytree(ROOT.parent / "shared", work / "shared", symlinks=True)
        start = time.monotonic()
        proc = subprocess.run(["make", "e2e"], cwd=work / "main")
        wall = time.monotonic() - start
        runs = sorted((work / "main/.e2e/local/e2e").glob("*/summary.json"))
        if proc.returncode or not runs:
            kept = "" if args.keep else " (removed; --keep keeps it)"
            print(f"make e2e failed (exit {proc.returncode}) in {work}{kept}", flush=True)
            return 1
        return _record_fresh(json.loads(runs[-1].read_text()), wall)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _record_fresh(summary: dict, wall: float) -> int:
    metric = "seconds, fresh clone: make e2e (environments built, model converted, pipeline)"
    line = record("e2e_wall_time", metric, wall, previous("e2e_wall_time", metric, machine()),
                  pipeline_s=summary["seconds"], stages=summary["stages"], dtype=summary["dtype"]["dtype"],
                  metrics=summary.get("metrics"), base_metrics=summary.get("base_metrics"),
                  run_id=summary["run_id"], note="pip's download cache as this machine had it")
    print(json.dumps(line))
    return 0


def matmul(args) -> int:
    import torch

    torch.set_num_threads(1)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(512, 512, dtype=dtype), torch.randn(512, 512, dtype=dtype)
        a @ b
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            a @ b
            n += 1
        out[str(dtype).removeprefix("torch.")] = 2 * 512**3 * n / (time.perf_counter() - start) / 1e9
    line = record("cpu_matmul", "GFLOP/s 512x512 matmul, bfloat16 vs float32, 1 thread", out["bfloat16"],
                  out["float32"], torch=torch.__version__)
    print(json.dumps(line))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run", help="make e2e, timed, recorded as e2e_wall_time")
    p.add_argument("--rows", type=int, default=None, help="val rows scored (0: all; default: make e2e's)")
    p.set_defaults(fn=run)
    p = sub.add_parser("fresh", help="make e2e in a fresh clone, timed, recorded as e2e_wall_time")
    p.add_argument("--keep", action="store_true", help="keep the clone (default: removed)")
    p.set_defaults(fn=fresh)
    p = sub.add_parser("matmul", help="cpu_matmul: bf16 vs fp32 GFLOP/s on one thread")
    p.add_argument("--seconds", type=float, default=2.0)
    p.set_defaults(fn=matmul)
    args = parser.parse_args()
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
