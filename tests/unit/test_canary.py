# SPDX-License-Identifier: Apache-2.0
"""The canary controller's state machine against fakes: gates, decisions, rollback, promotion,
manual commands, and recovery from a kill between any two of its side effects."""

from __future__ import annotations

import hashlib
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
    PreflightResult,
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
    """Answers per version: 'good' (the reference), 'bad' (a wrong MR), 'garbage', 'error',
    'miss<k>' (the first k rows wrong). A call takes ``latency[version]`` seconds (default
    ``seconds``) of the fake clock; past its ``timeout_s`` every answer of the call times out.
    Rows whose input is in ``late[version]`` time out on their first probe only."""

    def __init__(self, kinds: dict[str, str], clock: FakeClock, seconds: float = 5.0,
                 latency: dict[str, float] | None = None, late: dict[str, set[str]] | None = None):
        self.kinds = kinds
        self.clock = clock
        self.seconds = seconds
        self.latency = latency or {}
        self.late = late or {}
        self.calls: list[str] = []
        self.timeouts: list[float] = []

    def probe(self, version, rows, policy, timeout_s):
        self.calls.append(version)
        self.timeouts.append(timeout_s)
        took = self.latency.get(version, self.seconds)
        self.clock.t += min(took, timeout_s)
        if took > timeout_s:
            return [Answer(None, f"APITimeoutError: no answer in {timeout_s:g}s", timeout_s, timed_out=True)
                    for _ in rows]
        answers = self._answers(version, rows)
        late = self.late.get(version, set())
        for i, row in enumerate(rows):
            answers[i].latency_s = took
            if row["input"] in late:
                late.discard(row["input"])
                answers[i] = Answer(None, "APITimeoutError: late", timeout_s, timed_out=True)
        return answers

    def _answers(self, version, rows):
        kind = self.kinds[version]
        if kind == "error":
            return [Answer(None, "InternalServerError: adapter failed to load") for _ in rows]
        if kind == "garbage":
            return [Answer("lorem ipsum dolor") for _ in rows]
        if kind == "bad":
            return [Answer("inform(name[Nothing])") for _ in rows]
        if kind.startswith("miss"):  # miss<k>: the first k rows of the call wrong
            k = int(kind[4:])
            return [Answer("inform(name[Nothing])" if i < k else r["output"]) for i, r in enumerate(rows)]
        return [Answer(r["output"]) for r in rows]


class FakePreflight:
    """The ingress preflight: ok unless the version is in ``fail`` (with that reason); raises
    ``raises`` if set (the check itself broke)."""

    def __init__(self, fail: dict[str, str] | None = None, raises: BaseException | None = None):
        self.fail = fail or {}
        self.raises = raises
        self.calls: list[tuple[str, str, float, int]] = []

    def check(self, version, row, deadline_s, max_tokens):
        self.calls.append((version, row["input"], deadline_s, max_tokens))
        if self.raises is not None:
            raise self.raises
        if version in self.fail:
            return PreflightResult(False, self.fail[version], [
                {"replica": "engine-0", "ok": False, "reason": self.fail[version], "latency_s": 0.4}])
        return PreflightResult(True, None, [{"replica": "engine-0", "ok": True, "reason": None, "latency_s": 0.4}])


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

    def set_rate(self, rate: float) -> None:
        """Alias traffic at ``rate`` from now on (until now at the old rate)."""
        down, self.down = self.down, False
        self.snapshot()
        self.down, self.rate = down, rate

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


class FakeTraffic:
    """Synthetic alias traffic: adds ``rate`` req/s to the metrics while running; records every
    start and stop and whether it was running when a probe was sent."""

    def __init__(self, metrics: FakeMetrics, rate: float):
        self.metrics, self.rate, self.clients = metrics, rate, 2
        self.running = False
        self.starts = self.stops = 0
        self.since = 0.0

    def start(self):
        assert not self.running
        self.running, self.starts, self.since = True, self.starts + 1, self.metrics.clock.now()
        self.metrics.set_rate(self.metrics.rate + self.rate)

    def stop(self):
        assert self.running
        self.running, self.stops = False, self.stops + 1
        self.metrics.set_rate(self.metrics.rate - self.rate)
        sent = (self.metrics.clock.now() - self.since) * self.rate
        return {"clients": self.clients, "requests": sent, "ok": sent, "failed": 0, "failures": [], "still_running": 0}


# -- fixtures --------------------------------------------------------------------------------

