# SPDX-License-Identifier: Apache-2.0
"""bench/serve_latency.py: phase and round order, paired ratios, the Serve child (process roles and
CPU accounting: test_bench_cpu_accounting.py; the turns themselves: test_bench_turns.py)."""

import pytest


@pytest.fixture
def bench(bench_script, monkeypatch):
    for key in ("OMP_WAIT_POLICY", "HF_HUB_OFFLINE", "VLLM_CPU_KVCACHE_SPACE"):  # the script sets defaults
        monkeypatch.setenv(key, "x")
    return bench_script("serve_latency")


def test_cycles_alternate_the_servers_and_merge_meeting_vllm_phases(bench):
    assert bench.phase_plan(4) == [("vllm", 2), ("ray_serve_llm", 4), ("vllm", 2)]
    assert bench.phase_plan(4, cycles=2) == [("vllm", 2), ("ray_serve_llm", 4), ("vllm", 4),
                                              ("ray_serve_llm", 4), ("vllm", 2)]
    plan = bench.phase_plan(3, cycles=3)
    assert [s for s, _ in plan] == ["vllm", "ray_serve_llm"] * 3 + ["vllm"]
    for server in ("vllm", "ray_serve_llm"):  # each server gets rounds x cycles rounds
        assert sum(n for s, n in plan if s == server) == 9
    assert bench.phase_plan(4, only="serve", cycles=2) == [("ray_serve_llm", 8)]


def test_interleaved_rounds_alternate_in_abba_pairs(bench):
    assert bench.interleaved_plan(4) == ["vllm", "ray_serve_llm", "ray_serve_llm", "vllm",
                                         "vllm", "ray_serve_llm", "ray_serve_llm", "vllm"]
    plan = bench.interleaved_plan(5)
    assert plan.count("vllm") == plan.count("ray_serve_llm") == 5
    # --compare: the profile's app and the changed one, the profile's first in each ABBA pair
    assert bench.interleaved_plan(2, ("ray_serve_llm", "ray_serve_llm_changed")) == [
        "ray_serve_llm", "ray_serve_llm_changed", "ray_serve_llm_changed", "ray_serve_llm"]


def test_paired_ratios_pair_neighbouring_rounds_with_a_confidence_interval(bench):
    def row(server, rates, p50s=None):
        return {"server": server, "model": "base", "concurrency": 16,
                "rounds": [{"req_per_s": r, "p50_s": p} for r, p in zip(rates, p50s or rates)]}

    results = [row("ray_serve_llm", [2.0, 3.0, 2.7]), row("vllm", [2.0, 3.0, 3.0])]
    paired = bench.paired_ratios(results, ["base"], [16])["base/16"]
    assert paired["pairs"] == 3 and paired["mean"] == round((1.0 + 1.0 + 0.9) / 3, 3)
    low, high = paired["ci95"]
    # sd of (1, 1, 0.9) = 0.0577; t(2) = 4.303; half-width 4.303 * 0.0577 / sqrt(3) = 0.143
    assert abs(low - (0.9667 - 0.1434)) < 0.002 and abs(high - (0.9667 + 0.1434)) < 0.002
    # one pair says nothing about the spread: no interval
    assert bench.paired_ratios([row("ray_serve_llm", [2.0]), row("vllm", [2.0])], ["base"], [16]) == {}
    # p50 per pair of rounds: a slow round of both servers does not move the ratio
    rounds = [row("ray_serve_llm", [2.0, 1.0], p50s=[6.6, 12.6]), row("vllm", [2.0, 1.0], p50s=[6.0, 12.0])]
    p50 = bench.paired_ratios(rounds, ["base"], [16], key="p50_s")["base/16"]
    assert p50["mean"] == round((1.1 + 1.05) / 2, 3) and p50["pairs"] == 2
    # a round in which every request failed has no p50: left out, not a nan mean
    failed = [row("ray_serve_llm", [2.0, 1.0, 0.0], p50s=[6.6, 12.6, float("nan")]),
              row("vllm", [2.0, 1.0, 1.0], p50s=[6.0, 12.0, 12.0])]
    assert bench.paired_ratios(failed, ["base"], [16], key="p50_s")["base/16"] == p50


