# SPDX-License-Identifier: Apache-2.0
"""Loopback requests past the machine's HTTP proxy (e2e_llm.proxy_env): a proxy named in the
environment without NO_PROXY sent boto3's, httpx's and requests' calls to this machine's servers to
the proxy."""

from __future__ import annotations

import pytest

from e2e_llm.ports import free_tcp_port
from e2e_llm.proxy_env import NO_PROXY_ENV, PROXY_ENV, bypass_proxy_for_this_machine, this_machine_bypass


def test_the_loopback_names_join_what_no_proxy_has_where_a_proxy_is_set():
    assert this_machine_bypass({}) == {}
    assert this_machine_bypass({"NO_PROXY": "corp.example"}) == {}  # no proxy: nothing to go past
    proxy = {"https_proxy": "http://proxy.corp.example:3128"}
    assert this_machine_bypass(proxy) == dict.fromkeys(NO_PROXY_ENV, "127.0.0.1,localhost,::1")
    kept = this_machine_bypass({**proxy, "NO_PROXY": ".internal, localhost", "no_proxy": "10.0.0.0/8"})
    assert kept == dict.fromkeys(NO_PROXY_ENV, ".internal,localhost,10.0.0.0/8,127.0.0.1,::1")
    assert this_machine_bypass({**proxy, "no_proxy": "127.0.0.1,localhost,::1"}) == {}
    # this machine's addresses (Ray's node address among them) too; gRPC's own list where it has one
    own = this_machine_bypass({**proxy, "no_grpc_proxy": "grpc.corp", "NO_PROXY": "*"}, ["192.0.2.7", "fd00::7"])
    merged = "*,grpc.corp,127.0.0.1,localhost,::1,192.0.2.7,fd00::7"
    assert own == dict.fromkeys([*NO_PROXY_ENV, "no_grpc_proxy"], merged)


def test_this_machines_addresses_are_its_interfaces_less_link_local_ones():
    import socket

    from e2e_llm.proxy_env import machine_addresses

    addresses = machine_addresses()
    assert "127.0.0.1" in addresses
    assert not any(address.startswith("fe80:") or "%" in address for address in addresses)
    for address in addresses:  # each is this machine's: a socket binds there
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family) as sock:
            sock.bind((address, 0))


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
    bypass_proxy_for_this_machine()
    direct = _clients(s3_server)
    assert all(isinstance(status, int) and status < 500 for status in direct.values()), direct
    import os

    assert os.environ["HTTPS_PROXY"] == dead_proxy  # other addresses still go through it


def test_every_command_goes_past_the_proxy_for_this_machine(dead_proxy, tmp_path):
    """cli.main bypasses it before the command runs (here one that stops at its profile)."""
    import os

    from e2e_llm import cli

    assert cli.main(["data", "--profile", str(tmp_path / "missing.yaml")]) == cli.CONFIG_ERROR
    assert "127.0.0.1" in os.environ["NO_PROXY"].split(",") and "localhost" in os.environ["no_proxy"].split(",")


def _grpc_reaches(address: str, timeout: float) -> bool:
    """Whether a gRPC channel, as Serve's ingress opens one to a replica, gets to a server at
    ``address`` (gRPC reads the proxy variables itself)."""
    import asyncio

    from grpc import aio

    async def probe() -> bool:
        server = aio.server()
        port = server.add_insecure_port(f"[{address}]:0" if ":" in address else f"{address}:0")
        await server.start()
        channel = aio.insecure_channel(f"[{address}]:{port}" if ":" in address else f"{address}:{port}")
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            await channel.close()
            await server.stop(0)

    return asyncio.run(probe())


def test_grpc_to_this_machines_address_goes_past_the_proxy_once_bypassed(dead_proxy):
    """Serve's ingress reached the engine replica at the node's address through the proxy, and
    retried for ever."""
    from e2e_llm.proxy_env import machine_addresses

    address = next((a for a in machine_addresses() if a not in ("127.0.0.1", "::1")), None)
    if address is None:
        pytest.skip("this machine has no address but loopback")
    assert not _grpc_reaches(address, timeout=3)  # through the proxy, where nothing listens
    bypass_proxy_for_this_machine()
    assert _grpc_reaches(address, timeout=30)
