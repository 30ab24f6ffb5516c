# SPDX-License-Identifier: Apache-2.0
"""How much memory this process may still use, how much a process tree holds, and whether the
kernel killed a process for lack of it.

A laptop or a container often has less memory than ``make e2e`` peaks at (README). Where it runs
out, the kernel's out-of-memory killer ends a process (the engine's, most often) and the stage
fails with that process's last words, which never mention memory: vLLM's "Engine core
initialization failed. See root cause above" with no root cause above. What is asked here lets
``make e2e`` and the stage commands say so (:mod:`e2e_llm.e2e`, :mod:`e2e_llm.cli`), and the e2e
summary give each stage's peak.

Linux only (as the project is): ``/proc/meminfo``, ``/proc/vmstat`` and the memory cgroup, v1 or
v2, that ``/proc/self/cgroup`` names. Every reader returns ``None`` where the file is not there
or not readable, never raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
# cgroup v1 writes "no limit" as the largest page-aligned signed 64-bit number.
_V1_NO_LIMIT = 2**62


@dataclass(frozen=True)
class Headroom:
    """Memory this process may still take: the machine's available memory, or less where a
    cgroup (a container, a systemd slice) limits it."""

    available: int  # bytes
    machine_available: int
    cgroup_limit: int | None = None

    def describe(self) -> str:
        text = f"{self.available / GIB:.1f} GiB available"
        if self.cgroup_limit is not None:
            text += f" (a memory limit of {self.cgroup_limit / GIB:.1f} GiB applies: cgroup)"
        return text


def headroom(proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> Headroom | None:
    """Available memory (``MemAvailable``), less where this process's memory cgroup allows less:
    its limit minus what the cgroup holds that cannot be reclaimed (page cache that is not in
    use can)."""
    machine = _meminfo_available(proc / "meminfo")
    if machine is None:
        return None
    limit_and_used = _cgroup_limit_and_used(proc / "self" / "cgroup", cgroup_root)
    if limit_and_used is None:
        return Headroom(machine, machine)
    limit, used = limit_and_used
    return Headroom(max(0, min(machine, limit - used)), machine, limit)


@dataclass(frozen=True)
class OomCount:
    """Processes the kernel's out-of-memory killer has ended, and where they were counted."""

    kills: int
    scope: str  # "this machine" or "memory cgroup <path>"