def test_ratios_divide_the_measured_server_by_the_reference(bench):
    def row(server, p50, rates):
        return {"server": server, "model": "base", "concurrency": 16, "p50_s": p50, "ttft_p50_s": 1.0,
                "decode_p50_s": p50 - 1.0,
                "req_per_s": sum(rates) / len(rates), "rounds": [{"req_per_s": r} for r in rates]}

    results = [row("ray_serve_llm", 4.0, [2.0, 2.0]), row("ray_serve_llm_changed", 3.0, [2.2, 2.4]),
               row("vllm", 5.0, [2.5, 2.5])]
    serve_vs_vllm = bench.ratios(results, ["base"], [16])["base/16"]
    assert serve_vs_vllm["p50"] == 0.8  # Serve / vLLM unless told
    assert serve_vs_vllm["decode_p50"] == 0.75  # (4 - 1) / (5 - 1): the part after the first token
    changed = bench.ratios(results, ["base"], [16], ("ray_serve_llm_changed", "ray_serve_llm"))["base/16"]
    assert changed["p50"] == 0.75 and changed["throughput"] == 1.15
    paired = bench.paired_ratios(results, ["base"], [16], ("ray_serve_llm_changed", "ray_serve_llm"))
    assert paired["base/16"]["mean"] == 1.15 and paired["base/16"]["pairs"] == 2


def test_compare_settings_are_parsed_as_yaml_values_of_serve(bench):
    assert bench.serve_changes(["high_throughput=false", "serve.control_loop_interval_s=0.5",
                                "stream_batching_interval_ms=null"]) == {
        "high_throughput": False, "control_loop_interval_s": 0.5, "stream_batching_interval_ms": None}
    for bad in ("high_throughput", "=1"):
        with pytest.raises(ValueError, match="want SETTING=VALUE"):
            bench.serve_changes([bad])


def test_compare_changes_a_validated_copy_of_the_profile(bench, project_root):
    from e2e_llm.config import load_profile

    config = load_profile("local", root=project_root)
    assert config.serve.high_throughput  # the local profile's value: what the change is measured against
    changed = bench.with_serve_changes(config, {"high_throughput": False, "control_loop_interval_s": 0.25})
    assert not changed.serve.high_throughput and changed.serve.control_loop_interval_s == 0.25
    assert config.serve.high_throughput  # the profile's own config is untouched
    assert changed.model.id == config.model.id and changed.root == config.root  # the rest is the same profile
    with pytest.raises(ValueError, match="serve has no setting hight_throughput"):
        bench.with_serve_changes(config, {"hight_throughput": False})
    with pytest.raises(ValueError, match="control_loop_interval_s"):  # the profile's own rule: > 0
        bench.with_serve_changes(config, {"control_loop_interval_s": -1})


def test_compare_cannot_run_with_only(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--compare", "high_throughput=false", "--only", "serve"])
    assert "cannot be combined with --only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--compare", "high_throughput"])
    assert "want SETTING=VALUE" in capsys.readouterr().err


def test_a_serve_child_that_dies_before_the_app_is_up_is_an_error_at_once(bench):
    import types

    args = types.SimpleNamespace(batching_ms=None, no_engine_metrics=False)
    # No config: the child fails at once; the parent says so instead of waiting out its 600 s.
    with pytest.raises(RuntimeError, match="exited with 1 before the app was up"):
        with bench.serve_in_child(None, None, args, {}):
            pass


def test_a_rounds_summary_splits_latency_into_first_token_and_decode(bench):
    results = [{"ok": True, "latency": lat, "ttft": ttft, "tokens": 64}
               for lat, ttft in ((6.0, 1.0), (7.0, 1.5), (8.0, 1.0))] + [{"ok": False, "status": 500, "latency": 0.1}]
    stats = bench.summarize(results, wall=10.0, concurrency=3)
    assert stats["errors"] == 1 and stats["req_per_s"] == 0.3
    assert stats["ttft_p50_s"] == 1.0 and stats["p50_s"] == 7.0
    assert stats["decode_p50_s"] == 5.5  # of 5.0, 5.5 and 7.0: not p50 - ttft p50 (6.0)