# Side effects before the first weight intent: the preflight and shadow records (the kill points
# below count as before they existed, plus PRE: start, set_weight, alias set, weight_set ...).
PRE = 2


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
                 kill_at=None, state=STABLE, rate=2.0, preflight=None, probe_latency=None, late=None,
                 synthetic_rate=None):
        self.tmp_path, self.policy, self.rows, self.task = tmp_path, policy, rows, task
        self.effects = Effects(kill_at)
        self.clock = FakeClock()
        self.router = FakeRouter(state, self.effects)
        self.prober = FakeProber(kinds, self.clock, latency=probe_latency, late=late)
        self.preflight = preflight or FakePreflight()
        self.metrics = FakeMetrics(self.router, self.clock, rate=rate, errors=errors, latency=latency)
        self.traffic = None if synthetic_rate is None else FakeTraffic(self.metrics, synthetic_rate)
        self.printed: list[str] = []
        self.uri = str(tmp_path / "store" / "rollouts-viggo.jsonl")

    def controller(self, policy=None, effects=None) -> Controller:
        log = CrashingLog(self.uri, effects or self.effects)
        return Controller(policy=policy or self.policy, task=self.task, canary_rows=self.rows, log=log,
                          router=self.router, prober=self.prober, metrics=self.metrics, clock=self.clock,
                          out=self.printed.append, preflight=self.preflight, traffic=self.traffic)

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
    assert w.events() == ["start", "preflight", "shadow", "set_weight", "weight_set", "gate", "set_weight",
                          "weight_set", "gate", "set_weight", "weight_set", "gate", "promote", "promoted"]
    # preflight with the first canary row, before any traffic
    assert w.preflight.calls == [("viggo-v2", w.rows[0]["input"], 180.0, 8)]
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


def test_worse_candidate_is_rejected_by_the_shadow_quality_gate_before_any_traffic(world):
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "bad"})
    outcome = w.controller().run("viggo-v2")
    assert outcome.result == "rejected"
    assert w.router.writes == [] and w.router.state is STABLE
    assert w.events() == ["start", "preflight", "shadow", "rejected"]
    shadow = w.records()[2]
    quality = shadow["results"][0]
    assert shadow["weight"] == 0 and not shadow["passed"] and quality["status"] == "fail"
    assert "slot_f1" in shadow["reason"] and "exact_match" in shadow["reason"]
    scores = quality["details"]["scores"]
    assert scores["stable"]["exact_match"] == 1.0 and scores["candidate"]["exact_match"] == 0.0
    assert outcome.reason == shadow["reason"] == w.records()[-1]["reason"]
    assert w.clock.slept == 0.0
    assert "shadow" in w.printed[-1] and "FAIL" in w.printed[-1]


def test_quality_failing_at_a_step_rolls_back_without_waiting_the_window(world, policy):
    no_shadow = policy.model_copy(update={"shadow": False})
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "bad"})
    outcome = w.controller(policy=no_shadow).run("viggo-v2")
    assert outcome.result == "rolled_back"
    assert w.router.state == AliasState("viggo-v1", None, 0.0)
    assert [s.candidate_weight for s in w.router.writes] == [10.0, 0.0]
    gate = next(r for r in w.records() if r["event"] == "gate")
    assert [r["gate"] for r in gate["results"]] == ["quality"]  # no SLO window after a quality failure
    assert w.clock.slept == 0.0
    assert w.events()[-2:] == ["rollback", "rolled_back"]


def test_garbage_candidate_fails_on_valid_mr_rate(world):
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "garbage"})
    assert w.controller().run("viggo-v2").result == "rejected"
    assert "valid_mr_rate 0.000 < stable 1.000" in w.records()[-2]["reason"]


def test_candidate_within_the_margin_passes_and_beyond_it_fails(world, policy, tmp_path):
    # 8 rows: one wrong row costs 0.125 exact match; margins of 0.2 allow one, not two.
    loose = policy.model_copy(update={"quality": policy.quality.model_copy(
        update={"margins": {"exact_match": 0.2, "slot_f1": 0.2}})})
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "miss1"})
    assert w.controller(policy=loose).run("viggo-v2").result == "promoted"
    w2 = World(tmp_path / "b", loose, w.rows, w.task, kinds={"viggo-v1": "good", "viggo-v2": "miss2"})
    assert w2.controller().run("viggo-v2").result == "rejected"


@pytest.mark.parametrize("kind,chunks", [
    ("error", 1),  # 0 of 2 answered: 8 rows allow none unanswered, certain after one chunk
    # wrong answers: after 4 of 8 rows its slot F1 (0.474 < 0.780 - 0.05) fails even with the
    # other 4 rows perfect for it and unanswered for stable
    ("bad", 2),
])
def test_a_step_ends_as_soon_as_its_quality_outcome_is_certain(world, policy, kind, chunks):
    chunked = policy.model_copy(update={"shadow": False,
                                        "quality": policy.quality.model_copy(update={"concurrency": 2})})
    w = world(kinds={"viggo-v1": "good", "viggo-v2": kind})
    start = w.clock.now()
    assert w.controller(policy=chunked).run("viggo-v2").result == "rolled_back"
    assert w.prober.calls == ["viggo-v1", "viggo-v2"] * chunks  # of 4 chunks
    assert w.clock.now() - start == pytest.approx(chunks * 2 * 5.0) and w.clock.slept == 0.0  # no SLO window
    gate = next(r for r in w.records() if r["event"] == "gate")
    assert gate["results"][0]["details"]["probed"] == 2 * chunks and gate["results"][0]["details"]["certain"]
    assert [s.candidate_weight for s in w.router.writes] == [10.0, 0.0]


