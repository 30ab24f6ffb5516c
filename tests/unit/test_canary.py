# SPDX-License-Identifier: Apache-2.0
"""The canary controller's state machine against fakes: gates, decisions, rollback, promotion,
manual commands, and recovery from a kill between any two of its side effects."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import yaml

from e2e_llm.canary import (
    AliasState,
    Answer,
    CanaryError,
    CanaryPolicy,
    ConcurrentRolloutError,
    Controller,
    RolloutLog,
    VersionStats,
    format_gate_table,
    load_canary_set,
    load_policy,
    quality_gate,
    select_canary_rows,
    slo_gate,
)
from e2e_llm.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
BUCKETS = (0.5, 1.0, 2.0, 4.0, 8.0, math.inf)
STABLE = AliasState("viggo-v1")


# -- fakes ---------------------------------------------------------------------------------


class Crash(BaseException):
    """A kill -9 at a chosen side effect (BaseException: nothing in the controller catches it)."""


class Effects:
    """Counts the controller's side effects (log appends, alias writes) and kills it before the
    n-th one."""

    def __init__(self, kill_at: int | None = None):
        self.kill_at = kill_at
        self.count = 0

    def hit(self) -> None:
        self.count += 1
        if self.kill_at is not None and self.count == self.kill_at:
            raise Crash(self.count)


class FakeClock:
    def __init__(self):
        self.t = 1_000_000.0
        self.slept = 0.0

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += max(seconds, 0.0)
        self.slept += max(seconds, 0.0)


class FakeRouter:
    def __init__(self, state: AliasState | None, effects: Effects | None = None):
        self.state = state
        self.writes: list[AliasState] = []
        self.effects = effects or Effects()

    def get(self, alias):
        return self.state

    def set(self, alias, state):
        self.effects.hit()
        self.state = state
        self.writes.append(state)


class CrashingLog(RolloutLog):
    def __init__(self, uri, effects: Effects):
        super().__init__(uri)
        self.effects = effects

    def append(self, record):
        self.effects.hit()
        super().append(record)


class FakeProber:
    """Answers per version: 'good' (the reference), 'bad' (a wrong MR), 'garbage', 'error'."""

    def __init__(self, kinds: dict[str, str], clock: FakeClock, seconds: float = 5.0):
        self.kinds = kinds
        self.clock = clock
        self.seconds = seconds
        self.calls: list[str] = []

    def probe(self, version, rows, policy):
        self.calls.append(version)
        self.clock.t += self.seconds
        kind = self.kinds[version]
        if kind == "error":
            return [Answer(None, "InternalServerError: adapter failed to load") for _ in rows]
        if kind == "garbage":
            return [Answer("lorem ipsum dolor") for _ in rows]
        if kind == "bad":
            return [Answer("inform(name[Nothing])") for _ in rows]
        if kind.startswith("miss"):  # miss<k>: the first k rows wrong
            k = int(kind[4:])
            return [Answer("inform(name[Nothing])" if i < k else r["output"]) for i, r in enumerate(rows)]
        return [Answer(r["output"]) for r in rows]


class FakeMetrics:
    """Alias traffic at ``rate`` req/s split by the router's current weight; per version an error
    share and a latency (all of a version's requests fall in one histogram bucket)."""

    def __init__(self, router: FakeRouter, clock: FakeClock, *, rate: float = 2.0,
                 errors: dict[str, float] | None = None, latency: dict[str, float] | None = None):
        self.router, self.clock, self.rate = router, clock, rate
        self.errors = errors or {}
        self.latency = latency or {}
        self.totals: dict[str, VersionStats] = {}
        self.last = clock.now()
        self.down = False

    def _add(self, version: str, n: float) -> None:
        stats = self.totals.setdefault(version, VersionStats(buckets={b: 0.0 for b in BUCKETS}))
        stats.requests += n
        stats.errors += n * self.errors.get(version, 0.0)
        lat = self.latency.get(version, 0.8)
        for b in BUCKETS:
            if lat <= b:
                stats.buckets[b] += n

    def snapshot(self):
        if self.down:
            raise ConnectionError("metrics endpoint refused the connection")
        elapsed, self.last = self.clock.now() - self.last, self.clock.now()
        state = self.router.state
        if state and state.stable:
            n = elapsed * self.rate
            share = state.candidate_weight / 100.0 if state.candidate else 0.0
            self._add(state.stable, n * (1 - share))
            if state.candidate:
                self._add(state.candidate, n * share)
        return {v: VersionStats(s.requests, s.errors, dict(s.buckets)) for v, s in self.totals.items()}


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def policy() -> CanaryPolicy:
    base = load_policy(ROOT / "configs/canary.yaml")
    return base.model_copy(update={
        "steps": [10, 50, 100], "step_window_s": 60.0,
        "quality": base.quality.model_copy(update={"max_rows": 8}),
        "slo": base.slo.model_copy(update={"min_requests": 5, "metrics_lag_s": 10.0}),
    })


@pytest.fixture(scope="module")
def rows(policy):
    return load_canary_set(policy, ROOT)


class World:
    def __init__(self, tmp_path: Path, policy, rows, task, *, kinds, errors=None, latency=None,
                 kill_at=None, state=STABLE, rate=2.0):
        self.tmp_path, self.policy, self.rows, self.task = tmp_path, policy, rows, task
        self.effects = Effects(kill_at)
        self.clock = FakeClock()
        self.router = FakeRouter(state, self.effects)
        self.prober = FakeProber(kinds, self.clock)
        self.metrics = FakeMetrics(self.router, self.clock, rate=rate, errors=errors, latency=latency)
        self.printed: list[str] = []
        self.uri = str(tmp_path / "store" / "rollouts-viggo.jsonl")

    def controller(self, policy=None, effects=None) -> Controller:
        log = CrashingLog(self.uri, effects or self.effects)
        return Controller(policy=policy or self.policy, task=self.task, canary_rows=self.rows, log=log,
                          router=self.router, prober=self.prober, metrics=self.metrics, clock=self.clock,
                          out=self.printed.append)

    def records(self) -> list[dict]:
        return RolloutLog(self.uri).read()

    def events(self) -> list[str]:
        return [r["event"] for r in self.records()]


@pytest.fixture
def world(tmp_path, policy, rows, viggo_task):
    def make(**kw) -> World:
        return World(tmp_path, policy, rows, viggo_task, **kw)

    return make


# -- full rollouts -----------------------------------------------------------------------------


def test_good_candidate_is_promoted_through_every_step(world):
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"})
    outcome = w.controller().run("viggo-v2")
    assert outcome.result == "promoted"
    assert [s.candidate_weight for s in w.router.writes] == [10.0, 50.0, 100.0, 0.0]
    assert w.router.state == AliasState("viggo-v2", None, 0.0)
    assert w.events() == ["start", "set_weight", "weight_set", "gate", "set_weight", "weight_set", "gate",
                          "set_weight", "weight_set", "gate", "promote", "promoted"]
    gates = [r for r in w.records() if r["event"] == "gate"]
    assert all(g["passed"] for g in gates)
    assert [g["weight"] for g in gates] == [10, 50, 100]
    # every step: probes (2 x 5 s), the metrics lag (10 s), then the whole window (60 s)
    assert w.clock.slept == pytest.approx(3 * 70.0)
    slo = gates[0]["results"][1]
    assert slo["gate"] == "slo" and slo["status"] == "pass"
    # 10% of 2 req/s over 60 s reached the candidate
    assert slo["details"]["window"]["candidate"]["requests"] == pytest.approx(12.0)
    assert "decision" in w.printed[-1] and "PASS" in w.printed[-1]


def test_worse_candidate_is_rolled_back_by_the_quality_gate_without_waiting_the_window(world):
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "bad"})
    outcome = w.controller().run("viggo-v2")
    assert outcome.result == "rolled_back"
    assert w.router.state == AliasState("viggo-v1", None, 0.0)
    assert [s.candidate_weight for s in w.router.writes] == [10.0, 0.0]
    gate = next(r for r in w.records() if r["event"] == "gate")
    quality = gate["results"][0]
    assert quality["status"] == "fail" and not gate["passed"]
    assert [r["gate"] for r in gate["results"]] == ["quality"]  # no SLO window after a quality failure
    assert "slot_f1" in gate["reason"] and "exact_match" in gate["reason"]
    scores = quality["details"]["scores"]
    assert scores["stable"]["exact_match"] == 1.0 and scores["candidate"]["exact_match"] == 0.0
    assert w.clock.slept == 0.0
    assert w.events()[-2:] == ["rollback", "rolled_back"]
    assert "FAIL" in w.printed[-1]


