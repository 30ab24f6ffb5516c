# SPDX-License-Identifier: Apache-2.0
"""The live app under abuse and failure (the shared ``serve_app``): the malformed-request table,
the adapter store stopped and restarted under it, and the engine replica SIGKILLed under load.
The kill test runs last: the app recovers, but slowly."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path

import httpx
import pytest
from malformed import CASES, check_error, request_kwargs
from serving import alive, engine_replica_pids

from e2e_llm.cpu_pinning import descendant_pids

pytestmark = [pytest.mark.serve, pytest.mark.slow]
HI = [{"role": "user", "content": "Say hi"}]


def _names(app) -> dict[str, str]:
    return {"base": app.model_id, "alias": app.alias, "adapter": app.adapters["trained"]}


def _chat(app, model, timeout=120, **kw):
    body = {"model": model, "messages": HI, "max_tokens": 4, "temperature": 0.0, **kw}
    return httpx.post(f"{app.openai_base_url}/chat/completions", json=body, headers=app.headers, timeout=timeout)


def _wait(what, check, timeout):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last is True:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(1)
    pytest.fail(f"{what} not within {timeout} s (last: {last})")


def test_every_malformed_request_gets_its_status_and_an_openai_error_then_the_app_answers(serve_app):
    names = _names(serve_app)
    failures = []
    with httpx.Client(base_url=serve_app.base_url, timeout=120) as client:
        for case in CASES:
            kwargs = request_kwargs(case, names, serve_app.api_key)
            response = client.request(**kwargs)
            try:
                check_error(case, response.status_code, response.json(), names)
            except (AssertionError, ValueError) as exc:
                failures.append(f"{case.id}: {exc} -- {response.status_code} {response.text[:300]}")
    assert not failures, "\n".join(failures)
    for model in (serve_app.model_id, serve_app.alias):
        response = _chat(serve_app, model)
        assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"], response.text


def test_models_and_model_cards_list_published_adapters_and_aliases(serve_app):
    base, adapter = serve_app.model_id, serve_app.adapters["trained"]
    for model in (f"{base}:{adapter}", f"{base}:{serve_app.alias}", base):
        card = httpx.get(f"{serve_app.openai_base_url}/models/{model}", headers=serve_app.headers, timeout=30)
        assert card.status_code == 200 and card.json()["id"] == model, card.text


def test_ready_is_open_and_reports_engine_and_store(serve_app):
    ready = httpx.get(f"{serve_app.base_url}/-/ready", timeout=30)
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"] == "ready" and ready.json()["engines"] == {serve_app.model_id: "ok"}
    # The test app runs Serve's high-throughput mode, as the profiles do: the ingress calls the
    # engine over gRPC, as on a cluster, wherever the app was built.
    assert serve_app.config.serve.high_throughput and ready.json()["engine_calls"] == "grpc"


def test_store_down_gives_503_for_an_unloaded_adapter_and_it_loads_once_the_store_is_back(serve_app, s3_store,
                                                                                            local_model, tmp_path):
    from adapters import make_lora_adapter

    adapter = serve_app.store.publish(make_lora_adapter(local_model, tmp_path / "fresh"), name="fresh")
    model = f"{serve_app.model_id}:{adapter}"
    _wait("the app lists the new adapter", lambda: adapter in httpx.get(
        f"{serve_app.openai_base_url}/aliases", headers=serve_app.headers, timeout=10).json()["adapters"], 30)
    s3_store.stop()
    try:
        down = _chat(serve_app, model)
        assert down.status_code == 503, down.text
        error = down.json()["error"]
        assert error["code"] == 503 and "unreachable" in error["message"] and adapter in error["message"], error
        assert _chat(serve_app, serve_app.model_id).status_code == 200  # the base model still serves
        ready = httpx.get(f"{serve_app.base_url}/-/ready", timeout=30)
        assert ready.status_code == 200 and ready.json()["status"] == "degraded", ready.text
    finally:
        s3_store.start()
    # Ray caches the failed lookup for up to 30 s; after that the adapter loads, no restart.
    def answers():
        response = _chat(serve_app, model)
        return response.status_code == 200 or f"{response.status_code} {response.text[:300]}"

    _wait("the adapter answers after the store is back", answers, 120)
    assert adapter in serve_app.store.adapter_ids() and serve_app.alias in serve_app.store.aliases()


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_before_the_answer_frees_the_engine_and_is_recorded_as_499(serve_app, stream):
    """The connection closed during a 900-token answer (streamed: after two tokens; not streamed:
    a client's 1 s read timeout): the engine aborts the request (it does not generate the rest for
    no one), and the ingress records status 499."""
    app = serve_app
    max_tokens = 900
    tokens_before = app.metric("ray_vllm_generation_tokens_total")
    left_before = app.metric("ray_e2e_llm_requests_total", status="499")
    body = {"model": app.model_id, "messages": HI, "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0.0, "stream": stream}
    url = f"{app.openai_base_url}/chat/completions"
    if stream:
        with httpx.stream("POST", url, json=body, headers=app.headers, timeout=120) as response:
            assert response.status_code == 200
            tokens = 0
            for line in response.iter_lines():
                tokens += line.startswith("data: ") and '"content"' in line
                if tokens >= 2:
                    break  # leaving the block closes the connection with the answer unread
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json=body, headers=app.headers, timeout=httpx.Timeout(120, read=1))
    app.wait_engine_queue(at_most=0, timeout=180)
    _wait("the ingress to record the request as 499",
          lambda: app.metric("ray_e2e_llm_requests_total", status="499") > left_before, 60)
    generated = app.metric("ray_vllm_generation_tokens_total") - tokens_before
    # At least one token counted (the counter is live: it is exported as it moves); far fewer than
    # the answer's 900: the abort reached the engine within moments, not at the end.
    assert 1 <= generated < max_tokens // 2, generated


def _stream(app, i, first_content: threading.Event | None = None):
    """A streamed chat: ("done", n) if it ended with [DONE], ("error", n) if with an error event
    after n content chunks, ("cut", n) if it just stopped (never acceptable). ``first_content`` is
    set once a content chunk has arrived."""
    body = {"model": app.model_id, "messages": [{"role": "user", "content": f"Count to twenty, take {i}."}],
            "max_tokens": 48, "temperature": 0.0, "stream": True}
    chunks = 0
    with httpx.stream("POST", f"{app.openai_base_url}/chat/completions", json=body, headers=app.headers,
                      timeout=300) as response:
        if response.status_code != 200:
            return ("status", response.status_code)
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                return ("done", chunks)
            event = json.loads(data)
            if "error" in event:
                return ("error", chunks)
            chunks += sum(1 for c in event.get("choices", []) if c.get("delta", {}).get("content"))
            if chunks and first_content is not None:
                first_content.set()
    return ("cut", chunks)


def _engine_worker_cpus(root: int) -> dict[int, set[int]]:
    """pid -> CPUs of each vLLM model worker under ``root``."""
    from e2e_llm.cpu_pinning import VLLM_WORKER_TITLE

    return {pid: os.sched_getaffinity(pid) for pid, cmd in alive(descendant_pids(root))
            if cmd.startswith(VLLM_WORKER_TITLE)}


def _engine_rest_cpus(root: int) -> dict[str, set[int]]:
    """Title -> CPUs of each engine replica and vLLM scheduler under ``root``: the engine but its
    model workers."""
    schedulers = [(pid, cmd) for pid, cmd in alive(descendant_pids(root)) if cmd.startswith("VLLM::EngineCore")]
    out = {}
    for pid, cmd in engine_replica_pids(root) + schedulers:
        try:
            out[f"{cmd[:40]} [{pid}]"] = os.sched_getaffinity(pid)
        except ProcessLookupError:
            continue
    return out


def test_rays_processes_run_off_the_cpus_the_engine_worker_is_bound_to(serve_app):
    pinning = serve_app.pinning
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: nothing to split")
    assert pinning is not None, "the local profile isolates the engine's CPUs"
    workers = _engine_worker_cpus(os.getpid())
    assert len(workers) == 1 and next(iter(workers.values())) == pinning.engine_cpus
    assert pinning.engine_cpus.isdisjoint(pinning.ray_cpus)
    # Every process of this Ray instance but the engine replica's, including workers Ray started
    # after the move (they inherit the raylet's CPUs). Ray titles a worker "ray::<class>[.<method>]".
    engine = set(pinning.engine)
    ray_procs = [(pid, cmd) for pid, cmd in alive(descendant_pids(os.getpid()))
                 if pid not in engine and (cmd.startswith("ray::") or "/ray/" in cmd)]
    cpus = {}
    for pid, cmd in ray_procs:
        try:
            cpus[cmd[:60]] = os.sched_getaffinity(pid)
        except ProcessLookupError:
            continue  # ended meanwhile (an idle worker)
    off = {cmd: where for cmd, where in cpus.items() if where != pinning.ray_cpus}
    assert not off, off
    for title in ("ray::ProxyActor", "ray::ServeController", "ray::ServeReplica:llm:E2EIngress", "ray::DashboardAgent"):
        assert any(cmd.startswith(title) for _, cmd in ray_procs), (title, ray_procs)
    for daemon in ("gcs_server", "raylet"):
        assert any(daemon in cmd.split()[0] for _, cmd in ray_procs), (daemon, ray_procs)
    # The engine replica settled itself (vLLM's frontend) and vLLM's scheduler there too.
    rest = _engine_rest_cpus(os.getpid())
    assert len(rest) == 2 and all(where == pinning.ray_cpus for where in rest.values()), rest
    # So did the threads ray.init started in this process (the driver); this thread stayed.
    driver = {}
    for tid in pinning.driver_threads:
        with suppress(FileNotFoundError, ProcessLookupError):
            driver[f"{Path(f'/proc/self/task/{tid}/comm').read_text().strip()} [{tid}]"] = os.sched_getaffinity(tid)
    assert driver and all(where == pinning.ray_cpus for where in driver.values()), driver
    assert os.sched_getaffinity(0) == pinning.engine_cpus | pinning.ray_cpus


def test_engine_replica_sigkill_under_load_costs_latency_not_errors(serve_app):
    pids = engine_replica_pids(os.getpid())
    cpus_before = set().union(*_engine_worker_cpus(os.getpid()).values())
    assert len(pids) == 1, \
        f"want one engine replica, found {pids}; ray processes: {alive(descendant_pids(os.getpid()))}"
    victim = pids[0][0]

    def plain(i):
        try:
            response = _chat(serve_app, serve_app.model_id, timeout=300, max_tokens=16,
                             messages=[{"role": "user", "content": f"Name a colour, take {i}."}])
            return ("plain", response.status_code, response.text[:200] if response.status_code != 200 else "")
        except httpx.HTTPError as exc:
            return ("plain", type(exc).__name__, str(exc)[:200])

    streaming = threading.Event()

    def streamed(i):
        try:
            return ("stream",) + _stream(serve_app, i, streaming)
        except httpx.HTTPError as exc:
            return ("stream", type(exc).__name__, str(exc)[:200])

    start = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(streamed if i % 4 == 0 else plain, i) for i in range(32)]
        # Killed mid-stream: one stream has sent tokens, the other requests are in flight or queued.
        assert streaming.wait(timeout=180), "no stream sent a token within 180 s"
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic() - start
        results = [f.result() for f in futures]
    took = time.monotonic() - start
    plain_codes = [r[1] for r in results if r[0] == "plain"]
    streams = [r[1:] for r in results if r[0] == "stream"]
    print(f"killed {victim} at {killed_at:.1f} s; all done after {took:.1f} s; plain {plain_codes}; streams {streams}")
    # Not-yet-answered requests were retried: no errors, only latency.
    assert all(code == 200 for code in plain_codes), results
    # A stream either finished or says it did not; none just stops, none fails before it started.
    assert all(kind in ("done", "error") for kind, _ in streams), streams
    assert all(chunks > 0 for kind, chunks in streams if kind == "error"), streams
    assert any(kind == "error" for kind, _ in streams), streams  # the one cut after its first tokens
    # Serve restarted the replica: the app answers and is ready again.
    assert engine_replica_pids(os.getpid()) and victim not in dict(engine_replica_pids(os.getpid()))
    # The new replica came from a raylet moved off the engine's CPUs; its worker is bound as before.
    _wait("the restarted engine's worker is up", lambda: bool(_engine_worker_cpus(os.getpid())), 60)
    assert set().union(*_engine_worker_cpus(os.getpid()).values()) == cpus_before
    if serve_app.pinning is not None:  # and the rest of the new engine settled off them again
        _wait("the restarted replica and its scheduler are off the worker's CPUs", lambda: (
            len(rest := _engine_rest_cpus(os.getpid())) == 2
            and all(where == serve_app.pinning.ray_cpus for where in rest.values())), 60)
    assert _chat(serve_app, serve_app.model_id).status_code == 200
    _wait("/-/ready is 200 again", lambda: httpx.get(f"{serve_app.base_url}/-/ready", timeout=30).status_code == 200,
          60)
