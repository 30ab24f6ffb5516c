# SPDX-License-Identifier: Apache-2.0
"""A machine whose /dev/shm is small (a container's default 64 MiB) cannot start a vLLM engine on
CPU: the stages that start one say so before anything starts, and the amount they ask for is the
one vLLM's engine really needs (a real engine started in a private /dev/shm just under it fails,
just over it starts). Each command runs in its own mount namespace with a tmpfs of the size under
test at /dev/shm (``unshare -m``; root only: skipped elsewhere)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.serve
pytest.importorskip("vllm")

ROOT = Path(__file__).resolve().parents[2]
MIB = 2**20
ENGINE = """
from vllm import LLM

if __name__ == "__main__":
    LLM(model={model!r}, enforce_eager=True, max_model_len=256)
    print("ENGINE STARTED", flush=True)
"""


def _with_shm(size_bytes: int, command: list[str], tmp_path: Path, timeout: float) -> subprocess.CompletedProcess:
    """``command`` in a mount namespace of its own, /dev/shm a tmpfs of ``size_bytes``."""
    script = f'mount -t tmpfs -o size={size_bytes // 1024}k tmpfs /dev/shm && exec "$@"'
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "E2E_LLM_STORAGE_ROOT": str(tmp_path / "storage"),
           "VLLM_CPU_KVCACHE_SPACE": "1"}
    return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *command], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def private_shm():
    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
                           capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(f"cannot mount a private /dev/shm here: {probe.stderr.strip()}")


def test_the_stages_that_start_an_engine_refuse_a_64_mib_dev_shm_first(private_shm, tmp_path):
    cli = [sys.executable, "-m", "e2e_llm.cli"]
    expected = "/dev/shm has 64 MiB free, and a vLLM engine on CPU checks for 240 MiB there when it starts"
    e2e = _with_shm(64 * MIB, [*cli, "e2e", "--profile", "local"], tmp_path, timeout=300)
    assert e2e.returncode != 0 and expected in e2e.stdout + e2e.stderr, e2e.stdout + e2e.stderr
    assert "1/6 data" not in e2e.stdout  # refused before its first stage, not after training
    assert "--shm-size=1g" in e2e.stdout + e2e.stderr

    serve = _with_shm(64 * MIB, [*cli, "serve", "--profile", "local"], tmp_path, timeout=300)
    assert serve.returncode == 1 and expected in serve.stderr, serve.stdout + serve.stderr


def test_the_amount_asked_for_is_what_a_real_engine_needs(private_shm, tmp_path, local_model):
    from e2e_llm.compat.vllm import engine_shm_bytes

    need = engine_shm_bytes()
    (tmp_path / "engine.py").write_text(ENGINE.format(model=str(local_model)))
    engine = [sys.executable, str(tmp_path / "engine.py")]
    short = _with_shm(need - MIB, engine, tmp_path, timeout=300)
    assert "ENGINE STARTED" not in short.stdout
    assert "Insufficient space in /dev/shm" in short.stdout + short.stderr, short.stderr[-2000:]
    enough = _with_shm(need + MIB, engine, tmp_path, timeout=300)
    assert "ENGINE STARTED" in enough.stdout, enough.stderr[-2000:]


def test_the_check_reads_the_free_space_where_it_is_told(tmp_path):
    from e2e_llm.memory import shm_problem

    assert shm_problem(tmp_path) is None  # this test machine's disk has room
    assert shm_problem(tmp_path / "absent") is None  # vLLM checks only a /dev/shm that is there