def test_garbage_candidate_fails_on_valid_mr_rate(world):
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "garbage"})
    assert w.controller().run("viggo-v2").result == "rolled_back"
    assert "valid_mr_rate 0.000 < stable 1.000" in w.records()[-2]["reason"]


def test_candidate_within_the_margin_passes_and_beyond_it_fails(world, policy, tmp_path):
    # 8 rows: one wrong row costs 0.125 exact match; margins of 0.2 allow one, not two.
    loose = policy.model_copy(update={"quality": policy.quality.model_copy(
        update={"margins": {"exact_match": 0.2, "slot_f1": 0.2}})})
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "miss1"})
    assert w.controller(policy=loose).run("viggo-v2").result == "promoted"
    w2 = World(tmp_path / "b", loose, w.rows, w.task, kinds={"viggo-v1": "good", "viggo-v2": "miss2"})
    assert w2.controller().run("viggo-v2").result == "rolled_back"


def test_erroring_candidate_is_rolled_back_by_the_slo_gate(world):
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "error"}, errors={"viggo-v2": 1.0})
    outcome = w.controller().run("viggo-v2")
    assert outcome.result == "rolled_back"
    gate = next(r for r in w.records() if r["event"] == "gate")
    quality, slo = gate["results"]
    assert quality["status"] == "inconclusive" and "candidate answered 0/8" in quality["reason"]
    assert slo["status"] == "fail" and "error rate 100.0% vs stable 0.0%" in slo["reason"]
    assert w.router.state == AliasState("viggo-v1", None, 0.0)


