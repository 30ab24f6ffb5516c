# SPDX-License-Identifier: Apache-2.0
"""Memory headroom (the machine's, or a cgroup's tighter limit) and the out-of-memory note: a stage
whose engine the kernel killed for lack of memory failed with vLLM's "Engine core initialization
failed. See root cause above", and no root cause above."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cgroup_limits import memory_cgroup

from e2e_llm import memory
from e2e_llm.memory import GIB, OomWatch, headroom, oom_kills


def _proc(tmp_path: Path, available_kib: int, cgroup: str, oom_kill: int = 3) -> Path:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal:       24000000 kB\nMemFree: 1 kB\nMemAvailable:   {available_kib} kB\n")
    (proc / "vmstat").write_text(f"nr_free_pages 1\noom_kill {oom_kill}\n")
    (proc / "self" / "cgroup").write_text(cgroup)
    return proc


def _write(folder: Path, **files: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("_", ".", 1)).write_text(text)


def test_without_a_cgroup_limit_the_machines_available_memory_is_the_headroom(tmp_path):
    proc = _proc(tmp_path, 8 * 2**20, "0::/user.slice\n")
    _write(tmp_path / "cg" / "user.slice", memory_max="max\n", memory_current=str(GIB), memory_stat="inactive_file 0\n")
    room = headroom(proc, tmp_path / "cg")
    assert room is not None and room.available == 8 * GIB and room.cgroup_limit is None
    assert room.describe() == "8.0 GiB available"


def test_a_cgroup_v1_limit_counts_what_it_holds_less_its_reclaimable_page_cache(tmp_path):
    proc = _proc(tmp_path, 20 * 2**20, "9:name=systemd:/\n4:memory:/ci/job\n0::/\n")
    _write(tmp_path / "cg" / "memory" / "ci" / "job", memory_usage_in_bytes=str(3 * GIB),
           memory_stat=f"cache 1\nhierarchical_memory_limit {5 * GIB}\ntotal_inactive_file {GIB}\n")
    room = headroom(proc, tmp_path / "cg")
    assert (room.available, room.cgroup_limit) == (3 * GIB, 5 * GIB)  # 5 - (3 - 1)
    assert room.describe() == "3.0 GiB available (a memory limit of 5.0 GiB applies: cgroup)"


def test_cgroup_v1_without_a_limit_leaves_the_machines_figure(tmp_path):
    proc = _proc(tmp_path, 20 * 2**20, "4:memory:/\n")
    _write(tmp_path / "cg" / "memory", memory_usage_in_bytes=str(GIB),
           memory_stat="hierarchical_memory_limit 9223372036854771712\n")
    assert headroom(proc, tmp_path / "cg") == memory.Headroom(20 * GIB, 20 * GIB)


def test_a_cgroup_v2_limit_on_an_ancestor_is_the_one_that_counts(tmp_path):
    """A container's limit sits on its slice; the process's own cgroup says max."""
    proc = _proc(tmp_path, 20 * 2**20, "0::/pod/ctr\n")
    _write(tmp_path / "cg" / "pod", memory_max=str(6 * GIB), memory_current=str(5 * GIB),
           memory_stat=f"inactive_file {GIB}\n")
    _write(tmp_path / "cg" / "pod" / "ctr", memory_max="max\n", memory_current=str(4 * GIB), memory_stat="anon 1\n")
    room = headroom(proc, tmp_path / "cg")
    assert (room.available, room.cgroup_limit) == (2 * GIB, 6 * GIB)


def test_in_a_cgroup_namespace_the_mount_is_the_containers_own_cgroup(tmp_path):
    proc = _proc(tmp_path, 20 * 2**20, "0::/\n")
    _write(tmp_path / "cg", memory_max=str(4 * GIB), memory_current=str(GIB), memory_stat="inactive_file 0\n")
    assert headroom(proc, tmp_path / "cg").available == 3 * GIB


def test_kills_are_counted_in_this_processs_memory_cgroup_where_it_has_one(tmp_path):
    """Another tenant's kill on a shared machine (another CI job, another user's container) is not
    taken for ours: the own cgroup's count when there is one (v1 or v2), else the machine's."""
    proc = _proc(tmp_path, 2**20, "4:memory:/ci/job\n0::/\n", oom_kill=40)
    _write(tmp_path / "cg" / "memory" / "ci" / "job", memory_oom_control="oom_kill_disable 0\noom_kill 2\n")
    assert oom_kills(proc, tmp_path / "cg") == memory.OomCount(2, "memory cgroup /ci/job")
    proc = _proc(tmp_path / "v2", 2**20, "0::/pod/ctr\n", oom_kill=40)
    _write(tmp_path / "v2" / "cg" / "pod" / "ctr", memory_current="1", memory_events="low 0\noom 1\noom_kill 1\n")
    assert oom_kills(proc, tmp_path / "v2" / "cg") == memory.OomCount(1, "memory cgroup /pod/ctr")
    proc = _proc(tmp_path / "host", 2**20, "0::/\n", oom_kill=40)  # the host's root cgroup: no memory.events
    (tmp_path / "host" / "cg").mkdir()
    assert oom_kills(proc, tmp_path / "host" / "cg") == memory.OomCount(40, "this machine")


def test_unreadable_files_mean_unknown_not_an_error(tmp_path):
    assert headroom(tmp_path / "nothing", tmp_path / "cg") is None
    assert oom_kills(tmp_path / "nothing") is None
    proc = _proc(tmp_path, 2**20, "garbage without colons\n")
    assert headroom(proc, tmp_path / "cg") == memory.Headroom(GIB, GIB)


def test_the_note_names_the_kills_the_headroom_at_start_and_what_to_lower(monkeypatch):
    counts = iter([memory.OomCount(7, "this machine")])
    monkeypatch.setattr(memory, "oom_kills", lambda: next(counts))
    note = OomWatch(memory.OomCount(5, "this machine"), memory.Headroom(3 * GIB, 20 * GIB, 5 * GIB)).note(
        "e2e-llm batch", "kv_cache_memory_bytes in batch.engine_kwargs")
    assert note == ("error: e2e-llm batch failed, and meanwhile the kernel's out-of-memory killer ended 2 processes "
                    "on this machine: most likely this one's, for lack of memory (3.0 GiB available (a memory limit "
                    "of 5.0 GiB applies: cgroup) when it started). Free memory (other programs), or lower what it "
                    "takes: kv_cache_memory_bytes in batch.engine_kwargs")
    monkeypatch.setattr(memory, "oom_kills", lambda: memory.OomCount(5, "this machine"))
    assert OomWatch(memory.OomCount(5, "this machine")).note("x") is None  # no kill: no note
    assert OomWatch(None).note("x") is None  # unknown before: no guess
    monkeypatch.setattr(memory, "oom_kills", lambda: memory.OomCount(6, "memory cgroup /ci/job"))
    assert "ended 1 process in this command's memory cgroup /ci/job: most likely this one's" in OomWatch(
        memory.OomCount(5, "memory cgroup /ci/job")).note("x")


def test_a_process_the_kernel_kills_in_a_memory_limited_cgroup_is_counted_and_the_limit_is_read():
    """On the real kernel: a child in a 96 MiB cgroup sees that limit as its headroom, then takes
    512 MiB and is killed; its cgroup counts the kill, and this process's own count (another
    cgroup's, where it has one) does not take it for one of ours."""
    made = memory_cgroup(96 * 2**20)
    if made is None:
        pytest.skip("no memory cgroup can be made here (needs root and a memory controller)")
    folder, version = made
    child = ("import os, sys\n"
             f"open('{folder}/cgroup.procs', 'w').write(str(os.getpid()))\n"
             "from e2e_llm.memory import headroom\n"
             "room = headroom()\n"
             "print(room.cgroup_limit, room.available, flush=True)\n"
             "hog = bytearray(512 * 2**20)\n"
             "print('survived', flush=True)\n")
    try:
        before = oom_kills()
        counter = folder / ("memory.oom_control" if version == "v1" else "memory.events")
        src = str(Path(memory.__file__).resolve().parents[1])
        done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": src})
        limit, available = (int(x) for x in done.stdout.split()[:2])
        assert limit == 96 * 2**20 and 0 < available <= limit, (version, done.stdout, done.stderr)
        assert done.returncode == -9 and "survived" not in done.stdout
        assert memory.read_key(counter, "oom_kill") == 1, counter.read_text()
        after = oom_kills()
        assert after.scope == before.scope
        assert after.kills > before.kills if before.scope == "this machine" else after.kills == before.kills
    finally:
        folder.rmdir()