def oom_kills(proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> OomCount | None:
    """Out-of-memory kills among this process's own memory cgroup (a container, a CI job's
    slice; any kind of out-of-memory killer), so that another tenant's kill on a shared machine
    is not taken for ours; where no such cgroup can be read (the host's root cgroup), the whole
    machine's since boot, as ``/proc/vmstat`` counts them (Linux >= 4.13)."""
    found = _memory_cgroup(proc / "self" / "cgroup", cgroup_root)
    if found is not None:
        version, folder, path = found
        # v2 memory.events counts the cgroup's subtree; v1 memory.oom_control the cgroup alone.
        kills = _read_key(folder / ("memory.events" if version == 2 else "memory.oom_control"), "oom_kill")
        if kills is not None:
            return OomCount(kills, f"memory cgroup {path}")
    kills = _read_key(proc / "vmstat", "oom_kill")
    return None if kills is None else OomCount(kills, "this machine")


def _meminfo_available(path: Path) -> int | None:
    kib = _read_key(path, "MemAvailable:")
    return None if kib is None else kib * 1024


def _read_key(path: Path, key: str) -> int | None:
    """The integer after ``key`` on its line of a ``key value`` file (meminfo, vmstat, memory.stat)."""
    try:
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == key:
                return int(parts[1])
    except (OSError, ValueError):
        return None
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for none


def _memory_cgroup(self_cgroup: Path, root: Path) -> tuple[int, Path, str] | None:
    """(1 or 2, folder, path) of the memory cgroup this process is in: the v1 memory hierarchy's,
    else the v2 one where it has the memory controller; None where neither can be read."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.count(":") < 2:
            continue
        hierarchy, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):  # v1
            folder = _cgroup_folder(root / "memory", path)
            return None if folder is None else (1, folder, path)
        if hierarchy == "0" and controllers == "":  # v2, unless a v1 memory line comes first
            folder = _cgroup_folder(root, path)
            if folder is not None and (folder / "memory.current").exists():
                return 2, folder, path
    return None


def _cgroup_limit_and_used(self_cgroup: Path, root: Path) -> tuple[int, int] | None:
    """(limit, unreclaimable use) of the tightest memory cgroup this process is in, or None."""
    found = _memory_cgroup(self_cgroup, root)
    if found is None:
        return None
    version, folder, _ = found
    if version == 2:
        return _v2_limit_and_used(root, folder)
    # The effective limit: this cgroup's or an ancestor's, whichever is tighter.
    limit = _read_key(folder / "memory.stat", "hierarchical_memory_limit")
    used = _read_int(folder / "memory.usage_in_bytes")
    if limit is None or used is None or limit >= _V1_NO_LIMIT:
        return None
    return limit, used - (_read_key(folder / "memory.stat", "total_inactive_file") or 0)


def _v2_limit_and_used(root: Path, folder: Path) -> tuple[int, int] | None:
    tightest = None
    node = folder
    while True:  # a limit may be set on any ancestor; the tightest headroom wins
        limit, used = _read_int(node / "memory.max"), _read_int(node / "memory.current")
        if limit is not None and used is not None:
            used -= _read_key(node / "memory.stat", "inactive_file") or 0
            if tightest is None or limit - used < tightest[0] - tightest[1]:
                tightest = (limit, used)
        if node == root or node.parent == node:
            return tightest
        node = node.parent


def _cgroup_folder(mount: Path, path: str) -> Path | None:
    """Where ``path`` (from /proc/self/cgroup) is under ``mount``. In a container with its own
    cgroup namespace the path reads "/" and the mount is the container's cgroup itself."""
    folder = mount / path.lstrip("/")
    if folder.is_dir():
        return folder
    return mount if mount.is_dir() else None


@dataclass(frozen=True)
class OomWatch:
    """The out-of-memory kill count and the headroom when something (a command, a stage) started:
    :meth:`note` tells, once it has failed, whether the killer struck meanwhile."""

    kills: OomCount | None
    at_start: Headroom | None = None

    @classmethod
    def start(cls) -> OomWatch:
        return cls(oom_kills(), headroom())

    def note(self, what: str, lower: str | None = None) -> str | None:
        """The line to end the failed ``what`` with when the out-of-memory killer ended a process
        since :meth:`start`; None when it did not, or it cannot be told."""
        now = oom_kills()
        if self.kills is None or now is None or now.scope != self.kills.scope or now.kills <= self.kills.kills:
            return None
        n = now.kills - self.kills.kills
        where = "on this machine" if now.scope == "this machine" else f"in this command's {now.scope}"
        text = (f"error: {what} failed, and meanwhile the kernel's out-of-memory killer ended {n} "
                f"process{'es' if n > 1 else ''} {where}: most likely this one's, for lack of memory")
        if self.at_start is not None:
            text += f" ({self.at_start.describe()} when it started)"
        text += ". Free memory (other programs), or lower what it takes"
        return text + (f": {lower}" if lower else "")


def tree_anonymous_bytes(root_pid: int, proc: Path = Path("/proc")) -> int:
    """Anonymous resident memory (``RssAnon``: what only swap could free) of ``root_pid`` and all
    its descendants, Ray's processes and vLLM's engine included. File pages are left out: they
    are shared between processes and the kernel can drop them."""
    children: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # after "pid (comm) state"
        children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        total += (_read_key(proc / str(pid) / "status", "RssAnon:") or 0) * 1024
        todo.extend(children.get(pid, ()))
    return total


class PeakSampler:
    """The largest :func:`tree_anonymous_bytes` of a process tree, sampled every ``interval_s`` in a
    thread between :meth:`start` and :meth:`stop` (which returns it, or None where /proc says
    nothing)."""

    def __init__(self, root_pid: int, interval_s: float = 1.0):
        import threading

        self.root_pid, self.interval_s = root_pid, interval_s
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="e2e-llm-memory", daemon=True)

    def start(self) -> PeakSampler:
        self._thread.start()
        return self

    def stop(self) -> int | None:
        self._stop.set()
        self._thread.join()
        return self.peak

    def _run(self) -> None:
        while True:
            try:
                now = tree_anonymous_bytes(self.root_pid)
            except (OSError, ValueError, IndexError):
                now = 0
            if now:
                self.peak = max(self.peak or 0, now)
            if self._stop.wait(self.interval_s):
                return
