# SPDX-License-Identifier: Apache-2.0
"""Servers taking turns on one machine (``bench/serve_latency.py --interleave``): every process
of the server not being measured is stopped (SIGSTOP) and keeps its state, so it uses no CPU, as
if it were not there, yet the servers can alternate round by round. Linux only (``/proc``)."""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager, suppress


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (a server's processes), parents first."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [pid, *(p.pid for p in root.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def process_state(pid: int) -> str:
    """The kernel's one-letter state of ``pid`` (``T``: stopped); "" when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def stop_tree(pid: int, timeout: float = 10.0) -> list[int]:
    """SIGSTOP every process of the tree at ``pid`` (parents first, so none starts a new child
    meanwhile) and wait until each one is stopped; their pids."""
    pids = process_tree(pid)
    for p in pids:
        with suppress(ProcessLookupError):
            os.kill(p, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while running := [p for p in pids if process_state(p) not in ("T", "t", "", "Z", "X")]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {running} of {pid}'s tree did not stop within {timeout:.0f} s")
        time.sleep(0.05)
    return pids


def resume(pids: list[int]) -> None:
    for p in reversed(pids):
        with suppress(ProcessLookupError):
            os.kill(p, signal.SIGCONT)


@contextmanager
def taking_turns(trees: dict[str, int]):
    """``--interleave``: yields ``turn(name)``, after which only the process tree of ``name``
    (of ``trees``: name -> root pid) runs and every other one is stopped (SIGSTOP), keeping its
    state: the server not being measured uses no CPU, as if it were not there (an idle Ray
    instance costs ~0.1 of a core). A tree only stops or resumes when the turn changes hands,
    and all of it at once, so none of its processes sees another one stall (Ray's health checks,
    vLLM's engine-core client). On exit every tree runs again."""
    stopped: dict[str, list[int]] = {}

    def turn(name: str) -> None:
        for other, root in trees.items():
            if other != name and other not in stopped:
                stopped[other] = stop_tree(root)
        if name in stopped:
            resume(stopped.pop(name))

    try:
        yield turn
    finally:
        for pids in stopped.values():
            resume(pids)
