# SPDX-License-Identifier: Apache-2.0
"""Free TCP ports for the servers e2e-llm starts on the user's machine (Serve's mode listeners,
a local S3 store), the bench's and the tests'."""

from __future__ import annotations

import socket


def free_tcp_port() -> int:
    """A TCP port no program listens on now, on any interface (so also free on loopback; HAProxy
    binds its own listeners on every interface)."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]
