# SPDX-License-Identifier: Apache-2.0
"""The signals that stop a command, and what a hangup adds to them.

A hangup (SIGHUP: the terminal closed, an SSH connection dropped) stops a command as SIGTERM
does. Left to its default it killed ``e2e-llm e2e``, ``serve``, ``train`` and ``store`` at once:
``make e2e``'s stage, in a session of its own that a hangup does not reach, ran on with its output
going nowhere and the stages after it never ran; the local store lost its last second of writes;
serve and train ended without their own shutdown. After a hangup the
terminal is gone and a write to it fails (EIO), so the output streams that were the terminal are
pointed at ``/dev/null`` first; streams redirected to a file keep writing there.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any

# Ctrl-C, a stop (`kill`, a job runner, the kubelet) and a hangup.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

Handler = Callable[[int, Any], Any]


def terminal_fds(fds: tuple[int, ...] = (1, 2)) -> list[int]:
    """Those of ``fds`` that are a terminal now (while it is there to ask)."""
    found = []
    for fd in fds:
        try:
            if os.isatty(fd):
                found.append(fd)
        except OSError:
            pass
    return found


def leave_terminal(fds: list[int]) -> None:
    """Point ``fds`` at /dev/null: what is written there after a hangup goes nowhere instead of failing."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in fds:
            os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def on_stop_signals(handler: Handler, signals: tuple[int, ...] = STOP_SIGNALS) -> dict[int, Any]:
    """Install ``handler`` for ``signals``; on a hangup it runs once this process has left its
    terminal. Returns the previous handlers, for :func:`restore`. Off the main thread, where Python
    lets no handler be installed, nothing is (the caller's thread gets no signals anyway)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    fds = terminal_fds()

    def handle(signum: int, frame: Any) -> Any:
        if signum == signal.SIGHUP:
            leave_terminal(fds)
        return handler(signum, frame)

    return {signum: signal.signal(signum, handle) for signum in signals}


def restore(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)
