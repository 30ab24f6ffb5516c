# SPDX-License-Identifier: Apache-2.0
"""bench/turns.py: servers taking turns, on real process trees."""

import os
import signal
import subprocess
import sys
import time

import pytest


@pytest.fixture
def turns(bench_script):
    return bench_script("turns")


def _tree(turns):
    """A parent with a child, both sleeping until killed; returns the parent's Popen."""
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
                               "time.sleep(600)"])
    deadline = time.monotonic() + 30
    while len(turns.process_tree(parent.pid)) < 2:
        assert time.monotonic() < deadline, "the child process never started"
        time.sleep(0.05)
    return parent


def _kill(turns, parent):
    for pid in reversed(turns.process_tree(parent.pid)):
        os.kill(pid, signal.SIGKILL)
    parent.wait(10)


def test_taking_turns_stops_every_other_tree_whole_and_resumes_all_on_exit(turns):
    trees = {"a": _tree(turns), "b": _tree(turns)}
    try:
        pids = {name: turns.process_tree(proc.pid) for name, proc in trees.items()}

        def states(name):
            return {turns.process_state(pid) for pid in pids[name]}

        with turns.taking_turns({name: proc.pid for name, proc in trees.items()}) as turn:
            turn("a")
            assert states("b") == {"T"} and "T" not in states("a")
            turn("a")  # the same turn again: nothing changes hands
            assert states("b") == {"T"} and "T" not in states("a")
            turn("b")
            assert states("a") == {"T"} and "T" not in states("b")
        assert "T" not in states("a") | states("b")
    finally:
        for proc in trees.values():
            _kill(turns, proc)


def test_a_tree_that_does_not_stop_is_an_error(turns, monkeypatch):
    proc = _tree(turns)
    try:
        monkeypatch.setattr(turns, "process_state", lambda pid: "S")  # as if the stop never took
        with pytest.raises(RuntimeError, match="did not stop"):
            turns.stop_tree(proc.pid, timeout=0.2)
    finally:
        turns.resume(turns.process_tree(proc.pid))
        _kill(turns, proc)


def test_a_gone_process_has_no_state_and_an_empty_tree(turns):
    gone = 2**22 + 12345  # above pid_max's default: never a live process
    assert turns.process_state(gone) == "" and turns.process_tree(gone) == []
