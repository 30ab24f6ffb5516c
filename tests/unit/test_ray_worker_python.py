# SPDX-License-Identifier: Apache-2.0
"""Ray workers start from a checkout whose path has a space (``/mnt/c/Users/Jane Doe/...`` on
WSL, ``~/My Projects`` elsewhere).

Ray starts a worker that has a runtime_env through ``bash -c "exec <python> ..."`` without quoting
the interpreter's path; every worker then died at start and `make e2e` waited in its train stage
for ever. Real Ray, started from a virtual environment at a path with a space."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

from e2e_llm import serve as serve_lib  # noqa: E402
from e2e_llm.batch import pipeline  # noqa: E402
from e2e_llm.config import load_profile  # noqa: E402
from e2e_llm.ray_address import own_instance_runtime_env  # noqa: E402

SRC = str(Path(__file__).resolve().parents[2] / "src")

PROBE = textwrap.dedent("""
    import os, sys, ray
    from e2e_llm.ray_address import own_instance_runtime_env
    extra = own_instance_runtime_env() if sys.argv[2] == "fixed" else {}
    ray.init(num_cpus=1, include_dashboard=False, _temp_dir=sys.argv[1],
             runtime_env={"env_vars": {"E2E_PROBE": "reached"}, **extra})

    @ray.remote(num_cpus=0)
    def where():
        return os.environ["E2E_PROBE"], sys.executable

    try:
        print(*ray.get(where.remote(), timeout=float(sys.argv[3])), sep="\\n", flush=True)
    except ray.exceptions.GetTimeoutError:
        print("no worker", flush=True)
""")


def venv_at(path: Path) -> Path:
    """This test's virtual environment seen from ``path``: its own ``pyvenv.cfg``, the base
    interpreter, and the real environment's packages; the Python to run there."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("needs the suite to run in a virtual environment")
    (path / "bin").mkdir(parents=True)
    (path / "pyvenv.cfg").write_text((Path(sys.prefix) / "pyvenv.cfg").read_text())
    (path / "lib").symlink_to(Path(sys.prefix) / "lib")
    python = path / "bin" / "python"
    python.symlink_to(sys._base_executable)
    return python


@pytest.fixture(scope="module")
def spaced_python(tmp_path_factory) -> Path:
    return venv_at(tmp_path_factory.mktemp("ray-py") / "My Projects" / "venv")


@pytest.fixture
def ray_temp() -> Path:
    """A Ray temp dir short enough for Ray's socket paths (pytest's are not)."""
    path = Path(tempfile.mkdtemp(prefix="r-py-", dir="/tmp"))
    yield path
    subprocess.run(["pkill", "-9", "-f", str(path)], check=False)
    shutil.rmtree(path, ignore_errors=True)


def run_probe(python: Path, temp_dir: Path, mode: str, get_timeout_s: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-c", PROBE, str(temp_dir), mode, str(get_timeout_s)],
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": SRC, "HOME": str(temp_dir)},
                          capture_output=True, text=True, timeout=240)


def test_workers_start_from_a_python_whose_path_has_a_space(spaced_python, ray_temp):
    assert " " in str(spaced_python)
    done = run_probe(spaced_python, ray_temp, "fixed", 120)
    assert done.stdout.splitlines()[-2:] == ["reached", str(spaced_python)], done.stderr[-3000:]


def test_without_the_quoted_command_rays_workers_die_at_start(spaced_python, ray_temp):
    # What own_instance_runtime_env works around. When Ray quotes the path itself this fails:
    # the workaround can then go.
    temp_dir = ray_temp
    proc = subprocess.Popen([str(spaced_python), "-c", PROBE, str(temp_dir), "plain", "90"],
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": SRC, "HOME": str(temp_dir)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    bash_said = f"{str(spaced_python).split(' ')[0]}: No such file or directory"
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            logs = "".join(p.read_text(errors="replace") for p in temp_dir.glob("session_*/logs/raylet.*"))
            if bash_said in logs:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"no worker start failed ({bash_said!r} not in the raylet's log); exit {proc.poll()}")
    finally:
        proc.kill()
        proc.wait(timeout=60)


def test_every_ray_instance_e2e_llm_starts_asks_for_the_quoted_command(monkeypatch, project_root):
    monkeypatch.setattr(sys, "executable", "/mnt/c/Users/Jane Doe/e2e-llm/.venv/serve/bin/python")
    wanted = {"py_executable": "'/mnt/c/Users/Jane Doe/e2e-llm/.venv/serve/bin/python'"}
    assert own_instance_runtime_env() == wanted
    config = load_profile("local", root=project_root)
    # serve (e2e-llm serve, the serve bench)
    assert serve_lib.ray_init_kwargs(config)["runtime_env"] == wanted
    # batch and train: what they pass to ray.init for an instance of their own
    import ray

    seen: list[dict] = []
    monkeypatch.setattr(ray, "init", lambda **kw: seen.append(kw))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(pipeline, "local_engines_problem", lambda config: None)
    pipeline.start_ray(config, temp_dir="/tmp/r-x")
    from e2e_llm import train

    train._ensure_ray(config, None)
    assert [kw["runtime_env"].get("py_executable") for kw in seen] == [wanted["py_executable"]] * 2


def test_nothing_is_asked_where_the_path_needs_no_quoting(monkeypatch):
    monkeypatch.setattr(sys, "executable", "/work/e2e-llm/.venv/serve/bin/python")
    assert own_instance_runtime_env() == {}