def test_slow_candidate_is_rolled_back_on_p95_latency(world):
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"}, latency={"viggo-v1": 0.8, "viggo-v2": 6.0})
    assert w.controller().run("viggo-v2").result == "rolled_back"
    gate = next(r for r in w.records() if r["event"] == "gate")
    assert gate["results"][1]["status"] == "fail"
    assert "p95 latency" in gate["reason"]


def test_small_error_rate_within_the_allowed_delta_passes(world, policy):
    tolerant = policy.model_copy(update={"slo": policy.slo.model_copy(update={"max_error_rate_delta": 0.05})})
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"}, errors={"viggo-v1": 0.01, "viggo-v2": 0.04})
    assert w.controller(policy=tolerant).run("viggo-v2").result == "promoted"


def test_too_little_candidate_traffic_is_inconclusive_and_rolls_back(world):
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"}, rate=0.5)  # 10% of 30 req = 3 < 5
    assert w.controller().run("viggo-v2").result == "rolled_back"
    gate = next(r for r in w.records() if r["event"] == "gate")
    assert gate["results"][1]["status"] == "inconclusive"
    assert "candidate served 3 requests" in gate["reason"]


def test_unreachable_metrics_roll_back(world):
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"})
    w.metrics.down = True
    assert w.controller().run("viggo-v2").result == "rolled_back"
    assert "metrics unavailable" in w.records()[-2]["reason"]
    assert w.router.state == AliasState("viggo-v1", None, 0.0)


def test_full_weight_step_compares_against_the_last_stable_baseline(world):
    # At 100% stable serves no alias traffic; its figures from the 50% window are used.
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"})
    w.controller().run("viggo-v2")
    last = [r for r in w.records() if r["event"] == "gate"][-1]
    slo = last["results"][1]
    assert slo["details"]["window"]["stable"]["requests"] == 0
    assert slo["details"]["stable_from_baseline"] is True and slo["status"] == "pass"


# -- starting --------------------------------------------------------------------------------


def test_start_needs_a_stable_alias(world):
    w = world(kinds={}, state=None)
    with pytest.raises(CanaryError, match="has no stable version"):
        w.controller().run("viggo-v2")
    assert w.records() == []


