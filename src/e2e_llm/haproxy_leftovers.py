# SPDX-License-Identifier: Apache-2.0
"""HAProxy processes that a local Serve instance left behind.

In Serve's high-throughput mode each Ray node runs an HAProxy, a child of Serve's
``HAProxyManager`` actor, in front of the app (on the serve port) and of its stats and metrics
ports. Serve stops it on shutdown. A Ray instance that ends without shutting Serve down (``make
e2e``'s second Ctrl-C kills the serve stage, as does the out-of-memory killer or a crash) takes
its actor down and leaves the HAProxy running: it keeps the serve port, and the next ``e2e-llm
serve`` on it was refused ("127.0.0.1:8000 is in use by another program") until the user found and
killed it. Where e2e-llm starts Ray itself each HAProxy's files are in this user's own folder
(:func:`e2e_llm.serve.mode_files_env`), one folder per Ray node. An HAProxy run from there whose
parent is no Ray worker any more and whose node's raylet is gone is one of ours that was left
behind, and is stopped (both must say so: another pipeline's live HAProxy is never touched).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

STOP_GRACE_S = 5.0
RAYLET_NODE_ID_ARG = "--node_id="  # how a raylet's command line names its node


@dataclass(frozen=True)
class LeftBehind:
    pid: int
    listening: list[str]  # host:port it listened on


def _config_file(cmdline: list[str]) -> str | None:
    """The file HAProxy's ``-f`` names, or None."""
    for flag, value in zip(cmdline, cmdline[1:]):
        if flag == "-f":
            return value
    return None


def parent_is_ray_worker(proc) -> bool:
    import psutil

    try:
        parent = proc.parent()
        return parent is not None and (parent.cmdline() or [""])[0].startswith("ray::")
    except psutil.Error:
        return False


def _node_ids(cmdline: list[str]) -> set[str]:
    """The node a raylet's command line names (its ``--node_id=``), if it is one."""
    return {arg.removeprefix(RAYLET_NODE_ID_ARG) for arg in cmdline if arg.startswith(RAYLET_NODE_ID_ARG)}


def live_nodes() -> set[str]:
    """The ids of the Ray nodes whose raylet runs on this machine."""
    import psutil

    return {node for proc in psutil.process_iter(["cmdline"]) for node in _node_ids(proc.info["cmdline"] or [])}


def left_behind(folder: str) -> list:
    """This user's HAProxy processes run from a config under ``folder`` (``<folder>/<node
    id>/...``) whose parent is no Ray worker and whose node has no raylet (``psutil.Process``).
    One pass over the machine's processes finds both the raylets and the HAProxies."""
    import psutil

    folder = os.path.join(os.path.abspath(folder), "")
    nodes: set[str] = set()
    ours = []  # (process, its node)
    for proc in psutil.process_iter(["name", "cmdline", "uids"]):
        try:
            cmdline = proc.info["cmdline"] or []
            nodes |= _node_ids(cmdline)
            if proc.info["name"] != "haproxy" or proc.info["uids"].real != os.getuid():
                continue
            config = os.path.abspath(_config_file(cmdline) or "/")
            if config.startswith(folder):
                ours.append((proc, config.removeprefix(folder).split(os.sep, 1)[0]))
        except (psutil.Error, TypeError, AttributeError):
            continue
    return [proc for proc, node in ours if node not in nodes and not parent_is_ray_worker(proc)]


def stop_left_behind(folder: str) -> list[LeftBehind]:
    """Stop what :func:`left_behind` finds (SIGTERM, SIGKILL after :data:`STOP_GRACE_S`); what it was."""
    import psutil

    stopped = []
    for proc in left_behind(folder):
        try:
            listening = sorted(f"{conn.laddr.ip}:{conn.laddr.port}" for conn in proc.net_connections("tcp")
                               if conn.status == psutil.CONN_LISTEN)
        except psutil.Error:
            listening = []
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            continue
        _, alive = psutil.wait_procs([proc], timeout=STOP_GRACE_S)
        for straggler in alive:
            straggler.kill()
        psutil.wait_procs(alive, timeout=STOP_GRACE_S)
        stopped.append(LeftBehind(proc.pid, listening))
    return stopped
