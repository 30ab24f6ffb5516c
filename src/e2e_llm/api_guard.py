# SPDX-License-Identifier: Apache-2.0
"""The OpenAI ingress's front door: every error it returns is an OpenAI error object, and a
request is checked before it reaches an engine.

- :class:`ApiKeyMiddleware`: ``Authorization: Bearer <key>`` on every route but the probes
  (``OPEN_PATHS``), while the key's variable is in the environment (:func:`app_key_check`).
- :func:`error_response` is the one error shape: ``{"error": {"message", "type", "param",
  "code"}}`` with ``code`` the HTTP status (Ray Serve LLM and vLLM use the same).
- :func:`install_error_handlers` answers FastAPI's own errors (unknown route 404, wrong method
  405, body validation) in that shape instead of ``{"detail": ...}``.
- :class:`BodyGuard` (ASGI middleware) refuses, before parsing: bodies over
  ``serve.limits.max_body_bytes`` (413), a non-JSON ``Content-Type`` (415), a body that is not
  UTF-8, not JSON or not a JSON object (400).
- :func:`check_request` refuses what the engine would accept but should not: unknown message
  roles, sampling values outside the OpenAI API's ranges, and ``n`` / ``n x max_tokens`` over
  ``serve.limits`` (each a 400 naming the field or the limit).

No Ray import: the rules are unit-tested without a cluster.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse

logger = logging.getLogger("ray.serve")

# OpenAI chat roles (vLLM would accept any string as a "custom" role).
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
ERROR_TYPES = {
    400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError", 404: "NotFoundError",
    405: "MethodNotAllowed", 408: "TimeoutError", 413: "RequestTooLarge", 415: "UnsupportedMediaType",
    422: "BadRequestError", 429: "RateLimitError", 500: "InternalServerError", 503: "ServiceUnavailable",
}
# (field, low, high, low inclusive) -- the OpenAI API's documented ranges.
SAMPLING_RANGES = (
    ("temperature", 0.0, 2.0, True),
    ("top_p", 0.0, 1.0, False),
    ("presence_penalty", -2.0, 2.0, True),
    ("frequency_penalty", -2.0, 2.0, True),
    ("top_logprobs", 0, 20, True),
)
# The status a request is recorded with when its client went away before the answer was complete
# (nginx's 499; never sent: there is no one to send it to). Says nothing about the server's health.
CLIENT_CLOSED_REQUEST = 499
JSON_METHODS = ("POST", "PUT", "PATCH")
# Routes answered without a key: the proxy's probes and the app's readiness (/-/preflight needs one).
OPEN_PATHS = ("/-/healthz", "/-/routes", "/-/ready")
# Union-member names pydantic puts in error locations (not request fields).
PYDANTIC_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "bytes", "function"})


class RequestError(Exception):
    """A request the ingress refuses, answered as an OpenAI error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type
        self.headers = headers


def error_body(status: int, message: str, *, param: str | None = None, type: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type or ERROR_TYPES.get(status, "Error"), "param": param,
                      "code": status}}


def error_response(status: int, message: str, *, param: str | None = None, type: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param=param, type=type), status_code=status, headers=headers)


def request_error_response(exc: RequestError) -> JSONResponse:
    return error_response(exc.status, exc.message, param=exc.param, type=exc.type, headers=exc.headers)


def sse_error(status: int, message: str, *, type: str | None = None) -> str:
    """A server-sent event carrying an OpenAI error object (the openai client raises on it)."""
    return f"data: {json.dumps(error_body(status, message, type=type))}\n\n"


@dataclass(frozen=True)
class Limits:
    max_n: int = 8
    max_total_tokens: int = 8192
    max_body_bytes: int = 1_048_576
    # What an absent max_tokens counts as (the model's context length).
    default_max_tokens: int = 8192

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> Limits:
        return cls(**(args or {}))


# -- auth ------------------------------------------------------------------------------------


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
        if scope["type"] != "http" or scope.get("path", "") in OPEN_PATHS:
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
            status_code=401,
            content={"error": {"message": message, "type": "AuthenticationError", "param": None, "code": 401}},
            headers={"WWW-Authenticate": "Bearer"},
        )
        return await response(scope, receive, send)


# -- FastAPI's own errors --------------------------------------------------------------------


def _field(loc) -> str:
    """The request field a pydantic error location names (``messages.0.role``), without the
    ``body`` root and the union-member tags pydantic inserts (``stop.str``, ``...[...]``)."""
    parts: list[str] = []
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            parts.append(str(part))
        elif part.isidentifier() and not part[:1].isupper() and part not in PYDANTIC_TAGS:
            parts.append(part)
        else:
            break
    return ".".join(parts) or "body"