def test_candidate_equal_to_stable_is_refused(world):
    w = world(kinds={})
    with pytest.raises(CanaryError, match="already the stable version"):
        w.controller().run("viggo-v1")


def test_alias_split_without_a_recorded_rollout_is_refused(world):
    w = world(kinds={}, state=AliasState("viggo-v1", "viggo-v9", 30.0))
    with pytest.raises(CanaryError, match="without an unfinished rollout"):
        w.controller().run("viggo-v2")
    assert w.router.writes == []


def test_resume_without_candidate_and_nothing_unfinished_is_an_error(world):
    w = world(kinds={})
    with pytest.raises(CanaryError, match="name the candidate"):
        w.controller().run(None)


# -- kill at every side effect, then rerun ------------------------------------------------


def _uninterrupted(world, kinds, **kw):
    w = world(kinds=kinds, **kw)
    outcome = w.controller().run("viggo-v2")
    return w, outcome, w.effects.count


@pytest.mark.parametrize("kinds,expected", [
    ({"viggo-v1": "good", "viggo-v2": "good"}, "promoted"),
    ({"viggo-v1": "good", "viggo-v2": "bad"}, "rolled_back"),
])
def test_kill_between_any_two_side_effects_then_rerun_finishes_the_same(world, tmp_path, policy, rows, viggo_task,
                                                                      kinds, expected):
    _, _, total = _uninterrupted(world, kinds)
    for kill_at in range(1, total + 1):
        w = World(tmp_path / f"k{kill_at}", policy, rows, viggo_task, kinds=kinds, kill_at=kill_at)
        with pytest.raises(Crash):
            w.controller().run("viggo-v2")
        # Invariant: traffic is split only while the log names an unfinished rollout whose last
        # weight intent is at least the weight in effect.
        records = w.records()
        if w.router.state.candidate_weight > 0:
            assert records and records[-1]["event"] not in ("promoted", "rolled_back")
            intents = [r["weight"] for r in records if r["event"] == "set_weight"]
            assert intents and w.router.state.candidate_weight <= intents[-1]
        if not records:  # killed before the start record: nothing happened yet
            assert w.router.writes == []
            continue
        # The rerun (no --adapter, like after a crash) finishes from the log.
        outcome = w.controller(effects=Effects()).run(None)
        assert outcome.result == expected, kill_at
        final_stable = "viggo-v2" if expected == "promoted" else "viggo-v1"
        assert w.router.state == AliasState(final_stable, None, 0.0), kill_at
        events = w.events()
        assert events.count("start") == 1 and "resume" in events
        assert events[-1] == expected


def test_resume_after_a_passed_gate_starts_at_the_next_step(world):
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"})
    # kill right before the second set_weight record (start, sw, set, ws, gate -> 6th effect)
    w.effects.kill_at = 6
    with pytest.raises(Crash):
        w.controller().run("viggo-v2")
    assert w.events()[-1] == "gate"
    probes_before = len(w.prober.calls)
    w.controller(effects=Effects()).run("viggo-v2")  # same candidate named again: resumes
    gates = [r for r in w.records() if r["event"] == "gate"]
    assert [g["step"] for g in gates] == [0, 1, 2]
    assert len(w.prober.calls) - probes_before == 4  # steps 2 and 3 only, two versions each


def test_resume_with_on_resume_rollback_rolls_back(world, policy):
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"}, kill_at=4)  # after the first weight change
    with pytest.raises(Crash):
        w.controller().run("viggo-v2")
    assert w.router.state.candidate_weight == 10.0
    careful = policy.model_copy(update={"on_resume": "rollback"})
    outcome = w.controller(policy=careful, effects=Effects()).run(None)
    assert outcome.result == "rolled_back" and "on_resume: rollback" in outcome.reason
    assert w.router.state == AliasState("viggo-v1", None, 0.0)


def test_resume_naming_another_candidate_is_refused(world):
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"}, kill_at=4)
    with pytest.raises(Crash):
        w.controller().run("viggo-v2")
    with pytest.raises(CanaryError, match="rollout .* of viggo-v2 .* is unfinished"):
        w.controller(effects=Effects()).run("viggo-v3")


