# SPDX-License-Identifier: Apache-2.0
"""Free TCP ports for the servers e2e-llm starts on the user's machine (Serve's mode listeners,
a local S3 store), the bench's and the tests'."""

from __future__ import annotations

import socket


def port_taken(host: str, port: int) -> bool:
    """Whether a program already listens on ``host:port`` (a bind there fails). Connections of a
    server stopped a moment ago (TIME_WAIT) do not count: servers bind with SO_REUSEADDR too."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def free_tcp_port() -> int:
    """A TCP port no program listens on now, on any interface (so also free on loopback; HAProxy
    binds its own listeners on every interface)."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]
