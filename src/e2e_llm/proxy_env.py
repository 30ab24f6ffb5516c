# SPDX-License-Identifier: Apache-2.0
"""Loopback traffic past the machine's HTTP proxy.

On a machine whose environment names an HTTP proxy (``HTTP_PROXY``, ``https_proxy``, ...: usual on
company laptops and build hosts) without ``NO_PROXY`` naming loopback, every HTTP client e2e-llm and
its libraries use sends requests for ``127.0.0.1`` to the proxy: boto3 to the local adapter store,
httpx and requests to the local app and Ray's metrics. The proxy, another machine, cannot reach this
one's loopback. e2e-llm's servers on this machine are only ever meant directly, so its commands
add the loopback names to ``NO_PROXY`` and ``no_proxy`` for themselves and everything they start
(Ray's processes among them); every other address still goes through the proxy.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

PROXY_ENV = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
NO_PROXY_ENV = ("NO_PROXY", "no_proxy")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def loopback_bypass(environ: Mapping[str, str]) -> dict[str, str]:
    """The ``NO_PROXY``/``no_proxy`` values that add the loopback names to what ``environ`` has
    there; nothing where no proxy is set, or loopback is excluded already."""
    if not any(environ.get(name) for name in PROXY_ENV):
        return {}
    entries = [entry.strip() for name in NO_PROXY_ENV for entry in environ.get(name, "").split(",")]
    if "*" in entries or all(name in entries for name in LOOPBACK_NAMES):
        return {}
    merged = ",".join(dict.fromkeys(entry for entry in [*entries, *LOOPBACK_NAMES] if entry))
    return {name: merged for name in NO_PROXY_ENV}


def bypass_proxy_for_loopback() -> None:
    """:func:`loopback_bypass` into this process's environment, which its children inherit."""
    os.environ.update(loopback_bypass(os.environ))