def test_erroring_alias_traffic_ends_the_step_as_soon_as_the_error_budget_is_spent(world):
    # answers the probes, fails every user request
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"}, errors={"viggo-v2": 1.0})
    outcome = w.controller().run("viggo-v2")
    assert outcome.result == "rolled_back"
    gate = next(r for r in w.records() if r["event"] == "gate")
    quality, slo = gate["results"]
    assert quality["status"] == "pass"
    assert slo["status"] == "fail" and slo["details"]["ended_early"] is True
    # the first scrape, 15 s into the 60 s window: 3 requests, 3 errors, far beyond 2% of the window
    assert "error budget spent after 15s of the 60s window: candidate 3 errors in 3 requests" in slo["reason"]
    assert w.clock.slept == pytest.approx(10.0 + 15.0)
    assert w.router.state == AliasState("viggo-v1", None, 0.0)


def test_a_few_errors_within_the_budget_do_not_end_the_window(world, policy):
    tolerant = policy.model_copy(update={"slo": policy.slo.model_copy(update={"max_error_rate_delta": 0.05})})
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"}, errors={"viggo-v1": 0.01, "viggo-v2": 0.04})
    assert w.controller(policy=tolerant).run("viggo-v2").result == "promoted"
    assert w.clock.slept == pytest.approx(3 * 70.0)  # every window ran to its end


def test_slow_candidate_is_rolled_back_on_p95_latency(world):
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"}, latency={"viggo-v1": 0.8, "viggo-v2": 6.0})
    assert w.controller().run("viggo-v2").result == "rolled_back"
    gate = next(r for r in w.records() if r["event"] == "gate")
    assert gate["results"][1]["status"] == "fail"
    assert "p95 latency" in gate["reason"]


def test_too_little_candidate_traffic_is_inconclusive_and_rolls_back(world, policy):
    fixed = policy.model_copy(update={"slo": policy.slo.model_copy(update={"max_window_s": None})})
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"}, rate=0.5)  # 10% of 30 req = 3 < 5
    assert w.controller(policy=fixed).run("viggo-v2").result == "rolled_back"
    gate = next(r for r in w.records() if r["event"] == "gate")
    assert gate["results"][1]["status"] == "inconclusive"
    assert "candidate served 3 requests" in gate["reason"]
    # with the window extended (max_window_s) too, it stays inconclusive once that is over
    short = policy.model_copy(update={"slo": policy.slo.model_copy(update={"max_window_s": 90.0})})
    w2 = world(kinds={"viggo-v1": "good", "viggo-v2": "good"}, rate=0.5)
    w2.uri += ".2"
    assert w2.controller(policy=short).run("viggo-v2").result == "rolled_back"
    slo = next(r for r in w2.records() if r["event"] == "gate")["results"][1]
    assert slo["status"] == "inconclusive" and slo["details"]["window_s"] == 90.0


def test_a_candidate_erroring_during_the_low_traffic_extension_is_not_kept_serving(world, policy):
    patient = policy.model_copy(update={"slo": policy.slo.model_copy(update={"max_window_s": 600.0})})
    # 10% of 0.5 req/s: 3 requests in the 60 s window, too few: the window is extended ...
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"}, rate=0.5)
    snapshot, taken = w.metrics.snapshot, []

    def failing_after_the_window():
        taken.append(None)
        if len(taken) > 5:  # before, 15, 30, 45, 60 s: then the candidate starts failing
            w.metrics.errors = {"viggo-v2": 1.0}
        return snapshot()

    w.metrics.snapshot = failing_after_the_window
    assert w.controller(policy=patient).run("viggo-v2").result == "rolled_back"
    slo = next(r for r in w.records() if r["event"] == "gate")["results"][1]
    # ... and ends once its errors exceed the extended window's budget (at 90 s: 1.5 errors, more
    # than 2% of 4.5 requests x 2 x 600/90), not after 600 s
    assert slo["status"] == "fail" and slo["details"]["ended_early"] is True
    assert "error budget spent after 90s of the 600s window: candidate 1.5 errors in 4.5 requests" in slo["reason"]


def test_too_little_traffic_extends_the_window_up_to_max_window_s(world, policy):
    patient = policy.model_copy(update={"slo": policy.slo.model_copy(update={"max_window_s": 120.0})})
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"}, rate=0.5)  # 10%: 3 requests in 60 s, 5 by 105 s
    assert w.controller(policy=patient).run("viggo-v2").result == "promoted"
    first = [r for r in w.records() if r["event"] == "gate"][0]["results"][1]
    assert first["status"] == "pass" and first["details"]["window_s"] == 105.0


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


# -- before any traffic: preflight, shadow quality ----------------------------------------------


def test_failing_preflight_rejects_the_candidate_and_never_writes_the_alias(world):
    reason = "2 of 2 engine replica(s) failed: engine-0: adapter viggo-v2 failed to load: safetensors header corrupt"
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"}, preflight=FakePreflight({"viggo-v2": reason}))
    before = repr(w.router.state)
    outcome = w.controller().run("viggo-v2")
    assert outcome.result == "rejected" and reason in outcome.reason
    # the alias: never written, byte-identical; no intent that moves weight; no probe sent
    assert w.router.writes == [] and repr(w.router.state) == before
    assert w.events() == ["start", "preflight", "rejected"]
    assert w.prober.calls == []
    preflight = w.records()[1]
    assert preflight["passed"] is False and reason in preflight["reason"]
    assert preflight["results"][0]["checks"][0]["metric"] == "engine-0"
    assert reason in w.records()[-1]["reason"]
    # ... and in the decision table
    assert "preflight" in w.printed[-1] and "FAIL" in w.printed[-1] and "failed to load" in w.printed[-1]


