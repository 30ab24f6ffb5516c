# SPDX-License-Identifier: Apache-2.0
"""The OpenAI ingress's request handling, fast: the real FastAPI app of ``e2e_llm.ingress``
(error handlers, body guard, auth, limits, routing, retry, stream errors, readiness) in front of
a fake engine handle, with the adapter store in a local folder. The same malformed-request
table runs against the live app in tests/integration/test_serve_resilience.py."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("ray.serve.llm")

from fastapi import HTTPException  # noqa: E402
from malformed import CASES, MAX_N, MAX_TOTAL_TOKENS, check_error, request_kwargs  # noqa: E402
from serve_fakes import BASE, KEY, fake_clock, make_api, post, publish  # noqa: E402


@pytest.fixture
def api(tmp_path, monkeypatch):
    return make_api(tmp_path, monkeypatch)


def test_the_table_has_at_least_41_kinds_of_malformed_request():
    assert len(CASES) >= 41 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_request_gets_its_status_and_an_openai_error_object(api, case):
    kwargs = request_kwargs(case, api.names, KEY)
    response = api.client.request(**kwargs)
    check_error(case, response.status_code, response.json(), api.names)


def test_after_every_malformed_request_the_app_still_answers(api):
    for case in CASES:
        api.client.request(**request_kwargs(case, api.names, KEY))
    for model in (BASE, "viggo", f"{BASE}:{api.names['adapter']}"):
        response = post(api, "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 4})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == "hi"


def test_requests_within_the_limits_pass(api):
    body = {"model": BASE, "messages": [{"role": "system", "content": "x"}, {"role": "developer", "content": "y"},
                                        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"},
                                        {"role": "user", "content": "b"}],
            "n": MAX_N, "max_tokens": MAX_TOTAL_TOKENS // MAX_N, "temperature": 2, "top_p": 1}
    assert post(api, "/v1/chat/completions", body).status_code == 200
    assert post(api, "/v1/completions", {"model": BASE, "prompt": "x", "max_tokens": 4,
                                         "logprobs": 5}).status_code == 200


def test_models_lists_published_adapters_and_aliases_and_each_has_a_card(api):
    ids = {m["id"] for m in api.client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]}
    adapter = api.names["adapter"]
    assert {BASE, f"{BASE}:{adapter}", f"{BASE}:viggo"} <= ids
    for model in (f"{BASE}:{adapter}", f"{BASE}:viggo", "viggo", BASE):
        card = api.client.get(f"/v1/models/{model}", headers={"Authorization": f"Bearer {KEY}"})
        assert card.status_code == 200, (model, card.text)


def test_a_replica_death_before_any_token_is_retried_once(api):
    api.engine.script = ["die", "ok"]
    response = post(api, "/v1/chat/completions", {"model": BASE, "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200, response.text
    assert len(api.engine.calls) == 2


def test_a_second_death_is_a_503_not_a_second_retry(api):
    api.engine.script = ["die", "die", "ok"]
    response = post(api, "/v1/chat/completions", {"model": BASE, "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 503 and response.json()["error"]["code"] == 503
    assert len(api.engine.calls) == 2


def test_no_retry_after_the_deadline(api):
    api.ingress._retry_deadline_s = 0.0
    api.engine.script = ["die", "ok"]
    response = post(api, "/v1/chat/completions", {"model": BASE, "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 503 and len(api.engine.calls) == 1


def test_a_stream_cut_after_tokens_ends_with_an_error_event_and_no_done(api):
    api.engine.script = ["cut"]
    body = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    response = post(api, "/v1/chat/completions", body)
    events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    assert json.loads(events[0])["choices"][0]["delta"]["content"] == "hel"
    error = json.loads(events[-1])["error"]
    assert error["code"] == 503 and "incomplete" in error["message"]
    assert "[DONE]" not in events
    assert len(api.engine.calls) == 1  # tokens were sent: never replayed


def test_a_whole_stream_ends_with_done(api):
    body = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    events = [line for line in post(api, "/v1/chat/completions", body).text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and not any('"error"' in e for e in events)


def _store_down(api, patch):
    def unreachable(*a, **kw):
        raise OSError("Connection refused (127.0.0.1:9)")

    patch.setattr(api.ingress._store, "aliases", unreachable)
    api.ingress._snapshot.loaded_at = min(api.ingress._snapshot.loaded_at, 0.0)  # the next request re-reads the store


def test_store_down_and_an_adapter_it_cannot_look_up_is_a_503_with_the_reason(api):
    post(api, "/v1/chat/completions", {"model": "viggo", "messages": [{"role": "user", "content": "hi"}]})
    body = {"model": f"{BASE}:viggo-v9", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with pytest.MonkeyPatch.context() as patch:
        _store_down(api, patch)
        response = post(api, "/v1/chat/completions", body)
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert "unreachable" in error["message"] and "Connection refused" in error["message"]
        assert response.headers["retry-after"]
        # the base model and adapters in the last good snapshot still serve
        assert post(api, "/v1/chat/completions", {**body, "model": "viggo"}).status_code == 200
        assert post(api, "/v1/chat/completions", {**body, "model": BASE}).status_code == 200
    api.ingress._snapshot.loaded_at = 0.0
    assert post(api, "/v1/chat/completions", body).status_code == 404  # store back: a real "no such adapter"


def test_what_was_published_just_after_the_snapshot_was_read_is_served_not_a_404(api, monkeypatch):
    """A snapshot half a second old is young enough to route by, not to say "no such model": a
    version, an alias and a model card published a moment before the request are found."""
    clock = fake_clock(monkeypatch)
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert post(api, "/v1/chat/completions", {**chat, "model": "viggo"}).status_code == 200  # snapshot read
    late = publish(api.store, api.root, "late")
    api.store.set_alias("fresh", stable=late)
    clock.now += 0.5
    reads = []
    read = api.ingress._store.adapter_ids
    monkeypatch.setattr(api.ingress._store, "adapter_ids", lambda: reads.append(1) or read())
    for model in (f"{BASE}:{late}", late, "fresh", f"{BASE}:fresh"):
        response = post(api, "/v1/chat/completions", {**chat, "model": model})
        assert response.status_code == 200 and response.json()["model"] == f"{BASE}:{late}", (model, response.text)
    card = api.client.get(f"/v1/models/{BASE}:{late}", headers={"Authorization": f"Bearer {KEY}"})
    assert card.status_code == 200 and card.json()["id"] == f"{BASE}:{late}"
    assert len(reads) == 1  # the first miss read the store; the clock stood still, the rest found it
    clock.now += 0.01
    response = post(api, "/v1/chat/completions", {**chat, "model": f"{BASE}:viggo-v9"})
    assert response.status_code == 404 and "viggo-v9" in response.json()["error"]["message"]
    assert len(reads) == 2  # a miss in a new request looked once more before saying no


def test_engine_404_for_an_adapter_while_the_store_is_down_is_a_503(api):
    adapter = f"{BASE}:{api.names['adapter']}"

    async def missing(method, body):
        raise HTTPException(404, "Unable to find LoRA adapter config file")
        yield  # an async generator, like the handle stream

    post(api, "/v1/chat/completions", {"model": "viggo", "messages": [{"role": "user", "content": "hi"}]})
    with pytest.MonkeyPatch.context() as patch:
        _store_down(api, patch)
        patch.setattr(api.engine, "_run", missing)
        response = post(api, "/v1/chat/completions", {"model": adapter, "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 503 and "unreachable" in response.json()["error"]["message"], response.text


def test_ready_reports_engine_and_store_and_is_503_while_the_engine_is_down(api, monkeypatch):
    import e2e_llm.ingress as ingress_module

    monkeypatch.setattr(ingress_module, "READY_TIMEOUT_S", 0.2)
    ready = api.client.get("/-/ready")  # open like Serve's probes: no key
    assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text
    _store_down(api, monkeypatch)
    degraded = api.client.get("/-/ready")
    assert degraded.status_code == 200 and degraded.json()["status"] == "degraded"
    assert "Connection refused" in degraded.json()["adapter_store"]["error"]
    api.engine.healthy = False
    down = api.client.get("/-/ready")
    assert down.status_code == 503 and down.json()["engines"][BASE].startswith("unavailable")


class _Recorder:
    def __init__(self):
        self.calls = []

    def inc(self, *args, tags=None):
        self.calls.append(tags)

    def observe(self, value, tags=None):
        self.calls.append(tags)


def test_a_stream_is_recorded_by_how_it_ended_and_a_client_that_left_is_499(api):
    """Engine finished: 200; engine failed: 503 (even if the client then leaves); client left
    mid-stream: 499, counted as a request but neither as an error nor in the latency SLO."""
    import asyncio

    from ray import exceptions as ray_exceptions

    ingress = api.ingress
    metrics = ingress._metrics
    metrics.requests, metrics.errors, metrics.latency = _Recorder(), _Recorder(), _Recorder()
    labels = {"model": BASE, "alias": "", "version": ""}

    async def engine(fail: bool = False):
        yield "data: {}\n\n"
        if fail:
            raise ray_exceptions.ActorDiedError()
        yield "data: [DONE]\n\n"

    async def consume(chunks, leave_after: int | None = None):
        stream = ingress._observed(chunks, labels, 0.0)
        read = 0
        async for _ in stream:
            read += 1
            if read == leave_after:
                await stream.aclose()  # what Starlette does when the client disconnects
                return

    asyncio.run(consume(engine()))
    asyncio.run(consume(engine(), leave_after=1))
    asyncio.run(consume(engine(fail=True), leave_after=2))  # read the error event, then left
    assert [c["status"] for c in metrics.requests.calls] == ["200", "499", "503"]
    assert [c["code"] for c in metrics.errors.calls] == ["503"]
    assert len(metrics.latency.calls) == 2  # not the 499


def test_a_request_whose_client_left_before_the_answer_is_recorded_as_499(api, monkeypatch):
    """Not streamed: the client went away while the engine worked; Serve cancels the handler."""
    import asyncio

    from ray.llm._internal.serve.core.configs.openai_api_models import ChatCompletionRequest

    ingress = api.ingress
    metrics = ingress._metrics
    metrics.requests, metrics.errors, metrics.latency = _Recorder(), _Recorder(), _Recorder()

    working = None

    async def engine_at_work(*args, **kwargs):
        working.set()
        await asyncio.sleep(60)

    monkeypatch.setattr(ingress, "_call_engine", engine_at_work)
    body = ChatCompletionRequest(model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=4)

    async def client_leaves():
        nonlocal working
        working = asyncio.Event()
        task = asyncio.create_task(ingress._serve(body, "chat", None))
        await asyncio.wait_for(working.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(client_leaves())
    assert [c["status"] for c in metrics.requests.calls] == ["499"]
    assert not metrics.errors.calls and not metrics.latency.calls