def test_live_controller_on_this_host_blocks_a_second_one(world):
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"}, kill_at=4)
    with pytest.raises(Crash):
        w.controller().run("viggo-v2")
    records = w.records()
    for r in records:
        r["owner"] = {**r["owner"], "pid": os.getppid()}  # a live process that is not us
    Path(w.uri).write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(CanaryError, match=f"controller pid {os.getppid()} is still running"):
        w.controller(effects=Effects()).run(None)


def test_a_second_controller_of_this_process_is_refused_while_the_first_drives(world):
    """Same host and pid: the owner id tells them apart (a live one refuses, a finished one resumes)."""
    import threading

    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"}, kill_at=5)  # first weight applied
    with pytest.raises(Crash):
        w.controller().run("viggo-v2")
    seen, lock = [], threading.Lock()
    probe = w.prober.probe

    def probe_and_interfere(version, rows, policy):
        with lock:
            first = not seen
            seen.append(None)
        if first:  # while the resumed controller drives, a second one of this process tries
            try:
                w.controller(effects=Effects()).run("viggo-v2")
                seen[0] = "ran"
            except CanaryError as exc:
                seen[0] = str(exc)
        return probe(version, rows, policy)

    w.prober.probe = probe_and_interfere
    assert w.controller(effects=Effects()).run("viggo-v2").result == "promoted"  # the crashed one is gone
    assert "of this process is still running rollout" in seen[0]
    # the crashed controller and the one that resumed; the refused one wrote nothing
    assert len({r["owner"]["id"] for r in w.records()}) == 2


def test_an_alias_write_that_loses_a_race_is_reread_and_checked_again(world):
    from e2e_llm.canary import RouterConflict

    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"})
    apply, refused = w.router.set, []

    def set_losing_once(alias, state):
        if not refused:
            refused.append(state)
            raise RouterConflict("alias 'viggo' is at revision 2, not 1")
        apply(alias, state)

    w.router.set = set_losing_once
    assert w.controller().run("viggo-v2").result == "promoted"
    assert refused == [AliasState("viggo-v1", "viggo-v2", 10.0)]
    assert [s.candidate_weight for s in w.router.writes] == [10.0, 50.0, 100.0, 0.0]


def test_another_hosts_controller_holds_a_lease_until_it_expires(world):
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"}, kill_at=4)
    with pytest.raises(Crash):
        w.controller().run("viggo-v2")
    records = w.records()
    for r in records:
        r["owner"] = {"host": "elsewhere", "pid": 1}
    Path(w.uri).write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(CanaryError, match="advanced by elsewhere:1"):
        w.controller(effects=Effects()).run(None)
    w.clock.t += 10_000
    assert w.controller(effects=Effects()).run(None).result == "promoted"


# -- manual commands and interference -----------------------------------------------------


def test_manual_rollback_mid_rollout(world):
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"}, kill_at=5)  # after weight_set of step 1
    with pytest.raises(Crash):
        w.controller().run("viggo-v2")
    outcome = w.controller(effects=Effects()).rollback("operator saw errors")
    assert outcome.result == "rolled_back" and outcome.reason == "operator saw errors"
    assert w.router.state == AliasState("viggo-v1", None, 0.0)
    with pytest.raises(CanaryError, match="nothing to roll back"):
        w.controller(effects=Effects()).rollback()


def test_rollback_after_promotion_reverts_to_the_previous_stable(world):
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"})
    w.controller().run("viggo-v2")
    assert w.router.state.stable == "viggo-v2"
    outcome = w.controller().rollback("regression found in production")
    assert outcome.result == "reverted"
    assert w.router.state == AliasState("viggo-v1", None, 0.0)
    assert w.events()[-2:] == ["revert", "reverted"]


def test_manual_promote_skips_the_remaining_gates(world):
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"}, kill_at=5)
    with pytest.raises(Crash):
        w.controller().run("viggo-v2")
    outcome = w.controller(effects=Effects()).promote("hotfix")
    assert outcome.result == "promoted"
    assert w.router.state == AliasState("viggo-v2", None, 0.0)
    assert "gate" not in w.events()
    with pytest.raises(CanaryError, match="no unfinished rollout"):
        w.controller(effects=Effects()).promote()


