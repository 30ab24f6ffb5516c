# SPDX-License-Identifier: Apache-2.0
"""Quality-gated canary rollouts of adapter versions behind a serving alias.

Clients call an alias (``viggo``); the serving app routes alias traffic between the alias's
``stable`` and ``candidate`` adapter versions by ``candidate_weight``, read from the adapter
store. This controller moves that weight through the policy's steps (``configs/canary.yaml``)
and at every step runs two gates:

- quality: the fixed, versioned canary set is sent to ``stable`` and ``candidate`` explicitly
  by version and both are scored with :func:`e2e_llm.evaluate.evaluate`; the candidate fails
  when it is worse than stable by more than a metric's margin;
- SLO: error rate and p95 latency of the requests each version served during the step
  window, from the app's per-version Prometheus metrics (delta of two scrapes).

Before any traffic the candidate passes a preflight (every engine replica loads it and answers
one canary row, :class:`Preflight`) and the quality gate at 0% user weight (``shadow``); a
candidate that fails either is *rejected*: the alias is never written. A step ends as soon as its
outcome is certain (a quality gate that is not passing, or the candidate's errors beyond the
window's error budget). A failed, inconclusive or crashed gate rolls back (candidate weight 0);
passing the last step promotes (the candidate becomes stable). Every decision, with its numbers and reason, is
appended to a rollout log (JSON lines in the adapter store) and an intent record is written
*before* every change to the alias, so a killed controller leaves the log naming what traffic
may be doing. Rerunning reads the log and continues (or rolls back, per ``on_resume``).

The state machine talks to the world through four small interfaces (:class:`Router`,
:class:`Preflight`, :class:`Prober`, :class:`MetricsSource`) and a :class:`Clock`, so it is unit-tested with fakes;
the real implementations live in :mod:`e2e_llm.canary_io`.

The pieces live along their seams: the policy and canary set in :mod:`e2e_llm.canary_policy`,
the gates and interfaces in :mod:`e2e_llm.canary_gates`, the quality gate and its probes in
:mod:`e2e_llm.canary_quality`, the rollout log and the state read back
from it in :mod:`e2e_llm.canary_log`; this module is the controller and re-exports their names.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Literal

from e2e_llm.canary_gates import (
    AliasState,
    Answer,
    Check,
    Clock,
    GateResult,
    MetricsSource,
    Preflight,
    PreflightResult,
    Prober,
    Router,
    RouterConflict,
    SystemClock,
    Traffic,
    VersionStats,
    error_budget_spent,
    preflight_gate,
    slo_gate,
)
from e2e_llm.canary_log import (
    PRETRAFFIC,
    TERMINAL,
    CanaryError,
    ConcurrentRolloutError,
    Rollout,
    RolloutLog,
    format_gate_table,
    format_rollout,
    owner,
)
from e2e_llm.canary_policy import (
    DEFAULT_POLICY,
    QUALITY_METRICS,
    CanaryPolicy,
    CanarySetSpec,
    PreflightPolicy,
    QualityPolicy,
    SLOPolicy,
    canary_set_text,
    load_canary_set,
    load_policy,
    select_canary_rows,
    write_canary_set,
)
from e2e_llm.canary_quality import quality_gate, run_quality

__all__ = [
    "AliasState", "Answer", "CanaryError", "CanaryPolicy", "CanarySetSpec", "Check", "Clock",
    "ConcurrentRolloutError", "Controller", "DEFAULT_POLICY", "GateResult", "MetricsSource", "Outcome", "Preflight",
    "PreflightPolicy", "PreflightResult", "Prober", "QUALITY_METRICS", "QualityPolicy", "Rollout", "RolloutLog",
    "Router", "RouterConflict", "SLOPolicy", "SystemClock", "TERMINAL", "VersionStats", "canary_set_text",
    "format_gate_table", "format_rollout", "load_canary_set", "load_policy", "owner", "preflight_gate",
    "quality_gate", "select_canary_rows", "slo_gate", "write_canary_set",
]

# Controllers of this process that are driving a rollout now (their owner ids): a second
# controller in the same process is refused while the first is active.
_active: set[str] = set()
_active_lock = threading.Lock()
APPLY_ATTEMPTS = 5


# The controller


@dataclass
class Outcome:
    rollout: str
    # rejected: failed a pre-traffic check (preflight, shadow quality); the alias was never written
    result: Literal["promoted", "rolled_back", "reverted", "rejected"]
    reason: str
    candidate: str
    stable: str



def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Controller:
    def __init__(self, *, policy: CanaryPolicy, task, canary_rows: Sequence[dict[str, str]], log: RolloutLog,
                 router: Router, prober: Prober | None, metrics: MetricsSource, clock: Clock | None = None,
                 out: Callable[[str], None] = print, lease_s: float | None = None,
                 preflight: Preflight | None = None, traffic: Traffic | None = None):
        self.policy = policy
        self.task = task
        self.rows = list(canary_rows)
        self.log = log
        self.router = router
        self.prober = prober
        self.preflight = preflight
        self.metrics = metrics
        self.traffic = traffic
        self.clock = clock or SystemClock()
        self.out = out
        self.me = owner()
        # Another host's controller counts as alive while its last record is younger than this.
        longest = max(policy.step_window_s, policy.slo.max_window_s or 0.0) + policy.slo.metrics_lag_s
        self.lease_s = lease_s if lease_s is not None else \
            2 * longest + 2 * (1 + policy.quality.retries) * policy.quality.timeout_s + policy.preflight.deadline_s

    # -- records -------------------------------------------------------------------------

    def _record(self, rollout: Rollout, event: str, **fields: Any) -> dict[str, Any]:
        record = {"ts": round(self.clock.now(), 3), "rollout": rollout.id, "alias": rollout.alias, "event": event,
                  "owner": self.me, **fields}
        self.log.append(record)
        rollout.records.append(record)
        return record

    def current(self) -> Rollout | None:
        return Rollout.latest(self.log.read(), self.policy.alias)

    # -- entry points --------------------------------------------------------------------

    @contextmanager
    def _active(self) -> Iterator[None]:
        with _active_lock:
            _active.add(self.me["id"])
        try:
            yield
        finally:
            with _active_lock:
                _active.discard(self.me["id"])

    def run(self, candidate: str | None = None, **start_fields: Any) -> Outcome:
        """Start a rollout of ``candidate``, or resume the unfinished one (``candidate`` None or equal).
        ``start_fields`` go into a new rollout's start record. Of two controllers started at once
        on one alias, one runs and the other raises :class:`CanaryError`
        (:class:`ConcurrentRolloutError` when it lost the race to the log)."""
        with self._active():
            return self._run(candidate, start_fields)

    def rollback(self, reason: str = "manual rollback") -> Outcome:
        """Abort the unfinished rollout, or revert the last promotion to its previous stable."""
        with self._active():
            return self._rollback(reason)

    def promote(self, reason: str = "manual promotion") -> Outcome:
        """Promote the unfinished rollout's candidate now, skipping the remaining gates."""
        with self._active():
            return self._promote(reason)

    def _run(self, candidate: str | None, start_fields: dict[str, Any]) -> Outcome:
        rollout = self.current()
        if rollout is not None and not rollout.finished:
            if candidate is not None and candidate != rollout.candidate:
                raise CanaryError(
                    f"rollout {rollout.id} of {rollout.candidate} on alias {rollout.alias!r} is unfinished "
                    f"({rollout.effective_last['event']}); rerun without --adapter (or with {rollout.candidate}) "
                    "to resume it, or `e2e-llm rollback` first")
            self._check_not_running(rollout)
            self._record(rollout, "resume", after=rollout.last["event"])
            self.out(f"resuming rollout {rollout.id}: {rollout.stable} -> {rollout.candidate} "
                     f"(last record: {rollout.records[-2]['event']})")
            action, _ = rollout.next_action()
            if self.policy.on_resume == "rollback" and action in ("set_weight", "observe"):
                self._record(rollout, "rollback", reason="resumed with on_resume: rollback")
            return self._drive(rollout)
        if candidate is None:
            raise CanaryError(f"no unfinished rollout on alias {self.policy.alias!r}: name the candidate (--adapter)")
        state = self.router.get(self.policy.alias)
        if state is None or state.stable is None:
            raise CanaryError(f"alias {self.policy.alias!r} has no stable version: publish one first "
                              f"(e2e-llm publish --alias {self.policy.alias})")
        if state.candidate is not None and state.candidate_weight > 0:
            raise CanaryError(f"alias {self.policy.alias!r} already sends {state.candidate_weight:g}% to "
                              f"{state.candidate} without an unfinished rollout in the log; fix the alias first")
        if candidate == state.stable:
            raise CanaryError(f"{candidate} is already the stable version of alias {self.policy.alias!r}")
        pretraffic = self.policy.pretraffic()
        if "preflight" in pretraffic and self.preflight is None:
            raise CanaryError("the policy asks for a preflight (preflight.enabled) but this controller has none")
        if "shadow" in pretraffic and self.prober is None:
            raise CanaryError("the policy asks for a shadow quality gate (shadow: true) but this controller "
                              "cannot probe versions")
        rollout = Rollout(uuid.uuid4().hex[:12], self.policy.alias, state.stable, candidate,
                          list(self.policy.steps), [])
        self._record(rollout, "start", stable=state.stable, candidate=candidate, steps=rollout.steps,
                     pretraffic=pretraffic,
                     policy=self.policy.digest(), canary_set={"version": self.policy.canary_set.version,
                                                              "sha256": self.policy.canary_set.sha256,
                                                              "rows": len(self.rows)},
                     **start_fields)
        synthetic = "" if self.traffic is None else \
            f"; {self.traffic.clients} synthetic clients call the alias in each SLO window"
        self.out(f"rollout {rollout.id}: alias {rollout.alias!r} {rollout.stable} -> {candidate}, "
                 f"steps {', '.join(f'{s}%' for s in rollout.steps)}{synthetic}")
        return self._drive(rollout)

    def _rollback(self, reason: str) -> Outcome:
        rollout = self.current()
        if rollout is None:
            raise CanaryError(f"no rollout recorded for alias {self.policy.alias!r}: nothing to roll back")
        if not rollout.finished:
            if not rollout.weight_moved and rollout.effective_last["event"] in ("start", *PRETRAFFIC):
                # no traffic was ever moved: reject without writing the alias
                self._record(rollout, "rejected", reason=reason, stable=rollout.stable)
                return self._outcome(rollout)
            if rollout.effective_last["event"] != "rollback":
                self._record(rollout, "rollback", reason=reason)
            return self._drive(rollout)
        if rollout.promoted:
            self._record(rollout, "revert", reason=reason, to=rollout.stable)
            return self._drive(rollout)
        raise CanaryError(f"last rollout {rollout.id} on alias {self.policy.alias!r} ended "
                          f"{rollout.effective_last['event']}; nothing to roll back")

    def _promote(self, reason: str) -> Outcome:
        rollout = self.current()
        if rollout is None or rollout.finished:
            raise CanaryError(f"no unfinished rollout on alias {self.policy.alias!r} to promote")
        if rollout.effective_last["event"] == "rollback":
            raise CanaryError(f"rollout {rollout.id} is rolling back; rerun `e2e-llm canary` to finish that")
        self._record(rollout, "promote", reason=reason)
        return self._drive(rollout)

    # -- the state machine ---------------------------------------------------------------

    def _check_not_running(self, rollout: Rollout) -> None:
        last = rollout.last
        who = last.get("owner", {})
        if who == self.me:
            return
        if who.get("host") == self.me["host"]:
            pid = int(who.get("pid", 0))
            if pid == self.me["pid"]:  # another controller of this process: is it still driving?
                with _active_lock:
                    busy = who.get("id") in _active
                if busy:
                    raise CanaryError(f"controller {who['id']} of this process is still running rollout {rollout.id}")
                return
            if _pid_alive(pid):
                raise CanaryError(f"controller pid {who['pid']} is still running rollout {rollout.id}")
            return
        age = self.clock.now() - float(last["ts"])
        if age < self.lease_s:
            raise CanaryError(f"rollout {rollout.id} was advanced by {who.get('host')}:{who.get('pid')} "
                              f"{age:.0f}s ago (lease {self.lease_s:.0f}s); wait or `e2e-llm rollback`")

    def _apply(self, rollout: Rollout, state: AliasState) -> None:
        """Set the alias, if it is still in a state this rollout left it in and nobody else wrote
        to the log; the write is conditional on the record read here (retried if it changed
        in between and still passes the check)."""
        moving_stable = rollout.effective_last["event"] in ("promote", "revert")
        allowed_stable = {rollout.stable, rollout.candidate} if moving_stable else {rollout.stable}
        for _ in range(APPLY_ATTEMPTS):
            current = self.router.get(rollout.alias)
            if (current is None or current.stable not in allowed_stable
                    or current.candidate not in (None, rollout.candidate)):
                self._record(rollout, "conflict", found=asdict(current) if current else None)
                raise CanaryError(f"alias {rollout.alias!r} was changed outside this rollout (found {current}); "
                                  "not touching it: inspect and `e2e-llm rollback`")
            self.log.verify()
            try:
                self.router.set(rollout.alias, state)
                return
            except RouterConflict:
                continue
        raise CanaryError(f"alias {rollout.alias!r} kept changing while this rollout tried to set it "
                          f"({APPLY_ATTEMPTS} attempts); not touching it: inspect and `e2e-llm rollback`")

    def _drive(self, rollout: Rollout) -> Outcome:
        while True:
            action, step = rollout.next_action()
            if action == "done":
                return self._outcome(rollout)
            if action in PRETRAFFIC:
                result = self._preflight(rollout) if action == "preflight" else self._quality(rollout)
                record = self._record(rollout, action, step=-1, weight=0, passed=result.status == "pass",
                                      reason=f"{result.gate} {result.status}: {result.reason}",
                                      results=[result.to_dict()])
                self.out(format_gate_table([record]))
            elif action == "reject":
                # The alias is not touched: the candidate never had traffic.
                self._record(rollout, "rejected", reason=rollout.effective_last["reason"], stable=rollout.stable)
            elif action == "set_weight":
                weight = rollout.steps[step]
                if rollout.effective_last["event"] != "set_weight":
                    self._record(rollout, "set_weight", step=step, weight=weight)
                self._apply(rollout, AliasState(rollout.stable, rollout.candidate, float(weight)))
                self._record(rollout, "weight_set", step=step, weight=weight)
            elif action == "observe":
                results = self._observe(rollout, step)
                passed = all(r.status == "pass" for r in results)
                # what failed first, then what was inconclusive; all reasons when everything passed
                order = {"fail": 0, "error": 0, "inconclusive": 1}
                failing = sorted((r for r in results if r.status != "pass"), key=lambda r: order[r.status])
                reason = "; ".join(f"{r.gate} {r.status}: {r.reason}" for r in failing) or \
                    "; ".join(f"{r.gate}: {r.reason}" for r in results)
                record = self._record(rollout, "gate", step=step, weight=rollout.steps[step], passed=passed,
                                      reason=reason, results=[r.to_dict() for r in results])
                self.out(format_gate_table([record]))
            elif action == "rollback":
                if rollout.effective_last["event"] != "rollback":
                    failed = rollout.effective_last.get("reason", "gate failed")
                    self._record(rollout, "rollback", reason=failed)
                self._apply(rollout, AliasState(rollout.stable, None, 0.0))
                self._record(rollout, "rolled_back", stable=rollout.stable)
            elif action == "promote":
                if rollout.effective_last["event"] != "promote":
                    self._record(rollout, "promote", reason=f"passed all {len(rollout.steps)} steps")
                self._apply(rollout, AliasState(rollout.candidate, None, 0.0))
                self._record(rollout, "promoted", stable=rollout.candidate, previous=rollout.stable)
            elif action == "revert":
                self._apply(rollout, AliasState(rollout.stable, None, 0.0))
                self._record(rollout, "reverted", stable=rollout.stable)

    def _outcome(self, rollout: Rollout) -> Outcome:
        event = rollout.effective_last["event"]
        reason = next((r.get("reason", "") for r in reversed(rollout.records)
                       if r["event"] in ("rollback", "promote", "revert", "rejected")), "")
        return Outcome(rollout.id, event, reason, rollout.candidate, rollout.stable)

    def _observe(self, rollout: Rollout, step: int) -> list[GateResult]:
        """One step: the quality gate first; if it does not pass, the step ends at once (it rolls
        back whatever the SLOs say). Otherwise the SLO window: wait ``metrics_lag_s`` (so the
        probes' load and requests from before the weight change are out of it), then scrape every
        ``slo.poll_s`` until ``step_window_s`` has passed, ending early once the candidate's errors
        exceed the window's error budget and extending (up to ``slo.max_window_s``) while a
        version served too few requests. Synthetic traffic, if any, runs from the lag to the
        window's end (not during the probes, whose deadlines follow stable's answers)."""
        quality = None if self.prober is None else self._quality(rollout)  # engine canary: SLO only
        if quality is not None and quality.status != "pass":
            return [quality]
        if self.traffic is not None:
            self.traffic.start()
        try:
            slo = self._slo(rollout)
        except Exception as exc:  # noqa: BLE001  (any failure to observe is a failed gate)
            slo = GateResult("slo", "error", f"metrics unavailable: {type(exc).__name__}: {exc}")
        finally:
            sent = None if self.traffic is None else self.traffic.stop()
        if sent is not None:
            slo.details["synthetic_traffic"] = sent
        return [slo] if quality is None else [quality, slo]

    def _slo(self, rollout: Rollout) -> GateResult:
        slo, window_s = self.policy.slo, self.policy.step_window_s
        longest = max(window_s, slo.max_window_s or 0.0)
        baseline = rollout.baseline()
        self.clock.sleep(slo.metrics_lag_s)
        before = self.metrics.snapshot()
        start = self.clock.now()
        while True:
            elapsed = self.clock.now() - start
            target = window_s if elapsed < window_s - 1e-9 else longest
            self.clock.sleep(min(slo.poll_s, max(target - elapsed, 0.0)))
            elapsed = self.clock.now() - start
            after = self.metrics.snapshot()
            window = {v: after[v].minus(before.get(v)) for v in after}
            result = slo_gate(window, rollout.stable, rollout.candidate, slo, baseline)
            result.details["window_s"] = round(elapsed, 3)
            over = elapsed >= window_s - 1e-9
            if over and (result.status != "inconclusive" or elapsed >= longest - 1e-9):
                return result
            # still in the window, or in its extension for too little traffic: errors end it
            horizon = longest if over else window_s
            if self._budget_spent(window, rollout, baseline, elapsed, horizon):
                cand = window.get(rollout.candidate, VersionStats())
                result.details["ended_early"] = True
                return GateResult("slo", "fail", f"error budget spent after {elapsed:.0f}s of the {horizon:g}s "
                                  f"window: candidate {cand.errors:g} errors in {cand.requests:g} requests",
                                  result.checks, result.details)

    def _budget_spent(self, window: dict[str, VersionStats], rollout: Rollout, baseline: VersionStats | None,
                      elapsed: float, horizon: float) -> bool:
        slo = self.policy.slo
        stable = window.get(rollout.stable, VersionStats())
        if stable.requests < slo.min_requests and baseline is not None:
            stable = baseline
        stable_rate = stable.errors / stable.requests if stable.requests else 0.0
        return error_budget_spent(window.get(rollout.candidate, VersionStats()), stable_rate + slo.max_error_rate_delta,
                                  elapsed, horizon, slo.budget_rate_factor)

    def _quality(self, rollout: Rollout) -> GateResult:
        try:
            return run_quality(self.prober, self.task, self.rows, rollout.stable, rollout.candidate,
                               self.policy.quality)
        except Exception as exc:  # noqa: BLE001
            return GateResult("quality", "error", f"probing failed: {type(exc).__name__}: {exc}")

    def _preflight(self, rollout: Rollout) -> GateResult:
        """Every engine replica loads the candidate and answers the first canary row."""
        spec = self.policy.preflight
        if self.preflight is None:  # a resumed rollout whose start record asked for one
            return preflight_gate(PreflightResult(False, "the rollout's start record asks for a preflight and "
                                                  "this controller has none"))
        try:
            row = self.rows[0] if self.rows else {}
            result = self.preflight.check(rollout.candidate, row, spec.deadline_s, spec.max_tokens)
        except Exception as exc:  # noqa: BLE001  a broken check rejects, it does not crash
            result = PreflightResult(False, f"preflight failed: {type(exc).__name__}: {exc}")
        return preflight_gate(result)
