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

A failed, inconclusive or crashed gate rolls back (candidate weight 0); passing the last step
promotes (the candidate becomes stable). Every decision, with its numbers and reason, is
appended to a rollout log (JSON lines in the adapter store) and an intent record is written
*before* every change to the alias, so a killed controller leaves the log naming what traffic
may be doing. Rerunning reads the log and continues (or rolls back, per ``on_resume``).

The state machine talks to the world through three small interfaces (:class:`Router`,
:class:`Prober`, :class:`MetricsSource`) and a :class:`Clock`, so it is unit-tested with fakes;
the real implementations live in :mod:`e2e_llm.canary_io`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import socket
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import Field, field_validator, model_validator

from e2e_llm.config import ConfigError, Strict, load_yaml_model

DEFAULT_POLICY = "configs/canary.yaml"
QUALITY_METRICS = ("exact_match", "slot_f1", "valid_mr_rate", "function_accuracy")


class CanaryError(RuntimeError):
    """A rollout that cannot start or continue (with what to do about it)."""


class ConcurrentRolloutError(CanaryError):
    """Another controller wrote to the rollout log."""


# ---------------------------------------------------------------------------------------
# Policy


class CanarySetSpec(Strict):
    # A JSONL file of alpaca rows (instruction, input, output), made by `e2e-llm canary-set`.
    path: str
    version: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    rows: int = Field(ge=1, le=64)
    # Longest reference output in the set, in base-model tokens (measured when generated).
    max_reference_tokens: int = Field(ge=1)


class QualityPolicy(Strict):
    max_tokens: int = Field(ge=1)
    # Use only the first N rows of the set (short test policies); None = all.
    max_rows: int | None = Field(None, ge=1)
    structured_output: bool = False
    concurrency: int = Field(8, ge=1)
    timeout_s: float = Field(120.0, gt=0)
    # Below this share of answered probes (per version) the gate is inconclusive.
    min_answered: float = Field(0.9, ge=0.0, le=1.0)
    # Fail when candidate < stable - margin for any listed metric (absolute, 0..1).
    margins: dict[Literal["exact_match", "slot_f1", "valid_mr_rate", "function_accuracy"], float] = Field(
        min_length=1
    )

    @field_validator("margins")
    @classmethod
    def _margins_in_range(cls, margins: dict[str, float]) -> dict[str, float]:
        for name, value in margins.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"margin for {name} must be within 0..1")
        return margins


class SLOPolicy(Strict):
    # Which requests count: those routed through the alias (what clients see), or every
    # request labelled with the version (explicit calls and the quality probes included).
    traffic: Literal["alias", "all"] = "alias"
    # Fail when candidate error rate - stable error rate exceeds this (0..1).
    max_error_rate_delta: float = Field(ge=0.0, le=1.0)
    # Fail when candidate p95 / stable p95 exceeds this.
    max_p95_latency_ratio: float = Field(ge=1.0)
    # ... and only when the candidate's p95 is also this much slower in absolute terms (a few
    # requests on a busy machine make a p95 ratio alone noisy).
    p95_latency_slack_s: float = Field(0.0, ge=0.0)
    # Fewer requests than this for the candidate in a window: the gate is inconclusive.
    min_requests: int = Field(1, ge=1)
    # How long the metrics endpoint takes to show a finished request (Ray exports on a timer).
    metrics_lag_s: float = Field(0.0, ge=0.0)
    # Count 4xx answers (other than 401/403/429) as errors: a version that cannot load its
    # adapter answers 4xx/404 for a well-formed request.
    count_client_errors: bool = True


class CanaryPolicy(Strict):
    alias: str = Field(min_length=1)
    # Percent of alias traffic sent to the candidate at each step, increasing.
    steps: list[int] = Field(min_length=1)
    # Each step lasts at least this long (the SLO window); quality probes run inside it.
    step_window_s: float = Field(gt=0)
    # What a rerun does with an unfinished rollout: continue it, or roll it back.
    on_resume: Literal["continue", "rollback"] = "continue"
    canary_set: CanarySetSpec
    quality: QualityPolicy
    slo: SLOPolicy

    @field_validator("steps")
    @classmethod
    def _steps_increase(cls, steps: list[int]) -> list[int]:
        if any(not 0 < s <= 100 for s in steps):
            raise ValueError("every step must be a percentage in 1..100")
        if any(b <= a for a, b in itertools.pairwise(steps)):
            raise ValueError("steps must increase strictly")
        return steps

    @model_validator(mode="after")
    def _sizes_fit(self) -> CanaryPolicy:
        if self.quality.max_tokens < self.canary_set.max_reference_tokens:
            raise ValueError(
                f"quality.max_tokens {self.quality.max_tokens} is below the canary set's longest reference "
                f"({self.canary_set.max_reference_tokens} tokens): answers would be cut off"
            )
        if self.quality.max_rows is not None and self.quality.max_rows > self.canary_set.rows:
            raise ValueError(f"quality.max_rows {self.quality.max_rows} exceeds canary_set.rows {self.canary_set.rows}")
        return self

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def load_policy(path: str | Path) -> CanaryPolicy:
    return load_yaml_model(CanaryPolicy, path)


