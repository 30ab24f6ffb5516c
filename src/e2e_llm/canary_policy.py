# SPDX-License-Identifier: Apache-2.0
"""The canary policy (``configs/canary.yaml``) and the versioned canary set it names.

A policy says how a rollout moves (steps, window, what a rerun does) and what each gate
allows (quality margins, SLO limits); the canary set is a fixed, function-stratified sample of
val rows whose sha256 the policy records, so every rollout is judged on the same rows.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from e2e_llm.config import ConfigError, Strict, load_yaml_model
from e2e_llm.task import MRError, TaskSchema

DEFAULT_POLICY = "configs/canary.yaml"
QUALITY_METRICS = ("exact_match", "slot_f1", "valid_mr_rate", "function_accuracy")


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
    # Rows probed at once per version; the rows go in chunks of this size (stable, then the
    # candidate), and probing stops as soon as the gate's outcome is certain.
    concurrency: int = Field(8, ge=1)
    # The longest any probe may take (stable's probes always get this much).
    timeout_s: float = Field(120.0, gt=0)
    # The candidate's probe deadline: this many times the slowest stable answer of the same
    # chunk (measured just before, under the current load), within min_timeout_s..timeout_s.
    deadline_factor: float = Field(3.0, ge=1.0)
    min_timeout_s: float = Field(10.0, gt=0)
    # A probe that timed out is sent again this many times (the other rows are not).
    retries: int = Field(1, ge=0, le=3)
    # A version may leave at most (1 - min_answered) of the rows unanswered: more on the candidate
    # (while stable answers) fails the gate, more on stable makes it inconclusive.
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

    @model_validator(mode="after")
    def _timeouts_fit(self) -> QualityPolicy:
        if self.min_timeout_s > self.timeout_s:
            raise ValueError(f"min_timeout_s {self.min_timeout_s:g} exceeds timeout_s {self.timeout_s:g}")
        return self

    def unanswered_allowed(self, rows: int) -> int:
        """How many of ``rows`` probes a version may leave unanswered (min_answered)."""
        return math.floor((1.0 - self.min_answered) * rows + 1e-9)


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
    # The window is scraped every poll_s: it ends early once the candidate's errors exceed the
    # whole window's error budget (its request rate so far times budget_rate_factor, at the
    # allowed error rate), and it is extended up to max_window_s while either version has served
    # fewer than min_requests (None: never extended).
    poll_s: float = Field(15.0, gt=0)
    budget_rate_factor: float = Field(2.0, ge=1.0)
    max_window_s: float | None = Field(None, gt=0)


class PreflightPolicy(Strict):
    # Before any traffic: every engine replica serving the alias loads the candidate and answers
    # one canary row (the ingress's POST /-/preflight), within deadline_s.
    enabled: bool = True
    deadline_s: float = Field(180.0, gt=0, le=900)
    # Enough tokens to prove the adapter generates; the quality gate judges the answers.
    max_tokens: int = Field(8, ge=1, le=256)


class CanaryPolicy(Strict):
    alias: str = Field(min_length=1)
    # Percent of alias traffic sent to the candidate at each step, increasing.
    steps: list[int] = Field(min_length=1)
    # Each step lasts at least this long (the SLO window); quality probes run inside it.
    step_window_s: float = Field(gt=0)
    # What a rerun does with an unfinished rollout: continue it, or roll it back.
    on_resume: Literal["continue", "rollback"] = "continue"
    # Quality before traffic: the quality gate on the canary set at 0% user weight (after the
    # preflight); only a candidate that passes gets user traffic.
    shadow: bool = True
    canary_set: CanarySetSpec
    preflight: PreflightPolicy = Field(default_factory=PreflightPolicy)
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
        if self.slo.max_window_s is not None and self.slo.max_window_s < self.step_window_s:
            raise ValueError(f"slo.max_window_s {self.slo.max_window_s:g} is below "
                             f"step_window_s {self.step_window_s:g}")
        return self

    def pretraffic(self) -> list[str]:
        """The checks before the first weight change, in order."""
        return [name for name, on in (("preflight", self.preflight.enabled), ("shadow", self.shadow)) if on]

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
    """Select and write the canary set; returns the policy's ``canary_set`` block for it. A version
    is immutable: a policy pins its file by sha256, so other rows under an existing file's name
    are refused (the same rows again are fine)."""
    picked = select_canary_rows(rows, task, n)
    if len(picked) < n:
        raise ConfigError(f"only {len(picked)} rows available for a canary set of {n}")
    text = canary_set_text(picked)
    if path.is_file() and (old := _sha256(path.read_text(encoding="utf-8"))) != _sha256(text):
        raise ConfigError(f"{path} exists with other rows (sha256 {old}): a canary set version never "
                          "changes, since a policy pins it by sha256; pick a new --version (or --output)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return {"path": str(path), "version": version, "sha256": _sha256(text), "rows": len(picked),
            "max_reference_tokens": max(count_tokens(r["output"]) for r in picked)}


def load_canary_set(policy: CanaryPolicy, root: Path, system_prompt: str | None = None,
                    task: TaskSchema | None = None) -> list[dict[str, str]]:
    """The policy's canary rows, after checking the file against the recorded sha256 and, where
    the profile sets ``data.system_prompt``, that every row asks with it (as the adapters were
    trained): a set made before the prompt changed would score every candidate as broken. So
    would a set made for another task (the default policy's is VIGGO's): with ``task``, every
    reference must be one of its meaning representations."""
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
        if system_prompt and row["instruction"] != system_prompt:
            raise ConfigError(f"{path}:{number}: instruction is not the profile's data.system_prompt "
                              f"{system_prompt!r}; remake the set with `e2e-llm canary-set`")
        if task is not None:
            try:
                task.parse(row["output"])
            except MRError as exc:
                raise ConfigError(f"{path}:{number}: output is not a meaning representation of the profile's task "
                                  f"{task.name!r} ({exc}); make this task's set with `e2e-llm canary-set` and "
                                  "point canary.policy at a policy for it") from None
        rows.append(row)
    if len(rows) != spec.rows:
        raise ConfigError(f"{path}: {len(rows)} rows, policy says canary_set.rows {spec.rows}")
    return rows[: policy.quality.max_rows] if policy.quality.max_rows else rows