def install_error_handlers(app) -> None:
    """Unknown route, wrong method and validation errors as OpenAI error objects."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    async def http_error(request, exc: HTTPException):
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.url.path}: see /v1/models, /v1/chat/completions, /v1/completions"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    async def validation_error(request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
        field = _field(first.get("loc", ()))
        message = "; ".join(f"{_field(e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in errors[:3])
        if len(errors) > 3:
            message += f" (and {len(errors) - 3} more)"
        return error_response(400, f"invalid request: {message}", param=field)

    async def refused(request, exc: RequestError):
        return request_error_response(exc)

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(RequestError, refused)


# -- the body, before FastAPI parses it ------------------------------------------------------


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media in ("", "application/json") or media.endswith("+json")


class BodyGuard:
    """ASGI middleware: size, Content-Type, UTF-8 and JSON checks on request bodies (POST/PUT/
    PATCH), answered as OpenAI errors; the checked body is passed on unchanged."""

    def __init__(self, app, max_body_bytes: int, skip_paths: tuple[str, ...] = ("/v1/audio/",)):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.skip_paths = skip_paths

    async def __call__(self, scope, receive, send):
        if (scope["type"] != "http" or scope.get("method") not in JSON_METHODS
                or scope.get("path", "").startswith(self.skip_paths)):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            body = await self._checked_body(headers, receive)
        except RequestError as exc:
            return await request_error_response(exc)(scope, receive, send)

        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # http.disconnect

        return await self.app(scope, replay, send)

    async def _checked_body(self, headers: dict[str, str], receive) -> bytes:
        limit = self.max_body_bytes
        too_large = RequestError(413, f"request body is larger than {limit} bytes (serve.limits.max_body_bytes)",
                                 param="body")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        content_type = headers.get("content-type", "")
        if not _is_json(content_type):
            raise RequestError(415, f"Content-Type {content_type!r} is not supported: send "
                                    "'Content-Type: application/json' with a JSON body", param="Content-Type")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RequestError(400, "client disconnected while sending the body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(400, f"request body is not valid UTF-8 (byte {exc.start})", param="body") from None
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RequestError(400, f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column "
                                    f"{exc.colno}", param="body") from None
        if not isinstance(value, dict):
            raise RequestError(400, f"request body must be a JSON object, got {type(value).__name__}",
                               param="body")
        return body


# -- the parsed request ----------------------------------------------------------------------


def _value(body: Any, name: str) -> Any:
    """A request field, read without tripping pydantic's deprecation warning (max_tokens)."""
    fields = getattr(body, "__dict__", None)
    return fields.get(name) if isinstance(fields, dict) else getattr(body, name, None)


def _role(message: Any) -> Any:
    return message.get("role") if isinstance(message, dict) else getattr(message, "role", None)


def check_request(body: Any, limits: Limits) -> None:
    """Raise :class:`RequestError` (400) for a chat/completions request the service refuses."""
    messages = _value(body, "messages")
    if messages is not None:
        if not messages:
            raise RequestError(400, "messages must not be empty", param="messages")
        for i, message in enumerate(messages):
            role = _role(message)
            if role not in ROLES:
                raise RequestError(400, f"messages[{i}].role {role!r} is not one of {', '.join(ROLES)}",
                                   param=f"messages.{i}.role")
    for field, low, high, low_inclusive in SAMPLING_RANGES:
        value = _value(body, field)
        if value is None or isinstance(value, bool):
            continue
        if not (low <= value <= high) or (not low_inclusive and value == low):
            bracket = "[" if low_inclusive else "("
            raise RequestError(400, f"{field} {value} is out of range {bracket}{low}, {high}]", param=field)
    logprobs = _value(body, "logprobs")
    if isinstance(logprobs, int) and not isinstance(logprobs, bool) and not 0 <= logprobs <= 20:
        raise RequestError(400, f"logprobs {logprobs} is out of range [0, 20]", param="logprobs")

    n = _value(body, "n")
    n = 1 if n is None else n
    best_of = _value(body, "best_of") or 0
    field = "best_of" if best_of > n else "n"
    n = max(n, best_of)
    if n < 1:
        raise RequestError(400, f"{field} must be at least 1", param=field)
    if n > limits.max_n:
        raise RequestError(400, f"{field}={n} is over this service's limit of {limits.max_n} choices per "
                                "request (serve.limits.max_n)", param=field)
    max_tokens = _value(body, "max_completion_tokens") or _value(body, "max_tokens")
    if max_tokens is not None and max_tokens < 1:
        raise RequestError(400, f"max_tokens {max_tokens} must be at least 1", param="max_tokens")
    per_choice = max_tokens or limits.default_max_tokens
    if n * per_choice > limits.max_total_tokens:
        what = f"max_tokens={max_tokens}" if max_tokens else f"max_tokens unset (counts as {per_choice})"
        raise RequestError(400, f"n x max_tokens = {n} x {per_choice} = {n * per_choice} tokens is over this "
                                f"service's limit of {limits.max_total_tokens} generated tokens per request "
                                f"(serve.limits.max_total_tokens); {what}: lower n or max_tokens",
                           param="max_tokens")