# ---------------------------------------------------------------------------------------
# The canary set


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def select_canary_rows(rows: Sequence[dict[str, Any]], task, n: int) -> list[dict[str, str]]:
    """A deterministic, function-stratified sample of ``n`` rows.

    Rows are grouped by the reference's function, each group ordered by the hash of its input,
    and groups are taken round-robin (alphabetical), so every dialogue act is represented and
    the same input rows always give the same set.
    """
    groups: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        function = task.parse(row["output"]).function
        groups[function].append({"instruction": row["instruction"], "input": row["input"], "output": row["output"]})
    for group in groups.values():
        group.sort(key=lambda r: _sha256(r["input"]))
    picked: list[dict[str, str]] = []
    depth = 0
    while len(picked) < n and any(depth < len(g) for g in groups.values()):
        for name in sorted(groups):
            if depth < len(groups[name]) and len(picked) < n:
                picked.append(groups[name][depth])
        depth += 1
    return picked


def canary_set_text(rows: Sequence[dict[str, str]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_canary_set(rows: Sequence[dict[str, Any]], task, n: int, path: Path, version: str,
                     count_tokens: Callable[[str], int]) -> dict[str, Any]:
    """Select and write the canary set; returns the policy's ``canary_set`` block for it."""
    picked = select_canary_rows(rows, task, n)
    if len(picked) < n:
        raise ConfigError(f"only {len(picked)} rows available for a canary set of {n}")
    text = canary_set_text(picked)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return {"path": str(path), "version": version, "sha256": _sha256(text), "rows": len(picked),
            "max_reference_tokens": max(count_tokens(r["output"]) for r in picked)}


def load_canary_set(policy: CanaryPolicy, root: Path) -> list[dict[str, str]]:
    """The policy's canary rows, after checking the file against the recorded sha256."""
    spec = policy.canary_set
    path = Path(spec.path) if Path(spec.path).is_absolute() else root / spec.path
    if not path.is_file():
        raise ConfigError(f"{path}: canary set not found (make it with `e2e-llm canary-set`)")
    text = path.read_text(encoding="utf-8")
    if (digest := _sha256(text)) != spec.sha256:
        raise ConfigError(f"{path}: sha256 {digest} does not match canary_set.sha256 {spec.sha256} in the policy")
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        row = json.loads(line)
        fields = ("instruction", "input", "output")
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in fields):
            raise ConfigError(f"{path}:{number}: canary row needs string instruction, input and output")
        rows.append(row)
    if len(rows) != spec.rows:
        raise ConfigError(f"{path}: {len(rows)} rows, policy says canary_set.rows {spec.rows}")
    return rows[: policy.quality.max_rows] if policy.quality.max_rows else rows


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


class Router(Protocol):
    def get(self, alias: str) -> AliasState | None: ...

    def set(self, alias: str, state: AliasState) -> None: ...


class Prober(Protocol):
    def probe(self, version: str, rows: Sequence[dict[str, str]], policy: QualityPolicy) -> list[Answer]: ...


class MetricsSource(Protocol):
    def snapshot(self) -> dict[str, VersionStats]: ...


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
# The rollout log


class RolloutLog:
    """Append-only JSON lines at a storage URI (local path, s3://, gs://).

    Object stores cannot append, so each append rewrites the object with one more line; a
    single writer is assumed and checked: if the stored log is no longer what this writer last
    saw, another controller is active and the append fails without writing.
    """

    def __init__(self, uri: str, storage_kw: dict[str, Any] | None = None):
        self.uri = uri
        self.kw = dict(storage_kw or {})  # endpoint_url/region of an S3-compatible store
        self._seen: str | None = None

    def _load(self) -> str:
        from e2e_llm import storage

        return storage.read_text(self.uri, **self.kw) if storage.exists(self.uri, **self.kw) else ""

    def read(self) -> list[dict[str, Any]]:
        text = self._load()
        self._seen = text
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise CanaryError(f"{self.uri}:{number}: corrupt rollout record ({exc.msg})") from None
        return records

    def append(self, record: dict[str, Any]) -> None:
        from e2e_llm import storage

        current = self._load()
        if self._seen is not None and current != self._seen:
            raise ConcurrentRolloutError(
                f"{self.uri} changed under this controller (another `e2e-llm canary/rollback/promote` ran); stopping"
            )
        text = current + json.dumps(record, sort_keys=True) + "\n"
        storage.write_text(self.uri, text, **self.kw)
        self._seen = text


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
    gate: Literal["quality", "slo"]
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


def quality_gate(task, rows: Sequence[dict[str, str]], stable: Sequence[Answer], candidate: Sequence[Answer],
                 policy: QualityPolicy) -> GateResult:
    """Compare the versions' answers on the canary set with the task's evaluation."""
    from e2e_llm.evaluate import evaluate

    references = [r["output"] for r in rows]
    inputs = [r["input"] for r in rows]
    n = len(rows)
    answered = {"stable": sum(a.text is not None for a in stable),
                "candidate": sum(a.text is not None for a in candidate)}
    details: dict[str, Any] = {"rows": n, "answered": answered}
    first_error = {name: next(((a.error or "")[:120] for a in answers if a.text is None), None)
                   for name, answers in (("stable", stable), ("candidate", candidate))}
    for name in ("stable", "candidate"):
        if answered[name] < policy.min_answered * n:
            details["first_error"] = first_error
            return GateResult("quality", "inconclusive",
                              f"{name} answered {answered[name]}/{n} canary probes (first error: {first_error[name]})",
                              [Check("quality", "answered", answered["stable"], answered["candidate"],
                                     f">= {policy.min_answered:.0%} of {n}", False)], details)
    scores = {name: evaluate(task, [a.text for a in answers], references, inputs)
              for name, answers in (("stable", stable), ("candidate", candidate))}
    checks, failures = [], []
    for metric, margin in policy.margins.items():
        s, c = scores["stable"][metric], scores["candidate"][metric]
        ok = c >= s - margin - 1e-9
        checks.append(Check("quality", metric, s, c, f">= {s - margin:.3f}", ok))
        if not ok:
            failures.append(f"{metric} {c:.3f} < stable {s:.3f} - margin {margin:.3f}")
    details["scores"] = {name: {k: v for k, v in m.items() if k not in ("per_function", "worst")}
                         for name, m in scores.items()}
    # A few rows side by side, so a decision can be checked by eye from the log.
    details["examples"] = [{"input": r["input"], "reference": r["output"], "stable": s.text, "candidate": c.text}
                           for r, s, c in list(zip(rows, stable, candidate))[:3]]
    if failures:
        return GateResult("quality", "fail", "; ".join(failures), checks, details)
    return GateResult("quality", "pass", f"candidate within margins on {n} rows", checks, details)


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


# ---------------------------------------------------------------------------------------
# Rollout state, reconstructed from the log

TERMINAL = ("promoted", "rolled_back", "reverted")


@dataclass
class Rollout:
    id: str
    alias: str
    stable: str
    candidate: str
    steps: list[int]
    records: list[dict[str, Any]]

    @classmethod
    def latest(cls, records: list[dict[str, Any]], alias: str) -> Rollout | None:
        mine = [r for r in records if r.get("alias") == alias]
        if not mine:
            return None
        rid = mine[-1]["rollout"]
        ours = [r for r in mine if r["rollout"] == rid]
        start = ours[0]
        if start["event"] != "start":
            raise CanaryError(f"rollout {rid}: log does not begin with a start record (found {start['event']!r})")
        return cls(rid, alias, start["stable"], start["candidate"], list(start["steps"]), ours)

    @property
    def last(self) -> dict[str, Any]:
        return self.records[-1]

    @property
    def effective_last(self) -> dict[str, Any]:
        """The last record that moves the state (``resume`` and ``conflict`` only annotate)."""
        return next(r for r in reversed(self.records) if r["event"] not in ("resume", "conflict"))

    @property
    def finished(self) -> bool:
        return self.effective_last["event"] in TERMINAL

    @property
    def promoted(self) -> bool:
        return self.effective_last["event"] == "promoted"

    def gates(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["event"] == "gate"]

    def baseline(self) -> VersionStats | None:
        """Stable's window figures from the latest step where it served enough requests."""
        for record in reversed(self.gates()):
            for gate in record.get("results", []):
                window = gate.get("details", {}).get("window")
                if gate["gate"] == "slo" and window and not gate["details"].get("stable_from_baseline"):
                    return VersionStats.from_dict(window["stable"])
        return None

    def next_action(self) -> tuple[str, int | None]:
        """What the controller does next: ("set_weight", step), ("observe", step), ("promote", None),
        ("rollback", None) or ("done", None)."""
        last = self.effective_last
        event = last["event"]
        if event in TERMINAL:
            return ("done", None)
        if event == "start":
            return ("set_weight", 0)
        if event == "set_weight":  # intent written; the weight may or may not be applied
            return ("set_weight", last["step"])
        if event == "weight_set":
            return ("observe", last["step"])
        if event == "gate":
            if not last["passed"]:
                return ("rollback", None)
            step = last["step"] + 1
            return ("set_weight", step) if step < len(self.steps) else ("promote", None)
        if event == "rollback":
            return ("rollback", None)
        if event == "promote":
            return ("promote", None)
        if event == "revert":
            return ("revert", None)
        raise CanaryError(f"rollout {self.id}: unknown record event {event!r}")


# ---------------------------------------------------------------------------------------
# The controller


@dataclass
class Outcome:
    rollout: str
    result: Literal["promoted", "rolled_back", "reverted"]
    reason: str
    candidate: str
    stable: str


def owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


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
                 router: Router, prober: Prober, metrics: MetricsSource, clock: Clock | None = None,
                 out: Callable[[str], None] = print, lease_s: float | None = None):
        self.policy = policy
        self.task = task
        self.rows = list(canary_rows)
        self.log = log
        self.router = router
        self.prober = prober
        self.metrics = metrics
        self.clock = clock or SystemClock()
        self.out = out
        self.me = owner()
        # Another host's controller counts as alive while its last record is younger than this.
        self.lease_s = lease_s if lease_s is not None else 2 * policy.step_window_s + 2 * policy.quality.timeout_s

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

    def run(self, candidate: str | None = None) -> Outcome:
        """Start a rollout of ``candidate``, or resume the unfinished one (``candidate`` None or equal)."""
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
        rollout = Rollout(uuid.uuid4().hex[:12], self.policy.alias, state.stable, candidate,
                          list(self.policy.steps), [])
        self._record(rollout, "start", stable=state.stable, candidate=candidate, steps=rollout.steps,
                     policy=self.policy.digest(), canary_set={"version": self.policy.canary_set.version,
                                                              "sha256": self.policy.canary_set.sha256,
                                                              "rows": len(self.rows)})
        self.out(f"rollout {rollout.id}: alias {rollout.alias!r} {rollout.stable} -> {candidate}, "
                 f"steps {', '.join(f'{s}%' for s in rollout.steps)}")
        return self._drive(rollout)

    def rollback(self, reason: str = "manual rollback") -> Outcome:
        """Abort the unfinished rollout, or revert the last promotion to its previous stable."""
        rollout = self.current()
        if rollout is None:
            raise CanaryError(f"no rollout recorded for alias {self.policy.alias!r}: nothing to roll back")
        if not rollout.finished:
            if rollout.effective_last["event"] != "rollback":
                self._record(rollout, "rollback", reason=reason)
            return self._drive(rollout)
        if rollout.promoted:
            self._record(rollout, "revert", reason=reason, to=rollout.stable)
            return self._drive(rollout)
        raise CanaryError(f"last rollout {rollout.id} on alias {self.policy.alias!r} ended "
                          f"{rollout.effective_last['event']}; nothing to roll back")

    def promote(self, reason: str = "manual promotion") -> Outcome:
        """Promote the unfinished rollout's candidate now, skipping the remaining gates."""
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
            if _pid_alive(int(who.get("pid", 0))):
                raise CanaryError(f"controller pid {who['pid']} is still running rollout {rollout.id}")
            return
        age = self.clock.now() - float(last["ts"])
        if age < self.lease_s:
            raise CanaryError(f"rollout {rollout.id} was advanced by {who.get('host')}:{who.get('pid')} "
                              f"{age:.0f}s ago (lease {self.lease_s:.0f}s); wait or `e2e-llm rollback`")

    def _apply(self, rollout: Rollout, state: AliasState) -> None:
        current = self.router.get(rollout.alias)
        moving_stable = rollout.effective_last["event"] in ("promote", "revert")
        allowed_stable = {rollout.stable, rollout.candidate} if moving_stable else {rollout.stable}
        if (current is None or current.stable not in allowed_stable
                or current.candidate not in (None, rollout.candidate)):
            self._record(rollout, "conflict", found=asdict(current) if current else None)
            raise CanaryError(f"alias {rollout.alias!r} was changed outside this rollout (found {current}); "
                              "not touching it: inspect and `e2e-llm rollback`")
        self.router.set(rollout.alias, state)

    def _drive(self, rollout: Rollout) -> Outcome:
        while True:
            action, step = rollout.next_action()
            if action == "done":
                return self._outcome(rollout)
            if action == "set_weight":
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
                       if r["event"] in ("rollback", "promote", "revert")), "")
        return Outcome(rollout.id, event, reason, rollout.candidate, rollout.stable)

    def _observe(self, rollout: Rollout, step: int) -> list[GateResult]:
        """One step: probe both versions (quality gate) first; a failed quality gate ends the step
        at once. Otherwise wait ``metrics_lag_s`` (so the probes' load and requests from before
        the weight change are out of the window), scrape, wait ``step_window_s``, scrape again
        and compare what each version served in between (SLO gate)."""
        quality = None if self.prober is None else self._quality(rollout)  # engine canary: SLO only
        if quality is not None and quality.status == "fail":
            return [quality]
        try:
            self.clock.sleep(self.policy.slo.metrics_lag_s)
            before = self.metrics.snapshot()
            self.clock.sleep(self.policy.step_window_s)
            after = self.metrics.snapshot()
            window = {v: after[v].minus(before.get(v)) for v in after}
            slo = slo_gate(window, rollout.stable, rollout.candidate, self.policy.slo, rollout.baseline())
        except Exception as exc:  # noqa: BLE001  (any failure to observe is a failed gate)
            slo = GateResult("slo", "error", f"metrics unavailable: {type(exc).__name__}: {exc}")
        return [slo] if quality is None else [quality, slo]

    def _quality(self, rollout: Rollout) -> GateResult:
        try:
            with ThreadPoolExecutor(2) as pool:
                futures = [pool.submit(self.prober.probe, v, self.rows, self.policy.quality)
                           for v in (rollout.stable, rollout.candidate)]
                stable_answers, candidate_answers = (f.result() for f in futures)
            return quality_gate(self.task, self.rows, stable_answers, candidate_answers, self.policy.quality)
        except Exception as exc:  # noqa: BLE001
            return GateResult("quality", "error", f"probing failed: {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------------------
# Tables


def _fmt(value: Any, count: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float)):
        return f"{value:g}" if count else f"{value:.3f}"
    return str(value)


