# SPDX-License-Identifier: Apache-2.0
"""The app's API-key check follows the replica's environment: on while the key variable is
there (KubeRay Secret, local shell), off with a startup warning while it is absent (Anyscale,
where the service's query auth token guards the same header), refused when set but empty."""

from __future__ import annotations

import logging

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

# Starlette is in the serve environment; the train tier collects this module too.
pytest.importorskip("starlette")

from e2e_llm.api_guard import ApiKeyMiddleware, app_key_check  # noqa: E402

KEY_ENV = "E2E_LLM_TEST_API_KEY"


def _client() -> TestClient:
    app = Starlette(routes=[Route("/v1/models", lambda request: PlainTextResponse("ok"))])
    app.add_middleware(ApiKeyMiddleware, api_key_env=KEY_ENV)
    return TestClient(app)


def test_without_the_key_variable_requests_pass_and_startup_warns(monkeypatch, caplog):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        assert app_key_check(KEY_ENV) is False
    assert f"app API-key check is OFF: ${KEY_ENV}" in caplog.text
    assert "query auth token" in caplog.text  # says who is expected to authenticate
    response = _client().get("/v1/models")
    assert response.status_code == 200 and response.text == "ok"


def test_with_the_key_variable_a_request_without_the_key_gets_401(monkeypatch, caplog):
    monkeypatch.setenv(KEY_ENV, "s3cret")
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        assert app_key_check(KEY_ENV) is True
    assert "OFF" not in caplog.text
    client = _client()
    missing = client.get("/v1/models")
    assert missing.status_code == 401 and "missing API key" in missing.json()["error"]["message"]
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = client.get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "invalid API key"
    assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_an_empty_key_variable_is_refused_at_startup_and_fails_closed(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "")
    with pytest.raises(RuntimeError, match=f"\\${KEY_ENV} is set but empty"):
        app_key_check(KEY_ENV)
    assert _client().get("/v1/models", headers={"Authorization": "Bearer "}).status_code == 401


def test_probe_paths_stay_open_with_the_check_on(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "s3cret")
    app = Starlette(routes=[Route("/-/healthz", lambda request: PlainTextResponse("ok"))])
    app.add_middleware(ApiKeyMiddleware, api_key_env=KEY_ENV)
    assert TestClient(app).get("/-/healthz").status_code == 200
