# SPDX-License-Identifier: Apache-2.0
"""HAProxy left behind by a local Serve instance whose Ray ended without shutting Serve down
(e2e_llm.haproxy_leftovers): stopped by the next `e2e-llm serve`; a live one never is. Fake
HAProxy processes here (this Python under the name ``haproxy``); the serving tests check the two
signs of life on a real one."""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import time

import psutil
import pytest

from e2e_llm.haproxy_leftovers import left_behind, live_nodes, stop_left_behind

NODE = "ab" * 28  # a Ray node id: 56 hex digits


def _wait_for(what, check, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"{what} not within {timeout} s"
        time.sleep(0.1)
    return found


@pytest.fixture
def fake(tmp_path):
    """(folder, a command line that runs as ``haproxy -f <folder>/<NODE>/haproxy.cfg`` listening on
    a loopback port, and cleans up whatever it started)."""
    folder = tmp_path / "haproxy"
    (folder / NODE).mkdir(parents=True)
    config = folder / NODE / "haproxy.cfg"
    config.write_text("")
    haproxy = tmp_path / "bin" / "haproxy"
    haproxy.parent.mkdir()
    haproxy.symlink_to(sys.executable)
    listens = ("import socket, time\ns = socket.socket()\ns.bind(('127.0.0.1', 0))\ns.listen()\n"
               "time.sleep(120)")
    started: list[int] = []

    def command() -> list[str]:
        return [str(haproxy), "-c", listens, "-f", str(config)]

    yield folder, command, started
    for pid in started:
        try:
            for proc in [*psutil.Process(pid).children(recursive=True), psutil.Process(pid)]:
                proc.kill()
        except psutil.NoSuchProcess:
            pass


def _orphan(cmd: list[str]) -> int:
    """Start ``cmd`` as an orphan (its parent, a shell, exits at once): what a Ray worker's child
    becomes when the worker dies."""
    quoted = " ".join(shlex.quote(arg) for arg in cmd)
    shell = subprocess.run(["sh", "-c", f"{quoted} >/dev/null 2>&1 & echo $!"], capture_output=True, text=True,
                           check=True)
    return int(shell.stdout.strip())


def _fakes(folder) -> list[int]:
    return sorted(proc.pid for proc in left_behind(str(folder)))


def test_a_left_behind_haproxy_is_stopped_and_said_what_it_held(fake):
    folder, command, started = fake
    pid = _orphan(command())
    started.append(pid)
    listening = _wait_for("the fake HAProxy's listener", lambda: [
        f"{c.laddr.ip}:{c.laddr.port}" for c in psutil.Process(pid).net_connections("tcp")
        if c.status == psutil.CONN_LISTEN])
    assert _fakes(folder) == [pid]
    stopped = stop_left_behind(str(folder))
    assert [(s.pid, s.listening) for s in stopped] == [(pid, listening)]
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert stop_left_behind(str(folder)) == []


def test_an_haproxy_whose_parent_is_a_ray_worker_is_left_alone(fake):
    folder, command, started = fake
    worker = ("import subprocess, sys, time\nsubprocess.Popen(sys.argv[1:])\ntime.sleep(120)")
    # A Ray worker's command line starts with its title, "ray::HAProxyManager...".
    parent = subprocess.Popen(["bash", "-c", 'exec -a "ray::HAProxyManager.run" "$0" "$@"', sys.executable,
                               "-c", worker, *command()])
    started.append(parent.pid)
    _wait_for("the worker's HAProxy", lambda: psutil.Process(parent.pid).children())
    assert _fakes(folder) == []
    assert stop_left_behind(str(folder)) == [] and parent.poll() is None


def test_an_haproxy_whose_nodes_raylet_runs_is_left_alone(fake):
    folder, command, started = fake
    raylet = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", f"--node_id={NODE}"])
    started.append(raylet.pid)
    pid = _orphan(command())
    started.append(pid)
    _wait_for("the raylet", lambda: NODE in live_nodes())
    assert _fakes(folder) == []
    raylet.send_signal(signal.SIGKILL)
    raylet.wait()
    assert _fakes(folder) == [pid]  # its node gone, it is left behind


def test_an_haproxy_of_another_folder_is_not_ours(fake, tmp_path):
    folder, command, started = fake
    pid = _orphan(command())
    started.append(pid)
    _wait_for("the fake HAProxy", lambda: _fakes(folder) == [pid])  # left behind, from its folder
    assert _fakes(tmp_path / "elsewhere") == []
