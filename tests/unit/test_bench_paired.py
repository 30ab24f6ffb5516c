# SPDX-License-Identifier: Apache-2.0
"""bench/paired.py: the paired statistic of one interleaved record and the pooling of records."""

import json
import math
import subprocess

import pytest


@pytest.fixture
def paired(bench_script):
    return bench_script("paired")


def test_mean_ci95_uses_students_t_and_needs_two_values(paired):
    assert paired.mean_ci95([1.0]) is None
    stat = paired.mean_ci95([0.9, 1.1])
    # sd = 0.1414, t(1) = 12.706: half = 12.706 * 0.1414 / sqrt(2) = 1.2706
    assert stat == {"mean": 1.0, "ci95": [-0.271, 2.271], "pairs": 2}
    # 50 values: df 49 takes the row of 40 (the larger t), never 1.96
    values = [1.0 + (0.5 if i % 2 else -0.5) for i in range(50)]
    sd = (sum((v - 1.0) ** 2 for v in values) / 49) ** 0.5
    assert stat_half(paired.mean_ci95(values)) == pytest.approx(2.021 * sd / 50 ** 0.5, abs=1e-3)


def stat_half(stat):
    return (stat["ci95"][1] - stat["ci95"][0]) / 2


def test_round_ratios_skip_rounds_without_a_p50(paired):
    serve = {"rounds": [{"p50_s": 2.0}, {"p50_s": math.nan}, {"p50_s": 3.0}]}
    vllm = {"rounds": [{"p50_s": 1.0}, {"p50_s": 1.0}, {"p50_s": math.nan}]}
    assert paired.round_ratios(serve, vllm, "p50_s") == [2.0]


def record(sha, kind="native", conc=16, p50=(1.0, 1.0), vllm_p50=(1.0, 1.0), **settings):
    machine = {"native": {"cpu_capability": "AVX512", "dtype": "bfloat16 on cpu (...)",
                          "cpu_bf16_features": ["avx512_bf16"], "isa_env": {}},
               "avx2": {"cpu_capability": "AVX2", "dtype": "float32 on cpu (...)", "cpu_bf16_features": [],
                        "isa_env": {}},
               "capped": {"cpu_capability": "AVX2", "dtype": "float32 on cpu (...)",
                          "cpu_bf16_features": ["avx512_bf16"], "isa_env": {"ATEN_CPU_CAPABILITY": "avx2"}}}[kind]

    def row(server, p50s):
        return {"server": server, "model": "base", "concurrency": conc,
                "rounds": [{"p50_s": p, "req_per_s": 1.0 / p} for p in p50s]}

    return {"bench": "serve_latency_vs_vllm", "git_sha": sha, "date": sha, "machine": machine,
            "settings": {"interleave": True, "compare": None, "only": None, **settings},
            "results": [row("ray_serve_llm", p50), row("vllm", vllm_p50)]}


def test_pool_joins_the_pairs_of_records_per_cpu_kind_and_concurrency(paired):
    records = [
        record("a", p50=(1.1, 0.9)), record("b", p50=(1.0, 1.2)),   # native 16: 4 pairs
        record("c", kind="avx2", p50=(0.9, 0.95)),                   # a real AVX2 CPU apart
        record("d", kind="capped", p50=(2.0, 2.0)),                  # AVX2 reproduced: apart again
        record("e", conc=64, p50=(1.0, 1.0)),
        record("old", p50=(5.0, 5.0)),                               # before the code asked for
        record("f", p50=(5.0, 5.0), compare=["x=1"]),                # --compare: Serve vs Serve
        record("g", p50=(5.0, 5.0), only="serve"),
        record("h", p50=(5.0, 5.0), interleave=False),               # phases: rounds not paired
    ]
    pooled = paired.pool(records, include=lambda sha: sha != "old")
    native = "AVX512 bfloat16 (avx512_bf16)"
    assert set(pooled) == {(native, "base", 16), (native, "base", 64),
                           ("AVX2 float32 (no bf16 instructions)", "base", 16),
                           ("AVX2 float32 (avx512_bf16), reproduced by caps", "base", 16)}
    cell = pooled[(native, "base", 16)]
    assert cell["records"] == 2 and cell["p50"]["pairs"] == 4
    assert cell["p50"]["mean"] == pytest.approx((1.1 + 0.9 + 1.0 + 1.2) / 4, abs=1e-3)
    assert cell["throughput"]["mean"] == pytest.approx((1 / 1.1 + 1 / 0.9 + 1 + 1 / 1.2) / 4, abs=1e-3)
    assert pooled[("AVX2 float32 (no bf16 instructions)", "base", 16)]["p50"]["mean"] == 0.925
    assert "| AVX2 float32 (no bf16 instructions) | base | 16 | 1 | 2 | 0.925 [" in paired.table(pooled)


def test_main_pools_only_records_whose_code_contains_the_commit(paired, tmp_path, monkeypatch, capsys):
    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True,
                              text=True).stdout.strip()

    git("init", "-q")
    shas = []
    for i in range(3):
        git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", str(i))
        shas.append(git("rev-parse", "HEAD"))
    monkeypatch.setattr(paired, "ROOT", tmp_path)
    results = tmp_path / "results.jsonl"
    results.write_text("\n".join(json.dumps(r) for r in [
        record(shas[0], p50=(9.0, 9.0)), record(shas[1], p50=(1.2, 1.2)), record(shas[2], p50=(1.0, 1.0)),
        record("0" * 40, p50=(9.0, 9.0))]) + "\n")   # a sha this checkout does not have
    assert paired.main(["--since", shas[1], "--results", str(results)]) == 0
    assert "| AVX512 bfloat16 (avx512_bf16) | base | 16 | 2 | 4 | 1.100 [" in capsys.readouterr().out