def test_a_preflight_that_cannot_run_is_a_rejection_with_the_reason_not_a_crash(world):
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"},
              preflight=FakePreflight(raises=ConnectionRefusedError(111, "Connection refused")))
    outcome = w.controller().run("viggo-v2")
    assert outcome.result == "rejected"
    assert "preflight failed: ConnectionRefusedError" in outcome.reason and "Connection refused" in outcome.reason
    assert w.router.writes == []


def test_an_ok_preflight_naming_no_replica_is_a_rejection(world):
    class Empty(FakePreflight):
        def check(self, version, row, deadline_s, max_tokens):
            return PreflightResult(True, None, [])

    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"}, preflight=Empty())
    assert w.controller().run("viggo-v2").result == "rejected"
    assert "named no engine replica" in w.records()[-1]["reason"]


def test_a_policy_with_a_preflight_needs_a_controller_that_can_run_it(world, policy):
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"})
    controller = w.controller()
    controller.preflight = None
    with pytest.raises(CanaryError, match="asks for a preflight"):
        controller.run("viggo-v2")
    assert w.records() == []
    unchecked = policy.model_copy(update={"preflight": policy.preflight.model_copy(update={"enabled": False})})
    controller = w.controller(policy=unchecked)
    controller.preflight = None
    assert controller.run("viggo-v2").result == "promoted"
    assert w.events()[:2] == ["start", "shadow"]


def test_a_resumed_rollout_asking_for_a_preflight_this_controller_cannot_run_is_rejected(world):
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"}, kill_at=2)  # after start, before the preflight
    with pytest.raises(Crash):
        w.controller().run("viggo-v2")
    controller = w.controller(effects=Effects())
    controller.preflight = None
    outcome = controller.run(None)
    assert outcome.result == "rejected" and "this controller has none" in outcome.reason
    assert w.router.writes == []


def test_a_candidate_answering_nothing_is_rejected_after_the_first_chunk(world, policy):
    chunked = policy.model_copy(update={"quality": policy.quality.model_copy(update={"concurrency": 2})})
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "error"})
    outcome = w.controller(policy=chunked).run("viggo-v2")
    assert outcome.result == "rejected"
    # 0 of 2 answered: 8 rows allow none unanswered, so the outcome is certain after one chunk
    assert w.prober.calls == ["viggo-v1", "viggo-v2"]
    assert "candidate answered 0 of 2 canary probes, stable 2" in outcome.reason
    assert w.router.writes == []


def test_manual_rollback_before_any_traffic_rejects_without_writing_the_alias(world):
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"}, kill_at=3)  # before the shadow record
    with pytest.raises(Crash):
        w.controller().run("viggo-v2")
    outcome = w.controller(effects=Effects()).rollback("operator stopped it")
    assert outcome.result == "rejected" and outcome.reason == "operator stopped it"
    assert w.router.writes == [] and w.events()[-1] == "rejected"


# -- probe deadlines, retries, deciding on what answered ------------------------------------------


def test_candidate_probe_deadline_follows_stables_latency_under_load(world, policy):
    # A busy machine: stable takes 50 s a chunk. The candidate, 70 s, is within 3 x stable.
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"}, probe_latency={"viggo-v1": 50.0, "viggo-v2": 70.0})
    slow_ok = policy.model_copy(update={"quality": policy.quality.model_copy(update={"timeout_s": 300.0})})
    assert w.controller(policy=slow_ok).run("viggo-v2").result == "promoted"
    assert w.prober.timeouts[:2] == [300.0, 150.0]  # stable: the cap; candidate: 3 x 50 s
    # A candidate 4 x slower than stable under the same load runs past its deadline, twice
    w2 = world(kinds={"viggo-v1": "good", "viggo-v2": "good"}, probe_latency={"viggo-v1": 50.0, "viggo-v2": 200.0})
    w2.uri += ".2"
    outcome = w2.controller(policy=slow_ok).run("viggo-v2")
    assert outcome.result == "rejected" and "candidate answered 0 of 8" in outcome.reason
    assert w2.prober.calls == ["viggo-v1", "viggo-v2", "viggo-v2"]  # the timed-out probes were sent again once
    assert "APITimeoutError" in outcome.reason


def test_a_timed_out_probe_is_retried_once_and_its_answer_counts(world, rows):
    late = {"viggo-v2": {rows[0]["input"], rows[3]["input"]}}
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"}, late=late)
    assert w.controller().run("viggo-v2").result == "promoted"
    shadow = w.records()[2]["results"][0]
    assert shadow["status"] == "pass" and shadow["details"]["retried"] == 2
    assert shadow["details"]["answered"] == {"stable": 8, "candidate": 8}
    assert w.prober.calls[:3] == ["viggo-v1", "viggo-v2", "viggo-v2"]