def _kills_during(monkeypatch, before: int, after: int) -> None:
    counts = iter([memory.OomCount(before, "this machine"), memory.OomCount(after, "this machine")])
    monkeypatch.setattr(memory, "oom_kills", lambda: next(counts))


def test_a_command_that_fails_while_the_oom_killer_strikes_ends_with_the_note(monkeypatch, capsys):
    from e2e_llm import cli
    from e2e_llm.commands import batch

    def engine_died(args):
        raise RuntimeError("Engine core initialization failed. See root cause above. Failed core proc(s): {}")

    monkeypatch.setattr(batch, "run", engine_died)
    _kills_during(monkeypatch, 1, 2)
    assert cli.main(["batch", "--profile", "local"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "RuntimeError: Engine core initialization failed" in err[-2]  # the traceback, then the note
    assert err[-1].startswith("error: e2e-llm batch failed, and meanwhile the kernel's out-of-memory killer ended "
                              "1 process on this machine")
    assert err[-1].endswith("kv_cache_memory_bytes in batch.engine_kwargs (2 GiB on CPU unless set; a CPU engine "
                            "also holds the model in its dtype)")

    monkeypatch.setattr(batch, "run", lambda args: 1)  # a failure its command reports itself
    _kills_during(monkeypatch, 4, 5)
    assert cli.main(["batch", "--profile", "local"]) == 1
    assert "out-of-memory killer ended 1 process" in capsys.readouterr().err

    _kills_during(monkeypatch, 4, 4)  # no kill: the error is the command's own, untouched
    monkeypatch.setattr(batch, "run", engine_died)
    with pytest.raises(RuntimeError, match="Engine core initialization failed"):
        cli.main(["batch", "--profile", "local"])


def test_a_stage_command_killed_outright_gets_the_note_from_e2e(monkeypatch, tmp_path):
    """The stage's own process killed (the train driver, say): e2e-llm could not say it, e2e does."""
    from e2e_llm.e2e import run_stage

    _kills_during(monkeypatch, 10, 11)
    shown = []
    killed = [sys.executable, "-c", "import os, signal; print('training', flush=True); os.kill(os.getpid(), 9)",
              "train", "--profile", "local"]
    result = run_stage("train", killed, tmp_path / "train.log", env={}, echo=shown.append)
    assert result.returncode == -9
    assert shown[-1].startswith("error: the train stage failed, and meanwhile the kernel's out-of-memory killer")
    assert shown[-1].endswith("fewer workers, or the recipe's per_device_train_batch_size or cutoff_len")
    assert (tmp_path / "train.log").read_text().splitlines()[-1] == shown[-1]


HOG = ("import subprocess, sys, time\n"
       "hog = bytearray({mib} * 2**20)  # zero pages are not resident until written\n"
       "hog[::4096] = b'x' * len(hog[::4096])\n"
       "{child}"
       "print('ready', flush=True)\n"
       "time.sleep({sleep})\n")


def test_a_process_trees_anonymous_memory_counts_its_descendants():
    from e2e_llm.memory import tree_anonymous_bytes

    grandchild = HOG.format(mib=96, child="", sleep=30)
    child = HOG.format(mib=64, sleep=30, child=(
        f"g = subprocess.Popen([sys.executable, '-c', {grandchild!r}], stdout=subprocess.PIPE, text=True)\n"
        "g.stdout.readline()\n"))
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        alone = (memory.read_key(Path(f"/proc/{proc.pid}/status"), "RssAnon:") or 0) * 1024
        tree = tree_anonymous_bytes(proc.pid)
        assert 64 * 2**20 <= alone < 64 * 2**20 + 64 * 2**20
        assert tree >= alone + 96 * 2**20
    finally:
        for pid in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split():
            os.kill(int(pid), 9)
        proc.kill()
        proc.wait()


def test_each_stage_reports_its_peak_memory_in_the_summary(tmp_path, config):
    from e2e_llm.e2e import E2EResult, run_stage, summary, write_summary

    hog = HOG.format(mib=128, child="", sleep=2.5)
    stage = run_stage("batch", [sys.executable, "-c", hog], tmp_path / "batch.log", env={}, echo=lambda line: None)
    assert stage.returncode == 0 and 128 * 2**20 <= stage.peak_bytes < 512 * 2**20
    result = E2EResult("r1", str(tmp_path / "r1"), {"dtype": "float32", "reason": "test"}, stages=[stage])
    text = summary(result, config, 10, "local")
    assert "| stage | seconds | peak memory |" in text
    assert f"| batch | {stage.seconds:.0f} | {stage.peak_bytes / 2**30:.1f} GiB |" in text
    write_summary(result, text)
    assert json.loads((tmp_path / "r1" / "summary.json").read_text())["peak_memory_bytes"] == {
        "batch": stage.peak_bytes}
