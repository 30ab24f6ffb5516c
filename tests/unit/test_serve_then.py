# SPDX-License-Identifier: Apache-2.0
"""`e2e-llm serve --then COMMAND`: the command ends the serve run, and a Ctrl-C or SIGTERM of the
serve process ends the command (make e2e forwards Ctrl-C to its stage's process alone: a client
waiting on an answer kept the stage, Serve and Ray up for its own timeout)."""

from __future__ import annotations

import sys
import threading
import time

from e2e_llm.cli import INTERRUPTED
from e2e_llm.commands import serve as serve_command


def test_the_commands_status_is_the_runs():
    stop = threading.Event()
    assert serve_command.run_then([sys.executable, "-c", "raise SystemExit(3)"], {}, stop) == 3
    assert serve_command.run_then([sys.executable, "-c", "pass"], {}, stop) == 0


def _stopped_once_waiting(cmd: list[str], waiting) -> int:
    """``run_then(cmd)``, stopped once the command is ``waiting()`` (under load a Python takes
    seconds to start: a stop before its handlers are up tests nothing)."""
    stop = threading.Event()

    def stop_once_waiting():
        deadline = time.monotonic() + 120
        while not waiting() and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()

    threading.Thread(target=stop_once_waiting, daemon=True).start()
    return serve_command.run_then(cmd, {}, stop)


def test_a_stop_interrupts_a_command_that_waits(tmp_path):
    waiting, ended = tmp_path / "waiting", tmp_path / "ended"
    # Python leaves SIGINT ignored where it started so (a background job of a script, as CI may run
    # the suite); a client started from a terminal has its handler, as here.
    waits = (f"import pathlib, signal, time\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
             f"try:\n    pathlib.Path({str(waiting)!r}).touch()\n    time.sleep(120)\n"
             f"except KeyboardInterrupt:\n    pathlib.Path({str(ended)!r}).write_text('interrupted')\n    raise")
    assert _stopped_once_waiting([sys.executable, "-c", waits], waiting.exists) == INTERRUPTED  # (left alone: 0)
    assert ended.read_text() == "interrupted"  # it had its SIGINT


def test_a_command_that_ignores_its_sigint_is_killed_after_the_grace(monkeypatch, tmp_path):
    monkeypatch.setattr(serve_command, "THEN_GRACE_S", 1.0)
    waiting = tmp_path / "waiting"
    ignores = (f"import pathlib, signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
               f"pathlib.Path({str(waiting)!r}).touch()\ntime.sleep(120)")
    assert _stopped_once_waiting([sys.executable, "-c", ignores], waiting.exists) == INTERRUPTED  # (left alone: 0)
