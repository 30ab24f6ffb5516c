# SPDX-License-Identifier: Apache-2.0
"""The rollout log: one JSON line per controller decision, in the adapter store
(``rollouts-<alias>.jsonl``), and the rollout state read back from it.

The log is the rollouts' source of truth and their lock. Every append is a compare-and-swap on
the log object (:mod:`e2e_llm.cas`): it succeeds only if the log is still exactly what this
writer last read or wrote, so of two controllers racing on one alias exactly one appends its
``start`` (or ``resume``) record and owns the rollout; the other gets
:class:`ConcurrentRolloutError` without writing anything.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from e2e_llm import cas
from e2e_llm.canary_gates import VersionStats


class CanaryError(RuntimeError):
    """A rollout that cannot start or continue (with what to do about it)."""


class ConcurrentRolloutError(CanaryError):
    """Another controller wrote to the rollout log."""


# ---------------------------------------------------------------------------------------
# The rollout log


def owner() -> dict[str, Any]:
    """Who writes a record: host and pid, plus an id that tells two controllers of one process apart."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "id": uuid.uuid4().hex[:12]}


class RolloutLog:
    """Append-only JSON lines at a storage URI (local path, s3://, gs://).

    Object stores cannot append, so each append rewrites the object with one more line, as a
    compare-and-swap against the version this writer last read or wrote: if another controller
    wrote in between, the append fails without writing (:class:`ConcurrentRolloutError`).
    """

    def __init__(self, uri: str, storage_kw: dict[str, Any] | None = None):
        self.uri = uri
        self.kw = dict(storage_kw or {})  # endpoint_url/region of an S3-compatible store
        self._seen: cas.Versioned | None = None

    def read(self) -> list[dict[str, Any]]:
        self._seen = cas.read(self.uri, **self.kw)
        records = []
        for number, line in enumerate((self._seen.data or b"").decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise CanaryError(f"{self.uri}:{number}: corrupt rollout record ({exc.msg})") from None
        return records

    def _changed(self) -> ConcurrentRolloutError:
        return ConcurrentRolloutError(
            f"{self.uri} changed under this controller (another `e2e-llm canary/rollback/promote` wrote to it); "
            "stopping without writing")

    def verify(self) -> None:
        """Raise :class:`ConcurrentRolloutError` if the log changed since this writer's last read or write."""
        if self._seen is not None and cas.read(self.uri, **self.kw).token != self._seen.token:
            raise self._changed()

    def append(self, record: dict[str, Any]) -> None:
        seen = self._seen if self._seen is not None else cas.read(self.uri, **self.kw)
        data = (seen.data or b"") + json.dumps(record, sort_keys=True).encode("utf-8") + b"\n"
        try:
            token = cas.write(self.uri, data, seen.token, **self.kw)
        except cas.PreconditionFailed:
            raise self._changed() from None
        self._seen = cas.Versioned(data, token)


# ---------------------------------------------------------------------------------------
# Rollout state, reconstructed from the log

TERMINAL = ("promoted", "rolled_back", "reverted", "rejected")
# Checks before any traffic (records of their own; a failed one rejects the candidate without
# touching the alias), and the records the decision table shows.
PRETRAFFIC = ("preflight", "shadow")
DECISIONS = (*PRETRAFFIC, "gate")


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
        """The decision records: pre-traffic checks and step gates."""
        return [r for r in self.records if r["event"] in DECISIONS]

    @property
    def pretraffic(self) -> list[str]:
        """The checks this rollout runs before any traffic (named in its start record)."""
        return list(self.records[0].get("pretraffic", []))

    @property
    def weight_moved(self) -> bool:
        """Whether this rollout ever wrote an intent to give the candidate traffic."""
        return any(r["event"] == "set_weight" for r in self.records)

    def baseline(self) -> VersionStats | None:
        """Stable's window figures from the latest step where it served enough requests."""
        for record in reversed([r for r in self.records if r["event"] == "gate"]):
            for gate in record.get("results", []):
                window = gate.get("details", {}).get("window")
                if gate["gate"] == "slo" and window and not gate["details"].get("stable_from_baseline"):
                    return VersionStats.from_dict(window["stable"])
        return None

    def next_action(self) -> tuple[str, int | None]:
        """What the controller does next: ("preflight", None), ("shadow", None), ("reject", None),
        ("set_weight", step), ("observe", step), ("promote", None), ("rollback", None),
        ("revert", None) or ("done", None)."""
        last = self.effective_last
        event = last["event"]
        if event in TERMINAL:
            return ("done", None)
        if event in ("start", *PRETRAFFIC):
            if event != "start" and not last["passed"]:
                return ("reject", None)
            checks = self.pretraffic
            following = checks[checks.index(event) + 1:] if event in checks else checks
            return (following[0], None) if following else ("set_weight", 0)
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
        step = record["event"] if record["event"] in PRETRAFFIC else str(record["step"] + 1)
        for result in record["results"]:
            checks = result.get("checks") or [{"metric": "-", "stable": None, "candidate": None, "limit": "-",
                                               "ok": None}]
            for check in checks:
                ok = check["ok"]
                count = check["metric"] in ("requests", "answered")
                lines.append((step, f"{record['weight']}%", result["gate"], check["metric"],
                              _fmt(check["stable"], count), _fmt(check["candidate"], count), check["limit"],
                              "pass" if ok else ("-" if ok is None else "FAIL")))
        verdict = "PASS" if record["passed"] else "FAIL"
        lines.append((step, f"{record['weight']}%", "decision", verdict, "", "", "",
                      record["reason"][:160]))
    widths = [max(len(row[i]) for row in lines) for i in range(len(header) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in lines)


def format_rollout(rollout: Rollout) -> str:
    head = (f"rollout {rollout.id}  alias {rollout.alias!r}  stable {rollout.stable}  candidate {rollout.candidate}  "
            f"state {rollout.effective_last['event']}")
    gates = rollout.gates()
    return head + ("\n" + format_gate_table(gates) if gates else "")