def format_gate_table(gate_records: Sequence[dict[str, Any]]) -> str:
    """The decision table of one or more gate records: one line per check."""
    header = ("step", "weight", "gate", "metric", "stable", "candidate", "limit", "result")
    lines = [header]
    for record in gate_records:
        for result in record["results"]:
            checks = result.get("checks") or [{"metric": "-", "stable": None, "candidate": None, "limit": "-",
                                               "ok": None}]
            for check in checks:
                ok = check["ok"]
                count = check["metric"] in ("requests", "answered")
                lines.append((str(record["step"] + 1), f"{record['weight']}%", result["gate"], check["metric"],
                              _fmt(check["stable"], count), _fmt(check["candidate"], count), check["limit"],
                              "pass" if ok else ("-" if ok is None else "FAIL")))
        verdict = "PASS" if record["passed"] else "FAIL"
        lines.append((str(record["step"] + 1), f"{record['weight']}%", "decision", verdict, "", "", "",
                      record["reason"][:160]))
    widths = [max(len(row[i]) for row in lines) for i in range(len(header) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in lines)


def format_rollout(rollout: Rollout) -> str:
    head = (f"rollout {rollout.id}  alias {rollout.alias!r}  stable {rollout.stable}  candidate {rollout.candidate}  "
            f"state {rollout.effective_last['event']}")
    gates = rollout.gates()
    return head + ("\n" + format_gate_table(gates) if gates else "")