def test_garbage_with_an_unanswered_probe_fails_on_its_measured_quality(rows, viggo_task, policy):
    stable = [Answer(r["output"]) for r in rows]
    garbage = [Answer("lorem ipsum") for _ in rows[:-1]] + [Answer(None, "APITimeoutError", timed_out=True)]
    result = quality_gate(viggo_task, rows, stable, garbage, policy.quality)
    # even with the unanswered row counted as perfect, 7 garbage rows are far below stable: a
    # quality failure, decided on the answers (not "inconclusive" for the missing one)
    assert result.status == "fail" and result.details["certain"]
    assert result.reason.startswith("exact_match 0.125 < stable 1.000")
    assert "valid_mr_rate 0.125 < stable 1.000" in result.reason


def test_an_unanswered_row_decides_nothing_unless_it_can_flip_the_outcome(rows, viggo_task, policy):
    lenient = policy.quality.model_copy(update={"min_answered": 0.75, "margins": {"exact_match": 0.2}})
    stable = [Answer(r["output"]) for r in rows]
    one_missing = [Answer(r["output"]) for r in rows[:-1]] + [Answer(None, "APITimeoutError", timed_out=True)]
    # counted wrong, exact match 0.875 >= 1.0 - 0.2: passes whatever that row would have said
    assert quality_gate(viggo_task, rows, stable, one_missing, lenient).status == "pass"
    # with a margin of 0.1 that row decides: undecided, inconclusive (rolls back, named as such)
    tight = lenient.model_copy(update={"margins": {"exact_match": 0.1}})
    result = quality_gate(viggo_task, rows, stable, one_missing, tight)
    assert result.status == "inconclusive" and result.reason.startswith("undecided: 1 candidate")
    assert result.details["bounds"]["worst"]["candidate"]["exact_match"] == 0.875


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


@pytest.mark.parametrize("kinds,errors,preflight,expected", [
    ({"viggo-v1": "good", "viggo-v2": "good"}, None, None, "promoted"),
    ({"viggo-v1": "good", "viggo-v2": "good"}, {"viggo-v2": 1.0}, None, "rolled_back"),  # by the SLO gate
    ({"viggo-v1": "good", "viggo-v2": "bad"}, None, None, "rejected"),  # by the shadow quality gate
    ({"viggo-v1": "good", "viggo-v2": "good"}, None, {"viggo-v2": "adapter failed to load"}, "rejected"),
])
def test_kill_between_any_two_side_effects_then_rerun_finishes_the_same(world, tmp_path, policy, rows, viggo_task,
                                                                      kinds, errors, preflight, expected):
    _, _, total = _uninterrupted(world, kinds, errors=errors, preflight=FakePreflight(preflight))
    for kill_at in range(1, total + 1):
        w = World(tmp_path / f"k{kill_at}", policy, rows, viggo_task, kinds=kinds, kill_at=kill_at, errors=errors,
                  preflight=FakePreflight(preflight))
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
        if expected == "rejected":  # the alias was never written, whatever the kill point
            assert w.router.writes == [], kill_at


def test_resume_after_a_passed_gate_starts_at_the_next_step(world):
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"})
    # kill right before the second set_weight record (start, sw, set, ws, gate -> 6th effect + PRE)
    w.effects.kill_at = PRE + 6
    with pytest.raises(Crash):
        w.controller().run("viggo-v2")
    assert w.events()[-1] == "gate"
    probes_before = len(w.prober.calls)
    w.controller(effects=Effects()).run("viggo-v2")  # same candidate named again: resumes
    gates = [r for r in w.records() if r["event"] == "gate"]
    assert [g["step"] for g in gates] == [0, 1, 2]
    assert len(w.prober.calls) - probes_before == 4  # steps 2 and 3 only, two versions each


def test_resume_with_on_resume_rollback_rolls_back(world, policy):
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"}, kill_at=PRE + 4)  # after the first weight change
    with pytest.raises(Crash):
        w.controller().run("viggo-v2")
    assert w.router.state.candidate_weight == 10.0
    careful = policy.model_copy(update={"on_resume": "rollback"})
    outcome = w.controller(policy=careful, effects=Effects()).run(None)
    assert outcome.result == "rolled_back" and "on_resume: rollback" in outcome.reason
    assert w.router.state == AliasState("viggo-v1", None, 0.0)


def test_resume_naming_another_candidate_is_refused(world):
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"}, kill_at=PRE + 4)
    with pytest.raises(Crash):
        w.controller().run("viggo-v2")
    with pytest.raises(CanaryError, match="rollout .* of viggo-v2 .* is unfinished"):
        w.controller(effects=Effects()).run("viggo-v3")


