# SPDX-License-Identifier: Apache-2.0
"""The e2e-llm OpenAI ingress: Ray Serve LLM's ``OpenAiIngress`` plus what a served
fine-tuned model needs in production.

- API-key auth (``e2e_llm.api_guard``: ``Authorization: Bearer <key>``, key from the variable named in
  the profile) on every application route, when that variable is in the replica's environment
  (KubeRay: from the Secret; locally: the shell). Without it the app's check is off and a
  warning at startup says so: on Anyscale the service's query auth token guards the same header
  in front of the app. Serve's own ``/-/healthz`` and ``/-/routes`` (liveness/readiness probes)
  are answered by the proxy and stay open, as does ``/-/ready``.
- Alias routing: ``model="viggo"`` or ``model="<base>:viggo"`` goes to the alias's stable or
  candidate adapter version, drawn per request with the candidate weight from the store's
  ``aliases.json``. Every replica re-reads the record at most ``alias_refresh_s`` old, so
  all replicas (and a restarted app) follow the weights the canary controller writes.
  ``<base>:latest`` is the newest published version.
- Candidate fallback: an alias request drawn to the candidate that fails before any token is
  sent (the adapter cannot be loaded, the engine errors with 5xx/404, or the version is gone
  from the store) is sent once to the alias's stable version; the client gets stable's answer.
  The candidate's attempt is recorded under its version with status 502 (an error for the SLO
  gate whatever ``count_client_errors`` says), and in ``e2e_llm_request_fallbacks``.
- ``POST /-/preflight`` (``e2e_llm.serve_preflight``, same auth as the API): every engine
  replica loads a candidate adapter and answers one short request through it, within a deadline.
- Every error is an OpenAI error object (``e2e_llm.api_guard``): unknown model/adapter 404
  (listing what is published), malformed or over-limit request 400/413/415, unknown route 404,
  wrong method 405; the adapter store unreachable while a request needs an adapter that no
  replica has loaded: 503 with the reason (``e2e_llm.server``), until the store is back.
- A request whose engine replica died before it sent anything is retried once (within
  ``serve.retry.deadline_s``); a stream cut after it started ends with an error event, never
  with ``[DONE]``. A client that goes away before its answer is complete (streamed or not) gets
  its engine request aborted (Serve cancels it, vLLM aborts it) and is recorded as status 499,
  neither an error nor a latency.
- ``GET /-/ready``: readiness of this app (engine answers a health check; adapter store
  readable), 503 while the engine is not. Serve's ``/-/healthz`` only says the proxy is up.
- Once constructed, the replica freezes its startup heap out of the garbage collector
  (``e2e_llm.replica_heap``), as vLLM's own server does.
- Per-version metrics on Ray's metrics port (requests by status, errors, latency, fallbacks,
  retries; the canary's SLO gate reads them): ``e2e_llm.ingress_metrics``.

This module imports Ray at the top; ``e2e_llm.serve.build_app`` imports it lazily.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

from fastapi import Request, status
from pydantic import ValidationError
from ray import exceptions as ray_exceptions
from ray.serve import exceptions as serve_exceptions
from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from vllm.exceptions import VLLMClientError, VLLMNotFoundError

from e2e_llm.api_guard import (
    CLIENT_CLOSED_REQUEST,
    ApiKeyMiddleware,
    BodyGuard,
    Limits,
    RequestError,
    app_key_check,
    check_request,
    error_response,
    install_error_handlers,
    request_error_response,
    sse_error,
)
from e2e_llm.compat.ray_serve import (
    DEFAULT_ENDPOINTS,
    ModelCard,
    ModelList,
    OpenAIHTTPException,
    fastapi_app,
    mode_transport,
    with_mode_transport,
)
from e2e_llm.ingress_metrics import IngressMetrics
from e2e_llm.replica_heap import freeze_startup_heap
from e2e_llm.serve_preflight import GRACE_S, PreflightRequest, describe, timed_out, verdict
from e2e_llm.store import AdapterStore
from e2e_llm.store_snapshot import StoreSnapshot, StoreUnreachable

logger = logging.getLogger("ray.serve")
Found = TypeVar("Found")

# The engine replica (or its node) died under the request: nothing was sent yet, safe to retry.
REPLICA_FAILURES = (ray_exceptions.RayActorError, ray_exceptions.WorkerCrashedError, ray_exceptions.NodeDiedError,
                    serve_exceptions.ReplicaUnavailableError)
READY_TIMEOUT_S = 5.0


class UnknownModel(LookupError):
    """A model, adapter or alias the service does not have (answered with 404)."""


class CandidateGone(LookupError):
    """An alias drew its candidate, which is no longer in the adapter store."""

    status_code = status.HTTP_404_NOT_FOUND


class Route(NamedTuple):
    target: str | None  # the model id to call
    base: str
    alias: str
    version: str
    fallback: str | None = None  # the alias's stable version, when ``version`` is its candidate
    gone: bool = False  # ``version`` (a candidate) is not in the store: go straight to ``fallback``

    def labels(self) -> dict[str, str]:
        return {"model": self.base, "alias": self.alias, "version": self.version}


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
        limits: dict[str, Any] | None = None,
        retry_deadline_s: float = 60.0,
    ):
        self._engine_calls = mode_transport()
        llm_deployments = {model: with_mode_transport(handle) for model, handle in llm_deployments.items()}
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths)
        self._engines = dict(llm_deployments)  # base model id -> LLMServer deployment handle
        if auth_enabled:
            app_key_check(api_key_env)
        self._store = AdapterStore(store_uri, store_endpoint_url, store_region)
        self._snapshot = StoreSnapshot(self._store, on_read_error=lambda: self._metrics.refresh_errors.inc())
        self._limits = Limits.from_args(limits)
        self._retry_deadline_s = retry_deadline_s
        self._refresh_s = alias_refresh_s
        self._random = random.Random()
        self._metrics = IngressMetrics()
        freeze_startup_heap()

    # -- store snapshot --------------------------------------------------------------------

    async def _refresh(self, max_age: float) -> None:
        try:
            await self._snapshot.refresh(max_age)
        except StoreUnreachable:
            raise self._store_down() from None

    async def _look_up(self, find: Callable[[], Found], found: Callable[[Found], bool]) -> Found:
        """``find()`` in a snapshot at most ``alias_refresh_s`` old; if ``found`` says it is not
        there, once more after a read begun after this call (just published?): only such a read
        may say no. The caller tells "not published" from "store down" by ``_snapshot.error``."""
        asked_at = time.monotonic()
        await self._refresh(self._refresh_s)
        result = find()
        if not found(result):
            await self._snapshot.look_again(asked_at)
            result = find()
        return result

    def _store_down(self, what: str = "") -> RequestError:
        return RequestError(status.HTTP_503_SERVICE_UNAVAILABLE,
                            f"{what}the adapter store {self._store.uri} is unreachable ({self._snapshot.error}); "
                            "retry once it is back", type="ServiceUnavailable", headers={"Retry-After": "5"})

    def _not_found(self, model: str, why: str) -> UnknownModel:
        return UnknownModel(
            f'Unknown model "{model}": {why}. Base models: {sorted(self._model_cards)}; '
            f"adapters: {sorted(self._snapshot.adapters)}; aliases: {sorted(self._snapshot.aliases)}. "
            'Call an adapter as "<base>:<adapter>" or an alias by name.'
        )

    async def _route(self, model: str | None) -> Route:
        """Where the requested ``model`` goes (see :class:`Route`)."""
        if model is None or model in self._model_cards:
            base = model or next(iter(self._model_cards))
            return Route(model, base, "", "")
        route = await self._look_up(lambda: self._route_in_snapshot(model), lambda route: not self._missing(route))
        if self._missing(route):
            if self._snapshot.error:  # cannot tell "not published" from "store down"
                raise self._store_down(f'cannot look up "{model}": ')
            raise self._not_found(model, f'no adapter "{route.version or model}" in {self._store.uri}')
        return route

    def _missing(self, route: Route) -> bool:
        return not route.gone and route.version not in self._snapshot.adapters

    def _route_in_snapshot(self, model: str) -> Route:
        """:meth:`_route` by the current snapshot, whether or not it has the version."""
        base, sep, ref = model.partition(":")
        if not sep:  # a bare alias or adapter id
            base, ref = next(iter(self._model_cards)), model
            if len(self._model_cards) > 1:
                raise self._not_found(model, "name the base model as <base>:<adapter> when serving several")
        elif base not in self._model_cards:
            raise self._not_found(model, f'no base model "{base}"')
        snapshot, alias, fallback = self._snapshot, "", None
        if ref in snapshot.aliases:
            record = snapshot.aliases[ref]
            alias, version = ref, record.pick(self._random.random())
            if version != record.stable:
                fallback = record.stable
        elif ref == "latest" or ref.endswith(":latest"):
            version = snapshot.latest.get(ref.removesuffix("latest").removesuffix(":"), "")
        else:
            version = ref
        # the alias's candidate was removed: its stable serves
        gone = version not in snapshot.adapters and fallback in snapshot.adapters
        return Route(f"{base}:{version}", base, alias, version, fallback, gone=gone)

    # -- request path ----------------------------------------------------------------------

    def _record(self, labels: dict[str, str], code: int, start: float, stream: bool) -> None:
        self._metrics.record(labels, code, time.monotonic() - start, stream)

    async def _call_engine(self, body, call_method: str, request: Request, start: float) -> Response:
        """The engine's response; once more if its replica died before answering (see module doc)."""
        try:
            return await self._process_llm_request(body, call_method=call_method, raw_request=request)
        except REPLICA_FAILURES as exc:
            waited = time.monotonic() - start
            if waited >= self._retry_deadline_s:
                raise
            logger.warning("e2e-llm: engine replica failed before answering %s after %.1f s (%s); retrying once",
                           body.model, waited, type(exc).__name__)
            self._metrics.retries.inc(tags={"model": str(body.model).partition(":")[0]})
            return await self._process_llm_request(body, call_method=call_method, raw_request=request)

    @staticmethod
    def _falls_back(route: Route, code: int) -> bool:
        """Whether an attempt on ``route`` that failed with status ``code`` is answered by its
        alias's stable version: a candidate that is gone, cannot be loaded (404) or fails (5xx, no
        status) -- not a request the engine refuses (other 4xx: stable would refuse it too)."""
        return route.fallback is not None and (code >= 500 or code == status.HTTP_404_NOT_FOUND)

    def _record_fallback(self, route: Route, code: int, exc: Exception, start: float, stream: bool) -> None:
        logger.warning("e2e-llm: alias %s: candidate %s failed before any token (%s, %s); answering from stable %s",
                       route.alias, route.version, code, describe(exc), route.fallback)
        self._metrics.fallbacks.inc(tags={**route.labels(), "code": str(code)})
        self._record(route.labels(), status.HTTP_502_BAD_GATEWAY, start, stream)

    async def _attempt(self, route: Route, body, call_method: str, request: Request, start: float) -> Response:
        if route.gone:
            raise CandidateGone(f'candidate "{route.version}" of alias "{route.alias}" is not in {self._store.uri}')
        if route.target != body.model:
            body = body.model_copy(update={"model": route.target})
        return await self._call_engine(body, call_method, request, start)

    async def _serve(self, body, call_method: str, request: Request) -> Response:
        start = time.monotonic()
        labels = {"model": str(body.model or ""), "alias": "", "version": ""}
        stream = bool(getattr(body, "stream", False))
        try:
            check_request(body, self._limits)
            route = await self._route(body.model)
            labels = route.labels()
            try:
                response = await self._attempt(route, body, call_method, request, start)
            except Exception as exc:  # noqa: BLE001  nothing was sent yet: stable may answer instead
                code = self._describe(exc)[0]
                if not self._falls_back(route, code):
                    raise
                self._record_fallback(route, code, exc, start, stream)
                route = route._replace(target=f"{route.base}:{route.fallback}", version=route.fallback,
                                       fallback=None, gone=False)
                labels, start = route.labels(), time.monotonic()
                response = await self._attempt(route, body, call_method, request, start)
        except asyncio.CancelledError:  # the client went away before the answer (the engine aborts it)
            self._record(labels, CLIENT_CLOSED_REQUEST, start, stream)
            raise
        except UnknownModel as exc:
            self._record(labels, status.HTTP_404_NOT_FOUND, start, stream)
            return error_response(status.HTTP_404_NOT_FOUND, str(exc), param="model")
        except RequestError as exc:
            self._record(labels, exc.status, start, stream)
            return request_error_response(exc)
        except Exception as exc:  # noqa: BLE001  every error leaves as an OpenAI error object
            code, message, kind = self._describe(exc)
            if code == status.HTTP_404_NOT_FOUND and self._snapshot.error and labels["version"]:
                # Ray reads a missing adapter_config.json as "no such adapter": the store is down.
                code, message, kind = 503, self._store_down(f'adapter "{body.model}" is not loaded: ').message, \
                    "ServiceUnavailable"
            self._record(labels, code, start, stream)
            if code >= 500:
                logger.error("e2e-llm: %s request for %s failed: %s", call_method, body.model, message)
            return error_response(code, message, type=kind)
        if isinstance(response, StreamingResponse):
            response.body_iterator = self._observed(response.body_iterator, labels, start)
        else:
            self._record(labels, response.status_code, start, stream)
        return response

    @staticmethod
    def _describe(exc: Exception) -> tuple[int, str, str]:
        """(status, message, type) of an exception from the engine path."""
        code = int(getattr(exc, "status_code", 0) or 0)
        if isinstance(exc, CandidateGone):
            return code, str(exc), "NotFoundError"
        if isinstance(exc, REPLICA_FAILURES):
            return 503, f"the engine replica failed while handling the request ({type(exc).__name__}); retry", \
                "ServiceUnavailable"
        message = getattr(exc, "message", None) or getattr(exc, "detail", None) or str(exc).strip().splitlines()[-1:]
        if isinstance(message, list):
            message = message[0] if message else type(exc).__name__
        if not code:
            return 500, f"internal error ({type(exc).__name__}); see the ingress replica's log", "InternalServerError"
        return code, str(message), str(getattr(exc, "type", "") or "") or None

    async def _observed(self, chunks, labels: dict[str, str], start: float):
        """Pass a stream through, recording its outcome. A stream cut by a failure ends with an
        OpenAI error event and no ``[DONE]``: clients must not read it as complete. A client that
        goes away mid-stream closes this generator (Serve then cancels the engine's request, which
        vLLM aborts): recorded as :data:`CLIENT_CLOSED_REQUEST`."""
        code, done, ended = 200, False, False
        try:
            async for chunk in chunks:
                text = chunk if isinstance(chunk, str) else bytes(chunk).decode("utf-8", "replace")
                if text.startswith('data: {"error"') or '"object":"error"' in text:
                    code = 500
                done = done or "data: [DONE]" in text
                yield chunk
            ended = True  # by the engine (a failure below is recorded as such, whether or not the client stays)
            if not done:
                code = 503
                yield sse_error(503, "the stream ended before the engine finished; the answer is incomplete")
        except Exception as exc:  # noqa: BLE001  the response has started: report in-band
            code, ended = (503 if isinstance(exc, REPLICA_FAILURES) else 500), True
            logger.error("e2e-llm: stream for %s cut: %s: %s", labels["model"], type(exc).__name__, exc)
            yield sse_error(code, f"the stream was cut: the engine replica failed ({type(exc).__name__}); "
                                  "the answer is incomplete, retry the request", type="StreamInterrupted")
        finally:
            self._record(labels, code if ended else CLIENT_CLOSED_REQUEST, start, True)

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        return await self._serve(body, "chat", request)

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        return await self._serve(body, "completions", request)

    def _cards(self) -> dict[str, ModelCard]:
        """Base models, every published adapter (``<base>:<adapter>``) and every alias, from the
        store snapshot (no store round trip per listing)."""
        cards = dict(self._model_cards)
        for base, card in self._model_cards.items():
            for adapter in sorted(self._snapshot.adapters):
                cards[f"{base}:{adapter}"] = ModelCard(
                    id=f"{base}:{adapter}", object="model", owned_by=card.owned_by, permission=list(card.permission),
                    metadata={**card.metadata, "adapter": adapter})
            for name, record in sorted(self._snapshot.aliases.items()):
                cards[f"{base}:{name}"] = ModelCard(
                    id=f"{base}:{name}", object="model", owned_by=card.owned_by, permission=list(card.permission),
                    metadata={**card.metadata, "alias": record.to_dict()})
        return cards

    async def models(self) -> ModelList:
        """Base models, every published adapter (``<base>:<adapter>``) and every alias."""
        await self._refresh(self._refresh_s)
        return ModelList(data=list(self._cards().values()))

    async def model_data(self, model: str) -> ModelCard:
        """One model card: a base model, ``<base>:<adapter>``, ``<base>:<alias>`` or a bare alias."""
        card = await self._look_up(lambda: self._card(model), lambda card: card is not None)
        if card is None:
            raise UnknownModel(str(self._not_found(model, "not served here")))
        return card

    def _card(self, model: str) -> ModelCard | None:
        cards = self._cards()
        base = next(iter(self._model_cards))
        return cards.get(model) or (cards.get(f"{base}:{model}") if len(self._model_cards) == 1 else None)

    async def ready(self) -> JSONResponse:
        """Readiness: every engine deployment answers a health check within a few seconds, and
        the adapter store is readable. 503 while an engine is not (base models cannot be served);
        the store alone down is 200 with status "degraded" (base models and adapters already
        loaded still serve, and taking every replica out of rotation for a shared store outage
        would turn it into a full outage)."""
        engines: dict[str, str] = {}
        for model_id, handle in self._engines.items():
            try:
                await asyncio.wait_for(handle.check_health.remote(), READY_TIMEOUT_S)
                engines[model_id] = "ok"
            except Exception as exc:  # noqa: BLE001
                engines[model_id] = f"unavailable: {type(exc).__name__ or 'timeout'} {exc}".strip()
        try:
            await asyncio.wait_for(self._refresh(0.0), READY_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001
            self._snapshot.error = self._snapshot.error or f"{type(exc).__name__}: {exc}"
        store = {"uri": self._store.uri, "status": "unreachable" if self._snapshot.error else "ok",
                 "error": self._snapshot.error, "snapshot_age_s": round(self._snapshot.age(), 3)}
        engine_ok = all(v == "ok" for v in engines.values())
        state = "unavailable" if not engine_ok else "degraded" if self._snapshot.error else "ready"
        return JSONResponse({"status": state, "engines": engines, "engine_calls": self._engine_calls,
                             "adapter_store": store},
                            status_code=200 if engine_ok else 503)

    async def preflight(self, body: PreflightRequest) -> JSONResponse:
        """``POST /-/preflight`` (:mod:`e2e_llm.serve_preflight`): every engine replica of the
        adapter's base model loads ``body.version`` and answers one request through it."""
        base, _, version = body.version.rpartition(":")
        if not base:
            if len(self._model_cards) > 1:
                raise RequestError(400, f"version: name the base model as <base>:<version> (serving "
                                        f"{sorted(self._model_cards)})", param="version")
            base = next(iter(self._model_cards))
        elif base not in self._model_cards:
            raise RequestError(404, f'version: no base model "{base}" here ({sorted(self._model_cards)})',
                               param="version")
        if not await self._look_up(lambda: version in self._snapshot.adapters, bool):
            if self._snapshot.error:
                raise self._store_down(f'cannot look up "{version}": ')
            raise RequestError(404, f'version: no adapter "{version}" in {self._store.uri}', param="version")
        model = f"{base}:{version}"
        try:
            request = ChatCompletionRequest(model=model, messages=body.messages, max_tokens=body.max_tokens,
                                            temperature=0.0, stream=False)
        except (ValidationError, ValueError) as exc:
            raise RequestError(400, f"messages: {str(exc).strip().splitlines()[0]}", param="messages") from None
        check_request(request, self._limits)
        handle = self._engines[base].options(multiplexed_model_id=model)
        try:
            reports = await handle.broadcast("preflight", request, body.deadline_s).results_async(
                timeout_s=body.deadline_s + GRACE_S, return_exceptions=True)
        except TimeoutError:
            answer = timed_out(body.deadline_s)
        except serve_exceptions.DeploymentUnavailableError as exc:
            raise RequestError(503, f"no engine replica of {base} is running to preflight {model} ({exc})",
                               type="ServiceUnavailable", headers={"Retry-After": "5"}) from None
        else:
            answer = verdict(reports)
        (logger.info if answer["ok"] else logger.warning)(
            "e2e-llm: preflight of %s on %d replica(s): %s", model, len(answer["replicas"]),
            "ok" if answer["ok"] else answer["reason"])
        return JSONResponse(answer)

    async def aliases(self) -> JSONResponse:
        """The alias records this replica routes by, and how old its snapshot is."""
        await self._refresh(self._refresh_s)
        return JSONResponse({
            "aliases": {k: v.to_dict() for k, v in self._snapshot.aliases.items()},
            "adapters": sorted(self._snapshot.adapters),
            "age_s": round(self._snapshot.age(), 3),
        })


ENDPOINTS = {**DEFAULT_ENDPOINTS, "aliases": lambda a: a.get("/v1/aliases"), "ready": lambda a: a.get("/-/ready"),
             "preflight": lambda a: a.post("/-/preflight")}


def ingress_app(*, auth_enabled: bool, api_key_env: str, max_body_bytes: int):
    """The FastAPI app: Ray's, with OpenAI error objects everywhere, the body guard, and the
    auth middleware outermost when enabled."""
    app = fastapi_app()
    install_error_handlers(app)

    async def engine_error(request, exc: OpenAIHTTPException):
        return error_response(exc.status_code, exc.message, type=exc.type)

    app.add_exception_handler(OpenAIHTTPException, engine_error)

    async def vllm_client_error(request, exc):  # raised by vLLM's request models while FastAPI parses
        code = 404 if isinstance(exc, VLLMNotFoundError) else 400
        return error_response(code, str(exc.args[0]) if exc.args else str(exc), param=getattr(exc, "parameter", None))

    app.add_exception_handler(VLLMClientError, vllm_client_error)
    app.add_exception_handler(UnknownModel, lambda request, exc: error_response(404, str(exc), param="model"))
    app.add_middleware(BodyGuard, max_body_bytes=max_body_bytes)
    if auth_enabled:
        app.add_middleware(ApiKeyMiddleware, api_key_env=api_key_env)
    return app


def make_ingress(*, auth_enabled: bool, api_key_env: str, max_body_bytes: int = Limits.max_body_bytes):
    """The ingress class with its FastAPI app (see :func:`ingress_app`)."""
    app = ingress_app(auth_enabled=auth_enabled, api_key_env=api_key_env, max_body_bytes=max_body_bytes)
    return make_fastapi_ingress(E2EIngress, endpoint_map=ENDPOINTS, app=app)
