# SPDX-License-Identifier: Apache-2.0
"""Fakes for the ingress's unit tests (tests/unit/test_ingress_*.py): the real FastAPI app of
``e2e_llm.ingress`` in front of :class:`FakeEngine`, a stand-in for the LLMServer deployment
handle (per-call script, per-model failures, and the replicas a broadcast reaches), with the
adapter store in a local folder (:func:`make_api`)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

from malformed import MAX_BODY_BYTES, MAX_N, MAX_TOTAL_TOKENS
from ray import exceptions as ray_exceptions
from ray.llm._internal.serve.core.configs.openai_api_models import (
    ChatCompletionResponse,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
)
from starlette.testclient import TestClient

BASE = "smollm2-135m"
KEY_ENV = "E2E_LLM_TEST_INGRESS_KEY"
KEY = "k3y"


def chat_response(model: str, text: str = "hi") -> ChatCompletionResponse:
    return ChatCompletionResponse.model_validate({
        "id": "chatcmpl-1", "model": model, "created": 0,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})


def chunk(model: str, text: str, finish: str | None = None) -> str:
    return "data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 0, "model": model,
                                  "choices": [{"index": 0, "delta": {"content": text},
                                               "finish_reason": finish}]}) + "\n\n"


def load_failure(model: str) -> Exception:
    """What Ray's ingress receives when vLLM cannot load an adapter (vllm_engine.resolve_lora)."""
    return ValueError(f"Failed to load lora model: Loading lora {model} failed: Error while deserializing header")


class FakeBroadcast:
    """``DeploymentBroadcastResponse``: ``results_async`` with Ray's timeout/exception semantics."""

    def __init__(self, calls):
        self.calls = calls

    async def results_async(self, *, timeout_s=None, return_exceptions=False):
        gathered = asyncio.gather(*(call() for call in self.calls), return_exceptions=return_exceptions)
        try:
            return list(await asyncio.wait_for(gathered, timeout_s))
        except TimeoutError:
            raise TimeoutError("Timed out waiting for broadcast results.") from None