def test_live_controller_on_this_host_blocks_a_second_one(world):
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"}, kill_at=PRE + 4)
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

    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"}, kill_at=PRE + 5)  # first weight applied
    with pytest.raises(Crash):
        w.controller().run("viggo-v2")
    seen, lock = [], threading.Lock()
    probe = w.prober.probe

    def probe_and_interfere(version, rows, policy, timeout_s):
        with lock:
            first = not seen
            seen.append(None)
        if first:  # while the resumed controller drives, a second one of this process tries
            try:
                w.controller(effects=Effects()).run("viggo-v2")
                seen[0] = "ran"
            except CanaryError as exc:
                seen[0] = str(exc)
        return probe(version, rows, policy, timeout_s)

    w.prober.probe = probe_and_interfere
    outcome = w.controller(effects=Effects()).run("viggo-v2")
    assert outcome.result == "promoted", outcome.reason  # the crashed one is gone
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
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"}, kill_at=PRE + 4)
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
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"}, kill_at=PRE + 5)  # after weight_set of step 1
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
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"}, kill_at=PRE + 5)
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
        def probe(self, version, rows, policy, timeout_s):
            if version == "viggo-v2" and len(self.calls) > 2:  # after the shadow gate: in step 1
                with open(w.uri, "a") as f:
                    f.write(json.dumps({"rollout": "x", "alias": "other", "event": "start"}) + "\n")
            return super().probe(version, rows, policy, timeout_s)

    controller.prober = Meddling(w.prober.kinds, w.clock)
    with pytest.raises(ConcurrentRolloutError):
        controller.run("viggo-v2")
    assert [s.candidate_weight for s in w.router.writes] == [10.0]


def test_alias_changed_outside_the_rollout_is_left_alone(world):
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"}, kill_at=PRE + 5)
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
    assert {c.metric for c in result.checks} == {"answered", *policy.quality.margins}
    half = [Answer(r["output"] if i % 2 else None, None if i % 2 else "timeout") for i, r in enumerate(rows)]
    # the candidate leaves rows unanswered that stable answers: it fails
    unanswering = quality_gate(viggo_task, rows, good, half, policy.quality)
    assert unanswering.status == "fail" and unanswering.reason.startswith("candidate answered 4 of 8 canary probes")
    # stable does not answer: the gate cannot judge
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
    rollout = w.controller().current()
    table = format_gate_table(rollout.gates())
    lines = table.splitlines()
    assert [line.split()[0] for line in lines if "decision" in line] == ["preflight", "shadow"]
    assert any(line.split()[:4] == ["preflight", "0%", "preflight", "engine-0"] and "pass" in line for line in lines)
    assert lines[0].split()[:4] == ["step", "weight", "gate", "metric"]
    assert any(line.split()[:4] == ["shadow", "0%", "quality", "exact_match"] and "FAIL" in line for line in lines)
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
    (lambda d: d["quality"].update(min_timeout_s=400), "min_timeout_s 400 exceeds timeout_s 300"),
    (lambda d: d["quality"].update(deadline_factor=0.5), "quality.deadline_factor"),
    (lambda d: d["quality"].update(retries=9), "quality.retries"),
    (lambda d: d["slo"].update(max_window_s=60), "slo.max_window_s 60 is below step_window_s 120"),
    (lambda d: d["slo"].update(poll_s=0), "slo.poll_s"),
    (lambda d: d["preflight"].update(deadline_s=0), "preflight.deadline_s"),
    (lambda d: d["preflight"].update(deadlin_s=5), "preflight.deadlin_s: unknown key"),
    (lambda d: d.update(shadow="sometimes"), "shadow"),
])
def test_bad_policies_are_rejected_naming_the_key(tmp_path, mutate, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_policy(_write_policy(tmp_path, mutate))
    assert "canary.yaml:" in str(err.value)


def test_a_policy_written_before_the_new_knobs_loads_with_their_defaults(tmp_path):
    def strip(d):
        for key in ("preflight", "shadow"):
            d.pop(key)
        for key in ("deadline_factor", "min_timeout_s", "retries"):
            d["quality"].pop(key)
        for key in ("poll_s", "budget_rate_factor", "max_window_s"):
            d["slo"].pop(key)

    policy = load_policy(_write_policy(tmp_path, strip))
    assert policy.pretraffic() == ["preflight", "shadow"]
    assert (policy.preflight.deadline_s, policy.quality.retries, policy.slo.max_window_s) == (180.0, 1, None)


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
           task=viggo_task, dataset=local_config.data.dataset, fmt=local_config.data.format, required=["val"],
           system_prompt=local_config.data.system_prompt)
    val = tmp_path / "data" / "val.jsonl"
    policy = load_policy(ROOT / "configs/canary.yaml")
    spec = write_canary_set(read_jsonl(val), viggo_task, policy.canary_set.rows, tmp_path / "set.jsonl", "v2",
                            lambda text: 1)
    assert spec["sha256"] == policy.canary_set.sha256
    assert len(load_canary_set(policy, ROOT, local_config.data.system_prompt)) == policy.canary_set.rows

    # The same version again: the same file. Other rows under its name: refused, the file kept.
    assert write_canary_set(read_jsonl(val), viggo_task, policy.canary_set.rows, tmp_path / "set.jsonl", "v2",
                            lambda text: 1) == spec
    with pytest.raises(ConfigError, match=r"set.jsonl exists with other rows .* pick a new --version"):
        other_prompt = [{**row, "instruction": "Another prompt."} for row in read_jsonl(val)]
        write_canary_set(other_prompt, viggo_task, policy.canary_set.rows, tmp_path / "set.jsonl", "v2",
                         lambda text: 1)
    assert hashlib.sha256((tmp_path / "set.jsonl").read_bytes()).hexdigest() == policy.canary_set.sha256


