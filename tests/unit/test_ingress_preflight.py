# SPDX-License-Identifier: Apache-2.0
"""``POST /-/preflight``: the ingress asks EVERY engine replica (a broadcast) to load a
candidate adapter and answer one request through it, and says ok only if all did in time;
and the replica's side, ``E2ELLMServer.preflight``, through Ray's own chat path."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve.llm")

import ray.serve  # noqa: E402
from serve_fakes import BASE, KEY, fake_clock, fake_server, load_failure, make_api, post, publish  # noqa: E402

MESSAGES = [{"role": "user", "content": "Name a video game."}]


@pytest.fixture
def api(tmp_path, monkeypatch):
    return make_api(tmp_path, monkeypatch)


def preflight(api, **overrides):
    body = {"version": api.names["adapter"], "messages": MESSAGES, "max_tokens": 4, "deadline_s": 5.0, **overrides}
    return post(api, "/-/preflight", body)


def test_every_replica_loads_the_adapter_and_answers_then_ok(api):
    api.engine.replicas = {"replica-a": "ok", "replica-b": "ok"}
    response = preflight(api)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["ok"] is True and answer["reason"] is None
    assert sorted(r["replica"] for r in answer["replicas"]) == ["replica-a", "replica-b"]
    assert all(r["ok"] and r["reason"] is None and r["latency_s"] >= 0 for r in answer["replicas"])
    # one broadcast, with the adapter as the multiplexed model id (how a replica loads it)
    [(method, options, request, deadline_s)] = api.engine.broadcasts
    model = f"{BASE}:{api.names['adapter']}"
    assert (method, options["multiplexed_model_id"], request.model, deadline_s) == ("preflight", model, model, 5.0)
    assert request.stream is False and vars(request)["max_tokens"] == 4 and request.temperature == 0.0


def test_one_replica_failing_to_load_makes_it_not_ok_with_that_replicas_reason(api):
    api.engine.replicas = {"replica-a": "ok", "replica-b": "load-fails"}
    answer = preflight(api).json()
    assert answer["ok"] is False
    by_name = {r["replica"]: r for r in answer["replicas"]}
    assert by_name["replica-a"]["ok"] is True
    assert by_name["replica-b"]["ok"] is False and "Failed to load lora model" in by_name["replica-b"]["reason"]
    assert answer["reason"].startswith("1 of 2 engine replica(s) failed: replica-b: ValueError: Failed to load")


def test_a_replica_past_the_deadline_makes_it_not_ok(api):
    api.engine.replicas = {"replica-a": "ok", "replica-b": "slow"}
    answer = preflight(api, deadline_s=0.3).json()
    assert answer["ok"] is False
    slow = next(r for r in answer["replicas"] if r["replica"] == "replica-b")
    assert slow["ok"] is False and "no answer within the deadline of 0.3 s" in slow["reason"]
    assert slow["latency_s"] is None


def test_replicas_that_never_report_hit_the_ingress_deadline(api, monkeypatch):
    import e2e_llm.ingress as ingress_module

    monkeypatch.setattr(ingress_module, "GRACE_S", 0.2)
    api.engine.replicas = {"replica-a": "ok", "replica-b": "hang"}
    answer = preflight(api, deadline_s=0.2).json()
    assert answer["ok"] is False and answer["reason"].startswith("deadline exceeded")


def test_a_dead_replica_makes_it_not_ok(api):
    api.engine.replicas = {"replica-a": "ok", "replica-b": "dead"}
    answer = preflight(api).json()
    assert answer["ok"] is False and "not reached: ActorDiedError" in answer["reason"]


def test_no_running_replica_is_a_503(api, monkeypatch):
    from ray.serve._private.common import DeploymentID
    from ray.serve.exceptions import DeploymentUnavailableError

    def unavailable(*args):
        raise DeploymentUnavailableError(DeploymentID(name="LLMServer", app_name="llm"))

    monkeypatch.setattr(api.engine, "broadcast", unavailable)
    response = preflight(api)
    assert response.status_code == 503 and "no engine replica" in response.json()["error"]["message"]


@pytest.mark.parametrize(("change", "field"), [
    ({"deadline_s": None}, "deadline_s"),
    ({"deadline_s": 0}, "deadline_s"),
    ({"deadline_s": "soon"}, "deadline_s"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "4"}, "max_tokens"),
    ({"max_tokens": 100000}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"version": ""}, "version"),
    ({"version": None}, "version"),
    ({"timeout": 3}, "timeout"),
])
def test_a_bad_body_is_a_400_naming_the_field(api, change, field):
    body = {"version": api.names["adapter"], "messages": MESSAGES, "max_tokens": 4, "deadline_s": 5.0}
    body.update(change)
    body = {k: v for k, v in body.items() if v is not None}
    response = post(api, "/-/preflight", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and field.split(".")[0] in error["message"]
    assert api.engine.broadcasts == []


@pytest.fixture
def clock(monkeypatch):
    return fake_clock(monkeypatch)


def test_a_version_published_just_after_the_snapshot_was_read_passes_its_preflight(api, clock):
    """The canary publishes, then preflights at once (0.9 s apart on a fast CPU): the snapshot,
    read just before the publish, is young enough to route by but must not answer "no such
    version"; a read begun after the request came in must."""
    assert preflight(api).status_code == 200  # the snapshot is read now
    late = publish(api.store, api.root, "late")
    clock.now += 0.5
    response = preflight(api, version=late)
    assert response.status_code == 200, response.text


