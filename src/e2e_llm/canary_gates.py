# SPDX-License-Identifier: Apache-2.0
"""The canary's gates and the interfaces the controller sees the world through.

- :func:`preflight_gate`: every engine replica loaded the candidate and answered one row
  (:class:`PreflightResult`), before any traffic.
- :func:`slo_gate`: error rate and p95 latency of what each version served in a step window
  (the difference of two scrapes of cumulative counters, :class:`VersionStats`);
  :func:`error_budget_spent` ends a window early.
- The quality gate lives in :mod:`e2e_llm.canary_quality`.
- :class:`Router` (the alias record), :class:`Preflight` (load-and-answer check of a version),
  :class:`Prober` (the canary set to one version), :class:`MetricsSource` and :class:`Clock`:
  the controller's side effects, faked in tests; the real ones live in :mod:`e2e_llm.canary_io`
  and :mod:`e2e_llm.engine_canary`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from e2e_llm.canary_policy import QualityPolicy, SLOPolicy

# ---------------------------------------------------------------------------------------
# Interfaces to the world


@dataclass(frozen=True)
class AliasState:
    """The alias record the serving app routes by (weight in percent of alias traffic)."""

    stable: str | None
    candidate: str | None = None
    candidate_weight: float = 0.0


@dataclass
class Answer:
    text: str | None  # None: the request failed
    error: str | None = None
    latency_s: float = 0.0
    timed_out: bool = False  # failed because it ran past its deadline (retried once by default)
    attempts: int = 1


@dataclass
class PreflightResult:
    """What the ingress's ``POST /-/preflight`` answered: ``ok`` only if every engine replica
    loaded the version and answered; ``replicas``: ``{"replica", "ok", "reason", "latency_s"}``."""

    ok: bool
    reason: str | None = None
    replicas: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class VersionStats:
    """Cumulative request counters of one version, as scraped (or a difference of two)."""

    requests: float = 0.0
    errors: float = 0.0
    # histogram upper bound in seconds (math.inf for +Inf) -> cumulative count
    buckets: dict[float, float] = field(default_factory=dict)

    def minus(self, earlier: VersionStats | None) -> VersionStats:
        if earlier is None:
            return VersionStats(self.requests, self.errors, dict(self.buckets))
        # A counter that went down means the process restarted: count from zero.
        if self.requests < earlier.requests:
            return VersionStats(self.requests, self.errors, dict(self.buckets))
        return VersionStats(
            self.requests - earlier.requests,
            self.errors - earlier.errors,
            {le: c - earlier.buckets.get(le, 0.0) for le, c in self.buckets.items()},
        )

    def quantile(self, q: float) -> float | None:
        """Prometheus ``histogram_quantile`` (linear inside the bucket); None without data."""
        bounds = sorted(self.buckets)
        if not bounds:
            return None
        total = self.buckets[bounds[-1]]
        if total <= 0:
            return None
        rank = q * total
        previous_bound, previous_count = 0.0, 0.0
        for bound in bounds:
            count = self.buckets[bound]
            if count >= rank:
                if math.isinf(bound):
                    return previous_bound
                if count == previous_count:
                    return bound
                return previous_bound + (bound - previous_bound) * (rank - previous_count) / (count - previous_count)
            previous_bound, previous_count = bound, count
        return previous_bound

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "errors": self.errors,
                "buckets": [[("+Inf" if math.isinf(k) else k), v] for k, v in sorted(self.buckets.items())]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VersionStats:
        return cls(data["requests"], data["errors"],
                   {(math.inf if k == "+Inf" else float(k)): v for k, v in data.get("buckets", [])})


class RouterConflict(RuntimeError):
    """The alias changed between the router's ``get`` and its ``set``; nothing was written."""


class Router(Protocol):
    """The alias record. ``set`` may refuse with :class:`RouterConflict` when the record changed
    since this router's last ``get`` of it (a compare-and-swap store does)."""

    def get(self, alias: str) -> AliasState | None: ...

    def set(self, alias: str, state: AliasState) -> None: ...


class Preflight(Protocol):
    """Asks every engine replica serving the alias to load ``version`` and answer ``row`` (one
    canary row) within ``deadline_s``. Never raises for a failed check: that is ``ok=False``."""

    def check(self, version: str, row: dict[str, str], deadline_s: float, max_tokens: int) -> PreflightResult: ...


class Prober(Protocol):
    """The rows to one version; each answer within ``timeout_s`` (a late one: ``timed_out``)."""

    def probe(self, version: str, rows: Sequence[dict[str, str]], policy: QualityPolicy,
              timeout_s: float) -> list[Answer]: ...


class MetricsSource(Protocol):
    def snapshot(self) -> dict[str, VersionStats]: ...


class Traffic(Protocol):
    """Synthetic alias requests from ``start`` to ``stop``, for an app without users; ``stop``
    waits for the requests in flight and returns what was sent: ``requests``, ``ok``,
    ``failed`` and the first ``failures``."""

    clients: int

    def start(self) -> None: ...

    def stop(self) -> dict[str, Any]: ...


class Clock(Protocol):
    def now(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)



# ---------------------------------------------------------------------------------------
# Gates