def test_a_canary_set_asking_with_another_system_prompt_is_rejected_naming_the_line(tmp_path):
    import hashlib

    rows = [json.dumps({"instruction": "Write the MR.", "input": f"Row {i}.", "output": "inform(name[X])"})
            for i in range(3)]
    rows[1] = rows[1].replace("Write the MR.", "A long old instruction.")
    text = "\n".join(rows) + "\n"
    (tmp_path / "set.jsonl").write_text(text)
    path = _write_policy(tmp_path, lambda d: d["canary_set"].update(
        path=str(tmp_path / "set.jsonl"), rows=3, sha256=hashlib.sha256(text.encode()).hexdigest()))
    assert len(load_canary_set(load_policy(path), ROOT, None)) == 3
    with pytest.raises(ConfigError, match=rf"{tmp_path}/set.jsonl:2: instruction is not the profile's "
                                          r"data.system_prompt 'Write the MR.'"):
        load_canary_set(load_policy(path), ROOT, "Write the MR.")


def test_a_canary_set_made_for_another_task_is_rejected_naming_the_line(local_config, viggo_task):
    """A profile for another task that keeps the default policy would score every candidate on
    VIGGO rows, and roll every one back: the set's references must be the profile's task's."""
    from e2e_llm.task import TaskSchema

    home = TaskSchema.model_validate({"name": "home", "functions": {"set_state": {}},
                                      "attributes": {"device": {}, "state": {"values": ["on", "off"]}}})
    policy = load_policy(ROOT / "configs/canary.yaml")
    assert len(load_canary_set(policy, ROOT, local_config.data.system_prompt, viggo_task)) == policy.canary_set.rows
    with pytest.raises(ConfigError, match=r"viggo-v2.jsonl:1: output is not a meaning representation of the "
                                          r"profile's task 'home' \(.*\); make this task's set"):
        load_canary_set(policy, ROOT, local_config.data.system_prompt, home)


# -- the shipped policy on the local profile, and the exit status ---------------------------------


def test_shipped_policy_promotes_a_copy_of_stable_at_the_local_profiles_measured_rates(tmp_path, rows, viggo_task):
    """The issue's run on 2 cores, as numbers: ~0.2 alias requests/s under 6 clients, probes of 8
    rows taking 100 s for stable and 130 s for the candidate (past the old fixed 120 s), 3 rows
    timing out on their first try. The shipped policy promotes the good copy."""
    shipped = load_policy(ROOT / "configs/canary.yaml")
    all_rows = load_canary_set(shipped, ROOT)
    late = {"viggo-v2": {r["input"] for r in all_rows[:3]}}
    w = World(tmp_path, shipped, all_rows, viggo_task, kinds={"viggo-v1": "good", "viggo-v2": "good"}, rate=0.2,
              probe_latency={"viggo-v1": 100.0, "viggo-v2": 130.0}, late=late)
    outcome = w.controller().run("viggo-v2")
    assert outcome.result == "promoted", outcome.reason
    shadow = w.records()[2]["results"][0]
    assert shadow["details"]["answered"] == {"stable": 24, "candidate": 24} and shadow["details"]["retried"] == 3
    first = [r for r in w.records() if r["event"] == "gate"][0]["results"][1]
    # 10% of 0.2 req/s: the window was extended until the candidate had served min_requests
    assert first["status"] == "pass" and shipped.step_window_s < first["details"]["window_s"] <= 600
    print(f"simulated rollout: {w.clock.t - 1_000_000.0:.0f} s, first window {first['details']['window_s']} s")


def test_shipped_policy_rolls_back_when_nobody_calls_the_alias(tmp_path, rows, viggo_task):
    """Why the local profile sends synthetic traffic: without requests a window is inconclusive
    after its longest extension, and that rolls a good copy back."""
    shipped = load_policy(ROOT / "configs/canary.yaml")
    w = World(tmp_path, shipped, load_canary_set(shipped, ROOT), viggo_task,
              kinds={"viggo-v1": "good", "viggo-v2": "good"}, rate=0.0)
    outcome = w.controller().run("viggo-v2")
    assert outcome.result == "rolled_back"
    slo = [r for r in w.records() if r["event"] == "gate"][0]["results"][1]
    assert slo["status"] == "inconclusive" and "served 0 requests" in slo["reason"]
    assert slo["details"]["window_s"] == pytest.approx(shipped.slo.max_window_s)


