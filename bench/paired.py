# SPDX-License-Identifier: Apache-2.0
"""Paired ratios of ``bench/serve_latency.py --interleave`` records, one record or pooled.

In an interleaved record the k-th round of each server ran next to each other (ABBA), so the ratio
of a pair cancels the host's drift; the mean of those ratios and its 95% confidence interval say
how sure a record is. One record holds 7-14 pairs, and its interval is +-4-7% wide on a host
whose speed moves minute to minute. Records of the same serving code on the same kind of CPU
measure the same thing, so this script pools their pairs (a cell of 48 pairs: about +-2.4%).

It prints and writes nothing to ``bench/results.jsonl``: every pair it reads is already there,
measured and recorded by ``serve_latency.py``; this is arithmetic over those rows.

Usage:
    .venv/serve/bin/python bench/paired.py --since 3fab063   # records whose code contains 3fab063
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from servers import SERVE, VLLM  # bench/servers.py, beside this script

ROOT = Path(__file__).resolve().parents[1]

# Two-sided 95% critical values of Student's t by degrees of freedom (1.96 beyond the table).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
       20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def round_ratios(measured: dict, reference: dict, key: str = "req_per_s") -> list[float]:
    """``measured`` / ``reference`` (two result rows of one model and concurrency) of ``key`` per pair
    of neighbouring rounds (the k-th of each)."""
    # a round without one answered request has no p50 (nan): that pair says nothing
    return [a[key] / b[key] for a, b in zip(measured["rounds"], reference["rounds"])
            if b[key] and math.isfinite(a[key]) and math.isfinite(b[key])]


def mean_ci95(values: list[float]) -> dict | None:
    """The mean of ``values``, its 95% confidence interval (Student's t) and how many; None for
    fewer than two."""
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    sd = (sum((x - mean) ** 2 for x in values) / (len(values) - 1)) ** 0.5
    df = len(values) - 1
    t = T95[max(k for k in T95 if k <= df)] if df <= max(T95) else 1.96  # between rows: the smaller df
    half = t * sd / len(values) ** 0.5
    return {"mean": round(mean, 3), "ci95": [round(mean - half, 3), round(mean + half, 3)], "pairs": len(values)}


def cpu_kind(record: dict) -> str:
    """What a record's engine ran on, as far as the kernels go: the capability torch dispatched to,
    the dtype chosen, the bf16 instructions the CPU has, and whether AVX2 was reproduced by caps."""
    m = record.get("machine") or {}
    dtype = str(m.get("dtype", "?")).split(" ", 1)[0]
    features = "+".join(m.get("cpu_bf16_features") or []) or "no bf16 instructions"
    kind = f"{m.get('cpu_capability', '?')} {dtype} ({features})"
    return kind + (", reproduced by caps" if m.get("isa_env") else "")


def is_plain_interleaved(record: dict) -> bool:
    """Serve against vLLM, both servers taking turns (not ``--compare`` or ``--only``, not phases)."""
    s = record.get("settings") or {}
    return (record.get("bench") == "serve_latency_vs_vllm" and bool(s.get("interleave"))
            and not s.get("compare") and not s.get("only"))


def contains(since: str) -> Callable[[str], bool]:
    """A test of whether a record's git sha has ``since`` in its history (False for a sha this
    checkout does not have)."""
    def test(sha: str) -> bool:
        done = subprocess.run(["git", "merge-base", "--is-ancestor", since, sha], cwd=ROOT,
                              capture_output=True)
        return done.returncode == 0
    return test


def pool(records: list[dict], include: Callable[[str], bool]) -> dict[tuple[str, str, int], dict]:
    """Pairs of every plain interleaved record whose sha ``include`` accepts, pooled per CPU kind,
    model and concurrency: ``{(kind, model, conc): {"p50": mean_ci95, "throughput": mean_ci95,
    "records": n}}``."""
    pairs: dict[tuple[str, str, int], dict] = defaultdict(lambda: {"p50_s": [], "req_per_s": [], "records": 0})
    for record in records:
        if not is_plain_interleaved(record) or not include(record.get("git_sha", "")):
            continue
        rows = {(r["server"], r["model"], r["concurrency"]): r for r in record.get("results", [])}
        for (server, model, conc), serve_row in rows.items():
            vllm_row = rows.get((VLLM, model, conc))
            if server != SERVE or vllm_row is None:
                continue
            cell = pairs[(cpu_kind(record), model, conc)]
            for key in ("p50_s", "req_per_s"):
                cell[key] += round_ratios(serve_row, vllm_row, key)
            cell["records"] += 1
    return {k: {"p50": mean_ci95(v["p50_s"]), "throughput": mean_ci95(v["req_per_s"]),
                "records": v["records"]} for k, v in sorted(pairs.items())}


def table(pooled: dict) -> str:
    def fmt(stat: dict | None) -> str:
        return f"{stat['mean']:.3f} [{stat['ci95'][0]:.3f}, {stat['ci95'][1]:.3f}]" if stat else "-"

    lines = ["| CPU | model | conc | records | pairs | p50 Serve/vLLM [95% CI] | throughput [95% CI] |",
             "| --- | --- | ---: | ---: | ---: | --- | --- |"]
    for (kind, model, conc), cell in pooled.items():
        n = (cell["p50"] or cell["throughput"] or {}).get("pairs", 0)
        lines.append(f"| {kind} | {model} | {conc} | {cell['records']} | {n} | {fmt(cell['p50'])} | "
                     f"{fmt(cell['throughput'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--since", required=True,
                        help="a commit: pool the records whose code contains it (the last serving change)")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results.jsonl"))
    args = parser.parse_args(argv)
    records = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line.strip()]
    print(table(pool(records, contains(args.since))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