@dataclass
class Check:
    gate: str
    metric: str
    stable: float | None
    candidate: float | None
    limit: str
    ok: bool | None  # None: not evaluated (no data)


@dataclass
class GateResult:
    gate: Literal["preflight", "quality", "slo"]
    status: Literal["pass", "fail", "inconclusive", "error"]
    reason: str
    checks: list[Check] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GateResult:
        return cls(data["gate"], data["status"], data["reason"], [Check(**c) for c in data.get("checks", [])],
                   data.get("details", {}))


def preflight_gate(result: PreflightResult) -> GateResult:
    """The preflight as a gate: pass only if the endpoint said ok and named at least one replica,
    each of which loaded the candidate and answered."""
    checks = [Check("preflight", str(r.get("replica", "?")), None, r.get("latency_s"), "loads and answers",
                    bool(r.get("ok"))) for r in result.replicas]
    failing = [f"{r.get('replica', '?')}: {r.get('reason') or 'failed'}" for r in result.replicas if not r.get("ok")]
    details = {"replicas": result.replicas}
    if not result.ok or failing:
        reason = result.reason or "; ".join(failing) or "the preflight failed"
        if failing and result.reason and failing[0] not in result.reason:
            reason += f" ({'; '.join(failing)[:300]})"
        return GateResult("preflight", "fail", reason, checks, details)
    if not result.replicas:
        return GateResult("preflight", "fail", "the preflight named no engine replica", checks, details)
    return GateResult("preflight", "pass", f"{len(checks)} engine replica(s) loaded the candidate and answered",
                      checks, details)


def error_budget_spent(window: VersionStats, candidate_errors_allowed_rate: float, elapsed_s: float,
                       window_s: float, rate_factor: float) -> bool:
    """True once the candidate's errors so far exceed what the whole window may hold: its request
    rate so far, times ``rate_factor``, over ``window_s``, at the allowed error rate. More
    requests later cannot bring the window's error rate back under the limit unless the rate
    rises by more than ``rate_factor``."""
    if elapsed_s <= 0 or window.errors <= 0:
        return False
    projected = window.requests * rate_factor * max(window_s / elapsed_s, 1.0)
    return window.errors > candidate_errors_allowed_rate * projected + 1e-9


def slo_gate(window: dict[str, VersionStats], stable: str, candidate: str, policy: SLOPolicy,
             baseline: VersionStats | None = None) -> GateResult:
    """Error rate and p95 latency of what each version served during the step window.

    When stable served too few requests in this window (the candidate takes 100% of alias
    traffic), the stable figures of the last window where it had enough (``baseline``) are used.
    """
    cand = window.get(candidate, VersionStats())
    stab = window.get(stable, VersionStats())
    details: dict[str, Any] = {"window": {"stable": stab.to_dict(), "candidate": cand.to_dict()}}
    if stab.requests < policy.min_requests and baseline is not None and baseline.requests >= policy.min_requests:
        stab = baseline
        details["stable_from_baseline"] = True
    if cand.requests < policy.min_requests or stab.requests < policy.min_requests:
        who = "candidate" if cand.requests < policy.min_requests else "stable"
        served = cand.requests if who == "candidate" else stab.requests
        return GateResult("slo", "inconclusive", f"{who} served {served:g} requests in the window "
                          f"(need {policy.min_requests})",
                          [Check("slo", "requests", stab.requests, cand.requests, f">= {policy.min_requests}", False)],
                          details)
    s_err, c_err = stab.errors / stab.requests, cand.errors / cand.requests
    s_p95, c_p95 = stab.quantile(0.95), cand.quantile(0.95)
    from_baseline = " (stable: last full window)" if details.get("stable_from_baseline") else ""
    checks = [Check("slo", "requests", stab.requests, cand.requests, f">= {policy.min_requests}{from_baseline}", True)]
    failures = []
    ok = c_err - s_err <= policy.max_error_rate_delta + 1e-9
    checks.append(Check("slo", "error_rate", s_err, c_err, f"<= {s_err + policy.max_error_rate_delta:.3f}", ok))
    if not ok:
        failures.append(f"error rate {c_err:.1%} vs stable {s_err:.1%} (delta > {policy.max_error_rate_delta:.1%})")
    if s_p95 is None or c_p95 is None:
        checks.append(Check("slo", "p95_latency_s", s_p95, c_p95, "no latency histogram", None))
        failures.append("no latency histogram for " + ("stable" if s_p95 is None else "candidate"))
    else:
        limit = max(max(s_p95, 1e-3) * policy.max_p95_latency_ratio, s_p95 + policy.p95_latency_slack_s)
        ok = c_p95 <= limit
        checks.append(Check("slo", "p95_latency_s", s_p95, c_p95, f"<= {limit:.3f}", ok))
        if not ok:
            slack = f" + {policy.p95_latency_slack_s:g}s" if policy.p95_latency_slack_s else ""
            failures.append(f"p95 latency {c_p95:.3f}s > {policy.max_p95_latency_ratio:g} x stable {s_p95:.3f}s{slack}")
    if failures:
        return GateResult("slo", "fail", "; ".join(failures), checks, details)
    return GateResult("slo", "pass", f"candidate {cand.requests:g} req, stable {stab.requests:g} req within SLO",
                      checks, details)