class FakeEngine:
    """Stands in for the LLMServer deployment handle. ``script``: per call, what happens:
    "ok", "die" (replica died before answering), "cut" (stream dies after one chunk).
    ``broken``: model id -> what every call for it raises or answers first (an exception, or an
    ``ErrorResponse``). ``replicas``: name -> how that replica runs a broadcast preflight
    ("ok", "load-fails", "slow", "dead", "hang"); ``options`` records the last options."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []
        self.script: list[str] = []
        self.healthy = True
        self.broken: dict[str, object] = {}
        self.replicas: dict[str, str] = {"replica-a": "ok"}
        self.last_options: dict = {}
        self.broadcasts: list[tuple] = []

    def options(self, **kw):
        self.last_options = kw
        return self

    def broadcast(self, method, *args):
        from e2e_llm.serve_preflight import answer_once

        self.broadcasts.append((method, self.last_options, *args))
        request, deadline_s = args

        def replica(name, how):
            async def chat(req):
                if how == "load-fails":
                    raise load_failure(req.model)
                if how == "slow":
                    await asyncio.sleep(30)
                return self._run("chat", req)

            async def call():
                if how == "dead":
                    raise ray_exceptions.ActorDiedError()
                if how == "hang":  # the replica never reports, whatever its deadline
                    await asyncio.sleep(60)
                return await answer_once(chat, request, deadline_s, name)

            return call

        return FakeBroadcast([replica(name, how) for name, how in self.replicas.items()])

    def __getattr__(self, method):
        engine = self

        class Method:
            def remote(self, body=None, raw=None):
                if method == "check_health":
                    return engine._health()
                return engine._run(method, body)

        return Method()

    async def _health(self):
        if not self.healthy:
            await asyncio.sleep(60)  # a dead deployment never answers

    async def _run(self, method, body):
        self.calls.append((method, body.model))
        broken = self.broken.get(body.model)
        if isinstance(broken, Exception):
            raise broken
        if broken is not None:
            yield broken
            return
        what = self.script.pop(0) if self.script else "ok"
        if what == "die":
            raise ray_exceptions.ActorDiedError()
        text = json.dumps(getattr(body, "messages", None) or getattr(body, "prompt", ""))
        if len(text) > 4000:  # the engine's own context check
            yield ErrorResponse.model_validate({"error": {"message": "This model's maximum context length is 1024",
                                                          "type": "BadRequestError", "code": 400}})
            return
        if getattr(body, "stream", False):
            yield [chunk(body.model, "hel")]
            if what == "cut":
                raise ray_exceptions.ActorDiedError()
            yield [chunk(body.model, "lo", "stop")]
            return
        if method == "completions":
            yield CompletionResponse.model_validate({
                "id": "cmpl-1", "model": body.model, "created": 0,
                "choices": [{"index": 0, "text": "hi", "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
        else:
            yield chat_response(body.model)


def publish(store, root, name):
    folder = root / f"src-{name}"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "base_model_name_or_path": BASE}))
    (folder / "adapter_model.safetensors").write_bytes(b"0")
    return store.publish(folder, name=name)


def fake_clock(monkeypatch) -> SimpleNamespace:
    """The ingress's and its store snapshot's monotonic clock, moved by hand (``clock.now``)."""
    import e2e_llm.ingress as ingress_module
    import e2e_llm.store_snapshot as snapshot_module

    clock = SimpleNamespace(now=1000.0)
    fake = SimpleNamespace(monotonic=lambda: clock.now)
    monkeypatch.setattr(ingress_module, "time", fake)
    monkeypatch.setattr(snapshot_module, "time", fake)
    return clock


def make_api(tmp_path, monkeypatch) -> SimpleNamespace:
    """(TestClient, ingress instance, fake engine, names, store) with auth on and the test
    limits; alias ``viggo`` -> the published adapter ``names["adapter"]``."""
    from ray import serve
    from ray.llm._internal.serve.core.ingress.ingress import make_fastapi_ingress

    from e2e_llm.ingress import ENDPOINTS, E2EIngress, ingress_app
    from e2e_llm.store import AdapterStore

    monkeypatch.setenv(KEY_ENV, KEY)
    store = AdapterStore(str(tmp_path / "store"))
    adapter = publish(store, tmp_path, "viggo")
    store.set_alias("viggo", stable=adapter)
    engine = FakeEngine()
    app = ingress_app(auth_enabled=True, api_key_env=KEY_ENV, max_body_bytes=MAX_BODY_BYTES)
    make_fastapi_ingress(E2EIngress, endpoint_map=ENDPOINTS, app=app)
    card = ModelCard(id=BASE, object="model", owned_by="e2e-llm", permission=[], metadata={})
    ingress = E2EIngress({BASE: engine}, {BASE: card}, store_uri=store.uri, auth_enabled=True, api_key_env=KEY_ENV,
                         limits={"max_n": MAX_N, "max_total_tokens": MAX_TOTAL_TOKENS,
                                 "max_body_bytes": MAX_BODY_BYTES, "default_max_tokens": 1024},
                         retry_deadline_s=30.0)
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(servable_object=ingress))
    names = {"base": BASE, "alias": "viggo", "adapter": adapter}
    client = TestClient(app, raise_server_exceptions=False)
    return SimpleNamespace(client=client, ingress=ingress, engine=engine, names=names, store=store, root=tmp_path)


def post(api, path, body, **kw):
    return api.client.post(path, json=body, headers={"Authorization": f"Bearer {KEY}"}, **kw)


# -- the engine replica side --------------------------------------------------------------


class FakeVLLMEngine:
    """The engine an LLMServer calls: streams ``chunks`` strings (``gap_s`` apart; 0: all in one
    step), or one chat response for a non-streaming request after ``delay_s``; ``lora_error`` is
    raised by ``resolve_lora``."""

    def __init__(self, chunks: int = 5):
        self.chunks = chunks
        self.gap_s = 0.0
        self.lora_error: Exception | None = None
        self.delay_s = 0.0

    async def resolve_lora(self, disk_model) -> None:
        if self.lora_error is not None:
            raise self.lora_error

    async def chat(self, request, raw_request_info=None):
        if not getattr(request, "stream", False):
            await asyncio.sleep(self.delay_s)
            yield chat_response(request.model)
            return
        for i in range(self.chunks):
            if self.gap_s:
                await asyncio.sleep(self.gap_s)
            yield f"c{i}"


def fake_server(cls, interval_ms: float = 200.0, lora_root: str | None = None):
    """An LLMServer of ``cls`` without a vLLM engine: Ray's chat() path runs unchanged (only
    LLMServer's async ``__del__``, which shuts an engine down, is left out). ``lora_root``: the
    adapter store folder ``adapter_load_failed`` looks at."""
    server = object.__new__(type(cls.__name__, (cls,), {"__del__": lambda self: None}))
    lora_config = SimpleNamespace(dynamic_lora_loading_path=lora_root) if lora_root else object()
    server._llm_config = SimpleNamespace(lora_config=lora_config,
                                         experimental_configs={"stream_batching_interval_ms": interval_ms})
    server.engine = FakeVLLMEngine()
    server.active = server.max_active = 0

    async def load_model(model_id: str):
        server.active += 1
        server.max_active = max(server.max_active, server.active)
        await asyncio.sleep(0.05)  # a download: the window in which a second request races
        server.active -= 1
        return model_id

    server._load_model = load_model
    return server


class FakeCounter:
    """A ``ray.util.metrics`` Counter/Histogram that keeps what it was given: (value, tags)."""

    def __init__(self):
        self.seen: list[tuple[float, dict[str, str]]] = []

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        self.seen.append((value, dict(tags or {})))

    observe = inc
