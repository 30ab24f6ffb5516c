# SPDX-License-Identifier: Apache-2.0
"""The e2e-llm OpenAI ingress: Ray Serve LLM's ``OpenAiIngress`` plus what a served
fine-tuned model needs in production.

- API-key auth (``Authorization: Bearer <key>``, key from the environment variable named in
  the profile) on every application route, when that variable is in the replica's environment
  (KubeRay: from the Secret; locally: the shell). Without it the app's check is off and a
  warning at startup says so: on Anyscale the service's query auth token guards the same header
  in front of the app. Serve's own ``/-/healthz`` and ``/-/routes`` (liveness/readiness probes)
  are answered by the proxy and stay open.
- Alias routing: ``model="viggo"`` or ``model="<base>:viggo"`` goes to the alias's stable or
  candidate adapter version, drawn per request with the candidate weight from the store's
  ``aliases.json``. Every replica re-reads the record at most ``alias_refresh_s`` old, so
  all replicas (and a restarted app) follow the weights the canary controller writes.
  ``<base>:latest`` is the newest published version.
- Clear 404 for an unknown adapter (listing what is published); Ray's 400 for bad bodies.
- Per-version metrics through ``ray.util.metrics`` (exported on Ray's metrics port):
  ``e2e_llm_requests`` (model, alias, version, status), ``e2e_llm_request_errors``
  (model, alias, version, code), ``e2e_llm_request_latency_seconds`` (model, alias,
  version, stream) -- the canary's SLO gate reads these.

This module imports Ray at the top; ``e2e_llm.serve.build_app`` imports it lazily.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import random
import time
from typing import Any

from fastapi import Request, status
from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest
from ray.util import metrics
from starlette.responses import JSONResponse, Response, StreamingResponse

from e2e_llm.compat.ray_serve import DEFAULT_ENDPOINTS, ModelCard, ModelList, OpenAIHTTPException, fastapi_app
from e2e_llm.store import AdapterStore, Alias

logger = logging.getLogger("ray.serve")

LATENCY_BUCKETS_S = [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128]
# Routes the ingress answers without a key (besides the proxy's /-/healthz and /-/routes).
OPEN_PATHS = ("/-/",)


class UnknownModel(LookupError):
    """A model, adapter or alias the service does not have (answered with 404)."""


def app_key_check(api_key_env: str, environ=None) -> bool:
    """Whether the app checks its own API key: ``$api_key_env`` is in the environment.

    Absent: the check is off and a warning names who must authenticate instead (on Anyscale,
    the service's query auth token on the same ``Authorization: Bearer`` header). Present but
    empty: a misconfigured secret, refused rather than read as "no auth"."""
    environ = os.environ if environ is None else environ
    if api_key_env not in environ:
        logger.warning(
            "app API-key check is OFF: $%s is not in this replica's environment, so requests reach the "
            "app unauthenticated unless something in front checks them (on Anyscale: the service's "
            "query auth token, query_auth_token_enabled: true; on KubeRay the key comes from the Secret)",
            api_key_env)
        return False
    if not environ[api_key_env]:
        raise RuntimeError(f"${api_key_env} is set but empty in the ingress replica; fix the secret it comes "
                           "from (Kubernetes Secret / local shell) or unset it")
    return True


class ApiKeyMiddleware:
    """ASGI middleware: while ``$<env var>`` is in the environment, 401 unless
    ``Authorization: Bearer <key>`` matches it; without the variable, requests pass
    (:func:`app_key_check` logs that at replica startup)."""

    def __init__(self, app, api_key_env: str):
        self.app = app
        self.api_key_env = api_key_env

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path", "").startswith(OPEN_PATHS):
            return await self.app(scope, receive, send)
        expected = os.environ.get(self.api_key_env)
        if expected is None:
            return await self.app(scope, receive, send)
        given = ""
        for name, value in scope.get("headers", []):
            if name.lower() == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                given = token.strip() if scheme.lower() == "bearer" else ""
                break
        if expected and hmac.compare_digest(given.encode(), expected.encode()):
            return await self.app(scope, receive, send)
        message = "missing API key: send 'Authorization: Bearer <key>'" if not given else "invalid API key"
        response = JSONResponse(
            status_code=status.HTTP_401_UNAUTHORIZED,
            content={"error": {"message": message, "type": "AuthenticationError", "code": 401}},
            headers={"WWW-Authenticate": "Bearer"},
        )
        return await response(scope, receive, send)


class E2EIngress(OpenAiIngress):
    def __init__(
        self,
        llm_deployments: dict[str, Any],
        model_cards: dict[str, ModelCard],
        *,
        lora_paths: dict[str, str] | None = None,
        store_uri: str,
        store_endpoint_url: str | None = None,
        store_region: str | None = None,
        alias_refresh_s: float = 2.0,
        auth_enabled: bool = False,
        api_key_env: str = "E2E_LLM_API_KEY",
    ):
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths)
        if auth_enabled:
            app_key_check(api_key_env)
        self._store = AdapterStore(store_uri, store_endpoint_url, store_region)
        self._refresh_s = alias_refresh_s
        self._aliases: dict[str, Alias] = {}
        self._adapters: set[str] = set()
        self._latest: dict[str, str] = {}
        self._loaded_at = float("-inf")
        self._lock = asyncio.Lock()
        self._random = random.Random()
        tags = ("model", "alias", "version")
        self._m_requests = metrics.Counter(
            "e2e_llm_requests", description="Requests by model, alias, adapter version and HTTP status.",
            tag_keys=tags + ("status",))
        self._m_errors = metrics.Counter(
            "e2e_llm_request_errors", description="Failed requests (status >= 400) by version and code.",
            tag_keys=tags + ("code",))
        self._m_latency = metrics.Histogram(
            "e2e_llm_request_latency_seconds", description="End-to-end request latency (stream: until the last chunk).",
            boundaries=LATENCY_BUCKETS_S, tag_keys=tags + ("stream",))
        self._m_refresh_errors = metrics.Counter(
            "e2e_llm_alias_refresh_errors", description="Failed reads of the alias records from the adapter store.")

    # -- store snapshot --------------------------------------------------------------------

    def _read_store(self) -> tuple[dict[str, Alias], set[str], dict[str, str]]:
        aliases = self._store.aliases()
        adapters = set(self._store.adapter_ids())
        latest: dict[str, str] = {}
        for row in self._store.versions():
            if row["id"] in adapters:
                latest[row["name"]] = row["id"]
                latest[""] = row["id"]
        return aliases, adapters, latest

    async def _refresh(self, max_age: float) -> None:
        if time.monotonic() - self._loaded_at <= max_age:
            return
        async with self._lock:
            if time.monotonic() - self._loaded_at <= max_age:
                return
            try:
                self._aliases, self._adapters, self._latest = await asyncio.to_thread(self._read_store)
                self._loaded_at = time.monotonic()
            except Exception as exc:  # noqa: BLE001  keep serving with the last good snapshot
                self._m_refresh_errors.inc()
                logger.warning("e2e-llm: reading the adapter store %s failed: %s", self._store.uri, exc)
                if self._loaded_at == float("-inf"):
                    raise OpenAIHTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                                              f"adapter store {self._store.uri} unreadable: {exc}",
                                              type="ServiceUnavailable") from None

    def _not_found(self, model: str, why: str) -> UnknownModel:
        return UnknownModel(
            f'Unknown model "{model}": {why}. Base models: {sorted(self._model_cards)}; '
            f"adapters: {sorted(self._adapters)}; aliases: {sorted(self._aliases)}. "
            'Call an adapter as "<base>:<adapter>" or an alias by name.'
        )

    async def _route(self, model: str | None) -> tuple[str | None, str, str, str]:
        """(model id to call, base, alias, version) for the requested ``model``."""
        if model is None or model in self._model_cards:
            base = model or next(iter(self._model_cards))
            return model, base, "", ""
        await self._refresh(self._refresh_s)
        base, sep, ref = model.partition(":")
        if not sep:  # a bare alias or adapter id
            base, ref = next(iter(self._model_cards)), model
            if len(self._model_cards) > 1:
                raise self._not_found(model, "name the base model as <base>:<adapter> when serving several")
        elif base not in self._model_cards:
            raise self._not_found(model, f'no base model "{base}"')
        alias = ""
        if ref in self._aliases:
            alias, version = ref, self._aliases[ref].pick(self._random.random())
        elif ref == "latest" or ref.endswith(":latest"):
            name = ref.removesuffix("latest").removesuffix(":")
            version = self._latest.get(name, "")
        else:
            version = ref
        if version not in self._adapters:
            await self._refresh(1.0)  # just published? look again before saying no
            if version not in self._adapters:
                raise self._not_found(model, f'no adapter "{version or ref}" in {self._store.uri}')
        return f"{base}:{version}", base, alias, version

    # -- request path ----------------------------------------------------------------------

    def _record(self, labels: dict[str, str], code: int, start: float, stream: bool) -> None:
        self._m_requests.inc(tags={**labels, "status": str(code)})
        if code >= 400:
            self._m_errors.inc(tags={**labels, "code": str(code)})
        self._m_latency.observe(time.monotonic() - start, tags={**labels, "stream": str(stream).lower()})

    async def _serve(self, body, call_method: str, request: Request) -> Response:
        start = time.monotonic()
        labels = {"model": str(body.model or ""), "alias": "", "version": ""}
        stream = bool(getattr(body, "stream", False))
        try:
            target, base, alias, version = await self._route(body.model)
            labels = {"model": base, "alias": alias, "version": version}
            if target != body.model:
                body = body.model_copy(update={"model": target})
            response = await self._process_llm_request(body, call_method=call_method, raw_request=request)
        except UnknownModel as exc:
            self._record(labels, status.HTTP_404_NOT_FOUND, start, stream)
            return JSONResponse(status_code=status.HTTP_404_NOT_FOUND, content={"error": {
                "message": str(exc), "type": "NotFoundError", "param": "model", "code": 404}})
        except Exception as exc:
            self._record(labels, int(getattr(exc, "status_code", 500)), start, stream)
            raise
        if isinstance(response, StreamingResponse):
            response.body_iterator = self._observed(response.body_iterator, labels, start)
        else:
            self._record(labels, response.status_code, start, stream)
        return response

    async def _observed(self, chunks, labels: dict[str, str], start: float):
        code = 200
        try:
            async for chunk in chunks:
                text = chunk if isinstance(chunk, str) else bytes(chunk).decode("utf-8", "replace")
                if text.startswith('data: {"error"') or '"object":"error"' in text:
                    code = 500
                yield chunk
        except Exception:
            code = 500
            raise
        finally:
            self._record(labels, code, start, True)

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        return await self._serve(body, "chat", request)

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        return await self._serve(body, "completions", request)

    async def models(self) -> ModelList:
        """Base models, every published adapter (``<base>:<adapter>``) and every alias."""
        listed = await super().models()
        await self._refresh(self._refresh_s)
        cards: list[ModelCard] = list(listed.data)
        for base, card in self._model_cards.items():
            for name, record in sorted(self._aliases.items()):
                cards.append(ModelCard(
                    id=f"{base}:{name}", object="model", owned_by=card.owned_by, permission=list(card.permission),
                    metadata={**card.metadata, "alias": record.to_dict()},
                ))
        return ModelList(data=cards)

    async def aliases(self) -> JSONResponse:
        """The alias records this replica routes by, and how old its snapshot is."""
        await self._refresh(self._refresh_s)
        return JSONResponse({
            "aliases": {k: v.to_dict() for k, v in self._aliases.items()},
            "adapters": sorted(self._adapters),
            "age_s": round(time.monotonic() - self._loaded_at, 3),
        })


def make_ingress(*, auth_enabled: bool, api_key_env: str):
    """The ingress class with its FastAPI app (auth middleware outermost when enabled)."""
    app = fastapi_app()
    if auth_enabled:
        app.add_middleware(ApiKeyMiddleware, api_key_env=api_key_env)
    endpoints = {**DEFAULT_ENDPOINTS, "aliases": lambda a: a.get("/v1/aliases")}
    return make_fastapi_ingress(E2EIngress, endpoint_map=endpoints, app=app)
