# SPDX-License-Identifier: Apache-2.0
"""A hangup (the terminal closed, an SSH connection dropped) stops a command as SIGTERM does.

Each test runs its command on a pseudo-terminal of its own and closes the terminal's side, as an
SSH server does when the connection drops: the kernel sends the session's leader SIGHUP, and
writes to the terminal fail from then on."""

from __future__ import annotations

import os
import pty
import select
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")


def run_on_a_terminal_then_hang_up(script: str, ready: Path, timeout_s: float = 60) -> int:
    """Run ``script`` as the leader of a session on a new terminal; once ``ready`` exists, close the
    terminal. Returns its wait status."""
    pid, master = pty.fork()
    if pid == 0:  # the child: the session leader, its terminal the pty
        os.execve(sys.executable, [sys.executable, "-c", script], {**os.environ, "PYTHONPATH": SRC})
    try:
        deadline = time.monotonic() + timeout_s
        while not ready.exists():
            assert time.monotonic() < deadline, f"{ready} never came"
            if select.select([master], [], [], 0.05)[0]:
                try:
                    os.read(master, 65536)  # keep the terminal drained
                except OSError:
                    break
    finally:
        os.close(master)
    deadline = time.monotonic() + timeout_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the command did not end after the hangup")
        time.sleep(0.05)


@pytest.mark.parametrize("stdout_to_file", [False, True])
def test_after_a_hangup_the_handler_runs_and_output_goes_on_without_the_terminal(tmp_path, stdout_to_file):
    ready, out, done = tmp_path / "ready", tmp_path / "out.txt", tmp_path / "done"
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        from e2e_llm.hangup import on_stop_signals
        if {stdout_to_file}:
            fd = os.open({str(out)!r}, os.O_WRONLY | os.O_CREAT)
            os.dup2(fd, 1)
        seen = []
        on_stop_signals(lambda signum, frame: seen.append(signum))
        print("serving", flush=True)
        open({str(ready)!r}, "w").close()
        deadline = time.monotonic() + 60
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
        print("shutting down after", signal.Signals(seen[0]).name, flush=True)  # EIO on a dead terminal
        print("stderr too", file=sys.stderr, flush=True)
        open({str(done)!r}, "w").write(signal.Signals(seen[0]).name)
    """)
    status = run_on_a_terminal_then_hang_up(script, ready)
    assert os.waitstatus_to_exitcode(status) == 0
    assert done.read_text() == "SIGHUP"
    if stdout_to_file:  # a file is no terminal: it keeps what comes after the hangup
        assert out.read_text().splitlines() == ["serving", "shutting down after SIGHUP"]


def test_a_hangup_of_e2e_stops_its_stage_as_sigterm_does(tmp_path):
    """The stage runs in a session of its own, which a hangup does not reach: e2e died and left it
    running, its output going nowhere and the stages after it never run."""
    ready, result_file, stage_pid = tmp_path / "ready", tmp_path / "result", tmp_path / "stage.pid"
    stage = textwrap.dedent(f"""
        import os, signal, sys, time
        def stop(signum, frame):
            print(f"error: terminated ({{signal.Signals(signum).name}}); rerun with --run-id r1 to resume", flush=True)
            sys.exit(128 + signum)
        signal.signal(signal.SIGTERM, stop)
        open({str(stage_pid)!r}, "w").write(str(os.getpid()))
        print("training", flush=True)
        open({str(ready)!r}, "w").close()
        time.sleep(60)
    """)
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from e2e_llm.e2e import run_stage
        result = run_stage("train", [sys.executable, "-c", {stage!r}], Path({str(tmp_path)!r}) / "train.log",
                           env={{}}, echo=print)
        print("summary: train exited", result.returncode, flush=True)  # on the terminal that is gone
        open({str(result_file)!r}, "w").write(str(result.returncode))
    """)
    started = time.monotonic()
    status = run_on_a_terminal_then_hang_up(script, ready)
    assert time.monotonic() - started < 45  # the stage did not sleep its 60 s out
    assert os.waitstatus_to_exitcode(status) == 0  # e2e itself was not killed by the hangup
    assert result_file.read_text() == str(128 + signal.SIGTERM)
    log = (tmp_path / "train.log").read_text().splitlines()
    assert log[-1] == "error: terminated (SIGTERM); rerun with --run-id r1 to resume"
    with pytest.raises(ProcessLookupError):
        os.kill(int(stage_pid.read_text()), 0)


def test_off_the_main_thread_nothing_is_installed():
    """e2e's stages and training may run in a thread of a caller (a bench, a test): Python lets
    only the main thread install handlers, and the caller's own stay."""
    import threading

    from e2e_llm.hangup import STOP_SIGNALS, on_stop_signals

    before = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    got = []
    thread = threading.Thread(target=lambda: got.append(on_stop_signals(lambda *_: None)))
    thread.start()
    thread.join(10)
    assert got == [{}]
    assert {signum: signal.getsignal(signum) for signum in STOP_SIGNALS} == before
