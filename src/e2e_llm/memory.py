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
v2, that ``/proc/self/cgroup`` names (:mod:`e2e_llm.cgroups`). Every reader returns ``None``
where the file is not there or not readable, never raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from e2e_llm.cgroups import Cgroup, own_cgroup, read_int, read_key, up_to_mount

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
        # v2 memory.events counts the cgroup's subtree; v1 memory.oom_control the cgroup alone.
        events = "memory.events" if found.version == 2 else "memory.oom_control"
        kills = read_key(found.folder / events, "oom_kill")
        if kills is not None:
            return OomCount(kills, f"memory cgroup {found.path}")
    kills = read_key(proc / "vmstat", "oom_kill")
    return None if kills is None else OomCount(kills, "this machine")


def _meminfo_available(path: Path) -> int | None:
    kib = read_key(path, "MemAvailable:")
    return None if kib is None else kib * 1024


def _memory_cgroup(self_cgroup: Path, root: Path) -> Cgroup | None:
    """The memory cgroup this process is in: v1's, else v2's where it has the memory controller."""
    return own_cgroup("memory", self_cgroup, root, v2_marker="memory.current")


def _cgroup_limit_and_used(self_cgroup: Path, root: Path) -> tuple[int, int] | None:
    """(limit, unreclaimable use) of the tightest memory cgroup this process is in, or None."""
    found = _memory_cgroup(self_cgroup, root)
    if found is None:
        return None
    if found.version == 2:
        return _v2_limit_and_used(found)
    # The effective limit: this cgroup's or an ancestor's, whichever is tighter.
    limit = read_key(found.folder / "memory.stat", "hierarchical_memory_limit")
    used = read_int(found.folder / "memory.usage_in_bytes")
    if limit is None or used is None or limit >= _V1_NO_LIMIT:
        return None
    return limit, used - (read_key(found.folder / "memory.stat", "total_inactive_file") or 0)


def _v2_limit_and_used(found: Cgroup) -> tuple[int, int] | None:
    tightest = None
    for node in up_to_mount(found):  # a limit may be set on any ancestor; the tightest headroom wins
        limit, used = read_int(node / "memory.max"), read_int(node / "memory.current")
        if limit is not None and used is not None:
            used -= read_key(node / "memory.stat", "inactive_file") or 0
            if tightest is None or limit - used < tightest[0] - tightest[1]:
                tightest = (limit, used)
    return tightest


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
        total += (read_key(proc / str(pid) / "status", "RssAnon:") or 0) * 1024
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


SHM = Path("/dev/shm")
MIB = 2**20


def shm_problem(path: Path = SHM) -> str | None:
    """Why a vLLM engine on this machine's CPU would fail to start for lack of ``path`` (POSIX
    shared memory), or None: it checks for :func:`e2e_llm.compat.vllm.engine_shm_bytes` free there
    and otherwise fails with vLLM's "Engine core initialization failed" and the cause only in a Ray
    worker's log. A container's default /dev/shm (64 MiB: ``docker run``, a pod) is less."""
    import shutil

    from e2e_llm.compat.vllm import engine_shm_bytes

    if not path.is_dir():  # vLLM checks only a /dev/shm that is there
        return None
    free, need = shutil.disk_usage(path).free, engine_shm_bytes()
    if free >= need:
        return None
    return (f"{path} has {free // MIB} MiB free, and a vLLM engine on CPU checks for {need / MIB:.0f} MiB there "
            "when it starts (its worker's message queues; with less it fails with \"Engine core initialization "
            "failed\" and the cause only in a Ray worker's log). A container's default is 64 MiB: run it with "
            "`--shm-size=1g` (or `--ipc=host`), give a pod an emptyDir with medium: Memory at /dev/shm (the "
            f"rendered KubeRay pods have one), or remount it larger (`mount -o remount,size=1G {path}`)")
