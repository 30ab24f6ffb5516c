# SPDX-License-Identifier: Apache-2.0
"""Candidate fallback on the data path: an alias request drawn to the candidate that fails
before any token (cannot be loaded, 5xx, 404, gone from the store) is answered once by the
alias's stable version, and the candidate's failure is in the per-version metrics the canary's
SLO gate reads; requests the engine refuses, explicit versions and streams that already sent
tokens are not replayed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("ray.serve.llm")

from fastapi import HTTPException  # noqa: E402
from ray.llm._internal.serve.core.configs.openai_api_models import ErrorResponse  # noqa: E402
from serve_fakes import BASE, FakeCounter, load_failure, make_api, post, publish  # noqa: E402

from e2e_llm.canary_io import REQUESTS, stats_from_samples  # noqa: E402

CHAT = {"model": "viggo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture
def api(tmp_path, monkeypatch):
    """The fake app with alias viggo: stable = names["adapter"], candidate = names["candidate"]
    at weight 1 (every alias request is drawn to the candidate); metrics captured."""
    api = make_api(tmp_path, monkeypatch)
    candidate = publish(api.store, tmp_path, "cand")
    api.store.set_alias("viggo", stable=api.names["adapter"], candidate=candidate, candidate_weight=1.0)
    api.ingress._snapshot.loaded_at = float("-inf")
    api.names["candidate"] = candidate
    api.models = {role: f"{BASE}:{api.names[role]}" for role in ("adapter", "candidate")}
    for name in ("requests", "errors", "latency", "fallbacks"):
        setattr(api.ingress._metrics, name, FakeCounter())
    return api


def requests_by_version(api) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for _, tags in api.ingress._metrics.requests.seen:
        out.setdefault(tags["version"], []).append(tags["status"])
    return out


def gate_view(api, count_client_errors: bool):
    """What the SLO gate's scrape makes of the requests counter (canary_io)."""
    samples = [(REQUESTS, tags, value) for value, tags in api.ingress._metrics.requests.seen]
    return stats_from_samples(samples, "viggo", count_client_errors)


CANDIDATE_FAILURES = {
    "adapter cannot be loaded": lambda model: load_failure(model),
    "adapter config missing": lambda model: HTTPException(404, "Unable to find LoRA adapter config file"),
    "engine error before the first token": lambda model: ErrorResponse.model_validate(
        {"error": {"message": "engine exploded", "type": "InternalServerError", "code": 500}}),
}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("failure", list(CANDIDATE_FAILURES))
def test_a_failing_candidate_is_answered_by_stable_and_counted_against_the_candidate(api, failure, stream):
    api.engine.broken[api.models["candidate"]] = CANDIDATE_FAILURES[failure](api.models["candidate"])
    response = post(api, "/v1/chat/completions", {**CHAT, "stream": stream})
    assert response.status_code == 200, response.text
    if stream:
        events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and not any('"error"' in e for e in events)
        assert json.loads(events[0])["model"] == api.models["adapter"]
    else:
        assert response.json()["model"] == api.models["adapter"]  # stable's answer
    assert [model for _, model in api.engine.calls] == [api.models["candidate"], api.models["adapter"]]
    assert requests_by_version(api) == {api.names["candidate"]: ["502"], api.names["adapter"]: ["200"]}
    [(_, fallback)] = api.ingress._metrics.fallbacks.seen
    assert fallback["version"] == api.names["candidate"] and fallback["alias"] == "viggo"
    assert fallback["code"] in ("404", "500")
    # the SLO gate sees a candidate error, even when it ignores client errors; stable is clean
    for count_client_errors in (True, False):
        view = gate_view(api, count_client_errors)
        assert view[api.names["candidate"]].errors == 1 and view[api.names["adapter"]].errors == 0


def test_a_candidate_gone_from_the_store_is_answered_by_stable_without_calling_it(api):
    shutil.rmtree(Path(api.store.uri) / api.names["candidate"])
    api.ingress._snapshot.loaded_at = float("-inf")
    for _ in range(3):
        response = post(api, "/v1/chat/completions", CHAT)
        assert response.status_code == 200 and response.json()["model"] == api.models["adapter"]
    assert [model for _, model in api.engine.calls] == [api.models["adapter"]] * 3
    assert requests_by_version(api)[api.names["candidate"]] == ["502"] * 3
    assert {tags["code"] for _, tags in api.ingress._metrics.fallbacks.seen} == {"404"}


def test_fallback_happens_once_then_stables_error_is_the_answer(api):
    api.engine.broken[api.models["candidate"]] = load_failure(api.models["candidate"])
    api.engine.broken[api.models["adapter"]] = RuntimeError("stable is down too")
    response = post(api, "/v1/chat/completions", CHAT)
    assert response.status_code == 500 and response.json()["error"]["code"] == 500
    assert len(api.engine.calls) == 2
    assert requests_by_version(api) == {api.names["candidate"]: ["502"], api.names["adapter"]: ["500"]}


def test_a_request_the_engine_refuses_is_not_replayed_on_stable(api):
    long = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}  # the fake's context check: 400
    response = post(api, "/v1/chat/completions", long)
    assert response.status_code == 400 and len(api.engine.calls) == 1
    assert api.ingress._metrics.fallbacks.seen == []
    assert requests_by_version(api) == {api.names["candidate"]: ["400"]}


def test_an_explicit_version_is_never_swapped_for_another(api):
    api.engine.broken[api.models["candidate"]] = load_failure(api.models["candidate"])
    response = post(api, "/v1/chat/completions", {**CHAT, "model": api.models["candidate"]})
    assert response.status_code == 500 and len(api.engine.calls) == 1
    assert api.ingress._metrics.fallbacks.seen == []


def test_a_failing_stable_is_not_replayed_either(api):
    api.store.set_alias("viggo", stable=api.names["adapter"])  # no candidate
    api.ingress._snapshot.loaded_at = float("-inf")
    api.engine.broken[api.models["adapter"]] = load_failure(api.models["adapter"])
    response = post(api, "/v1/chat/completions", CHAT)
    assert response.status_code == 500 and len(api.engine.calls) == 1


def test_a_candidate_stream_cut_after_tokens_ends_with_an_error_event_not_a_replay(api):
    api.engine.script = ["cut"]
    response = post(api, "/v1/chat/completions", {**CHAT, "stream": True})
    events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    assert json.loads(events[0])["choices"][0]["delta"]["content"] == "hel"
    assert "incomplete" in json.loads(events[-1])["error"]["message"] and "[DONE]" not in events
    assert [model for _, model in api.engine.calls] == [api.models["candidate"]]
    assert requests_by_version(api) == {api.names["candidate"]: ["503"]}
