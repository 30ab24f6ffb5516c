# SPDX-License-Identifier: Apache-2.0
"""The canary's quality gate and how its probes are sent.

:func:`quality_gate` scores the canary set's answers of stable and candidate with
:func:`e2e_llm.evaluate.evaluate`: the candidate fails when worse than stable by more than a
metric's margin. Rows without an answer (failed, timed out, or not probed yet) are bounded, not
guessed: the gate passes only if the candidate passes with every such row counted against it
(its missing answers wrong, stable's right), fails as soon as it fails with every such row
counted for it (its missing answers right, stable's wrong), and is otherwise undecided
(``inconclusive`` once every row was probed). A candidate that leaves more rows unanswered than
``min_answered`` allows, while stable answers, fails; a stable that does not answer makes the
gate inconclusive (the machine cannot judge). ``details["certain"]`` says the outcome can no
longer change, whatever the rows still to probe answer.

:func:`run_quality` sends the rows in chunks of ``concurrency``: stable first, under the current
load, then the candidate with a deadline of ``deadline_factor`` x stable's slowest answer of that
chunk (within ``min_timeout_s``..``timeout_s``), so a slow machine slows both and a candidate
is not sunk by timeouts stable would have had too; a probe that timed out is sent again
(``retries``); after each chunk the gate is evaluated and probing stops once it is certain.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from e2e_llm.canary_gates import Answer, Check, GateResult, Prober
from e2e_llm.canary_policy import QualityPolicy


def _scores(task, rows, stable: list[str | None], candidate: list[str | None]) -> dict[str, dict[str, Any]]:
    from e2e_llm.evaluate import evaluate

    references, inputs = [r["output"] for r in rows], [r["input"] for r in rows]
    return {name: {k: v for k, v in evaluate(task, texts, references, inputs).items()
                   if k not in ("per_function", "worst")}
            for name, texts in (("stable", stable), ("candidate", candidate))}


def _margin_checks(scores, policy: QualityPolicy, note: str) -> tuple[list[Check], list[str]]:
    checks, failures = [], []
    for metric, margin in policy.margins.items():
        s, c = scores["stable"][metric], scores["candidate"][metric]
        ok = c >= s - margin - 1e-9
        checks.append(Check("quality", metric, s, c, f">= {s - margin:.3f}{note}", ok))
        if not ok:
            failures.append(f"{metric} {c:.3f} < stable {s:.3f} - margin {margin:.3f}{note}")
    return checks, failures


def quality_gate(task, rows: Sequence[dict[str, str]], stable: Sequence[Answer | None],
                 candidate: Sequence[Answer | None], policy: QualityPolicy) -> GateResult:
    """Compare the versions' answers on the canary set (``None``: row not probed yet)."""
    n = len(rows)
    refs = [r["output"] for r in rows]

    def text(a: Answer | None) -> str | None:
        return a.text if a is not None else None

    probed = sum(a is not None for a in candidate)
    failed = {name: sum(a is not None and a.text is None for a in answers)
              for name, answers in (("stable", stable), ("candidate", candidate))}
    answered = {name: sum(text(a) is not None for a in answers)
                for name, answers in (("stable", stable), ("candidate", candidate))}
    unknown = {name: sum(text(a) is None for a in answers) for name, answers in (("stable", stable),
                                                                                  ("candidate", candidate))}
    allowed = policy.unanswered_allowed(n)
    first_error = {name: next(((a.error or "")[:120] for a in answers if a is not None and a.text is None), None)
                   for name, answers in (("stable", stable), ("candidate", candidate))}
    retried = sum(a.attempts > 1 for a in [*stable, *candidate] if a is not None)
    details: dict[str, Any] = {"rows": n, "probed": probed, "answered": answered, "retried": retried}
    if any(failed.values()):
        details["first_error"] = first_error
    answered_check = Check("quality", "answered", answered["stable"], answered["candidate"],
                           f">= {n - allowed} of {n}", None)
    # The candidate's worst case: its missing answers wrong, stable's right; its best: the reverse.
    worst = _scores(task, rows, [text(a) if text(a) is not None else ref for a, ref in zip(stable, refs)],
                    [text(a) for a in candidate])
    best = _scores(task, rows, [text(a) for a in stable],
                   [text(a) if text(a) is not None else ref for a, ref in zip(candidate, refs)])
    if any(unknown.values()):
        details["bounds"] = {"worst": worst, "best": best}
    details["examples"] = [{"input": r["input"], "reference": r["output"], "stable": text(s), "candidate": text(c)}
                           for r, s, c in list(zip(rows, stable, candidate))[:3] if s is not None]
    note = " (unanswered: for the candidate)" if any(unknown.values()) else ""
    best_checks, best_failures = _margin_checks(best, policy, note)
    if best_failures:  # fails even with every unknown row in the candidate's favour
        answered_check.ok = failed["candidate"] <= allowed and failed["stable"] <= allowed
        details.update(scores=best, certain=True)
        return GateResult("quality", "fail", "; ".join(best_failures), [answered_check, *best_checks], details)
    if failed["stable"] > allowed:
        answered_check.ok = False
        details.update(scores=worst, certain=True)
        return GateResult("quality", "inconclusive",
                          f"stable answered {answered['stable']}/{n} canary probes, too few to judge "
                          f"(first error: {first_error['stable']})", [answered_check], details)
    if failed["candidate"] > allowed:
        answered_check.ok = False
        details.update(scores=best, certain=True)
        return GateResult("quality", "fail",
                          f"candidate answered {answered['candidate']} of {probed} canary probes, stable "
                          f"{answered['stable']} (at most {allowed} of {n} may go unanswered; first error: "
                          f"{first_error['candidate']})", [answered_check, *best_checks], details)
    note = " (unanswered: against the candidate)" if any(unknown.values()) else ""
    worst_checks, worst_failures = _margin_checks(worst, policy, note)
    answered_check.ok = unknown["candidate"] <= allowed and unknown["stable"] <= allowed
    if not worst_failures and answered_check.ok:  # passes even with every unknown row against it
        details.update(scores=worst, certain=True)
        return GateResult("quality", "pass", f"candidate within margins on {n} rows"
                          + (f" ({probed} probed)" if probed < n else ""), [answered_check, *worst_checks], details)
    details.update(scores=worst, certain=probed == n)
    return GateResult("quality", "inconclusive",
                      f"undecided: {unknown['candidate']} candidate and {unknown['stable']} stable rows unanswered of "
                      f"{n}; passing needs {'; '.join(worst_failures) or 'fewer unanswered rows'}",
                      [answered_check, *worst_checks], details)