def test_another_writer_on_the_log_stops_the_controller_before_it_touches_the_alias(world):
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"})
    controller = w.controller()

    class Meddling(FakeProber):
        def probe(self, version, rows, policy):
            if version == "viggo-v2":
                with open(w.uri, "a") as f:
                    f.write(json.dumps({"rollout": "x", "alias": "other", "event": "start"}) + "\n")
            return super().probe(version, rows, policy)

    controller.prober = Meddling(w.prober.kinds, w.clock)
    with pytest.raises(ConcurrentRolloutError):
        controller.run("viggo-v2")
    assert [s.candidate_weight for s in w.router.writes] == [10.0]


def test_alias_changed_outside_the_rollout_is_left_alone(world):
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"}, kill_at=5)
    with pytest.raises(Crash):
        w.controller().run("viggo-v2")
    w.router.state = AliasState("viggo-v7", None, 0.0)  # someone published over it
    writes = len(w.router.writes)
    with pytest.raises(CanaryError, match="changed outside this rollout"):
        w.controller(effects=Effects()).run(None)
    assert len(w.router.writes) == writes and w.events()[-1] == "conflict"


def test_a_corrupt_log_line_is_reported_with_its_line(tmp_path):
    uri = tmp_path / "log.jsonl"
    uri.write_text('{"event": "start"}\nnot json\n')
    with pytest.raises(CanaryError, match=r"log.jsonl:2: corrupt rollout record"):
        RolloutLog(str(uri)).read()


# -- gates in isolation ------------------------------------------------------------------------


def test_quality_gate_scores_both_versions_with_the_task_evaluation(rows, viggo_task, policy):
    good = [Answer(r["output"]) for r in rows]
    result = quality_gate(viggo_task, rows, good, good, policy.quality)
    assert result.status == "pass"
    assert {c.metric for c in result.checks} == set(policy.quality.margins)
    half = [Answer(r["output"] if i % 2 else None, None if i % 2 else "timeout") for i, r in enumerate(rows)]
    assert quality_gate(viggo_task, rows, good, half, policy.quality).status == "inconclusive"
    assert quality_gate(viggo_task, rows, half, good, policy.quality).reason.startswith("stable answered 4/8")


def test_slo_gate_thresholds():
    from e2e_llm.canary import SLOPolicy

    slo = SLOPolicy(max_error_rate_delta=0.02, max_p95_latency_ratio=1.5, min_requests=10)
    fast = VersionStats(100, 0, {0.5: 50, 1.0: 100, math.inf: 100})
    window = {"s": fast, "c": VersionStats(20, 1, {0.5: 10, 1.0: 20, math.inf: 20})}
    result = slo_gate(window, "s", "c", slo)
    assert result.status == "fail" and "error rate 5.0% vs stable 0.0%" in result.reason
    window["c"] = VersionStats(20, 0, {0.5: 0, 1.0: 2, 2.0: 20, math.inf: 20})
    assert "p95 latency" in slo_gate(window, "s", "c", slo).reason
    window["c"] = VersionStats(20, 0, {0.5: 10, 1.0: 20, math.inf: 20})
    assert slo_gate(window, "s", "c", slo).status == "pass"
    # 2 x slower but within an absolute slack of 1.5 s: passes; beyond it: fails
    window["c"] = VersionStats(20, 0, {0.5: 0, 1.0: 2, 2.0: 20, math.inf: 20})
    slack = slo.model_copy(update={"p95_latency_slack_s": 1.5})
    assert slo_gate(window, "s", "c", slack).status == "pass"
    window["c"] = VersionStats(20, 0, {1.0: 0, 4.0: 20, math.inf: 20})
    assert "+ 1.5s" in slo_gate(window, "s", "c", slack).reason
    window["c"] = VersionStats(5, 0, {0.5: 5, math.inf: 5})
    assert slo_gate(window, "s", "c", slo).status == "inconclusive"


