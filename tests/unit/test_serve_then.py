# SPDX-License-Identifier: Apache-2.0
"""`e2e-llm serve --then COMMAND`: the command ends the serve run, and a Ctrl-C or SIGTERM of the
serve process ends the command (make e2e forwards Ctrl-C to its stage's process alone: a client
waiting on an answer kept the stage, Serve and Ray up for its own timeout)."""

from __future__ import annotations

import sys
import threading

from e2e_llm.cli import INTERRUPTED
from e2e_llm.commands import serve as serve_command


def test_the_commands_status_is_the_runs():
    stop = threading.Event()
    assert serve_command.run_then([sys.executable, "-c", "raise SystemExit(3)"], {}, stop) == 3
    assert serve_command.run_then([sys.executable, "-c", "pass"], {}, stop) == 0


def _stopped_after(cmd: list[str], delay: float) -> int:
    stop = threading.Event()
    threading.Timer(delay, stop.set).start()
    return serve_command.run_then(cmd, {}, stop)


def test_a_stop_interrupts_a_command_that_waits(tmp_path):
    ended = tmp_path / "ended"
    waits = ("import pathlib, time\ntry:\n    time.sleep(120)\nexcept KeyboardInterrupt:\n"
             f"    pathlib.Path({str(ended)!r}).write_text('interrupted')\n    raise")
    assert _stopped_after([sys.executable, "-c", waits], delay=1.0) == INTERRUPTED  # (left alone: 0)
    assert ended.read_text() == "interrupted"  # it had its SIGINT


def test_a_command_that_ignores_its_sigint_is_killed_after_the_grace(monkeypatch):
    monkeypatch.setattr(serve_command, "THEN_GRACE_S", 1.0)
    ignores = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(120)"
    assert _stopped_after([sys.executable, "-c", ignores], delay=1.0) == INTERRUPTED  # (left alone: 0)
