# SPDX-License-Identifier: Apache-2.0
"""Which cgroup (a container, a CI job's slice, a systemd unit) this process is in, and reading
its files: the one place that knows cgroup v1 from v2 (:mod:`e2e_llm.memory` for memory limits
and out-of-memory kills, :mod:`e2e_llm.host_cpus` for CPU quotas).

Every reader returns ``None`` where a file is not there or not readable, never raises.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
SELF = Path("/proc/self/cgroup")


@dataclass(frozen=True)
class Cgroup:
    version: int  # 1 or 2
    folder: Path  # where its files are
    path: str  # as /proc/self/cgroup names it
    mount: Path  # the hierarchy's root folder: ancestors are read up to it


def own_cgroup(controller: str, self_cgroup: Path = SELF, root: Path = ROOT,
               v2_marker: str | None = None) -> Cgroup | None:
    """The cgroup this process is in for ``controller`` ("memory", "cpu"): the v1 hierarchy that
    has it, else the v2 one (where ``v2_marker``, when given, is a file of that folder: the
    controller is on there); None where neither can be read."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.count(":") < 2:
            continue
        hierarchy, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):  # v1
            mount = root / controller
            folder = cgroup_folder(mount, path)
            return None if folder is None else Cgroup(1, folder, path, mount)
        if hierarchy == "0" and controllers == "":  # v2, unless a v1 line for it comes first
            folder = cgroup_folder(root, path)
            if folder is not None and (v2_marker is None or (folder / v2_marker).exists()):
                return Cgroup(2, folder, path, root)
    return None


def cgroup_folder(mount: Path, path: str) -> Path | None:
    """Where ``path`` (from /proc/self/cgroup) is under ``mount``. In a container with its own
    cgroup namespace the path reads "/" and the mount is the container's cgroup itself."""
    folder = mount / path.lstrip("/")
    if folder.is_dir():
        return folder
    return mount if mount.is_dir() else None


def up_to_mount(group: Cgroup) -> Iterator[Path]:
    """The cgroup's folder, then each ancestor's up to its hierarchy's root: a limit set on any
    of them applies."""
    node = group.folder
    while True:
        yield node
        if node == group.mount or node.parent == node:
            return
        node = node.parent


def read_int(path: Path) -> int | None:
    """A file holding one integer; None for anything else (cgroup v2 writes "max" for no limit)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.lstrip("-").isdigit() else None


def read_key(path: Path, key: str) -> int | None:
    """The integer after ``key`` on its line of a ``key value`` file (meminfo, vmstat, memory.stat)."""
    try:
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == key:
                return int(parts[1])
    except (OSError, ValueError):
        return None
    return None