def test_synthetic_traffic_runs_in_each_slo_window_only_and_lets_the_shipped_policy_promote(
        tmp_path, rows, viggo_task):
    shipped = load_policy(ROOT / "configs/canary.yaml")
    w = World(tmp_path, shipped, load_canary_set(shipped, ROOT), viggo_task,
              kinds={"viggo-v1": "good", "viggo-v2": "good"}, rate=0.0, synthetic_rate=0.5)
    probed_while_running = []
    probe = w.prober.probe
    w.prober.probe = lambda *a, **kw: probed_while_running.append(w.traffic.running) or probe(*a, **kw)
    outcome = w.controller().run("viggo-v2")
    assert outcome.result == "promoted", outcome.reason
    assert w.traffic.starts == w.traffic.stops == len(shipped.steps) and not w.traffic.running
    assert "2 synthetic clients call the alias in each SLO window" in w.printed[0]
    assert probed_while_running and not any(probed_while_running)  # the probes' deadlines follow an idle stable
    slos = [r["results"][1] for r in w.records() if r["event"] == "gate"]
    assert all(s["status"] == "pass" for s in slos)
    # what the clients sent is in each gate's record; 10% of 0.5 req/s reached min_requests in the window
    assert all(s["details"]["synthetic_traffic"]["requests"] > 0 for s in slos)
    assert slos[0]["details"]["window"]["candidate"]["requests"] >= shipped.slo.min_requests


def test_synthetic_traffic_stops_when_the_metrics_cannot_be_read(world):
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"}, rate=0.0, synthetic_rate=0.5)
    w.metrics.down = True
    outcome = w.controller().run("viggo-v2")
    assert outcome.result == "rolled_back"
    assert w.traffic.starts == w.traffic.stops == 1 and not w.traffic.running


def test_exit_status_is_written_once_and_help_readme_and_makefile_agree(project_root):
    from e2e_llm.canary import Outcome
    from e2e_llm.cli import CONFIG_ERROR, build_parser
    from e2e_llm.commands.canary import MEANING, Exit, exit_codes_text, outcome_code

    assert set(MEANING) == set(Exit) and Exit.CONFIG == CONFIG_ERROR
    text = exit_codes_text()
    squash = " ".join
    readme = squash((project_root / "README.md").read_text().split())
    assert squash(text.split()) in readme
    sub = build_parser()._subparsers._group_actions[0].choices["canary"]
    assert squash(text.split()) in squash(sub.format_help().split())
    makefile = (project_root / "Makefile").read_text()
    assert f"Error {int(Exit.ROLLED_BACK)}" in makefile and "Exit 3 means" not in makefile
    from e2e_llm.commands import canary as command

    assert "3 rolled back" not in command.__doc__  # the docstring does not keep a second copy
    for result, code in (("promoted", 0), ("rolled_back", 3), ("rejected", 3), ("reverted", 3)):
        assert outcome_code(Outcome("r", result, "", "c", "s")) == code


def test_fields_given_at_the_start_are_in_the_start_record_only(world):
    """`e2e-llm canary --any-instruction` says in the log why the gate scored rows the candidate was
    not trained with."""
    w = world(kinds={"viggo-v1": "good", "viggo-v2": "good"})
    assert w.controller().run("viggo-v2", instruction_mismatch="trained otherwise").result == "promoted"
    records = w.records()
    assert records[0]["event"] == "start" and records[0]["instruction_mismatch"] == "trained otherwise"
    assert all("instruction_mismatch" not in r for r in records[1:])


def test_canary_set_cli_reads_the_split_and_the_tokenizer_from_object_storage(local_profile, local_model, s3_server,
                                                                               tmp_path, monkeypatch, capsys):
    """The cluster's layout: the clean split in S3 (the storage root) and the base model mirrored
    there too (model.source s3://...); the command read a local path for both."""
    import tempfile
    import uuid

    from e2e_llm import storage
    from e2e_llm.cli import main
    from e2e_llm.model_mirror import is_weights

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the machine's temp dir: the tokenizer's copy
    bucket = f"cs-{uuid.uuid4().hex[:8]}"
    storage.filesystem(f"s3://{bucket}")[0].create_dir(bucket)
    model = f"s3://{bucket}/models/{local_model.name}"
    for file in local_model.iterdir():
        if not is_weights(file.name):
            storage.write_bytes(storage.join(model, file.name), file.read_bytes())
    local_profile(model__source=model)
    monkeypatch.setenv("E2E_LLM_STORAGE_ROOT", f"s3://{bucket}/viggo")
    monkeypatch.chdir(ROOT)
    profile = str(tmp_path / "profile.yaml")
    assert main(["canary-set", "--profile", profile, "--version", "v9", "--output", str(tmp_path / "set.jsonl")]) == 1
    assert "val.jsonl not found: run `e2e-llm data" in capsys.readouterr().err
    assert main(["data", "--profile", profile]) == 0
    capsys.readouterr()
    assert main(["canary-set", "--profile", profile, "--version", "v9", "--output", str(tmp_path / "set.jsonl")]) == 0
    spec = yaml.safe_load(capsys.readouterr().out)["canary_set"]
    policy = load_policy(ROOT / "configs/canary.yaml")
    assert spec["sha256"] == policy.canary_set.sha256 and spec["rows"] == policy.canary_set.rows
    assert 0 < spec["max_reference_tokens"] < 100