def test_a_version_published_while_the_snapshot_was_read_passes_its_preflight(api, clock, monkeypatch):
    """A snapshot is as old as the start of its read: one published during a slow read (5 s)
    is missing from it, and the next preflight for it reads again."""
    read = api.ingress._store.adapter_ids
    published = []

    def slow_read_during_which_a_version_is_published():
        ids = read()
        if not published:
            published.append(publish(api.store, api.root, "late"))
            clock.now += 5.0
        return ids

    monkeypatch.setattr(api.ingress._store, "adapter_ids", slow_read_during_which_a_version_is_published)
    assert preflight(api).status_code == 200  # this request's snapshot read saw no "late" version
    assert published and published[0] not in api.ingress._snapshot.adapters
    response = preflight(api, version=published[0])
    assert response.status_code == 200, response.text


def test_an_unpublished_version_is_a_404_naming_it(api):
    response = preflight(api, version="viggo-v99")
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["param"] == "version" and "viggo-v99" in error["message"] and error["code"] == 404
    assert preflight(api, version=f"other-base:{api.names['adapter']}").status_code == 404
    assert preflight(api, version=f"{BASE}:{api.names['adapter']}").status_code == 200


def test_preflight_needs_the_api_key(api):
    body = {"version": api.names["adapter"], "messages": MESSAGES, "max_tokens": 4, "deadline_s": 5.0}
    response = api.client.post("/-/preflight", json=body)
    assert response.status_code == 401 and api.engine.broadcasts == []
    wrong = api.client.post("/-/preflight", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert api.client.post("/-/preflight", json=body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert api.client.get("/-/ready").status_code == 200  # the readiness probe stays open


def controller_client(api, key: str = KEY):
    """The canary controller's preflight client (canary_io.HttpPreflight) talking to this app."""
    from e2e_llm.canary_io import HttpPreflight

    def post(url, data, headers, timeout):
        response = api.client.post(url.removeprefix("http://testserver"), content=data, headers=headers)
        return response.status_code, response.content

    return HttpPreflight("http://testserver/v1", api_key=key, post=post)


def test_the_controllers_client_and_the_endpoint_agree_on_the_contract(api):
    from e2e_llm.canary_gates import preflight_gate

    row = {"instruction": "Turn the text into a meaning representation.", "input": "Halo 3 is a shooter."}
    api.engine.replicas = {"replica-a": "ok", "replica-b": "ok"}
    passed = controller_client(api).check(api.names["adapter"], row, 5.0, 8)
    assert passed.ok and len(passed.replicas) == 2 and preflight_gate(passed).status == "pass"
    [(_, _, request, _)] = api.engine.broadcasts
    assert [m["role"] for m in request.messages] == ["system", "user"]
    api.engine.replicas = {"replica-a": "ok", "replica-b": "load-fails"}
    failed = controller_client(api).check(api.names["adapter"], row, 5.0, 8)
    gate = preflight_gate(failed)
    assert not failed.ok and gate.status == "fail" and "replica-b: ValueError: Failed to load lora" in gate.reason
    unauthorized = controller_client(api, key="wrong").check(api.names["adapter"], row, 5.0, 8)
    assert not unauthorized.ok and "HTTP 401" in unauthorized.reason
    unknown = controller_client(api).check("viggo-v99", row, 5.0, 8)
    assert not unknown.ok and "HTTP 404" in unknown.reason and "viggo-v99" in unknown.reason


# -- the replica's side --------------------------------------------------------------------


@pytest.fixture
def replica(monkeypatch, tmp_path):
    """E2ELLMServer.preflight's view of Serve: replica r1 of LLMServer:base, a request for
    base:viggo-v2 with it as the multiplexed model id."""
    from ray.serve.llm.openai_api_models import ChatCompletionRequest

    from e2e_llm.server import E2ELLMServer

    model = f"{BASE}:viggo-v2"
    monkeypatch.setattr(ray.serve, "get_replica_context",
                        lambda: SimpleNamespace(deployment="LLMServer:base", replica_tag="r1"))
    monkeypatch.setattr(ray.serve, "get_multiplexed_model_id", lambda: model)
    (tmp_path / "viggo-v2").mkdir()
    (tmp_path / "viggo-v2" / "adapter_config.json").write_text("{}")  # the store is fine
    server = fake_server(E2ELLMServer, lora_root=str(tmp_path))
    request = ChatCompletionRequest(model=model, messages=MESSAGES, max_tokens=4, stream=False)
    return SimpleNamespace(server=server, request=request, patch=monkeypatch)


def test_the_replica_loads_the_adapter_then_answers_once(replica):
    report = asyncio.run(replica.server.preflight(replica.request, 5.0))
    assert report["replica"] == "LLMServer:base#r1" and report["ok"] is True and report["reason"] is None
    assert report["latency_s"] >= 0.05  # the fake adapter download


def test_the_replica_reports_vllm_rejecting_the_adapter_as_it_is(replica):
    replica.server.engine.lora_error = load_failure(replica.request.model)
    report = asyncio.run(replica.server.preflight(replica.request, 5.0))
    assert report["ok"] is False
    # vLLM's own reason, not "the store was unreachable" (the store answers: the weights are bad)
    assert report["reason"].startswith("ValueError: Failed to load lora model") and "store" not in report["reason"]


def test_the_replica_reports_a_missed_deadline(replica):
    replica.server.engine.delay_s = 5.0
    report = asyncio.run(replica.server.preflight(replica.request, 0.2))
    assert report["ok"] is False and "deadline of 0.2 s" in report["reason"]


def test_a_preflight_without_the_adapter_as_multiplexed_model_id_fails_loudly(replica):
    replica.patch.setattr(ray.serve, "get_multiplexed_model_id", lambda: "")
    report = asyncio.run(replica.server.preflight(replica.request, 5.0))
    assert report["ok"] is False and "multiplexed model id" in report["reason"]
