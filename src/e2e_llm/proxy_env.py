# SPDX-License-Identifier: Apache-2.0
"""This machine's traffic past the machine's HTTP proxy.

On a machine whose environment names an HTTP proxy (``HTTP_PROXY``, ``https_proxy``, ...: usual on
company laptops and build hosts) without ``NO_PROXY`` naming this machine, the clients e2e-llm and
its libraries use send requests for this machine's servers to the proxy, another machine, which
cannot reach them: boto3 to the local adapter store, httpx and requests to the local app and Ray's
metrics (at ``127.0.0.1``), and gRPC (which reads the same variables) from Serve's ingress to the
engine replica (at the node's address: Ray turns gRPC's proxy off for its own channels, Serve's
replica channels keep it on, so the ingress retried for ever). e2e-llm's servers on this machine
are only ever meant directly, so its commands add the loopback names and this machine's addresses
to ``NO_PROXY`` and ``no_proxy`` for themselves and everything they start (Ray's processes among
them); every other address still goes through the proxy.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Mapping

from e2e_llm.ports import LOOPBACK_NAMES

PROXY_ENV = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy",
             "grpc_proxy")
NO_PROXY_ENV = ("NO_PROXY", "no_proxy")
NO_GRPC_PROXY_ENV = "no_grpc_proxy"


def machine_addresses() -> list[str]:
    """This machine's IP addresses (IPv4 and global IPv6; link-local ones need a zone no client
    writes): where Ray's node address is."""
    try:
        import psutil
    except ImportError:  # both environments have it (Ray's); elsewhere the host name's addresses
        try:
            return sorted(set(socket.gethostbyname_ex(socket.gethostname())[2]))
        except OSError:
            return []
    addresses = {entry.address for entries in psutil.net_if_addrs().values() for entry in entries
                 if entry.family in (socket.AF_INET, socket.AF_INET6)}
    return sorted(address for address in addresses if "%" not in address and not address.startswith("fe80:"))


def proxy_set(environ: Mapping[str, str]) -> bool:
    return any(environ.get(name) for name in PROXY_ENV)


def this_machine_bypass(environ: Mapping[str, str], own: Iterable[str] = ()) -> dict[str, str]:
    """The ``NO_PROXY``/``no_proxy`` values that add the loopback names and ``own`` (this machine's
    addresses) to what ``environ`` has there; nothing where no proxy is set, or all are there."""
    if not proxy_set(environ):
        return {}
    # gRPC reads no_grpc_proxy instead of no_proxy where it is set, and knows no "*".
    names = [*NO_PROXY_ENV, *(name for name in (NO_GRPC_PROXY_ENV,) if name in environ)]
    entries = [entry.strip() for name in names for entry in environ.get(name, "").split(",")]
    wanted = [*LOOPBACK_NAMES, *own]
    if all(name in entries for name in wanted):
        return {}
    merged = ",".join(dict.fromkeys(entry for entry in [*entries, *wanted] if entry))
    return dict.fromkeys(names, merged)


def bypass_proxy_for_this_machine() -> None:
    """:func:`this_machine_bypass` into this process's environment, which its children inherit
    (this machine's addresses looked up only where a proxy is set)."""
    if proxy_set(os.environ):
        os.environ.update(this_machine_bypass(os.environ, machine_addresses()))
