# SPDX-License-Identifier: Apache-2.0
"""The table of malformed requests the OpenAI ingress must refuse, each with its status and an
OpenAI error object (``{"error": {"message", "type", "param", "code"}}``). Run fast against the
ingress app with a fake engine (tests/unit/test_ingress_requests.py) and against the live app
(tests/integration/test_serve_resilience.py).

Placeholders in paths and bodies: ``{base}`` (base model id), ``{alias}``, ``{adapter}``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# Limits both forms use (the live app gets them through its profile's serve.limits).
MAX_N = 8
MAX_TOTAL_TOKENS = 2048
MAX_BODY_BYTES = 262_144
ERROR_KEYS = {"message", "type", "param", "code"}


@dataclass
class Case:
    id: str
    status: int
    body: Any = None  # JSON body (dict/list/str), or bytes sent as-is
    method: str = "POST"
    path: str = "/v1/chat/completions"
    headers: dict[str, str] = field(default_factory=dict)
    param: str | None = None  # expected error.param, when it names a field
    says: str | None = None  # a substring the message must contain
    auth: bool = True  # send the API key


def chat(**extra) -> dict[str, Any]:
    return {"model": "{base}", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4, **extra}


def msg(*messages) -> dict[str, Any]:
    return {"model": "{base}", "messages": list(messages), "max_tokens": 4}


def completion(**extra) -> dict[str, Any]:
    return {"model": "{base}", "prompt": "Hello", "max_tokens": 4, **extra}


CASES = [
    # -- the body itself
    Case("not-json", 400, b"{not json", param="body", says="not valid JSON"),
    Case("truncated-json", 400, b'{"model": "m", "messages": [', param="body"),
    Case("empty-body", 400, b"", param="body"),
    Case("json-array-body", 400, b"[]", param="body", says="JSON object"),
    Case("json-string-body", 400, b'"hi"', param="body", says="JSON object"),
    Case("json-null-body", 400, b"null", param="body"),
    Case("not-utf8", 400, b'{"model": "\xff\xfe", "messages": []}', param="body", says="UTF-8"),
    Case("text-plain", 415, json.dumps(chat()).encode(), headers={"Content-Type": "text/plain"},
         param="Content-Type"),
    Case("form-encoded", 415, b"model=x&messages=y",
         headers={"Content-Type": "application/x-www-form-urlencoded"}),
    Case("huge-body", 413, {"model": "{base}", "messages": [{"role": "user", "content": "x" * (MAX_BODY_BYTES + 10)}]},
         says="max_body_bytes"),
    # -- wrong shapes and types
    Case("messages-not-list", 400, {"model": "{base}", "messages": "not a list"}, param="messages"),
    Case("messages-missing", 400, {"model": "{base}"}, param="messages"),
    Case("messages-empty", 400, msg(), param="messages"),
    Case("message-without-role", 400, msg({"content": "hi"})),
    Case("unknown-role", 400, msg({"role": "wizard", "content": "hi"}), param="messages.0.role", says="wizard"),
    Case("unknown-role-later", 400, msg({"role": "user", "content": "hi"}, {"role": "root", "content": "x"}),
         param="messages.1.role"),
    Case("role-not-string", 400, msg({"role": 5, "content": "hi"})),
    Case("content-number", 400, msg({"role": "user", "content": 42})),
    Case("max-tokens-string", 400, chat(max_tokens="many"), param="max_tokens"),
    Case("max-tokens-negative", 400, chat(max_tokens=-1), param="max_tokens"),
    Case("max-tokens-zero", 400, chat(max_tokens=0), param="max_tokens"),
    Case("model-not-string", 400, {**chat(), "model": 123}, param="model"),
    Case("stream-not-bool", 400, chat(stream=[1]), param="stream"),
    Case("stop-wrong-type", 400, chat(stop={"a": 1}), param="stop"),
    # -- abuse: n and total tokens
    Case("n-zero", 400, chat(n=0), param="n"),
    Case("n-1000", 400, chat(n=1000), param="n", says="serve.limits.max_n"),
    Case("n-over-limit", 400, chat(n=MAX_N + 1), param="n", says="serve.limits.max_n"),
    Case("n-times-max-tokens", 400, chat(n=4, max_tokens=MAX_TOTAL_TOKENS // 2), param="max_tokens",
         says="serve.limits.max_total_tokens"),
    Case("max-tokens-over-total", 400, chat(max_tokens=MAX_TOTAL_TOKENS + 1), says="max_total_tokens"),
    Case("n-without-max-tokens", 400, {"model": "{base}", "messages": [{"role": "user", "content": "hi"}],
                                       "n": MAX_N}, says="max_tokens unset"),
    Case("completions-n-1000", 400, completion(n=1000), path="/v1/completions", param="n"),
    # -- sampling values out of range
    Case("temperature-negative", 400, chat(temperature=-1), param="temperature"),
    Case("temperature-huge", 400, chat(temperature=5), param="temperature"),
    Case("temperature-string", 400, chat(temperature="hot"), param="temperature"),
    Case("top-p-zero", 400, chat(top_p=0), param="top_p"),
    Case("top-p-over-one", 400, chat(top_p=1.5), param="top_p"),
    Case("presence-penalty", 400, chat(presence_penalty=3), param="presence_penalty"),
    Case("frequency-penalty", 400, chat(frequency_penalty=-3), param="frequency_penalty"),
    Case("top-logprobs-50", 400, chat(logprobs=True, top_logprobs=50), param="top_logprobs"),
    Case("completions-logprobs-50", 400, completion(logprobs=50), path="/v1/completions", param="logprobs"),
    # -- the prompt
    Case("over-context-prompt", 400, chat(messages=[{"role": "user", "content": "word " * 3000}])),
    Case("completions-no-prompt", 400, {"model": "{base}", "max_tokens": 4}, path="/v1/completions",
         param="prompt"),
    Case("completions-prompt-object", 400, completion(prompt={"a": 1}), path="/v1/completions"),
    # -- models, adapters, aliases
    Case("unknown-model", 404, {**chat(), "model": "no-such-model"}, param="model", says="no-such-model"),
    Case("unknown-adapter", 404, {**chat(), "model": "{base}:no-such-adapter"}, param="model",
         says="{adapter}"),
    Case("unknown-base", 404, {**chat(), "model": "other-base:{alias}"}, param="model"),
    Case("path-traversal-adapter", 404, {**chat(), "model": "{base}:../../../etc/passwd"}, param="model"),
    Case("path-traversal-encoded", 404, {**chat(), "model": "{base}:..%2F..%2Fadapters"}, param="model"),
    Case("adapter-with-slash", 404, {**chat(), "model": "{base}:{adapter}/../{adapter}"}, param="model"),
    Case("unknown-model-card", 404, None, method="GET", path="/v1/models/{base}:no-such-adapter"),
    # -- routes and methods
    Case("get-on-chat", 405, None, method="GET", says="GET"),
    Case("delete-models", 405, None, method="DELETE", path="/v1/models"),
    Case("put-completions", 405, completion(), method="PUT", path="/v1/completions"),
    Case("unknown-route", 404, None, method="GET", path="/v1/nope", says="/v1/nope"),
    Case("v2-route", 404, chat(), path="/v2/chat/completions"),
    # -- auth
    Case("no-api-key", 401, chat(), auth=False),
    Case("wrong-api-key", 401, chat(), headers={"Authorization": "Bearer wrong"}, auth=False),
]


def fill(value: Any, names: dict[str, str]) -> Any:
    if isinstance(value, str):
        for key, name in names.items():
            value = value.replace("{" + key + "}", name)
        return value
    if isinstance(value, dict):
        return {k: fill(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, names) for v in value]
    return value


def request_kwargs(case: Case, names: dict[str, str], api_key: str | None) -> dict[str, Any]:
    """method, url path and content/headers for httpx or Starlette's TestClient."""
    headers = dict(case.headers)
    if case.auth and api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    kwargs: dict[str, Any] = {"method": case.method, "url": fill(case.path, names), "headers": headers}
    if isinstance(case.body, bytes):
        headers.setdefault("Content-Type", "application/json")
        kwargs["content"] = case.body
    elif case.body is not None:
        headers.setdefault("Content-Type", "application/json")
        kwargs["content"] = json.dumps(fill(case.body, names)).encode()
    return kwargs


def check_error(case: Case, status: int, payload: Any, names: dict[str, str]) -> None:
    """The response is an OpenAI error object with the case's status (and param / words)."""
    assert status == case.status, f"{case.id}: status {status}, want {case.status}: {payload}"
    assert isinstance(payload, dict) and set(payload) == {"error"}, f"{case.id}: not an error object: {payload}"
    error = payload["error"]
    assert set(error) == ERROR_KEYS, f"{case.id}: error keys {sorted(error)}"
    assert isinstance(error["message"], str) and error["message"], case.id
    assert isinstance(error["type"], str) and error["type"], case.id
    assert error["code"] == case.status, f"{case.id}: code {error['code']}"
    if case.param is not None:
        assert error["param"] == case.param, f"{case.id}: param {error['param']!r}, want {case.param!r}"
    if case.says is not None:
        assert fill(case.says, names) in error["message"], f"{case.id}: {error['message']!r}"