def candidate_deadline(stable: Sequence[Answer], policy: QualityPolicy) -> float:
    """``deadline_factor`` x stable's slowest answer, within ``min_timeout_s``..``timeout_s``
    (``timeout_s`` when stable answered nothing)."""
    latencies = [a.latency_s for a in stable if a.text is not None]
    if not latencies:
        return policy.timeout_s
    return min(policy.timeout_s, max(policy.min_timeout_s, policy.deadline_factor * max(latencies)))


def probe_with_retries(prober: Prober, version: str, rows: Sequence[dict[str, str]], policy: QualityPolicy,
                       timeout_s: float) -> list[Answer]:
    """The rows to ``version``; rows that timed out are sent again, up to ``policy.retries`` times."""
    answers = list(prober.probe(version, rows, policy, timeout_s))
    for attempt in range(2, policy.retries + 2):
        late = [i for i, a in enumerate(answers) if a.text is None and a.timed_out]
        if not late:
            break
        again = prober.probe(version, [rows[i] for i in late], policy, timeout_s)
        for i, answer in zip(late, again):
            answer.attempts = attempt
            answers[i] = answer
    return answers


def run_quality(prober: Prober, task, rows: Sequence[dict[str, str]], stable: str, candidate: str,
                policy: QualityPolicy) -> GateResult:
    """Probe chunk by chunk (stable, then the candidate with a deadline from stable's latency)
    until the quality gate is certain; the result's details say how far it got."""
    n = len(rows)
    stable_answers: list[Answer | None] = [None] * n
    candidate_answers: list[Answer | None] = [None] * n
    deadlines: list[float] = []
    result = quality_gate(task, rows, stable_answers, candidate_answers, policy)
    for start in range(0, n, policy.concurrency):
        part = list(rows[start:start + policy.concurrency])
        s = probe_with_retries(prober, stable, part, policy, policy.timeout_s)
        deadline = candidate_deadline(s, policy)
        deadlines.append(round(deadline, 3))
        c = probe_with_retries(prober, candidate, part, policy, deadline)
        stable_answers[start:start + len(part)] = s
        candidate_answers[start:start + len(part)] = c
        result = quality_gate(task, rows, stable_answers, candidate_answers, policy)
        if result.details["certain"]:
            break
    result.details["candidate_deadlines_s"] = deadlines
    return result
