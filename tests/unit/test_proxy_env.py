# SPDX-License-Identifier: Apache-2.0
"""Loopback requests past the machine's HTTP proxy (e2e_llm.proxy_env): a proxy named in the
environment without NO_PROXY sent boto3's, httpx's and requests' calls to this machine's servers to
the proxy."""

from __future__ import annotations

import pytest

from e2e_llm.ports import free_tcp_port
from e2e_llm.proxy_env import NO_PROXY_ENV, PROXY_ENV, bypass_proxy_for_loopback, loopback_bypass


def test_the_loopback_names_join_what_no_proxy_has_where_a_proxy_is_set():
    assert loopback_bypass({}) == {}
    assert loopback_bypass({"NO_PROXY": "corp.example"}) == {}  # no proxy: nothing to go past
    proxy = {"https_proxy": "http://proxy.corp.example:3128"}
    assert loopback_bypass(proxy) == dict.fromkeys(NO_PROXY_ENV, "127.0.0.1,localhost,::1")
    kept = loopback_bypass({**proxy, "NO_PROXY": ".internal, localhost", "no_proxy": "10.0.0.0/8"})
    assert kept == dict.fromkeys(NO_PROXY_ENV, ".internal,localhost,10.0.0.0/8,127.0.0.1,::1")
    assert loopback_bypass({**proxy, "no_proxy": "127.0.0.1,localhost,::1"}) == {}
    assert loopback_bypass({**proxy, "NO_PROXY": "*"}) == {}


@pytest.fixture
def dead_proxy(monkeypatch):
    """A proxy in the environment where nothing listens, and an empty NO_PROXY."""
    proxy = f"http://127.0.0.1:{free_tcp_port()}"
    for name in PROXY_ENV:
        monkeypatch.setenv(name, proxy)
    for name in NO_PROXY_ENV:
        monkeypatch.setenv(name, "")  # restored after the test, as what the command sets is
    return proxy


def _clients(endpoint: str) -> dict[str, object]:
    """What each client e2e-llm uses gets from the local S3 store, or the exception it raised."""
    import boto3
    import httpx
    import requests
    from botocore.config import Config

    calls = {
        "boto3": lambda: boto3.client("s3", endpoint_url=endpoint, config=Config(retries={"max_attempts": 1}))
        .list_buckets()["ResponseMetadata"]["HTTPStatusCode"],
        "httpx": lambda: httpx.get(endpoint, timeout=10).status_code,
        "requests": lambda: requests.get(endpoint, timeout=10).status_code,
    }
    results: dict[str, object] = {}
    for name, call in calls.items():
        try:
            results[name] = call()
        except Exception as exc:  # noqa: BLE001  which one and how is the result
            results[name] = exc
    return results


def test_clients_reach_this_machines_store_past_the_proxy_once_bypassed(s3_server, dead_proxy, monkeypatch):
    through_proxy = _clients(s3_server)
    assert all(isinstance(result, Exception) for result in through_proxy.values()), through_proxy
    bypass_proxy_for_loopback()
    direct = _clients(s3_server)
    assert all(isinstance(status, int) and status < 500 for status in direct.values()), direct
    import os

    assert os.environ["HTTPS_PROXY"] == dead_proxy  # other addresses still go through it


def test_every_command_goes_past_the_proxy_for_loopback(dead_proxy, tmp_path):
    """cli.main bypasses it before the command runs (here one that stops at its profile)."""
    import os

    from e2e_llm import cli

    assert cli.main(["data", "--profile", str(tmp_path / "missing.yaml")]) == cli.CONFIG_ERROR
    assert "127.0.0.1" in os.environ["NO_PROXY"].split(",") and "localhost" in os.environ["no_proxy"].split(",")