def test_histogram_quantile_interpolates_and_handles_resets():
    stats = VersionStats(100, 0, {0.1: 50, 1.0: 90, 10.0: 100, math.inf: 100})
    assert stats.quantile(0.5) == pytest.approx(0.1)
    assert stats.quantile(0.95) == pytest.approx(5.5)
    assert VersionStats().quantile(0.95) is None
    assert VersionStats(4, 0, {1.0: 2, math.inf: 4}).quantile(0.95) == 1.0  # in +Inf: the last finite bound
    later = VersionStats(5, 1, {0.1: 5, math.inf: 5})
    assert later.minus(stats).requests == 5  # counter went down: the process restarted
    assert VersionStats.from_dict(stats.to_dict()) == stats


def test_decision_table_lists_every_check_with_numbers(world):
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "bad"})
    w.controller().run("viggo-v2")
    table = format_gate_table([r for r in w.records() if r["event"] == "gate"])
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["step", "weight", "gate", "metric"]
    assert any(line.split()[:4] == ["1", "10%", "quality", "exact_match"] and "FAIL" in line for line in lines)
    assert "decision" in lines[-1] and "FAIL" in lines[-1]


# -- policy and canary set ------------------------------------------------------------------------


def test_shipped_policy_and_canary_set_load(project_root):
    policy = load_policy(project_root / "configs/canary.yaml")
    rows = load_canary_set(policy, project_root)
    assert len(rows) == policy.canary_set.rows <= 64
    assert policy.steps[-1] == 100


def _write_policy(tmp_path: Path, mutate) -> Path:
    data = yaml.safe_load((ROOT / "configs/canary.yaml").read_text())
    mutate(data)
    path = tmp_path / "canary.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.update(stepz=[1]), "stepz: unknown key"),
    (lambda d: d.update(steps=[50, 10]), "steps must increase strictly"),
    (lambda d: d.update(steps=[0, 100]), "percentage in 1..100"),
    (lambda d: d["quality"].update(max_tokens=16), "below the canary set's longest reference"),
    (lambda d: d["quality"]["margins"].update(bleu=0.1), "margins.bleu"),
    (lambda d: d["slo"].update(max_p95_latency_ratio=0.5), "max_p95_latency_ratio"),
    (lambda d: d["canary_set"].update(sha256="xyz"), "canary_set.sha256"),
])
def test_bad_policies_are_rejected_naming_the_key(tmp_path, mutate, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_policy(_write_policy(tmp_path, mutate))
    assert "canary.yaml:" in str(err.value)


def test_canary_set_with_a_different_sha_is_rejected(tmp_path):
    path = _write_policy(tmp_path, lambda d: d["canary_set"].update(sha256="0" * 64))
    with pytest.raises(ConfigError, match="does not match canary_set.sha256"):
        load_canary_set(load_policy(path), ROOT)


def test_canary_selection_is_deterministic_and_covers_every_function(viggo_task):
    from e2e_llm.data import read_jsonl

    val = read_jsonl(ROOT.parent / "shared/data/viggo/val.jsonl") if (ROOT.parent / "shared/data/viggo").is_dir() \
        else None
    if val is None:
        pytest.skip("VIGGO data not beside the checkout")
    first = select_canary_rows(val, viggo_task, 24)
    assert first == select_canary_rows(list(reversed(val)), viggo_task, 24)
    functions = {viggo_task.parse(r["output"]).function for r in first}
    assert functions == {viggo_task.parse(r["output"]).function for r in val}


def test_committed_canary_set_regenerates_from_the_clean_val_split(tmp_path, local_config, viggo_task, viggo_dir):
    from e2e_llm.canary import write_canary_set
    from e2e_llm.data import ingest, read_jsonl

    # The clean val split, as `e2e-llm data --profile local` writes it (val only: train is not needed).
    ingest(source=str(viggo_dir), splits={"val": local_config.data.splits["val"]}, output_dir=tmp_path / "data",
           task=viggo_task, dataset=local_config.data.dataset, fmt=local_config.data.format, required=["val"])
    val = tmp_path / "data" / "val.jsonl"
    policy = load_policy(ROOT / "configs/canary.yaml")
    spec = write_canary_set(read_jsonl(val), viggo_task, policy.canary_set.rows, tmp_path / "set.jsonl", "v1",
                            lambda text: 1)
    assert spec["sha256"] == policy.canary_set.sha256
