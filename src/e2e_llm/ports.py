# SPDX-License-Identifier: Apache-2.0
"""Free TCP ports for the servers e2e-llm starts on the user's machine (Serve's mode listeners,
a local S3 store), the bench's and the tests'."""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Where the kernel takes a port for a socket bound to port 0 or connecting out (Linux).
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
IANA_EPHEMERAL_RANGE = (49152, 65535)  # where that file is missing (macOS uses these)
# Ray's default worker ports (`ray start --min-worker-port/--max-worker-port`: 10002-19999).
RAY_WORKER_PORTS_END = 20000
PICK_TRIES = 100
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")  # how a URL names this machine's loopback
_pick = random.SystemRandom()  # not the random module's state, which forked processes share


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


def ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral port range, both ends included."""
    try:
        low, high = (int(end) for end in EPHEMERAL_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return IANA_EPHEMERAL_RANGE
    return low, high


def pickable_ports() -> list[range]:
    """Ports a picked one comes from: above Ray's worker ports and outside the ephemeral range.
    A port picked there stays free until its server binds it, which may be long after (HAProxy
    binds once Ray, Serve and the engines are up): the kernel gives ephemeral ports to every
    other socket bound to port 0 or connecting out, Ray's own listeners included, and Ray's raylet
    hands its worker ports to the workers it starts (picked inside either, the port was taken before
    HAProxy bound it, now and then, and serving failed with "Address already in use")."""
    low, high = ephemeral_range()
    ranges = [range(RAY_WORKER_PORTS_END, min(low, 65536)), range(max(high + 1, RAY_WORKER_PORTS_END), 65536)]
    return [ports for ports in ranges if len(ports) > 0]


def free_tcp_port() -> int:
    """A TCP port no program uses now, on any interface (so also free on loopback; HAProxy binds
    its own listeners on every interface), and one no other program is given meanwhile by the
    kernel or by Ray (:func:`pickable_ports`). Where the kernel leaves no such port (an ephemeral
    range that covers them all), any free one."""
    ranges = pickable_ports()
    if ranges:
        for _ in range(PICK_TRIES):
            ports = _pick.choices(ranges, weights=[len(r) for r in ranges])[0]
            port = _pick.choice(ports)
            if _bindable(port):
                return port
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _bindable(port: int) -> bool:
    """Whether ``port`` can be bound now on every interface, a connection in TIME_WAIT there
    counting as taken (a server that binds without SO_REUSEADDR would fail)."""
    with socket.socket() as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True
