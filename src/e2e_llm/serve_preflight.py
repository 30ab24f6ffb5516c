# SPDX-License-Identifier: Apache-2.0
"""Adapter preflight: before a canary gives a candidate adapter any user traffic, EVERY engine
replica serving its base model loads it and answers one short request through it, within a
deadline (``POST /-/preflight`` on the ingress, same auth as the API).

Request ``{"version", "messages", "max_tokens", "deadline_s"}`` (:class:`PreflightRequest`,
strict: a missing, unknown or out-of-range field is a 400 naming it); answer 200
``{"ok", "reason", "replicas": [{"replica", "ok", "reason", "latency_s"}]}``, ``ok`` only if
every replica answered. The ingress reaches every replica with Ray Serve's public
``DeploymentHandle.broadcast`` (with the adapter as the multiplexed model id, so each replica
loads it the way a routed request would); each replica runs :func:`answer_once` on its own
``chat`` (``e2e_llm.server.E2ELLMServer.preflight``); :func:`verdict` folds the reports.
Replicas that start after the broadcast are not checked: they load the adapter on first use.

No Ray import: the rules are unit-tested without a cluster.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt

# The ingress waits this much longer than the replicas' own deadline for their reports.
GRACE_S = 5.0
MAX_DEADLINE_S = 900.0
MAX_TOKENS = 256


class PreflightRequest(BaseModel):
    """The body of ``POST /-/preflight``."""

    model_config = ConfigDict(extra="forbid")

    version: Annotated[str, Field(min_length=1, description="adapter version ('<base>:<version>' when "
                                                            "serving several base models)")]
    messages: Annotated[list[dict[str, Any]], Field(min_length=1, description="chat messages of the one request")]
    max_tokens: Annotated[StrictInt, Field(ge=1, le=MAX_TOKENS)]
    deadline_s: Annotated[float, Field(gt=0, le=MAX_DEADLINE_S, description="per replica: load + one answer")]


class PreflightFailed(RuntimeError):
    """The engine answered the preflight request with an error, or with nothing."""


def report(replica: str, ok: bool, reason: str | None, latency_s: float | None) -> dict[str, Any]:
    return {"replica": replica, "ok": ok, "reason": reason,
            "latency_s": None if latency_s is None else round(latency_s, 3)}


def describe(exc: BaseException) -> str:
    """``Type: first line of the message`` (Ray and vLLM errors carry long tracebacks)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[-1] if lines and lines[0].startswith("ray::") else (lines[0] if lines else "")
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


async def _first_answer(chat: Callable[[Any], Awaitable[Any]], request: Any) -> None:
    stream = await chat(request)
    async for item in stream:
        for part in item if isinstance(item, list) else [item]:
            error = getattr(part, "error", None)
            if error is not None:
                raise PreflightFailed(f"the engine answered {getattr(error, 'code', '?')} "
                                      f"{getattr(error, 'type', '')}: {getattr(error, 'message', error)}")
            if getattr(part, "choices", None):
                return
    raise PreflightFailed("the engine ended the request without an answer")


async def answer_once(chat: Callable[[Any], Awaitable[Any]], request: Any, deadline_s: float,
                      replica: str) -> dict[str, Any]:
    """One replica's report: ``chat(request)`` (which loads the adapter first) answered within
    ``deadline_s``, or why not. Never raises."""
    start = time.monotonic()
    try:
        await asyncio.wait_for(_first_answer(chat, request), deadline_s)
    except TimeoutError:
        return report(replica, False, f"no answer within the deadline of {deadline_s:g} s (adapter load + one "
                                      "request)", None)
    except Exception as exc:  # noqa: BLE001  every failure is a report, the ingress decides
        return report(replica, False, describe(exc), time.monotonic() - start)
    return report(replica, True, None, time.monotonic() - start)


def verdict(reports: Sequence[Any]) -> dict[str, Any]:
    """The endpoint's answer from the replicas' reports (an exception in place of a report: that
    replica could not be asked, e.g. it died)."""
    replicas = [r if isinstance(r, dict) else report(f"replica-{i}", False, f"not reached: {describe(r)}", None)
                for i, r in enumerate(reports)]
    failed = [r for r in replicas if not r["ok"]]
    if not replicas:
        reason = "no engine replica answered the preflight"
    elif failed:
        reason = f"{len(failed)} of {len(replicas)} engine replica(s) failed: " + "; ".join(
            f"{r['replica']}: {r['reason']}" for r in failed[:3])
    else:
        reason = None
    return {"ok": bool(replicas) and not failed, "reason": reason, "replicas": replicas}


def timed_out(deadline_s: float) -> dict[str, Any]:
    """The answer when the replicas' reports did not arrive in time (the ingress's own deadline)."""
    return {"ok": False, "reason": f"deadline exceeded: the engine replicas did not report within "
                                   f"{deadline_s + GRACE_S:g} s", "replicas": []}
